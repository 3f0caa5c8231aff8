"""Hand-built TCP SYNs with their IPv4 or IPv6 header, sent through a header-including raw
socket (IPPROTO_RAW: IP_HDRINCL, for IPv6 too) — the pure engine's raw_syn.

The packet builder is plain bytes-in/bytes-out so it can be checked without a socket.
"""
from __future__ import annotations

import errno
import ipaddress
import random
import socket
import struct
import time

from . import _base
from ._base import Address, RawSynStats
from ._pure_clock import wait_until

IP_HEADER = struct.Struct("!BBHHHBBH4s4s")
IP6_HEADER = struct.Struct("!IHBB16s16s")
TCP_HEADER = struct.Struct("!HHIIBBHHH")
MSS_OPTION = struct.Struct("!BBH")
TCP_SYN = 0x02
IP_DF = 0x4000


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_syn(
    src: Address, dst: Address, *, ttl: int, seq: int, ip_id: int,
    window: int = 64240, mss: int = 1460,
) -> bytes:
    """One IPv4 or IPv6 (by the addresses' family) + TCP SYN with an MSS option, as a kernel
    SYN has, checksums filled in; ``ttl`` is the IPv6 hop limit, ``ip_id`` unused for IPv6."""
    v6 = ":" in dst[0]
    saddr = ipaddress.ip_address(src[0].split("%")[0]).packed
    daddr = ipaddress.ip_address(dst[0].split("%")[0]).packed
    options = MSS_OPTION.pack(2, 4, mss)
    tcp_len = TCP_HEADER.size + len(options)
    offset = (tcp_len // 4) << 4
    tcp = TCP_HEADER.pack(src[1], dst[1], seq, 0, offset, TCP_SYN, window, 0, 0) + options
    if v6:      # RFC 8200 pseudo-header: addresses, 32-bit length, 3 zero bytes, next header
        pseudo = saddr + daddr + struct.pack("!I3xB", tcp_len, socket.IPPROTO_TCP)
    else:
        pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, tcp_len)
    tcp_sum = internet_checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", tcp_sum) + tcp[18:]
    if v6:
        return IP6_HEADER.pack(6 << 28, tcp_len, socket.IPPROTO_TCP, ttl, saddr, daddr) + tcp
    total = IP_HEADER.size + tcp_len
    ip = IP_HEADER.pack(0x45, 0, total, ip_id, IP_DF, ttl, socket.IPPROTO_TCP, 0, saddr, daddr)
    ip_sum = internet_checksum(ip)
    ip = ip[:10] + struct.pack("!H", ip_sum) + ip[12:]
    return ip + tcp


def raw_syn(
    src: Address, dst: Address, *, ttl: int = 64, count: int = 1, spacing: float = 0.0,
    start_at: float | None = None,
) -> RawSynStats:
    src_a, dst_a, start = _base.check_raw_args(src, dst, ttl, count, spacing, start_at)
    v6 = ":" in dst_a[0]
    try:
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                             socket.IPPROTO_RAW)
    except PermissionError as exc:
        raise PermissionError(
            errno.EPERM,
            "raw_syn needs CAP_NET_RAW to open a raw IP socket "
            "(run as root or `setcap cap_net_raw+ep` the interpreter)",
        ) from exc
    stats = RawSynStats()
    rng = random.SystemRandom()
    seq = rng.getrandbits(32)          # one ISN: later SYNs look like retransmissions
    ip_id = rng.getrandbits(16)
    with sock:
        if not v6:                      # IPPROTO_RAW implies it; said for the reader
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        packet = build_syn(src_a, dst_a, ttl=ttl, seq=seq, ip_id=ip_id)
        for i in range(count):
            wait_until(start + i * spacing)
            sent_at = time.time()       # the schedule released it: the SYN leaves in sendto()
            sock.sendto(packet, _base.sockaddr((dst_a[0], 0)))
            if stats.first_send_delay_ns is None:
                stats.first_send_delay_ns = max(0, int((sent_at - start) * 1e9))
            stats.send_times.append(sent_at)
            stats.sent += 1
            # Build the next one while waiting, not on the schedule's critical path.
            packet = build_syn(src_a, dst_a, ttl=ttl, seq=seq, ip_id=(ip_id + i + 1) & 0xFFFF)
    return stats
