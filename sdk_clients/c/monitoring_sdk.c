/* monitoring_sdk.c: see monitoring_sdk.h. C99, libc and pthreads only.
 *
 * A call encodes its JSON line (the envelope under the client's mutex, because it reads the
 * context and the span table; its own data outside it) and appends it to a ring of at most
 * MON_MAX_MESSAGES / MON_MAX_BYTES, dropping the oldest when full. One sender thread per client,
 * started by the first message, connects, writes batches with sendmsg(MSG_NOSIGNAL) on a
 * non-blocking socket, and puts back at the front what a failed write did not get out whole.
 */
#define _POSIX_C_SOURCE 200809L
#include "monitoring_sdk.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS and BSDs: SO_NOSIGPIPE is set on the socket instead */
#endif
#define BACKOFF_MIN_NS 100000000LL /* 0.1 s, doubling up to 30 s */
#define BACKOFF_MAX_NS 30000000000LL
#define CONNECT_TIMEOUT_MS 1000
#define BATCH_MAX 256              /* messages per sendmsg() round; +1 for the drop report */
#define BATCH_BYTES (256 * 1024)
#define LINGER_NS 1000000LL     /* after a batch the sender waits 1 ms for more before it idles,
                                   so a busy caller rarely pays for waking it */
#define POLL_MS 250                /* a write blocked on a full socket rechecks close() this often */

typedef struct { char *p; size_t len; } msg_t;
typedef struct { char *p; size_t len, cap; int oom, big; } buf_t;
typedef struct { char *key; size_t klen; char *val; } ctx_t; /* val: encoded JSON text */
typedef struct { char id[17], trace[33], parent[17]; char *name; int64_t t0; pthread_t thread; } span_t;

struct mon_client {
    pthread_mutex_t lock;
    pthread_cond_t wake, drained, done_cv;
    char *source, *host;
    int port;
    ctx_t *ctx;
    size_t nctx;
    span_t *spans;
    size_t nspans, capspans;
    char remote_trace[33], remote_span[17];
    uint64_t rng;
    msg_t *ring, *batch;
    size_t head, count, bytes, in_flight, nbatch; /* nbatch: taken by the sender, report included */
    int fd, started, idle, kick, closing, abandon, done, detached, warned;
    pthread_t thread;
    int64_t retry_at;
    uint64_t sent, dropped, unreported, connections, errors;
    mon_error_fn on_error;
    void *on_error_arg;
    mon_client *next; /* registry of live clients, for fork */
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t reg_once = PTHREAD_ONCE_INIT;
static mon_client *reg_head;

/* ---- time, ids ------------------------------------------------------------------------- */

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void to_timespec(int64_t ns, struct timespec *ts) {
    ts->tv_sec = (time_t)(ns / 1000000000LL);
    ts->tv_nsec = (long)(ns % 1000000000LL);
}

static uint64_t next_random(mon_client *m) { /* splitmix64; reseeded in a forked child */
    uint64_t z = (m->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void seed(mon_client *m) {
    uint64_t s = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &s, sizeof s) != (ssize_t)sizeof s) s = 0;
        close(fd);
    }
    m->rng ^= s ^ (uint64_t)now_ns(CLOCK_REALTIME) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)m;
}

static void random_hex(mon_client *m, char *out, int bytes) { /* never all zeros (invalid in W3C) */
    static const char hex[] = "0123456789abcdef";
    uint64_t r;
    for (int i = 0; i < bytes; i += 8) {
        do r = next_random(m); while (r == 0);
        for (int j = 0; j < 16; j++) out[2 * i + j] = hex[(r >> (60 - 4 * j)) & 15];
    }
    out[2 * bytes] = '\0';
}

/* ---- encoding --------------------------------------------------------------------------- */

static int grow(buf_t *b, size_t need) {
    if (b->oom || b->big) return -1;
    if (b->len + need <= b->cap) return 0;
    if (b->len + need > MON_MAX_MESSAGE_BYTES + 4096) { b->big = 1; return -1; } /* will be dropped */
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + need) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = 1; return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void put(buf_t *b, const char *s, size_t n) {
    if (grow(b, n) == 0) { memcpy(b->p + b->len, s, n); b->len += n; }
}

static void puts_(buf_t *b, const char *s) { put(b, s, strlen(s)); }

/* Length of the valid UTF-8 sequence at s, or 0 with *skip = the maximal invalid subpart. */
static size_t utf8_len(const unsigned char *s, size_t n, size_t *skip) {
    unsigned char c = s[0], lo = 0x80, hi = 0xbf;
    size_t need, k;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) { need = 2; if (c == 0xe0) lo = 0xa0; if (c == 0xed) hi = 0x9f; }
    else if (c >= 0xf0 && c <= 0xf4) { need = 3; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
    else { *skip = 1; return 0; }
    for (k = 1; k <= need; k++) {
        if (k >= n || s[k] < lo || s[k] > hi) { *skip = k; return 0; }
        lo = 0x80; hi = 0xbf;
    }
    return need + 1;
}

/* A JSON string of any bytes: quotes, backslashes and control characters escaped, invalid
 * UTF-8 replaced by U+FFFD, so no input can end the string or the line early. */
