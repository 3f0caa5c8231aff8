/* The scheduler: one thread that owns many punches at once (simultaneous opens and sweeps,
 * each with its re-arms) on one epoll, sends each first SYN at its start_at and reports each
 * completion as an event.
 *
 * A punch is the state machine of simopen.c or sweep.c; it exposes one epoll fd (its own
 * sockets) and a wake time. The scheduler watches every punch's fd in its epoll and keeps the
 * wake times in a min-heap; it sleeps to the nearest one (timer slack 1 ns, the last
 * HP_SPIN_NS spun before a start_at) and steps whatever is ready or due. Addresses are never
 * looked at here: the punches own them, whatever their family. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "hp_internal.h"

/* epoll_pwait2 with a nanosecond timeout (< 0: none; millisecond epoll_wait before 5.11). */
static int hp_epoll_wait_ns(int ep, struct epoll_event *evs, int max, int64_t wait_ns)
{
    struct timespec ts;
    int n;
    if (wait_ns < 0) /* no timeout */
        return epoll_wait(ep, evs, max, -1);
    ts.tv_sec = (time_t)(wait_ns / HP_NS_PER_S);
    ts.tv_nsec = (long)(wait_ns % HP_NS_PER_S);
    n = epoll_pwait2(ep, evs, max, &ts, NULL);
    if (n < 0 && errno == ENOSYS) {
        /* Kernels before 5.11: millisecond resolution, rounded up. */
        n = epoll_wait(ep, evs, max, (int)((wait_ns + 999999) / 1000000));
    }
    return n;
}

/* ---- the scheduler ------------------------------------------------------------------------ */

#define HP_SCHED_EVENTS 256
#define HP_SCHED_BEGIN_BATCH 64 /* begins between two looks at the timers */
#define HP_SCHED_INBOX UINT64_MAX
#define HP_SCHED_RETRY_NS 50000LL /* a busy lock is tried again this soon */

typedef struct hp_sched_punch {
    uint64_t id;
    uint32_t slot, gen;
    hp_punch_t p;              /* state NULL until begun */
    union {
        hp_simopen_args_t simopen;
        hp_sweep_args_t sweep;
    } args;                    /* copies: the states point at them */
    hp_sweep_pair_t *pairs;    /* the sweep's copy of its pairs */
    hp_punch_stats_t st;
    int64_t wake;
    int begun;
    int started;               /* stepped at or after start_at */
    int muted;                 /* its fd is out of the epoll set until start_at */
    struct hp_sched_punch *next;  /* inbox / pending list, hash chain */
    struct hp_sched_punch *hnext;
} hp_sched_punch_t;

typedef struct hp_sched_timer {
    int64_t when;
    uint32_t slot, gen;
} hp_sched_timer_t;

struct hp_sched {
    pthread_t thread;
    int ep;                    /* the thread's epoll: every punch's fd and the inbox */
    int inbox_fd;              /* eventfd: submissions, cancels, stop */
    int events_fd;             /* eventfd: completions waiting for hp_sched_drain */
    pthread_mutex_t lock;
    /* under lock */
    hp_sched_punch_t *inbox_head, *inbox_tail;
    uint64_t *cancels;
    size_t ncancels, cancels_cap;
    hp_sched_event_t *events;
    size_t ev_head, ev_count, ev_cap;
    int stop;
    /* the thread's own */
    hp_sched_punch_t *pending_head, *pending_tail; /* taken from the inbox, not begun yet */
    hp_sched_punch_t **tab;    /* by slot */
    uint32_t tab_cap, *free_slots, nfree;
    uint32_t next_gen;
    hp_sched_punch_t **hash;   /* by id */
    size_t hash_cap, nlive;
    hp_sched_timer_t *heap;
    size_t heap_len, heap_cap;
    hp_sched_event_t *out;     /* posted, not yet flushed to events */
    size_t nout, out_cap;
    int inbox_busy;            /* the inbox was locked: look again soon */
};

static int hp_grow(void **buf, size_t *cap, size_t need, size_t elem)
{
    size_t n = *cap ? *cap : 64;
    void *p;
    if (need <= *cap)
        return 0;
    while (n < need)
        n *= 2;
    p = realloc(*buf, n * elem);
    if (p == NULL)
        return -ENOMEM;
    *buf = p;
    *cap = n;
    return 0;
}

