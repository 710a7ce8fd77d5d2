/* The R SDK's hot path in C: a client's line builder, bounded buffer and non-blocking socket.
 *
 * R-level code costs about a microsecond per function call and allocates on every one, which
 * made a message cost ~90 us and let R's garbage collector set the tail. Here one .Call per
 * log_event/log_metric builds the whole JSON line (envelope, escaping, timestamp), then writes
 * it to a non-blocking socket or appends it to the buffer, without allocating R objects.
 *
 * Nothing here raises an R error. An argument that is not of the simple kinds handled here
 * (a factor, a list value that is not one string, a non-ASCII level, ...) makes the call return
 * FALSE and the R code takes its slower general path, which validates, normalises and then
 * hands a ready encoded data object to C_emit. TRUE means "done, and problems (connection lost,
 * dropping) are waiting for the R side to report"; NULL means done.
 *
 * Every string that reaches the wire goes through esc(): the same escaping as jsonlite's
 * C_escape_chars (", \, \b \t \n \f \r, other C0 controls as \u00xx; '/', DEL and U+2028 as
 * they are), text as UTF-8 (latin1 converted, bytes that are not UTF-8 become U+FFFD).
 */
#define R_NO_REMAP
#include <R.h>
#include <Rinternals.h>
#include <R_ext/Rdynload.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 30.0
#define PUMP_BUDGET 65536    /* bytes one API call writes at most while draining a backlog */
#define MAX_IOV 64
/* Within this many seconds of the last write that pushed data out, writes are made with
 * MSG_MORE: the kernel holds them (until a full segment, the next push, or at most ~200 ms by
 * its own timer) instead of sending a packet and waking the sidecar for every message. That
 * wake-up is what stretches a call on a busy machine (the sidecar preempts the caller). */
#define PUSH_INTERVAL 0.005
#define MAX_PROBLEMS 32

enum { R_BUFFER_FULL = 0, R_TOO_LARGE = 1, R_UNSENT_AT_CLOSE = 2, N_REASONS = 3 };
static const char *REASONS[N_REASONS] = {"buffer_full", "too_large", "unsent_at_close"};

typedef struct { char *p; size_t n; } msg_t;
typedef struct { char *p; size_t n, cap; } sbuf;

typedef struct {
    pid_t pid;
    /* connection */
    char host[256], port[16];
    char unix_path[108];          /* set: the sidecar's Unix socket, in place of host and port */
    char *auth;                   /* the auth line written first on every connection, or NULL */
    size_t auth_n, auth_off;
    int auth_due;                 /* this connection has not had all of it yet */
    int fd;                       /* -1: none */
    int connecting;               /* a non-blocking connect is in progress on fd */
    struct addrinfo *addrs, *addr;  /* the resolved addresses and the one being tried */
    double connect_deadline, connect_timeout;
    double next_try, backoff;
    /* buffer: whole messages not yet started, oldest at head */
    msg_t *ring;
    int cap, head, n, max_messages;
    double qbytes, max_bytes, max_message_bytes;
    /* bytes being written ahead of the buffer: a drop report (counts set) or a started message */
    char *front;
    size_t front_n, front_off;
    int front_is_report;
    double front_counts[N_REASONS];
    double pending[N_REASONS], dropped[N_REASONS];
    double sent, connects;
    double last_push;             /* when a write last pushed data out (no MSG_MORE) */
    /* constant parts of a line */
    sbuf prefix;                  /* {"source":"..." */
    sbuf ctx;                     /* the context object, or empty */
    sbuf ctx_keys;                /* its keys, encoded, each followed by a NUL */
    int n_ctx_keys;
    sbuf ids;                     /* ,"trace_id":"...","span_id":"..." of the current span, or empty */
    sbuf line;                    /* scratch */
    /* problems for the R side: kind and text */
    int n_problems;
    char *problem_kind[MAX_PROBLEMS], *problem_text[MAX_PROBLEMS];
} client;

static SEXP s_ptr;
static int native_latin1 = 0;   /* the session's native encoding is latin1 (set from R) */

/* -- small buffers --------------------------------------------------------------------------- */

