/* Driving one punch to its end for the blocking calls (hp_simopen, hp_sweep): wait for
 * start_at, step whenever the punch's epoll fd is readable or its wake time has come. The
 * scheduler (sched.c) steps many punches through the same hp_punch_* calls. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <time.h>

#include "hp_internal.h"

int hp_punch_fd(const hp_punch_t *p)
{
    return p->kind == HP_PUNCH_SIMOPEN ? hp_simopen_fd(p->u.simopen) : hp_sweep_fd(p->u.sweep);
}

int hp_punch_step(hp_punch_t *p, int64_t now, int *out_fd, int64_t *wake_ns)
{
    if (p->kind == HP_PUNCH_SIMOPEN)
        return hp_simopen_step(p->u.simopen, now, out_fd, wake_ns);
    return hp_sweep_step(p->u.sweep, now, out_fd, wake_ns);
}

void hp_punch_end(hp_punch_t *p)
{
    if (p->kind == HP_PUNCH_SIMOPEN)
        hp_simopen_end(p->u.simopen);
    else
        hp_sweep_end(p->u.sweep);
}

int hp_punch_begin(hp_punch_t *p, hp_punch_kind_t kind, const void *args, hp_punch_stats_t *st)
{
    int rc;

    p->kind = kind;
    rc = kind == HP_PUNCH_SIMOPEN ? hp_simopen_validate(args, st) : hp_sweep_validate(args, st);
    if (rc < 0)
        return rc;
    hp_punch_stats_init(st);
    if (kind == HP_PUNCH_SIMOPEN)
        return hp_simopen_begin(args, st, &p->u.simopen);
    return hp_sweep_begin(args, st, &p->u.sweep);
}

int64_t hp_punch_start_at(hp_punch_kind_t kind, const void *args)
{
    return kind == HP_PUNCH_SIMOPEN ? ((const hp_simopen_args_t *)args)->start_at_ns
                                    : ((const hp_sweep_args_t *)args)->start_at_ns;
}

int hp_punch_run(hp_punch_kind_t kind, const void *args, int *out_fd, hp_punch_stats_t *st)
{
    hp_punch_t punch, *p = &punch;
    int64_t wake, now;
    int rc;

    if (out_fd == NULL)
        return -EINVAL;
    *out_fd = -1;
    rc = hp_punch_begin(p, kind, args, st);
    if (rc < 0)
        return rc;
    wake = hp_punch_start_at(kind, args);       /* args validated by begin */
    hp_clock_wait_until(wake);
    for (;;) {
        struct pollfd pfd;
        struct timespec ts;
        rc = hp_punch_step(p, hp_clock_now_ns(), out_fd, &wake);
        if (rc != 0)
            break;
        now = hp_clock_now_ns();
        now = wake > now ? wake - now : 0;
        ts.tv_sec = (time_t)(now / HP_NS_PER_S);
        ts.tv_nsec = (long)(now % HP_NS_PER_S);
        /* poll, not epoll_wait: reading the punch's epoll would requeue what it reports
         * behind the rest, and the step must see its sockets' events in arrival order. */
        pfd.fd = hp_punch_fd(p);
        pfd.events = POLLIN;
        if (ppoll(&pfd, 1, &ts, NULL) < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
    }
    hp_punch_end(p);
    return rc < 0 ? rc : 0;
}

