/* TCP simultaneous open: one local port for every attempt, absolute start, re-arm on
 * RST / unreachable, optional listen + accept on the same port, optional low first TTL. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hp_internal.h"

typedef struct hp_simopen_state {
    const hp_simopen_args_t *a;
    hp_punch_stats_t *st;
    uint16_t port;      /* the one local port, fixed after the first bind */
    int lfd;            /* listener, -1 if none */
    int cfd;            /* connecting socket, -1 between attempts */
    int armed;          /* cfd has called connect() */
} hp_simopen_state_t;

static int hp_simopen_validate(const hp_simopen_args_t *a, const int *out_fd,
                               const hp_punch_stats_t *st)
{
    if (a == NULL || out_fd == NULL || st == NULL)
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

int hp_simopen(const hp_simopen_args_t *a, int *out_fd, hp_punch_stats_t *st)
{
    hp_simopen_state_t s;
    int64_t deadline, next_arm;
    int rc, winner = -1, accepted = 0;

    rc = hp_simopen_validate(a, out_fd, st);
    if (rc < 0)
        return rc;
    *out_fd = -1;
    hp_punch_stats_init(st);
    memset(&s, 0, sizeof(s));
    s.a = a;
    s.st = st;
    s.port = a->local.port;
    s.lfd = -1;
    s.cfd = -1;
    deadline = a->start_at_ns + a->timeout_ns;

    if (a->listen) {
        rc = hp_sock_tcp_bound(&a->local, s.port, 1, 1, &s.lfd);
        if (rc < 0)
            goto out;
        st->sockets_opened++;
        if (listen(s.lfd, 16) < 0) {
            rc = -errno;
            goto out;
        }
        rc = hp_sock_local_port(s.lfd);
        if (rc < 0)
            goto out;
        s.port = (uint16_t)rc;
    }
    /* Everything but connect() happens before start_at, so the first SYN leaves on time. */
    rc = hp_simopen_prepare(&s);
    if (rc < 0)
        goto out;
    hp_clock_wait_until(a->start_at_ns);
    next_arm = a->start_at_ns;

    for (;;) {
        struct pollfd pfd[2];
        struct timespec ts;
        int64_t now = hp_clock_now_ns(), until;
        nfds_t n = 0;
        int ci = -1, li = -1;

        if (now >= deadline) {
            rc = -ETIMEDOUT;
            goto out;
        }
        if (!s.armed || s.cfd < 0) {
            if (now >= next_arm) {
                if (s.cfd < 0) {
                    rc = hp_simopen_prepare(&s);
                    if (rc < 0)
                        goto out;
                }
                next_arm += a->interval_ns;
                if (next_arm < now)
                    next_arm = now + a->interval_ns;
                rc = hp_simopen_connect(&s);
                if (rc < 0)
                    goto out;
                if (rc == 1) {
                    winner = s.cfd;
                    s.cfd = -1;
                    break;
                }
                continue;
            }
        }
        if (s.cfd >= 0 && s.armed) {
            pfd[n].fd = s.cfd;
            pfd[n].events = POLLOUT;
            ci = (int)n++;
        }
        if (s.lfd >= 0) {
            pfd[n].fd = s.lfd;
            pfd[n].events = POLLIN;
            li = (int)n++;
        }
        until = deadline;
        if ((s.cfd < 0 || !s.armed) && next_arm < until)
            until = next_arm;
        ts.tv_sec = (time_t)((until - now) / HP_NS_PER_S);
        ts.tv_nsec = (long)((until - now) % HP_NS_PER_S);
        rc = ppoll(pfd, n, &ts, NULL);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out;
        }
        if (ci >= 0 && pfd[ci].revents) {
            if (hp_simopen_finish(&s) == 1) {
                winner = s.cfd;
                s.cfd = -1;
                break;
            }
        }
        if (li >= 0 && (pfd[li].revents & POLLIN)) {
            int fd = hp_simopen_accept(&s);
            if (fd >= 0) {
                winner = fd;
                accepted = 1;
                break;
            }
        }
    }

    rc = hp_sock_set_blocking(winner);
    if (rc < 0) {
        hp_close(winner);
        goto out;
    }
    hp_simopen_win(&s, winner, accepted);
    *out_fd = winner;
    rc = 0;
out:
    hp_close(s.cfd);
    hp_close(s.lfd);
    return rc;
}
