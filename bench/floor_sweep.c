/* The kernel floor of a sweep launch (bench/bench_engine.py, issue 18): a bare loop making the
 * calls a sweep must make for each pair -- socket (non-blocking), SO_REUSEADDR + SO_REUSEPORT,
 * bind to the local address, connect -- then waiting for the last pair (the listening one) to
 * be established, and closing every socket. No epoll, no bookkeeping: what is left is the
 * kernel's own per-socket cost, which no engine can go below.
 *
 *   floor_sweep ROUNDS LOCAL_IP REMOTE_IP PORT...
 * prints one line per round: the round's wall time and this thread's CPU time (user + system,
 * the part the machine's other load does not inflate), in nanoseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int rounds, n, r, i, one = 1;
    struct sockaddr_in local, remote;
    int *fds;

    if (argc < 5) {
        fprintf(stderr, "usage: %s ROUNDS LOCAL_IP REMOTE_IP PORT...\n", argv[0]);
        return 2;
    }
    rounds = atoi(argv[1]);
    n = argc - 4;
    fds = calloc((size_t)n, sizeof(*fds));
    memset(&local, 0, sizeof(local));
    local.sin_family = AF_INET;
    remote = local;
    if (!fds || inet_pton(AF_INET, argv[2], &local.sin_addr) != 1
        || inet_pton(AF_INET, argv[3], &remote.sin_addr) != 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    for (r = 0; r < rounds; r++) {
        long long t0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
        for (i = 0; i < n; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0
                || setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0
                || bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
                perror("socket/setsockopt/bind");
                return 1;
            }
            remote.sin_port = htons((unsigned short)atoi(argv[4 + i]));
            if (connect(fd, (struct sockaddr *)&remote, sizeof(remote)) < 0
                && errno != EINPROGRESS && errno != ECONNREFUSED) {
                perror("connect");
                return 1;
            }
            fds[i] = fd;
        }
        {   /* the last pair listens: wait until it is established, as a sweep returns then */
            struct pollfd p = {.fd = fds[n - 1], .events = POLLOUT};
            int err = 0;
            socklen_t len = sizeof(err);
            if (poll(&p, 1, 5000) != 1
                || getsockopt(fds[n - 1], SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
                fprintf(stderr, "the listening pair did not connect (%s)\n", strerror(err));
                return 1;
            }
        }
        for (i = 0; i < n; i++)
            close(fds[i]);
        printf("%lld %lld\n", now_ns(CLOCK_MONOTONIC) - t0, now_ns(CLOCK_THREAD_CPUTIME_ID) - c0);
        fflush(stdout);
    }
    free(fds);
    return 0;
}