static void put_strn(buf_t *b, const char *str, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, j, len, skip;
    put(b, "\"", 1);
    while (i < n) {
        for (j = i; j < n && s[j] >= 0x20 && s[j] < 0x80 && s[j] != '"' && s[j] != '\\'; j++) {}
        put(b, (const char *)s + i, j - i);
        if ((i = j) >= n) break;
        unsigned char c = s[i];
        if (c >= 0x80) {
            if ((len = utf8_len(s + i, n - i, &skip)) > 0) { put(b, (const char *)s + i, len); i += len; }
            else { put(b, "\xef\xbf\xbd", 3); i += skip; }
            continue;
        }
        char e[6] = {'\\', (char)c, 0, 0, 0, 0};
        size_t elen = 2;
        switch (c) {
        case '"': case '\\': break;
        case '\n': e[1] = 'n'; break;
        case '\r': e[1] = 'r'; break;
        case '\t': e[1] = 't'; break;
        case '\b': e[1] = 'b'; break;
        case '\f': e[1] = 'f'; break;
        default: memcpy(e + 1, "u00", 3); e[4] = hex[c >> 4]; e[5] = hex[c & 15]; elen = 6;
        }
        put(b, e, elen);
        i++;
    }
    put(b, "\"", 1);
}

static void put_str(buf_t *b, const char *s) { put_strn(b, s ? s : "", s ? strlen(s) : 0); }

/* Integers without a fraction; others in the fewest digits that read back as the same double. */
static void put_num(buf_t *b, double v) {
    char s[40];
    if (fabs(v) < 9007199254740992.0 && (double)(long long)v == v) {
        snprintf(s, sizeof s, "%lld", (long long)v);
    } else {
        for (int prec = 15; prec <= 17; prec++) {
            snprintf(s, sizeof s, "%.*g", prec, v);
            if (strtod(s, NULL) == v) break;
        }
        for (char *p = s; *p; p++) /* a locale's decimal comma is not JSON */
            if (!strchr("0123456789eE+-", *p)) *p = '.';
    }
    puts_(b, s);
}

static void put_digits(char *p, long v, int n) {
    while (n--) { p[n] = (char)('0' + v % 10); v /= 10; }
}

static void put_timestamp(buf_t *b) { /* RFC 3339 UTC, ms; civil date computed (no tz lock) */
    int64_t ms = now_ns(CLOCK_REALTIME) / 1000000, days = ms / 86400000, sod = ms % 86400000;
    int64_t z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097, doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365, doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153, d = doy - (153 * mp + 2) / 5 + 1, mo = mp < 10 ? mp + 3 : mp - 9;
    char t[] = "\"0000-00-00T00:00:00.000Z\"";
    put_digits(t + 1, (long)(yoe + era * 400 + (mo <= 2)), 4);
    put_digits(t + 6, (long)mo, 2);
    put_digits(t + 9, (long)d, 2);
    put_digits(t + 12, (long)(sod / 3600000), 2);
    put_digits(t + 15, (long)(sod / 60000 % 60), 2);
    put_digits(t + 18, (long)(sod / 1000 % 60), 2);
    put_digits(t + 21, (long)(sod % 1000), 3);
    put(b, t, sizeof t - 1);
}

/* Writes the entries of kv (NULL-key terminated) whose value is set, whose key appears in no
 * later entry (the last one wins) and is not in base; *first tracks the separating comma. */
static void put_kvs(buf_t *b, const mon_kv *kv, const ctx_t *base, size_t nbase, int *first) {
    for (size_t i = 0; kv && kv[i].key; i++) {
        int skip = !kv[i].value;
        for (size_t j = i + 1; !skip && kv[j].key; j++) skip = kv[j].value && !strcmp(kv[i].key, kv[j].key);
        for (size_t j = 0; !skip && j < nbase; j++)
            skip = base[j].klen == strlen(kv[i].key) && !memcmp(base[j].key, kv[i].key, base[j].klen);
        if (skip) continue;
        put(b, *first ? "" : ",", *first ? 0 : 1);
        *first = 0;
        put_str(b, kv[i].key);
        put(b, ":", 1);
        put_str(b, kv[i].value);
    }
}

static const char *kv_lookup(const mon_kv *kv, const char *key, size_t klen) {
    const char *found = NULL;
    for (size_t i = 0; kv && kv[i].key; i++)
        if (kv[i].value && strlen(kv[i].key) == klen && !memcmp(kv[i].key, key, klen)) found = kv[i].value;
    return found;
}

/* ---- JSON reading (MONITORING_CONTEXT, mon_set_context_json): re-encoded, never copied raw */

typedef struct { const char *s, *e; int depth; } rd_t;

static void ws(rd_t *r) { while (r->s < r->e && strchr(" \t\r\n", *r->s) && *r->s) r->s++; }

static int hexval(rd_t *r, unsigned *u) {
    *u = 0;
    for (int i = 0; i < 4; i++, r->s++) {
        char c = r->s < r->e ? *r->s : 0;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        *u = *u * 16 + (unsigned)d;
    }
    return 0;
}

static int read_string(rd_t *r, buf_t *raw) { /* decodes into raw bytes */
    if (r->s >= r->e || *r->s++ != '"') return -1;
    while (r->s < r->e) {
        unsigned char c = (unsigned char)*r->s++;
        if (c == '"') return raw->oom ? -1 : 0;
        if (c < 0x20) return -1;
        if (c != '\\') { put(raw, (const char *)&c, 1); continue; }
        if (r->s >= r->e) return -1;
        const char *esc = strchr("\"\"\\\\//b\bf\fn\nr\rt\t", *r->s);
        if (*r->s != 'u') {
            if (!esc || (esc - "\"\"\\\\//b\bf\fn\nr\rt\t") % 2) return -1;
            put(raw, esc + 1, 1);
            r->s++;
            continue;
        }
        unsigned u, lo;
        r->s++;
        if (hexval(r, &u)) return -1;
        if (u >= 0xd800 && u < 0xdc00 && r->e - r->s >= 6 && r->s[0] == '\\' && r->s[1] == 'u') {
            rd_t peek = {r->s + 2, r->e, 0};
            if (!hexval(&peek, &lo) && lo >= 0xdc00 && lo < 0xe000) { u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00); r->s = peek.s; }
        }
        char o[4]; /* a lone surrogate becomes bytes that the encoder replaces with U+FFFD */
        size_t k = u < 0x80 ? 1 : u < 0x800 ? 2 : u < 0x10000 ? 3 : 4;
        if (k == 1) o[0] = (char)u;
        else {
            for (size_t i = k - 1; i > 0; i--, u >>= 6) o[i] = (char)(0x80 | (u & 0x3f));
            o[0] = (char)((k == 2 ? 0xc0 : k == 3 ? 0xe0 : 0xf0) | u);
        }
        put(raw, o, k);
    }
    return -1;
}

