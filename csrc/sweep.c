/* Sweep: thousands of concurrent non-blocking connects over explicit (local port, remote)
 * pairs, epoll-driven, paced on absolute deadlines; the first established wins. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hp_internal.h"

#define HP_SWEEP_EVENTS 256
#define HP_SWEEP_PRE_GUARD_NS 1000000 /* stop opening sockets ahead this close to start_at */
#define HP_SWEEP_BATCH_MIN 8 /* fewer fresh sockets than this go straight into the epoll set */

typedef struct hp_sweep_slot {
    int fd;          /* -1 = free */
    uint32_t pair;   /* index into args->pairs */
} hp_sweep_slot_t;

struct hp_sweep_state {
    const hp_sweep_args_t *a; /* the caller's: it outlives the state */
    hp_punch_stats_t *st;
    int ep;
    hp_sweep_slot_t *slots;   /* max_inflight entries */
    uint32_t *free_slots;     /* stack of free slot indices */
    uint32_t nfree;
    uint32_t *retry;          /* FIFO of pair indices waiting for a re-arm */
    int64_t *retry_at;        /* parallel to retry */
    size_t rhead, rcount;     /* ring over npairs entries */
    size_t next_pair;         /* next never-tried pair */
    int64_t next_syn_at;      /* pacing: earliest time of the next SYN */
    int64_t period_ns;        /* 0 = unpaced */
    int *pre;                 /* first sockets of pairs < npre, opened before start_at:
                               * -1 once used, -2 = the pair's local port is unusable */
    size_t npre;
    uint32_t ninflight;       /* slots */
    int64_t deadline;
    struct epoll_event *evs;  /* HP_SWEEP_EVENTS */
    struct pollfd *batch;     /* sockets launched this round, not yet in the epoll set ... */
    uint32_t *batch_slot;     /* ... and their slots (ninflight entries each) */
    uint32_t nbatch;
};

int hp_sweep_validate(const hp_sweep_args_t *a, const hp_punch_stats_t *st)
{
    size_t i;
    if (a == NULL || st == NULL || a->pairs == NULL || a->npairs == 0)
        return -EINVAL;
    if (a->npairs > UINT32_MAX || a->max_inflight == 0)
        return -EINVAL;
    if (a->timeout_ns <= 0 || a->interval_ns < 0 || a->start_at_ns <= 0)
        return -EINVAL;
    if (a->start_at_ns > HP_MAX_TIME_NS || a->timeout_ns > HP_MAX_SPAN_NS
        || a->interval_ns > HP_MAX_SPAN_NS)
        return -EINVAL;
    if (!(a->rate >= 0.0) || isinf(a->rate) || a->syn_ttl < 0 || a->syn_ttl > 255)
        return -EINVAL;
    for (i = 0; i < a->npairs; i++)
        if (hp_addr_is_any(&a->pairs[i].remote) || a->pairs[i].remote.port == 0
            || hp_addr_family(&a->pairs[i].remote) != hp_addr_family(&a->local))
            return -EINVAL;
    return 0;
}

static void hp_sweep_release(hp_sweep_state_t *s, uint32_t slot)
{
    hp_close(s->slots[slot].fd); /* close() also drops it from the epoll set */
    s->slots[slot].fd = -1;
    s->free_slots[s->nfree++] = slot;
}

static void hp_sweep_count_failure(hp_sweep_state_t *s, int err, uint32_t pair, int64_t now)
{
    hp_count_failure(s->st, err);
    if (s->a->interval_ns > 0) {
        size_t tail = (s->rhead + s->rcount) % s->a->npairs;
        s->retry[tail] = pair;
        s->retry_at[tail] = now + s->a->interval_ns;
        s->rcount++;
    }
}

/* Launch one connect for pair into a free slot. 1 = established at once (the fd is in
 * *won), 0 = in flight or failed (counted), < 0 = fatal (-EMFILE, ...). */
/* Open and bind pair's socket, with the low TTL when first. 1 = *out_fd ready, 0 = the pair's
 * local port is unusable (taken without SO_REUSEPORT: skip it), < 0 = fatal. */
