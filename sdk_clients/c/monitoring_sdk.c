/* SPDX-License-Identifier: Apache-2.0 */
/* monitoring_sdk.c: see monitoring_sdk.h. C99, libc and pthreads only.
 *
 * A call encodes its message on the stack (the `data` part and the start of the envelope
 * outside the client's mutex; the timestamp, span ids and context under it, because they read
 * shared state) and copies it into a byte ring that mon_init allocated and touched: no
 * allocation (unless the message is over about 1 KiB) and, in the usual case, no system call
 * on the calling path; only waking an idle sender, or waiting for a mutex whose holder was
 * descheduled, enters the kernel. The ring keeps at most MON_MAX_MESSAGES / MON_MAX_BYTES
 * queued and drops the oldest whole messages when full. One sender thread per client, started
 * by the first message, connects, takes the queued messages as one contiguous span of the ring
 * (two pieces when it wraps) and writes them with one sendmsg(MSG_NOSIGNAL) on a non-blocking
 * socket; what a failed write did not get out whole goes back to the front of the queue.
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
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS and BSDs: SO_NOSIGPIPE is set on the socket instead */
#endif
#define BACKOFF_MIN_NS 100000000LL /* 0.1 s, doubling up to 30 s */
#define BACKOFF_MAX_NS 30000000000LL
#define CONNECT_TIMEOUT_MS 1000
#define BATCH_BYTES (256 * 1024)   /* bytes per write (a larger single message goes alone) ... */
#define BATCH_MAX 1024             /* ... and messages */
#define LINGER_NS 1000000LL        /* after a write the sender waits 1 ms for more before it idles,
                                      so a busy caller rarely pays for waking it; and while fewer
                                      than COALESCE_BYTES are queued, so that it writes less often */
#define COALESCE_BYTES (16 * 1024)
#define POLL_MS 250                /* a write blocked on a full socket rechecks close() this often */
#define SPIN_TRIES 64              /* trylock attempts before sleeping on the mutex */
#define STACK_BYTES 1024           /* per-call encoding buffers live on the stack up to this */

typedef struct { char *p; size_t len, cap; int oom, big, stack; } buf_t; /* stack: p is not ours */
typedef struct { char *key; size_t klen; char *val; } ctx_t; /* val: encoded JSON text */
/* root: started while no span of the client was open; context set until it ends is undone then */
typedef struct { char id[17], trace[33], parent[17]; char *name; int64_t t0; pthread_t thread; int root; } span_t;

/* The queue. Byte positions (qh, wr, fpos) and message positions (lq, lw, fl) only grow (until
 * the queue is empty and nothing is pinned: then they restart at 0); a position's place in
 * ring[] or lens[] is the position modulo cap or lcap, and a message may wrap around the end.
 * Queued messages are [qh, wr) in ring[] and [lq, lw) in lens[] (one length per message).
 * While the sender writes, the messages it took, [fpos, fpos+fbytes) and [fl, fl+fn), are
 * "pinned": callers may drop queued messages but never reuse pinned space, so the sender reads
 * them without the lock. Everything live lies in [rd, wr) with wr - rd <= cap, rd being fpos
 * when pinned, qh otherwise. cap is the byte bound plus one batch (at most one whole message),
 * so the bounds, not the ring's size, decide what is dropped (unless, while one write is in
 * progress, callers drop more than that much: then a new message may find no room). */
struct mon_client {
    pthread_mutex_t lock;
    pthread_cond_t wake, drained, done_cv;
    char *source, *host, *source_json; /* source_json: the encoded string, quotes included */
    size_t source_json_len;
    int port, source_big;
    char *unix_path;  /* the sidecar's Unix socket, in place of host and port; NULL: TCP */
    char *auth;       /* the auth line {"auth":TOKEN}\n sent first on every connection, or NULL */
    size_t auth_len;
    int env_token;    /* the token came from MONITORING_SIDECAR_TOKEN, which mon_set_token does not override */
    ctx_t *ctx;
    size_t nctx;
    char *ctx_obj; /* the context as one JSON object ({...}), or NULL: not built (out of memory) */
    size_t ctx_obj_len;
    ctx_t *saved;  /* while a root span is open (in_root) and the context was changed in it
                      (has_saved): the context as the span started, put back when it ends */
    size_t nsaved;
    int in_root, has_saved;
    span_t *spans;
    size_t nspans, capspans;
    char remote_trace[33], remote_span[17];
    uint64_t rng;
    int64_t ts_sec;   /* the second that ts_text holds ("YYYY-MM-DDTHH:MM:SS.) */
    char ts_text[22];
    char *ring;
    uint32_t *lens;   /* message lengths */
    uint64_t cap, lcap, max_msgs, max_bytes;
    uint64_t qh, wr, lq, lw, qbytes;
    int pinned;
    uint64_t fpos, fbytes, fl, fn;
    size_t in_flight;                  /* messages the sender holds: pinned ones or rest */
    buf_t rest, rep;                   /* sender's: a message cut by a full socket; drop report */
    size_t rest_off, rep_off;          /* how much of each is written */
    uint64_t rep_count;                /* drops that rep reports */
    int fd, started, idle, kick, closing, abandon, done, detached, warned;
    pthread_t thread;
    int64_t retry_at;
    uint64_t sent, dropped, unreported, connections, errors;
    mon_error_fn on_error;
    void *on_error_arg;
    mon_client *next; /* registry of live clients, for fork */
};

/* Sizes of a client's queue; mon_init uses the header's, the tests small ones. */
typedef struct { uint64_t ring_bytes, max_msgs, max_bytes; } ring_cfg;

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t reg_once = PTHREAD_ONCE_INIT;
static mon_client *reg_head;

