/* SPDX-License-Identifier: Apache-2.0 */
/* monitoring_sdk.h: thin, non-blocking C client of the monitoring sidecar (wire protocol v1).
 *
 * Every call encodes one JSON line and appends it to a bounded in-memory queue; a background
 * thread owns the connection (TCP, or the sidecar's Unix socket). No call waits for the network, and no failure (sidecar down,
 * out of memory, a peer that stops reading) reaches the host program other than through a
 * return value and the counters of mon_statistics(). All functions are thread-safe and accept
 * a NULL client (they then do nothing and return -1).
 */
#ifndef MONITORING_SDK_H
#define MONITORING_SDK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MON_DEFAULT_HOST "localhost"
#define MON_DEFAULT_PORT 17000
#define MON_MAX_MESSAGES 10000            /* queue bound, in messages ... */
#define MON_MAX_BYTES (8u * 1024 * 1024)  /* ... and in bytes; the oldest message is dropped */
#define MON_MAX_MESSAGE_BYTES (1024 * 1024) /* the sidecar's limit; larger messages are dropped */

typedef struct mon_client mon_client;

/* A key/value list: an array terminated by an entry whose key is NULL, e.g.
 * const mon_kv ctx[] = {{"file", "a.csv"}, {NULL, NULL}}; Entries with a NULL value are skipped. */
typedef struct mon_kv {
    const char *key;
    const char *value;
} mon_kv;

typedef struct mon_stats {
    uint64_t queued;     /* messages waiting now */
    uint64_t sent;       /* messages written to the sidecar */
    uint64_t dropped;    /* messages lost: queue full, too large, left at close */
    uint64_t reconnects; /* connections made after the first */
    uint64_t errors;     /* calls refused (NaN, unknown span, out of memory) and I/O failures */
} mon_stats;

/* Called with a one-line description of each internal error, from the calling or the sender
 * thread, with no lock held. */
typedef void (*mon_error_fn)(void *arg, const char *what);

/* Creates a client; never connects (the sender thread does, on the first message). host NULL
 * means "localhost", port <= 0 means 17000; host "unix:/path" is the sidecar's Unix socket (an
 * AF_UNIX stream, port unused). MONITORING_SIDECAR=host:port (or unix:/path) and
 * MONITORING_SOURCE win over the arguments; MONITORING_SIDECAR_TOKEN, TRACEPARENT and
 * MONITORING_CONTEXT are read here. NULL only when memory is exhausted. */
mon_client *mon_init(const char *source, const char *host, int port);

/* The sidecar's ingest token: the sender writes {"auth":"TOKEN"} first on every connection made
 * from now on (a connection already open stays as it is); NULL or "" removes it. A token from
 * MONITORING_SIDECAR_TOKEN wins: then this does nothing. 0, or -1 when memory is short. */
int mon_set_token(mon_client *mon, const char *token);

/* Replaces the default error reporting (one line on stderr for the first error, then only
 * counting). fn NULL restores it. */
void mon_set_error_handler(mon_client *mon, mon_error_fn fn, void *arg);

/* The log calls return 0 when the message was queued, -1 when it was refused or dropped. */

/* level: debug, info, warning ("warn" accepted), error, critical; NULL means "info".
 * ctx (nullable) is merged over the mon_set_context() values for this message only. */
int mon_log_event(mon_client *mon, const char *level, const char *message, const mon_kv *ctx);
/* value must be finite; unit and tags are nullable. */
int mon_log_metric(mon_client *mon, const char *name, double value, const char *unit,
                   const mon_kv *tags);
/* status NULL means "running". */
int mon_log_progress(mon_client *mon, const char *job_id, double percent, const char *status);
/* NAN means "not given" (the key is left out); an infinite value refuses the call. */
int mon_log_resource(mon_client *mon, double cpu_percent, double memory_mb, double disk_io_mb,
                     double network_io_mb);

/* Starts a span inside the calling thread's innermost active span (or under TRACEPARENT, or as
 * the root of a new trace) and writes its id (16 hex digits and a NUL) to out_span_id, which
 * is always filled. While it is active, TRACEPARENT names it. A span started while no span of
 * the client is open, in any thread, is a root span: it scopes the context (mon_set_context). */
int mon_start_span(mon_client *mon, const char *name, char out_span_id[17]);
/* status NULL means "success". -1 if no active span has this id. Ending a root span sends its
 * end message with the context as it is, then restores the context as the span started, also
 * while spans started inside it are still open. */
int mon_end_span(mon_client *mon, const char *span_id, const char *status);

/* Sets a string context value sent with every later message and exported in
 * MONITORING_CONTEXT; value NULL removes the key. Set while no span is open, it lasts. Set
 * while a root span is open (also inside a nested span), it lasts until that root span ends:
 * then the context and MONITORING_CONTEXT return to what they were when it started (unset if
 * empty). -1, the context unchanged, when memory is short. */
int mon_set_context(mon_client *mon, const char *key, const char *value);
/* The same with any JSON value given as text (e.g. "42", "{\"a\":[1]}"); -1 if not valid JSON. */
int mon_set_context_json(mon_client *mon, const char *key, const char *json);

/* Waits up to timeout_ms until everything queued is written; makes a sender that is backing
 * off retry the connection at once. 0 if the queue was written out, -1 otherwise. */
int mon_flush(mon_client *mon, int timeout_ms);
/* Flushes for at most timeout_ms (a refused connection gives up at once), then frees the
 * client, which must not be used afterwards. 0 if everything was written. */
int mon_close(mon_client *mon, int timeout_ms);

void mon_statistics(mon_client *mon, mon_stats *out);

#ifdef __cplusplus
}
#endif
#endif