static int norm_value(rd_t *r, buf_t *out) { /* one JSON value, written compactly */
    ws(r);
    if (r->s >= r->e || ++r->depth > 64) return -1;
    char c = *r->s;
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        put(out, r->s++, 1);
        ws(r);
        if (r->s < r->e && *r->s == close) { r->s++; put(out, &close, 1); r->depth--; return 0; }
        for (;;) {
            ws(r);
            if (c == '{') {
                buf_t key = {0};
                int bad = read_string(r, &key);
                if (!bad) put_strn(out, key.p ? key.p : "", key.len);
                free(key.p);
                ws(r);
                if (bad || r->s >= r->e || *r->s++ != ':') return -1;
                put(out, ":", 1);
            }
            if (norm_value(r, out)) return -1;
            ws(r);
            if (r->s < r->e && *r->s == ',') { put(out, r->s++, 1); continue; }
            if (r->s < r->e && *r->s == close) { put(out, r->s++, 1); r->depth--; return 0; }
            return -1;
        }
    }
    if (c == '"') {
        buf_t raw = {0};
        int bad = read_string(r, &raw);
        if (!bad) put_strn(out, raw.p ? raw.p : "", raw.len);
        free(raw.p);
        r->depth--;
        return bad;
    }
    static const char *const lits[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(lits[i]);
        if ((size_t)(r->e - r->s) >= n && !memcmp(r->s, lits[i], n)) { put(out, r->s, n); r->s += n; r->depth--; return 0; }
    }
    const char *p = r->s; /* -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)? */
#define DIGITS(min) do { const char *q_ = p; while (p < r->e && *p >= '0' && *p <= '9') p++; if (p - q_ < (min)) return -1; } while (0)
    if (p < r->e && *p == '-') p++;
    if (p < r->e && *p == '0') p++; else DIGITS(1);
    if (p < r->e && *p == '.') { p++; DIGITS(1); }
    if (p < r->e && (*p == 'e' || *p == 'E')) { p++; if (p < r->e && (*p == '+' || *p == '-')) p++; DIGITS(1); }
#undef DIGITS
    put(out, r->s, (size_t)(p - r->s));
    r->s = p;
    r->depth--;
    return 0;
}

/* ---- context and spans (lock held) -------------------------------------------------------- */

static int ctx_put(mon_client *m, const char *key, size_t klen, char *val) { /* takes val */
    size_t i;
    for (i = 0; i < m->nctx && !(m->ctx[i].klen == klen && !memcmp(m->ctx[i].key, key, klen)); i++) {}
    if (i < m->nctx) {
        free(m->ctx[i].val);
        if (val) { m->ctx[i].val = val; return 0; }
        free(m->ctx[i].key);
        memmove(m->ctx + i, m->ctx + i + 1, (m->nctx - i - 1) * sizeof *m->ctx);
        m->nctx--;
        return 0;
    }
    if (!val) return 0;
    ctx_t *c = realloc(m->ctx, (m->nctx + 1) * sizeof *c);
    char *k = malloc(klen + 1);
    if (c) m->ctx = c;
    if (!c || !k) { free(k); free(val); return -1; }
    memcpy(k, key, klen);
    k[klen] = '\0';
    m->ctx[m->nctx++] = (ctx_t){k, klen, val};
    return 0;
}

static void put_ctx_object(buf_t *b, const ctx_t *c, size_t n) {
    put(b, "{", 1);
    for (size_t i = 0; i < n; i++) {
        put(b, ",", i > 0);
        put_strn(b, c[i].key, c[i].klen);
        put(b, ":", 1);
        puts_(b, c[i].val);
    }
    put(b, "}", 1);
}

static void export_context(mon_client *m) { /* setenv is process-wide: a child joins the job */
    buf_t b = {0};
    put_ctx_object(&b, m->ctx, m->nctx);
    put(&b, "", 1);
    if (!m->nctx) unsetenv("MONITORING_CONTEXT");
    else if (!b.oom && !b.big) setenv("MONITORING_CONTEXT", b.p, 1);
    free(b.p);
}

static span_t *current_span(mon_client *m) { /* the calling thread's innermost active span */
    pthread_t me = pthread_self();
    for (size_t i = m->nspans; i-- > 0;)
        if (pthread_equal(m->spans[i].thread, me)) return &m->spans[i];
    return NULL;
}

static void export_traceparent(mon_client *m) {
    span_t *s = current_span(m);
    char tp[56];
    if (!s && !m->remote_trace[0]) { unsetenv("TRACEPARENT"); return; }
    snprintf(tp, sizeof tp, "00-%s-%s-01", s ? s->trace : m->remote_trace, s ? s->id : m->remote_span);
    setenv("TRACEPARENT", tp, 1);
}