static int hp_sweep_open(hp_sweep_state_t *s, uint32_t pair, int first, int *out_fd)
{
    const hp_sweep_pair_t *p = &s->a->pairs[pair];
    int fd, rc;

    /* SO_REUSEPORT only matters for a fixed local port shared by several pairs. */
    rc = hp_sock_tcp_bound(&s->a->local, p->local_port, p->local_port != 0,
                           !hp_addr_is_any(&s->a->local) || p->local_port != 0 ? 2 : 0, &fd);
    if (rc == -EMFILE || rc == -ENFILE || rc == -ENOBUFS || rc == -ENOMEM)
        return rc;
    if (rc < 0)
        return 0;
    s->st->sockets_opened++;
    if (first && s->a->syn_ttl > 0 && (rc = hp_sock_set_ttl(fd, s->a->syn_ttl)) < 0) {
        hp_close(fd);
        return rc;
    }
    *out_fd = fd;
    return 1;
}

static int hp_sweep_launch(hp_sweep_state_t *s, uint32_t pair, int first, int *won)
{
    const hp_sweep_pair_t *p = &s->a->pairs[pair];
    struct sockaddr_storage sa;
    socklen_t salen;
    int fd, rc, err, low_ttl = first && s->a->syn_ttl > 0;
    uint32_t slot;
    int64_t t;

    if (first && pair < s->npre && s->pre[pair] != -1) {
        fd = s->pre[pair]; /* opened before start_at: only connect() is left */
        s->pre[pair] = -1;
        if (fd == -2)
            return 0;
    } else if ((rc = hp_sweep_open(s, pair, first, &fd)) <= 0) {
        return rc;
    }
    salen = hp_addr_sockaddr(&p->remote, p->remote.port, &sa);
    t = hp_clock_now_ns(); /* as connect() is entered: the SYN leaves early inside it */
    rc = connect(fd, (struct sockaddr *)&sa, salen);
    err = rc < 0 ? errno : 0;
    s->st->attempts++;
    if (rc < 0 && err != EINPROGRESS) {
        hp_close(fd);
        if (hp_fail_kind(err) == HP_FAIL_OTHER && err != EADDRINUSE && err != EADDRNOTAVAIL)
            return -err;
        hp_sweep_count_failure(s, err, pair, t);
        return 0;
    }
    s->st->syns_sent++;
    if (s->st->first_syn_at_ns == 0) {
        s->st->first_syn_at_ns = t;
        s->st->first_syn_delay_ns = t - s->a->start_at_ns;
    }
    if (low_ttl && (rc = hp_sock_set_ttl(fd, -1)) < 0) {
        hp_close(fd);
        return rc;
    }
    if (err == 0) {
        *won = fd;
        return 1;
    }
    slot = s->free_slots[--s->nfree];
    s->slots[slot].fd = fd;
    s->slots[slot].pair = pair;
    s->batch[s->nbatch].fd = fd;
    s->batch[s->nbatch].events = POLLOUT;
    s->batch_slot[s->nbatch++] = slot;
    return 0;
}

static int hp_sweep_watch(hp_sweep_state_t *s, uint32_t slot)
{
    struct epoll_event ev;
    int rc;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLOUT;
    ev.data.u32 = slot;
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->slots[slot].fd, &ev) < 0) {
        rc = -errno;
        hp_sweep_release(s, slot);
        return rc;
    }
    return 0;
}

/* A socket's connect is over (event or poll said so): 1 = established (*won), 0 = failed
 * (counted, released). An error's errno is read, it says RST or ICMP; writable without an
 * error or hang-up is established, with no SO_ERROR to read. */
static int hp_sweep_outcome(hp_sweep_state_t *s, uint32_t slot, int failed, int64_t now,
                            int *won)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (failed && getsockopt(s->slots[slot].fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == 0) {
        /* Established: by our SYN being answered or by simultaneous open. */
        *won = s->slots[slot].fd;
        s->slots[slot].fd = -1;
        return 1;
    }
    hp_sweep_count_failure(s, err, s->slots[slot].pair, now);
    hp_sweep_release(s, slot);
    return 0;
}

/* The sockets launched this round into the epoll set, but first one poll() over them all
 * (timeout 0: no waiting, no wait-queue entries): those already refused or established are
 * settled without ever entering the set (an insert and a removal each; on loopback, where
 * RSTs come back inside connect(), that was a sweep's launch cost over the kernel floor). */