static void cpu_relax(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__ __volatile__("pause");
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* The client's mutex. Holds are short (a memcpy), so spin a little before sleeping: a thread
 * that sleeps on the mutex makes its holder's unlock a system call. */
static void lock(mon_client *m) {
    for (int i = 0; i < SPIN_TRIES; i++) {
        if (pthread_mutex_trylock(&m->lock) == 0) return;
        cpu_relax();
    }
    pthread_mutex_lock(&m->lock);
}

static void unlock(mon_client *m) { pthread_mutex_unlock(&m->lock); }

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

static void buf_stack(buf_t *b, char *storage, size_t n) {
    b->p = storage;
    b->len = 0;
    b->cap = n;
    b->oom = b->big = 0;
    b->stack = 1;
}

static void buf_free(buf_t *b) {
    if (!b->stack) free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->stack = 0;
}

static int grow(buf_t *b, size_t need) {
    if (b->oom || b->big) return -1;
    if (b->len + need <= b->cap) return 0;
    if (b->len + need > MON_MAX_MESSAGE_BYTES + 4096) { b->big = 1; return -1; } /* will be dropped */
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + need) cap *= 2;
    char *p = b->stack ? malloc(cap) : realloc(b->p, cap);
    if (!p) { b->oom = 1; return -1; }
    if (b->stack) memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    b->stack = 0;
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
    if (fabs(v) < 9007199254740992.0 && (double)(long long)v == v) { /* as "%lld", without printf */
        long long x = (long long)v;
        unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
        size_t i = sizeof s;
        do s[--i] = (char)('0' + u % 10); while ((u /= 10) != 0);
        if (x < 0) s[--i] = '-';
        put(b, s + i, sizeof s - i);
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(s, sizeof s, "%.*g", prec, v);
        if (strtod(s, NULL) == v) break;
    }
    for (char *p = s; *p; p++) /* a locale's decimal comma is not JSON */
        if (!strchr("0123456789eE+-", *p)) *p = '.';
    puts_(b, s);
}

static void put_digits(char *p, long v, int n) {
    while (n--) { p[n] = (char)('0' + v % 10); v /= 10; }
}

/* "YYYY-MM-DDTHH:MM:SS.mmmZ" with its quotes (26 bytes): RFC 3339 UTC, the civil date computed
 * (no tz lock). */
static void format_timestamp(char t[26], int64_t ms) {
    int64_t days = ms / 86400000, sod = ms % 86400000;
    int64_t z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097, doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365, doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153, d = doy - (153 * mp + 2) / 5 + 1, mo = mp < 10 ? mp + 3 : mp - 9;
    memcpy(t, "\"0000-00-00T00:00:00.000Z\"", 26);
    put_digits(t + 1, (long)(yoe + era * 400 + (mo <= 2)), 4);
    put_digits(t + 6, (long)mo, 2);
    put_digits(t + 9, (long)d, 2);
    put_digits(t + 12, (long)(sod / 3600000), 2);
    put_digits(t + 15, (long)(sod / 60000 % 60), 2);
    put_digits(t + 18, (long)(sod / 1000 % 60), 2);
    put_digits(t + 21, (long)(sod % 1000), 3);
}

static void put_timestamp(buf_t *b) {
    char t[26];
    format_timestamp(t, now_ns(CLOCK_REALTIME) / 1000000);
    put(b, t, sizeof t);
}

/* The same from a per-client cache of the formatted second (lock held): only the
 * milliseconds are formatted per call. */