static void read_traceparent(mon_client *m, const char *tp) {
    char t[64];
    size_t n = 0;
    while (tp && (*tp == ' ' || *tp == '\t')) tp++;
    for (; tp && *tp && n < sizeof t - 1; tp++) t[n++] = (char)(*tp >= 'A' && *tp <= 'F' ? *tp + 32 : *tp);
    while (n > 0 && (t[n - 1] == ' ' || t[n - 1] == '\t' || t[n - 1] == '\n')) n--;
    t[n] = '\0';
    if (n != 55 || t[2] != '-' || t[35] != '-' || t[52] != '-' || !strncmp(t, "ff", 2)) return;
    int nonzero_trace = 0, nonzero_span = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 2 || i == 35 || i == 52) continue;
        if (!t[i] || !strchr("0123456789abcdef", t[i])) return;
        if (t[i] != '0') { if (i > 2 && i < 35) nonzero_trace = 1; if (i > 35 && i < 52) nonzero_span = 1; }
    }
    if (!nonzero_trace || !nonzero_span) return;
    memcpy(m->remote_trace, t + 3, 32);
    memcpy(m->remote_span, t + 36, 16);
}

/* ---- queue --------------------------------------------------------------------------------- */

static void report(mon_client *m, const char *what) {
    pthread_mutex_lock(&m->lock);
    mon_error_fn fn = m->on_error;
    void *arg = m->on_error_arg;
    int first = !m->warned;
    m->warned = 1;
    m->errors++;
    pthread_mutex_unlock(&m->lock);
    if (fn) fn(arg, what);
    else if (first) fprintf(stderr, "monitoring_sdk(%s): %s (further problems are counted, not printed)\n", m->source, what);
}

static void drop_front(mon_client *m) {
    msg_t *f = &m->ring[m->head];
    m->bytes -= f->len;
    free(f->p);
    m->head = (m->head + 1) % MON_MAX_MESSAGES;
    m->count--;
    m->dropped++;
    m->unreported++;
}

static void *sender_main(void *arg);

static void envelope(mon_client *m, buf_t *b, const char *type, const mon_kv *ctx, const span_t *own) {
    const span_t *cur = own ? own : current_span(m);
    puts_(b, "{\"source\":");
    put_str(b, m->source);
    puts_(b, ",\"type\":\"");
    puts_(b, type);
    puts_(b, "\",\"timestamp\":");
    put_timestamp(b);
    if (cur || m->remote_trace[0]) {
        puts_(b, ",\"trace_id\":\"");
        puts_(b, cur ? cur->trace : m->remote_trace);
        puts_(b, "\",\"span_id\":\"");
        puts_(b, cur ? cur->id : m->remote_span);
        put(b, "\"", 1);
    }
    if (own && own->parent[0]) { puts_(b, ",\"parent_span_id\":\""); puts_(b, own->parent); put(b, "\"", 1); }
    int first = 1, base = m->nctx > 0;
    for (size_t i = 0; i < m->nctx; i++) { /* the call's context wins over set_context values */
        const char *over = kv_lookup(ctx, m->ctx[i].key, m->ctx[i].klen);
        puts_(b, first ? ",\"context\":{" : ",");
        first = 0;
        put_strn(b, m->ctx[i].key, m->ctx[i].klen);
        put(b, ":", 1);
        if (over) put_str(b, over); else puts_(b, m->ctx[i].val);
    }
    size_t mark = b->len;
    if (!base) puts_(b, ",\"context\":{");
    put_kvs(b, ctx, m->ctx, m->nctx, &first);
    if (first) b->len = mark; /* no context at all: no key */
    else put(b, "}", 1);
    puts_(b, ",\"data\":");
}

static void begin(mon_client *m, buf_t *b, const char *type, const mon_kv *ctx) {
    memset(b, 0, sizeof *b);
    pthread_mutex_lock(&m->lock);
    envelope(m, b, type, ctx, NULL);
    pthread_mutex_unlock(&m->lock);
}

/* Closes the message and offers it to the queue. */
static int finish(mon_client *m, buf_t *b) {
    const char *problem = NULL;
    int rc = 0, dropped_now = 0;
    puts_(b, "}}\n");
    pthread_mutex_lock(&m->lock);
    if (b->oom || b->big || b->len > MON_MAX_MESSAGE_BYTES || m->closing) {
        problem = b->oom ? "out of memory: message dropped" : m->closing ? "call during close: message dropped"
                                                                        : "message over 1 MiB dropped";
        m->dropped++;
        free(b->p);
        rc = -1;
    } else {
        uint64_t unreported = m->unreported;
        if (m->count == MON_MAX_MESSAGES) { drop_front(m); dropped_now = 1; }
        m->ring[(m->head + m->count++) % MON_MAX_MESSAGES] = (msg_t){b->p, b->len};
        m->bytes += b->len;
        while (m->bytes > MON_MAX_BYTES && m->count > 1) { drop_front(m); dropped_now = 1; }
        if (!m->started) {
            sigset_t all, old; /* the sender never runs the host's signal handlers */
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            m->started = pthread_create(&m->thread, NULL, sender_main, m) == 0;
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            if (!m->started) problem = "cannot start the sender thread (will retry)";
        } else if (m->idle) { /* only a sender waiting for work needs waking */
            m->idle = 0;
            pthread_cond_signal(&m->wake);
        }
        if (dropped_now && unreported == 0) problem = "buffer full: dropping the oldest messages (counted, reported later)";
    }
    pthread_mutex_unlock(&m->lock);
    if (problem) report(m, problem);
    return rc;
}

static int refuse(mon_client *m, const char *what) {
    report(m, what);
    return -1;
}

/* ---- sender thread ------------------------------------------------------------------------- */

static int abandoned(mon_client *m) {
    pthread_mutex_lock(&m->lock);
    int a = m->abandon;
    pthread_mutex_unlock(&m->lock);
    return a;
}

