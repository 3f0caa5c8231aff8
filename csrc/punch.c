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

int hp_punch_run(hp_punch_t *p, int64_t start_at_ns, int *out_fd)
{
    int64_t wake = start_at_ns, now;
    int rc;

    *out_fd = -1;
    hp_clock_wait_until(start_at_ns);
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

