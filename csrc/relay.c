/* The relay data path: two sockets pumped both ways, by one of two movers per direction:
 *   copy    recv() into a buffer, send() from it (HP_RELAY_COPY, the default);
 *   splice  splice(2) through a pipe, so payload bytes never cross into user space.
 * Chosen by measurement (issue 18, bench/bench_relay.py): on loopback the copy moves more per
 * second and costs less CPU per GiB than splice, whose two syscalls per chunk and page
 * reference juggling outweigh the copy they avoid for socket-to-socket traffic. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hp_internal.h"

#define HP_PIPE_SIZE (1 << 20) /* the default pipe-max-size; smaller is fine */
#define HP_COPY_SIZE (1 << 20) /* copy buffer per direction (as the pure pump's) */
#define HP_ROUNDS 16           /* per direction per wake-up, so neither starves the other */

typedef struct hp_dir {
    int src, dst;
    int pipe_r, pipe_w;
    size_t in_pipe;       /* bytes read from src, not yet written to dst */
    int eof;              /* src reached end of stream */
    int shut;             /* dst shut down for writing */
    int can_read;         /* src may have data: cleared on EAGAIN, set by an epoll edge */
    int can_write;        /* dst may take data: likewise */
    int again;            /* stopped for fairness, not because it would block */
    uint64_t *bytes;
    char *buf;            /* copy mode: in_pipe bytes wait at buf + off; NULL = splice */
    size_t off;
} hp_dir_t;