static int sb_reserve(sbuf *b, size_t more) {
    if (b->n + more <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + more) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

static int sb_add(sbuf *b, const char *s, size_t n) {
    if (!n) return 1;
    if (!sb_reserve(b, n)) return 0;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 1;
}

#define SB_LIT(b, s) sb_add((b), (s), sizeof(s) - 1)

static int sb_set(sbuf *b, const char *s, size_t n) {
    b->n = 0;
    return sb_add(b, s, n);
}

static void sb_free(sbuf *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* -- JSON ------------------------------------------------------------------------------------ */

static const char HEX[] = "0123456789abcdef";

/* Length of the valid UTF-8 sequence at s (strict: no overlongs, surrogates or > U+10FFFF),
 * 0 if none. */
static int utf8_seq(const unsigned char *s, const unsigned char *end) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2 || c > 0xF4) return 0;
    if (c < 0xE0) return (end - s >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c < 0xF0) {
        if (end - s < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;   /* overlong */
        if (c == 0xED && s[1] > 0x9F) return 0;   /* surrogate */
        return 3;
    }
    if (end - s < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
    if (c == 0xF0 && s[1] < 0x90) return 0;       /* overlong */
    if (c == 0xF4 && s[1] > 0x8F) return 0;       /* > U+10FFFF */
    return 4;
}

static int valid_utf8(const unsigned char *s, size_t n) {
    const unsigned char *end = s + n;
    while (s < end) {
        int k = utf8_seq(s, end);
        if (!k) return 0;
        s += k;
    }
    return 1;
}

/* Appends s as a JSON string: latin1 text converted, else UTF-8 with each byte that does not
 * start a valid sequence replaced by U+FFFD. */
static int esc_bytes(sbuf *b, const unsigned char *s, size_t n, int latin1) {
    const unsigned char *end = s + n;
    if (!sb_reserve(b, n * 6 + 2)) return 0;
    char *o = b->p + b->n;
    *o++ = '"';
    while (s < end) {
        unsigned char c = *s;
        if (c >= 0x80) {
            if (latin1) {
                *o++ = (char) (0xC0 | (c >> 6));
                *o++ = (char) (0x80 | (c & 0x3F));
                s++;
                continue;
            }
            int k = utf8_seq(s, end);
            if (k) {
                memcpy(o, s, (size_t) k);
                o += k;
                s += k;
            } else {
                *o++ = (char) 0xEF; *o++ = (char) 0xBF; *o++ = (char) 0xBD;
                s++;
            }
            continue;
        }
        s++;
        if (c >= 0x20 && c != '"' && c != '\\') { *o++ = (char) c; continue; }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u'; *o++ = '0'; *o++ = '0';
            *o++ = HEX[c >> 4]; *o++ = HEX[c & 15];
        }
    }
    *o++ = '"';
    b->n = (size_t) (o - b->p);
    return 1;
}

/* Appends the JSON string for x (a CHARSXP), or null for NA. Text marked latin1 is converted;
 * unmarked text in a latin1 session too, unless it is valid UTF-8 (as Rscript reads files). */
static int esc(sbuf *b, SEXP x) {
    if (x == NA_STRING) return SB_LIT(b, "null");
    const unsigned char *s = (const unsigned char *) CHAR(x);
    size_t n = (size_t) LENGTH(x);
    cetype_t ce = Rf_getCharCE(x);
    int latin1 = ce == CE_LATIN1 || (ce == CE_NATIVE && native_latin1 && !valid_utf8(s, n));
    return esc_bytes(b, s, n, latin1);
}

/* Numbers that read back exactly: 15 significant digits when enough, else 17. */
static int num(sbuf *b, double v) {
    char tmp[40];
    int k = snprintf(tmp, sizeof tmp, "%.15g", v);
    if (strtod(tmp, NULL) != v) k = snprintf(tmp, sizeof tmp, "%.17g", v);
    return sb_add(b, tmp, (size_t) k);
}

/* RFC 3339 UTC with milliseconds; the date and time part is formatted once per second. */
static int timestamp(sbuf *b) {
    static time_t cached = (time_t) -1;
    static char prefix[32];
    static size_t prefix_n;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != cached) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        prefix_n = strftime(prefix, sizeof prefix, "%Y-%m-%dT%H:%M:%S", &tm);
        cached = ts.tv_sec;
    }
    char tail[8];
    int ms = (int) (ts.tv_nsec / 1000000);
    tail[0] = '.';
    tail[1] = (char) ('0' + ms / 100);
    tail[2] = (char) ('0' + ms / 10 % 10);
    tail[3] = (char) ('0' + ms % 10);
    tail[4] = 'Z';
    return sb_add(b, prefix, prefix_n) && sb_add(b, tail, 5);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double) ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -- the client object ----------------------------------------------------------------------- */

static void problem(client *c, const char *kind, const char *text) {
    if (c->n_problems >= MAX_PROBLEMS) return;  /* the R side reports them after every call */
    char *k = strdup(kind), *t = strdup(text);
    if (!k || !t) { free(k); free(t); return; }
    c->problem_kind[c->n_problems] = k;
    c->problem_text[c->n_problems] = t;
    c->n_problems++;
}

static void count_drop(client *c, int reason, double count) {
    if (c->pending[reason] == 0) {
        char text[160];
        snprintf(text, sizeof text, "dropping messages (%s); they are counted and reported to the sidecar",
                 REASONS[reason]);
        problem(c, REASONS[reason], text);
    }
    c->pending[reason] += count;
    c->dropped[reason] += count;
}

static void ring_clear(client *c) {
    for (int i = 0; i < c->n; i++) free(c->ring[(c->head + i) % c->cap].p);
    c->head = 0;
    c->n = 0;
    c->qbytes = 0;
}

/* Removes the oldest message; the caller frees it. */
static msg_t ring_pop(client *c) {
    msg_t m = c->ring[c->head];
    c->head = (c->head + 1) % c->cap;
    c->n--;
    c->qbytes -= (double) m.n;
    return m;
}

static int ring_grow(client *c) {
    int cap = c->cap ? c->cap * 2 : 16;
    if (cap > c->max_messages) cap = c->max_messages;
    msg_t *r = malloc(sizeof(msg_t) * (size_t) cap);
    if (!r) return 0;
    for (int i = 0; i < c->n; i++) r[i] = c->ring[(c->head + i) % c->cap];
    free(c->ring);
    c->ring = r;
    c->cap = cap;
    c->head = 0;
    return 1;
}

/* Takes ownership of m: appends it, dropping the oldest while the buffer is full. */
static void enqueue(client *c, msg_t m) {
    while (c->n > 0 && (c->n >= c->max_messages || c->qbytes + (double) m.n > c->max_bytes)) {
        free(ring_pop(c).p);
        count_drop(c, R_BUFFER_FULL, 1);
    }
    if (c->n == c->cap && !ring_grow(c)) {
        free(m.p);
        count_drop(c, R_BUFFER_FULL, 1);
        return;
    }
    c->ring[(c->head + c->n) % c->cap] = m;
    c->n++;
    c->qbytes += (double) m.n;
}

/* Puts a message back at the front (a started one, after its connection was lost). */
static int push_front(client *c, msg_t m) {
    if (c->n >= c->max_messages || c->qbytes + (double) m.n > c->max_bytes) return 0;
    if (c->n == c->cap && !ring_grow(c)) return 0;
    c->head = (c->head - 1 + c->cap) % c->cap;
    c->ring[c->head] = m;
    c->n++;
    c->qbytes += (double) m.n;
    return 1;
}

static void free_addrs(client *c) {
    if (c->addrs) freeaddrinfo(c->addrs);
    c->addrs = c->addr = NULL;
}

