/* TCP simultaneous open: one local port for every attempt, absolute start, re-arm on
 * RST / unreachable, optional listen + accept on the same port, optional low first TTL. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hp_internal.h"

struct hp_simopen_state {
    const hp_simopen_args_t *a; /* the caller's: it outlives the state */
    hp_punch_stats_t *st;
    uint16_t port;      /* the one local port, fixed after the first bind */
    int lfd;            /* listener, -1 if none */
    int cfd;            /* connecting socket, -1 between attempts */
    int armed;          /* cfd has called connect() */
    int ep;             /* epoll over lfd and the armed cfd: what the driver waits on */
    int64_t deadline;
    int64_t next_arm;   /* when the next connect() is due while none is pending */
    int graces;         /* deadline extensions granted to a half-open connection */
};

/* A connection the peer has answered (its SYN seen, our SYN-ACK sent: SYN_RECV) is not
 * given up at the deadline: closing it sends a FIN, which moves both NATs' conntrack
 * entries out of their SYN states, and every later SYN of the peer on this 4-tuple is then
 * INVALID to them and dropped (a lossy simultaneous open never came up after one lost ACK,
 * #19). It completes with the peer's next segment; the caller's deadline (a silence
 * re-arm's slice, typically) is stretched for it, at most HP_SIMOPEN_GRACES times: once,
 * since a peer that got our SYN-ACK sends at once (its ACK, the MARK or the ClientHello), and
 * a second slice (0.54 s after the start at 40 ms RTT) put the recovery below past the
 * relay decision (0.6 s).
 * Given up at last, it is closed with a RST (hp_simopen_end), not a FIN: an orphan in
 * FIN_WAIT1 kept the 4-tuple, so every re-armed connect() failed (EADDRNOTAVAIL) and no SYN
 * of ours left again, while our NAT's entry, past SYN_RECV, dropped the peer's fresh SYNs:
 * a lossy cone pair ended on the relay (#19, one run in ~20: the early side's SYN dropped by
 * the peer's NAT, the peer's SYN passed, our SYN-ACK lost). The RST closes our NAT's entry
 * and frees the port at once; our next SYN reopens the entry and meets the peer's socket. */
#define HP_SIMOPEN_GRACES 1
#define HP_SIMOPEN_GRACE_MAX_NS 500000000LL

static int hp_simopen_half_open(const hp_simopen_state_t *s)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);
    if (s->cfd < 0 || !s->armed)
        return 0;
    memset(&info, 0, sizeof(info));
    if (getsockopt(s->cfd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0)
        return 0;
    return info.tcpi_state == TCP_SYN_RECV;
}

int hp_simopen_validate(const hp_simopen_args_t *a, const hp_punch_stats_t *st)
{
    if (a == NULL || st == NULL)
        return -EINVAL;
    if (hp_addr_is_any(&a->remote) || a->remote.port == 0
        || hp_addr_family(&a->local) != hp_addr_family(&a->remote))
        return -EINVAL;
    if (a->timeout_ns <= 0 || a->interval_ns <= 0 || a->start_at_ns <= 0)
        return -EINVAL;
    if (a->start_at_ns > HP_MAX_TIME_NS || a->timeout_ns > HP_MAX_SPAN_NS
        || a->interval_ns > HP_MAX_SPAN_NS)
        return -EINVAL;
    if (a->syn_ttl < 0 || a->syn_ttl > 255 || a->ttl_syns < 0)
        return -EINVAL;
    return 0;
}

/* Create and bind the next attempt's socket, low TTL set if this attempt gets one. */
static int hp_simopen_prepare(hp_simopen_state_t *s)
{
    int fd, rc;
    rc = hp_sock_tcp_bound(&s->a->local, s->port, 1, 1, &fd);
    if (rc < 0)
        return rc;
    s->st->sockets_opened++;
    if (s->port == 0) {
        rc = hp_sock_local_port(fd);
        if (rc < 0) {
            hp_close(fd);
            return rc;
        }
        s->port = (uint16_t)rc;
    }
    if (s->a->syn_ttl > 0 && s->st->attempts < (uint64_t)s->a->ttl_syns) {
        rc = hp_sock_set_ttl(fd, s->a->syn_ttl);
        if (rc < 0) {
            hp_close(fd);
            return rc;
        }
    }
    s->cfd = fd;
    s->armed = 0;
    return 0;
}