static void hp_sched_wake(int efd)
{
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof(one));
    (void)r; /* EAGAIN: the counter is already non-zero, which is all we need */
}

/* -- timers: a min-heap with lazy deletion (an entry is live if its punch still wakes then) */

static int hp_heap_push(hp_sched_t *s, int64_t when, uint32_t slot, uint32_t gen)
{
    size_t i;
    if (hp_grow((void **)&s->heap, &s->heap_cap, s->heap_len + 1, sizeof(*s->heap)) < 0)
        return -ENOMEM;
    i = s->heap_len++;
    while (i > 0 && s->heap[(i - 1) / 2].when > when) {
        s->heap[i] = s->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    s->heap[i].when = when;
    s->heap[i].slot = slot;
    s->heap[i].gen = gen;
    return 0;
}

static void hp_heap_pop(hp_sched_t *s)
{
    hp_sched_timer_t last = s->heap[--s->heap_len];
    size_t i = 0, n = s->heap_len;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && s->heap[c + 1].when < s->heap[c].when)
            c++;
        if (s->heap[c].when >= last.when)
            break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n > 0)
        s->heap[i] = last;
}

static hp_sched_punch_t *hp_sched_lookup(hp_sched_t *s, uint32_t slot, uint32_t gen)
{
    hp_sched_punch_t *p;
    if (slot >= s->tab_cap)
        return NULL;
    p = s->tab[slot];
    return p != NULL && p->gen == gen ? p : NULL;
}

/* -- punches by id, for cancel */

static size_t hp_hash_index(const hp_sched_t *s, uint64_t id)
{
    return (size_t)((id * UINT64_C(0x9E3779B97F4A7C15)) >> 17) & (s->hash_cap - 1);
}

static int hp_hash_add(hp_sched_t *s, hp_sched_punch_t *p)
{
    if (s->nlive + 1 > s->hash_cap) {
        size_t i, cap = s->hash_cap ? s->hash_cap * 2 : 256;
        hp_sched_punch_t **old = s->hash, **h = calloc(cap, sizeof(*h));
        size_t oldcap = s->hash_cap;
        if (h == NULL)
            return -ENOMEM;
        s->hash = h;
        s->hash_cap = cap;
        for (i = 0; i < oldcap; i++) {
            hp_sched_punch_t *q = old[i], *nx;
            for (; q != NULL; q = nx) {
                size_t k = hp_hash_index(s, q->id);
                nx = q->hnext;
                q->hnext = h[k];
                h[k] = q;
            }
        }
        free(old);
    }
    {
        size_t k = hp_hash_index(s, p->id);
        p->hnext = s->hash[k];
        s->hash[k] = p;
        s->nlive++;
    }
    return 0;
}

static void hp_hash_del(hp_sched_t *s, hp_sched_punch_t *p)
{
    hp_sched_punch_t **pp = &s->hash[hp_hash_index(s, p->id)];
    for (; *pp != NULL; pp = &(*pp)->hnext) {
        if (*pp == p) {
            *pp = p->hnext;
            s->nlive--;
            return;
        }
    }
}

static hp_sched_punch_t *hp_hash_find(hp_sched_t *s, uint64_t id)
{
    hp_sched_punch_t *p;
    if (s->hash_cap == 0)
        return NULL;
    for (p = s->hash[hp_hash_index(s, id)]; p != NULL; p = p->hnext)
        if (p->id == id)
            return p;
    return NULL;
}

/* -- completion */

static void hp_sched_free_punch(hp_sched_punch_t *p)
{
    free(p->pairs);
    free(p);
}

/* Post p's outcome: kept on the thread's own list until hp_sched_flush hands it over. If
 * even the event cannot be stored, the winner is closed: nothing may leak. */
static void hp_sched_post(hp_sched_t *s, hp_sched_punch_t *p, int rc, int fd)
{
    hp_sched_event_t *e;
    if (hp_grow((void **)&s->out, &s->out_cap, s->nout + 1, sizeof(*s->out)) < 0) {
        hp_close(fd);
        return;
    }
    e = &s->out[s->nout++];
    e->id = p->id;
    e->rc = rc;
    e->fd = fd;
    e->st = p->st;
}

/* Move the thread's events to the shared queue and wake the reader (one eventfd write per
 * round, not one wake-up per completion). Without wait, a lock held by the draining thread is
 * not waited for (it may be descheduled holding it; this thread may be real-time): 0 = try
 * again soon. */