static void disconnect(client *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->connecting = 0;
    c->auth_due = 0;
    free_addrs(c);
    if (!c->front) return;
    /* A started message goes back to the front of the buffer, to be sent whole on the next
     * connection; a started report's counts go back to the pending ones. */
    if (c->front_is_report) {
        for (int r = 0; r < N_REASONS; r++) c->pending[r] += c->front_counts[r];
        free(c->front);
    } else {
        msg_t m = {c->front, c->front_n};
        if (!push_front(c, m)) {
            free(c->front);
            count_drop(c, R_BUFFER_FULL, 1);
        }
    }
    c->front = NULL;
    c->front_n = c->front_off = 0;
    c->front_is_report = 0;
}

static int fail(client *c, const char *why) {
    disconnect(c);
    c->next_try = now() + c->backoff;
    c->backoff = c->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : c->backoff * 2;
    problem(c, "connection", why);
    return 0;
}

static void connected(client *c) {
    c->connecting = 0;
    c->auth_due = c->auth != NULL;  /* the auth line goes ahead of everything on this connection */
    c->auth_off = 0;
    free_addrs(c);
    c->backoff = BACKOFF_MIN;
    c->connects++;
    c->last_push = 0;
}

/* Starts a non-blocking connect to the current address, else the next ones. 1: connected at
 * once, 0: in progress (c->connecting) or failed (no fd). */
static int try_addresses(client *c) {
    for (; c->addr; c->addr = c->addr->ai_next) {
        int fd = socket(c->addr->ai_family, c->addr->ai_socktype | SOCK_CLOEXEC, c->addr->ai_protocol);
        if (fd < 0) continue;
        int flags = fcntl(fd, F_GETFL, 0);
        if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) { close(fd); continue; }
        if (connect(fd, c->addr->ai_addr, c->addr->ai_addrlen) == 0) {
            c->fd = fd;
            connected(c);
            return 1;
        }
        if (errno == EINPROGRESS) {
            c->fd = fd;
            c->connecting = 1;
            return 0;
        }
        close(fd);
    }
    return 0;
}

/* A Unix socket connects or fails at once (EAGAIN: the sidecar's backlog is full, retried with
 * the backoff), so the non-blocking connect never waits; what follows is the TCP path's. */
static int start_connect_unix(client *c) {
    char text[400];
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, c->unix_path, strlen(c->unix_path));
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), flags = fd < 0 ? -1 : fcntl(fd, F_GETFL, 0);
    if (flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0) {
        if (connect(fd, (struct sockaddr *) &sa, sizeof sa) == 0) {
            c->fd = fd;
            connected(c);
            return 1;
        }
        if (errno == EINPROGRESS) {
            c->fd = fd;
            c->connecting = 1;
            c->connect_deadline = now() + c->connect_timeout;
            return 0;
        }
    }
    snprintf(text, sizeof text, "cannot connect to unix:%s: %s", c->unix_path, strerror(errno));
    if (fd >= 0) close(fd);
    return fail(c, text);
}

static int start_connect(client *c) {
    char text[400];
    if (c->unix_path[0]) return start_connect_unix(c);
    snprintf(text, sizeof text, "cannot connect to %s:%s", c->host, c->port);
    free_addrs(c);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    if (getaddrinfo(c->host, c->port, &hints, &c->addrs) != 0) {
        c->addrs = NULL;
        return fail(c, text);
    }
    c->addr = c->addrs;
    c->connect_deadline = now() + c->connect_timeout;
    if (try_addresses(c)) return 1;
    if (!c->connecting) return fail(c, text);
    return 0;
}

/* Checks a connect in progress, waiting up to `wait` seconds. 1 once connected. */
static int check_connect(client *c, double wait) {
    char text[400];
    if (c->unix_path[0]) snprintf(text, sizeof text, "cannot connect to unix:%s", c->unix_path);
    else snprintf(text, sizeof text, "cannot connect to %s:%s", c->host, c->port);
    double left = c->connect_deadline - now();
    if (wait > left) wait = left;
    if (wait < 0) wait = 0;
    struct pollfd p = {c->fd, POLLOUT, 0};
    int r = poll(&p, 1, (int) (wait * 1000));
    if (r == 0) {
        if (now() >= c->connect_deadline) return fail(c, text);
        return 0;
    }
    int err = 0;
    socklen_t len = sizeof err;
    if (r < 0 || getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
        close(c->fd);           /* this address refused: the next one, if any */
        c->fd = -1;
        c->connecting = 0;
        if (c->addr) c->addr = c->addr->ai_next;
        if (try_addresses(c)) return 1;
        if (!c->connecting) return fail(c, text);
        return 0;
    }
    connected(c);
    return 1;
}

/* The drop counts, as metric messages written before anything else once a connection is up. */
static void prepare_report(client *c) {
    sbuf b = {0};
    for (int r = 0; r < N_REASONS; r++) {
        c->front_counts[r] = c->pending[r];
        if (c->pending[r] == 0) continue;
        int ok = sb_add(&b, c->prefix.p, c->prefix.n) && SB_LIT(&b, ",\"type\":\"metric\",\"timestamp\":\"") &&
                 timestamp(&b) && SB_LIT(&b, "\",\"data\":{\"name\":\"sdk.dropped_messages\",\"value\":") &&
                 num(&b, c->pending[r]) && SB_LIT(&b, ",\"unit\":\"count\",\"tags\":{\"reason\":\"") &&
                 sb_add(&b, REASONS[r], strlen(REASONS[r])) && SB_LIT(&b, "\"}}}\n");
        if (!ok) { sb_free(&b); return; }  /* out of memory: the counts stay pending */
    }
    for (int r = 0; r < N_REASONS; r++) c->pending[r] = 0;
    c->front = b.p;
    c->front_n = b.n;
    c->front_off = 0;
    c->front_is_report = 1;
}

static int pending_drops(client *c) {
    return c->pending[0] > 0 || c->pending[1] > 0 || c->pending[2] > 0;
}

