/* A tiny test harness for the engine's C tests: real sockets on loopback, no mocks. */
#ifndef HP_TEST_UTIL_H
#define HP_TEST_UTIL_H

/* Test files define _GNU_SOURCE before any include. */

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hp_engine.h"

static int hp_t_failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);        \
            hp_t_failures++;                                                         \
        }                                                                            \
    } while (0)

#define CHECK_EQ(a, b)                                                               \
    do {                                                                             \
        long long hp_a_ = (long long)(a), hp_b_ = (long long)(b);                    \
        if (hp_a_ != hp_b_) {                                                        \
            fprintf(stderr, "  FAIL %s:%d: %s == %lld, expected %s == %lld\n",       \
                    __FILE__, __LINE__, #a, hp_a_, #b, hp_b_);                       \
            hp_t_failures++;                                                         \
        }                                                                            \
    } while (0)

#define RUN(fn)                                                                      \
    do {                                                                             \
        int before_ = hp_t_failures;                                                 \
        fn();                                                                        \
        printf("%s %s\n", hp_t_failures == before_ ? "ok  " : "FAIL", #fn);          \
        fflush(stdout);                                                              \
    } while (0)

static inline int hp_t_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;
    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the DIR's own fd */
}

static inline uint32_t hp_t_loopback(void)
{
    return htonl(INADDR_LOOPBACK);
}

/* A free TCP port on 127.0.0.1 (bound then released). */
static inline uint16_t hp_t_free_port(void)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = hp_t_loopback();
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0
        || getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        perror("free port");
        exit(2);
    }
    close(fd);
    return ntohs(sa.sin_port);
}

/* A listener on 127.0.0.1:port (0 = any); *port gets the real one. */
static inline int hp_t_listener(uint16_t *port)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = hp_t_loopback();
    sa.sin_port = htons(*port);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0
        || getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        perror("listener");
        exit(2);
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

/* A connected TCP pair over loopback: *client and *server. */
static inline void hp_t_tcp_pair(int *client, int *server)
{
    struct sockaddr_in sa;
    uint16_t port = 0;
    int lfd = hp_t_listener(&port);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = hp_t_loopback();
    sa.sin_port = htons(port);
    *client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (*client < 0 || connect(*client, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("connect");
        exit(2);
    }
    *server = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (*server < 0) {
        perror("accept");
        exit(2);
    }
    close(lfd);
}

#endif
