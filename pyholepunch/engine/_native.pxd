# Declarations of the C engine (csrc/hp_engine.h) for the one binding, _native.pyx.
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t, uint8_t, int32_t


cdef extern from "<errno.h>":
    enum:
        ECANCELED     # not in Cython's libc.errno


cdef extern from "hp_engine.h" nogil:
    ctypedef struct hp_addr_t:
        uint32_t ip
        uint16_t port
        uint16_t family
        uint8_t ip6[16]
        uint32_t scope_id

    int hp_addr_parse(const char *text, uint16_t port, hp_addr_t *out)
    int64_t hp_clock_now_ns()
    void hp_clock_wait_until(int64_t abs_ns)

    ctypedef struct hp_punch_stats_t:
        uint64_t attempts
        uint64_t syns_sent
        uint64_t rsts_seen
        uint64_t icmp_errors
        uint64_t sockets_opened
        int64_t first_syn_at_ns
        int64_t first_syn_delay_ns
        int64_t time_to_established_ns
        int32_t local_port
        int32_t have_remote
        hp_addr_t remote
        int32_t accepted

    ctypedef struct hp_simopen_args_t:
        hp_addr_t local
        hp_addr_t remote
        int64_t start_at_ns
        int64_t timeout_ns
        int64_t interval_ns
        int syn_ttl
        int ttl_syns
        int listen

    int hp_simopen(const hp_simopen_args_t *args, int *out_fd, hp_punch_stats_t *st)

    ctypedef struct hp_sweep_pair_t:
        uint16_t local_port
        hp_addr_t remote

    ctypedef struct hp_sweep_args_t:
        const hp_sweep_pair_t *pairs
        size_t npairs
        hp_addr_t local
        int64_t start_at_ns
        int64_t timeout_ns
        int64_t interval_ns
        uint32_t max_inflight
        double rate
        int syn_ttl

    int hp_sweep(const hp_sweep_args_t *args, int *out_fd, hp_punch_stats_t *st)

    ctypedef struct hp_sched_t:
        pass

    ctypedef struct hp_sched_event_t:
        uint64_t id
        int rc
        int fd
        hp_punch_stats_t st

    int hp_sched_new(hp_sched_t **out)
    int hp_sched_event_fd(const hp_sched_t *s)
    int hp_sched_set_priority(hp_sched_t *s, int priority)
    int hp_sched_simopen(hp_sched_t *s, uint64_t id, const hp_simopen_args_t *args)
    int hp_sched_sweep(hp_sched_t *s, uint64_t id, const hp_sweep_args_t *args)
    int hp_sched_cancel(hp_sched_t *s, uint64_t id)
    size_t hp_sched_drain(hp_sched_t *s, hp_sched_event_t *out, size_t max)
    void hp_sched_free(hp_sched_t *s)

    ctypedef struct hp_rawsyn_args_t:
        hp_addr_t src
        hp_addr_t dst
        int ttl
        uint32_t count
        int64_t spacing_ns
        int64_t start_at_ns

    int hp_rawsyn(const hp_rawsyn_args_t *args, int64_t *send_times_ns, uint32_t *sent)

    int HP_SYN_LEN
    int HP_SYN6_LEN
    uint16_t hp_inet_checksum(const void *data, size_t len, uint32_t initial)
    int hp_build_syn(uint8_t *buf, size_t len, hp_addr_t src, hp_addr_t dst, int ttl,
                     uint32_t seq, uint16_t ip_id)

    enum:
        HP_RELAY_NONE
        HP_RELAY_EOF
        HP_RELAY_IDLE
        HP_RELAY_LIMIT
        HP_RELAY_ERROR

    ctypedef struct hp_relay_stats_t:
        uint64_t bytes_a_to_b
        uint64_t bytes_b_to_a
        int reason
        int error

    int hp_relay_pump(int fd_a, int fd_b, int64_t idle_timeout_ns, uint64_t max_bytes,
                      hp_relay_stats_t *st)

    enum hp_relay_mode:
        HP_RELAY_COPY
        HP_RELAY_SPLICE

    int hp_relay_pump_mode(int fd_a, int fd_b, int64_t idle_timeout_ns, uint64_t max_bytes,
                           int mode, hp_relay_stats_t *st)
