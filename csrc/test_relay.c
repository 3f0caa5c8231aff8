/* The relay pump and the raw SYN builder/sender, on real loopback sockets. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>

#include "test_util.h"

#define MS 1000000LL

typedef struct pump_job {
    int a, b;
    int64_t idle_ns;
    uint64_t max_bytes;
    hp_relay_stats_t st;
    int rc;
} pump_job_t;

static void *pump_thread(void *p)
{
    pump_job_t *j = p;
    j->rc = hp_relay_pump(j->a, j->b, j->idle_ns, j->max_bytes, &j->st);
    return NULL;
}

typedef struct writer_job {
    int fd;
    size_t len;
} writer_job_t;

/* Write len patterned bytes, then half-close. */
static void *writer_thread(void *p)
{
    writer_job_t *w = p;
    unsigned char buf[8192];
    size_t done = 0, i;
    while (done < w->len) {
        size_t n = w->len - done < sizeof(buf) ? w->len - done : sizeof(buf);
        ssize_t k;
        for (i = 0; i < n; i++)
            buf[i] = (unsigned char)((done + i) * 7);
        k = write(w->fd, buf, n);
        if (k <= 0)
            break;
        done += (size_t)k;
    }
    shutdown(w->fd, SHUT_WR);
    return NULL;
}

/* Read to EOF checking the pattern; return the byte count or -1 on a wrong byte. */
static long read_all(int fd)
{
    unsigned char buf[8192];
    long total = 0;
    ssize_t n, i;
    while ((n = read(fd, buf, sizeof(buf))) > 0) {
        for (i = 0; i < n; i++)
            if (buf[i] != (unsigned char)((total + i) * 7))
                return -1;
        total += n;
    }
    return n < 0 ? -1 : total;
}

/* client_a <-> [a  pump  b] <-> client_b */
static void test_relay_both_ways_and_half_close(void)
{
    int ca, sa, cb, sb, fds = hp_t_count_fds(), fl;
    pthread_t tp, tw;
    pump_job_t j;
    writer_job_t w;

    hp_t_tcp_pair(&ca, &sa);
    hp_t_tcp_pair(&cb, &sb);
    fds += 4;
    fl = fcntl(sa, F_GETFL);
    memset(&j, 0, sizeof(j));
    j.a = sa;
    j.b = sb;
    j.idle_ns = 5000 * MS;
    pthread_create(&tp, NULL, pump_thread, &j);

    /* a -> b: 3 MB then a half-close, which must reach client b as EOF. */
    w.fd = ca;
    w.len = 3u << 20;
    pthread_create(&tw, NULL, writer_thread, &w);
    CHECK_EQ(read_all(cb), 3 << 20);
    pthread_join(tw, NULL);
    /* The other direction still works after the half-close. */
    w.fd = cb;
    w.len = 100000;
    pthread_create(&tw, NULL, writer_thread, &w);
    CHECK_EQ(read_all(ca), 100000);
    pthread_join(tw, NULL);
    pthread_join(tp, NULL);

    CHECK_EQ(j.rc, 0);
    CHECK_EQ(j.st.reason, HP_RELAY_EOF);
    CHECK_EQ(j.st.bytes_a_to_b, 3 << 20);
    CHECK_EQ(j.st.bytes_b_to_a, 100000);
    /* The caller's fds are still open, with their flags as they were. */
    CHECK_EQ(fcntl(sa, F_GETFL), fl);
    CHECK_EQ(hp_t_count_fds(), fds);
    close(ca);
    close(sa);
    close(cb);
    close(sb);
}

static void test_relay_byte_limit(void)
{
    int ca, sa, cb, sb, fds = hp_t_count_fds();
    char buf[5000];
    pump_job_t j;
    ssize_t got = 0, n;

    hp_t_tcp_pair(&ca, &sa);
    hp_t_tcp_pair(&cb, &sb);
    memset(buf, 'z', sizeof(buf));
    CHECK_EQ(write(ca, buf, sizeof(buf)), (long)sizeof(buf));
    memset(&j, 0, sizeof(j));
    j.a = sa;
    j.b = sb;
    j.max_bytes = 1000;
    pump_thread(&j);
    CHECK_EQ(j.rc, 0);
    CHECK_EQ(j.st.reason, HP_RELAY_LIMIT);
    CHECK_EQ(j.st.bytes_a_to_b + j.st.bytes_b_to_a, 1000);
    fcntl(cb, F_SETFL, O_NONBLOCK);
    while ((n = read(cb, buf, sizeof(buf))) > 0)
        got += n;
    CHECK_EQ(got, 1000);
    close(ca);
    close(sa);
    close(cb);
    close(sb);
    CHECK_EQ(hp_t_count_fds(), fds);
}

