# cython: language_level=3, boundscheck=False, wraparound=False
"""The one binding to the C engine (csrc/): converts arguments, releases the GIL around every
blocking call, and maps C error codes to exceptions in one place (``_raise``).

Arguments arrive validated by :mod:`pyholepunch.engine.native`; nothing here is public API.
"""
import ipaddress
import os
import socket

from libc.errno cimport (EACCES, ECONNREFUSED, EINVAL, EMFILE, ENFILE, ENODEV, EPERM,
                         EPROTOTYPE, ETIMEDOUT)
from libc.math cimport llround
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from pyholepunch.engine._native cimport *

from pyholepunch.engine._base import PunchResult, PunchStats, RawSynStats, RelayStats
from pyholepunch.errors import PunchError, PunchTimeout

_REASONS = {HP_RELAY_EOF: "eof", HP_RELAY_IDLE: "idle", HP_RELAY_LIMIT: "limit"}


cdef int64_t _ns(double seconds):
    return <int64_t>llround(seconds * 1e9)


cdef hp_addr_t _addr(str host, int port) except *:
    cdef hp_addr_t out
    cdef int rc = hp_addr_parse(host.encode("ascii"), <uint16_t>port, &out)
    if rc == -ENODEV:
        raise ValueError(f"{host!r}: no such interface for its scope")
    if rc != 0:
        raise ValueError(f"{host!r} is not an IP address")
    return out


cdef str _ip(const hp_addr_t *a):
    """Canonical text, as the checks write it (a scope as the interface name)."""
    if a.family != socket.AF_INET6:
        return socket.inet_ntoa((<char *>&a.ip)[:4])
    text = str(ipaddress.IPv6Address((<char *>a.ip6)[:16]))
    if a.scope_id:
        try:
            text += "%" + socket.if_indextoname(a.scope_id)
        except OSError:
            text += f"%{a.scope_id}"
    return text


cdef object _stats(const hp_punch_stats_t *st):
    return PunchStats(
        attempts=st.attempts,
        syns_sent=st.syns_sent,
        rsts_seen=st.rsts_seen,
        icmp_errors=st.icmp_errors,
        sockets_opened=st.sockets_opened,
        first_syn_delay_ns=st.first_syn_delay_ns if st.first_syn_at_ns else None,
        time_to_established_ns=(st.time_to_established_ns
                                if st.time_to_established_ns >= 0 else None),
        local_port=st.local_port if st.local_port >= 0 else None,
        remote=(_ip(&st.remote), st.remote.port) if st.have_remote else None,
        accepted=bool(st.accepted),
        first_syn_at=st.first_syn_at_ns / 1e9 if st.first_syn_at_ns else None,
    )


cdef object _raise(int rc, str op, object stats=None):
    """The single place where a negative errno from C becomes a Python exception."""
    cdef int err = -rc
    if stats is not None and (err == ETIMEDOUT or (err == ECONNREFUSED and op == "sweep")):
        what = (f"{op}: no connection ({stats.attempts} attempts, {stats.rsts_seen} RST, "
                f"{stats.icmp_errors} ICMP)")
        if err == ECONNREFUSED:     # the sweep ran out of pairs before the deadline
            raise PunchError(what + "; every pair failed and none is left to retry", stats)
        raise PunchTimeout(what + " by the deadline", stats)
    if op == "raw_syn" and err in (EPERM, EACCES):
        raise PermissionError(
            err, "raw_syn needs CAP_NET_RAW to open a raw IP socket "
            "(run as root or `setcap cap_net_raw+ep` the interpreter)")
    if err in (EMFILE, ENFILE):
        raise OSError(err, f"{op} ran out of file descriptors ({os.strerror(err)}); "
                           f"raise RLIMIT_NOFILE or open fewer sockets at once")
    if err == EPROTOTYPE and op == "relay_pump":
        raise ValueError("relay_pump needs two stream (TCP) sockets")
    if err == EINVAL:
        raise ValueError(f"{op}: the C engine rejected an argument (EINVAL)")
    raise OSError(err, f"{op}: {os.strerror(err)}")


cdef object _result(int fd, object stats):
    try:
        sock = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    sock.setblocking(True)
    return PunchResult(sock, stats)


cdef int _simopen_args(hp_simopen_args_t *a, str local_ip, int local_port, str remote_ip,
                       int remote_port, double start_at, double timeout, double interval,
                       int syn_ttl, int ttl_syns, bint listen) except -1:
    memset(a, 0, sizeof(a[0]))
    a.local = _addr(local_ip, local_port)
    a.remote = _addr(remote_ip, remote_port)
    a.start_at_ns = _ns(start_at)
    a.timeout_ns = _ns(timeout)
    a.interval_ns = _ns(interval)
    a.syn_ttl = syn_ttl
    a.ttl_syns = ttl_syns
    a.listen = listen
    return 0


