/* Hand-built IPv4/TCP SYNs through an IP_HDRINCL raw socket, on an absolute schedule. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hp_internal.h"

uint16_t hp_inet_checksum(const void *data, size_t len, uint32_t initial)
{
    const uint8_t *p = data;
    uint64_t sum = initial;
    size_t i;
    for (i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)((p[i] << 8) | p[i + 1]);
    if (len & 1)
        sum += (uint32_t)(p[len - 1] << 8);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void hp_put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void hp_put32(uint8_t *p, uint32_t v)
{
    hp_put16(p, (uint16_t)(v >> 16));
    hp_put16(p + 2, (uint16_t)v);
}

/* The TCP SYN after the IP header: ports, seq, SYN, window, MSS 1460; checksum left 0. */
static void hp_put_tcp_syn(uint8_t *tcp, const hp_addr_t *src, const hp_addr_t *dst,
                           uint32_t seq, size_t tcp_len)
{
    hp_put16(tcp, src->port);
    hp_put16(tcp + 2, dst->port);
    hp_put32(tcp + 4, seq);
    tcp[12] = (uint8_t)((tcp_len / 4) << 4); /* data offset: 6 words */
    tcp[13] = 0x02;                    /* SYN */
    hp_put16(tcp + 14, 64240);         /* window, as Linux offers */
    tcp[20] = 2;                       /* MSS option */
    tcp[21] = 4;
    hp_put16(tcp + 22, 1460);
}

/* The partial sum of 16-bit words of n bytes (n even), for pseudo-headers. */
static uint32_t hp_sum16(const uint8_t *p, size_t n)
{
    uint32_t sum = 0;
    size_t i;
    for (i = 0; i + 1 < n; i += 2)
        sum += (uint32_t)((p[i] << 8) | p[i + 1]);
    return sum;
}

static int hp_build_syn6(uint8_t *buf, size_t len, const hp_addr_t *src, const hp_addr_t *dst,
                         int ttl, uint32_t seq)
{
    uint8_t *ip = buf, *tcp = buf + 40;
    const size_t tcp_len = HP_SYN6_LEN - 40;
    uint32_t pseudo;

    if (len < HP_SYN6_LEN)
        return -EINVAL;
    memset(buf, 0, HP_SYN6_LEN);
    ip[0] = 0x60;                      /* IPv6, traffic class 0, flow label 0 */
    hp_put16(ip + 4, (uint16_t)tcp_len);
    ip[6] = IPPROTO_TCP;
    ip[7] = (uint8_t)ttl;              /* hop limit */
    memcpy(ip + 8, src->ip6, 16);
    memcpy(ip + 24, dst->ip6, 16);
    hp_put_tcp_syn(tcp, src, dst, seq, tcp_len);
    /* RFC 8200 pseudo-header: source, destination, upper-layer length, next header. */
    pseudo = hp_sum16(ip + 8, 32) + (uint32_t)tcp_len + IPPROTO_TCP;
    hp_put16(tcp + 16, hp_inet_checksum(tcp, tcp_len, pseudo));
    return HP_SYN6_LEN;
}

int hp_build_syn(uint8_t *buf, size_t len, hp_addr_t src, hp_addr_t dst, int ttl,
                 uint32_t seq, uint16_t ip_id)
{
    uint8_t *ip = buf, *tcp = buf + 20;
    uint32_t saddr, daddr, pseudo;
    const size_t tcp_len = HP_SYN_LEN - 20;

    if (buf == NULL || ttl < 1 || ttl > 255 || dst.port == 0
        || hp_addr_family(&src) != hp_addr_family(&dst))
        return -EINVAL;
    if (hp_addr_family(&dst) == AF_INET6)
        return hp_build_syn6(buf, len, &src, &dst, ttl, seq);
    if (len < HP_SYN_LEN)
        return -EINVAL;
    memset(buf, 0, HP_SYN_LEN);
    saddr = ntohl(src.ip);
    daddr = ntohl(dst.ip);

    ip[0] = 0x45;                      /* IPv4, 5-word header */
    hp_put16(ip + 2, HP_SYN_LEN);
    hp_put16(ip + 4, ip_id);
    hp_put16(ip + 6, 0x4000);          /* DF */
    ip[8] = (uint8_t)ttl;
    ip[9] = IPPROTO_TCP;
    hp_put32(ip + 12, saddr);
    hp_put32(ip + 16, daddr);
    hp_put16(ip + 10, hp_inet_checksum(ip, 20, 0));

    hp_put_tcp_syn(tcp, &src, &dst, seq, tcp_len);
    /* Pseudo-header: source, destination, protocol, TCP length. */
    pseudo = (saddr >> 16) + (saddr & 0xffff) + (daddr >> 16) + (daddr & 0xffff)
             + IPPROTO_TCP + (uint32_t)tcp_len;
    hp_put16(tcp + 16, hp_inet_checksum(tcp, tcp_len, pseudo));
    return HP_SYN_LEN;
}