static int backlog(client *c) {
    return c->n > 0 || c->front != NULL || pending_drops(c);
}

/* MSG_MORE unless a push is due; a push is noted. */
static int more_flag(client *c, int push) {
    double t = now();
    if (!push && t - c->last_push < PUSH_INTERVAL) return MSG_MORE;
    c->last_push = t;
    return 0;
}

/* Sends what the kernel holds back after writes made with MSG_MORE. */
static void push_out(client *c) {
    int off = 0;
    if (c->fd >= 0 && !c->connecting && !c->unix_path[0]) setsockopt(c->fd, IPPROTO_TCP, TCP_CORK, &off, sizeof off);
    c->last_push = now();
}

/* Accounts for `k` bytes written from the front: the front, then whole messages; a message
 * written in part moves ahead of the buffer, so that dropping the oldest never cuts a line. */
static void consume(client *c, size_t k) {
    if (c->auth_due) { /* the auth line, which is no message */
        size_t left = c->auth_n - c->auth_off;
        if (k < left) { c->auth_off += k; return; }
        k -= left;
        c->auth_due = 0;
    }
    if (c->front) {
        size_t left = c->front_n - c->front_off;
        if (k < left) { c->front_off += k; return; }
        k -= left;
        if (!c->front_is_report) c->sent++;
        free(c->front);
        c->front = NULL;
        c->front_n = c->front_off = 0;
        c->front_is_report = 0;
    }
    while (k > 0 && c->n > 0) {
        msg_t m = ring_pop(c);
        if (k >= m.n) {
            k -= m.n;
            free(m.p);
            c->sent++;
        } else {
            c->front = m.p;
            c->front_n = m.n;
            c->front_off = k;
            c->front_is_report = 0;
            k = 0;
        }
    }
}

/* Reads what the sidecar said. The sidecar only talks to refuse a stream: readable means EOF,
 * a reset or an error line (possibly followed by EOF, so reading goes on until nothing is
 * left). 0 when the connection is gone. */
static int check_readable(client *c) {
    for (;;) {
        char buf[4097];
        ssize_t r = recv(c->fd, buf, 4096, MSG_DONTWAIT);
        if (r == 0) return fail(c, "the sidecar closed the connection");
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
            char text[300];
            snprintf(text, sizeof text, "connection to the sidecar lost: %s", strerror(errno));
            return fail(c, text);
        }
        size_t j = 0;
        for (ssize_t i = 0; i < r; i++) if (buf[i]) buf[j++] = buf[i];
        buf[j] = 0;
        char text[4200];
        snprintf(text, sizeof text, "sidecar said: %s", buf);
        problem(c, "sidecar", text);
    }
}

/* Opportunistic I/O: connect when the backoff allows, then write what the socket takes now (up
 * to `budget` bytes, waiting for room until `deadline`, 0 for no waiting). */
static void pump(client *c, double budget, double deadline, int push) {
    if (c->fd < 0) {
        if (now() < c->next_try) return;
        if (!start_connect(c) && c->fd < 0) return;
    }
    if (c->connecting && !check_connect(c, deadline > 0 ? deadline - now() : 0)) return;
    struct pollfd p = {c->fd, POLLIN | POLLOUT, 0};
    if (poll(&p, 1, 0) < 0) return;
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) && !check_readable(c)) return;
    int writable = (p.revents & POLLOUT) != 0;
    if (!c->front && pending_drops(c)) prepare_report(c);
    double written = 0;
    while ((c->front || c->n > 0) && written < budget) {
        if (!writable) {
            double wait = deadline - now();
            if (deadline <= 0 || wait <= 0) break;
            if (wait > 0.05) wait = 0.05;
            p.events = POLLOUT;
            p.revents = 0;
            int r = poll(&p, 1, (int) (wait * 1000) + 1);
            if (r < 0 && errno != EINTR) break;
            if (r <= 0) continue;
            if (p.revents & (POLLERR | POLLHUP)) {
                check_readable(c);
                if (c->fd < 0) return;
            }
            writable = 1;
            continue;
        }
        struct iovec iov[MAX_IOV];
        int k = 0;
        size_t total = 0;
        if (c->auth_due) {
            iov[k].iov_base = c->auth + c->auth_off;
            iov[k].iov_len = c->auth_n - c->auth_off;
            total += iov[k++].iov_len;
        }
        if (c->front) {
            iov[k].iov_base = c->front + c->front_off;
            iov[k].iov_len = c->front_n - c->front_off;
            total += iov[k++].iov_len;
        }
        for (int i = 0; i < c->n && k < MAX_IOV && (double) total < budget - written; i++) {
            msg_t *m = &c->ring[(c->head + i) % c->cap];
            iov[k].iov_base = m->p;
            iov[k].iov_len = m->n;
            total += iov[k++].iov_len;
        }
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t) k;
        /* MSG_MORE holds small TCP writes back; a Unix socket has no segments to fill */
        ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT | (c->unix_path[0] ? 0 : more_flag(c, push)));
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) { writable = 0; continue; }
            char text[300];
            snprintf(text, sizeof text, "connection to the sidecar lost: %s", strerror(errno));
            fail(c, text);
            return;
        }
        consume(c, (size_t) w);
        written += (double) w;
        if ((size_t) w < total) writable = 0;
    }
}

/* A forked child must not write into its parent's stream nor resend its parent's buffer. */
static void after_fork(client *c) {
    if (c->fd >= 0) close(c->fd);  /* the child's copy; the parent's connection is untouched */
    c->fd = -1;
    c->connecting = 0;
    free_addrs(c);
    ring_clear(c);
    free(c->front);
    c->front = NULL;
    c->front_n = c->front_off = 0;
    c->front_is_report = 0;
    for (int r = 0; r < N_REASONS; r++) c->pending[r] = c->dropped[r] = 0;
    c->sent = c->connects = 0;
    c->last_push = 0;
    c->next_try = 0;
    c->backoff = BACKOFF_MIN;
    c->pid = getpid();
}