/* Move up to len bytes from d's buffer (pipe or copy buffer) to dst: > 0 moved, < 0 errno set. */
static ssize_t hp_dir_out(hp_dir_t *d, size_t len)
{
    ssize_t n;
    if (d->buf == NULL)
        return splice(d->pipe_r, NULL, d->dst, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    n = send(d->dst, d->buf + d->off, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0)
        d->off = (size_t)n == len ? 0 : d->off + (size_t)n;
    return n;
}

/* Read up to len bytes from src into d's (empty) buffer: > 0 read, 0 EOF, < 0 errno set. */
static ssize_t hp_dir_in(hp_dir_t *d, size_t len)
{
    if (d->buf == NULL)
        return splice(d->src, NULL, d->pipe_w, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    return recv(d->src, d->buf, len, MSG_DONTWAIT);
}

static int hp_dir_open(hp_dir_t *d, int src, int dst, uint64_t *bytes, size_t *cap, int mode)
{
    int p[2], sz;
    memset(d, 0, sizeof(*d));
    d->src = src;
    d->dst = dst;
    d->bytes = bytes;
    d->pipe_r = d->pipe_w = -1;
    d->can_read = d->can_write = 1;
    if (mode == HP_RELAY_COPY) {
        d->buf = malloc(HP_COPY_SIZE);
        *cap = HP_COPY_SIZE;
        return d->buf != NULL ? 0 : -ENOMEM;
    }
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    (void)fcntl(d->pipe_w, F_SETPIPE_SZ, HP_PIPE_SIZE); /* may be refused: keep the default */
    sz = fcntl(d->pipe_w, F_GETPIPE_SZ);
    *cap = sz > 0 ? (size_t)sz : 65536;
    return 0;
}

/* Move what can move without blocking. *budget: bytes that may still be read (total over
 * both directions); UINT64_MAX for no limit. Every splice either moves bytes or clears a
 * readiness flag, so this ends. Returns -errno on a socket error. */
static int hp_dir_step(hp_dir_t *d, size_t cap, uint64_t *budget, int *moved)
{
    int round;
    d->again = 0;
    for (round = 0; round < HP_ROUNDS; round++) {
        ssize_t n;
        size_t len;
        while (d->in_pipe > 0 && d->can_write) {
            n = hp_dir_out(d, d->in_pipe);
            if (n > 0) {
                d->in_pipe -= (size_t)n;
                *d->bytes += (uint64_t)n;
                *moved = 1;
            } else if (n < 0 && errno == EAGAIN) {
                d->can_write = 0;
            } else if (n < 0 && errno != EINTR) {
                return -errno;
            } else if (n == 0) {
                return -EPIPE;
            }
        }
        if (d->in_pipe > 0)
            return 0; /* wait for dst */
        if (d->eof) {
            if (!d->shut) {
                /* Half-close: the other side learns of the EOF, its direction goes on. */
                if (shutdown(d->dst, SHUT_WR) < 0 && errno != ENOTCONN)
                    return -errno;
                d->shut = 1;
            }
            return 0;
        }
        if (*budget == 0 || !d->can_read)
            return 0;
        len = cap;
        if ((uint64_t)len > *budget)
            len = (size_t)*budget;
        n = hp_dir_in(d, len);
        if (n > 0) {
            d->in_pipe += (size_t)n;
            if (*budget != UINT64_MAX)
                *budget -= (uint64_t)n;
            *moved = 1;
        } else if (n == 0) {
            d->eof = 1;
        } else if (errno == EAGAIN) {
            d->can_read = 0;
        } else if (errno != EINTR) {
            return -errno;
        }
    }
    d->again = 1;
    return 0;
}

static int hp_relay_loop(int ep, int fd_a, hp_dir_t *ab, hp_dir_t *ba, size_t cap_ab,
                         size_t cap_ba, int64_t idle_ns, uint64_t max_bytes,
                         hp_relay_stats_t *st)
{
    uint64_t budget = max_bytes ? max_bytes : UINT64_MAX;
    int64_t last = hp_clock_mono_ns();
    struct epoll_event evs[4];

    for (;;) {
        int moved = 0, rc, n, k, timeout_ms = -1;
        if ((rc = hp_dir_step(ab, cap_ab, &budget, &moved)) < 0
            || (rc = hp_dir_step(ba, cap_ba, &budget, &moved)) < 0) {
            st->reason = HP_RELAY_ERROR;
            st->error = -rc;
            return 0;
        }
        if (moved)
            last = hp_clock_mono_ns();
        if (ab->shut && ba->shut) {
            st->reason = HP_RELAY_EOF;
            return 0;
        }
        if (budget == 0 && ab->in_pipe == 0 && ba->in_pipe == 0) {
            st->reason = HP_RELAY_LIMIT;
            return 0;
        }
        if (ab->again || ba->again) {
            timeout_ms = 0;
        } else if (idle_ns > 0) {
            int64_t left = idle_ns - (hp_clock_mono_ns() - last);
            if (left <= 0) {
                st->reason = HP_RELAY_IDLE;
                return 0;
            }
            timeout_ms = (int)((left + 999999) / 1000000);
        }
        n = epoll_wait(ep, evs, 4, timeout_ms);
        if (n < 0 && errno != EINTR)
            return -errno;
        for (k = 0; k < n; k++) {
            uint32_t e = evs[k].events;
            hp_dir_t *rd = evs[k].data.fd == fd_a ? ab : ba; /* reads from this fd */
            hp_dir_t *wr = rd == ab ? ba : ab;                /* writes to this fd */
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                rd->can_read = 1;
            if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                wr->can_write = 1;
        }
    }
}

/* -ENOTSOCK for a non-socket, -EPROTOTYPE for a socket that is not a stream. */
static int hp_check_stream(int fd)
{
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return -errno;
    return type == SOCK_STREAM ? 0 : -EPROTOTYPE;
}

int hp_relay_pump(int fd_a, int fd_b, int64_t idle_timeout_ns, uint64_t max_bytes,
                  hp_relay_stats_t *st)
{
    return hp_relay_pump_mode(fd_a, fd_b, idle_timeout_ns, max_bytes, HP_RELAY_COPY, st);
}

int hp_relay_pump_mode(int fd_a, int fd_b, int64_t idle_timeout_ns, uint64_t max_bytes,
                       int mode, hp_relay_stats_t *st)
{
    hp_dir_t ab, ba;
    size_t cap_ab = 0, cap_ba = 0;
    int fl_a, fl_b, ep = -1, rc;
    struct epoll_event ev;

    if (st == NULL || fd_a < 0 || fd_b < 0 || fd_a == fd_b || idle_timeout_ns < 0
        || (mode != HP_RELAY_COPY && mode != HP_RELAY_SPLICE))
        return -EINVAL;
    memset(st, 0, sizeof(*st));
    fl_a = fcntl(fd_a, F_GETFL);
    fl_b = fcntl(fd_b, F_GETFL);
    if (fl_a < 0 || fl_b < 0)
        return -EBADF;
    if ((rc = hp_check_stream(fd_a)) < 0 || (rc = hp_check_stream(fd_b)) < 0)
        return rc;
    memset(&ab, 0, sizeof(ab));
    memset(&ba, 0, sizeof(ba));
    ab.pipe_r = ab.pipe_w = ba.pipe_r = ba.pipe_w = -1;
    if ((rc = hp_dir_open(&ab, fd_a, fd_b, &st->bytes_a_to_b, &cap_ab, mode)) < 0
        || (rc = hp_dir_open(&ba, fd_b, fd_a, &st->bytes_b_to_a, &cap_ba, mode)) < 0)
        goto out;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        rc = -errno;
        goto out;
    }
    /* Edge-triggered, registered once: no epoll_ctl per wake-up (see can_read/can_write). */
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.fd = fd_a;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd_a, &ev) < 0) {
        rc = -errno;
        goto out;
    }
    ev.data.fd = fd_b;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd_b, &ev) < 0) {
        rc = -errno;
        goto out;
    }
    /* splice() on a blocking socket would block despite SPLICE_F_NONBLOCK (copy: MSG_DONTWAIT
     * would do, but one rule for both). */
    if (fcntl(fd_a, F_SETFL, fl_a | O_NONBLOCK) < 0 || fcntl(fd_b, F_SETFL, fl_b | O_NONBLOCK) < 0) {
        rc = -errno;
        goto restore;
    }
    rc = hp_relay_loop(ep, fd_a, &ab, &ba, cap_ab, cap_ba, idle_timeout_ns, max_bytes, st);
restore:
    (void)fcntl(fd_a, F_SETFL, fl_a);
    (void)fcntl(fd_b, F_SETFL, fl_b);
out:
    hp_close(ep); /* also drops the caller's fds from the set; they stay open */
    hp_close(ab.pipe_r);
    hp_close(ab.pipe_w);
    hp_close(ba.pipe_r);
    hp_close(ba.pipe_w);
    free(ab.buf);
    free(ba.buf);
    return rc;
}