/* connect() the prepared socket. 1 = established at once, 0 = in progress or failed
 * (cfd closed, counted), < 0 = fatal. */
static int hp_simopen_connect(hp_simopen_state_t *s)
{
    struct sockaddr_storage sa;
    socklen_t salen = hp_addr_sockaddr(&s->a->remote, s->a->remote.port, &sa);
    int rc, err, low_ttl;
    int64_t t;

    low_ttl = s->a->syn_ttl > 0 && s->st->attempts < (uint64_t)s->a->ttl_syns;

    /* The SYN leaves early inside connect(); on loopback the rest of the call is the peer's
     * processing, so the timestamp is read as connect() is entered. */
    t = hp_clock_now_ns();
    rc = connect(s->cfd, (struct sockaddr *)&sa, salen);
    err = rc < 0 ? errno : 0;
    s->st->attempts++;
    s->armed = 1;
    if (rc == 0 || err == EINPROGRESS) {
        s->st->syns_sent++;
        if (s->st->first_syn_at_ns == 0) {
            s->st->first_syn_at_ns = t;
            s->st->first_syn_delay_ns = t - s->a->start_at_ns;
        }
        if (low_ttl) {
            /* Retransmissions (and the rest of the connection) use the normal TTL. */
            int r2 = hp_sock_set_ttl(s->cfd, -1);
            if (r2 < 0)
                return r2;
        }
        return rc == 0 ? 1 : 0;
    }
    if (hp_count_failure(s->st, err) == HP_FAIL_OTHER
        /* EADDRNOTAVAIL / EADDRINUSE: the 4-tuple is taken (the listener may already hold
         * the peer's connection); anything else unexpected is fatal. */
        && err != EADDRNOTAVAIL && err != EADDRINUSE && err != EAGAIN && err != EINTR) {
        hp_close(s->cfd);
        s->cfd = -1;
        return -err;
    }
    hp_close(s->cfd);
    s->cfd = -1;
    return 0;
}

/* The pending connect finished: 1 = established, 0 = failed (counted, closed). */
static int hp_simopen_finish(hp_simopen_state_t *s)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(s->cfd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == 0)
        return 1;
    hp_count_failure(s->st, err);
    hp_close(s->cfd);
    s->cfd = -1;
    return 0;
}

/* Accept pending connections; return an fd from the expected remote address or -1. */
static int hp_simopen_accept(hp_simopen_state_t *s)
{
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof(peer);
        hp_addr_t from;
        int fd = accept4(s->lfd, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
        if (fd < 0)
            return -1; /* EAGAIN, or a connection reset before we took it */
        s->st->sockets_opened++;
        /* Only the peer we punch towards wins; anything else is a stray. */
        if (hp_addr_from_sockaddr(&peer, &from) == 0 && hp_addr_equal(&from, &s->a->remote))
            return fd;
        hp_close(fd);
    }
}

static void hp_simopen_win(hp_simopen_state_t *s, int fd, int accepted)
{
    hp_punch_stats_t *st = s->st;

    st->time_to_established_ns = hp_clock_now_ns() - s->a->start_at_ns;
    st->accepted = accepted;
    st->local_port = hp_sock_local_port(fd);
    st->have_remote = hp_sock_peer(fd, &st->remote) == 0;
}

static int hp_simopen_watch(hp_simopen_state_t *s, int fd, uint32_t events)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.fd = fd;
    return epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int hp_simopen_begin(const hp_simopen_args_t *a, hp_punch_stats_t *st,
                     hp_simopen_state_t **out)
{
    hp_simopen_state_t *s;
    int rc;

    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    s->a = a;
    s->st = st;
    s->port = a->local.port;
    s->lfd = -1;
    s->cfd = -1;
    s->deadline = a->start_at_ns + a->timeout_ns;
    s->next_arm = a->start_at_ns;
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    if (s->ep < 0) {
        rc = -errno;
        goto fail;
    }
    if (a->listen) {
        rc = hp_sock_tcp_bound(&a->local, s->port, 1, 1, &s->lfd);
        if (rc < 0)
            goto fail;
        st->sockets_opened++;
        if (listen(s->lfd, 16) < 0) {
            rc = -errno;
            goto fail;
        }
        rc = hp_sock_local_port(s->lfd);
        if (rc < 0)
            goto fail;
        s->port = (uint16_t)rc;
        rc = hp_simopen_watch(s, s->lfd, EPOLLIN);
        if (rc < 0)
            goto fail;
    }
    /* Everything but connect() happens before start_at, so the first SYN leaves on time. */
    rc = hp_simopen_prepare(s);
    if (rc < 0)
        goto fail;
    *out = s;
    return 0;
fail:
    hp_simopen_end(s);
    return rc;
}