static void put_timestamp_cached(mon_client *m, buf_t *b, int64_t ms) {
    char t[26];
    if (ms / 1000 != m->ts_sec) {
        format_timestamp(t, ms);
        memcpy(m->ts_text, t, 21);
        m->ts_sec = ms / 1000;
    } else {
        memcpy(t, m->ts_text, 21);
        put_digits(t + 21, (long)(ms % 1000), 3);
        memcpy(t + 24, "Z\"", 2);
    }
    put(b, t, sizeof t);
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

static void ctx_free(ctx_t *c, size_t n) {
    for (size_t i = 0; i < n; i++) { free(c[i].key); free(c[i].val); }
    free(c);
}

static char *dup_bytes(const char *s, size_t n) { /* keys may hold NUL bytes: klen counts */
    char *p = malloc(n + 1);
    if (p) { memcpy(p, s, n); p[n] = '\0'; }
    return p;
}

/* Called before each change of the context: inside a root span, the first change copies the
 * context the span started with, so that its end can put it back. Copying only then keeps
 * spans that set nothing free of allocation. -1 when memory is short: the caller then leaves
 * the context as it is, so nothing set inside the span can outlive it. */
static int ctx_save(mon_client *m) {
    size_t n;
    if (!m->in_root || m->has_saved) return 0;
    ctx_t *c = m->nctx ? malloc(m->nctx * sizeof *c) : NULL;
    if (m->nctx && !c) return -1;
    for (n = 0; n < m->nctx; n++) {
        c[n].klen = m->ctx[n].klen;
        c[n].key = dup_bytes(m->ctx[n].key, m->ctx[n].klen);
        c[n].val = c[n].key ? dup_bytes(m->ctx[n].val, strlen(m->ctx[n].val)) : NULL;
        if (!c[n].val) { free(c[n].key); ctx_free(c, n); return -1; }
    }
    m->saved = c;
    m->nsaved = n;
    m->has_saved = 1;
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

/* Rebuilds the cached context object that every message copies (lock held). */
static void ctx_cache(mon_client *m) {
    buf_t b = {0};
    put_ctx_object(&b, m->ctx, m->nctx);
    put(&b, "", 1);
    free(m->ctx_obj);
    m->ctx_obj = NULL;
    m->ctx_obj_len = 0;
    if (b.oom || b.big) { free(b.p); return; } /* messages then merge the context themselves */
    m->ctx_obj = b.p;
    m->ctx_obj_len = b.len - 1;
}

static void export_context(mon_client *m) { /* setenv is process-wide: a child joins the job */
    if (!m->nctx) unsetenv("MONITORING_CONTEXT");
    else if (m->ctx_obj) setenv("MONITORING_CONTEXT", m->ctx_obj, 1);
}

/* The root span ended (after its end message took the context as it is): the context it
 * started with comes back, by swapping the arrays, so this cannot fail for want of memory. */
static void ctx_restore(mon_client *m) {
    if (m->has_saved) {
        ctx_free(m->ctx, m->nctx);
        m->ctx = m->saved;
        m->nctx = m->nsaved;
        m->saved = NULL;
        m->nsaved = 0;
        ctx_cache(m);
        export_context(m);
    }
    m->in_root = m->has_saved = 0;
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
    lock(m);
    mon_error_fn fn = m->on_error;
    void *arg = m->on_error_arg;
    int first = !m->warned;
    m->warned = 1;
    m->errors++;
    unlock(m);
    if (fn) fn(arg, what);
    else if (first) fprintf(stderr, "monitoring_sdk(%s): %s (further problems are counted, not printed)\n", m->source, what);
}

static uint64_t queued(const mon_client *m) { return m->lw - m->lq; }

static void drop_front(mon_client *m) { /* lock held, queue not empty */
    uint32_t len = m->lens[m->lq % m->lcap];
    m->qh += len;
    m->qbytes -= len;
    m->lq++;
    m->dropped++;
    m->unreported++;
}

static void rewind_if_empty(mon_client *m) { /* the next message starts at ring[0]: few pages touched */
    if (m->lq == m->lw && !m->pinned) m->qh = m->wr = m->lq = m->lw = 0;
}

static void ring_copy(mon_client *m, uint64_t pos, const char *src, size_t n) {
    size_t off = (size_t)(pos % m->cap), room = (size_t)m->cap - off, first = n < room ? n : room;
    memcpy(m->ring + off, src, first);
    if (n > first) memcpy(m->ring, src + first, n - first);
}

/* Appends a and b as one message (lock held; a+b fits in cap), dropping the oldest queued
 * messages to stay within max_msgs and max_bytes. 0 if queued. -1 if even an empty queue has no
 * room because the sender is writing from most of the ring: then this message is dropped.
 * *dropped_now: something was dropped. */
static int push(mon_client *m, const char *a, size_t alen, const char *b, size_t blen, int *dropped_now) {
    uint64_t len = (uint64_t)alen + blen;
    while (queued(m) && (queued(m) >= m->max_msgs || m->qbytes + len > m->max_bytes)) { drop_front(m); *dropped_now = 1; }
    for (;;) {
        rewind_if_empty(m);
        uint64_t rd = m->pinned ? m->fpos : m->qh, lrd = m->pinned ? m->fl : m->lq;
        if (m->wr - rd + len <= m->cap && m->lw - lrd < m->lcap) break;
        *dropped_now = 1;
        if (!queued(m)) { m->dropped++; m->unreported++; return -1; }
        drop_front(m);
    }
    ring_copy(m, m->wr, a, alen);
    ring_copy(m, m->wr + alen, b, blen);
    m->wr += len;
    m->lens[m->lw++ % m->lcap] = (uint32_t)len;
    m->qbytes += len;
    return 0;
}

static void *sender_main(void *arg);

/* One call's message, encoded on the stack: e the envelope up to "data": (its first part
 * outside the lock, the rest by head()), d the data, f the call's own context entries. */
typedef struct {
    buf_t e, d, f;
    int64_t ms;
    const mon_kv *ctx;
    char es[STACK_BYTES], ds[STACK_BYTES], fs[STACK_BYTES / 2];
} call_t;

static void call_begin(mon_client *m, call_t *c, const char *type, const mon_kv *ctx) {
    int first = 1;
    buf_stack(&c->e, c->es, sizeof c->es);
    buf_stack(&c->d, c->ds, sizeof c->ds);
    buf_stack(&c->f, c->fs, sizeof c->fs);
    c->ctx = ctx;
    c->e.big = m->source_big;
    put(&c->e, "{\"source\":", 10);
    put(&c->e, m->source_json, m->source_json_len);
    puts_(&c->e, ",\"type\":\"");
    puts_(&c->e, type);
    puts_(&c->e, "\",\"timestamp\":");
    put_kvs(&c->f, ctx, NULL, 0, &first); /* merged with the set_context values under the lock */
}

static void call_free(call_t *c) {
    buf_free(&c->e);
    buf_free(&c->d);
    buf_free(&c->f);
}

/* ,"context":{...}: the set_context values, each replaced by the call's own value for the same
 * key, then the call's other entries (f, encoded already); nothing when both are empty. */
static void put_context(mon_client *m, buf_t *b, const mon_kv *ctx, const buf_t *f) {
    int over = 0;
    if (f->oom || f->big) { b->oom |= f->oom; b->big |= f->big; return; }
    for (size_t i = 0; f->len && !over && i < m->nctx; i++) over = kv_lookup(ctx, m->ctx[i].key, m->ctx[i].klen) != NULL;
    if (!over && m->ctx_obj) { /* the usual case: copies */
        if (!m->nctx && !f->len) return;
        puts_(b, ",\"context\":");
        if (!f->len) { put(b, m->ctx_obj, m->ctx_obj_len); return; }
        if (m->nctx) { put(b, m->ctx_obj, m->ctx_obj_len - 1); put(b, ",", 1); }
        else put(b, "{", 1);
        put(b, f->p, f->len);
        put(b, "}", 1);
        return;
    }
    int first = 1, base = m->nctx > 0;
    for (size_t i = 0; i < m->nctx; i++) { /* the call's context wins over set_context values */
        const char *v = kv_lookup(ctx, m->ctx[i].key, m->ctx[i].klen);
        puts_(b, first ? ",\"context\":{" : ",");
        first = 0;
        put_strn(b, m->ctx[i].key, m->ctx[i].klen);
        put(b, ":", 1);
        if (v) put_str(b, v); else puts_(b, m->ctx[i].val);
    }
    size_t mark = b->len;
    if (!base) puts_(b, ",\"context\":{");
    put_kvs(b, ctx, m->ctx, m->nctx, &first);
    if (first) b->len = mark; /* no context at all: no key */
    else put(b, "}", 1);
}

/* The envelope's part that reads shared state (lock held): timestamp, trace, context. own: the
 * span a span message is about. */
static void head(mon_client *m, call_t *c, const span_t *own) {
    buf_t *b = &c->e;
    const span_t *cur = own ? own : current_span(m);
    put_timestamp_cached(m, b, c->ms);
    if (cur || m->remote_trace[0]) {
        puts_(b, ",\"trace_id\":\"");
        put(b, cur ? cur->trace : m->remote_trace, 32);
        puts_(b, "\",\"span_id\":\"");
        put(b, cur ? cur->id : m->remote_span, 16);
        put(b, "\"", 1);
    }
    if (own && own->parent[0]) { puts_(b, ",\"parent_span_id\":\""); put(b, own->parent, 16); put(b, "\"", 1); }
    put_context(m, b, c->ctx, &c->f);
    puts_(b, ",\"data\":");
}

/* Closes the message and offers it to the queue, with head() unless headed (span calls, which
 * wrote it while changing the span table). Frees c. */
static int commit(mon_client *m, call_t *c, int headed) {
    const char *problem = NULL;
    int rc = 0, dropped_now = 0;
    put(&c->d, "}}\n", 3);
    if (!headed) c->ms = now_ns(CLOCK_REALTIME) / 1000000;
    lock(m);
    if (!headed) head(m, c, NULL);
    uint64_t len = (uint64_t)c->e.len + c->d.len, unreported = m->unreported;
    if (c->e.oom || c->d.oom) problem = "out of memory: message dropped";
    else if (c->e.big || c->d.big || len > MON_MAX_MESSAGE_BYTES) problem = "message over 1 MiB dropped";
    else if (len > m->cap) problem = "message larger than the whole queue dropped";
    else if (m->closing) problem = "call during close: message dropped";
    if (problem) {
        m->dropped++;
        rc = -1;
    } else {
        rc = push(m, c->e.p, c->e.len, c->d.p, c->d.len, &dropped_now);
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
    unlock(m);
    call_free(c);
    if (problem) report(m, problem);
    return rc;
}

static int refuse(mon_client *m, const char *what) {
    report(m, what);
    return -1;
}

/* ---- sender thread ------------------------------------------------------------------------- */

static int abandoned(mon_client *m) {
    lock(m);
    int a = m->abandon;
    unlock(m);
    return a;
}

/* A socket for one connection attempt: non-blocking, closed on exec, never raising SIGPIPE. */
static int open_socket(int family) {
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &(int){1}, sizeof(int));
#endif
    return fd;
}

/* A non-blocking connect, waited for up to CONNECT_TIMEOUT_MS while it is in progress (TCP; a
 * Unix socket connects or fails at once, EAGAIN when the sidecar's backlog is full). 0 or an
 * errno. */
static int connect_within(mon_client *m, int fd, const struct sockaddr *sa, socklen_t len) {
    int rc = connect(fd, sa, len);
    int e = rc == 0 ? 0 : errno;
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
    return rc == 0 ? 0 : (e ? e : ETIMEDOUT);
}

static int dial_unix(mon_client *m, char *err, size_t errlen) {
    struct sockaddr_un sa;
    size_t n = strlen(m->unix_path);
    int fd, e;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (n >= sizeof sa.sun_path) {
        snprintf(err, errlen, "unix socket path too long (%zu bytes, at most %zu): %.60s...", n, sizeof sa.sun_path - 1, m->unix_path);
        return -1;
    }
    memcpy(sa.sun_path, m->unix_path, n);
    if ((fd = open_socket(AF_UNIX)) < 0) e = errno;
    else if ((e = connect_within(m, fd, (const struct sockaddr *)&sa, (socklen_t)sizeof sa)) != 0) { close(fd); fd = -1; }
    if (fd < 0) snprintf(err, errlen, "connect to unix:%.100s failed (errno %d)", m->unix_path, e);
    return fd;
}

static int dial_tcp(mon_client *m, char *err, size_t errlen) {
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
            if ((ai->ai_family == AF_INET) != (pass == 0) || (fd = open_socket(ai->ai_family)) < 0) continue;
            if ((e = connect_within(m, fd, ai->ai_addr, ai->ai_addrlen)) != 0) { close(fd); fd = -1; }
        }
    freeaddrinfo(res);
    if (fd < 0) snprintf(err, errlen, "connect to %s:%d failed (errno %d)", m->host, m->port, e);
    return fd;
}

/* Writes the auth line on a new connection, within CONNECT_TIMEOUT_MS (an empty socket buffer
 * takes it at once). 0, or -1 with the connection's failure in err; the token is never in it. */
static int send_auth(mon_client *m, int fd, char *err, size_t errlen) {
    lock(m);
    size_t n = m->auth_len;
    char *line = n ? malloc(n) : NULL; /* a copy: mon_set_token may replace it meanwhile */
    if (line) memcpy(line, m->auth, n);
    unlock(m);
    if (n && !line) { snprintf(err, errlen, "out of memory for the auth line"); return -1; }
    size_t w = 0;
    int waited = 0, e = 0;
    while (w < n) {
        ssize_t r = send(fd, line + w, n - w, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) { w += (size_t)r; continue; }
        e = r < 0 ? errno : EPIPE;
        if (r < 0 && e == EINTR) continue;
        if (r < 0 && (e == EAGAIN || e == EWOULDBLOCK) && waited < CONNECT_TIMEOUT_MS && !abandoned(m)) {
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 100);
            waited += 100;
            continue;
        }
        break;
    }
    free(line);
    if (w == n) return 0;
    snprintf(err, errlen, "sending the auth line to the sidecar failed (errno %d)", e);
    return -1;
}