static int hp_sched_flush(hp_sched_t *s, int wait)
{
    size_t i;
    if (s->nout == 0)
        return 1;
    if (wait)
        pthread_mutex_lock(&s->lock);
    else if (pthread_mutex_trylock(&s->lock) != 0)
        return 0;
    if (s->ev_head > 0 && s->ev_head == s->ev_count) {
        s->ev_head = 0;
        s->ev_count = 0;
    }
    if (hp_grow((void **)&s->events, &s->ev_cap, s->ev_count + s->nout, sizeof(*s->events))
        < 0) {
        pthread_mutex_unlock(&s->lock);
        for (i = 0; i < s->nout; i++)
            hp_close(s->out[i].fd);
        s->nout = 0;
        return 1;
    }
    memcpy(s->events + s->ev_count, s->out, s->nout * sizeof(*s->out));
    s->ev_count += s->nout;
    s->nout = 0;
    pthread_mutex_unlock(&s->lock);
    hp_sched_wake(s->events_fd);
    return 1;
}

static void hp_sched_finish(hp_sched_t *s, hp_sched_punch_t *p, int rc, int fd)
{
    if (p->begun) {
        hp_punch_end(&p->p); /* closes its epoll fd: it leaves the scheduler's set */
        hp_hash_del(s, p);
        s->tab[p->slot] = NULL;
        s->free_slots[s->nfree++] = p->slot;
    }
    hp_sched_post(s, p, rc, fd);
    hp_sched_free_punch(p);
}

static int64_t hp_sched_start_at(const hp_sched_punch_t *p)
{
    return hp_punch_start_at(p->p.kind, &p->args);
}

static void hp_sched_watch(hp_sched_t *s, hp_sched_punch_t *p, uint32_t events)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.u64 = (uint64_t)p->gen << 32 | p->slot;
    epoll_ctl(s->ep, EPOLL_CTL_MOD, hp_punch_fd(&p->p), &ev);
}

/* Step p now; finish it if it is done. */
static void hp_sched_step(hp_sched_t *s, hp_sched_punch_t *p, int64_t now)
{
    int fd = -1, rc;
    int64_t wake = p->wake;
    if (!p->started) {
        if (now < hp_sched_start_at(p)) {
            /* The peer's SYN came first: it waits in the kernel until our start_at, and the
             * level-triggered fd must not spin the loop meanwhile. */
            if (!p->muted)
                hp_sched_watch(s, p, 0);
            p->muted = 1;
            return;
        }
        p->started = 1;
        if (p->muted)
            hp_sched_watch(s, p, EPOLLIN);
    }
    rc = hp_punch_step(&p->p, now, &fd, &wake);
    if (rc != 0) {
        hp_sched_finish(s, p, rc < 0 ? rc : 0, fd);
        return;
    }
    if (wake != p->wake) {
        p->wake = wake;
        if (hp_heap_push(s, wake, p->slot, p->gen) < 0)
            hp_sched_finish(s, p, -ENOMEM, -1);
    }
}

static int hp_sched_slot(hp_sched_t *s, uint32_t *slot)
{
    if (s->nfree == 0) {
        size_t cap = s->tab_cap, i;
        size_t fcap = s->tab_cap;
        if (hp_grow((void **)&s->tab, &cap, s->tab_cap + 1, sizeof(*s->tab)) < 0
            || hp_grow((void **)&s->free_slots, &fcap, cap, sizeof(*s->free_slots)) < 0)
            return -ENOMEM;
        for (i = cap; i > s->tab_cap; i--) {
            s->tab[i - 1] = NULL;
            s->free_slots[s->nfree++] = (uint32_t)(i - 1);
        }
        s->tab_cap = (uint32_t)cap;
    }
    *slot = s->free_slots[--s->nfree];
    return 0;
}

