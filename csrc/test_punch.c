/* Simultaneous open, re-arm, timeout and sweep on real loopback sockets. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/resource.h>

#include "test_util.h"

#define MS 1000000LL

typedef struct simopen_job {
    hp_simopen_args_t args;
    hp_punch_stats_t st;
    int fd;
    int rc;
} simopen_job_t;

static void *simopen_thread(void *p)
{
    simopen_job_t *j = p;
    j->rc = hp_simopen(&j->args, &j->fd, &j->st);
    return NULL;
}

static int t_v6; /* 1: the simultaneous-open tests run over ::1 */

static void loopback_addr(hp_addr_t *a, uint16_t port)
{
    CHECK_EQ(hp_addr_parse(t_v6 ? "::1" : "127.0.0.1", port, a), 0);
}

static void simopen_args(hp_simopen_args_t *a, uint16_t lport, uint16_t rport, int64_t start,
                         int64_t timeout, int listen)
{
    memset(a, 0, sizeof(*a));
    loopback_addr(&a->local, lport);
    loopback_addr(&a->remote, rport);
    a->start_at_ns = start;
    a->timeout_ns = timeout;
    a->interval_ns = 10 * MS;
    a->ttl_syns = 1;
    a->listen = listen;
}

/* Two threads connect towards each other from fixed ports at the same start_at. */
static void simopen_pair(int listen)
{
    simopen_job_t ja, jb;
    pthread_t ta, tb;
    uint16_t pa = hp_t_free_port(), pb = hp_t_free_port();
    int64_t start = hp_clock_now_ns() + 50 * MS;
    int fds = hp_t_count_fds();
    char c = 'x';

    simopen_args(&ja.args, pa, pb, start, 3000 * MS, listen);
    simopen_args(&jb.args, pb, pa, start, 3000 * MS, listen);
    pthread_create(&ta, NULL, simopen_thread, &ja);
    pthread_create(&tb, NULL, simopen_thread, &jb);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK_EQ(ja.rc, 0);
    CHECK_EQ(jb.rc, 0);
    if (ja.rc == 0 && jb.rc == 0) {
        CHECK_EQ(ja.st.local_port, pa);
        CHECK_EQ(jb.st.local_port, pb);
        CHECK_EQ(ja.st.remote.port, pb);
        CHECK_EQ(jb.st.remote.port, pa);
        CHECK(ja.st.attempts >= ja.st.syns_sent);
        /* With a listener, the peer's SYN may take our port first: connect() then finds
         * the 4-tuple taken (no SYN of ours left) and accept() wins. */
        CHECK(ja.st.syns_sent >= 1 || ja.st.accepted);
        if (ja.st.syns_sent) {
            CHECK(ja.st.first_syn_delay_ns >= 0 && ja.st.first_syn_delay_ns < 50 * MS);
            CHECK(ja.st.time_to_established_ns >= ja.st.first_syn_delay_ns);
        }
        if (!listen)
            CHECK(!ja.st.accepted && !jb.st.accepted);
        /* The two ends really are one connection. */
        CHECK_EQ(write(ja.fd, &c, 1), 1);
        c = 0;
        CHECK_EQ(read(jb.fd, &c, 1), 1);
        CHECK_EQ(c, 'x');
        close(ja.fd);
        close(jb.fd);
    }
    CHECK_EQ(hp_t_count_fds(), fds);
}

static void test_simopen_connect_only(void) { simopen_pair(0); }
static void test_simopen_with_listen(void) { simopen_pair(1); }

/* Over ::1 (with listen: connect-only pairs on a plain loopback race each other's RSTs in
 * lockstep and time out under load, in either family). */
static void test_simopen_ipv6(void)
{
    t_v6 = 1;
    simopen_pair(1);
    t_v6 = 0;
}

/* A listener on [::1]:0; *port gets its port. */
static int listener6(uint16_t *port)
{
    struct sockaddr_in6 sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin6_family = AF_INET6;
    sa.sin6_addr = in6addr_loopback;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0
        || getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        perror("listener6");
        exit(2);
    }
    *port = ntohs(sa.sin6_port);
    return fd;
}

