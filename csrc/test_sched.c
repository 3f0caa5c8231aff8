/* The scheduler: a thousand punches on one thread over real loopback, cancellation,
 * timeouts, bad arguments, shutdown with punches in flight. */
#define _GNU_SOURCE
#include <poll.h>
#include <sys/resource.h>

#include "test_util.h"

#define MS 1000000LL
#define NPAIRS 500
#define NPUNCH (2 * NPAIRS)

/* Drain events until want arrived or the wall clock passes limit_ns; returns how many. */
static size_t collect(hp_sched_t *s, hp_sched_event_t *evs, size_t want, int64_t limit_ns)
{
    size_t got = 0;
    while (got < want && hp_clock_now_ns() < limit_ns) {
        struct pollfd pfd;
        pfd.fd = hp_sched_event_fd(s);
        pfd.events = POLLIN;
        if (poll(&pfd, 1, 100) > 0)
            got += hp_sched_drain(s, evs + got, want - got);
    }
    return got;
}

static void raise_nofile(void)
{
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
}

static void simopen_args(hp_simopen_args_t *a, uint16_t lport, uint16_t rport, int64_t start,
                         int64_t timeout)
{
    memset(a, 0, sizeof(*a));
    a->local.ip = hp_t_loopback();
    a->local.port = lport;
    a->remote.ip = hp_t_loopback();
    a->remote.port = rport;
    a->start_at_ns = start;
    a->timeout_ns = timeout;
    a->interval_ns = 10 * MS;
    a->listen = 1;
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* 500 loopback pairs, both sides on one scheduler with one start_at: every punch connects
 * to its partner, each first SYN leaves after start_at, nothing leaks. */
static void test_thousand_punches(void)
{
    static hp_sched_event_t evs[NPUNCH];
    static int fd_by_id[NPUNCH];
    static int64_t delays[NPUNCH];
    hp_sched_t *s = NULL;
    uint16_t base = 31000;
    int64_t start;
    size_t got, i;
    int fds = hp_t_count_fds(), connected = 0, nd = 0;

    CHECK_EQ(hp_sched_new(&s), 0);
    start = hp_clock_now_ns() + 300 * MS;
    for (i = 0; i < NPUNCH; i++) {
        hp_simopen_args_t a;
        uint16_t me = (uint16_t)(base + i), peer = (uint16_t)(base + (i ^ 1));
        simopen_args(&a, me, peer, start, 5000 * MS);
        CHECK_EQ(hp_sched_simopen(s, i, &a), 0);
        fd_by_id[i] = -1;
    }
    got = collect(s, evs, NPUNCH, start + 10000 * MS);
    CHECK_EQ(got, NPUNCH);
    for (i = 0; i < got; i++) {
        CHECK(evs[i].id < NPUNCH);
        if (evs[i].rc != 0) {
            fprintf(stderr, "  punch %llu: rc %d\n", (unsigned long long)evs[i].id, evs[i].rc);
            continue;
        }
        connected++;
        fd_by_id[evs[i].id] = evs[i].fd;
        CHECK_EQ(evs[i].st.local_port, base + evs[i].id);
        CHECK_EQ(evs[i].st.remote.port, base + (evs[i].id ^ 1));
        if (evs[i].st.first_syn_at_ns) {
            CHECK(evs[i].st.first_syn_delay_ns >= 0);
            delays[nd++] = evs[i].st.first_syn_delay_ns;
        }
    }
    CHECK_EQ(connected, NPUNCH);
    /* Each pair really is one connection. */
    for (i = 0; i < NPUNCH; i += 2) {
        char c = 'p';
        if (fd_by_id[i] < 0 || fd_by_id[i + 1] < 0)
            continue;
        CHECK_EQ(write(fd_by_id[i], &c, 1), 1);
        c = 0;
        CHECK_EQ(read(fd_by_id[i + 1], &c, 1), 1);
        CHECK_EQ(c, 'p');
    }
    for (i = 0; i < NPUNCH; i++)
        if (fd_by_id[i] >= 0)
            close(fd_by_id[i]);
    if (nd > 0) {
        qsort(delays, (size_t)nd, sizeof(*delays), cmp_i64);
        printf("     first-SYN delay over %d punches: min %.3f median %.3f ms, p99 %.3f ms, max %.3f ms\n", nd, delays[0] / 1e6,
               delays[nd / 2] / 1e6, delays[nd * 99 / 100] / 1e6, delays[nd - 1] / 1e6);
    }
    hp_sched_free(s);
    CHECK_EQ(hp_t_count_fds(), fds);
}

/* A thousand punches towards ports that drop every SYN, cancelled in flight: every one says
 * -ECANCELED at once and every socket is closed. */
static void test_cancel_in_flight(void)
{
    static hp_sched_event_t evs[NPUNCH];
    hp_sched_t *s = NULL;
    uint16_t port = 0;
    int lfd, fillers[3], i, fds, before_free;
    int64_t start, t0;
    size_t got;
    struct sockaddr_in sa;

    /* A listener whose accept queue is full drops SYNs without an RST. */
    lfd = hp_t_listener(&port);
    listen(lfd, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = hp_t_loopback();
    sa.sin_port = htons(port);
    for (i = 0; i < 3; i++) {
        fillers[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        connect(fillers[i], (struct sockaddr *)&sa, sizeof(sa));
    }
    usleep(50000);
    fds = hp_t_count_fds();
    CHECK_EQ(hp_sched_new(&s), 0);
    before_free = hp_t_count_fds();
    start = hp_clock_now_ns() + 50 * MS;
    for (i = 0; i < NPUNCH; i++) {
        hp_simopen_args_t a;
        simopen_args(&a, 0, port, start, 30000 * MS);
        a.listen = 0;
        CHECK_EQ(hp_sched_simopen(s, (uint64_t)i, &a), 0);
    }
    hp_clock_wait_until(start + 200 * MS);
    CHECK(hp_t_count_fds() >= before_free + NPUNCH); /* in flight: sockets open */
    t0 = hp_clock_now_ns();
    for (i = 0; i < NPUNCH; i++)
        CHECK_EQ(hp_sched_cancel(s, (uint64_t)i), 0);
    hp_sched_cancel(s, 999999); /* unknown: ignored */
    got = collect(s, evs, NPUNCH, t0 + 5000 * MS);
    CHECK_EQ(got, NPUNCH);
    CHECK(hp_clock_now_ns() - t0 < 2000 * MS);
    for (i = 0; i < (int)got; i++) {
        CHECK_EQ(evs[i].rc, -ECANCELED);
        CHECK_EQ(evs[i].fd, -1);
        CHECK(evs[i].st.syns_sent >= 1);
    }
    CHECK_EQ(hp_t_count_fds(), before_free); /* only the scheduler's own fds remain */
    hp_sched_free(s);
    CHECK_EQ(hp_t_count_fds(), fds);
    for (i = 0; i < 3; i++)
        close(fillers[i]);
    close(lfd);
}

/* Refused punches time out at their own deadlines; a sweep ends as the blocking one would;
 * bad arguments come back as -EINVAL events. */
static void test_timeouts_and_errors(void)
{
    enum { N = 100 };
    static hp_sched_event_t evs[N + 3];
    hp_sweep_pair_t pairs[16];
    hp_sweep_args_t sw;
    hp_sched_t *s = NULL;
    uint16_t lport = 0;
    int lfd = hp_t_listener(&lport), fds, i, timeouts = 0, refused = 0, won = 0, inval = 0;
    int64_t start = hp_clock_now_ns() + 20 * MS;
    size_t got;

    fds = hp_t_count_fds();
    CHECK_EQ(hp_sched_new(&s), 0);
    CHECK_EQ(hp_sched_set_priority(s, 1000), -EINVAL);
    i = hp_sched_set_priority(s, 10); /* real-time where permitted */
    CHECK(i == 0 || i == -EPERM);
    CHECK_EQ(hp_sched_set_priority(s, 0), 0);
    for (i = 0; i < N; i++) {
        hp_simopen_args_t a;
        /* Short deadlines differing per punch: each ends on its own. */
        simopen_args(&a, 0, (uint16_t)(25000 + i), start, (100 + i) * MS);
        a.listen = 0;
        CHECK_EQ(hp_sched_simopen(s, (uint64_t)i, &a), 0);
    }
    for (i = 0; i < 16; i++) {
        pairs[i].local_port = 0;
        pairs[i].remote.ip = hp_t_loopback();
        pairs[i].remote.port = (uint16_t)(26000 + i);
    }
    memset(&sw, 0, sizeof(sw));
    sw.pairs = pairs;
    sw.npairs = 16;
    sw.start_at_ns = start;
    sw.timeout_ns = 3000 * MS;
    sw.max_inflight = 16;
    CHECK_EQ(hp_sched_sweep(s, N, &sw), 0);      /* all refused */
    pairs[9].remote.port = lport;
    CHECK_EQ(hp_sched_sweep(s, N + 1, &sw), 0);  /* the copy: finds the listener */
    sw.max_inflight = 0;
    CHECK_EQ(hp_sched_sweep(s, N + 2, &sw), 0);  /* invalid */
    got = collect(s, evs, N + 3, start + 5000 * MS);
    CHECK_EQ(got, N + 3);
    for (i = 0; i < (int)got; i++) {
        if (evs[i].id < N) {
            CHECK_EQ(evs[i].rc, -ETIMEDOUT);
            CHECK(evs[i].st.rsts_seen >= 3);
            timeouts += evs[i].rc == -ETIMEDOUT;
        } else if (evs[i].id == N) {
            CHECK_EQ(evs[i].rc, -ECONNREFUSED);
            CHECK_EQ(evs[i].st.rsts_seen, 16);
            refused++;
        } else if (evs[i].id == N + 1) {
            CHECK_EQ(evs[i].rc, 0);
            CHECK_EQ(evs[i].st.remote.port, lport);
            close(evs[i].fd);
            won++;
        } else {
            CHECK_EQ(evs[i].rc, -EINVAL);
            inval++;
        }
    }
    CHECK_EQ(timeouts, N);
    CHECK_EQ(refused + won + inval, 3);
    hp_sched_free(s);
    CHECK_EQ(hp_t_count_fds(), fds);
    close(lfd);
}

/* Freed with punches pending, begun and won-but-undrained: everything is closed. */
static void test_free_in_flight(void)
{
    hp_sched_t *s = NULL;
    uint16_t lport = 0;
    int lfd = hp_t_listener(&lport), fds, i;
    int64_t start = hp_clock_now_ns();
    struct pollfd pfd;

    fds = hp_t_count_fds();
    CHECK_EQ(hp_sched_new(&s), 0);
    for (i = 0; i < 50; i++) {
        hp_simopen_args_t a;
        simopen_args(&a, 0, i == 0 ? lport : (uint16_t)(27000 + i), start, 10000 * MS);
        a.listen = 0;
        CHECK_EQ(hp_sched_simopen(s, (uint64_t)i, &a), 0);
    }
    pfd.fd = hp_sched_event_fd(s);
    pfd.events = POLLIN;
    CHECK(poll(&pfd, 1, 2000) == 1); /* the winner's event waits, undrained */
    hp_sched_free(s);
    CHECK_EQ(hp_t_count_fds(), fds);
    close(lfd);
}

int main(void)
{
    raise_nofile();
    RUN(test_timeouts_and_errors);
    RUN(test_free_in_flight);
    RUN(test_thousand_punches);
    RUN(test_cancel_in_flight);
    if (hp_t_failures) {
        fprintf(stderr, "%d check(s) failed\n", hp_t_failures);
        return 1;
    }
    return 0;
}