static int dial(mon_client *m, char *err, size_t errlen) {
    struct addrinfo hints, *res = NULL, *ai;
    char port[16];
    int fd = -1, e = 0;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    snprintf(port, sizeof port, "%d", m->port);
    if ((e = getaddrinfo(m->host, port, &hints, &res)) != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", m->host, gai_strerror(e));
        return -1;
    }
    e = 0;
    for (int pass = 0; pass < 2 && fd < 0; pass++) /* IPv4 first */
        for (ai = res; ai && fd < 0; ai = ai->ai_next) {
            if ((ai->ai_family == AF_INET) != (pass == 0) || (fd = socket(ai->ai_family, SOCK_STREAM, 0)) < 0) continue;
            fcntl(fd, F_SETFD, FD_CLOEXEC);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
#ifdef SO_NOSIGPIPE
            setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &(int){1}, sizeof(int));
#endif
            int rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
            e = rc == 0 ? 0 : errno;
            for (int waited = 0; rc != 0 && (e == EINPROGRESS || e == EINTR) && waited < CONNECT_TIMEOUT_MS && !abandoned(m); waited += 100) {
                struct pollfd p = {fd, POLLOUT, 0};
                if (poll(&p, 1, 100) > 0) {
                    socklen_t sl = sizeof e;
                    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &sl) != 0) e = errno;
                    rc = e ? -1 : 0;
                    break;
                }
                e = ETIMEDOUT;
            }
            if (rc != 0) { close(fd); fd = -1; }
        }
    freeaddrinfo(res);
    if (fd < 0) snprintf(err, errlen, "connect to %s:%d failed (errno %d)", m->host, m->port, e);
    return fd;
}

/* Writes batch[0..n); *done = messages the sidecar got whole. A JSON line missing only its
 * newline counts: the sidecar takes an unterminated last line at EOF. */
static int write_batch(mon_client *m, int fd, size_t n, size_t *done) {
    size_t i = 0, off = 0;
    struct pollfd p = {fd, POLLIN, 0};
    char tmp[512];
    if (poll(&p, 1, 0) > 0) { /* the sidecar only talks to refuse a stream: EOF, reset or an error line */
        ssize_t r = recv(fd, tmp, sizeof tmp, MSG_DONTWAIT);
        if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) { *done = 0; return -1; }
    }
    while (i < n) {
        struct iovec iov[64];
        struct msghdr mh;
        size_t k = 0;
        for (size_t j = i; j < n && k < 64; j++, k++) {
            iov[k].iov_base = m->batch[j].p + (j == i ? off : 0);
            iov[k].iov_len = m->batch[j].len - (j == i ? off : 0);
        }
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = k;
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { /* the sidecar is not reading: wait */
            if (abandoned(m)) break;
            p.events = POLLOUT;
            poll(&p, 1, POLL_MS);
            continue;
        }
        if (w < 0) break;
        for (size_t left = (size_t)w; left > 0;) {
            size_t rest = m->batch[i].len - off;
            if (left >= rest) { left -= rest; i++; off = 0; }
            else { off += left; left = 0; }
        }
    }
    *done = i + (i < n && off > 0 && off == m->batch[i].len - 1);
    return i < n ? -1 : 0;
}

static msg_t drop_report(mon_client *m, uint64_t count) {
    buf_t b = {0};
    char n[32];
    puts_(&b, "{\"source\":");
    put_str(&b, m->source);
    puts_(&b, ",\"type\":\"metric\",\"timestamp\":");
    put_timestamp(&b);
    snprintf(n, sizeof n, "%llu", (unsigned long long)count);
    puts_(&b, ",\"data\":{\"name\":\"sdk.dropped_messages\",\"value\":");
    puts_(&b, n);
    puts_(&b, ",\"unit\":\"count\",\"tags\":{\"reason\":\"buffer_full\"}}}\n");
    if (b.oom) { free(b.p); return (msg_t){NULL, 0}; }
    return (msg_t){b.p, b.len};
}

static void timed_wait(pthread_cond_t *cv, pthread_mutex_t *lock, int64_t deadline_ns) {
    struct timespec ts;
    to_timespec(deadline_ns, &ts);
    pthread_cond_timedwait(cv, lock, &ts);
}

static void destroy(mon_client *m);