/* A new connection to the sidecar, the auth line written first when there is a token. */
static int dial(mon_client *m, char *err, size_t errlen) {
    int fd = m->unix_path ? dial_unix(m, err, errlen) : dial_tcp(m, err, errlen);
    if (fd >= 0 && send_auth(m, fd, err, errlen) != 0) { close(fd); fd = -1; }
    return fd;
}

enum { W_DONE, W_BLOCKED, W_FAILED }; /* all written; the socket is full; the connection is gone */

/* One non-blocking write of p1 and then p2 (either may be empty); *w: bytes written. The
 * sidecar only talks to refuse a stream (EOF, reset or an error line), so anything to read
 * first means the connection is gone: a restart does not swallow what we write next. */
static int write_once(int fd, const char *p1, size_t n1, const char *p2, size_t n2, size_t *w) {
    struct pollfd p = {fd, POLLIN, 0};
    struct iovec iov[2];
    struct msghdr mh;
    char tmp[512];
    ssize_t r;
    *w = 0;
    if (poll(&p, 1, 0) > 0) {
        r = recv(fd, tmp, sizeof tmp, MSG_DONTWAIT);
        if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return W_FAILED;
    }
    iov[0].iov_base = (void *)p1;
    iov[0].iov_len = n1;
    iov[1].iov_base = (void *)p2;
    iov[1].iov_len = n2;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = n2 ? 2 : 1;
    do r = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT); while (r < 0 && errno == EINTR);
    if (r < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? W_BLOCKED : W_FAILED;
    *w = (size_t)r;
    return *w == n1 + n2 ? W_DONE : W_BLOCKED;
}

