/* Helpers shared by the engine's translation units; not part of the public API. */
#ifndef HP_INTERNAL_H
#define HP_INTERNAL_H

#include <stdint.h>

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

/* A non-blocking, close-on-exec TCP socket with SO_REUSEADDR and, when reuseport,
 * SO_REUSEPORT; bound to ip:port when do_bind. A concrete ip with port 0 is bound with
 * IP_BIND_ADDRESS_NO_PORT when do_bind is 2, so thousands of sockets share ephemeral ports
 * by 4-tuple instead of exhausting them at bind(). */
int hp_sock_tcp_bound(uint32_t ip, uint16_t port, int reuseport, int do_bind, int *out_fd);

/* IP_TTL; ttl -1 restores the route default. */
int hp_sock_set_ttl(int fd, int ttl);

int hp_sock_set_blocking(int fd);

/* Close fd keeping errno intact; fd < 0 is ignored. */
void hp_close(int fd);

/* Local port of a bound socket, or -errno. */
int hp_sock_local_port(int fd);

#endif