static void *sender_main(void *arg) {
    mon_client *m = arg;
    int64_t delay = BACKOFF_MIN_NS, linger_until = 0;
    char err[160];
    pthread_mutex_lock(&m->lock);
    while (!m->abandon) {
        if (m->count == 0) {
            if (m->closing) break;
            if (now_ns(CLOCK_MONOTONIC) < linger_until) {
                timed_wait(&m->wake, &m->lock, linger_until);
                continue;
            }
            m->idle = 1;
            pthread_cond_wait(&m->wake, &m->lock);
            m->idle = 0;
            continue;
        }
        if (m->fd < 0) {
            if (!m->kick && !m->closing && now_ns(CLOCK_MONOTONIC) < m->retry_at) {
                timed_wait(&m->wake, &m->lock, m->retry_at);
                continue;
            }
            m->kick = 0;
            pthread_mutex_unlock(&m->lock);
            int fd = dial(m, err, sizeof err);
            if (fd < 0) report(m, err);
            pthread_mutex_lock(&m->lock);
            if (fd < 0) {
                if (m->closing) break;
                m->retry_at = now_ns(CLOCK_MONOTONIC) + delay;
                delay = delay * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : delay * 2;
                continue;
            }
            m->fd = fd;
            m->connections++;
        }
        size_t n = 0, bytes = 0, done, extra = 0;
        uint64_t reported = m->unreported;
        if (reported && (m->batch[0] = drop_report(m, reported)).p) n = extra = 1;
        while (m->count > 0 && n < BATCH_MAX + extra && bytes < BATCH_BYTES) {
            msg_t f = m->ring[m->head];
            m->head = (m->head + 1) % MON_MAX_MESSAGES;
            m->count--;
            m->bytes -= f.len;
            bytes += f.len;
            m->batch[n++] = f;
        }
        m->in_flight = n - extra;
        m->nbatch = n;
        int fd = m->fd;
        pthread_mutex_unlock(&m->lock);
        int rc = write_batch(m, fd, n, &done);
        pthread_mutex_lock(&m->lock);
        if (extra && done > 0) m->unreported -= reported;
        m->sent += done > extra ? done - extra : 0;
        for (size_t i = n; i-- > (done > extra ? done : extra);) { /* back to the front, in order */
            if (m->count == MON_MAX_MESSAGES) { free(m->batch[i].p); m->dropped++; m->unreported++; continue; }
            m->head = (m->head + MON_MAX_MESSAGES - 1) % MON_MAX_MESSAGES;
            m->ring[m->head] = m->batch[i];
            m->count++;
            m->bytes += m->batch[i].len;
        }
        while (m->bytes > MON_MAX_BYTES && m->count > 1) drop_front(m);
        m->in_flight = m->nbatch = 0;
        pthread_cond_broadcast(&m->drained);
        pthread_mutex_unlock(&m->lock); /* free() outside the lock: callers never wait for it */
        for (size_t i = 0; i < done || i < extra; i++) free(m->batch[i].p);
        pthread_mutex_lock(&m->lock);
        if (rc == 0) {
            delay = BACKOFF_MIN_NS;
            linger_until = now_ns(CLOCK_MONOTONIC) + LINGER_NS;
            continue;
        }
        close(m->fd);
        m->fd = -1;
        m->retry_at = now_ns(CLOCK_MONOTONIC) + delay;
        delay = delay * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : delay * 2;
        pthread_mutex_unlock(&m->lock);
        report(m, "write to the sidecar failed; reconnecting");
        pthread_mutex_lock(&m->lock);
    }
    if (m->fd >= 0) close(m->fd);
    m->fd = -1;
    m->done = 1;
    pthread_cond_broadcast(&m->done_cv);
    pthread_cond_broadcast(&m->drained);
    int detached = m->detached;
    pthread_mutex_unlock(&m->lock);
    if (detached) destroy(m); /* close() gave up waiting and left the cleanup to us */
    return NULL;
}

/* ---- fork ------------------------------------------------------------------------------------ */

static void fork_prepare(void) {
    pthread_mutex_lock(&reg_lock);
    for (mon_client *m = reg_head; m; m = m->next) pthread_mutex_lock(&m->lock);
}

static void fork_parent(void) {
    for (mon_client *m = reg_head; m; m = m->next) pthread_mutex_unlock(&m->lock);
    pthread_mutex_unlock(&reg_lock);
}

static void init_conds(mon_client *m) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&m->wake, &a);
    pthread_cond_init(&m->drained, &a);
    pthread_cond_init(&m->done_cv, &a);
    pthread_condattr_destroy(&a);
}

/* The child has no sender thread: it must not write into the parent's stream nor send the
 * parent's queue again. Spans and context are kept, so the child stays in the same trace. */
static void fork_child(void) {
    for (mon_client *m = reg_head; m; m = m->next) {
        if (m->fd >= 0) close(m->fd); /* our copy only; no shutdown() */
        while (m->count) drop_front(m);
        for (size_t i = 0; i < m->nbatch; i++) free(m->batch[i].p);
        m->fd = -1;
        m->in_flight = m->nbatch = m->bytes = m->head = 0;
        m->started = m->idle = m->kick = m->done = m->warned = 0;
        m->sent = m->dropped = m->unreported = m->connections = m->errors = 0;
        m->retry_at = 0;
        seed(m);
        init_conds(m);
        pthread_mutex_unlock(&m->lock);
    }
    pthread_mutex_unlock(&reg_lock);
}

static void install_atfork(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* ---- public API ------------------------------------------------------------------------------ */

mon_client *mon_init(const char *source, const char *host, int port) {
    pthread_once(&reg_once, install_atfork);
    mon_client *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    const char *env_source = getenv("MONITORING_SOURCE"), *sidecar = getenv("MONITORING_SIDECAR");
    const char *bad = NULL, *bad_ctx = NULL;
    m->fd = -1;
    m->port = port > 0 ? port : MON_DEFAULT_PORT;
    m->source = strdup(env_source && *env_source ? env_source : source ? source : "unknown");
    m->host = strdup(host && *host ? host : MON_DEFAULT_HOST);
    if (sidecar && *sidecar) {
        const char *colon = strrchr(sidecar, ':');
        char *end = NULL;
        long p = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || !colon[1] || *end || p <= 0 || p > 65535) bad = "ignoring malformed MONITORING_SIDECAR (expected host:port)";
        else {
            const char *h = sidecar;
            size_t hl = (size_t)(colon - sidecar);
            if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') { h++; hl -= 2; }
            char *nh = hl ? strndup(h, hl) : strdup(MON_DEFAULT_HOST);
            if (nh) { free(m->host); m->host = nh; m->port = (int)p; }
        }
    }
    m->ring = calloc(MON_MAX_MESSAGES, sizeof *m->ring);
    m->batch = calloc(BATCH_MAX + 1, sizeof *m->batch);
    if (!m->source || !m->host || !m->ring || !m->batch) {
        free(m->source); free(m->host); free(m->ring); free(m->batch); free(m);
        return NULL;
    }
    pthread_mutex_init(&m->lock, NULL);
    init_conds(m);
    seed(m);
    read_traceparent(m, getenv("TRACEPARENT"));
    const char *ctx = getenv("MONITORING_CONTEXT");
    if (ctx && *ctx) {
        rd_t r = {ctx, ctx + strlen(ctx), 0};
        int ok = (ws(&r), r.s < r.e && *r.s++ == '{');
        ws(&r);
        if (ok && r.s < r.e && *r.s == '}') r.s++;
        else while (ok) {
            buf_t key = {0}, val = {0};
            ok = !read_string(&r, &key) && (ws(&r), r.s < r.e && *r.s++ == ':') && !norm_value(&r, &val);
            put(&val, "", 1);
            ok = ok && !val.oom && !val.big && !ctx_put(m, key.p ? key.p : "", key.len, val.p);
            if (!ok) free(val.p);
            free(key.p);
            ws(&r);
            if (ok && r.s < r.e && *r.s == ',') { r.s++; ws(&r); continue; }
            ok = ok && r.s < r.e && *r.s++ == '}';
            break;
        }
        ws(&r);
        if (!ok || r.s != r.e) bad_ctx = "ignoring MONITORING_CONTEXT: not a JSON object";
    }
    if (bad) report(m, bad);
    if (bad_ctx) report(m, bad_ctx);
    pthread_mutex_lock(&reg_lock);
    m->next = reg_head;
    reg_head = m;
    pthread_mutex_unlock(&reg_lock);
    return m;
}

