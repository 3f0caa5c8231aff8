/* Helpers shared by the engine's translation units; not part of the public API. */
#ifndef HP_INTERNAL_H
#define HP_INTERNAL_H

#include <stdint.h>
#include <sys/socket.h>

#include "hp_engine.h"

#define HP_NS_PER_S 1000000000LL
/* Bounds that keep start + span + interval far from int64 overflow. */
#define HP_MAX_TIME_NS (INT64_C(1) << 62)
#define HP_MAX_SPAN_NS (INT64_C(1) << 60)

/* How a failed connect ended, for the stats. */
typedef enum hp_fail_kind { HP_FAIL_OTHER = 0, HP_FAIL_RST = 1, HP_FAIL_ICMP = 2 } hp_fail_kind_t;

hp_fail_kind_t hp_fail_kind(int err);
/* Count an attempt that ended with err (RST or ICMP) in st; return its kind. */
hp_fail_kind_t hp_count_failure(hp_punch_stats_t *st, int err);

/* a with port as a sockaddr of its family (sockaddr_in or sockaddr_in6 with the scope id);
 * returns its length. */
socklen_t hp_addr_sockaddr(const hp_addr_t *a, uint16_t port, struct sockaddr_storage *ss);

/* A sockaddr_in / sockaddr_in6 as an hp_addr_t; -EAFNOSUPPORT for another family. */
int hp_addr_from_sockaddr(const struct sockaddr_storage *ss, hp_addr_t *out);

/* A non-blocking, close-on-exec TCP socket of local's family with SO_REUSEADDR and, when
 * reuseport, SO_REUSEPORT (IPv6: IPV6_V6ONLY, so it never takes IPv4 traffic); bound to
 * local's address and port when do_bind. A concrete address with port 0 is bound with
 * IP_BIND_ADDRESS_NO_PORT when do_bind is 2, so thousands of sockets share ephemeral ports
 * by 4-tuple instead of exhausting them at bind(). */
int hp_sock_tcp_bound(const hp_addr_t *local, uint16_t port, int reuseport, int do_bind,
                      int *out_fd);

/* IP_TTL (IPv6: IPV6_UNICAST_HOPS); ttl -1 restores the route default. */
int hp_sock_set_ttl(int fd, int ttl);

/* Close fd at once with SO_LINGER 0: a connection not yet established leaves with a RST
 * (not a FIN that lingers on its 4-tuple); fd < 0 is ignored. */
void hp_sock_abort(int fd);

/* The connected peer of fd into *out; -errno. */
int hp_sock_peer(int fd, hp_addr_t *out);

/* A punch's winner goes to the caller: blocking again; on failure it is closed. 0 or -errno. */
int hp_sock_hand_over(int fd);

/* Close fd keeping errno intact; fd < 0 is ignored. */
void hp_close(int fd);

/* Local port of a bound socket, or -errno. */
int hp_sock_local_port(int fd);

/* Absolute waits sleep until this long before the target and spin the rest (clock.c). */
#define HP_SPIN_NS 150000LL

/* ---- punches as state machines --------------------------------------------------------
 * A simultaneous open or a sweep is begun (validated, sockets ready: only connect() is left
 * for start_at), stepped whenever its epoll fd is readable or its wake time has come, and
 * ended (every socket it still holds closed, the state freed). One driver runs a single punch
 * to completion for the blocking calls (hp_punch_run), the scheduler runs many (sched.c).
 * step returns 0 = not done (*wake_ns: step again by then, or when the fd is readable),
 * 1 = won (*out_fd: a connected blocking socket, stats filled), < 0 = failed (-errno). */

/* validate: -EINVAL for arguments the punch cannot run with (a or st NULL included); begin
 * takes arguments validate accepted and stats that hp_punch_begin has zeroed. */
typedef struct hp_simopen_state hp_simopen_state_t;
typedef struct hp_sweep_state hp_sweep_state_t;

int hp_simopen_validate(const hp_simopen_args_t *a, const hp_punch_stats_t *st);
int hp_simopen_begin(const hp_simopen_args_t *a, hp_punch_stats_t *st,
                     hp_simopen_state_t **out);
int hp_simopen_fd(const hp_simopen_state_t *s);
int hp_simopen_step(hp_simopen_state_t *s, int64_t now, int *out_fd, int64_t *wake_ns);
void hp_simopen_end(hp_simopen_state_t *s);

int hp_sweep_validate(const hp_sweep_args_t *a, const hp_punch_stats_t *st);
int hp_sweep_begin(const hp_sweep_args_t *a, hp_punch_stats_t *st, hp_sweep_state_t **out);
int hp_sweep_fd(const hp_sweep_state_t *s);
int hp_sweep_step(hp_sweep_state_t *s, int64_t now, int *out_fd, int64_t *wake_ns);
void hp_sweep_end(hp_sweep_state_t *s);

typedef enum hp_punch_kind { HP_PUNCH_SIMOPEN = 1, HP_PUNCH_SWEEP = 2 } hp_punch_kind_t;

typedef struct hp_punch {
    hp_punch_kind_t kind;
    union {
        hp_simopen_state_t *simopen;
        hp_sweep_state_t *sweep;
    } u;
} hp_punch_t;

int hp_punch_fd(const hp_punch_t *p);
int hp_punch_step(hp_punch_t *p, int64_t now, int *out_fd, int64_t *wake_ns);
void hp_punch_end(hp_punch_t *p);

/* args: a const hp_simopen_args_t * or hp_sweep_args_t * as kind says. begin fills p. */
int hp_punch_begin(hp_punch_t *p, hp_punch_kind_t kind, const void *args, hp_punch_stats_t *st);
int64_t hp_punch_start_at(hp_punch_kind_t kind, const void *args);

/* The blocking driver (hp_simopen, hp_sweep): begin, wait for start_at, step until done,
 * end. 0 + *out_fd, or -errno. */
int hp_punch_run(hp_punch_kind_t kind, const void *args, int *out_fd, hp_punch_stats_t *st);

#endif