static int hp_sweep_settle(hp_sweep_state_t *s, int64_t now, int *won)
{
    uint32_t i, n = s->nbatch;
    int rc = 0, polled;
    s->nbatch = 0;
    polled = n >= HP_SWEEP_BATCH_MIN && poll(s->batch, n, 0) > 0;
    for (i = 0; i < n; i++) {
        uint32_t slot = s->batch_slot[i];
        short re = polled ? s->batch[i].revents : 0;
        if (rc != 0)
            continue; /* won or failed: the rest stay in their slots, closed at the end */
        if (re & (POLLERR | POLLHUP | POLLOUT))
            rc = hp_sweep_outcome(s, slot, (re & (POLLERR | POLLHUP)) != 0, now, won);
        else
            rc = hp_sweep_watch(s, slot);
    }
    return rc;
}

/* Launch whatever is due now: untried pairs first, then due re-arms, within pacing and
 * slots (as the pure engine). */
static int hp_sweep_launch_due(hp_sweep_state_t *s, int64_t now, int *won)
{
    for (;;) {
        uint32_t pair;
        int first, rc;
        if (s->nfree == 0)
            return 0;
        if (s->period_ns > 0 && now < s->next_syn_at)
            return 0;
        if (s->next_pair < s->a->npairs) {
            pair = (uint32_t)s->next_pair++;
            first = 1;
        } else if (s->rcount > 0 && s->retry_at[s->rhead] <= now) {
            pair = s->retry[s->rhead];
            s->rhead = (s->rhead + 1) % s->a->npairs;
            s->rcount--;
            first = 0;
        } else {
            return 0;
        }
        if (s->period_ns > 0) {
            /* Absolute schedule: late launches catch up instead of drifting. */
            s->next_syn_at += s->period_ns;
        }
        rc = hp_sweep_launch(s, pair, first, won);
        if (rc != 0)
            return rc;
        if (s->period_ns > 0)
            now = hp_clock_now_ns();
    }
}

/* When the loop should wake up next for launching (INT64_MAX = nothing to launch). */
static int64_t hp_sweep_next_launch(const hp_sweep_state_t *s)
{
    int64_t t = INT64_MAX;
    if (s->nfree == 0)
        return INT64_MAX;
    if (s->next_pair < s->a->npairs)
        t = 0;
    if (s->rcount > 0 && s->retry_at[s->rhead] < t)
        t = s->retry_at[s->rhead];
    if (t != INT64_MAX && s->period_ns > 0 && s->next_syn_at > t)
        t = s->next_syn_at;
    return t;
}

static void hp_sweep_win(hp_sweep_state_t *s, int fd)
{
    s->st->time_to_established_ns = hp_clock_now_ns() - s->a->start_at_ns;
    s->st->local_port = hp_sock_local_port(fd);
    s->st->have_remote = hp_sock_peer(fd, &s->st->remote) == 0;
}