def simultaneous_open(str local_ip, int local_port, str remote_ip, int remote_port,
                      double start_at, double timeout, double interval, int syn_ttl,
                      int ttl_syns, bint listen):
    cdef hp_simopen_args_t a
    cdef hp_punch_stats_t st
    cdef int fd = -1, rc
    _simopen_args(&a, local_ip, local_port, remote_ip, remote_port, start_at, timeout,
                  interval, syn_ttl, ttl_syns, listen)
    with nogil:
        rc = hp_simopen(&a, &fd, &st)
    stats = _stats(&st)
    if rc < 0:
        _raise(rc, "simultaneous_open", stats if rc != -EINVAL else None)
    return _result(fd, stats)


cdef hp_sweep_pair_t *_sweep_args(hp_sweep_args_t *a, list pairs, str local_ip,
                                  double start_at, double timeout, double interval,
                                  unsigned int max_inflight, double rate,
                                  int syn_ttl) except NULL:
    """Fill a; the returned pairs (a.pairs) are the caller's to free."""
    cdef hp_sweep_pair_t *c_pairs
    cdef size_t i, n = len(pairs)
    cdef dict hosts = {}
    cdef hp_addr_t addr
    cdef bytes packed
    if n == 0:
        raise ValueError("sweep needs at least one pair")
    c_pairs = <hp_sweep_pair_t *>malloc(n * sizeof(hp_sweep_pair_t))
    if c_pairs == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            lport, (host, port) = pairs[i]
            packed = hosts.get(host)
            if packed is None:
                addr = _addr(host, 0)
                packed = hosts[host] = (<char *>&addr)[:sizeof(hp_addr_t)]
            c_pairs[i].local_port = <uint16_t>lport
            memcpy(&c_pairs[i].remote, <char *>packed, sizeof(hp_addr_t))
            c_pairs[i].remote.port = <uint16_t>port
        memset(a, 0, sizeof(a[0]))
        a.pairs = c_pairs
        a.npairs = n
        a.local = _addr(local_ip, 0)
        a.start_at_ns = _ns(start_at)
        a.timeout_ns = _ns(timeout)
        a.interval_ns = _ns(interval)
        a.max_inflight = max_inflight
        a.rate = rate
        a.syn_ttl = syn_ttl
    except BaseException:
        free(c_pairs)
        raise
    return c_pairs


def sweep(list pairs, str local_ip, double start_at, double timeout, double interval,
          unsigned int max_inflight, double rate, int syn_ttl):
    cdef hp_sweep_args_t a
    cdef hp_punch_stats_t st
    cdef hp_sweep_pair_t *c_pairs
    cdef int fd = -1, rc
    cdef size_t n = len(pairs)
    c_pairs = _sweep_args(&a, pairs, local_ip, start_at, timeout, interval, max_inflight,
                          rate, syn_ttl)
    try:
        with nogil:
            rc = hp_sweep(&a, &fd, &st)
    finally:
        free(c_pairs)
    stats = _stats(&st)
    if rc < 0:
        _raise(rc, "sweep", stats if rc != -EINVAL else None)
    return _result(fd, stats)


cdef object _outcome(const hp_sched_event_t *ev, tuple call):
    """An event's outcome as the blocking call would have given it: a PunchResult, the
    exception it would have raised, or None when the punch was cancelled. ``call`` is the
    blocking call's name and what its failure message names (Scheduler.calls)."""
    if ev.rc == -ECANCELED:
        return None
    stats = _stats(&ev.st)
    try:    # never raise here: drain() must hand over every event it took from C
        if ev.rc == 0:
            return _result(ev.fd, stats)
        _raise(ev.rc, call[0], stats if ev.rc != -EINVAL else None)
    except Exception as exc:
        return exc


