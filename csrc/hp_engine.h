/* pyholepunch native engine: TCP hole-punching primitives in plain C99 (Linux).
 *
 * Conventions: every function returns 0 or a negative errno; results go to out-structs;
 * nothing prints, exits or calls back. Times are absolute CLOCK_REALTIME nanoseconds
 * (int64) below 2^62, durations are nanoseconds below 2^60. Addresses (hp_addr_t): IPv4 or
 * IPv6, in network byte order, ports in host byte order; a call's addresses are all of one
 * family. Every call but the scheduler's is blocking; all are thread-safe (no global state).
 */
#ifndef HP_ENGINE_H
#define HP_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hp_addr {
    uint32_t ip;        /* IPv4, network byte order */
    uint16_t port;      /* host byte order */
    uint16_t family;    /* AF_INET or AF_INET6; 0 is taken as AF_INET (a zeroed IPv4 address) */
    uint8_t ip6[16];    /* IPv6, network byte order */
    uint32_t scope_id;  /* IPv6 link-local: the interface index; else 0 */
} hp_addr_t;

/* Parse an IPv4 or IPv6 literal (IPv6 may end in %scope: an interface name or index);
 * -EINVAL if it is neither, -ENODEV for an unknown scope interface. */
int hp_addr_parse(const char *text, uint16_t port, hp_addr_t *out);

/* AF_INET or AF_INET6. */
int hp_addr_family(const hp_addr_t *a);

/* 1 for the unspecified address (0.0.0.0 or ::) of either family. */
int hp_addr_is_any(const hp_addr_t *a);

/* 1 when a and b are the same family, address and port (the scope id is not compared). */
int hp_addr_equal(const hp_addr_t *a, const hp_addr_t *b);

/* ---- clock ------------------------------------------------------------------------- */

int64_t hp_clock_now_ns(void); /* CLOCK_REALTIME */
int64_t hp_clock_mono_ns(void);

/* Return at (or a few microseconds after) abs_ns: an absolute clock_nanosleep until shortly
 * before, then a spin on clock_gettime, so the wake-up is not at the mercy of timer slack. */
void hp_clock_wait_until(int64_t abs_ns);

/* ---- statistics shared by simultaneous open and sweep -------------------------------- */

typedef struct hp_punch_stats {
    uint64_t attempts;       /* connect() calls, re-arms included */
    uint64_t syns_sent;      /* connects that put a SYN on the wire */
    uint64_t rsts_seen;      /* attempts ended by RST / ECONNREFUSED */
    uint64_t icmp_errors;    /* attempts ended by EHOSTUNREACH / ENETUNREACH / EHOSTDOWN */
    uint64_t sockets_opened; /* sockets created, listeners included */
    int64_t first_syn_at_ns; /* absolute; 0 = no SYN sent */
    int64_t first_syn_delay_ns;     /* first SYN minus start_at; valid if first_syn_at_ns */
    int64_t time_to_established_ns; /* established minus start_at; -1 = not established */
    int32_t local_port;      /* winner's local port, -1 = none */
    int32_t have_remote;     /* 1 if remote is set */
    hp_addr_t remote;        /* winner's peer address */
    int32_t accepted;        /* 1 if won by listen + accept */
} hp_punch_stats_t;

void hp_punch_stats_init(hp_punch_stats_t *st);

/* ---- simultaneous open ----------------------------------------------------------------- */

typedef struct hp_simopen_args {
    hp_addr_t local;      /* port 0: pick one on the first attempt, then keep it */
    hp_addr_t remote;     /* the same family as local */
    int64_t start_at_ns;  /* absolute */
    int64_t timeout_ns;   /* deadline = start_at + timeout */
    int64_t interval_ns;  /* re-arm spacing after RST / unreachable, > 0 */
    int syn_ttl;          /* 0 = default TTL; else 1..255 for the first ttl_syns attempts */
    int ttl_syns;
    int listen;           /* also listen + accept on the local port */
} hp_simopen_args_t;

/* 0 and *out_fd = a connected, blocking socket; -ETIMEDOUT at the deadline (stats filled);
 * -EINVAL for bad arguments; -EADDRINUSE when the local port cannot be shared; other -errno. */
int hp_simopen(const hp_simopen_args_t *args, int *out_fd, hp_punch_stats_t *st);

/* ---- sweep ------------------------------------------------------------------------------ */

typedef struct hp_sweep_pair {
    uint16_t local_port;  /* 0 = ephemeral */
    hp_addr_t remote;
} hp_sweep_pair_t;

typedef struct hp_sweep_args {
    const hp_sweep_pair_t *pairs;
    size_t npairs;
    hp_addr_t local;      /* the source address (port ignored), any = the wildcard of its
                           * family; every pair's remote is of this family */
    int64_t start_at_ns;
    int64_t timeout_ns;
    int64_t interval_ns;  /* 0 = a failed pair is not retried */
    uint32_t max_inflight;
    double rate;          /* SYNs per second, 0 = as fast as possible */
    int syn_ttl;          /* 0 = default; else TTL for each pair's first SYN */
} hp_sweep_args_t;

/* 0 and *out_fd = the first connection established (blocking); -ETIMEDOUT at the deadline;
 * -ECONNREFUSED when every pair failed and none is left to retry; -EMFILE / -ENFILE when
 * descriptors ran out; -EINVAL for bad arguments. A pair whose local port cannot be bound
 * is skipped. No descriptor leaks on any path. */
int hp_sweep(const hp_sweep_args_t *args, int *out_fd, hp_punch_stats_t *st);