/* The client of an R client environment, or NULL. */
static client *get(SEXP env) {
    if (TYPEOF(env) != ENVSXP) return NULL;
    SEXP p = Rf_findVarInFrame(env, s_ptr);
    if (TYPEOF(p) != EXTPTRSXP) return NULL;
    client *c = R_ExternalPtrAddr(p);
    if (c && c->pid != getpid()) after_fork(c);
    return c;
}

static SEXP result(client *c) {
    return c->n_problems ? Rf_ScalarLogical(1) : R_NilValue;
}

static int is_urgent_level(const char *level, size_t n) {
    return (n == 5 && memcmp(level, "error", 5) == 0) || (n == 8 && memcmp(level, "critical", 8) == 0) ||
           (n == 3 && memcmp(level, "err", 3) == 0) || (n == 5 && memcmp(level, "fatal", 5) == 0) ||
           (n == 4 && memcmp(level, "crit", 4) == 0);
}

/* Sends or buffers the line built in c->line; an urgent one (an error or critical event) is
 * pushed out at once, never held back by MSG_MORE: the sidecar flushes those without waiting. */
static SEXP submit(client *c, int urgent) {
    size_t n = c->line.n;
    if ((double) n > c->max_message_bytes || (double) n > c->max_bytes) {
        count_drop(c, R_TOO_LARGE, 1);
        pump(c, PUMP_BUDGET, 0, 0);
        return result(c);
    }
    /* The common case: nothing waiting and the socket has room. */
    if (c->fd >= 0 && !c->connecting && c->n == 0 && !c->front && !pending_drops(c)) {
        struct pollfd p = {c->fd, POLLIN | POLLOUT, 0};
        if (poll(&p, 1, 0) == 1 && p.revents == POLLOUT) {
            ssize_t w = send(c->fd, c->line.p, n, MSG_NOSIGNAL | MSG_DONTWAIT | more_flag(c, urgent));
            if (w == (ssize_t) n) {
                c->sent++;
                return result(c);
            }
            if (w > 0) {  /* the rest goes ahead of the buffer */
                char *rest = malloc(n);
                if (!rest) {  /* cannot keep the rest: the line is cut, so is the connection */
                    fail(c, "connection to the sidecar lost: out of memory");
                    count_drop(c, R_TOO_LARGE, 1);
                    return result(c);
                }
                memcpy(rest, c->line.p, n);
                c->front = rest;
                c->front_n = n;
                c->front_off = (size_t) w;
                c->front_is_report = 0;
                return result(c);
            }
        }
    }
    msg_t m = {malloc(n ? n : 1), n};
    if (!m.p) {
        count_drop(c, R_TOO_LARGE, 1);
        return result(c);
    }
    memcpy(m.p, c->line.p, n);
    enqueue(c, m);
    pump(c, PUMP_BUDGET, 0, urgent);
    return result(c);
}

/* Starts a line: {"source":..,"type":"TYPE","timestamp":"..."<ids> */
static int begin(client *c, const char *type, SEXP ids) {
    sbuf *b = &c->line;
    if (b->cap > (1 << 20)) sb_free(b);  /* a very large message does not keep its scratch space */
    b->n = 0;
    if (!sb_add(b, c->prefix.p, c->prefix.n) || !SB_LIT(b, ",\"type\":\"") || !sb_add(b, type, strlen(type)) ||
        !SB_LIT(b, "\",\"timestamp\":\"") || !timestamp(b) || !SB_LIT(b, "\""))
        return 0;
    if (ids == R_NilValue) return sb_add(b, c->ids.p, c->ids.n);
    return sb_add(b, CHAR(STRING_ELT(ids, 0)), (size_t) LENGTH(STRING_ELT(ids, 0)));
}

/* A message whose strings alone exceed the limit is dropped before it is encoded. */
static SEXP drop_too_large(client *c) {
    count_drop(c, R_TOO_LARGE, 1);
    pump(c, PUMP_BUDGET, 0, 0);
    return result(c);
}

/* -- argument checks for the fast paths ------------------------------------------------------ */

/* A plain string argument: its first element, or NULL when the general path must handle it. */
static SEXP plain_string(SEXP x) {
    if (TYPEOF(x) != STRSXP || OBJECT(x) || XLENGTH(x) < 1) return NULL;
    return STRING_ELT(x, 0);
}

/* A named map of strings handled here: a named character vector without NA, or a named list
 * of single strings. Returns its length, -1 otherwise. */
static R_xlen_t plain_map(SEXP x, SEXP *names) {
    if (OBJECT(x) || (TYPEOF(x) != STRSXP && TYPEOF(x) != VECSXP)) return -1;
    R_xlen_t n = XLENGTH(x);
    *names = Rf_getAttrib(x, R_NamesSymbol);
    if (TYPEOF(*names) != STRSXP) return -1;
    for (R_xlen_t i = 0; i < n; i++) {
        SEXP k = STRING_ELT(*names, i);
        if (k == NA_STRING || LENGTH(k) == 0) return -1;
    }
    if (TYPEOF(x) == STRSXP) {
        for (R_xlen_t i = 0; i < n; i++) if (STRING_ELT(x, i) == NA_STRING) return -1;
        return n;
    }
    if (TYPEOF(x) != VECSXP) return -1;
    for (R_xlen_t i = 0; i < n; i++) {
        SEXP v = VECTOR_ELT(x, i);
        if (TYPEOF(v) != STRSXP || OBJECT(v) || XLENGTH(v) != 1 || STRING_ELT(v, 0) == NA_STRING) return -1;
    }
    return n;
}

static SEXP map_value(SEXP x, R_xlen_t i) {
    return TYPEOF(x) == STRSXP ? STRING_ELT(x, i) : STRING_ELT(VECTOR_ELT(x, i), 0);
}