/* The drop report, into m->rep (lock held); rep.len stays 0 when memory is short. */
static void build_report(mon_client *m) {
    char n[32];
    m->rep.len = 0;
    m->rep.oom = m->rep.big = 0;
    put(&m->rep, "{\"source\":", 10);
    put(&m->rep, m->source_json, m->source_json_len);
    puts_(&m->rep, ",\"type\":\"metric\",\"timestamp\":");
    put_timestamp(&m->rep);
    snprintf(n, sizeof n, "%llu", (unsigned long long)m->unreported);
    puts_(&m->rep, ",\"data\":{\"name\":\"sdk.dropped_messages\",\"value\":");
    puts_(&m->rep, n);
    puts_(&m->rep, ",\"unit\":\"count\",\"tags\":{\"reason\":\"buffer_full\"}}}\n");
    if (m->rep.oom || m->rep.big || m->source_big) m->rep.len = 0;
    m->rep_off = 0;
    m->rep_count = m->unreported;
}

/* Pins the oldest queued messages, up to BATCH_BYTES / BATCH_MAX (at least one), for the
 * sender to write without the lock (lock held, queue not empty). */
static void take(mon_client *m) {
    uint64_t n = queued(m), bytes = m->qbytes;
    if (n > BATCH_MAX || bytes > BATCH_BYTES)
        for (n = bytes = 0; n < queued(m) && n < BATCH_MAX; n++) {
            uint32_t len = m->lens[(m->lq + n) % m->lcap];
            if (n > 0 && bytes + len > BATCH_BYTES) break;
            bytes += len;
        }
    m->pinned = 1;
    m->fpos = m->qh;
    m->fbytes = bytes;
    m->fl = m->lq;
    m->fn = n;
    m->qh += bytes;
    m->lq += n;
    m->qbytes -= bytes;
    m->in_flight = (size_t)n;
}

/* Unpins the batch (lock held). Its messages from index g on (g_bytes into it) did not get
 * out: they go back to the front of the queue, unless callers dropped queued messages in the
 * meantime; these were newer, so then the batch's are dropped too. The bounds then apply as to
 * any queue. */
static void give_back(mon_client *m, uint64_t g, uint64_t g_bytes) {
    if (g < m->fn) {
        if (m->lq == m->fl + m->fn) {
            m->lq = m->fl + g;
            m->qh = m->fpos + g_bytes;
            m->qbytes += m->fbytes - g_bytes;
        } else {
            m->dropped += m->fn - g;
            m->unreported += m->fn - g;
        }
    }
    m->pinned = 0;
    m->in_flight = m->rest.len ? 1 : 0;
    while (queued(m) > m->max_msgs) drop_front(m);
    while (m->qbytes > m->max_bytes && queued(m) > 1) drop_front(m);
    rewind_if_empty(m);
}

static void timed_wait(pthread_cond_t *cv, pthread_mutex_t *lock, int64_t deadline_ns) {
    struct timespec ts;
    to_timespec(deadline_ns, &ts);
    pthread_cond_timedwait(cv, lock, &ts);
}

static void destroy(mon_client *m);

enum { K_REPORT, K_REST, K_BATCH };

/* Writes, in this order: the rest of a message the stream is in the middle of; the drop report;
 * a message cut by a full socket, again whole after a reconnect; the queue, a batch at a time.
 * A write either gets everything out (W_DONE), fills the socket (W_BLOCKED: a message cut in
 * the middle is copied to m->rest, the rest of the batch goes back to the queue, and the sender
 * waits for room without pinning anything) or fails (W_FAILED: what did not get out whole goes
 * back, the connection is closed). A JSON line missing only its newline counts as written when
 * the connection fails: the sidecar takes an unterminated last line at EOF. */