void mon_set_error_handler(mon_client *m, mon_error_fn fn, void *arg) {
    if (!m) return;
    pthread_mutex_lock(&m->lock);
    m->on_error = fn;
    m->on_error_arg = arg;
    pthread_mutex_unlock(&m->lock);
}

int mon_log_event(mon_client *m, const char *level, const char *message, const mon_kv *ctx) {
    char lv[16];
    size_t n = level ? strlen(level) : 0;
    buf_t b;
    if (!m) return -1;
    if (!level) level = "info";
    else if (n < sizeof lv) {
        for (size_t i = 0; i <= n; i++) lv[i] = (char)(level[i] >= 'A' && level[i] <= 'Z' ? level[i] + 32 : level[i]);
        level = strcmp(lv, "warn") ? lv : "warning";
    }
    begin(m, &b, "event", ctx);
    puts_(&b, "{\"level\":");
    put_str(&b, level);
    puts_(&b, ",\"message\":");
    put_str(&b, message);
    return finish(m, &b);
}

int mon_log_metric(mon_client *m, const char *name, double value, const char *unit, const mon_kv *tags) {
    buf_t b;
    int first = 1;
    if (!m) return -1;
    if (!isfinite(value)) return refuse(m, "log_metric: value is not a finite number");
    begin(m, &b, "metric", NULL);
    puts_(&b, "{\"name\":");
    put_str(&b, name);
    puts_(&b, ",\"value\":");
    put_num(&b, value);
    if (unit) { puts_(&b, ",\"unit\":"); put_str(&b, unit); }
    size_t mark = b.len;
    puts_(&b, ",\"tags\":{");
    put_kvs(&b, tags, NULL, 0, &first);
    if (first) b.len = mark;
    else put(&b, "}", 1);
    return finish(m, &b);
}

int mon_log_progress(mon_client *m, const char *job_id, double percent, const char *status) {
    buf_t b;
    if (!m) return -1;
    if (!isfinite(percent)) return refuse(m, "log_progress: percent is not a finite number");
    begin(m, &b, "progress", NULL);
    puts_(&b, "{\"job_id\":");
    put_str(&b, job_id);
    puts_(&b, ",\"percent\":");
    put_num(&b, percent);
    puts_(&b, ",\"status\":");
    put_str(&b, status ? status : "running");
    return finish(m, &b);
}

int mon_log_resource(mon_client *m, double cpu, double mem, double disk, double net) {
    static const char *const keys[] = {"cpu_percent", "memory_mb", "disk_io_mb", "network_io_mb"};
    double v[4] = {cpu, mem, disk, net};
    buf_t b;
    int first = 1;
    if (!m) return -1;
    for (int i = 0; i < 4; i++)
        if (isinf(v[i])) return refuse(m, "log_resource: a value is infinite");
    begin(m, &b, "resource", NULL);
    put(&b, "{", 1);
    for (int i = 0; i < 4; i++) {
        if (isnan(v[i])) continue;
        puts_(&b, first ? "\"" : ",\"");
        first = 0;
        puts_(&b, keys[i]);
        puts_(&b, "\":");
        put_num(&b, v[i]);
    }
    return finish(m, &b);
}

int mon_start_span(mon_client *m, const char *name, char out[17]) {
    span_t s;
    buf_t b = {0};
    memset(&s, 0, sizeof s);
    if (!m) { if (out) memset(out, '0', 16), out[16] = '\0'; return -1; }
    pthread_mutex_lock(&m->lock);
    span_t *cur = current_span(m);
    random_hex(m, s.id, 8);
    if (out) memcpy(out, s.id, 17);
    if (cur) { memcpy(s.trace, cur->trace, 33); memcpy(s.parent, cur->id, 17); }
    else if (m->remote_trace[0]) { memcpy(s.trace, m->remote_trace, 33); memcpy(s.parent, m->remote_span, 17); }
    else random_hex(m, s.trace, 16);
    s.name = strdup(name ? name : "");
    s.t0 = now_ns(CLOCK_MONOTONIC);
    s.thread = pthread_self();
    if (m->nspans == m->capspans) {
        size_t cap = m->capspans ? m->capspans * 2 : 8;
        span_t *p = realloc(m->spans, cap * sizeof *p);
        if (p) { m->spans = p; m->capspans = cap; }
    }
    if (!s.name || m->nspans == m->capspans) {
        pthread_mutex_unlock(&m->lock);
        free(s.name);
        return refuse(m, "start_span: out of memory");
    }
    m->spans[m->nspans++] = s;
    export_traceparent(m);
    envelope(m, &b, "span", NULL, &s);
    pthread_mutex_unlock(&m->lock);
    puts_(&b, "{\"name\":");
    put_str(&b, s.name);
    puts_(&b, ",\"phase\":\"start\"");
    return finish(m, &b);
}