/* A sweep over ::1 from an explicit local address: the one listening port wins. */
static void test_sweep_ipv6(void)
{
    hp_sweep_pair_t pairs[64];
    hp_sweep_args_t a;
    hp_punch_stats_t st;
    uint16_t lport = 0;
    int lfd = listener6(&lport), fd = -1, i, fds = hp_t_count_fds();
    memset(pairs, 0, sizeof(pairs));
    for (i = 0; i < 64; i++)
        CHECK_EQ(hp_addr_parse("::1", (uint16_t)(25000 + i), &pairs[i].remote), 0);
    pairs[40].remote.port = lport;
    memset(&a, 0, sizeof(a));
    CHECK_EQ(hp_addr_parse("::1", 0, &a.local), 0);
    a.pairs = pairs;
    a.npairs = 64;
    a.start_at_ns = hp_clock_now_ns();
    a.timeout_ns = 3000 * MS;
    a.max_inflight = 64;
    CHECK_EQ(hp_sweep(&a, &fd, &st), 0);
    CHECK_EQ(st.remote.family, AF_INET6);
    CHECK_EQ(st.remote.port, lport);
    CHECK(memcmp(st.remote.ip6, &in6addr_loopback, 16) == 0);
    CHECK(st.rsts_seen >= 40);
    close(fd);
    /* A pair of the other family than the local address: refused up front. */
    CHECK_EQ(hp_addr_parse("127.0.0.1", 9, &pairs[3].remote), 0);
    CHECK_EQ(hp_sweep(&a, &fd, &st), -EINVAL);
    CHECK_EQ(hp_t_count_fds(), fds);
    close(lfd);
}

typedef struct late_listener {
    uint16_t port;
    int64_t at;
    int fd;
} late_listener_t;

static void *late_listen_thread(void *p)
{
    late_listener_t *l = p;
    hp_clock_wait_until(l->at);
    l->fd = hp_t_listener(&l->port);
    return NULL;
}

/* Nobody listens at first: RSTs, re-arms every interval, success once a listener appears. */
static void test_simopen_rearm_after_rst(void)
{
    late_listener_t l;
    pthread_t t;
    hp_simopen_args_t a;
    hp_punch_stats_t st;
    int fd = -1, rc, fds = hp_t_count_fds();
    int64_t start = hp_clock_now_ns() + 10 * MS;

    l.port = hp_t_free_port();
    l.at = start + 200 * MS;
    simopen_args(&a, 0, l.port, start, 3000 * MS, 0);
    pthread_create(&t, NULL, late_listen_thread, &l);
    rc = hp_simopen(&a, &fd, &st);
    pthread_join(t, NULL);
    CHECK_EQ(rc, 0);
    CHECK(st.rsts_seen >= 5);
    CHECK_EQ(st.attempts, st.rsts_seen + 1);
    CHECK(st.time_to_established_ns >= 200 * MS);
    CHECK_EQ(st.remote.port, l.port);
    close(fd);
    close(l.fd);
    CHECK_EQ(hp_t_count_fds(), fds);
}

static void test_simopen_timeout(void)
{
    hp_simopen_args_t a;
    hp_punch_stats_t st;
    int fd = 123, rc, fds = hp_t_count_fds();
    int64_t start = hp_clock_now_ns();

    simopen_args(&a, 0, hp_t_free_port(), start, 150 * MS, 1);
    rc = hp_simopen(&a, &fd, &st);
    CHECK_EQ(rc, -ETIMEDOUT);
    CHECK_EQ(fd, -1);
    CHECK(st.rsts_seen >= 3);
    CHECK_EQ(st.time_to_established_ns, -1);
    CHECK(hp_clock_now_ns() - start >= 150 * MS);
    CHECK_EQ(hp_t_count_fds(), fds);
}

static void test_simopen_bad_args(void)
{
    hp_simopen_args_t a;
    hp_punch_stats_t st;
    int fd;
    simopen_args(&a, 0, 80, hp_clock_now_ns(), 100 * MS, 0);
    CHECK_EQ(hp_simopen(NULL, &fd, &st), -EINVAL);
    CHECK_EQ(hp_simopen(&a, NULL, &st), -EINVAL);
    a.timeout_ns = 0;
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EINVAL);
    a.timeout_ns = MS;
    a.interval_ns = -1;
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EINVAL);
    a.interval_ns = MS;
    a.syn_ttl = 256;
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EINVAL);
    a.syn_ttl = 0;
    a.remote.port = 0;
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EINVAL);
    a.remote.port = 80;
    CHECK_EQ(hp_addr_parse("::1", 80, &a.remote), 0); /* IPv4 local, IPv6 remote */
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EINVAL);
    CHECK_EQ(hp_addr_parse("::", 80, &a.remote), 0);
    a.local = a.remote;
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EINVAL);      /* unspecified remote */
}