cdef class Scheduler:
    """The C scheduler (csrc/sched.c): one thread running many punches; completions are
    drained from ``drain()`` when ``fileno()`` (an eventfd) is readable."""

    cdef hp_sched_t *s
    cdef dict calls      # id -> (the blocking call's name, what its failure message names)

    def __cinit__(self):
        cdef int rc = hp_sched_new(&self.s)
        self.calls = {}
        if rc < 0:
            self.s = NULL
            _raise(rc, "scheduler")

    def __dealloc__(self):
        self._free()

    cdef void _free(self):
        cdef hp_sched_t *s = self.s
        self.s = NULL
        if s != NULL:
            with nogil:
                hp_sched_free(s)

    def close(self):
        """Cancel every punch, close every socket (undrained winners too), join the thread."""
        self._free()

    cdef hp_sched_t *_live(self) except NULL:
        if self.s == NULL:
            raise ValueError("the scheduler is closed")
        return self.s

    def fileno(self):
        return hp_sched_event_fd(self._live())

    def set_priority(self, int priority):
        """SCHED_FIFO at priority (1..99) for the scheduler thread, 0 = normal."""
        rc = hp_sched_set_priority(self._live(), priority)
        if rc == -EPERM:
            raise PermissionError(-rc, "a real-time scheduler thread needs CAP_SYS_NICE")
        if rc < 0:
            _raise(rc, "set_priority")

    def simultaneous_open(self, uint64_t id, str local_ip, int local_port, str remote_ip,
                          int remote_port, double start_at, double timeout, double interval,
                          int syn_ttl, int ttl_syns, bint listen):
        cdef hp_simopen_args_t a
        cdef hp_sched_t *s = self._live()
        _simopen_args(&a, local_ip, local_port, remote_ip, remote_port, start_at, timeout,
                      interval, syn_ttl, ttl_syns, listen)
        rc = hp_sched_simopen(s, id, &a)
        if rc < 0:
            _raise(rc, "simultaneous_open")
        self.calls[id] = ("simultaneous_open", local_ip, local_port, remote_ip, remote_port)

    def sweep(self, uint64_t id, list pairs, str local_ip, double start_at, double timeout,
              double interval, unsigned int max_inflight, double rate, int syn_ttl):
        cdef hp_sweep_args_t a
        cdef hp_sched_t *s = self._live()
        cdef hp_sweep_pair_t *c_pairs = _sweep_args(&a, pairs, local_ip, start_at, timeout,
                                                    interval, max_inflight, rate, syn_ttl)
        try:
            rc = hp_sched_sweep(s, id, &a)    # copies the pairs
        finally:
            free(c_pairs)
        if rc < 0:
            _raise(rc, "sweep")
        self.calls[id] = ("sweep", len(pairs))

    def cancel(self, uint64_t id):
        rc = hp_sched_cancel(self._live(), id)
        if rc < 0:
            _raise(rc, "cancel")

    def drain(self):
        """[(id, PunchResult | exception | None for cancelled)] of every punch that ended."""
        cdef hp_sched_event_t evs[64]
        cdef hp_sched_t *s = self._live()
        cdef size_t n, i
        out = []
        while True:
            n = hp_sched_drain(s, evs, 64)
            for i in range(n):
                out.append((evs[i].id, _outcome(&evs[i], self.calls.pop(evs[i].id, ("punch",)))))
            if n < 64:
                return out


def raw_syn(str src_ip, int src_port, str dst_ip, int dst_port, int ttl, unsigned int count,
            double spacing, double start_at):
    cdef hp_rawsyn_args_t a
    cdef int64_t *times = <int64_t *>malloc(count * sizeof(int64_t))
    cdef uint32_t sent = 0, i
    cdef int rc
    if times == NULL:
        raise MemoryError()
    try:
        memset(&a, 0, sizeof(a))
        a.src = _addr(src_ip, src_port)
        a.dst = _addr(dst_ip, dst_port)
        a.ttl = ttl
        a.count = count
        a.spacing_ns = _ns(spacing)
        a.start_at_ns = _ns(start_at)
        with nogil:
            rc = hp_rawsyn(&a, times, &sent)
        if rc < 0:
            _raise(rc, "raw_syn")
        stats = RawSynStats(sent=sent)
        if sent:
            stats.first_send_delay_ns = max(0, times[0] - a.start_at_ns)
        stats.send_times = [times[i] / 1e9 for i in range(sent)]
        return stats
    finally:
        free(times)


def build_syn(str src_ip, int src_port, str dst_ip, int dst_port, int ttl, uint32_t seq,
              uint16_t ip_id):
    """The exact bytes raw_syn sends (for tests and tools)."""
    cdef uint8_t buf[64]
    rc = hp_build_syn(buf, sizeof(buf), _addr(src_ip, src_port), _addr(dst_ip, dst_port),
                      ttl, seq, ip_id)
    if rc < 0:
        _raise(rc, "build_syn")
    return bytes(buf[:rc])


def relay_pump(int fd_a, int fd_b, double idle_timeout, unsigned long long max_bytes,
               int mode=HP_RELAY_COPY):
    cdef hp_relay_stats_t st
    cdef int rc
    cdef int64_t idle = _ns(idle_timeout)
    with nogil:
        rc = hp_relay_pump_mode(fd_a, fd_b, idle, max_bytes, mode, &st)
    if rc < 0:
        _raise(rc, "relay_pump")
    if st.reason == HP_RELAY_ERROR:
        reason = f"error: {os.strerror(st.error)}"
    else:
        reason = _REASONS[st.reason]
    return RelayStats(bytes_a_to_b=st.bytes_a_to_b, bytes_b_to_a=st.bytes_b_to_a, reason=reason)