/* Appends "k":"v",... of a plain map; 0 on failure (memory). */
static int add_pairs(sbuf *b, SEXP x, SEXP names, R_xlen_t n) {
    for (R_xlen_t i = 0; i < n; i++) {
        if (i && !SB_LIT(b, ",")) return 0;
        if (!esc(b, STRING_ELT(names, i)) || !SB_LIT(b, ":") || !esc(b, map_value(x, i))) return 0;
    }
    return 1;
}

static int is_context_key(client *c, const char *k, size_t n) {
    const char *p = c->ctx_keys.p;
    for (int i = 0; i < c->n_ctx_keys; i++) {
        size_t len = strlen(p);
        if (len == n && memcmp(p, k, n) == 0) return 1;
        p += len + 1;
    }
    return 0;
}

/* -- .Call entry points ---------------------------------------------------------------------- */

static void finalize(SEXP p) {
    client *c = R_ExternalPtrAddr(p);
    if (!c) return;
    if (c->fd >= 0) close(c->fd);
    free_addrs(c);
    ring_clear(c);
    free(c->ring);
    free(c->front);
    free(c->auth);
    sb_free(&c->prefix);
    sb_free(&c->ctx);
    sb_free(&c->ctx_keys);
    sb_free(&c->ids);
    sb_free(&c->line);
    for (int i = 0; i < c->n_problems; i++) { free(c->problem_kind[i]); free(c->problem_text[i]); }
    free(c);
    R_ClearExternalPtr(p);
}

SEXP C_new(SEXP host, SEXP port, SEXP max_messages, SEXP max_bytes, SEXP max_message_bytes,
           SEXP connect_timeout, SEXP latin1) {
    client *c = calloc(1, sizeof(client));
    if (!c) Rf_error("out of memory");
    native_latin1 = Rf_asLogical(latin1) == 1;
    snprintf(c->host, sizeof c->host, "%s", Rf_translateCharUTF8(STRING_ELT(host, 0)));
    snprintf(c->port, sizeof c->port, "%d", Rf_asInteger(port));
    c->pid = getpid();
    c->fd = -1;
    c->backoff = BACKOFF_MIN;
    c->max_messages = Rf_asInteger(max_messages);
    if (c->max_messages < 1) c->max_messages = 1;
    c->max_bytes = Rf_asReal(max_bytes);
    c->max_message_bytes = Rf_asReal(max_message_bytes);
    c->connect_timeout = Rf_asReal(connect_timeout);
    SEXP p = PROTECT(R_MakeExternalPtr(c, R_NilValue, R_NilValue));
    R_RegisterCFinalizerEx(p, finalize, FALSE);
    UNPROTECT(1);
    return p;
}

/* Where the client connects and what it says first: `unix_path` (NULL: host and port) and the
 * auth line (NULL: none), from the next connection on. */
SEXP C_set_transport(SEXP env, SEXP unix_path, SEXP auth_line) {
    client *c = get(env);
    if (!c) return R_NilValue;
    c->unix_path[0] = 0;
    if (unix_path != R_NilValue) {
        const char *path = Rf_translateCharUTF8(STRING_ELT(unix_path, 0));
        if (strlen(path) >= sizeof c->unix_path) Rf_error("unix socket path too long (at most %d bytes)", (int) sizeof c->unix_path - 1);
        snprintf(c->unix_path, sizeof c->unix_path, "%s", path);
    }
    free(c->auth);
    c->auth = NULL;
    c->auth_n = 0;
    if (auth_line != R_NilValue) {
        SEXP line = STRING_ELT(auth_line, 0);
        c->auth_n = (size_t) LENGTH(line);
        if (!(c->auth = malloc(c->auth_n))) { c->auth_n = 0; Rf_error("out of memory"); }
        memcpy(c->auth, CHAR(line), c->auth_n);
    }
    return R_NilValue;
}

/* The constant parts: the source (encoded), the context (encoded object or NULL, and its keys,
 * encoded), the current span's ids (the ,"trace_id":... fragment, or ""). */
SEXP C_set_source(SEXP env, SEXP source_json) {
    client *c = get(env);
    if (c && (!sb_set(&c->prefix, "{\"source\":", 10) ||
              !sb_add(&c->prefix, CHAR(STRING_ELT(source_json, 0)), (size_t) LENGTH(STRING_ELT(source_json, 0)))))
        Rf_error("out of memory");
    return R_NilValue;
}

SEXP C_set_context(SEXP env, SEXP json, SEXP keys) {
    client *c = get(env);
    if (!c) return R_NilValue;
    c->ctx.n = c->ctx_keys.n = 0;
    c->n_ctx_keys = 0;
    if (json == R_NilValue) return R_NilValue;
    int ok = sb_add(&c->ctx, CHAR(STRING_ELT(json, 0)), (size_t) LENGTH(STRING_ELT(json, 0)));
    for (R_xlen_t i = 0; ok && i < XLENGTH(keys); i++) {
        SEXP k = STRING_ELT(keys, i);
        ok = sb_add(&c->ctx_keys, CHAR(k), (size_t) LENGTH(k) + 1);
        c->n_ctx_keys++;
    }
    if (!ok) Rf_error("out of memory");
    return R_NilValue;
}

SEXP C_set_ids(SEXP env, SEXP ids) {
    client *c = get(env);
    if (c && !sb_set(&c->ids, CHAR(STRING_ELT(ids, 0)), (size_t) LENGTH(STRING_ELT(ids, 0))))
        Rf_error("out of memory");
    return R_NilValue;
}