int hp_sweep_begin(const hp_sweep_args_t *a, hp_punch_stats_t *st, hp_sweep_state_t **out)
{
    hp_sweep_state_t *s;
    uint32_t i;
    int rc;

    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    s->a = a;
    s->st = st;
    s->ep = -1;
    s->ninflight = a->max_inflight;
    if ((size_t)s->ninflight > a->npairs)
        s->ninflight = (uint32_t)a->npairs;
    s->slots = calloc(s->ninflight, sizeof(*s->slots));
    s->free_slots = calloc(s->ninflight, sizeof(*s->free_slots));
    s->retry = calloc(a->npairs, sizeof(*s->retry));
    s->retry_at = calloc(a->npairs, sizeof(*s->retry_at));
    s->evs = calloc(HP_SWEEP_EVENTS, sizeof(*s->evs));
    s->batch = calloc(s->ninflight, sizeof(*s->batch));
    s->batch_slot = calloc(s->ninflight, sizeof(*s->batch_slot));
    if (!s->slots || !s->free_slots || !s->retry || !s->retry_at || !s->evs || !s->batch
        || !s->batch_slot) {
        rc = -ENOMEM;
        goto fail;
    }
    for (i = 0; i < s->ninflight; i++) {
        s->slots[i].fd = -1;
        s->free_slots[s->nfree++] = s->ninflight - 1 - i;
    }
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    if (s->ep < 0) {
        rc = -errno;
        goto fail;
    }
    if (a->rate > 0.0) {
        double p = 1e9 / a->rate;
        /* A rate so low that one period outlasts any deadline: one SYN, then nothing. */
        s->period_ns = p < 1.0 ? 1 : p > 4e18 ? (int64_t)4e18 : (int64_t)p;
    }
    s->next_syn_at = a->start_at_ns;
    s->deadline = a->start_at_ns + a->timeout_ns;
    /* Every first socket a launch can use at once is made and bound now, before start_at,
     * so that only connect() runs after it (a 1024-socket SYN train in half the time). Out
     * of descriptors part way, the rest are opened at launch, where the error surfaces;
     * likewise ... */
    s->pre = malloc(s->ninflight * sizeof(*s->pre));
    if (s->pre == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    for (i = 0; i < s->ninflight; i++) {
        int fd = -1;
        /* ... while start_at is ahead: a late call must not hold back its first SYN. */
        if (i > 0 && (i & 15) == 0 && hp_clock_now_ns() > a->start_at_ns - HP_SWEEP_PRE_GUARD_NS)
            break;
        rc = hp_sweep_open(s, i, 1, &fd);
        if (rc < 0 && i == 0)
            goto fail;
        if (rc < 0)
            break;
        s->pre[i] = rc == 1 ? fd : -2;
        s->npre = i + 1;
    }
    *out = s;
    return 0;
fail:
    hp_sweep_end(s);
    return rc;
}

int hp_sweep_fd(const hp_sweep_state_t *s)
{
    return s->ep;
}

int hp_sweep_step(hp_sweep_state_t *s, int64_t now, int *out_fd, int64_t *wake_ns)
{
    int rc, n, k, winner = -1;
    int64_t until;

    if (now < s->a->start_at_ns) {
        *wake_ns = s->a->start_at_ns;
        return 0;
    }
    n = epoll_wait(s->ep, s->evs, HP_SWEEP_EVENTS, 0);
    if (n < 0 && errno != EINTR)
        return -errno;
    for (k = 0; k < n; k++) {
        uint32_t slot = s->evs[k].data.u32;
        if (s->slots[slot].fd < 0)
            continue;
        if (hp_sweep_outcome(s, slot, (s->evs[k].events & (EPOLLERR | EPOLLHUP)) != 0, now,
                             &winner))
            break;
    }
    if (winner < 0) {
        if (now >= s->deadline)
            return -ETIMEDOUT;
        rc = hp_sweep_launch_due(s, now, &winner);
        if (rc < 0)
            return rc;
        if (winner < 0 && (rc = hp_sweep_settle(s, now, &winner)) < 0)
            return rc;
    }
    if (winner >= 0) {
        rc = hp_sock_hand_over(winner);
        if (rc < 0)
            return rc;
        hp_sweep_win(s, winner);
        *out_fd = winner;
        return 1;
    }
    if (s->nfree == s->ninflight && s->rcount == 0 && s->next_pair >= s->a->npairs)
        return -ECONNREFUSED; /* every pair failed, nothing left to try */
    until = hp_sweep_next_launch(s);
    *wake_ns = until > s->deadline ? s->deadline : until;
    return 0;
}

void hp_sweep_end(hp_sweep_state_t *s)
{
    uint32_t i;
    if (s == NULL)
        return;
    if (s->slots != NULL) {
        for (i = 0; i < s->ninflight; i++)
            hp_close(s->slots[i].fd);
    }
    for (i = 0; i < s->npre; i++)
        hp_close(s->pre[i]);
    free(s->pre);
    hp_close(s->ep);
    free(s->slots);
    free(s->free_slots);
    free(s->retry);
    free(s->retry_at);
    free(s->evs);
    free(s->batch);
    free(s->batch_slot);
    free(s);
}

int hp_sweep(const hp_sweep_args_t *a, int *out_fd, hp_punch_stats_t *st)
{
    return hp_punch_run(HP_PUNCH_SWEEP, a, out_fd, st);
}