int hp_simopen_fd(const hp_simopen_state_t *s)
{
    return s->ep;
}

/* fd won the punch: blocking, stats filled, out of the epoll set and the state. */
static int hp_simopen_take(hp_simopen_state_t *s, int fd, int accepted, int *out_fd)
{
    int rc;
    if (fd == s->cfd) {
        epoll_ctl(s->ep, EPOLL_CTL_DEL, fd, NULL);
        s->cfd = -1;
    }
    rc = hp_sock_hand_over(fd);
    if (rc < 0)
        return rc;
    hp_simopen_win(s, fd, accepted);
    *out_fd = fd;
    return 1;
}

/* The next attempt's connect(): 1 = won at once (taken), 0 = pending or failed, < 0 = fatal. */
static int hp_simopen_arm(hp_simopen_state_t *s, int64_t now, int *out_fd)
{
    int rc;
    if (s->cfd < 0) {
        rc = hp_simopen_prepare(s);
        if (rc < 0)
            return rc;
    }
    s->next_arm += s->a->interval_ns;
    if (s->next_arm < now)
        s->next_arm = now + s->a->interval_ns;
    rc = hp_simopen_connect(s);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return hp_simopen_take(s, s->cfd, 0, out_fd);
    if (s->cfd >= 0 && (rc = hp_simopen_watch(s, s->cfd, EPOLLOUT)) < 0)
        return rc;
    return 0;
}

int hp_simopen_step(hp_simopen_state_t *s, int64_t now, int *out_fd, int64_t *wake_ns)
{
    struct epoll_event evs[2];
    int n, k, rc;

    if (now < s->a->start_at_ns) {
        *wake_ns = s->a->start_at_ns;
        return 0;
    }
    if (now < s->deadline && !s->armed && s->st->attempts == 0) {
        /* The first connect: only that. What is pending on the sockets (the peer's SYN may
         * have reached our listener already) is read at the next step, at once: the epoll fd
         * is readable. A scheduler with many punches starting together thus sends every
         * first SYN before handling any completion. */
        rc = hp_simopen_arm(s, now, out_fd);
        if (rc != 0)
            return rc;
    } else {
        n = epoll_wait(s->ep, evs, 2, 0);
        if (n < 0 && errno != EINTR)
            return -errno;
        for (k = 0; k < n; k++) {
            if (evs[k].data.fd == s->cfd && s->armed) {
                if (hp_simopen_finish(s) == 1)
                    return hp_simopen_take(s, s->cfd, 0, out_fd);
            } else if (evs[k].data.fd == s->lfd && (evs[k].events & EPOLLIN)) {
                int fd = hp_simopen_accept(s);
                if (fd >= 0)
                    return hp_simopen_take(s, fd, 1, out_fd);
            }
        }
        if (now >= s->deadline) {
            if (s->graces >= HP_SIMOPEN_GRACES || !hp_simopen_half_open(s))
                return -ETIMEDOUT;
            s->graces++;
            s->deadline = now + (s->a->timeout_ns < HP_SIMOPEN_GRACE_MAX_NS
                                 ? s->a->timeout_ns : HP_SIMOPEN_GRACE_MAX_NS);
        }
        if ((!s->armed || s->cfd < 0) && now >= s->next_arm) {
            rc = hp_simopen_arm(s, now, out_fd);
            if (rc != 0)
                return rc;
        }
    }
    *wake_ns = s->deadline;
    if ((s->cfd < 0 || !s->armed) && s->next_arm < *wake_ns)
        *wake_ns = s->next_arm;
    return 0;
}

void hp_simopen_end(hp_simopen_state_t *s)
{
    if (s == NULL)
        return;
    if (hp_simopen_half_open(s))
        hp_sock_abort(s->cfd);
    else
        hp_close(s->cfd);
    hp_close(s->lfd);
    hp_close(s->ep);
    free(s);
}

int hp_simopen(const hp_simopen_args_t *a, int *out_fd, hp_punch_stats_t *st)
{
    return hp_punch_run(HP_PUNCH_SIMOPEN, a, out_fd, st);
}
