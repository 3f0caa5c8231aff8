"""Type stub for the Cython binding to csrc/ (arguments arrive validated by native.py)."""
from ._base import PunchResult, RawSynStats, RelayStats

def simultaneous_open(
    local_ip: str, local_port: int, remote_ip: str, remote_port: int, start_at: float,
    timeout: float, interval: float, syn_ttl: int, ttl_syns: int, listen: bool,
) -> PunchResult: ...
def sweep(
    pairs: list[tuple[int, tuple[str, int]]], local_ip: str, start_at: float, timeout: float,
    interval: float, max_inflight: int, rate: float, syn_ttl: int,
) -> PunchResult: ...
def raw_syn(
    src_ip: str, src_port: int, dst_ip: str, dst_port: int, ttl: int, count: int,
    spacing: float, start_at: float,
) -> RawSynStats: ...
def build_syn(
    src_ip: str, src_port: int, dst_ip: str, dst_port: int, ttl: int, seq: int, ip_id: int,
) -> bytes: ...
def relay_pump(fd_a: int, fd_b: int, idle_timeout: float, max_bytes: int,
               mode: int = ...) -> RelayStats: ...
