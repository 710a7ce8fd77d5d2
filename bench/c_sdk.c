/* Per-call latency of the C SDK: mon_log_event and mon_log_metric, sidecar up and down.
 *
 * "up" talks to a draining TCP server in a separate process (forked before any SDK thread
 * exists, so its reads do not share this process's scheduling); "down" points at a port with
 * nothing listening, so once the queue is full every call also drops the oldest message.
 * Each public call is timed on its own with two clock_gettime(CLOCK_MONOTONIC) reads; nothing
 * is pinned to a CPU. The cost of the two reads alone is printed (it is included in every
 * figure), and so is the load average before and after, since the machine may be shared.
 * Target: p99 under 5 us. Build and run: make -C sdk_clients/c bench
 *
 *     c_sdk [CALLS_PER_ROUND [ROUNDS]]
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "monitoring_sdk.h"

#define TARGET_P99_NS 5000.0

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int listener(int *port) {
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16)) { perror("listen"); exit(1); }
    getsockname(fd, (struct sockaddr *)&a, &al);
    *port = ntohs(a.sin_port);
    return fd;
}

static void drain_forever(int lfd) { /* child process: read and discard everything */
    struct pollfd p[17];
    int n = 1;
    static char buf[1 << 20];
    p[0] = (struct pollfd){lfd, POLLIN, 0};
    for (;;) {
        if (poll(p, (nfds_t)n, -1) < 0) continue;
        if ((p[0].revents & POLLIN) && n < 17) p[n++] = (struct pollfd){accept(lfd, NULL, NULL), POLLIN, 0};
        for (int i = 1; i < n; i++)
            if (p[i].revents && read(p[i].fd, buf, sizeof buf) <= 0) { close(p[i].fd); p[i--] = p[--n]; }
    }
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static void quiet(void *arg, const char *what) { (void)arg; (void)what; }

static void print_load(const char *when) { /* Linux: /proc/loadavg; elsewhere nothing */
    char buf[128] = "";
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fgets(buf, sizeof buf, f)) buf[strcspn(buf, "\n")] = '\0';
        fclose(f);
        printf("load average %s: %s\n", when, buf);
    }
}

/* p50 and p99 of the timer alone: two back-to-back reads, as around every call. */
static void timer_cost(int calls, double out[2]) {
    long long *t = malloc(sizeof *t * (size_t)calls);
    for (int i = 0; i < calls; i++) {
        long long a = now_ns();
        t[i] = now_ns() - a;
    }
    qsort(t, (size_t)calls, sizeof *t, cmp);
    out[0] = (double)t[calls / 2];
    out[1] = (double)t[(size_t)calls * 99 / 100];
    free(t);
}

static const mon_kv ctx[] = {{"file", "orders.csv"}, {NULL, NULL}};
static const mon_kv tags[] = {{"table", "orders"}, {NULL, NULL}};

static void call(mon_client *m, int metric, int i) {
    if (metric) mon_log_metric(m, "rows_loaded", i, "count", tags);
    else mon_log_event(m, "info", "Loaded a batch of rows", ctx);
}

/* Median over rounds of each round's p50 and p99, and the worst round's p99, in ns. */
static void measure(mon_client *m, int metric, int calls, int rounds, double out[3]) {
    long long *t = malloc(sizeof *t * (size_t)calls);
    double p50[64], p99[64];
    for (int i = 0; i < 2000; i++) call(m, metric, i);
    for (int r = 0; r < rounds; r++) {
        mon_flush(m, 2000);
        for (int i = 0; i < calls; i++) {
            long long a = now_ns();
            call(m, metric, i);
            t[i] = now_ns() - a;
        }
        qsort(t, (size_t)calls, sizeof *t, cmp);
        p50[r] = (double)t[calls / 2];
        p99[r] = (double)t[(size_t)calls * 99 / 100];
    }
    out[2] = 0;
    for (int r = 0; r < rounds; r++) if (p99[r] > out[2]) out[2] = p99[r];
    for (int r = 1; r < rounds; r++) /* insertion sort: few rounds */
        for (int k = r; k > 0 && p50[k] < p50[k - 1]; k--) { double x = p50[k]; p50[k] = p50[k - 1]; p50[k - 1] = x; }
    for (int r = 1; r < rounds; r++)
        for (int k = r; k > 0 && p99[k] < p99[k - 1]; k--) { double x = p99[k]; p99[k] = p99[k - 1]; p99[k - 1] = x; }
    out[0] = p50[rounds / 2];
    out[1] = p99[rounds / 2];
    free(t);
}

int main(int argc, char **argv) {
    int calls = argc > 1 ? atoi(argv[1]) : 20000, rounds = argc > 2 ? atoi(argv[2]) : 5, up_port, down_port, worst = 0;
    if (calls < 100) calls = 100;
    if (rounds < 1 || rounds > 64) rounds = 5;
    int lfd = listener(&up_port);
    pid_t drain = fork();
    if (drain == 0) drain_forever(lfd);
    close(lfd);
    close(listener(&down_port)); /* a port that was free a moment ago: nothing listens there */
    unsetenv("MONITORING_SIDECAR");
    double tc[2];
    printf("C SDK per-call latency: %d calls x %d rounds (median round; worst round's p99)\n", calls, rounds);
    print_load("before");
    timer_cost(calls, tc);
    printf("timer alone (included below): p50 %.2f us, p99 %.2f us\n\n", tc[0] / 1000, tc[1] / 1000);
    printf("%-14s %-14s %10s %10s %14s %10s\n", "case", "call", "p50 us", "p99 us", "worst p99 us", "dropped");
    for (int down = 0; down < 2; down++)
        for (int metric = 0; metric < 2; metric++) {
            mon_client *m = mon_init("bench", "127.0.0.1", down ? down_port : up_port);
            mon_set_error_handler(m, quiet, NULL); /* the down case's connect errors are expected */
            double r[3];
            measure(m, metric, calls, rounds, r);
            mon_stats st;
            mon_statistics(m, &st);
            printf("%-14s %-14s %10.2f %10.2f %14.2f %10llu%s\n", down ? "sidecar down" : "sidecar up", metric ? "mon_log_metric" : "mon_log_event",
                   r[0] / 1000, r[1] / 1000, r[2] / 1000, (unsigned long long)st.dropped, r[1] > TARGET_P99_NS ? "   over target" : "");
            worst |= r[1] > TARGET_P99_NS;
            mon_close(m, down ? 0 : 2000);
        }
    printf("\n");
    print_load("after");
    printf("target: p99 < %.0f us: %s\n", TARGET_P99_NS / 1000, worst ? "MISSED" : "met");
    kill(drain, SIGTERM);
    waitpid(drain, NULL, 0);
    return 0;
}