/* The local port is taken by a socket without SO_REUSEPORT: a clear error, nothing leaked. */
static void test_simopen_port_in_use(void)
{
    hp_simopen_args_t a;
    hp_punch_stats_t st;
    uint16_t port = 0;
    int lfd = hp_t_listener(&port), fd, fds = hp_t_count_fds();
    simopen_args(&a, port, 9, hp_clock_now_ns(), 100 * MS, 1);
    CHECK_EQ(hp_simopen(&a, &fd, &st), -EADDRINUSE);
    CHECK_EQ(hp_t_count_fds(), fds);
    close(lfd);
}

#define SWEEP_N 1024

/* 1024 pairs, exactly one remote port listens: that one wins, every other socket closes. */
static void test_sweep_finds_the_listener(void)
{
    hp_sweep_pair_t *pairs = calloc(SWEEP_N, sizeof(*pairs));
    hp_sweep_args_t a;
    hp_punch_stats_t st;
    uint16_t lport = 0;
    int lfd, fd = -1, rc, fds, i;

    lfd = hp_t_listener(&lport);
    fds = hp_t_count_fds();
    /* Ports below the ephemeral range, where nothing else on the host listens. */
    for (i = 0; i < SWEEP_N; i++) {
        pairs[i].remote.ip = hp_t_loopback();
        pairs[i].remote.port = (uint16_t)(21000 + i);
    }
    pairs[SWEEP_N * 3 / 4].remote.port = lport;
    memset(&a, 0, sizeof(a));
    a.pairs = pairs;
    a.npairs = SWEEP_N;
    a.start_at_ns = hp_clock_now_ns();
    a.timeout_ns = 3000 * MS;
    a.max_inflight = SWEEP_N;
    a.start_at_ns = hp_clock_now_ns() + 20 * MS;
    rc = hp_sweep(&a, &fd, &st);
    CHECK_EQ(rc, 0);
    CHECK_EQ(st.remote.port, lport);
    CHECK(st.first_syn_at_ns >= a.start_at_ns && st.first_syn_delay_ns < 20 * MS);
    CHECK(st.attempts >= SWEEP_N * 3 / 4 && st.attempts <= SWEEP_N);
    CHECK(st.rsts_seen + 1 <= st.attempts);
    CHECK_EQ(st.sockets_opened, st.attempts);
    CHECK_EQ(hp_t_count_fds(), fds + 1);
    close(fd);
    CHECK_EQ(hp_t_count_fds(), fds);
    close(lfd);
    free(pairs);
}

/* Nothing listens: every pair is refused, the sweep ends early with -ECONNREFUSED. */
static void test_sweep_all_refused(void)
{
    hp_sweep_pair_t pairs[64];
    hp_sweep_args_t a;
    hp_punch_stats_t st;
    int fd, i, fds = hp_t_count_fds();
    for (i = 0; i < 64; i++) {
        pairs[i].local_port = 0;
        pairs[i].remote.ip = hp_t_loopback();
        pairs[i].remote.port = (uint16_t)(23000 + i);
    }
    memset(&a, 0, sizeof(a));
    a.pairs = pairs;
    a.npairs = 64;
    a.start_at_ns = hp_clock_now_ns();
    a.timeout_ns = 3000 * MS;
    a.max_inflight = 8; /* fewer slots than pairs: slots are reused */
    a.rate = 20000.0;
    CHECK_EQ(hp_sweep(&a, &fd, &st), -ECONNREFUSED);
    CHECK_EQ(st.attempts, 64);
    CHECK_EQ(st.rsts_seen, 64);
    CHECK(hp_clock_now_ns() - a.start_at_ns >= 63 * 50000LL); /* paced: 50 us apart */
    CHECK_EQ(hp_t_count_fds(), fds);

    /* With re-arms it keeps trying until the deadline. */
    a.interval_ns = 20 * MS;
    a.rate = 0.0;
    a.start_at_ns = hp_clock_now_ns();
    a.timeout_ns = 100 * MS;
    CHECK_EQ(hp_sweep(&a, &fd, &st), -ETIMEDOUT);
    CHECK(st.attempts >= 64 * 4);
    CHECK_EQ(hp_t_count_fds(), fds);
}

