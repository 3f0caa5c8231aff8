"""Network-namespace primitives: create/remove named namespaces, work inside one from a thread,
run a picklable callable in a forked child, find and kill the processes living in a namespace.

setns(2) for CLONE_NEWNET changes only the calling thread, and netlink sockets, /proc/sys/net
files and child processes take the namespace of the thread that creates them; so the lab
configures every namespace from its own short-lived thread, in parallel, with no fork.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import LabError

CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
MNT_DETACH = 2
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_rundir_lock = threading.Lock()
_rundir_ready = False


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def _prepare_rundir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does."""
    global _rundir_ready
    with _rundir_lock:
        if _rundir_ready:
            return
        os.makedirs(NETNS_DIR, exist_ok=True)
        d = NETNS_DIR.encode()
        if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0:
            _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), f"bind-mount {NETNS_DIR}")
            _check(_libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None), f"share {NETNS_DIR}")
        _rundir_ready = True


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns({path})")
    finally:
        os.close(fd)


def _create_here(name: str) -> None:
    """Create namespace `name` from a thread that is about to end (unshare moves the thread)."""
    path = netns_path(name)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(_libc.mount(src, path.encode(), b"none", MS_BIND, None), f"bind-mount {path}")
    except BaseException:
        os.unlink(path)
        raise


def create_many(names: list[str]) -> None:
    _prepare_rundir()
    run_threads({n: functools.partial(_create_here, n) for n in names})


def remove(name: str) -> None:
    path = netns_path(name)
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into namespace `name` for the block, then back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(netns_path(name))
        try:
            yield
        finally:
            _check(_libc.setns(own, CLONE_NEWNET), "setns(back)")
    finally:
        os.close(own)


def run_threads(jobs: dict[str, Callable[[], None]]) -> None:
    """Run each job in its own fresh thread; raise the first failure (labelled) after all end."""
    errors: list[tuple[str, BaseException]] = []

    def wrap(label: str, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append((label, exc))

    threads = [threading.Thread(target=wrap, args=(k, j), name=f"hpl-{k}", daemon=True)
               for k, j in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        label, exc = errors[0]
        raise LabError(f"{label}: {exc}") from exc


def in_netns(name: str, job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with entered(name):
            job()
    return run


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in(*names: str) -> list[int]:
    """Processes whose network namespace is one of `names` (what `ip netns pids` reports)."""
    inodes = {i for i in (_ns_inode(netns_path(n)) for n in names) if i is not None}
    if not inodes:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _ns_inode(f"/proc/{entry}/ns/net") in inodes:
            out.append(int(entry))
    return out


def kill_all(names: list[str], grace: float = 0.5) -> None:
    """SIGTERM then SIGKILL every process living in any of the namespaces."""
    pids = set(pids_in(*names))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if process_alive(p)}
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot): tells a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def call(name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
         timeout: float) -> Any:
    """Run fn(*args, **kwargs) in a forked child inside namespace `name`; return its result or
    re-raise its exception; kill it and raise TimeoutError after `timeout` seconds."""
    payload = pickle.dumps((fn, args, kwargs))  # fail here, in the caller, if not picklable
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(rfd)
        code = 0
        try:
            setns(netns_path(name))
            f, a, kw = pickle.loads(payload)
            result: tuple[bool, Any] = (True, f(*a, **kw))
        except BaseException as exc:  # noqa: BLE001 - shipped to the parent
            code = 1
            exc.add_note(f"raised in namespace {name}:\n{traceback.format_exc().rstrip()}")
            result = (False, exc)
        try:
            try:
                data = pickle.dumps(result)
            except Exception as exc:  # noqa: BLE001
                data = pickle.dumps((False, LabError(f"result not picklable: {exc!r}")))
            os.write(wfd, struct.pack("!Q", len(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        data = _read_all(rfd, time.monotonic() + timeout)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise TimeoutError(f"call in {name} did not finish within {timeout:g} s") from None
    finally:
        os.close(rfd)
        _reap(pid)
    if len(data) < 8:
        raise LabError(f"call in {name}: child died without a result")
    ok, value = pickle.loads(data[8:])
    if ok:
        return value
    raise value


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int) -> None:
    for _ in range(200):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def require_support(delay: bool = False) -> None:
    """Raise LabError naming what this machine lacks for the lab (`delay`: the NFQUEUE delayer)."""
    import shutil
    import sys

    if not sys.platform.startswith("linux"):
        raise LabError("the NAT lab needs Linux network namespaces")
    if os.geteuid() != 0:
        raise LabError("the NAT lab needs root (CAP_SYS_ADMIN for namespaces, CAP_NET_ADMIN for nft)")
    for tool, pkg in (("nft", "nftables"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            raise LabError(f"the NAT lab needs `{tool}` (apt-get install {pkg})")
    if not os.path.exists("/proc/self/ns/net"):
        raise LabError("this kernel has no network namespace support (CONFIG_NET_NS)")
    try:
        import pyroute2  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        raise LabError("the NAT lab needs pyroute2 (pip install pyholepunch[lab])") from exc
    if delay:
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is None:
                raise LabError(f"lab delay needs `{tool}` for its NFQUEUE rule (apt-get install iptables)")
        try:
            import netfilterqueue  # noqa: F401
        except ImportError as exc:
            raise LabError("lab delay needs the NetfilterQueue binding (apt-get install "
                           "libnetfilter-queue-dev; pip install NetfilterQueue)") from exc


def socket_in(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A socket created inside namespace `name`; usable from any thread afterwards (a socket
    keeps the namespace it was created in)."""
    with entered(name):
        return socket.socket(family, type, proto)