static void *sender_main(void *arg) {
    mon_client *m = arg;
    int64_t delay = BACKOFF_MIN_NS, linger_until = 0;
    char err[160];
    lock(m);
    while (!m->abandon) {
        int work = queued(m) || m->rest.len || m->rep.len;
        if (work && m->qbytes < COALESCE_BYTES && !m->rest.len && !m->rep.len && !m->closing && !m->kick && m->fd >= 0 &&
            now_ns(CLOCK_MONOTONIC) < linger_until) { /* a few messages: let more come */
            timed_wait(&m->wake, &m->lock, linger_until);
            continue;
        }
        if (!work) {
            if (m->closing) break;
            m->kick = 0; /* a flush is over once nothing is queued */
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
            unlock(m);
            int fd = dial(m, err, sizeof err);
            if (fd < 0) report(m, err);
            lock(m);
            if (fd < 0) {
                if (m->closing) break;
                m->retry_at = now_ns(CLOCK_MONOTONIC) + delay;
                delay = delay * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : delay * 2;
                continue;
            }
            m->fd = fd;
            m->connections++;
        }
        int fd = m->fd, kind, st;
        const char *p1, *p2 = NULL;
        size_t n1, n2 = 0, w;
        if (m->rest.len && m->rest_off) kind = K_REST;
        else if (m->rep.len || (m->unreported && (build_report(m), m->rep.len))) kind = K_REPORT;
        else if (m->rest.len) kind = K_REST;
        else kind = K_BATCH;
        if (kind == K_REPORT) { p1 = m->rep.p + m->rep_off; n1 = m->rep.len - m->rep_off; }
        else if (kind == K_REST) { p1 = m->rest.p + m->rest_off; n1 = m->rest.len - m->rest_off; }
        else {
            take(m);
            size_t off = (size_t)(m->fpos % m->cap);
            n1 = m->fbytes < m->cap - off ? (size_t)m->fbytes : (size_t)(m->cap - off);
            p1 = m->ring + off;
            n2 = (size_t)m->fbytes - n1;
            p2 = m->ring;
        }
        unlock(m);
        st = write_once(fd, p1, n1, p2, n2, &w);
        char *to_free = NULL;
        if (kind == K_BATCH) {
            /* the pinned messages are ours to read without the lock */
            uint64_t d = 0, d_bytes = 0, cut_off = 0, len = 0, left = w;
            buf_t cut = {0};
            for (; d < m->fn; d++, d_bytes += len, left -= len)
                if (left < (len = m->lens[(m->fl + d) % m->lcap])) { cut_off = left; break; }
            if (st == W_BLOCKED && cut_off > 0) { /* the stream is inside message d: keep a copy */
                if (grow(&cut, (size_t)len) == 0) {
                    size_t off = (size_t)((m->fpos + d_bytes) % m->cap), first = m->cap - off < len ? (size_t)(m->cap - off) : (size_t)len;
                    memcpy(cut.p, m->ring + off, first);
                    memcpy(cut.p + first, m->ring, (size_t)len - first);
                    cut.len = (size_t)len;
                } else {
                    st = W_FAILED; /* it cannot be finished: start over on a new connection */
                    free(cut.p);
                }
            }
            lock(m);
            if (st == W_BLOCKED && cut_off > 0) {
                m->rest = cut;
                m->rest_off = (size_t)cut_off;
                give_back(m, d + 1, d_bytes + len);
            } else {
                if (st == W_FAILED && cut_off > 0 && cut_off == len - 1) { d++; d_bytes += len; }
                give_back(m, d, d_bytes);
            }
            m->sent += d;
        } else if (kind == K_REPORT) {
            lock(m);
            if (st == W_DONE || (st == W_FAILED && m->rep_off + w + 1 == m->rep.len)) { m->unreported -= m->rep_count; m->rep.len = 0; }
            else if (st == W_BLOCKED) m->rep_off += w;
            else m->rep.len = 0; /* made again, with the count of then, after reconnecting */
        } else {
            lock(m);
            if (st == W_DONE || (st == W_FAILED && m->rest_off + w + 1 == m->rest.len)) {
                m->sent++;
                to_free = m->rest.p;
                memset(&m->rest, 0, sizeof m->rest);
                m->rest_off = 0;
                m->in_flight = 0;
            } else if (st == W_BLOCKED) m->rest_off += w;
            else m->rest_off = 0; /* sent whole again after reconnecting */
        }
        pthread_cond_broadcast(&m->drained);
        if (to_free) { unlock(m); free(to_free); lock(m); } /* callers never wait for free() */
        if (st == W_DONE) {
            delay = BACKOFF_MIN_NS;
            linger_until = now_ns(CLOCK_MONOTONIC) + LINGER_NS;
            continue;
        }
        if (st == W_BLOCKED) { /* the sidecar is not reading: wait for room, nothing pinned */
            struct pollfd p = {fd, POLLOUT, 0};
            unlock(m);
            poll(&p, 1, POLL_MS);
            lock(m);
            continue;
        }
        close(m->fd);
        m->fd = -1;
        m->retry_at = now_ns(CLOCK_MONOTONIC) + delay;
        delay = delay * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : delay * 2;
        unlock(m);
        report(m, "write to the sidecar failed; reconnecting");
        lock(m);
    }
    if (m->fd >= 0) close(m->fd);
    m->fd = -1;
    m->done = 1;
    pthread_cond_broadcast(&m->done_cv);
    pthread_cond_broadcast(&m->drained);
    int detached = m->detached;
    unlock(m);
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
        buf_free(&m->rest);
        buf_free(&m->rep);
        m->fd = -1;
        m->qh = m->wr = m->lq = m->lw = m->qbytes = 0;
        m->pinned = 0;
        m->in_flight = m->rest_off = m->rep_off = 0;
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

static void destroy(mon_client *m) {
    ctx_free(m->ctx, m->nctx);
    ctx_free(m->saved, m->nsaved);
    for (size_t i = 0; i < m->nspans; i++) free(m->spans[i].name);
    pthread_mutex_destroy(&m->lock);
    pthread_cond_destroy(&m->wake);
    pthread_cond_destroy(&m->drained);
    pthread_cond_destroy(&m->done_cv);
    buf_free(&m->rest);
    buf_free(&m->rep);
    free(m->ctx_obj); free(m->spans); free(m->ring); free(m->lens);
    free(m->source); free(m->source_json); free(m->host); free(m->unix_path); free(m->auth); free(m);
}

/* The auth line for token ({"auth":TOKEN}\n, the token JSON-escaped), or NULL when memory is short. */
static char *auth_line(const char *token, size_t *len) {
    buf_t b = {0};
    put(&b, "{\"auth\":", 8);
    put_str(&b, token);
    put(&b, "}\n", 2);
    if (b.oom || b.big) { free(b.p); return NULL; }
    *len = b.len;
    return b.p;
}

/* mon_init with the queue's sizes given (the tests use small ones). */
static mon_client *create(const char *source, const char *host, int port, const ring_cfg *cfg) {
    pthread_once(&reg_once, install_atfork);
    mon_client *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    const char *env_source = getenv("MONITORING_SOURCE"), *sidecar = getenv("MONITORING_SIDECAR");
    const char *env_token = getenv("MONITORING_SIDECAR_TOKEN");
    const char *bad = NULL, *bad_ctx = NULL;
    buf_t sj = {0};
    m->fd = -1;
    m->port = port > 0 ? port : MON_DEFAULT_PORT;
    m->ts_sec = INT64_MIN;
    m->source = strdup(env_source && *env_source ? env_source : source ? source : "unknown");
    m->host = strdup(host && *host ? host : MON_DEFAULT_HOST);
    int oom = !m->host;
    if (host && strncmp(host, "unix:", 5) == 0 && host[5]) oom |= !(m->unix_path = strdup(host + 5));
    if (sidecar && strncmp(sidecar, "unix:", 5) == 0 && sidecar[5]) {
        free(m->unix_path);
        oom |= !(m->unix_path = strdup(sidecar + 5));
    } else if (sidecar && *sidecar) {
        const char *colon = strrchr(sidecar, ':');
        char *end = NULL;
        long p = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || !colon[1] || *end || p <= 0 || p > 65535) bad = "ignoring malformed MONITORING_SIDECAR (expected host:port or unix:/path)";
        else {
            const char *h = sidecar;
            size_t hl = (size_t)(colon - sidecar);
            if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') { h++; hl -= 2; }
            char *nh = hl ? strndup(h, hl) : strdup(MON_DEFAULT_HOST);
            if (nh) { free(m->host); m->host = nh; m->port = (int)p; free(m->unix_path); m->unix_path = NULL; }
        }
    }
    if (env_token && *env_token) {
        oom |= !(m->auth = auth_line(env_token, &m->auth_len));
        m->env_token = 1;
    }
    if (m->source) put_str(&sj, m->source);
    m->source_json = sj.p;
    m->source_json_len = sj.len;
    m->source_big = sj.big; /* every message would be over the limit: all are dropped */
    m->cap = cfg->ring_bytes;
    m->max_msgs = cfg->max_msgs;
    m->max_bytes = cfg->max_bytes;
    m->lcap = 2 * cfg->max_msgs + BATCH_MAX; /* room for a batch, and for drops during its write */
    if (m->cap > 0 && m->cap < 0x80000000u && m->cap <= (size_t)-1 && m->lcap <= (size_t)-1 / sizeof *m->lens) {
        m->ring = malloc((size_t)m->cap);
        m->lens = malloc((size_t)m->lcap * sizeof *m->lens);
    }
    if (m->ring && m->lens) { /* written now, so that no call takes a page fault on first use */
        memset(m->ring, '\n', (size_t)m->cap); /* not 0: malloc+memset(0) may become a lazy calloc */
        memset(m->lens, 0xff, (size_t)m->lcap * sizeof *m->lens);
    }
    if (!m->source || oom || sj.oom || !m->ring || !m->lens) {
        free(m->source); free(m->host); free(m->source_json); free(m->ring); free(m->lens); free(m->unix_path); free(m->auth); free(m);
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
    ctx_cache(m);
    if (bad) report(m, bad);
    if (bad_ctx) report(m, bad_ctx);
    pthread_mutex_lock(&reg_lock);
    m->next = reg_head;
    reg_head = m;
    pthread_mutex_unlock(&reg_lock);
    return m;
}

mon_client *mon_init(const char *source, const char *host, int port) {
    /* the queue's bounds, plus room for the batch being written (at most one whole message) */
    static const ring_cfg cfg = {MON_MAX_BYTES + MON_MAX_MESSAGE_BYTES, MON_MAX_MESSAGES, MON_MAX_BYTES};
    return create(source, host, port, &cfg);
}

int mon_set_token(mon_client *m, const char *token) {
    if (!m) return -1;
    size_t len = 0;
    char *line = token && *token ? auth_line(token, &len) : NULL;
    if (token && *token && !line) return -1;
    lock(m);
    if (m->env_token) { /* MONITORING_SIDECAR_TOKEN wins, as MONITORING_SIDECAR does over mon_init's address */
        unlock(m);
        free(line);
        return 0;
    }
    char *old = m->auth;
    m->auth = line;
    m->auth_len = len;
    unlock(m);
    free(old);
    return 0;
}

void mon_set_error_handler(mon_client *m, mon_error_fn fn, void *arg) {
    if (!m) return;
    lock(m);
    m->on_error = fn;
    m->on_error_arg = arg;
    unlock(m);
}

int mon_log_event(mon_client *m, const char *level, const char *message, const mon_kv *ctx) {
    char lv[16];
    size_t n = level ? strlen(level) : 0;
    call_t c;
    if (!m) return -1;
    if (!level) level = "info";
    else if (n < sizeof lv) {
        for (size_t i = 0; i <= n; i++) lv[i] = (char)(level[i] >= 'A' && level[i] <= 'Z' ? level[i] + 32 : level[i]);
        level = strcmp(lv, "warn") ? lv : "warning";
    }
    call_begin(m, &c, "event", ctx);
    puts_(&c.d, "{\"level\":");
    put_str(&c.d, level);
    puts_(&c.d, ",\"message\":");
    put_str(&c.d, message);
    return commit(m, &c, 0);
}

int mon_log_metric(mon_client *m, const char *name, double value, const char *unit, const mon_kv *tags) {
    call_t c;
    int first = 1;
    if (!m) return -1;
    if (!isfinite(value)) return refuse(m, "log_metric: value is not a finite number");
    call_begin(m, &c, "metric", NULL);
    puts_(&c.d, "{\"name\":");
    put_str(&c.d, name);
    puts_(&c.d, ",\"value\":");
    put_num(&c.d, value);
    if (unit) { puts_(&c.d, ",\"unit\":"); put_str(&c.d, unit); }
    size_t mark = c.d.len;
    puts_(&c.d, ",\"tags\":{");
    put_kvs(&c.d, tags, NULL, 0, &first);
    if (first) c.d.len = mark;
    else put(&c.d, "}", 1);
    return commit(m, &c, 0);
}

int mon_log_progress(mon_client *m, const char *job_id, double percent, const char *status) {
    call_t c;
    if (!m) return -1;
    if (!isfinite(percent)) return refuse(m, "log_progress: percent is not a finite number");
    call_begin(m, &c, "progress", NULL);
    puts_(&c.d, "{\"job_id\":");
    put_str(&c.d, job_id);
    puts_(&c.d, ",\"percent\":");
    put_num(&c.d, percent);
    puts_(&c.d, ",\"status\":");
    put_str(&c.d, status ? status : "running");
    return commit(m, &c, 0);
}

int mon_log_resource(mon_client *m, double cpu, double mem, double disk, double net) {
    static const char *const keys[] = {"cpu_percent", "memory_mb", "disk_io_mb", "network_io_mb"};
    double v[4] = {cpu, mem, disk, net};
    call_t c;
    int first = 1;
    if (!m) return -1;
    for (int i = 0; i < 4; i++)
        if (isinf(v[i])) return refuse(m, "log_resource: a value is infinite");
    call_begin(m, &c, "resource", NULL);
    put(&c.d, "{", 1);
    for (int i = 0; i < 4; i++) {
        if (isnan(v[i])) continue;
        puts_(&c.d, first ? "\"" : ",\"");
        first = 0;
        puts_(&c.d, keys[i]);
        puts_(&c.d, "\":");
        put_num(&c.d, v[i]);
    }
    return commit(m, &c, 0);
}

int mon_start_span(mon_client *m, const char *name, char out[17]) {
    span_t s;
    call_t c;
    memset(&s, 0, sizeof s);
    if (!m) { if (out) memset(out, '0', 16), out[16] = '\0'; return -1; }
    s.name = strdup(name ? name : "");
    call_begin(m, &c, "span", NULL);
    c.ms = now_ns(CLOCK_REALTIME) / 1000000;
    lock(m);
    span_t *cur = current_span(m);
    random_hex(m, s.id, 8);
    if (out) memcpy(out, s.id, 17);
    if (cur) { memcpy(s.trace, cur->trace, 33); memcpy(s.parent, cur->id, 17); }
    else if (m->remote_trace[0]) { memcpy(s.trace, m->remote_trace, 33); memcpy(s.parent, m->remote_span, 17); }
    else random_hex(m, s.trace, 16);
    s.t0 = now_ns(CLOCK_MONOTONIC);
    s.thread = pthread_self();
    s.root = m->nspans == 0; /* of the client, not the thread: the context is the client's */
    if (m->nspans == m->capspans) {
        size_t cap = m->capspans ? m->capspans * 2 : 8;
        span_t *p = realloc(m->spans, cap * sizeof *p);
        if (p) { m->spans = p; m->capspans = cap; }
    }
    if (!s.name || m->nspans == m->capspans) {
        unlock(m);
        free(s.name);
        call_free(&c);
        return refuse(m, "start_span: out of memory");
    }
    m->spans[m->nspans++] = s;
    if (s.root) m->in_root = 1;
    export_traceparent(m);
    head(m, &c, &s);
    unlock(m);
    puts_(&c.d, "{\"name\":");
    put_str(&c.d, s.name);
    puts_(&c.d, ",\"phase\":\"start\"");
    return commit(m, &c, 1);
}

int mon_end_span(mon_client *m, const char *span_id, const char *status) {
    span_t s;
    call_t c;
    size_t i;
    if (!m) return -1;
    call_begin(m, &c, "span", NULL);
    c.ms = now_ns(CLOCK_REALTIME) / 1000000;
    lock(m);
    for (i = m->nspans; i-- > 0 && !(span_id && !strcmp(m->spans[i].id, span_id));) {}
    if (i == (size_t)-1) {
        unlock(m);
        call_free(&c);
        return refuse(m, "end_span: no active span with this id");
    }
    s = m->spans[i];
    memmove(m->spans + i, m->spans + i + 1, (m->nspans - i - 1) * sizeof s);
    m->nspans--;
    export_traceparent(m);
    head(m, &c, &s);
    if (s.root) ctx_restore(m); /* after head(): the end message carries the span's context */
    unlock(m);
    int64_t us = (now_ns(CLOCK_MONOTONIC) - s.t0 + 500) / 1000;
    puts_(&c.d, "{\"name\":");
    put_str(&c.d, s.name);
    puts_(&c.d, ",\"phase\":\"end\",\"status\":");
    put_str(&c.d, status ? status : "success");
    puts_(&c.d, ",\"duration_ms\":");
    put_num(&c.d, (double)us / 1000.0);
    free(s.name);
    return commit(m, &c, 1);
}

/* Sets key to the encoded val (taken), or removes it (val NULL). */
static int ctx_set(mon_client *m, const char *key, char *val) {
    lock(m);
    int rc = ctx_save(m);
    if (rc) free(val); /* no copy to restore from: the context stays as it is */
    else {
        rc = ctx_put(m, key, strlen(key), val);
        ctx_cache(m);
        export_context(m);
    }
    unlock(m);
    return rc ? refuse(m, "set_context: out of memory") : 0;
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
    return ctx_set(m, key, val.p);
}

int mon_set_context(mon_client *m, const char *key, const char *value) {
    buf_t val = {0};
    if (!m || !key) return -1;
    if (!value) return mon_set_context_json(m, key, NULL);
    put_str(&val, value);
    put(&val, "", 1);
    if (val.oom || val.big) { free(val.p); return refuse(m, "set_context: value too large or out of memory"); }
    return ctx_set(m, key, val.p);
}

int mon_flush(mon_client *m, int timeout_ms) {
    if (!m) return -1;
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
    lock(m);
    m->kick = 1;
    pthread_cond_signal(&m->wake);
    while ((queued(m) || m->in_flight || m->rep.len) && m->started && !m->done && now_ns(CLOCK_MONOTONIC) < deadline)
        timed_wait(&m->drained, &m->lock, deadline);
    int rc = queued(m) || m->in_flight || m->rep.len ? -1 : 0;
    unlock(m);
    return rc;
}

int mon_close(mon_client *m, int timeout_ms) {
    if (!m) return -1;
    pthread_mutex_lock(&reg_lock);
    for (mon_client **p = &reg_head; *p; p = &(*p)->next)
        if (*p == m) { *p = m->next; break; }
    pthread_mutex_unlock(&reg_lock);
    int64_t deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
    lock(m);
    m->closing = 1;
    pthread_cond_signal(&m->wake);
    while (m->started && !m->done && now_ns(CLOCK_MONOTONIC) < deadline) timed_wait(&m->done_cv, &m->lock, deadline);
    if (m->started && !m->done) { /* a sidecar that stopped reading: the thread cleans up itself */
        pthread_t thread = m->thread; /* m may be freed as soon as the lock is released */
        m->abandon = m->detached = 1;
        pthread_cond_signal(&m->wake);
        unlock(m);
        pthread_detach(thread);
        return -1;
    }
    int rc = queued(m) || m->in_flight ? -1 : 0;
    unlock(m);
    if (m->started) pthread_join(m->thread, NULL);
    destroy(m);
    return rc;
}

void mon_statistics(mon_client *m, mon_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!m) return;
    lock(m);
    out->queued = queued(m) + m->in_flight;
    out->sent = m->sent;
    out->dropped = m->dropped;
    out->reconnects = m->connections > 1 ? m->connections - 1 : 0;
    out->errors = m->errors;
    unlock(m);
}
