/* Tests of the C SDK against a real capture server (a thread on 127.0.0.1, or on a Unix socket). Run by
 * `make test` under AddressSanitizer + UBSan; the last line is "N passed, M failed".
 *
 * The SDK's source is included, not linked: the ring tests make clients with small queues
 * (create()) and drive the queue's functions directly. The other tests use only the API. */
#define _DEFAULT_SOURCE /* usleep */
#include <stdlib.h>

/* The SDK's own malloc() calls go through this: set malloc_fail_in to n and the n-th of them
 * from now fails (the out-of-memory paths). Only the main thread arms it. */
static int malloc_fail_in;
static void *test_malloc(size_t n) { return malloc_fail_in > 0 && --malloc_fail_in == 0 ? NULL : malloc(n); }
#define malloc test_malloc
#include "monitoring_sdk.c"
#undef malloc

#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int passed, failed;
#define CHECK(cond, ...) check_((cond), __LINE__, #cond, __VA_ARGS__)
static int check_(int ok, int line, const char *expr, const char *fmt, ...) {
    if (ok) { passed++; return 1; }
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL line %d: %s: ", line, expr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    failed++;
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int errors_seen;
static void count_error(void *arg, const char *what) { (void)arg; (void)what; __atomic_add_fetch(&errors_seen, 1, __ATOMIC_RELAXED); }

static mon_client *client(const char *source, int port) {
    mon_client *m = mon_init(source, "127.0.0.1", port);
    mon_set_error_handler(m, count_error, NULL);
    return m;
}

/* ---- capture server: complete lines of every connection, in arrival order --------------- */

enum { CAPTURE, NO_READ, RESET, PAUSED }; /* PAUSED: not reading yet, normal socket buffers */
typedef struct { int fd; char *buf; size_t len; } conn_t;
typedef struct {
    char unix_path[108]; /* set: listen on this Unix socket, not on 127.0.0.1 */
    int port, lfd, mode, wake[2];
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *data;
    size_t len;
    int lines, accepted;
} server_t;

static void append(server_t *s, const char *p, size_t n) {
    pthread_mutex_lock(&s->mu);
    s->data = realloc(s->data, s->len + n + 1);
    memcpy(s->data + s->len, p, n);
    s->len += n;
    s->data[s->len] = '\0';
    for (size_t i = 0; i < n; i++) s->lines += p[i] == '\n';
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static int server_mode(server_t *s) {
    pthread_mutex_lock(&s->mu);
    int mode = s->mode;
    pthread_mutex_unlock(&s->mu);
    return mode;
}

static void server_set_mode(server_t *s, int mode) { /* PAUSED -> CAPTURE: starts reading */
    pthread_mutex_lock(&s->mu);
    s->mode = mode;
    pthread_mutex_unlock(&s->mu);
}

static void *server_main(void *arg) {
    server_t *s = arg;
    conn_t c[64];
    int n = 0;
    for (;;) {
        struct pollfd p[66];
        int mode = server_mode(s);
        p[0] = (struct pollfd){s->wake[0], POLLIN, 0};
        p[1] = (struct pollfd){s->lfd, POLLIN, 0};
        int reading = mode != NO_READ && mode != PAUSED;
        for (int i = 0; i < n; i++) p[2 + i] = (struct pollfd){c[i].fd, reading ? POLLIN : 0, 0};
        if (poll(p, (nfds_t)(2 + n), reading ? 1000 : 20) < 0) continue;
        if (p[0].revents) break;
        for (int i = 0; i < n; i++) {
            if (!(p[2 + i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char buf[65536];
            ssize_t r = read(c[i].fd, buf, sizeof buf);
            if (r > 0) {
                c[i].buf = realloc(c[i].buf, c[i].len + (size_t)r);
                memcpy(c[i].buf + c[i].len, buf, (size_t)r);
                c[i].len += (size_t)r;
                char *nl = NULL;
                for (size_t k = c[i].len; k-- > 0;) if (c[i].buf[k] == '\n') { nl = c[i].buf + k; break; }
                if (nl) {
                    size_t whole = (size_t)(nl - c[i].buf) + 1;
                    append(s, c[i].buf, whole);
                    memmove(c[i].buf, c[i].buf + whole, c[i].len - whole);
                    c[i].len -= whole;
                }
            } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
                if (c[i].len) { append(s, c[i].buf, c[i].len); append(s, "\n", 1); }
                free(c[i].buf);
                close(c[i].fd);
                c[i--] = c[--n];
                p[2 + i + 1] = p[2 + n]; /* keep poll results aligned with the moved entry */
            }
        }
        if (p[1].revents & POLLIN) { /* after the reads: p[] covers only the polled connections */
            int fd = accept(s->lfd, NULL, NULL);
            if (fd >= 0 && mode == RESET) {
                struct linger l = {1, 0};
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
                close(fd);
            } else if (fd >= 0 && n < 64) {
                if (mode == NO_READ) { int sz = 4096; setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz); }
                c[n++] = (conn_t){fd, NULL, 0};
                pthread_mutex_lock(&s->mu);
                s->accepted++;
                pthread_mutex_unlock(&s->mu);
            }
        }
    }
    for (int i = 0; i < n; i++) { free(c[i].buf); close(c[i].fd); }
    close(s->lfd);
    return NULL;
}

static void server_start(server_t *s, int port, int mode) {
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    int one = 1;
    if (!s->data) { pthread_mutex_init(&s->mu, NULL); pthread_cond_init(&s->cv, NULL); }
    server_set_mode(s, mode);
    if (s->unix_path[0]) {
        struct sockaddr_un u;
        memset(&u, 0, sizeof u);
        u.sun_family = AF_UNIX;
        memcpy(u.sun_path, s->unix_path, strlen(s->unix_path));
        unlink(s->unix_path); /* the previous start's */
        s->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (bind(s->lfd, (struct sockaddr *)&u, sizeof u) || listen(s->lfd, 64)) { perror("capture server (unix)"); exit(2); }
    } else {
        s->lfd = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons((uint16_t)port);
        if (bind(s->lfd, (struct sockaddr *)&a, sizeof a) || listen(s->lfd, 64)) { perror("capture server"); exit(2); }
        getsockname(s->lfd, (struct sockaddr *)&a, &al);
        s->port = ntohs(a.sin_port);
    }
    if (pipe(s->wake)) exit(2);
    if (!s->data) { s->data = calloc(1, 1); s->len = 0; }
    pthread_create(&s->thread, NULL, server_main, s);
}

static void server_stop(server_t *s) {
    if (write(s->wake[1], "x", 1) != 1) exit(2);
    pthread_join(s->thread, NULL);
    close(s->wake[0]);
    close(s->wake[1]);
    if (s->unix_path[0]) unlink(s->unix_path); /* nothing listens there now */
}

static void server_free(server_t *s) {
    free(s->data);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    memset(s, 0, sizeof *s);
}

static int wait_lines(server_t *s, int n, double timeout) {
    double end = now_s() + timeout;
    pthread_mutex_lock(&s->mu);
    while (s->lines < n && now_s() < end) {
        pthread_mutex_unlock(&s->mu);
        usleep(2000);
        pthread_mutex_lock(&s->mu);
    }
    int got = s->lines;
    pthread_mutex_unlock(&s->mu);
    return got;
}

/* The captured lines (NUL-terminated copies without the newline) and their number. */
static char **lines_of(server_t *s, int *n) {
    pthread_mutex_lock(&s->mu);
    char **out = calloc((size_t)s->lines + 1, sizeof *out);
    int k = 0;
    for (char *p = s->data, *nl; k < s->lines && (nl = strchr(p, '\n')); p = nl + 1) out[k++] = strndup(p, (size_t)(nl - p));
    *n = k;
    pthread_mutex_unlock(&s->mu);
    return out;
}

static void free_lines(char **l, int n) {
    for (int i = 0; i < n; i++) free(l[i]);
    free(l);
}

static int free_port(void) {
    server_t s = {0};
    int one = 1;
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    s.lfd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(s.lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(s.lfd, (struct sockaddr *)&a, sizeof a);
    getsockname(s.lfd, (struct sockaddr *)&a, &al);
    close(s.lfd);
    return ntohs(a.sin_port);
}

/* ---- checking lines ------------------------------------------------------------------------- */

/* Parses strictly (valid UTF-8 required); NULL if the line is not one JSON object. */
static json_object *parse(const char *line) {
    json_tokener *t = json_tokener_new();
    json_tokener_set_flags(t, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    json_object *o = json_tokener_parse_ex(t, line, (int)strlen(line));
    int ok = o && json_tokener_get_error(t) == json_tokener_success && t->char_offset == (int)strlen(line) &&
             json_object_is_type(o, json_type_object);
    json_tokener_free(t);
    if (!ok) { json_object_put(o); return NULL; }
    return o;
}

static const char *get(json_object *o, const char *path) { /* "data.message" */
    char key[64];
    const char *dot;
    json_object *v = o;
    while (v && (dot = strchr(path, '.'))) {
        snprintf(key, sizeof key, "%.*s", (int)(dot - path), path);
        if (!json_object_object_get_ex(v, key, &v)) return NULL;
        path = dot + 1;
    }
    return v && json_object_object_get_ex(v, path, &v) ? json_object_get_string(v) : NULL;
}

/* The line with its timestamp replaced by TS, after checking the timestamp's format. */
static char *masked(const char *line) {
    const char *k = "\"timestamp\":\"", *p = strstr(line, k);
    char *out = strdup(line);
    if (!p) return out;
    p += strlen(k);
    const char *fmt = "dddd-dd-ddTdd:dd:dd.dddZ\"";
    for (size_t i = 0; fmt[i]; i++)
        if (fmt[i] == 'd' ? !(p[i] >= '0' && p[i] <= '9') : p[i] != fmt[i]) return out;
    size_t head = (size_t)(p - line);
    memcpy(out + head, "TS", 2);
    memmove(out + head + 2, out + head + 24, strlen(out + head + 24) + 1);
    return out;
}

static void expect_lines(server_t *s, const char *const *want, int nwant, const char *what) {
    int n;
    wait_lines(s, nwant, 5);
    char **got = lines_of(s, &n);
    CHECK(n == nwant, "%s: %d lines, expected %d", what, n, nwant);
    for (int i = 0; i < n && i < nwant; i++) {
        char *m = masked(got[i]);
        json_object *o = parse(got[i]);
        CHECK(o != NULL, "%s: line %d is not strict JSON: %s", what, i, got[i]);
        CHECK(!strcmp(m, want[i]), "%s: line %d\n  got  %s\n  want %s", what, i, m, want[i]);
        json_object_put(o);
        free(m);
    }
    free_lines(got, n);
}

/* ---- tests ------------------------------------------------------------------------------------ */

static void test_exact_messages(void) {
    server_t s = {0};
    server_start(&s, 0, CAPTURE);
    mon_client *m = client("svc", s.port);
    const mon_kv ctx[] = {{"file", "a.csv"}, {"job_id", "job-2"}, {"skip", NULL}, {NULL, NULL}};
    const mon_kv tags[] = {{"table", "orders"}, {NULL, NULL}}, dup[] = {{"k", "1"}, {"k", "2"}, {NULL, NULL}}, none[] = {{NULL, NULL}};
    mon_set_context(m, "job_id", "job-1");
    CHECK(mon_log_event(m, "WARN", "hello", ctx) == 0, "log_event");
    mon_log_event(m, NULL, NULL, none);
    mon_log_metric(m, "rows", 10000, "count", tags);
    mon_log_metric(m, "ratio", 0.1, NULL, NULL);
    mon_log_metric(m, "big", 1e300, NULL, none);
    mon_log_metric(m, "neg", -2.5e-7, "s", dup);
    mon_log_progress(m, "job-1", 50, NULL);
    mon_log_resource(m, 12.5, 256, NAN, NAN);
    mon_log_resource(m, NAN, NAN, NAN, 3);
    mon_set_context_json(m, "n", " [1, 2.50, {\"a\" : null}] ");
    mon_set_context(m, "job_id", NULL);
    mon_log_event(m, "error", "after", NULL);
    mon_set_context(m, "n", NULL);
    mon_log_event(m, "critical", "bare", NULL);
    CHECK(mon_log_metric(m, "nan", NAN, NULL, NULL) == -1, "NaN metric refused");
    CHECK(mon_log_metric(m, "inf", -INFINITY, NULL, NULL) == -1, "Inf metric refused");
    CHECK(mon_log_progress(m, "j", INFINITY, NULL) == -1, "Inf percent refused");
    CHECK(mon_log_resource(m, 1, INFINITY, NAN, NAN) == -1, "Inf resource refused");
    CHECK(mon_set_context_json(m, "bad", "{\"a\":}") == -1, "invalid JSON context refused");
    CHECK(mon_flush(m, 5000) == 0, "flush");
    const char *want[] = {
        "{\"source\":\"svc\",\"type\":\"event\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-2\",\"file\":\"a.csv\"},\"data\":{\"level\":\"warning\",\"message\":\"hello\"}}",
        "{\"source\":\"svc\",\"type\":\"event\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"level\":\"info\",\"message\":\"\"}}",
        "{\"source\":\"svc\",\"type\":\"metric\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"name\":\"rows\",\"value\":10000,\"unit\":\"count\",\"tags\":{\"table\":\"orders\"}}}",
        "{\"source\":\"svc\",\"type\":\"metric\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"name\":\"ratio\",\"value\":0.1}}",
        "{\"source\":\"svc\",\"type\":\"metric\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"name\":\"big\",\"value\":1e+300}}",
        "{\"source\":\"svc\",\"type\":\"metric\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"name\":\"neg\",\"value\":-2.5e-07,\"unit\":\"s\",\"tags\":{\"k\":\"2\"}}}",
        "{\"source\":\"svc\",\"type\":\"progress\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"job_id\":\"job-1\",\"percent\":50,\"status\":\"running\"}}",
        "{\"source\":\"svc\",\"type\":\"resource\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"cpu_percent\":12.5,\"memory_mb\":256}}",
        "{\"source\":\"svc\",\"type\":\"resource\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\"},\"data\":{\"network_io_mb\":3}}",
        "{\"source\":\"svc\",\"type\":\"event\",\"timestamp\":\"TS\",\"context\":{\"n\":[1,2.50,{\"a\":null}]},\"data\":{\"level\":\"error\",\"message\":\"after\"}}",
        "{\"source\":\"svc\",\"type\":\"event\",\"timestamp\":\"TS\",\"data\":{\"level\":\"critical\",\"message\":\"bare\"}}",
    };
    expect_lines(&s, want, 11, "exact messages");
    mon_stats st;
    mon_statistics(m, &st);
    CHECK(st.sent == 11 && st.queued == 0 && st.dropped == 0 && st.errors >= 5, "stats sent=%llu errors=%llu",
          (unsigned long long)st.sent, (unsigned long long)st.errors);
    CHECK(mon_close(m, 2000) == 0, "close");
    server_stop(&s);
    server_free(&s);
}

static void test_escaping(void) {
    static const struct { const char *in, *out; } cases[] = {
        {"\"}\n{\"source\":\"forged\",\"type\":\"event\"}\n", "\"}\n{\"source\":\"forged\",\"type\":\"event\"}\n"},
        {"back\\slash \\\" \\n \r\n\t\b\f\v\x7f", "back\\slash \\\" \\n \r\n\t\b\f\v\x7f"},
        {"\x01\x02\x03\x1b[31m\x1f", "\x01\x02\x03\x1b[31m\x1f"},
        {"\xff", "\xef\xbf\xbd"},
        {"a\xc0\xafz", "a\xef\xbf\xbd\xef\xbf\xbdz"},
        {"end\xe2\x82", "end\xef\xbf\xbd"},
        {"\xe2\x82x", "\xef\xbf\xbdx"},
        {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {"\xf0\x9f\x98!", "\xef\xbf\xbd!"},
        {"\xf8\x88\x80\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xe2\x80\xa8", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xe2\x80\xa8"},
    };
    const int n = (int)(sizeof cases / sizeof cases[0]);
    server_t s = {0};
    server_start(&s, 0, CAPTURE);
    mon_client *m = client("evil\"\n\xff", s.port);
    for (int i = 0; i < n; i++) {
        const mon_kv ctx[] = {{cases[i].in, cases[i].in}, {NULL, NULL}};
        mon_log_event(m, cases[i].in, cases[i].in, ctx);
        mon_log_metric(m, cases[i].in, i, cases[i].in, ctx);
    }
    mon_flush(m, 5000);
    int got_n;
    wait_lines(&s, 2 * n, 5);
    char **got = lines_of(&s, &got_n);
    CHECK(got_n == 2 * n, "one line per call: %d lines for %d calls", got_n, 2 * n);
    for (int i = 0; i < got_n && i < 2 * n; i++) {
        const char *want = cases[i / 2].out;
        int raw_ok = 1;
        for (const unsigned char *p = (const unsigned char *)got[i]; *p; p++) raw_ok &= *p >= 0x20;
        CHECK(raw_ok, "line %d holds a raw control byte", i);
        json_object *o = parse(got[i]);
        if (!CHECK(o != NULL, "line %d is not strict UTF-8 JSON: %s", i, got[i])) continue;
        const char *src = get(o, "source"), *v1 = get(o, i % 2 ? "data.name" : "data.message");
        const char *v2 = get(o, i % 2 ? "data.unit" : "data.level");
        json_object *c, *tg;
        CHECK(src && !strcmp(src, "evil\"\n\xef\xbf\xbd"), "source decoded: %s", src ? src : "(none)");
        CHECK(v1 && !strcmp(v1, want) && v2 && !strcmp(v2, want), "case %d decoded wrongly: %s", i / 2, got[i]);
        json_object_object_get_ex(i % 2 ? json_object_object_get(o, "data") : o, i % 2 ? "tags" : "context", &c);
        CHECK(c && json_object_object_length(c) == 1 && json_object_object_get_ex(c, want, &tg) && !strcmp(json_object_get_string(tg), want) &&
              !strcmp(get(o, "type"), i % 2 ? "metric" : "event"), "case %d: context/tags or type wrong: %s", i / 2, got[i]);
        json_object_put(o);
    }
    free_lines(got, got_n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

static void check_sequence(server_t *s, const char *prefix, int from, int to, int skip_first, const char *what) {
    int n;
    char **got = lines_of(s, &n), want[64];
    int expected = to - from + skip_first, bad = -1;
    CHECK(n == expected, "%s: %d lines, expected %d", what, n, expected);
    for (int i = skip_first; i < n && bad < 0; i++) {
        json_object *o = parse(got[i]);
        const char *msg = o ? get(o, "data.message") : NULL;
        snprintf(want, sizeof want, "%s%d", prefix, from + i - skip_first);
        if (!msg || strcmp(msg, want)) bad = i;
        json_object_put(o);
    }
    CHECK(bad < 0, "%s: line %d out of order or broken: %s", what, bad, bad >= 0 && bad < n ? got[bad] : "");
    free_lines(got, n);
}

/* Whether a call that started at `start` took over 20 ms (the machine is shared: a single
 * preemption can take that long, so callers assert a handful at most, never zero). */
static int timed(double start, double *worst) {
    double took = now_s() - start;
    if (took > *worst) *worst = took;
    return took > 0.02;
}

static void test_down_then_up(void) {
    int port = free_port(), calls = 2000;
    mon_client *m = client("svc", port);
    double worst = 0, t0 = now_s();
    int slow = 0;
    for (int i = 0; i < calls; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "m-%d", i);
        double a = now_s();
        mon_log_event(m, "info", msg, NULL);
        slow += timed(a, &worst);
    }
    double total = now_s() - t0;
    CHECK(slow <= 3 && worst < 1.0 && total < 3.0, "sidecar down: calls must return at once (%d over 20 ms, worst %.3f ms, total %.3f s)",
          slow, worst * 1e3, total);
    printf("  sidecar down: %d calls, worst %.1f us, total %.1f ms\n", calls, worst * 1e6, total * 1e3);
    mon_stats st;
    mon_statistics(m, &st);
    CHECK(st.queued == (uint64_t)calls && st.sent == 0, "all queued: %llu", (unsigned long long)st.queued);
    server_t s = {0};
    server_start(&s, port, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "flush after the sidecar came up");
    wait_lines(&s, calls, 5);
    check_sequence(&s, "m-", 0, calls, 0, "down then up");

    /* restart: the client notices the closed connection and resends nothing twice */
    server_stop(&s);
    for (int i = calls; i < calls + 100; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "m-%d", i);
        mon_log_event(m, "info", msg, NULL);
    }
    usleep(50000);
    server_start(&s, port, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "flush after restart");
    wait_lines(&s, calls + 100, 5);
    check_sequence(&s, "m-", 0, calls + 100, 0, "restart");
    mon_statistics(m, &st);
    CHECK(st.reconnects >= 1 && st.sent == (uint64_t)calls + 100, "reconnects=%llu sent=%llu", (unsigned long long)st.reconnects, (unsigned long long)st.sent);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);

    /* close with nothing listening gives up at once */
    m = client("svc", free_port());
    mon_log_event(m, "info", "lost", NULL);
    t0 = now_s();
    CHECK(mon_close(m, 2000) == -1 && now_s() - t0 < 1.5, "close with the sidecar down: %.3f s", now_s() - t0);
}

static void test_overflow(void) {
    int port = free_port(), calls = MON_MAX_MESSAGES + 500;
    mon_client *m = client("svc", port);
    for (int i = 0; i < calls; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "o-%d", i);
        mon_log_event(m, "info", msg, NULL);
    }
    mon_stats st;
    mon_statistics(m, &st);
    CHECK(st.dropped == 500 && st.queued == MON_MAX_MESSAGES, "overflow: dropped %llu queued %llu", (unsigned long long)st.dropped, (unsigned long long)st.queued);
    server_t s = {0};
    server_start(&s, port, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "flush after overflow");
    wait_lines(&s, MON_MAX_MESSAGES + 1, 5);
    int n;
    char **got = lines_of(&s, &n);
    char *first = n ? masked(got[0]) : strdup("");
    CHECK(!strcmp(first, "{\"source\":\"svc\",\"type\":\"metric\",\"timestamp\":\"TS\",\"data\":{\"name\":\"sdk.dropped_messages\",\"value\":500,"
                         "\"unit\":\"count\",\"tags\":{\"reason\":\"buffer_full\"}}}"), "drop report first: %s", first);
    free(first);
    free_lines(got, n);
    check_sequence(&s, "o-", 500, calls, 1, "overflow keeps the newest, in order");
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);

    /* the byte bound, and messages over the sidecar's 1 MiB limit */
    m = client("svc", free_port());
    char *big = malloc(100001);
    memset(big, 'x', 100000);
    big[100000] = '\0';
    for (int i = 0; i < 100; i++) mon_log_event(m, "info", big, NULL);
    mon_statistics(m, &st);
    CHECK(st.queued <= MON_MAX_BYTES / 100000 && st.queued > 50 && st.dropped + st.queued == 100, "byte bound: queued %llu dropped %llu",
          (unsigned long long)st.queued, (unsigned long long)st.dropped);
    char *huge = malloc(MON_MAX_MESSAGE_BYTES + 1);
    memset(huge, '\n', MON_MAX_MESSAGE_BYTES); /* escaped, it doubles */
    huge[MON_MAX_MESSAGE_BYTES] = '\0';
    CHECK(mon_log_event(m, "info", huge + MON_MAX_MESSAGE_BYTES / 2, NULL) == -1, "a message over 1 MiB is dropped");
    free(big);
    free(huge);
    mon_close(m, 0);
}

#define THREADS 8
#define PER_THREAD 1000
typedef struct { mon_client *m; int id; } worker_t;
static void *worker(void *arg) {
    worker_t *w = arg;
    char msg[64], id[8];
    snprintf(id, sizeof id, "%d", w->id);
    const mon_kv ctx[] = {{"thread", id}, {NULL, NULL}};
    for (int i = 0; i < PER_THREAD; i++) {
        snprintf(msg, sizeof msg, "t%d-%d \"quoted\"\n", w->id, i);
        mon_log_event(w->m, "info", msg, ctx);
        if (i % 100 == 0) mon_log_metric(w->m, "tick", i, NULL, ctx);
    }
    return NULL;
}

static void test_threads(void) {
    server_t s = {0};
    server_start(&s, 0, CAPTURE);
    mon_client *m = client("svc", s.port);
    pthread_t t[THREADS];
    worker_t w[THREADS];
    for (int i = 0; i < THREADS; i++) { w[i] = (worker_t){m, i}; pthread_create(&t[i], NULL, worker, &w[i]); }
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    CHECK(mon_flush(m, 10000) == 0, "flush after threads");
    int total = THREADS * (PER_THREAD + PER_THREAD / 100), n, next[THREADS] = {0}, bad = 0;
    wait_lines(&s, total, 5);
    char **got = lines_of(&s, &n);
    CHECK(n == total, "threads: %d lines, expected %d", n, total);
    for (int i = 0; i < n; i++) {
        json_object *o = parse(got[i]);
        const char *msg = o ? get(o, "data.message") : NULL, *th = o ? get(o, msg ? "context.thread" : "data.tags.thread") : NULL;
        int tid, seq;
        if (!o || !th) { bad++; json_object_put(o); continue; }
        if (msg) {
            char want[64];
            if (sscanf(msg, "t%d-%d", &tid, &seq) != 2 || tid < 0 || tid >= THREADS || seq != next[tid] || atoi(th) != tid) bad++;
            else {
                snprintf(want, sizeof want, "t%d-%d \"quoted\"\n", tid, seq);
                bad += strcmp(want, msg) != 0;
                next[tid]++;
            }
        }
        json_object_put(o);
    }
    CHECK(bad == 0, "threads: %d broken, interleaved or out-of-order lines", bad);
    for (int i = 0; i < THREADS; i++) CHECK(next[i] == PER_THREAD, "thread %d: %d messages", i, next[i]);
    free_lines(got, n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

static int is_hex(const char *s, size_t n) {
    if (!s || strlen(s) != n) return 0;
    for (size_t i = 0; i < n; i++) if (!strchr("0123456789abcdef", s[i])) return 0;
    return 1;
}

static void *span_in_thread(void *arg) {
    char id[17];
    mon_start_span(arg, "worker", id);
    mon_end_span(arg, id, NULL);
    return NULL;
}

static void test_spans(void) {
    server_t s = {0};
    server_start(&s, 0, CAPTURE);
    mon_client *m = client("svc", s.port);
    char outer[17], inner[17], tp[80];
    mon_start_span(m, "outer", outer);
    mon_log_event(m, "info", "in outer", NULL);
    mon_start_span(m, "inner", inner);
    const char *env = getenv("TRACEPARENT");
    CHECK(env && strlen(env) == 55 && !strncmp(env + 36, inner, 16), "TRACEPARENT names the inner span: %s", env ? env : "(unset)");
    mon_log_event(m, "info", "in inner", NULL);
    pthread_t t;
    pthread_create(&t, NULL, span_in_thread, m);
    pthread_join(t, NULL);
    CHECK(mon_end_span(m, inner, "error") == 0, "end inner");
    snprintf(tp, sizeof tp, "00-%.32s-%s-01", env ? env + 3 : "", outer);
    CHECK(getenv("TRACEPARENT") && !strcmp(getenv("TRACEPARENT"), tp), "TRACEPARENT back to outer");
    CHECK(mon_end_span(m, outer, NULL) == 0, "end outer");
    CHECK(getenv("TRACEPARENT") == NULL, "TRACEPARENT unset after the last span");
    CHECK(mon_end_span(m, outer, NULL) == -1 && mon_end_span(m, "nope", NULL) == -1 && mon_end_span(m, NULL, NULL) == -1, "unknown span refused");
    mon_log_event(m, "info", "after", NULL);
    mon_flush(m, 5000);
    int n;
    wait_lines(&s, 9, 5);
    char **got = lines_of(&s, &n);
    json_object *o[9] = {0};
    CHECK(n == 9, "spans: %d lines", n);
    for (int i = 0; i < n && i < 9; i++) o[i] = parse(got[i]);
    if (n == 9 && o[0] && o[1] && o[2] && o[3] && o[4] && o[5] && o[6] && o[7] && o[8]) {
        const char *trace = get(o[0], "trace_id");
        CHECK(is_hex(trace, 32) && !strcmp(get(o[0], "span_id"), outer) && !get(o[0], "parent_span_id") &&
              !strcmp(get(o[0], "data.phase"), "start") && !strcmp(get(o[0], "data.name"), "outer"), "outer start: %s", got[0]);
        CHECK(!strcmp(get(o[1], "trace_id"), trace) && !strcmp(get(o[1], "span_id"), outer) && !get(o[1], "parent_span_id"), "event in outer: %s", got[1]);
        CHECK(!strcmp(get(o[2], "trace_id"), trace) && !strcmp(get(o[2], "span_id"), inner) && !strcmp(get(o[2], "parent_span_id"), outer), "inner start: %s", got[2]);
        CHECK(!strcmp(get(o[3], "span_id"), inner) && !get(o[3], "parent_span_id"), "event in inner: %s", got[3]);
        CHECK(is_hex(get(o[4], "trace_id"), 32) && strcmp(get(o[4], "trace_id"), trace) && !get(o[4], "parent_span_id") &&
              !strcmp(get(o[4], "span_id"), get(o[5], "span_id")) && !strcmp(get(o[5], "data.status"), "success"),
              "a span in another thread starts its own trace: %s", got[4]);
        CHECK(!strcmp(get(o[6], "span_id"), inner) && !strcmp(get(o[6], "parent_span_id"), outer) && !strcmp(get(o[6], "data.phase"), "end") &&
              !strcmp(get(o[6], "data.status"), "error") && get(o[6], "data.duration_ms"), "inner end: %s", got[6]);
        json_object *d;
        json_object_object_get_ex(json_object_object_get(o[6], "data"), "duration_ms", &d);
        CHECK(d && (json_object_is_type(d, json_type_double) || json_object_is_type(d, json_type_int)) && json_object_get_double(d) >= 0, "duration_ms is a number");
        CHECK(!strcmp(get(o[7], "span_id"), outer) && !strcmp(get(o[7], "data.status"), "success") && !get(o[7], "parent_span_id"), "outer end: %s", got[7]);
        CHECK(!get(o[8], "trace_id") && !get(o[8], "span_id"), "no trace outside spans: %s", got[8]);
    }
    for (int i = 0; i < 9; i++) json_object_put(o[i]);
    free_lines(got, n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

static void child_output(const char *cmd, char *out, size_t n) {
    FILE *p = popen(cmd, "r");
    out[0] = '\0';
    if (p) { if (!fgets(out, (int)n, p)) out[0] = '\0'; pclose(p); }
}

static void test_environment(void) {
    server_t s = {0};
    char sidecar[64], out[256] = "";
    server_start(&s, 0, CAPTURE);
    snprintf(sidecar, sizeof sidecar, "127.0.0.1:%d", s.port);
    setenv("MONITORING_SIDECAR", sidecar, 1);
    setenv("MONITORING_SOURCE", "from-env", 1);
    setenv("TRACEPARENT", " 00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01\n", 1);
    setenv("MONITORING_CONTEXT", " {\"job_id\" : \"job-12345\", \"n\": 5, \"nested\": {\"a\": [1, true, null, -0.5e3]}, "
                                 "\"s\": \"x\\ny\\u00e9\\ud83d\\ude00\\ud800\"} ", 1);
    mon_client *m = mon_init("ignored", "no-such-host.invalid", 1);
    mon_set_error_handler(m, count_error, NULL);
    mon_log_event(m, "info", "picked up", NULL);
    char id[17];
    mon_start_span(m, "child-root", id);
    char want_env[256];
    snprintf(want_env, sizeof want_env, "00-4bf92f3577b34da6a3ce929d0e0e4736-%s-01", id);
    child_output("printf %s \"$TRACEPARENT\"", out, sizeof out);
    CHECK(!strcmp(out, want_env), "a child process sees TRACEPARENT: %s", out);
    mon_set_context(m, "job_id", "job-9"); /* exported: a child process sees the new value */
    child_output("printf %s \"$MONITORING_CONTEXT\"", out, sizeof out);
    CHECK(!strcmp(out, "{\"job_id\":\"job-9\",\"n\":5,\"nested\":{\"a\":[1,true,null,-0.5e3]},\"s\":\"x\\ny\xc3\xa9\xf0\x9f\x98\x80\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"}"),
          "a child process sees MONITORING_CONTEXT: %s", out);
    mon_end_span(m, id, NULL);
    CHECK(getenv("TRACEPARENT") && !strcmp(getenv("TRACEPARENT"), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          "TRACEPARENT restored to the remote parent");
    mon_flush(m, 5000);
    const char *ctx = "{\"job_id\":\"job-12345\",\"n\":5,\"nested\":{\"a\":[1,true,null,-0.5e3]},\"s\":\"x\\ny\xc3\xa9\xf0\x9f\x98\x80\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"}";
    char w0[512], w1[512];
    snprintf(w0, sizeof w0, "{\"source\":\"from-env\",\"type\":\"event\",\"timestamp\":\"TS\",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\","
             "\"span_id\":\"00f067aa0ba902b7\",\"context\":%s,\"data\":{\"level\":\"info\",\"message\":\"picked up\"}}", ctx);
    snprintf(w1, sizeof w1, "{\"source\":\"from-env\",\"type\":\"span\",\"timestamp\":\"TS\",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\","
             "\"span_id\":\"%s\",\"parent_span_id\":\"00f067aa0ba902b7\",\"context\":%s,\"data\":{\"name\":\"child-root\",\"phase\":\"start\"}}", id, ctx);
    const char *want[] = {w0, w1};
    wait_lines(&s, 3, 5);
    int n;
    char **got = lines_of(&s, &n);
    CHECK(n == 3, "environment: %d lines", n);
    free_lines(got, n);
    pthread_mutex_lock(&s.mu);
    s.lines = 2; /* compare the first two exactly */
    pthread_mutex_unlock(&s.mu);
    expect_lines(&s, want, 2, "environment pickup");
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);

    setenv("MONITORING_CONTEXT", "[1]", 1);
    setenv("TRACEPARENT", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", 1);
    setenv("MONITORING_SIDECAR", "nonsense", 1);
    m = mon_init("svc", "127.0.0.1", 1);
    mon_set_error_handler(m, count_error, NULL);
    mon_start_span(m, "x", id);
    CHECK(getenv("TRACEPARENT") && strstr(getenv("TRACEPARENT"), id) && !strstr(getenv("TRACEPARENT"), "-00000000000000000000000000000000-"),
          "an invalid TRACEPARENT is ignored");
    mon_stats st;
    mon_statistics(m, &st);
    CHECK(st.errors >= 2, "bad MONITORING_CONTEXT and MONITORING_SIDECAR counted: %llu", (unsigned long long)st.errors);
    mon_close(m, 0);
    unsetenv("MONITORING_SIDECAR");
    unsetenv("MONITORING_SOURCE");
    unsetenv("TRACEPARENT");
    unsetenv("MONITORING_CONTEXT");
}

static void log_numbered(mon_client *m, const char *prefix, int from, int to) {
    for (int i = from; i < to; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "%s%d", prefix, i);
        mon_log_event(m, "info", msg, NULL);
    }
}

static void test_unix_socket(void) {
    char dir[] = "/tmp/mon-c-sdk-XXXXXX", where[160];
    server_t s = {0};
    if (!mkdtemp(dir)) { CHECK(0, "mkdtemp: errno %d", errno); return; }
    snprintf(s.unix_path, sizeof s.unix_path, "%s/sidecar.sock", dir);
    snprintf(where, sizeof where, "unix:%s", s.unix_path);
    /* no socket file yet: calls return at once, the sender retries with backoff */
    mon_client *m = mon_init("svc", where, 0);
    mon_set_error_handler(m, count_error, NULL);
    double worst = 0;
    int slow = 0, before = __atomic_load_n(&errors_seen, __ATOMIC_RELAXED);
    for (int i = 0; i < 500; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "u-%d", i);
        double a = now_s();
        mon_log_event(m, "info", msg, NULL);
        slow += timed(a, &worst);
    }
    CHECK(slow <= 3 && worst < 1.0, "unix, sidecar down: calls return at once (%d over 20 ms, worst %.3f ms)", slow, worst * 1e3);
    CHECK(mon_flush(m, 200) == -1, "nothing to connect to yet");
    CHECK(__atomic_load_n(&errors_seen, __ATOMIC_RELAXED) > before, "the failed connection is reported");
    server_start(&s, 0, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "flush once the socket listens");
    wait_lines(&s, 500, 5);
    check_sequence(&s, "u-", 0, 500, 0, "unix: down then up");
    /* restarted: the client reconnects to the new socket and sends nothing twice */
    server_stop(&s);
    log_numbered(m, "u-", 500, 550);
    usleep(50000);
    server_start(&s, 0, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "flush after the restart");
    wait_lines(&s, 550, 5);
    check_sequence(&s, "u-", 0, 550, 0, "unix: restart");
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);

    /* MONITORING_SIDECAR=unix:PATH wins over mon_init's host and port */
    snprintf(s.unix_path, sizeof s.unix_path, "%s/sidecar.sock", dir);
    server_start(&s, 0, CAPTURE);
    setenv("MONITORING_SIDECAR", where, 1);
    m = mon_init("svc", "no-such-host.invalid", 1);
    mon_set_error_handler(m, count_error, NULL);
    log_numbered(m, "e-", 0, 3);
    CHECK(mon_close(m, 5000) == 0, "delivered over MONITORING_SIDECAR's socket");
    wait_lines(&s, 3, 5);
    check_sequence(&s, "e-", 0, 3, 0, "unix from MONITORING_SIDECAR");
    unsetenv("MONITORING_SIDECAR");
    server_stop(&s);
    server_free(&s);
    rmdir(dir);
}

static void test_token(void) {
    const char *auth = "{\"auth\":\"tok\\\"en\\\\\"}"; /* tok"en\ escaped */
    server_t s = {0};
    server_start(&s, 0, CAPTURE);
    int port = s.port;
    mon_client *m = client("svc", port);
    CHECK(mon_set_token(m, "tok\"en\\") == 0, "token set");
    CHECK(mon_set_token(NULL, "x") == -1, "a NULL client is refused");
    log_numbered(m, "t-", 0, 2);
    CHECK(mon_flush(m, 5000) == 0, "first connection");
    wait_lines(&s, 3, 5);
    server_stop(&s); /* the sidecar restarts: the next connection authenticates again */
    log_numbered(m, "t-", 2, 4);
    usleep(50000);
    server_start(&s, port, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "second connection");
    mon_close(m, 2000);
    wait_lines(&s, 6, 5);
    int n;
    char **got = lines_of(&s, &n);
    CHECK(n == 6, "token: %d lines, expected 6 (two auth lines, four messages)", n);
    for (int i = 0; i < n; i++) {
        json_object *o = parse(got[i]);
        CHECK(o != NULL, "token: line %d is not strict JSON: %s", i, got[i]);
        if (i == 0 || i == 3) CHECK(!strcmp(got[i], auth), "line %d is the auth line: %s", i, got[i]);
        else CHECK(o && get(o, "data.message") && !strncmp(get(o, "data.message"), "t-", 2), "line %d is a message: %s", i, got[i]);
        json_object_put(o);
    }
    free_lines(got, n);
    server_stop(&s);
    server_free(&s);

    /* MONITORING_SIDECAR_TOKEN wins over mon_set_token; without a token, no auth line */
    server_start(&s, 0, CAPTURE);
    setenv("MONITORING_SIDECAR_TOKEN", "from-env", 1);
    m = client("svc", s.port);
    mon_set_token(m, "ignored");
    log_numbered(m, "v-", 0, 1);
    mon_close(m, 5000);
    unsetenv("MONITORING_SIDECAR_TOKEN");
    m = client("svc", s.port);
    mon_set_token(m, "dropped again");
    CHECK(mon_set_token(m, NULL) == 0, "token removed");
    log_numbered(m, "w-", 0, 1);
    mon_close(m, 5000);
    wait_lines(&s, 3, 5);
    got = lines_of(&s, &n);
    CHECK(n == 3 && !strcmp(got[0], "{\"auth\":\"from-env\"}") && strstr(got[1], "\"v-0\"") && strstr(got[2], "\"w-0\""),
          "the environment's token, then none: %d lines, first %s", n, n ? got[0] : "");
    free_lines(got, n);
    server_stop(&s);
    server_free(&s);
}

static void test_fork(void) {
    int port = free_port();
    mon_client *m = client("svc", port);
    mon_log_event(m, "info", "parent-before-fork", NULL); /* queued: nothing listens yet */
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        mon_log_event(m, "info", "child", NULL);
        int flushed = mon_flush(m, 8000);
        _exit(mon_close(m, 2000) == 0 && flushed == 0 ? 0 : 3);
    }
    server_t s = {0};
    server_start(&s, port, CAPTURE);
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child flushed its own message (status %d)", status);
    CHECK(mon_flush(m, 10000) == 0, "parent flush");
    wait_lines(&s, 2, 5);
    int n, child = 0, parent = 0;
    char **got = lines_of(&s, &n);
    for (int i = 0; i < n; i++) {
        child += strstr(got[i], "\"message\":\"child\"") != NULL;
        parent += strstr(got[i], "\"message\":\"parent-before-fork\"") != NULL;
    }
    CHECK(n == 2 && child == 1 && parent == 1, "fork: %d lines, child %d, parent %d (the child must not resend the parent's queue)", n, child, parent);
    free_lines(got, n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

static void test_bad_servers(void) {
    /* a sidecar that resets every connection: no SIGPIPE, no crash */
    server_t s = {0};
    server_start(&s, 0, RESET);
    mon_client *m = client("svc", s.port);
    mon_stats st;
    /* A write can land before the server's reset: keep writing until one meets it (bounded). */
    for (int i = 0; i < 200; i++) {
        for (int j = 0; j < 50; j++) mon_log_event(m, "info", "into a reset", NULL);
        mon_flush(m, 20);
        mon_statistics(m, &st);
        if (i >= 20 && st.errors > 0) break;
    }
    CHECK(st.errors > 0, "resets were counted");
    mon_close(m, 100);
    server_stop(&s);
    server_free(&s);

    /* a sidecar that accepts but never reads: calls stay fast, close is bounded */
    server_start(&s, 0, NO_READ);
    m = client("svc", s.port);
    char msg[1024];
    memset(msg, 'y', sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    double worst = 0;
    int slow = 0;
    for (int i = 0; i < 15000; i++) {
        double a = now_s();
        mon_log_event(m, "info", msg, NULL);
        slow += timed(a, &worst);
    }
    mon_statistics(m, &st);
    /* A call that blocked on the full socket would never return; calls over 20 ms are the
     * scheduler's (a loaded 2-core machine, ASan), so a few are allowed. */
    CHECK(slow <= 20 && worst < 0.5 && st.dropped > 0, "server not reading: %d calls over 20 ms, worst %.3f ms, dropped %llu",
          slow, worst * 1e3, (unsigned long long)st.dropped);
    double t0 = now_s();
    CHECK(mon_close(m, 300) == -1 && now_s() - t0 < 2.0, "close is bounded: %.3f s", now_s() - t0);
    usleep(600000); /* the sender thread notices within 250 ms and frees the client */
    server_stop(&s);
    server_free(&s);
}

static void test_null_safety(void) {
    mon_stats st;
    char id[17];
    CHECK(mon_log_event(NULL, "info", "x", NULL) == -1 && mon_log_metric(NULL, "x", 1, NULL, NULL) == -1 &&
          mon_log_progress(NULL, "j", 1, NULL) == -1 && mon_log_resource(NULL, 1, 1, 1, 1) == -1 &&
          mon_start_span(NULL, "x", id) == -1 && strlen(id) == 16 && mon_end_span(NULL, id, NULL) == -1 &&
          mon_set_context(NULL, "k", "v") == -1 && mon_flush(NULL, 0) == -1 && mon_close(NULL, 0) == -1, "NULL client");
    mon_statistics(NULL, &st);
    CHECK(st.sent == 0, "NULL statistics");
    mon_client *m = mon_init(NULL, NULL, 0);
    mon_set_error_handler(m, count_error, NULL);
    CHECK(m != NULL && mon_set_context(m, NULL, "v") == -1 && mon_start_span(m, NULL, id) == 0 && mon_end_span(m, id, NULL) == 0, "NULL arguments");
    mon_close(m, 0);
}

/* ---- context and spans ---------------------------------------------------------------------- */

static int env_is(const char *want) { /* MONITORING_CONTEXT as a child would see it; NULL: unset */
    const char *v = getenv("MONITORING_CONTEXT");
    return want ? v && !strcmp(v, want) : !v;
}

static const char *env_text(void) {
    const char *v = getenv("MONITORING_CONTEXT");
    return v ? v : "(unset)";
}

static void *scoped_worker(void *arg) { /* a span in another thread while the root span is open */
    char id[17];
    mon_start_span(arg, "worker", id);
    mon_set_context(arg, "worker", "1");
    mon_end_span(arg, id, NULL);
    return NULL;
}

/* Context set while a root span (one started with no span of the client open) is open is
 * undone when it ends, after its end message; nested spans do not scope it. */
static void test_context_scope(void) {
    server_t s = {0};
    server_start(&s, 0, CAPTURE);
    mon_client *m = client("svc", s.port);
    char span[17], outer[17], inner[17], child[17];
    mon_stats before, after;

    /* the seed's queue-service loop over two jobs */
    mon_set_context(m, "service", "qs");
    for (int j = 1; j <= 2; j++) {
        char job[16];
        snprintf(job, sizeof job, "job-%d", j);
        mon_start_span(m, "process_job", span);
        mon_set_context(m, "job_id", job);
        mon_log_progress(m, job, 100, "completed");
        mon_end_span(m, span, NULL);
        CHECK(env_is("{\"service\":\"qs\"}"), "job %d: MONITORING_CONTEXT after its span: %s", j, env_text());
        mon_log_metric(m, "jobs_processed", 1, "count", NULL);
    }

    /* keys added, changed and removed inside, also inside a nested span, come back at the root's end */
    mon_start_span(m, "outer", outer);
    mon_set_context(m, "tenant", "acme");
    mon_set_context(m, "service", NULL);
    mon_set_context_json(m, "n", "1");
    mon_start_span(m, "load", inner);
    mon_set_context(m, "stage", "load");
    mon_end_span(m, inner, NULL);
    CHECK(env_is("{\"tenant\":\"acme\",\"n\":1,\"stage\":\"load\"}"), "a nested span does not scope context: %s", env_text());
    mon_log_event(m, "info", "after the nested span", NULL);
    mon_end_span(m, outer, NULL);
    CHECK(env_is("{\"service\":\"qs\"}"), "after the root span: %s", env_text());
    mon_log_event(m, "info", "after the root span", NULL);

    /* out of order: the restore happens when the root ends; then, with no root open, context lasts */
    mon_start_span(m, "root", outer);
    mon_start_span(m, "child", child);
    mon_set_context(m, "job_id", "job-3");
    mon_end_span(m, outer, NULL);
    CHECK(env_is("{\"service\":\"qs\"}"), "restored when the root ends before its child: %s", env_text());
    mon_log_event(m, "info", "child still open", NULL);
    mon_set_context(m, "step", "x");
    mon_end_span(m, child, NULL);
    CHECK(env_is("{\"service\":\"qs\",\"step\":\"x\"}"), "set after the root ended: lasts: %s", env_text());
    mon_log_event(m, "info", "step stays", NULL);
    mon_set_context(m, "step", NULL);

    /* from an empty context, with a span of another thread inside: MONITORING_CONTEXT unset again */
    mon_set_context(m, "service", NULL);
    CHECK(env_is(NULL), "empty context: unset: %s", env_text());
    mon_start_span(m, "root", outer);
    pthread_t t;
    pthread_create(&t, NULL, scoped_worker, m);
    pthread_join(t, NULL);
    CHECK(env_is("{\"worker\":\"1\"}"), "another thread's span is not a root: %s", env_text());
    mon_end_span(m, outer, NULL);
    CHECK(env_is(NULL), "back to empty: %s", env_text());
    mon_log_event(m, "info", "empty again", NULL);

    /* no memory to keep the start's context: set_context is refused and nothing changes */
    mon_set_context(m, "k", "v");
    mon_set_context(m, "l", "w");
    mon_start_span(m, "root", outer);
    mon_statistics(m, &before);
    for (int fail = 1; fail <= 5; fail++) { /* the copy's array, then each entry's key and value */
        malloc_fail_in = fail;
        CHECK(mon_set_context(m, "job_id", "job-5") == -1 && malloc_fail_in == 0, "out of memory at allocation %d: refused", fail);
        malloc_fail_in = 0;
        CHECK(env_is("{\"k\":\"v\",\"l\":\"w\"}"), "out of memory at allocation %d: context kept: %s", fail, env_text());
    }
    mon_statistics(m, &after);
    CHECK(after.errors == before.errors + 5, "refusals counted: %llu -> %llu", (unsigned long long)before.errors, (unsigned long long)after.errors);
    mon_log_event(m, "info", "after failed sets", NULL);
    CHECK(mon_set_context(m, "job_id", "job-5") == 0, "set_context with memory again");
    mon_end_span(m, outer, NULL);
    CHECK(env_is("{\"k\":\"v\",\"l\":\"w\"}"), "restored after the failures: %s", env_text());
    mon_log_event(m, "info", "no job", NULL);
    mon_set_context(m, "k", NULL);
    mon_set_context(m, "l", NULL);
    CHECK(mon_flush(m, 5000) == 0, "flush");

    static const struct { const char *what, *ctx; } want[] = { /* what: span name:phase, event message, progress job */
        {"process_job:start", "{\"service\":\"qs\"}"},
        {"job-1", "{\"service\":\"qs\",\"job_id\":\"job-1\"}"},
        {"process_job:end", "{\"service\":\"qs\",\"job_id\":\"job-1\"}"},
        {"jobs_processed", "{\"service\":\"qs\"}"},
        {"process_job:start", "{\"service\":\"qs\"}"},
        {"job-2", "{\"service\":\"qs\",\"job_id\":\"job-2\"}"},
        {"process_job:end", "{\"service\":\"qs\",\"job_id\":\"job-2\"}"},
        {"jobs_processed", "{\"service\":\"qs\"}"},
        {"outer:start", "{\"service\":\"qs\"}"},
        {"load:start", "{\"tenant\":\"acme\",\"n\":1}"},
        {"load:end", "{\"tenant\":\"acme\",\"n\":1,\"stage\":\"load\"}"},
        {"after the nested span", "{\"tenant\":\"acme\",\"n\":1,\"stage\":\"load\"}"},
        {"outer:end", "{\"tenant\":\"acme\",\"n\":1,\"stage\":\"load\"}"},
        {"after the root span", "{\"service\":\"qs\"}"},
        {"root:start", "{\"service\":\"qs\"}"},
        {"child:start", "{\"service\":\"qs\"}"},
        {"root:end", "{\"service\":\"qs\",\"job_id\":\"job-3\"}"},
        {"child still open", "{\"service\":\"qs\"}"},
        {"child:end", "{\"service\":\"qs\",\"step\":\"x\"}"},
        {"step stays", "{\"service\":\"qs\",\"step\":\"x\"}"},
        {"root:start", ""},
        {"worker:start", ""},
        {"worker:end", "{\"worker\":\"1\"}"},
        {"root:end", "{\"worker\":\"1\"}"},
        {"empty again", ""},
        {"root:start", "{\"k\":\"v\",\"l\":\"w\"}"},
        {"after failed sets", "{\"k\":\"v\",\"l\":\"w\"}"},
        {"root:end", "{\"k\":\"v\",\"l\":\"w\",\"job_id\":\"job-5\"}"},
        {"no job", "{\"k\":\"v\",\"l\":\"w\"}"},
    };
    const int nwant = (int)(sizeof want / sizeof want[0]);
    int n;
    wait_lines(&s, nwant, 5);
    char **got = lines_of(&s, &n);
    json_object *o[sizeof want / sizeof want[0]] = {0};
    CHECK(n == nwant, "context scope: %d lines, expected %d", n, nwant);
    for (int i = 0; i < n && i < nwant; i++) {
        char what[64];
        json_object *c = NULL;
        o[i] = parse(got[i]);
        const char *type = o[i] ? get(o[i], "type") : "", *name = o[i] ? get(o[i], "data.name") : NULL;
        if (!strcmp(type, "span")) snprintf(what, sizeof what, "%s:%s", name, get(o[i], "data.phase"));
        else snprintf(what, sizeof what, "%s", !strcmp(type, "event") ? get(o[i], "data.message") : !strcmp(type, "progress") ? get(o[i], "data.job_id") : name ? name : "");
        const char *ctx = o[i] && json_object_object_get_ex(o[i], "context", &c) ? json_object_to_json_string_ext(c, JSON_C_TO_STRING_PLAIN) : "";
        CHECK(!strcmp(what, want[i].what) && !strcmp(ctx, want[i].ctx), "context scope: line %d\n  got  %s %s\n  want %s %s",
              i, what, ctx, want[i].what, want[i].ctx);
    }
    if (n == nwant) { /* each job its own trace; nothing after a span in one; the child's event in the child */
        const char *t1 = get(o[0], "trace_id"), *t2 = get(o[4], "trace_id");
        CHECK(t1 && t2 && strcmp(t1, t2) && !strcmp(get(o[2], "trace_id"), t1) && !strcmp(get(o[5], "trace_id"), t2) &&
              !get(o[3], "trace_id") && !get(o[7], "trace_id"), "two jobs, two traces: %s / %s", got[0], got[4]);
        CHECK(!strcmp(get(o[17], "span_id"), child), "the child's event: %s", got[17]);
    }
    for (int i = 0; i < nwant; i++) json_object_put(o[i]);
    free_lines(got, n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

/* ---- the ring ------------------------------------------------------------------------------- */

/* The queued messages as one string, straight from the ring (no sender running). */
static char *queue_text(mon_client *m) {
    size_t n = (size_t)m->qbytes, off = (size_t)(m->qh % m->cap), room = (size_t)m->cap - off, first = n < room ? n : room;
    char *out = malloc(n + 1);
    memcpy(out, m->ring + off, first);
    memcpy(out + first, m->ring, n - first);
    out[n] = '\0';
    return out;
}

static void line_of(char *out, char c, size_t len) { /* len bytes: c repeated, then a newline */
    memset(out, c, len - 1);
    out[len - 1] = '\n';
    out[len] = '\0';
}

static int push_line(mon_client *m, char c, size_t len) {
    char msg[1024];
    int dropped_now = 0;
    line_of(msg, c, len);
    return push(m, msg, len / 3, msg + len / 3, len - len / 3, &dropped_now);
}

static int queue_is(mon_client *m, const char *want, const char *what) {
    char *q = queue_text(m);
    int ok = CHECK(!strcmp(q, want), "%s: queue\n  got  %s\n  want %s", what, q, want);
    free(q);
    return ok;
}

/* push() against a model of the bounds, with messages of random lengths: the ring wraps at
 * every offset, messages straddle its end, the oldest are dropped across the wrap. */
static void test_ring_wrap_and_drop(void) {
    const ring_cfg cfg = {256, 4, 200};
    mon_client *m = create("u", "127.0.0.1", 1, &cfg); /* never started: push() is called directly */
    char model[8][160], msg[160], want[1024];
    int nmodel = 0, straddles = 0, mismatch = -1;
    size_t model_bytes = 0;
    uint64_t dropped = 0;
    unsigned rng = 12345;
    for (int i = 0; i < 3000 && mismatch < 0; i++) {
        rng = rng * 1103515245u + 12345u;
        size_t len = 1 + (rng >> 16) % 150, split = (rng >> 8) % (len + 1);
        int dropped_now = 0;
        line_of(msg, (char)('A' + i % 26), len);
        CHECK(push(m, msg, split, msg + split, len - split, &dropped_now) == 0, "push %d", i);
        straddles += m->wr % m->cap != 0 && m->wr % m->cap < len;
        while (nmodel && (nmodel >= 4 || model_bytes + len > 200)) {
            model_bytes -= strlen(model[0]);
            memmove(model[0], model[1], sizeof model - sizeof model[0]);
            nmodel--;
            dropped++;
        }
        memcpy(model[nmodel++], msg, len + 1);
        model_bytes += len;
        want[0] = '\0';
        for (int k = 0; k < nmodel; k++) strcat(want, model[k]);
        char *q = queue_text(m);
        if (strcmp(q, want) || queued(m) != (uint64_t)nmodel || m->qbytes != model_bytes) mismatch = i;
        free(q);
    }
    CHECK(mismatch < 0, "the queue differs from the model after push %d", mismatch);
    CHECK(straddles > 50 && m->dropped == dropped && m->unreported == dropped, "straddles %d, dropped %llu (model %llu)",
          straddles, (unsigned long long)m->dropped, (unsigned long long)dropped);
    mon_close(m, 0);
}

/* The batch being written is pinned: what did not get out goes back to the front, unless newer
 * messages were dropped meanwhile; a message that does not fit beside it is dropped. */
static void test_ring_pinned(void) {
    char a[64], b[64], c[64], d[64], e[128], f[128], g[128], want[1024];
    const ring_cfg cfg = {1024, 8, 200};
    mon_client *m = create("u", "127.0.0.1", 1, &cfg);
    line_of(a, 'a', 50); line_of(b, 'b', 50); line_of(c, 'c', 50); line_of(d, 'd', 40);
    line_of(e, 'e', 90); line_of(f, 'f', 90); line_of(g, 'g', 90);
    push_line(m, 'a', 50); push_line(m, 'b', 50); push_line(m, 'c', 50);
    take(m);
    CHECK(m->pinned && m->fn == 3 && m->fbytes == 150 && queued(m) == 0 && m->in_flight == 3, "take pins the whole queue");
    push_line(m, 'd', 40);
    give_back(m, 1, 50); /* a got out */
    snprintf(want, sizeof want, "%s%s%s", b, c, d);
    queue_is(m, want, "b and c back at the front");
    CHECK(!m->pinned && m->dropped == 0 && m->in_flight == 0, "unpinned, nothing dropped");

    take(m); /* b c d */
    push_line(m, 'e', 90); push_line(m, 'f', 90);
    push_line(m, 'g', 90); /* over 200 bytes: e dropped */
    give_back(m, 0, 0);    /* nothing got out: b c d are older than e, so dropped too */
    snprintf(want, sizeof want, "%s%s", f, g);
    queue_is(m, want, "drops during the write");
    CHECK(m->dropped == 4 && m->unreported == 4, "dropped %llu", (unsigned long long)m->dropped);
    mon_close(m, 0);

    const ring_cfg small = {256, 8, 250}; /* pinned space blocks a message that would fit alone */
    m = create("u", "127.0.0.1", 1, &small);
    push_line(m, 'h', 200);
    take(m);
    CHECK(push_line(m, 'i', 100) == -1 && m->dropped == 1 && queued(m) == 0, "no room beside the pinned batch: dropped");
    give_back(m, 1, 200);
    CHECK(m->wr == 0 && push_line(m, 'i', 100) == 0 && m->wr == 100, "an empty ring starts again at 0");
    mon_close(m, 0);

    const ring_cfg three = {1024, 3, 1000}; /* given back over the count bound: the oldest go */
    m = create("u", "127.0.0.1", 1, &three);
    push_line(m, 'a', 50); push_line(m, 'b', 50); push_line(m, 'c', 50);
    take(m);
    push_line(m, 'd', 40); push_line(m, 'e', 40); push_line(m, 'f', 40);
    give_back(m, 1, 50);
    line_of(d, 'd', 40); line_of(e, 'e', 40); line_of(f, 'f', 40);
    snprintf(want, sizeof want, "%s%s%s", d, e, f);
    queue_is(m, want, "given back over the bound");
    CHECK(m->dropped == 2, "dropped %llu", (unsigned long long)m->dropped);
    mon_close(m, 0);
}

/* Message k of writer `tag`: its length varies with k, and it holds bytes to escape. */
static void ring_msg(char *out, size_t n, int tag, int k, int base) {
    int len = snprintf(out, n, "r%d-%d \"q\"\n\xc3\xa9\xff ", tag, k);
    for (int i = 0, pad = base + (k * 37) % 151; i < pad && len + 1 < (int)n; i++) out[len++] = (char)('a' + (k + i) % 26);
    out[len] = '\0';
}

typedef struct { int data, reports, bad, order; long long reported; int last[16], count[16]; } ring_seen_t;

/* Every line strict JSON; every message exactly as sent (invalid UTF-8 replaced), and each
 * writer's in increasing order. */
static void ring_check(server_t *s, int base, ring_seen_t *r) {
    int n;
    char **got = lines_of(s, &n), want[2048], fixed[2048];
    memset(r, 0, sizeof *r);
    for (int i = 0; i < 16; i++) r->last[i] = -1;
    for (int i = 0; i < n; i++) {
        json_object *o = parse(got[i]);
        const char *msg = o ? get(o, "data.message") : NULL, *name = o ? get(o, "data.name") : NULL;
        int tag, k;
        if (o && name && !strcmp(name, "sdk.dropped_messages")) { r->reports++; r->reported += atoll(get(o, "data.value")); }
        else if (!msg || sscanf(msg, "r%d-%d", &tag, &k) != 2 || tag < 0 || tag >= 16) r->bad++;
        else {
            ring_msg(want, sizeof want, tag, k, base);
            char *p = strstr(want, "\xff");
            snprintf(fixed, sizeof fixed, "%.*s\xef\xbf\xbd%s", (int)(p - want), want, p + 1);
            r->bad += strcmp(msg, fixed) != 0;
            r->order += k <= r->last[tag];
            r->last[tag] = k;
            r->count[tag]++;
            r->data++;
        }
        json_object_put(o);
    }
    free_lines(got, n);
}

/* Sidecar down: the ring wraps and drops the oldest; then up: the drop report, then exactly
 * the newest messages, whole and in order. */
static void test_ring_delivery(void) {
    const ring_cfg cfg = {4096, 1000, 4096};
    int port = free_port(), calls = 300, straddles = 0;
    char msg[512];
    mon_client *m = create("svc", "127.0.0.1", port, &cfg);
    mon_set_error_handler(m, count_error, NULL);
    for (int k = 0; k < calls; k++) {
        ring_msg(msg, sizeof msg, 0, k, 0);
        lock(m);
        uint64_t before = m->wr % m->cap;
        unlock(m);
        mon_log_event(m, "info", msg, NULL);
        lock(m);
        straddles += m->wr % m->cap != 0 && m->wr % m->cap < before;
        unlock(m);
    }
    mon_stats st;
    mon_statistics(m, &st);
    CHECK(straddles > 10 && st.queued > 5 && st.dropped + st.queued == (uint64_t)calls, "wrapped %d times: queued %llu dropped %llu",
          straddles, (unsigned long long)st.queued, (unsigned long long)st.dropped);
    server_t s = {0};
    server_start(&s, port, CAPTURE);
    CHECK(mon_flush(m, 10000) == 0, "flush");
    wait_lines(&s, (int)st.queued + 1, 5);
    ring_seen_t r;
    ring_check(&s, 0, &r);
    CHECK(r.bad == 0 && r.order == 0 && r.reports == 1 && r.reported == (long long)st.dropped && r.data == (int)st.queued &&
          r.last[0] == calls - 1, "delivery: %d data, %d broken, %d out of order, %d reports of %lld, last %d",
          r.data, r.bad, r.order, r.reports, r.reported, r.last[0]);
    int n;
    char **got = lines_of(&s, &n);
    CHECK(n > 0 && strstr(got[0], "sdk.dropped_messages"), "the drop report comes first");
    free_lines(got, n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

/* A message longer than the whole ring is dropped and counted; one exactly as long fits. */
static void test_ring_too_large(void) {
    const ring_cfg cfg = {512, 100, 512};
    server_t s = {0};
    char msg[1024];
    int n;
    server_start(&s, 0, CAPTURE);
    mon_client *m = create("svc", "127.0.0.1", s.port, &cfg);
    mon_set_error_handler(m, count_error, NULL);
    mon_log_event(m, "info", "x", NULL);
    mon_flush(m, 5000);
    wait_lines(&s, 1, 5);
    char **got = lines_of(&s, &n);
    size_t overhead = n == 1 ? strlen(got[0]) : 100; /* the line and its newline, less the "x" */
    free_lines(got, n);
    memset(msg, 'y', sizeof msg);
    msg[512 - overhead] = '\0';
    CHECK(mon_log_event(m, "info", msg, NULL) == 0 && mon_flush(m, 5000) == 0, "a message of exactly the ring's size is queued");
    memset(msg, 'z', sizeof msg);
    msg[513 - overhead] = '\0';
    mon_stats st;
    CHECK(mon_log_event(m, "info", msg, NULL) == -1, "a message over the ring's size is refused");
    CHECK(mon_log_event(m, "info", "after", NULL) == 0 && mon_flush(m, 5000) == 0, "later messages go on");
    mon_statistics(m, &st);
    CHECK(st.dropped == 1 && st.sent == 3, "dropped %llu sent %llu", (unsigned long long)st.dropped, (unsigned long long)st.sent);
    wait_lines(&s, 3, 5);
    got = lines_of(&s, &n);
    CHECK(n == 3 && strlen(got[1]) + 1 == 512 && strstr(got[1], "yyy\"}}") && strstr(got[2], "\"after\""), "lines: %d", n);
    free_lines(got, n);
    mon_close(m, 2000);
    server_stop(&s);
    server_free(&s);
}

#define RING_THREADS 4
#define RING_PER_THREAD 3000
static mon_client *ring_client;
static void *ring_worker(void *arg) {
    int tag = (int)(intptr_t)arg;
    char msg[512];
    for (int k = 0; k < RING_PER_THREAD; k++) {
        ring_msg(msg, sizeof msg, tag, k, 0);
        mon_log_event(ring_client, "info", msg, NULL);
    }
    return NULL;
}

/* Several threads into a small ring that the sender drains while they write: every message
 * that arrives is whole, none interleaved, each thread's in order; the counts add up. */
static void test_ring_threads(void) {
    const ring_cfg cfg = {16384, 1000, 12000};
    server_t s = {0};
    pthread_t t[RING_THREADS];
    server_start(&s, 0, CAPTURE);
    ring_client = create("svc", "127.0.0.1", s.port, &cfg);
    mon_set_error_handler(ring_client, count_error, NULL);
    for (int i = 0; i < RING_THREADS; i++) pthread_create(&t[i], NULL, ring_worker, (void *)(intptr_t)i);
    for (int i = 0; i < RING_THREADS; i++) pthread_join(t[i], NULL);
    mon_log_event(ring_client, "info", "r15-0", NULL); /* carries the report of the last drops */
    CHECK(mon_flush(ring_client, 10000) == 0, "flush");
    mon_stats st;
    mon_statistics(ring_client, &st);
    wait_lines(&s, (int)st.sent, 5);
    usleep(50000);
    ring_seen_t r;
    ring_check(&s, 0, &r);
    int total = RING_THREADS * RING_PER_THREAD;
    r.bad -= r.count[15] == 1 && r.last[15] == 0; /* the extra message is not in ring_msg's form */
    r.data -= r.count[15];
    CHECK(r.bad == 0 && r.order == 0, "threads: %d broken or interleaved, %d out of order", r.bad, r.order);
    CHECK((uint64_t)r.data + 1 == st.sent && (uint64_t)r.data + st.dropped == (uint64_t)total && r.reported == (long long)st.dropped,
          "threads: %d arrived, sent %llu, dropped %llu, reported %lld", r.data, (unsigned long long)st.sent,
          (unsigned long long)st.dropped, r.reported);
    printf("  small ring, %d threads: %d of %d arrived, %llu dropped\n", RING_THREADS, r.data, total, (unsigned long long)st.dropped);
    mon_close(ring_client, 2000);
    server_stop(&s);
    server_free(&s);
}

/* Waits until the sender holds a message that a full socket cut in the middle; returns a copy. */
static char *wait_for_cut(mon_client *m) {
    char *cut = NULL;
    for (double end = now_s() + 5; !cut && now_s() < end; usleep(5000)) {
        lock(m);
        if (m->rest.len && m->rest_off) cut = strndup(m->rest.p, m->rest.len - 1);
        unlock(m);
    }
    return cut;
}

static int count_lines_equal(server_t *s, const char *line) {
    int n, c = 0;
    char **got = lines_of(s, &n);
    for (int i = 0; i < n; i++) c += !strcmp(got[i], line);
    free_lines(got, n);
    return c;
}

/* A sidecar that stops reading cuts a write in the middle of a message: its rest is sent when
 * the sidecar reads again (same connection), or the whole message after it restarts. */
static void test_ring_stalled(void) {
    for (int restart = 0; restart < 2; restart++) {
        server_t s = {0};
        int calls = 6000; /* 6.6 MB: more than the socket buffers hold (4 MB here), less than the queue */
        char msg[2048];
        server_start(&s, 0, PAUSED);
        mon_client *m = client("svc", s.port);
        for (int k = 0; k < calls; k++) {
            ring_msg(msg, sizeof msg, 1, k, 1000);
            mon_log_event(m, "info", msg, NULL);
        }
        char *cut = wait_for_cut(m);
        CHECK(cut != NULL, "a write was cut in the middle of a message");
        if (restart) {
            server_stop(&s);
            server_start(&s, s.port, CAPTURE);
        } else server_set_mode(&s, CAPTURE);
        CHECK(mon_flush(m, 15000) == 0, "flush after the sidecar reads again");
        mon_stats st;
        mon_statistics(m, &st);
        ring_seen_t r;
        for (double end = now_s() + 5; now_s() < end; usleep(20000)) { /* until the newest message */
            ring_check(&s, 1000, &r);
            if (r.last[1] == calls - 1) break;
        }
        lock(m);
        CHECK(!queued(m) && !m->in_flight && !m->rest.len && !m->pinned, "all written: %llu queued, %zu held",
              (unsigned long long)queued(m), m->in_flight);
        unlock(m);
        CHECK(r.bad == 0 && r.order == 0 && r.last[1] == calls - 1, "%s: %d data, %d broken, %d out of order, last %d",
              restart ? "restart" : "resume", r.data, r.bad, r.order, r.last[1]);
        CHECK(cut && count_lines_equal(&s, cut) == 1, "the cut message arrived whole, once");
        if (!restart)
            CHECK((uint64_t)r.data == st.sent && st.sent + st.dropped == (uint64_t)calls, "resume: %d arrived, sent %llu, dropped %llu",
                  r.data, (unsigned long long)st.sent, (unsigned long long)st.dropped);
        free(cut);
        mon_close(m, 2000);
        server_stop(&s);
        server_free(&s);
    }
}

int main(int argc, char **argv) { /* argv[1]: run only the tests whose name holds it */
    unsetenv("MONITORING_SIDECAR");
    unsetenv("MONITORING_SIDECAR_TOKEN");
    unsetenv("MONITORING_SOURCE");
    unsetenv("TRACEPARENT");
    unsetenv("MONITORING_CONTEXT");
    static const struct { const char *name; void (*fn)(void); } tests[] = {
        {"exact messages", test_exact_messages}, {"escaping", test_escaping}, {"sidecar down, up, restarted", test_down_then_up},
        {"overflow", test_overflow}, {"8 threads", test_threads}, {"spans", test_spans},
        {"environment", test_environment}, {"unix socket", test_unix_socket}, {"token", test_token}, {"fork", test_fork}, {"bad servers", test_bad_servers}, {"NULL safety", test_null_safety},
        {"context and spans", test_context_scope},
        {"ring: wraparound, drop oldest", test_ring_wrap_and_drop}, {"ring: pinned batch", test_ring_pinned},
        {"ring: delivery after a wrap", test_ring_delivery}, {"ring: message larger than the ring", test_ring_too_large},
        {"ring: threads into a small ring", test_ring_threads}, {"ring: write cut by a full socket", test_ring_stalled},
    };
    double t0 = now_s();
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        int f = failed;
        if (argc > 1 && !strstr(tests[i].name, argv[1])) continue;
        double a = now_s();
        tests[i].fn();
        printf("%s %s (%.2f s)\n", failed == f ? "ok  " : "FAIL", tests[i].name, now_s() - a);
        fflush(stdout);
    }
    printf("total %.1f s\n%d passed, %d failed\n", now_s() - t0, passed, failed);
    return failed ? 1 : 0;
}
