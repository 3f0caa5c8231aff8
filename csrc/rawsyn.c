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

int hp_build_syn(uint8_t *buf, size_t len, hp_addr_t src, hp_addr_t dst, int ttl,
                 uint32_t seq, uint16_t ip_id)
{
    uint8_t *ip = buf, *tcp = buf + 20;
    uint32_t saddr, daddr, pseudo;
    const size_t tcp_len = HP_SYN_LEN - 20;

    if (buf == NULL || len < HP_SYN_LEN || ttl < 1 || ttl > 255 || dst.port == 0)
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

    hp_put16(tcp, src.port);
    hp_put16(tcp + 2, dst.port);
    hp_put32(tcp + 4, seq);
    tcp[12] = (uint8_t)((tcp_len / 4) << 4); /* data offset: 6 words */
    tcp[13] = 0x02;                    /* SYN */
    hp_put16(tcp + 14, 64240);         /* window, as Linux offers */
    tcp[20] = 2;                       /* MSS option */
    tcp[21] = 4;
    hp_put16(tcp + 22, 1460);
    /* Pseudo-header: source, destination, protocol, TCP length. */
    pseudo = (saddr >> 16) + (saddr & 0xffff) + (daddr >> 16) + (daddr & 0xffff)
             + IPPROTO_TCP + (uint32_t)tcp_len;
    hp_put16(tcp + 16, hp_inet_checksum(tcp, tcp_len, pseudo));
    return 0;
}

/* The source address the kernel would pick towards dst (a connected UDP socket sends
 * nothing). */
static int hp_route_source(uint32_t dst_ip, uint32_t *out)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), rc = 0;
    if (fd < 0)
        return -errno;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = dst_ip;
    sa.sin_port = htons(9);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0
        || getsockname(fd, (struct sockaddr *)&sa, &len) < 0)
        rc = -errno;
    else
        *out = sa.sin_addr.s_addr;
    close(fd);
    return rc;
}

static uint32_t hp_seed(int64_t t, const hp_rawsyn_args_t *a)
{
    /* Not security: an initial sequence number that differs between runs and ports. */
    uint64_t x = (uint64_t)t ^ ((uint64_t)a->src.port << 32) ^ a->dst.ip ^ a->dst.port;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (uint32_t)x;
}

int hp_rawsyn(const hp_rawsyn_args_t *a, int64_t *send_times_ns, uint32_t *sent)
{
    uint8_t pkt[HP_SYN_LEN];
    struct sockaddr_in sa;
    hp_addr_t src;
    uint32_t i, seq;
    int64_t start;
    int fd, rc = 0;

    if (a == NULL || sent == NULL)
        return -EINVAL;
    *sent = 0;
    if (a->dst.ip == 0 || a->dst.port == 0 || a->src.port == 0 || a->ttl < 1 || a->ttl > 255
        || a->count == 0 || a->spacing_ns < 0 || a->start_at_ns < 0
        || a->start_at_ns > HP_MAX_TIME_NS || a->spacing_ns > HP_MAX_SPAN_NS / a->count)
        return -EINVAL;
    src = a->src;
    if (src.ip == 0 && (rc = hp_route_source(a->dst.ip, &src.ip)) < 0)
        return rc;
    fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW); /* implies IP_HDRINCL */
    if (fd < 0)
        return -errno;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = a->dst.ip;

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
        if (sendto(fd, pkt, sizeof(pkt), 0, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            rc = -errno;
            break;
        }
        if (send_times_ns != NULL)
            send_times_ns[i] = t;
        (*sent)++;
    }
    close(fd);
    return rc;
}
