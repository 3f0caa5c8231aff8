/* Absolute-time waits: sleep on the realtime clock until shortly before, then spin. */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>

#include "hp_internal.h"

/* HP_SPIN_NS: the kernel's default timer slack is 50 us and a wake-up adds tens of
 * microseconds more; sleeping until this much before the target and spinning the rest keeps
 * the error small. */

static int64_t hp_ts_ns(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * HP_NS_PER_S + ts->tv_nsec;
}

int64_t hp_clock_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return hp_ts_ns(&ts);
}

int64_t hp_clock_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return hp_ts_ns(&ts);
}

void hp_clock_wait_until(int64_t abs_ns)
{
    int64_t wake = abs_ns - HP_SPIN_NS;
    if (hp_clock_now_ns() < wake) {
        struct timespec ts;
        ts.tv_sec = (time_t)(wake / HP_NS_PER_S);
        ts.tv_nsec = (long)(wake % HP_NS_PER_S);
        /* EINTR: sleep again to the same absolute time; anything else: fall into the spin. */
        while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
    }
    while (hp_clock_now_ns() < abs_ns) {
    }
}