/* Open p's sockets and put it under the timers and the epoll; a failure finishes it. */
static void hp_sched_begin(hp_sched_t *s, hp_sched_punch_t *p)
{
    struct epoll_event ev;
    int rc;

    rc = hp_punch_begin(&p->p, p->p.kind, &p->args, &p->st);
    if (rc < 0) {
        hp_sched_finish(s, p, rc, -1);
        return;
    }
    rc = hp_sched_slot(s, &p->slot);
    if (rc == 0) {
        rc = hp_hash_add(s, p);
        if (rc < 0)
            s->free_slots[s->nfree++] = p->slot;
    }
    if (rc < 0) {
        hp_punch_end(&p->p);
        hp_sched_finish(s, p, rc, -1);
        return;
    }
    p->begun = 1;
    p->gen = s->next_gen++;
    s->tab[p->slot] = p;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u64 = (uint64_t)p->gen << 32 | p->slot;
    p->wake = hp_sched_start_at(p);
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, hp_punch_fd(&p->p), &ev) < 0) {
        hp_sched_finish(s, p, -errno, -1);
        return;
    }
    if (hp_heap_push(s, p->wake, p->slot, p->gen) < 0)
        hp_sched_finish(s, p, -ENOMEM, -1);
}

/* Take what the inbox holds: submissions to the pending list, cancels done at once. */
static int hp_sched_take_inbox(hp_sched_t *s)
{
    hp_sched_punch_t *head;
    uint64_t *cancels, drained;
    size_t n, i;
    int stop;
    ssize_t r = read(s->inbox_fd, &drained, sizeof(drained));
    (void)r;

    if (pthread_mutex_trylock(&s->lock) != 0) { /* as in hp_sched_flush */
        s->inbox_busy = 1;
        return 0;
    }
    s->inbox_busy = 0;
    head = s->inbox_head;
    if (head != NULL) {
        if (s->pending_tail != NULL)
            s->pending_tail->next = head;
        else
            s->pending_head = head;
        s->pending_tail = s->inbox_tail;
    }
    s->inbox_head = s->inbox_tail = NULL;
    cancels = s->cancels;
    n = s->ncancels;
    s->cancels = NULL;
    s->ncancels = s->cancels_cap = 0;
    stop = s->stop;
    pthread_mutex_unlock(&s->lock);

    for (i = 0; i < n; i++) {
        hp_sched_punch_t *p = hp_hash_find(s, cancels[i]), **pp;
        if (p != NULL) {
            hp_sched_finish(s, p, -ECANCELED, -1);
            continue;
        }
        /* Not begun yet: still on the pending list. */
        for (pp = &s->pending_head, p = NULL; *pp != NULL; pp = &(*pp)->next) {
            if ((*pp)->id == cancels[i]) {
                p = *pp;
                *pp = p->next;
                if (s->pending_tail == p) {
                    hp_sched_punch_t *q = s->pending_head;
                    while (q != NULL && q->next != NULL)
                        q = q->next;
                    s->pending_tail = q;
                }
                break;
            }
        }
        if (p != NULL)
            hp_sched_finish(s, p, -ECANCELED, -1);
    }
    free(cancels);
    return stop;
}

static void hp_sched_begin_pending(hp_sched_t *s)
{
    int k;
    for (k = 0; k < HP_SCHED_BEGIN_BATCH && s->pending_head != NULL; k++) {
        hp_sched_punch_t *p = s->pending_head;
        s->pending_head = p->next;
        if (s->pending_head == NULL)
            s->pending_tail = NULL;
        p->next = NULL;
        hp_sched_begin(s, p);
    }
}

/* Step every punch whose wake time has come. */
static void hp_sched_run_timers(hp_sched_t *s)
{
    int64_t now = hp_clock_now_ns();
    size_t budget = s->heap_len; /* what a step pushes for now waits for the next round */
    while (s->heap_len > 0 && s->heap[0].when <= now && budget-- > 0) {
        hp_sched_timer_t t = s->heap[0];
        hp_sched_punch_t *p;
        hp_heap_pop(s);
        p = hp_sched_lookup(s, t.slot, t.gen);
        if (p != NULL && p->wake == t.when) {
            p->wake = INT64_MIN; /* a due entry is spent: the step pushes the next one */
            hp_sched_step(s, p, now);
        }
    }
}