static void test_relay_idle_and_errors(void)
{
    int ca, sa, cb, sb;
    pump_job_t j;
    int64_t t0;

    hp_t_tcp_pair(&ca, &sa);
    hp_t_tcp_pair(&cb, &sb);
    memset(&j, 0, sizeof(j));
    j.a = sa;
    j.b = sb;
    j.idle_ns = 100 * MS;
    t0 = hp_clock_mono_ns();
    pump_thread(&j);
    CHECK_EQ(j.rc, 0);
    CHECK_EQ(j.st.reason, HP_RELAY_IDLE);
    CHECK(hp_clock_mono_ns() - t0 >= 100 * MS);

    /* A reset on one side ends the pump with an error, not a hang. */
    {
        struct linger lg = {1, 0};
        setsockopt(ca, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(ca); /* RST */
    }
    CHECK_EQ(write(cb, "hello", 5), 5);
    j.idle_ns = 2000 * MS;
    pump_thread(&j);
    CHECK_EQ(j.rc, 0);
    CHECK_EQ(j.st.reason, HP_RELAY_ERROR);
    CHECK(j.st.error == ECONNRESET || j.st.error == EPIPE);
    close(sa);
    close(cb);
    close(sb);

    CHECK_EQ(hp_relay_pump(-1, 3, 0, 0, &j.st), -EINVAL);
    CHECK_EQ(hp_relay_pump(3, 3, 0, 0, &j.st), -EINVAL);
    CHECK_EQ(hp_relay_pump(900, 901, 0, 0, &j.st), -EBADF);
    CHECK_EQ(hp_relay_pump(0, 1, 0, 0, NULL), -EINVAL);
    {
        int p[2], u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), fds;
        CHECK_EQ(pipe(p), 0);
        fds = hp_t_count_fds();
        CHECK_EQ(hp_relay_pump(p[0], p[1], 0, 0, &j.st), -ENOTSOCK);
        CHECK_EQ(hp_relay_pump(u, p[1], 0, 0, &j.st), -EPROTOTYPE);
        CHECK_EQ(hp_t_count_fds(), fds);
        close(p[0]);
        close(p[1]);
        close(u);
    }
}