/* More sockets than RLIMIT_NOFILE allows: -EMFILE, every socket opened so far closed. */
static void test_sweep_out_of_fds(void)
{
    hp_sweep_pair_t pairs[200];
    hp_sweep_args_t a;
    hp_punch_stats_t st;
    struct rlimit old, low;
    int fd, i, fds = hp_t_count_fds();
    for (i = 0; i < 200; i++) {
        pairs[i].local_port = 0;
        pairs[i].remote.ip = hp_t_loopback();
        pairs[i].remote.port = (uint16_t)(24000 + i);
    }
    getrlimit(RLIMIT_NOFILE, &old);
    low = old;
    low.rlim_cur = (rlim_t)fds + 20;
    setrlimit(RLIMIT_NOFILE, &low);
    memset(&a, 0, sizeof(a));
    a.pairs = pairs;
    a.npairs = 200;
    a.start_at_ns = hp_clock_now_ns();
    a.timeout_ns = 1000 * MS;
    a.max_inflight = 200;
    /* Unpaced, every slot is filled before any event is read, so the limit is hit. */
    i = hp_sweep(&a, &fd, &st);
    setrlimit(RLIMIT_NOFILE, &old);
    CHECK_EQ(i, -EMFILE);
    CHECK(st.sockets_opened > 0 && st.sockets_opened < 200);
    CHECK_EQ(hp_t_count_fds(), fds);
}

static void test_sweep_bad_args(void)
{
    hp_sweep_pair_t p;
    hp_sweep_args_t a;
    hp_punch_stats_t st;
    int fd;
    memset(&p, 0, sizeof(p));
    p.remote.ip = hp_t_loopback();
    p.remote.port = 1;
    memset(&a, 0, sizeof(a));
    a.pairs = &p;
    a.npairs = 0;
    a.start_at_ns = hp_clock_now_ns();
    a.timeout_ns = MS;
    a.max_inflight = 1;
    CHECK_EQ(hp_sweep(&a, &fd, &st), -EINVAL);
    a.npairs = 1;
    a.max_inflight = 0;
    CHECK_EQ(hp_sweep(&a, &fd, &st), -EINVAL);
    a.max_inflight = 1;
    a.rate = -1.0;
    CHECK_EQ(hp_sweep(&a, &fd, &st), -EINVAL);
    a.rate = 0.0;
    p.remote.port = 0;
    CHECK_EQ(hp_sweep(&a, &fd, &st), -EINVAL);
}

static void test_clock_wait_precision(void)
{
    int i, late = 0;
    for (i = 0; i < 20; i++) {
        int64_t target = hp_clock_now_ns() + 2 * MS, d;
        hp_clock_wait_until(target);
        d = hp_clock_now_ns() - target;
        CHECK(d >= 0);
        if (d > 1 * MS)
            late++;
    }
    CHECK(late <= 2); /* a shared machine may preempt us once or twice */
}

static void test_addr_parse(void)
{
    hp_addr_t a;
    CHECK_EQ(hp_addr_parse("127.0.0.1", 5, &a), 0);
    CHECK_EQ(a.ip, htonl(INADDR_LOOPBACK));
    CHECK_EQ(a.port, 5);
    CHECK_EQ(a.family, AF_INET);
    CHECK_EQ(hp_addr_parse("300.1.1.1", 5, &a), -EINVAL);
    CHECK_EQ(hp_addr_parse("::1", 5, &a), 0);
    CHECK_EQ(a.family, AF_INET6);
    CHECK(memcmp(a.ip6, &in6addr_loopback, 16) == 0);
    CHECK_EQ(a.scope_id, 0);
    CHECK_EQ(hp_addr_parse("fe80::1%1", 5, &a), 0);
    CHECK_EQ(a.scope_id, 1);
    CHECK_EQ(hp_addr_parse("fe80::1%lo", 5, &a), 0);
    CHECK(a.scope_id > 0);
    CHECK_EQ(hp_addr_parse("fe80::1%no-such-if0", 5, &a), -ENODEV);
    CHECK_EQ(hp_addr_parse("fe80::1%", 5, &a), -EINVAL);
    CHECK_EQ(hp_addr_parse("[::1]", 5, &a), -EINVAL);
    CHECK_EQ(hp_addr_parse(NULL, 5, &a), -EINVAL);
    CHECK_EQ(hp_addr_parse("::", 5, &a), 0);
    CHECK_EQ(hp_addr_is_any(&a), 1);
}

int main(void)
{
    RUN(test_addr_parse);
    RUN(test_clock_wait_precision);
    RUN(test_simopen_bad_args);
    RUN(test_simopen_port_in_use);
    RUN(test_simopen_connect_only);
    RUN(test_simopen_with_listen);
    RUN(test_simopen_rearm_after_rst);
    RUN(test_simopen_ipv6);
    RUN(test_simopen_timeout);
    RUN(test_sweep_bad_args);
    RUN(test_sweep_finds_the_listener);
    RUN(test_sweep_all_refused);
    RUN(test_sweep_out_of_fds);
    RUN(test_sweep_ipv6);
    if (hp_t_failures) {
        fprintf(stderr, "%d check(s) failed\n", hp_t_failures);
        return 1;
    }
    return 0;
}