int mon_end_span(mon_client *m, const char *span_id, const char *status) {
    span_t s;
    buf_t b = {0};
    size_t i;
    if (!m) return -1;
    pthread_mutex_lock(&m->lock);
    for (i = m->nspans; i-- > 0 && !(span_id && !strcmp(m->spans[i].id, span_id));) {}
    if (i == (size_t)-1) {
        pthread_mutex_unlock(&m->lock);
        return refuse(m, "end_span: no active span with this id");
    }
    s = m->spans[i];
    memmove(m->spans + i, m->spans + i + 1, (m->nspans - i - 1) * sizeof s);
    m->nspans--;
    export_traceparent(m);
    envelope(m, &b, "span", NULL, &s);
    pthread_mutex_unlock(&m->lock);
    int64_t us = (now_ns(CLOCK_MONOTONIC) - s.t0 + 500) / 1000;
    puts_(&b, "{\"name\":");
    put_str(&b, s.name);
    puts_(&b, ",\"phase\":\"end\",\"status\":");
    put_str(&b, status ? status : "success");
    puts_(&b, ",\"duration_ms\":");
    put_num(&b, (double)us / 1000.0);
    free(s.name);
    return finish(m, &b);
}

int mon_set_context_json(mon_client *m, const char *key, const char *json) {
    buf_t val = {0};
    if (!m || !key) return -1;
    if (json) {
        rd_t r = {json, json + strlen(json), 0};
        int bad = norm_value(&r, &val);
        ws(&r);
        put(&val, "", 1);
        if (bad || r.s != r.e || val.oom || val.big) { free(val.p); return refuse(m, "set_context: not a JSON value"); }
    }
    pthread_mutex_lock(&m->lock);
    int rc = ctx_put(m, key, strlen(key), val.p);
    export_context(m);
    pthread_mutex_unlock(&m->lock);
    return rc ? refuse(m, "set_context: out of memory") : 0;
}

int mon_set_context(mon_client *m, const char *key, const char *value) {
    buf_t val = {0};
    if (!m || !key) return -1;
    if (!value) return mon_set_context_json(m, key, NULL);
    put_str(&val, value);
    put(&val, "", 1);
    if (val.oom || val.big) { free(val.p); return refuse(m, "set_context: value too large or out of memory"); }
    pthread_mutex_lock(&m->lock);
    int rc = ctx_put(m, key, strlen(key), val.p);
    export_context(m);
    pthread_mutex_unlock(&m->lock);
    return rc ? refuse(m, "set_context: out of memory") : 0;
}

int mon_flush(mon_client *m, int timeout_ms) {
    if (!m) return -1;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
    pthread_mutex_lock(&m->lock);
    m->kick = 1;
    pthread_cond_signal(&m->wake);
    while ((m->count || m->in_flight) && m->started && !m->done && now_ns(CLOCK_MONOTONIC) < deadline)
        timed_wait(&m->drained, &m->lock, deadline);
    int rc = m->count || m->in_flight ? -1 : 0;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static void destroy(mon_client *m) {
    while (m->count) drop_front(m);
    for (size_t i = 0; i < m->nctx; i++) { free(m->ctx[i].key); free(m->ctx[i].val); }
    for (size_t i = 0; i < m->nspans; i++) free(m->spans[i].name);
    pthread_mutex_destroy(&m->lock);
    pthread_cond_destroy(&m->wake);
    pthread_cond_destroy(&m->drained);
    pthread_cond_destroy(&m->done_cv);
    free(m->ctx); free(m->spans); free(m->ring); free(m->batch); free(m->source); free(m->host); free(m);
}

int mon_close(mon_client *m, int timeout_ms) {
    if (!m) return -1;
    pthread_mutex_lock(&reg_lock);
    for (mon_client **p = &reg_head; *p; p = &(*p)->next)
        if (*p == m) { *p = m->next; break; }
    pthread_mutex_unlock(&reg_lock);
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
    pthread_mutex_lock(&m->lock);
    m->closing = 1;
    pthread_cond_signal(&m->wake);
    while (m->started && !m->done && now_ns(CLOCK_MONOTONIC) < deadline) timed_wait(&m->done_cv, &m->lock, deadline);
    if (m->started && !m->done) { /* a sidecar that stopped reading: the thread cleans up itself */
        pthread_t thread = m->thread; /* m may be freed as soon as the lock is released */
        m->abandon = m->detached = 1;
        pthread_cond_signal(&m->wake);
        pthread_mutex_unlock(&m->lock);
        pthread_detach(thread);
        return -1;
    }
    int rc = m->count ? -1 : 0;
    pthread_mutex_unlock(&m->lock);
    if (m->started) pthread_join(m->thread, NULL);
    destroy(m);
    return rc;
}

void mon_statistics(mon_client *m, mon_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!m) return;
    pthread_mutex_lock(&m->lock);
    out->queued = m->count + m->in_flight;
    out->sent = m->sent;
    out->dropped = m->dropped;
    out->reconnects = m->connections > 1 ? m->connections - 1 : 0;
    out->errors = m->errors;
    pthread_mutex_unlock(&m->lock);
}