static void test_checksum_vectors(void)
{
    /* RFC 1071 section 3 example: the sum is 0xddf2, so the checksum is its complement. */
    static const uint8_t v[] = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
    uint8_t pkt[HP_SYN_LEN];
    hp_addr_t src, dst;
    uint32_t s, d, pseudo;

    CHECK_EQ(hp_inet_checksum(v, sizeof(v), 0), 0xffff & ~0xddf2);
    hp_addr_parse("192.0.2.1", 40000, &src);
    hp_addr_parse("203.0.113.7", 443, &dst);
    CHECK_EQ(hp_build_syn(pkt, sizeof(pkt), src, dst, 3, 0x01020304, 77), HP_SYN_LEN);
    CHECK_EQ(pkt[8], 3);                       /* TTL */
    CHECK_EQ(pkt[9], 6);                       /* TCP */
    CHECK_EQ(pkt[33], 0x02);                   /* SYN only */
    CHECK_EQ((pkt[20] << 8) | pkt[21], 40000);
    CHECK_EQ((pkt[22] << 8) | pkt[23], 443);
    CHECK_EQ(hp_inet_checksum(pkt, 20, 0), 0); /* a valid header sums to zero */
    s = ntohl(src.ip);
    d = ntohl(dst.ip);
    pseudo = (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + 6 + (HP_SYN_LEN - 20);
    CHECK_EQ(hp_inet_checksum(pkt + 20, HP_SYN_LEN - 20, pseudo), 0);
    CHECK_EQ(hp_build_syn(pkt, 10, src, dst, 3, 0, 0), -EINVAL);
    CHECK_EQ(hp_build_syn(pkt, sizeof(pkt), src, dst, 0, 0, 0), -EINVAL);
}

/* IPv6: 40-byte header (hop limit, next header TCP), TCP checksum over the RFC 8200
 * pseudo-header; mixed families refused. */
static void test_checksum_ipv6(void)
{
    uint8_t pkt[HP_SYN6_LEN];
    hp_addr_t src, dst, v4;
    uint32_t pseudo = 0;
    int i;

    hp_addr_parse("2001:db8::1", 40000, &src);
    hp_addr_parse("2001:db8:1::7", 443, &dst);
    CHECK_EQ(hp_build_syn(pkt, sizeof(pkt), src, dst, 9, 0x01020304, 0), HP_SYN6_LEN);
    CHECK_EQ(pkt[0] >> 4, 6);
    CHECK_EQ((pkt[4] << 8) | pkt[5], HP_SYN6_LEN - 40); /* payload length */
    CHECK_EQ(pkt[6], 6);                                 /* next header: TCP */
    CHECK_EQ(pkt[7], 9);                                 /* hop limit */
    CHECK(memcmp(pkt + 8, src.ip6, 16) == 0 && memcmp(pkt + 24, dst.ip6, 16) == 0);
    CHECK_EQ((pkt[40] << 8) | pkt[41], 40000);
    CHECK_EQ(pkt[53], 0x02);
    for (i = 8; i < 40; i += 2)
        pseudo += (uint32_t)((pkt[i] << 8) | pkt[i + 1]);
    pseudo += 6 + (HP_SYN6_LEN - 40);
    CHECK_EQ(hp_inet_checksum(pkt + 40, HP_SYN6_LEN - 40, pseudo), 0);
    CHECK_EQ(hp_build_syn(pkt, HP_SYN_LEN, src, dst, 9, 0, 0), -EINVAL); /* too short */
    hp_addr_parse("192.0.2.1", 40000, &v4);
    CHECK_EQ(hp_build_syn(pkt, sizeof(pkt), v4, dst, 9, 0, 0), -EINVAL);
}

/* Root only: send SYNs to loopback and catch them with a raw TCP socket. */
static void test_rawsyn_on_the_wire(void)
{
    hp_rawsyn_args_t a;
    int64_t times[3];
    uint32_t sent = 0;
    int cap, seen = 0, rc;
    uint16_t dport = hp_t_free_port();

    if (geteuid() != 0) {
        printf("skip test_rawsyn_on_the_wire (needs CAP_NET_RAW)\n");
        return;
    }
    cap = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_TCP);
    CHECK(cap >= 0);
    memset(&a, 0, sizeof(a));
    hp_addr_parse("127.0.0.1", 41234, &a.src);
    hp_addr_parse("127.0.0.1", dport, &a.dst);
    a.ttl = 7;
    a.count = 3;
    a.spacing_ns = 2 * MS;
    a.start_at_ns = hp_clock_now_ns() + 5 * MS;
    rc = hp_rawsyn(&a, times, &sent);
    CHECK_EQ(rc, 0);
    CHECK_EQ(sent, 3);
    /* On the absolute schedule start_at + i * spacing, never early. */
    CHECK(times[0] >= a.start_at_ns && times[1] >= a.start_at_ns + 2 * MS);
    CHECK(times[2] >= a.start_at_ns + 4 * MS);
    for (;;) {
        uint8_t buf[256];
        struct pollfd pfd = {cap, POLLIN, 0};
        ssize_t n;
        uint32_t s, d, pseudo;
        if (poll(&pfd, 1, 500) <= 0)
            break;
        n = recv(cap, buf, sizeof(buf), 0);
        if (n < 40 || ((buf[22] << 8) | buf[23]) != dport || buf[33] != 0x02)
            continue; /* our kernel's RST answer, or someone else's traffic */
        CHECK_EQ(n, HP_SYN_LEN);
        CHECK_EQ(buf[8], 7);
        CHECK_EQ(hp_inet_checksum(buf, 20, 0), 0);
        memcpy(&s, buf + 12, 4);
        memcpy(&d, buf + 16, 4);
        s = ntohl(s);
        d = ntohl(d);
        pseudo = (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + 6 + (uint32_t)(n - 20);
        CHECK_EQ(hp_inet_checksum(buf + 20, (size_t)n - 20, pseudo), 0);
        if (++seen == 3)
            break;
    }
    CHECK_EQ(seen, 3);
    close(cap);

    a.count = 0;
    CHECK_EQ(hp_rawsyn(&a, NULL, &sent), -EINVAL);
}

int main(void)
{
    RUN(test_checksum_vectors);
    RUN(test_checksum_ipv6);
    RUN(test_relay_both_ways_and_half_close);
    RUN(test_relay_byte_limit);
    RUN(test_relay_idle_and_errors);
    RUN(test_rawsyn_on_the_wire);
    if (hp_t_failures) {
        fprintf(stderr, "%d check(s) failed\n", hp_t_failures);
        return 1;
    }
    return 0;
}
