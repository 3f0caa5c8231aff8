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

/* The connected peer of fd into *out; -errno. */
int hp_sock_peer(int fd, hp_addr_t *out);

int hp_sock_set_blocking(int fd);

/* Close fd keeping errno intact; fd < 0 is ignored. */
void hp_close(int fd);

/* Local port of a bound socket, or -errno. */
int hp_sock_local_port(int fd);

#endif