/* How long to sleep: -1 = until something happens. A start_at close enough is spun to. */
static int64_t hp_sched_timeout(hp_sched_t *s)
{
    int64_t now, when;
    hp_sched_punch_t *p;
    if (s->pending_head != NULL)
        return 0;
    while (s->heap_len > 0) {
        p = hp_sched_lookup(s, s->heap[0].slot, s->heap[0].gen);
        if (p != NULL && p->wake == s->heap[0].when)
            break;
        hp_heap_pop(s); /* stale */
    }
    if (s->heap_len == 0)
        return -1;
    when = s->heap[0].when;
    now = hp_clock_now_ns();
    if (when <= now)
        return 0;
    p = hp_sched_lookup(s, s->heap[0].slot, s->heap[0].gen);
    if (p != NULL && !p->started) {
        /* A first SYN: sleep to shortly before, then spin, like the blocking calls. */
        if (when - now <= HP_SPIN_NS) {
            hp_clock_wait_until(when);
            return 0;
        }
        return when - now - HP_SPIN_NS;
    }
    return when - now;
}

static void hp_sched_shutdown(hp_sched_t *s)
{
    uint32_t i;
    while (s->pending_head != NULL) {
        hp_sched_punch_t *p = s->pending_head;
        s->pending_head = p->next;
        hp_sched_finish(s, p, -ECANCELED, -1);
    }
    s->pending_tail = NULL;
    for (i = 0; i < s->tab_cap; i++)
        if (s->tab[i] != NULL)
            hp_sched_finish(s, s->tab[i], -ECANCELED, -1);
}

static void *hp_sched_main(void *arg)
{
    hp_sched_t *s = arg;
    struct epoll_event evs[HP_SCHED_EVENTS];

    /* Timers of this thread fire when asked, not up to 50 us later. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    for (;;) {
        int n, k, stop = 0;
        int64_t timeout;
        if (s->inbox_busy && hp_sched_take_inbox(s))
            break;
        hp_sched_run_timers(s);
        timeout = hp_sched_timeout(s);
        if ((!hp_sched_flush(s, 0) || s->inbox_busy)
            && (timeout < 0 || timeout > HP_SCHED_RETRY_NS))
            timeout = HP_SCHED_RETRY_NS;
        n = hp_epoll_wait_ns(s->ep, evs, HP_SCHED_EVENTS, timeout);
        if (n < 0)
            n = 0; /* EINTR; nothing else can fail on a valid epoll fd */
        for (k = 0; k < n; k++) {
            hp_sched_punch_t *p;
            if (evs[k].data.u64 == HP_SCHED_INBOX) {
                stop = hp_sched_take_inbox(s);
                continue;
            }
            p = hp_sched_lookup(s, (uint32_t)evs[k].data.u64, (uint32_t)(evs[k].data.u64 >> 32));
            if (p != NULL)
                hp_sched_step(s, p, hp_clock_now_ns());
        }
        if (stop)
            break;
        hp_sched_begin_pending(s);
    }
    hp_sched_shutdown(s);
    hp_sched_flush(s, 1);
    return NULL;
}

int hp_sched_new(hp_sched_t **out)
{
    struct epoll_event ev;
    hp_sched_t *s;
    int rc;

    if (out == NULL)
        return -EINVAL;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    s->ep = s->inbox_fd = s->events_fd = -1;
    rc = pthread_mutex_init(&s->lock, NULL);
    if (rc != 0) {
        free(s);
        return -rc;
    }
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    s->inbox_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->events_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->ep < 0 || s->inbox_fd < 0 || s->events_fd < 0) {
        rc = -errno;
        goto fail;
    }
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u64 = HP_SCHED_INBOX;
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->inbox_fd, &ev) < 0) {
        rc = -errno;
        goto fail;
    }
    rc = pthread_create(&s->thread, NULL, hp_sched_main, s);
    if (rc != 0) {
        rc = -rc;
        goto fail;
    }
    *out = s;
    return 0;
fail:
    hp_close(s->ep);
    hp_close(s->inbox_fd);
    hp_close(s->events_fd);
    pthread_mutex_destroy(&s->lock);
    free(s);
    return rc;
}

int hp_sched_set_priority(hp_sched_t *s, int priority)
{
    struct sched_param sp;
    int rc;
    if (s == NULL || priority < 0 || priority > sched_get_priority_max(SCHED_FIFO))
        return -EINVAL;
    memset(&sp, 0, sizeof(sp));
    sp.sched_priority = priority;
    rc = pthread_setschedparam(s->thread, priority ? SCHED_FIFO : SCHED_OTHER, &sp);
    return -rc;
}

int hp_sched_event_fd(const hp_sched_t *s)
{
    return s->events_fd;
}