/* log_event(mon, level, message, context) */
SEXP C_event(SEXP env, SEXP level, SEXP message, SEXP context) {
    client *c = get(env);
    SEXP lv = plain_string(level), msg = plain_string(message);
    if (!c || !lv || !msg) return Rf_ScalarLogical(0);
    char lbuf[64];
    size_t ln = 0;
    if (lv != NA_STRING) {
        const char *s = CHAR(lv);
        if (LENGTH(lv) >= (int) sizeof lbuf) return Rf_ScalarLogical(0);
        for (ln = 0; s[ln]; ln++) {
            if ((unsigned char) s[ln] >= 0x80) return Rf_ScalarLogical(0);  /* tolower() in R */
            lbuf[ln] = (char) ((s[ln] >= 'A' && s[ln] <= 'Z') ? s[ln] + 32 : s[ln]);
        }
        if (ln == 4 && memcmp(lbuf, "warn", 4) == 0) { memcpy(lbuf, "warning", 7); ln = 7; }
    }
    SEXP names = R_NilValue;
    R_xlen_t nctx = 0;
    if (context != R_NilValue && Rf_xlength(context) > 0) {
        nctx = plain_map(context, &names);
        if (nctx < 0) return Rf_ScalarLogical(0);
    }
    if ((double) LENGTH(msg) > c->max_message_bytes) return drop_too_large(c);
    sbuf *b = &c->line;
    if (!begin(c, "event", R_NilValue)) return Rf_ScalarLogical(0);
    int ok = 1;
    if (nctx > 0) {
        ok = c->ctx.n ? (SB_LIT(b, ",\"context\":") && sb_add(b, c->ctx.p, c->ctx.n - 1) && SB_LIT(b, ","))
                      : SB_LIT(b, ",\"context\":{");
        for (R_xlen_t i = 0; ok && i < nctx; i++) {
            if (i && !SB_LIT(b, ",")) { ok = 0; break; }
            size_t at = b->n;
            ok = esc(b, STRING_ELT(names, i));
            if (ok && c->n_ctx_keys && is_context_key(c, b->p + at, b->n - at)) return Rf_ScalarLogical(0);
            ok = ok && SB_LIT(b, ":") && esc(b, map_value(context, i));
        }
        ok = ok && SB_LIT(b, "}");
    } else if (c->ctx.n) {
        ok = SB_LIT(b, ",\"context\":") && sb_add(b, c->ctx.p, c->ctx.n);
    }
    ok = ok && SB_LIT(b, ",\"data\":{\"level\":");
    if (ok && lv == NA_STRING) ok = SB_LIT(b, "null");
    else if (ok) {
        ok = esc_bytes(b, (const unsigned char *) lbuf, ln, 0);  /* the lowered level */
    }
    ok = ok && SB_LIT(b, ",\"message\":") && esc(b, msg) && SB_LIT(b, "}}\n");
    if (!ok) return Rf_ScalarLogical(0);
    return submit(c, is_urgent_level(lbuf, ln));
}

/* log_metric(mon, name, value, unit, tags) */
SEXP C_metric(SEXP env, SEXP name, SEXP value, SEXP unit, SEXP tags) {
    client *c = get(env);
    SEXP nm = plain_string(name);
    if (!c || !nm || OBJECT(value) || Rf_xlength(value) != 1) return Rf_ScalarLogical(0);
    double v;
    if (TYPEOF(value) == REALSXP) v = REAL(value)[0];
    else if (TYPEOF(value) == INTSXP && INTEGER(value)[0] != NA_INTEGER) v = INTEGER(value)[0];
    else return Rf_ScalarLogical(0);
    if (!R_FINITE(v)) return Rf_ScalarLogical(0);
    SEXP u = NULL;
    if (unit != R_NilValue) {
        u = plain_string(unit);
        if (!u) return Rf_ScalarLogical(0);
        if (u == NA_STRING) u = NULL;
    }
    SEXP names = R_NilValue;
    R_xlen_t ntags = 0;
    if (tags != R_NilValue && Rf_xlength(tags) > 0) {
        ntags = plain_map(tags, &names);
        if (ntags < 0) return Rf_ScalarLogical(0);
    }
    if ((double) LENGTH(nm) > c->max_message_bytes) return drop_too_large(c);
    sbuf *b = &c->line;
    int ok = begin(c, "metric", R_NilValue);
    if (ok && c->ctx.n) ok = SB_LIT(b, ",\"context\":") && sb_add(b, c->ctx.p, c->ctx.n);
    ok = ok && SB_LIT(b, ",\"data\":{\"name\":") && esc(b, nm) && SB_LIT(b, ",\"value\":") && num(b, v);
    if (ok && u) ok = SB_LIT(b, ",\"unit\":") && esc(b, u);
    if (ok && ntags > 0) ok = SB_LIT(b, ",\"tags\":{") && add_pairs(b, tags, names, ntags) && SB_LIT(b, "}");
    ok = ok && SB_LIT(b, "}}\n");
    if (!ok) return Rf_ScalarLogical(0);
    return submit(c, 0);
}

/* Any message from its encoded data object; context: NULL for the client's, else the encoded
 * object ("" for none); ids: NULL for the current span's, else the fragment to use. */
SEXP C_emit(SEXP env, SEXP type, SEXP data, SEXP context, SEXP ids) {
    client *c = get(env);
    if (!c) return Rf_ScalarLogical(0);
    sbuf *b = &c->line;
    int ok = begin(c, CHAR(STRING_ELT(type, 0)), ids);
    if (ok && context == R_NilValue && c->ctx.n) ok = SB_LIT(b, ",\"context\":") && sb_add(b, c->ctx.p, c->ctx.n);
    if (ok && context != R_NilValue && LENGTH(STRING_ELT(context, 0)))
        ok = SB_LIT(b, ",\"context\":") &&
             sb_add(b, CHAR(STRING_ELT(context, 0)), (size_t) LENGTH(STRING_ELT(context, 0)));
    ok = ok && SB_LIT(b, ",\"data\":") &&
         sb_add(b, CHAR(STRING_ELT(data, 0)), (size_t) LENGTH(STRING_ELT(data, 0))) && SB_LIT(b, "}\n");
    if (!ok) return Rf_ScalarLogical(0);
    /* An event that took the R route: its data object starts with the lowered level. */
    const char *encoded = CHAR(STRING_ELT(data, 0));
    int urgent = strcmp(CHAR(STRING_ELT(type, 0)), "event") == 0 &&
                 (strncmp(encoded, "{\"level\":\"error\"", 17) == 0 || strncmp(encoded, "{\"level\":\"critical\"", 20) == 0);
    return submit(c, urgent);
}

