/* Socket helpers shared by simultaneous open and sweep. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hp_internal.h"

int hp_addr_parse(const char *text, uint16_t port, hp_addr_t *out)
{
    struct in_addr a;
    char buf[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    const char *pct;
    if (text == NULL || out == NULL)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    out->port = port;
    if (inet_pton(AF_INET, text, &a) == 1) {
        out->family = AF_INET;
        out->ip = a.s_addr;
        return 0;
    }
    if (strlen(text) >= sizeof(buf))
        return -EINVAL;
    strcpy(buf, text);
    pct = strchr(text, '%');
    if (pct != NULL) {
        char *end;
        unsigned long idx;
        buf[pct - text] = '\0';
        if (pct[1] == '\0')
            return -EINVAL;
        idx = strtoul(pct + 1, &end, 10);
        if (*end != '\0')
            idx = if_nametoindex(pct + 1);
        if (idx == 0 || idx > UINT32_MAX)
            return -ENODEV;
        out->scope_id = (uint32_t)idx;
    }
    if (inet_pton(AF_INET6, buf, out->ip6) != 1)
        return -EINVAL;
    out->family = AF_INET6;
    return 0;
}

int hp_addr_family(const hp_addr_t *a)
{
    return a->family == AF_INET6 ? AF_INET6 : AF_INET;
}

int hp_addr_is_any(const hp_addr_t *a)
{
    static const uint8_t zero[16];
    if (hp_addr_family(a) == AF_INET6)
        return memcmp(a->ip6, zero, 16) == 0;
    return a->ip == 0;
}

int hp_addr_equal(const hp_addr_t *a, const hp_addr_t *b)
{
    if (hp_addr_family(a) != hp_addr_family(b) || a->port != b->port)
        return 0;
    if (hp_addr_family(a) == AF_INET6)
        return memcmp(a->ip6, b->ip6, 16) == 0;
    return a->ip == b->ip;
}

socklen_t hp_addr_sockaddr(const hp_addr_t *a, uint16_t port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (hp_addr_family(a) == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        memcpy(&s6->sin6_addr, a->ip6, 16);
        s6->sin6_port = htons(port);
        s6->sin6_scope_id = a->scope_id;
        return sizeof(*s6);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        s4->sin_family = AF_INET;
        s4->sin_addr.s_addr = a->ip;
        s4->sin_port = htons(port);
        return sizeof(*s4);
    }
}

int hp_addr_from_sockaddr(const struct sockaddr_storage *ss, hp_addr_t *out)
{
    memset(out, 0, sizeof(*out));
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        out->family = AF_INET6;
        memcpy(out->ip6, &s6->sin6_addr, 16);
        out->scope_id = s6->sin6_scope_id;
        out->port = ntohs(s6->sin6_port);
        return 0;
    }
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        out->family = AF_INET;
        out->ip = s4->sin_addr.s_addr;
        out->port = ntohs(s4->sin_port);
        return 0;
    }
    return -EAFNOSUPPORT;
}

void hp_punch_stats_init(hp_punch_stats_t *st)
{
    memset(st, 0, sizeof(*st));
    st->time_to_established_ns = -1;
    st->local_port = -1;
}

hp_fail_kind_t hp_fail_kind(int err)
{
    switch (err) {
    case ECONNREFUSED:
    case ECONNRESET:
        return HP_FAIL_RST;
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EHOSTDOWN:
        return HP_FAIL_ICMP;
    default:
        return HP_FAIL_OTHER;
    }
}

hp_fail_kind_t hp_count_failure(hp_punch_stats_t *st, int err)
{
    hp_fail_kind_t kind = hp_fail_kind(err);
    if (kind == HP_FAIL_RST)
        st->rsts_seen++;
    else if (kind == HP_FAIL_ICMP)
        st->icmp_errors++;
    return kind;
}

void hp_close(int fd)
{
    if (fd >= 0) {
        int saved = errno;
        close(fd);
        errno = saved;
    }
}

int hp_sock_tcp_bound(const hp_addr_t *local, uint16_t port, int reuseport, int do_bind,
                      int *out_fd)
{
    int one = 1, family = hp_addr_family(local);
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
        goto fail;
    if (family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) < 0)
        goto fail;
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
        goto fail;
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
    if (do_bind == 2 && port == 0
        && setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0)
        goto fail;
    if (do_bind) {
        struct sockaddr_storage ss;
        socklen_t len = hp_addr_sockaddr(local, port, &ss);
        if (bind(fd, (struct sockaddr *)&ss, len) < 0)
            goto fail;
    }
    *out_fd = fd;
    return 0;
fail: {
    int err = errno;
    close(fd);
    return -err;
}
}

int hp_sock_set_ttl(int fd, int ttl)
{
    int family = AF_INET;
    socklen_t len = sizeof(family);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &len) < 0)
        return -errno;
    if (family == AF_INET6)
        return setsockopt(fd, IPPROTO_IPV6, IPV6_UNICAST_HOPS, &ttl, sizeof(ttl)) < 0 ? -errno : 0;
    return setsockopt(fd, IPPROTO_IP, IP_TTL, &ttl, sizeof(ttl)) < 0 ? -errno : 0;
}

void hp_sock_abort(int fd)
{
    struct linger lg = {1, 0};
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    hp_close(fd);
}

int hp_sock_hand_over(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        int rc = -errno;
        hp_close(fd);
        return rc;
    }
    return 0;
}

int hp_sock_local_port(int fd)
{
    struct sockaddr_storage ss;
    hp_addr_t a;
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    return hp_addr_from_sockaddr(&ss, &a) < 0 ? -EAFNOSUPPORT : a.port;
}

int hp_sock_peer(int fd, hp_addr_t *out)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    return hp_addr_from_sockaddr(&ss, out);
}