static int hp_sched_submit(hp_sched_t *s, hp_sched_punch_t *p)
{
    pthread_mutex_lock(&s->lock);
    if (s->stop) {
        pthread_mutex_unlock(&s->lock);
        hp_sched_free_punch(p);
        return -ESHUTDOWN;
    }
    if (s->inbox_tail != NULL)
        s->inbox_tail->next = p;
    else
        s->inbox_head = p;
    s->inbox_tail = p;
    pthread_mutex_unlock(&s->lock);
    hp_sched_wake(s->inbox_fd);
    return 0;
}

static hp_sched_punch_t *hp_sched_punch_new(uint64_t id, hp_punch_kind_t kind)
{
    hp_sched_punch_t *p = calloc(1, sizeof(*p));
    if (p != NULL) {
        p->id = id;
        p->p.kind = kind;
        hp_punch_stats_init(&p->st);
    }
    return p;
}

int hp_sched_simopen(hp_sched_t *s, uint64_t id, const hp_simopen_args_t *a)
{
    hp_sched_punch_t *p;
    if (s == NULL || a == NULL)
        return -EINVAL;
    p = hp_sched_punch_new(id, HP_PUNCH_SIMOPEN);
    if (p == NULL)
        return -ENOMEM;
    p->args.simopen = *a;
    return hp_sched_submit(s, p);
}

int hp_sched_sweep(hp_sched_t *s, uint64_t id, const hp_sweep_args_t *a)
{
    hp_sched_punch_t *p;
    if (s == NULL || a == NULL || a->pairs == NULL || a->npairs == 0
        || a->npairs > SIZE_MAX / sizeof(*a->pairs))
        return -EINVAL;
    p = hp_sched_punch_new(id, HP_PUNCH_SWEEP);
    if (p == NULL)
        return -ENOMEM;
    p->pairs = malloc(a->npairs * sizeof(*a->pairs));
    if (p->pairs == NULL) {
        free(p);
        return -ENOMEM;
    }
    memcpy(p->pairs, a->pairs, a->npairs * sizeof(*a->pairs));
    p->args.sweep = *a;
    p->args.sweep.pairs = p->pairs;
    return hp_sched_submit(s, p);
}

int hp_sched_cancel(hp_sched_t *s, uint64_t id)
{
    int rc;
    if (s == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    rc = hp_grow((void **)&s->cancels, &s->cancels_cap, s->ncancels + 1, sizeof(*s->cancels));
    if (rc == 0)
        s->cancels[s->ncancels++] = id;
    pthread_mutex_unlock(&s->lock);
    if (rc == 0)
        hp_sched_wake(s->inbox_fd);
    return rc;
}

size_t hp_sched_drain(hp_sched_t *s, hp_sched_event_t *out, size_t max)
{
    uint64_t counter;
    size_t n;
    /* Reset the eventfd first: an event posted after this read makes it readable again. */
    ssize_t r = read(s->events_fd, &counter, sizeof(counter));
    (void)r;
    pthread_mutex_lock(&s->lock);
    n = s->ev_count - s->ev_head;
    if (n > max)
        n = max;
    memcpy(out, s->events + s->ev_head, n * sizeof(*out));
    s->ev_head += n;
    if (s->ev_head == s->ev_count)
        s->ev_head = s->ev_count = 0;
    else
        hp_sched_wake(s->events_fd); /* more than max: stay readable */
    pthread_mutex_unlock(&s->lock);
    return n;
}

void hp_sched_free(hp_sched_t *s)
{
    size_t i;
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_mutex_unlock(&s->lock);
    hp_sched_wake(s->inbox_fd);
    pthread_join(s->thread, NULL);
    /* Submitted after the thread's last look, or never drained. */
    while (s->inbox_head != NULL) {
        hp_sched_punch_t *p = s->inbox_head;
        s->inbox_head = p->next;
        hp_sched_free_punch(p);
    }
    for (i = s->ev_head; i < s->ev_count; i++)
        hp_close(s->events[i].fd);
    hp_close(s->ep);
    hp_close(s->inbox_fd);
    hp_close(s->events_fd);
    pthread_mutex_destroy(&s->lock);
    free(s->cancels);
    free(s->events);
    free(s->out);
    free(s->tab);
    free(s->free_slots);
    free(s->hash);
    free(s->heap);
    free(s);
}