/* Writes the backlog, waiting at most `timeout` seconds; one connection attempt at once
 * whatever the backoff. TRUE when nothing is left. */
SEXP C_flush(SEXP env, SEXP timeout) {
    client *c = get(env);
    if (!c) return Rf_ScalarLogical(0);
    double deadline = now() + Rf_asReal(timeout);
    int attempted = 0;
    while (backlog(c)) {
        double left = deadline - now();
        if (left <= 0) break;
        if (c->fd < 0) {
            if (attempted) break;
            attempted = 1;
            if (!start_connect(c) && c->fd < 0) break;
        }
        if (c->connecting) {
            if (!check_connect(c, left < 0.05 ? left : 0.05)) {
                if (c->fd < 0) break;
                R_CheckUserInterrupt();
                continue;
            }
        }
        pump(c, INFINITY, now() + (left < 0.05 ? left : 0.05), 1);
        R_CheckUserInterrupt();
    }
    push_out(c);
    return Rf_ScalarLogical(!backlog(c));
}

/* flush, then disconnect; what is still buffered is dropped and counted as unsent_at_close. */
SEXP C_close(SEXP env, SEXP timeout) {
    client *c = get(env);
    if (!c) return Rf_ScalarLogical(0);
    SEXP ok = PROTECT(C_flush(env, timeout));
    disconnect(c);
    if (c->n > 0) count_drop(c, R_UNSENT_AT_CLOSE, c->n);
    ring_clear(c);
    c->next_try = 0;
    UNPROTECT(1);
    return ok;
}

/* queued, queued_bytes, sent, dropped by reason (3), connects, connected */
SEXP C_stats(SEXP env) {
    client *c = get(env);
    SEXP out = PROTECT(Rf_allocVector(REALSXP, 8));
    double *o = REAL(out);
    if (!c) {
        for (int i = 0; i < 8; i++) o[i] = 0;
    } else {
        o[0] = c->n;
        o[1] = c->qbytes;
        o[2] = c->sent;
        for (int r = 0; r < N_REASONS; r++) o[3 + r] = c->dropped[r];
        o[6] = c->connects;
        o[7] = c->fd >= 0 && !c->connecting;
    }
    UNPROTECT(1);
    return out;
}

/* The problems since the last call, as c(kind, text, kind, text, ...), and forgets them. */
SEXP C_problems(SEXP env) {
    client *c = get(env);
    if (!c) return Rf_allocVector(STRSXP, 0);
    SEXP out = PROTECT(Rf_allocVector(STRSXP, 2 * c->n_problems));
    for (int i = 0; i < c->n_problems; i++) {
        SET_STRING_ELT(out, 2 * i, Rf_mkCharCE(c->problem_kind[i], CE_UTF8));
        SET_STRING_ELT(out, 2 * i + 1, Rf_mkCharCE(c->problem_text[i], CE_UTF8));
    }
    for (int i = 0; i < c->n_problems; i++) { free(c->problem_kind[i]); free(c->problem_text[i]); }
    c->n_problems = 0;
    UNPROTECT(1);
    return out;
}

/* Encoded JSON strings (NA becomes null), for the R-level encoders. */
SEXP C_escape(SEXP x) {
    R_xlen_t n = XLENGTH(x);
    SEXP out = PROTECT(Rf_allocVector(STRSXP, n));
    sbuf b = {0};
    for (R_xlen_t i = 0; i < n; i++) {
        b.n = 0;
        if (!esc(&b, STRING_ELT(x, i))) { sb_free(&b); Rf_error("out of memory"); }
        SET_STRING_ELT(out, i, Rf_mkCharLenCE(b.p, (int) b.n, CE_UTF8));
    }
    sb_free(&b);
    UNPROTECT(1);
    return out;
}

/* Numbers that read back exactly (see num()); non-finite become null. */
SEXP C_numbers(SEXP x) {
    R_xlen_t n = XLENGTH(x);
    SEXP out = PROTECT(Rf_allocVector(STRSXP, n));
    sbuf b = {0};
    for (R_xlen_t i = 0; i < n; i++) {
        double v = REAL(x)[i];
        b.n = 0;
        if (!R_FINITE(v)) { SET_STRING_ELT(out, i, Rf_mkChar("null")); continue; }
        if (!num(&b, v)) { sb_free(&b); Rf_error("out of memory"); }
        SET_STRING_ELT(out, i, Rf_mkCharLen(b.p, (int) b.n));
    }
    sb_free(&b);
    UNPROTECT(1);
    return out;
}

static const R_CallMethodDef CALLS[] = {
    {"C_new", (DL_FUNC) &C_new, 7},
    {"C_set_source", (DL_FUNC) &C_set_source, 2},
    {"C_set_transport", (DL_FUNC) &C_set_transport, 3},
    {"C_set_context", (DL_FUNC) &C_set_context, 3},
    {"C_set_ids", (DL_FUNC) &C_set_ids, 2},
    {"C_event", (DL_FUNC) &C_event, 4},
    {"C_metric", (DL_FUNC) &C_metric, 5},
    {"C_emit", (DL_FUNC) &C_emit, 5},
    {"C_flush", (DL_FUNC) &C_flush, 2},
    {"C_close", (DL_FUNC) &C_close, 2},
    {"C_stats", (DL_FUNC) &C_stats, 1},
    {"C_problems", (DL_FUNC) &C_problems, 1},
    {"C_escape", (DL_FUNC) &C_escape, 1},
    {"C_numbers", (DL_FUNC) &C_numbers, 1},
    {NULL, NULL, 0}
};

void R_init_monitoringsdk(DllInfo *dll) {
    R_registerRoutines(dll, NULL, CALLS, NULL, NULL);
    R_useDynamicSymbols(dll, FALSE);
    R_forceSymbols(dll, TRUE);
    s_ptr = Rf_install("ptr");
}