/* ---- scheduler: many punches on one thread ------------------------------------------------
 * One thread owns every punch submitted to it (simultaneous opens and sweeps, each with its
 * re-arms and deadline) on one epoll: each first SYN leaves at its start_at, each punch ends
 * on its own. Outcomes come back as events: when hp_sched_event_fd() (an eventfd) is
 * readable, hp_sched_drain() them. The scheduler never calls back. Every function here is
 * thread-safe; args are copied at submit (pairs included), ids are the caller's. */

typedef struct hp_sched hp_sched_t;

typedef struct hp_sched_event {
    uint64_t id;
    int rc;               /* 0, -ECANCELED, or what the blocking call would have returned */
    int fd;               /* rc == 0: the connected blocking socket, now the caller's; else -1 */
    hp_punch_stats_t st;
} hp_sched_event_t;

int hp_sched_new(hp_sched_t **out);
int hp_sched_event_fd(const hp_sched_t *s);
/* Run the scheduler thread under SCHED_FIFO at priority 1..99 (0: back to SCHED_OTHER), so a
 * busy machine does not delay a first SYN by a time slice; -EPERM without CAP_SYS_NICE. Its
 * work is bounded (no spin longer than HP_SPIN_NS), it sleeps between deadlines. */
int hp_sched_set_priority(hp_sched_t *s, int priority);
/* Submit; sockets are opened on the scheduler's thread, so a failure to open them (bad
 * arguments included) is the punch's event, not this return value. -ESHUTDOWN once freed. */
int hp_sched_simopen(hp_sched_t *s, uint64_t id, const hp_simopen_args_t *args);
int hp_sched_sweep(hp_sched_t *s, uint64_t id, const hp_sweep_args_t *args);
/* Close every socket of punch id at once; its event says -ECANCELED (unless it ended first). */
int hp_sched_cancel(hp_sched_t *s, uint64_t id);
/* Copy up to max waiting events to out; the eventfd stays readable while more wait. */
size_t hp_sched_drain(hp_sched_t *s, hp_sched_event_t *out, size_t max);
/* Cancel everything, join the thread, close every socket and undrained winner, free. */
void hp_sched_free(hp_sched_t *s);

/* ---- raw SYN ------------------------------------------------------------------------------ */

#define HP_SYN_LEN 44     /* 20 IPv4 + 20 TCP + 4 (MSS option) */
#define HP_SYN6_LEN 64    /* 40 IPv6 + 20 TCP + 4 (MSS option) */

/* RFC 1071 Internet checksum over len bytes, plus an initial 32-bit partial sum. */
uint16_t hp_inet_checksum(const void *data, size_t len, uint32_t initial);

/* Write one TCP SYN (MSS 1460) with its IP header into buf: IPv4 (DF, both checksums,
 * HP_SYN_LEN bytes) or IPv6 (flow label 0, HP_SYN6_LEN bytes; ip_id unused), by the family of
 * src and dst (which must agree). Returns the packet's length or -EINVAL. */
int hp_build_syn(uint8_t *buf, size_t len, hp_addr_t src, hp_addr_t dst, int ttl,
                 uint32_t seq, uint16_t ip_id);

typedef struct hp_rawsyn_args {
    hp_addr_t src;        /* any = the route's source address towards dst */
    hp_addr_t dst;        /* the same family as src */
    int ttl;              /* 1..255: IPv4 TTL or IPv6 hop limit */
    uint32_t count;       /* >= 1 */
    int64_t spacing_ns;   /* between SYNs, >= 0 */
    int64_t start_at_ns;  /* 0 = now */
} hp_rawsyn_args_t;

/* Send count SYNs through a header-including raw socket (IPPROTO_RAW) on an absolute schedule
 * (start_at + i * spacing). send_times_ns (may be NULL) gets count entries. *sent counts the
 * SYNs sent even on error. -EPERM / -EACCES without CAP_NET_RAW. */
int hp_rawsyn(const hp_rawsyn_args_t *args, int64_t *send_times_ns, uint32_t *sent);

/* ---- relay pump ----------------------------------------------------------------------------- */

enum hp_relay_reason {
    HP_RELAY_NONE = 0,
    HP_RELAY_EOF = 1,   /* both sides closed their sending half */
    HP_RELAY_IDLE = 2,  /* nothing moved for idle_timeout */
    HP_RELAY_LIMIT = 3, /* max_bytes relayed in total */
    HP_RELAY_ERROR = 4  /* see error */
};

typedef struct hp_relay_stats {
    uint64_t bytes_a_to_b;
    uint64_t bytes_b_to_a;
    int reason;           /* enum hp_relay_reason */
    int error;            /* errno for HP_RELAY_ERROR */
} hp_relay_stats_t;

/* Copy both ways between two connected stream sockets (recv/send), until both EOFs, idle,
 * the byte limit (0 = none) or an error (reported in stats, return 0). Half-closes are
 * propagated with shutdown(SHUT_WR). The caller's fds stay open with their flags restored.
 * idle_timeout_ns 0 = none. Returns -EINVAL / -EBADF / -ENOTSOCK for bad fds, -EPROTOTYPE for
 * a socket that is not a stream, -errno on setup failure. */
int hp_relay_pump(int fd_a, int fd_b, int64_t idle_timeout_ns, uint64_t max_bytes,
                  hp_relay_stats_t *st);

/* How hp_relay_pump_mode moves bytes: recv/send through a buffer (hp_relay_pump's choice,
 * measured faster on loopback) or splice(2) through a pipe. -EINVAL for another mode. */
enum hp_relay_mode { HP_RELAY_COPY = 0, HP_RELAY_SPLICE = 1 };
int hp_relay_pump_mode(int fd_a, int fd_b, int64_t idle_timeout_ns, uint64_t max_bytes,
                       int mode, hp_relay_stats_t *st);

#ifdef __cplusplus
}
#endif
#endif /* HP_ENGINE_H */
