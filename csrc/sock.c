/* Socket helpers shared by simultaneous open and sweep. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hp_internal.h"

int hp_addr_parse(const char *text, uint16_t port, hp_addr_t *out)
{
    struct in_addr a;
    if (text == NULL || out == NULL || inet_pton(AF_INET, text, &a) != 1)
        return -EINVAL;
    out->ip = a.s_addr;
    out->port = port;
    return 0;
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

int hp_sock_tcp_bound(uint32_t ip, uint16_t port, int reuseport, int do_bind, int *out_fd)
{
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
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
        struct sockaddr_in sa;
        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = ip;
        sa.sin_port = htons(port);
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
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
    return setsockopt(fd, IPPROTO_IP, IP_TTL, &ttl, sizeof(ttl)) < 0 ? -errno : 0;
}

int hp_sock_set_blocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

int hp_sock_local_port(int fd)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0)
        return -errno;
    return ntohs(sa.sin_port);
}