/* The source address the kernel would pick towards dst (a connected UDP socket sends
 * nothing). */
static int hp_route_source(const hp_addr_t *dst, hp_addr_t *out)
{
    struct sockaddr_storage ss;
    socklen_t len = hp_addr_sockaddr(dst, 9, &ss);
    uint16_t port = out->port;
    int fd = socket(hp_addr_family(dst), SOCK_DGRAM | SOCK_CLOEXEC, 0), rc = 0;
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&ss, len) < 0) {
        rc = -errno;
    } else {
        len = sizeof(ss);
        rc = getsockname(fd, (struct sockaddr *)&ss, &len) < 0 ? -errno
                                                              : hp_addr_from_sockaddr(&ss, out);
    }
    out->port = port;
    close(fd);
    return rc;
}

static uint32_t hp_seed(int64_t t, const hp_rawsyn_args_t *a)
{
    /* Not security: an initial sequence number that differs between runs and ports. */
    uint64_t x = (uint64_t)t ^ ((uint64_t)a->src.port << 32) ^ a->dst.ip ^ a->dst.port;
    uint32_t w;
    memcpy(&w, a->dst.ip6 + 12, 4);
    x ^= (uint64_t)w << 16;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (uint32_t)x;
}

int hp_rawsyn(const hp_rawsyn_args_t *a, int64_t *send_times_ns, uint32_t *sent)
{
    uint8_t pkt[HP_SYN6_LEN];
    struct sockaddr_storage sa;
    socklen_t salen;
    hp_addr_t src;
    uint32_t i, seq;
    int64_t start;
    int fd, rc = 0;

    if (a == NULL || sent == NULL)
        return -EINVAL;
    *sent = 0;
    if (hp_addr_is_any(&a->dst) || a->dst.port == 0
        || hp_addr_family(&a->src) != hp_addr_family(&a->dst) || a->src.port == 0 || a->ttl < 1 || a->ttl > 255
        || a->count == 0 || a->spacing_ns < 0 || a->start_at_ns < 0
        || a->start_at_ns > HP_MAX_TIME_NS || a->spacing_ns > HP_MAX_SPAN_NS / a->count)
        return -EINVAL;
    src = a->src;
    if (hp_addr_is_any(&src) && (rc = hp_route_source(&a->dst, &src)) < 0)
        return rc;
    /* IPPROTO_RAW implies IP_HDRINCL, for IPv6 too (we write the IPv6 header). */
    fd = socket(hp_addr_family(&a->dst), SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    if (fd < 0)
        return -errno;
    salen = hp_addr_sockaddr(&a->dst, 0, &sa);

    start = a->start_at_ns > 0 ? a->start_at_ns : hp_clock_now_ns();
    seq = hp_seed(start, a);
    for (i = 0; i < a->count; i++) {
        int64_t t;
        /* Retransmissions of one SYN: same sequence number, fresh IP id. */
        rc = hp_build_syn(pkt, sizeof(pkt), src, a->dst, a->ttl, seq,
                          (uint16_t)(seq + i));
        if (rc < 0)
            break;
        hp_clock_wait_until(start + (int64_t)i * a->spacing_ns);
        t = hp_clock_now_ns();
        if (sendto(fd, pkt, (size_t)rc, 0, (struct sockaddr *)&sa, salen) < 0) {
            rc = -errno;
            break;
        }
        rc = 0;
        if (send_times_ns != NULL)
            send_times_ns[i] = t;
        (*sent)++;
    }
    close(fd);
    return rc;
}
