/* One client of bench/soak.py: the C SDK sending a numbered sequence at a steady rate.
 * Message seq N carries N in context.seq (events) or tags.seq (metrics), so the soak can find
 * each one in every backend. At the end: flush, then one JSON line of counts on stdout.
 * Build: make -C sdk_clients/c build/soak
 *
 *     soak SOURCE HOST PORT PER_SECOND SECONDS
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "monitoring_sdk.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void quiet(void *arg, const char *what) { (void)arg; (void)what; } /* restarts are expected */

/* The same mix in every client: mostly info, some warnings, a metric in five, a rare error. */
static void send_one(mon_client *m, const char *source, unsigned long seq) {
    char number[24], text[160];
    snprintf(number, sizeof number, "%lu", seq);
    const mon_kv ids[] = {{"seq", number}, {NULL, NULL}};
    if (seq % 5 == 4) {
        mon_log_metric(m, "soak.seq", (double)seq, "count", ids);
        return;
    }
    snprintf(text, sizeof text, "soak %s #%lu", source, seq);
    mon_log_event(m, seq % 997 == 0 ? "error" : seq % 3 == 0 ? "warning" : "info", text, ids);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s SOURCE HOST PORT PER_SECOND SECONDS\n", argv[0]);
        return 2;
    }
    const char *source = argv[1];
    double rate = atof(argv[4]), seconds = atof(argv[5]);
    mon_client *m = mon_init(source, argv[2], atoi(argv[3]));
    if (m == NULL) return 1;
    mon_set_error_handler(m, quiet, NULL);
    unsigned long called = 0;
    double started = now_s(), elapsed;
    const struct timespec tick = {0, 5000000};
    while ((elapsed = now_s() - started) < seconds) {
        unsigned long due = (unsigned long)(elapsed * rate) + 1;
        while (called < due) send_one(m, source, called++);
        nanosleep(&tick, NULL);
    }
    int flushed = mon_flush(m, 30000) == 0;
    mon_stats st;
    mon_statistics(m, &st);
    printf("{\"called\": %lu, \"sent\": %llu, \"dropped\": %llu, \"reconnects\": %llu, \"errors\": %llu, \"queued\": %llu, \"flushed\": %s}\n",
           called, (unsigned long long)st.sent, (unsigned long long)st.dropped, (unsigned long long)st.reconnects,
           (unsigned long long)st.errors, (unsigned long long)st.queued, flushed ? "true" : "false");
    fflush(stdout);
    mon_close(m, 1000);
    return 0;
}
