package io.monitoring.sdk;

import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.net.UnknownHostException;
import java.nio.ByteBuffer;
import java.nio.channels.SelectionKey;
import java.nio.channels.Selector;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Objects;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.locks.Condition;
import java.util.concurrent.locks.ReentrantLock;
import java.util.function.Consumer;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Thin, non-blocking client of the monitoring sidecar for one source (service or program name).
 *
 * <p>A call encodes its message (JSON lines, wire protocol v1) on the caller's thread and offers
 * the bytes to a bounded in-memory queue; a daemon thread owns the TCP connection, connects
 * lazily, reconnects with capped backoff and writes the queue in batches. No call blocks on the
 * network or throws into the host program.
 *
 * <p>{@code MONITORING_SIDECAR} ({@code host:port}, or {@code unix:/path} for the sidecar's Unix
 * socket), {@code MONITORING_SIDECAR_TOKEN} (the ingest token, sent first on every connection) and
 * {@code MONITORING_SOURCE} in the environment win over the constructor's and the builder's
 * arguments. {@code TRACEPARENT} and
 * {@code MONITORING_CONTEXT} are read at construction, so a child process joins its parent's
 * trace and context; {@link #childEnvironment()} gives the values to pass on to a child.
 *
 * <p>Context and spans scope each other: context set while no span of this client is open lasts
 * (the inherited {@code MONITORING_CONTEXT} is such context); context set while a root span (one
 * started when no span of this client was open, in any thread) is open belongs to that span. When
 * the root span ends, its end message carries the context as it is, then the context returns to
 * what it was when the span started, and {@link #childEnvironment()} with it. Nested spans do not
 * scope context; ending spans out of order is allowed, and the restore happens when the root span
 * ends.
 */
public final class MonitoringClient implements AutoCloseable {
    public static final String DEFAULT_HOST = "localhost";
    public static final int DEFAULT_PORT = 17000;

    private static final long BACKOFF_START = TimeUnit.MILLISECONDS.toNanos(100);
    private static final long BACKOFF_CAP = TimeUnit.SECONDS.toNanos(30);
    private static final long LINGER = TimeUnit.MILLISECONDS.toNanos(1);
    private static final int LINGER_MESSAGES = 1000; // a batch this large goes out without lingering
    private static final long SEND_POLL_MS = 250; // a stalled write rechecks this often whether close() gave up
    private static final int MAX_MESSAGE_BYTES = 1 << 20; // the sidecar's default limit
    private static final int MAX_DEPTH = 64;
    private static final Pattern TRACEPARENT = Pattern.compile("([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}");
    private static final Pattern ALL_ZERO = Pattern.compile("0+");
    private static final DateTimeFormatter SECOND = DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss", Locale.ROOT);
    private static final char[] HEX = "0123456789abcdef".toCharArray();
    private static final System.Logger LOG = System.getLogger("io.monitoring.sdk");
    private static final Set<MonitoringClient> LIVE = ConcurrentHashMap.newKeySet();
    private static volatile TimestampCache tsCache = new TimestampCache(Long.MIN_VALUE, "");

    static {
        try {
            Runtime.getRuntime().addShutdownHook(new Thread(MonitoringClient::closeAllAtExit, "monitoring-sdk-exit"));
        } catch (IllegalStateException | SecurityException shuttingDown) {
            // the JVM is already exiting: nothing to flush at exit then
        }
    }

    private record TimestampCache(long second, String prefix) {
    }

    private record Context(Map<String, Object> map, String json) {
    }

    private record SpanState(String name, String traceId, String parentId, long startNanos) {
    }

    /** Counters of one client; {@code errors} counts calls that could not be turned into a message. */
    public record Statistics(long queued, long sent, long dropped, long reconnects, long errors) {
    }

    private final String source;
    private final String header; // {"source":...,"type":" — every message starts with it
    private final String host;
    private final int port;
    private final Path unixSocket; // the sidecar's Unix socket in place of host and port, or null
    private final byte[] auth; // the auth line written first on every connection, or null
    private final int maxMessages;
    private final long maxBytes;
    private final Duration connectTimeout;
    private final Duration closeTimeout;
    private final Consumer<Throwable> onError;
    private final String[] remote; // {trace_id, span_id} from TRACEPARENT, or null
    private final Set<String> warned = ConcurrentHashMap.newKeySet();

    // contextLock serialises writes of context with spans starting and ending: a span that starts
    // while the root span ends must not snapshot the context that is about to be undone.
    private final Object contextLock = new Object();
    private volatile Context context;
    private final ConcurrentHashMap<String, SpanState> spans = new ConcurrentHashMap<>();
    private String rootSpan; // the open root span, or null (contextLock)
    private Context rootContext; // the context when rootSpan started (contextLock)
    private final ThreadLocal<ArrayList<String>> active = ThreadLocal.withInitial(ArrayList::new);

    // Queue and counters, guarded by lock.
    private final ReentrantLock lock = new ReentrantLock();
    private final Condition wake = lock.newCondition(); // the sender waits here for work
    private final Condition drained = lock.newCondition(); // flush() waits here
    private ArrayDeque<byte[]> queue = new ArrayDeque<>();
    private long queuedBytes;
    private int inFlight;
    private long sent;
    private long dropped;
    private long unreportedFull;
    private long unreportedLarge;
    private long connections;
    private long errors;
    private boolean closed;
    private boolean kick;
    private boolean idle;
    private long retryAt;
    private Thread thread;

    // Owned by the sender thread; volatile so close() can wake a stalled write.
    private volatile boolean abandon;
    private volatile SocketChannel channel;
    private volatile Selector selector;
    private final ByteBuffer probe = ByteBuffer.allocate(4096);

    /** A client for {@code source} sending to localhost:17000 (or {@code MONITORING_SIDECAR}). */
    public MonitoringClient(String source) {
        this(builder(source));
    }

    /** A client for {@code source} sending to {@code host:port} (unless {@code MONITORING_SIDECAR} says otherwise). */
    public MonitoringClient(String source, String host, int port) {
        this(builder(source).host(host).port(port));
    }

    /**
     * As {@link #MonitoringClient(String, String, int)}, reading {@code MONITORING_*} and
     * {@code TRACEPARENT} from {@code environment} instead of the process environment (for tests
     * and for programs that hold their configuration in a map).
     */
    public MonitoringClient(String source, String host, int port, Map<String, String> environment) {
        this(builder(source).host(host).port(port).environment(environment));
    }

    private MonitoringClient(Builder b) {
        Map<String, String> env = b.environment != null ? b.environment : safeGetenv();
        this.onError = b.onError;
        String src = env.get("MONITORING_SOURCE");
        if (src == null || src.isEmpty()) {
            src = b.source == null || b.source.isEmpty() ? "java" : b.source;
        }
        this.source = src;
        StringBuilder h = new StringBuilder("{\"source\":");
        Json.string(h, src);
        this.header = h.append(",\"type\":\"").toString();
        String useHost = b.host == null || b.host.isEmpty() ? DEFAULT_HOST : b.host;
        int usePort = b.port;
        Path useUnix = b.unixSocket;
        String sidecar = env.get("MONITORING_SIDECAR");
        if (sidecar != null && sidecar.startsWith("unix:") && sidecar.length() > 5) {
            useUnix = unixPath(sidecar.substring(5));
        } else if (sidecar != null && !sidecar.isBlank()) {
            int colon = sidecar.lastIndexOf(':');
            String envPort = colon < 0 ? "" : sidecar.substring(colon + 1).trim();
            if (envPort.matches("[0-9]{1,5}") && Integer.parseInt(envPort) > 0 && Integer.parseInt(envPort) < 65536) {
                String envHost = sidecar.substring(0, colon).trim().replace("[", "").replace("]", "");
                useHost = envHost.isEmpty() ? DEFAULT_HOST : envHost;
                usePort = Integer.parseInt(envPort);
                useUnix = null;
            } else {
                report("config", new IllegalArgumentException("ignoring malformed MONITORING_SIDECAR=" + sidecar
                        + " (expected host:port or unix:/path)"));
            }
        }
        this.host = useHost;
        this.port = usePort;
        this.unixSocket = useUnix;
        String token = env.get("MONITORING_SIDECAR_TOKEN");
        if (token == null || token.isEmpty()) {
            token = b.token;
        }
        this.auth = token == null || token.isEmpty() ? null : authLine(token);
        this.maxMessages = Math.max(1, b.maxMessages);
        this.maxBytes = Math.max(1, b.maxBytes);
        this.connectTimeout = b.connectTimeout;
        this.closeTimeout = b.closeTimeout;

        Map<String, Object> seeded = new LinkedHashMap<>();
        String ctx = env.get("MONITORING_CONTEXT");
        if (ctx != null && !ctx.isBlank()) {
            try {
                Object parsed = Json.parse(ctx);
                if (parsed instanceof Map<?, ?> m) {
                    m.forEach((k, v) -> seeded.put(String.valueOf(k), v));
                } else {
                    throw new IllegalArgumentException("MONITORING_CONTEXT is not a JSON object");
                }
            } catch (RuntimeException e) {
                report("config", e);
            }
        }
        this.context = snapshot(seeded);
        this.remote = parseTraceparent(env.get("TRACEPARENT"));
    }

    private Path unixPath(String path) {
        try {
            return Path.of(path);
        } catch (RuntimeException e) { // an invalid path: reported, and the sender reports each failed connect
            report("config", e);
            return null;
        }
    }

    /** {@code {"auth":TOKEN}} and a newline: the token JSON-escaped, as every string the SDK sends. */
    private static byte[] authLine(String token) {
        StringBuilder sb = new StringBuilder("{\"auth\":");
        Json.string(sb, token);
        return sb.append("}\n").toString().getBytes(StandardCharsets.UTF_8);
    }

    /** Options beyond source, host and port. */
    public static Builder builder(String source) {
        return new Builder(source);
    }

    /** Builder of a {@link MonitoringClient}; every setting has the default the other SDKs use. */
    public static final class Builder {
        private final String source;
        private String host = DEFAULT_HOST;
        private int port = DEFAULT_PORT;
        private int maxMessages = 10_000;
        private long maxBytes = 8L << 20;
        private Duration connectTimeout = Duration.ofSeconds(1);
        private Duration closeTimeout = Duration.ofSeconds(2);
        private Consumer<Throwable> onError;
        private Map<String, String> environment;
        private Path unixSocket;
        private String token;

        private Builder(String source) {
            this.source = source;
        }

        public Builder host(String host) {
            this.host = host;
            return this;
        }

        public Builder port(int port) {
            this.port = port;
            return this;
        }

        /**
         * The sidecar's Unix socket, in place of host and port ({@code MONITORING_SIDECAR=unix:/path}
         * wins): connected with a {@link SocketChannel} to a {@link UnixDomainSocketAddress}, by the
         * sender thread, with the same backoff as TCP.
         */
        public Builder unixSocket(Path unixSocket) {
            this.unixSocket = unixSocket;
            return this;
        }

        /**
         * The sidecar's ingest token ({@code MONITORING_SIDECAR_TOKEN} wins): {@code {"auth":"TOKEN"}}
         * is written first on every connection and reconnection, before any message.
         */
        public Builder token(String token) {
            this.token = token;
            return this;
        }

        /** Queue bound in messages (default 10000); past it the oldest message is dropped and counted. */
        public Builder maxMessages(int maxMessages) {
            this.maxMessages = maxMessages;
            return this;
        }

        /** Queue bound in bytes (default 8 MiB). */
        public Builder maxBytes(long maxBytes) {
            this.maxBytes = maxBytes;
            return this;
        }

        /** How long one connection attempt of the sender thread may take (default 1 s). */
        public Builder connectTimeout(Duration connectTimeout) {
            this.connectTimeout = Objects.requireNonNull(connectTimeout);
            return this;
        }

        /** How long {@link #close()} and the exit hook wait for the queue to be written (default 2 s). */
        public Builder closeTimeout(Duration closeTimeout) {
            this.closeTimeout = Objects.requireNonNull(closeTimeout);
            return this;
        }

        /** Receives every internal problem instead of the one logged warning per kind. */
        public Builder onError(Consumer<Throwable> onError) {
            this.onError = onError;
            return this;
        }

        /** Reads {@code MONITORING_*} and {@code TRACEPARENT} from this map instead of the process environment. */
        public Builder environment(Map<String, String> environment) {
            this.environment = environment;
            return this;
        }

        public MonitoringClient build() {
            return new MonitoringClient(this);
        }
    }

    // -- public API ----------------------------------------------------------------------------

    /** The source name every message carries (after {@code MONITORING_SOURCE}). */
    public String source() {
        return source;
    }

    /** The sidecar's host (after {@code MONITORING_SIDECAR}). */
    public String host() {
        return host;
    }

    /** The sidecar's port (after {@code MONITORING_SIDECAR}). */
    public int port() {
        return port;
    }

    /** The sidecar's Unix socket (after {@code MONITORING_SIDECAR}), or null when it is reached over TCP. */
    public Path unixSocket() {
        return unixSocket;
    }

    /** Logs an event; {@code level} is debug, info, warning ("warn" accepted), error or critical. */
    public void logEvent(String level, String message) {
        logEvent(level, message, null);
    }

    /** Logs an event with its own context, merged over the client's (the call's values win). */
    public void logEvent(String level, String message, Map<String, ?> context) {
        try {
            String lvl = level == null ? "info" : level.toLowerCase(Locale.ROOT);
            StringBuilder sb = start("event", context);
            sb.append("{\"level\":");
            Json.string(sb, "warn".equals(lvl) ? "warning" : lvl);
            sb.append(",\"message\":");
            Json.string(sb, message == null ? "" : message);
            offer(finish(sb.append('}')));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /** Logs a metric with an integer value, sent as a JSON integer. */
    public void logMetric(String name, long value) {
        logMetric(name, value, null, null);
    }

    /** Logs a metric with an integer value and a unit (null: none). */
    public void logMetric(String name, long value, String unit) {
        logMetric(name, value, unit, null);
    }

    /** Logs a metric with an integer value, a unit and tags (null or empty: none; values sent as strings). */
    public void logMetric(String name, long value, String unit, Map<String, ?> tags) {
        try {
            StringBuilder sb = startMetric(name);
            sb.append(value);
            offer(finishMetric(sb, unit, tags));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /** Logs a metric; NaN and infinities are not valid JSON: such a call is counted as an error. */
    public void logMetric(String name, double value) {
        logMetric(name, value, null, null);
    }

    /** Logs a metric with a unit (null: none). */
    public void logMetric(String name, double value, String unit) {
        logMetric(name, value, unit, null);
    }

    /** Logs a metric with a unit and tags (null or empty: none; tag values are sent as strings). */
    public void logMetric(String name, double value, String unit, Map<String, ?> tags) {
        try {
            StringBuilder sb = startMetric(name);
            finite(sb, value, "value");
            offer(finishMetric(sb, unit, tags));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /** Reports progress of a job, status "running". */
    public void logProgress(String jobId, long percent) {
        logProgress(jobId, percent, null);
    }

    /** Reports progress of a job ({@code percent} 0 to 100; status null means "running"). */
    public void logProgress(String jobId, long percent, String status) {
        try {
            StringBuilder sb = startProgress(jobId);
            sb.append(percent);
            offer(finishProgress(sb, status));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /** Reports progress of a job, status "running". */
    public void logProgress(String jobId, double percent) {
        logProgress(jobId, percent, null);
    }

    /** Reports progress of a job ({@code percent} 0 to 100; status null means "running"). */
    public void logProgress(String jobId, double percent, String status) {
        try {
            StringBuilder sb = startProgress(jobId);
            finite(sb, percent, "percent");
            offer(finishProgress(sb, status));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /** Reports CPU and memory use; null means not given (left out of the message). */
    public void logResource(Number cpuPercent, Number memoryMb) {
        logResource(cpuPercent, memoryMb, null, null);
    }

    /**
     * Reports resource use; a null value is not given and left out. Integers are sent as JSON
     * integers; a NaN or infinite value is left out and counted as an error.
     */
    public void logResource(Number cpuPercent, Number memoryMb, Number diskIoMb, Number networkIoMb) {
        try {
            StringBuilder sb = start("resource", null);
            sb.append('{');
            int mark = sb.length();
            resourceValue(sb, mark, "cpu_percent", cpuPercent);
            resourceValue(sb, mark, "memory_mb", memoryMb);
            resourceValue(sb, mark, "disk_io_mb", diskIoMb);
            resourceValue(sb, mark, "network_io_mb", networkIoMb);
            offer(finish(sb.append('}')));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /**
     * Starts a span in the calling thread and returns its id. It becomes the thread's innermost
     * active span: later messages from this thread carry its ids, and {@link #childEnvironment()}
     * names it, until it ends. Outside any span it starts a new trace, or joins the trace of
     * {@code TRACEPARENT} as a child of the remote span.
     *
     * <p>A span started while no span of this client is open, in any thread, is a root span: the
     * context set until it ends is undone when it ends (see {@link #endSpan(String, String)}).
     */
    public String startSpan(String name) {
        String spanId = randomHex(1);
        try {
            String spanName = name == null ? "" : name;
            String[] current = current();
            String traceId = current != null ? current[0] : randomHex(2);
            String parent = current != null ? current[1] : null;
            SpanState state = new SpanState(spanName, traceId, parent, System.nanoTime());
            synchronized (contextLock) {
                if (spans.isEmpty()) {
                    rootSpan = spanId;
                    rootContext = context;
                }
                spans.put(spanId, state);
            }
            ArrayList<String> stack = active.get();
            stack.removeIf(id -> !spans.containsKey(id));
            stack.add(spanId);
            StringBuilder sb = start("span", null, traceId, spanId, parent);
            sb.append("{\"name\":");
            Json.string(sb, spanName);
            offer(finish(sb.append(",\"phase\":\"start\"}")));
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
        return spanId;
    }

    /** Ends a span with status "success". */
    public void endSpan(String spanId) {
        endSpan(spanId, null);
    }

    /**
     * Ends a span started with {@link #startSpan(String)} (from any thread), sending its status
     * (null means "success") and its duration in milliseconds. An unknown id is counted as an error.
     *
     * <p>Ending the root span sends its end message with the context as it is, then restores the
     * context to what it was when the span started: keys set inside are gone, keys changed or
     * removed inside are back. Ending a nested span leaves the context alone.
     */
    public void endSpan(String spanId, String status) {
        try {
            byte[] message;
            synchronized (contextLock) { // the end message reads the context before the restore
                SpanState span = spanId == null ? null : spans.remove(spanId);
                if (span == null) {
                    throw new IllegalArgumentException("endSpan: no active span with id " + spanId);
                }
                try {
                    double durationMs = Math.round((System.nanoTime() - span.startNanos()) / 1000.0) / 1000.0;
                    StringBuilder sb = start("span", null, span.traceId(), spanId, span.parentId());
                    sb.append("{\"name\":");
                    Json.string(sb, span.name());
                    sb.append(",\"phase\":\"end\",\"status\":");
                    Json.string(sb, status == null ? "success" : status);
                    sb.append(",\"duration_ms\":").append(durationMs);
                    message = finish(sb.append('}'));
                } finally { // restore even if the message could not be built
                    if (spanId.equals(rootSpan)) {
                        context = rootContext;
                        rootSpan = null;
                        rootContext = null;
                    }
                }
            }
            active.get().remove(spanId);
            offer(message); // outside the lock: setContext in other threads never waits on the queue
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /**
     * Starts a span to use with try-with-resources; it ends with status "success" unless
     * {@link Span#fail()} or {@link Span#setStatus(String)} said otherwise (close() cannot see
     * an exception that escapes the block). Like {@link #startSpan(String)}, a root span undoes at
     * close the context set inside it.
     */
    public Span span(String name) {
        return new Span(this, startSpan(name));
    }

    /**
     * Sets a context value sent with every later message and passed on by
     * {@link #childEnvironment()}; a null value removes the key. Set while no span is open, it
     * lasts; set while a span is open, it lasts until the root span ends.
     */
    public void setContext(String key, Object value) {
        if (key == null) {
            return;
        }
        try {
            synchronized (contextLock) { // copy on write: encoders in other threads keep a consistent snapshot
                Map<String, Object> map = new LinkedHashMap<>(context.map());
                map.remove(key);
                if (value != null) {
                    map.put(key, value);
                }
                context = snapshot(map);
            }
        } catch (RuntimeException | StackOverflowError e) {
            fail(e);
        }
    }

    /**
     * The variables a child process needs to join this trace and context: {@code TRACEPARENT}
     * (the calling thread's innermost span, else the inbound one) and {@code MONITORING_CONTEXT}
     * (the context as a JSON object, as restored when a root span ends), each only when there is
     * one. Java cannot change its own environment, so pass these on, e.g.
     * {@code pb.environment().putAll(mon.childEnvironment())} or {@link #applyTo(ProcessBuilder)}.
     */
    public Map<String, String> childEnvironment() {
        Map<String, String> env = new LinkedHashMap<>();
        try {
            String[] current = current();
            if (current != null) {
                env.put("TRACEPARENT", "00-" + current[0] + "-" + current[1] + "-01");
            }
            Context ctx = context;
            if (ctx.json() != null) {
                env.put("MONITORING_CONTEXT", ctx.json());
            }
        } catch (RuntimeException e) {
            fail(e);
        }
        return env;
    }

    /**
     * Sets {@code TRACEPARENT} and {@code MONITORING_CONTEXT} in the builder's environment as
     * {@link #childEnvironment()} gives them, removing inherited values this client has none for.
     */
    public ProcessBuilder applyTo(ProcessBuilder processBuilder) {
        Map<String, String> env = processBuilder.environment();
        env.remove("TRACEPARENT");
        env.remove("MONITORING_CONTEXT");
        env.putAll(childEnvironment());
        return processBuilder;
    }

    /** {@link #flush(Duration)} with the close timeout (2 s by default). */
    public boolean flush() {
        return flush(closeTimeout);
    }

    /**
     * Waits up to {@code timeout} until the queue is written out; true if it was. Also makes a
     * sender that is backing off retry the connection at once.
     */
    public boolean flush(Duration timeout) {
        long deadline = System.nanoTime() + toNanos(timeout);
        lock.lock();
        try {
            kick = true;
            idle = false;
            wake.signal();
            while (!queue.isEmpty() || inFlight > 0) {
                long left = deadline - System.nanoTime();
                if (left <= 0 || thread == null || !thread.isAlive()) {
                    return false;
                }
                drained.awaitNanos(left);
            }
            return true;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return false;
        } finally {
            lock.unlock();
        }
    }

    /** Closes with the close timeout (2 s by default); see {@link #close(Duration)}. */
    @Override
    public void close() {
        close(closeTimeout);
    }

    /**
     * Stops accepting messages and writes out the queue, waiting at most {@code timeout}.
     * Returns true if everything was written; what is left is counted as dropped. Idempotent;
     * also run for every open client when the JVM exits normally.
     */
    public boolean close(Duration timeout) {
        Thread sender;
        lock.lock();
        try {
            closed = true;
            idle = false;
            wake.signal();
            sender = thread;
        } finally {
            lock.unlock();
        }
        LIVE.remove(this);
        if (sender != null && sender != Thread.currentThread()) {
            try {
                sender.join(Math.max(1, TimeUnit.NANOSECONDS.toMillis(toNanos(timeout))));
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            if (sender.isAlive()) { // stalled on a sidecar that does not read, or still connecting
                abandon = true;
                Selector s = selector;
                if (s != null) {
                    s.wakeup();
                }
            }
        }
        lock.lock();
        try {
            int left = queue.size() + inFlight;
            dropped += queue.size() + (abandon ? inFlight : 0);
            queue.clear();
            queuedBytes = 0;
            return left == 0;
        } finally {
            lock.unlock();
        }
    }

    /** Counters: queued (waiting now), sent, dropped, reconnects, errors (calls that failed). */
    public Statistics statistics() {
        lock.lock();
        try {
            return new Statistics(queue.size(), sent, dropped, Math.max(0, connections - 1), errors);
        } finally {
            lock.unlock();
        }
    }

    // -- message building (caller's thread) ----------------------------------------------------

    private StringBuilder start(String type, Map<String, ?> callContext) {
        String[] current = spans.isEmpty() ? remote : current();
        return current == null ? start(type, callContext, null, null, null)
                : start(type, callContext, current[0], current[1], null);
    }

    /** Everything up to and including {@code "data":}. */
    private StringBuilder start(String type, Map<String, ?> callContext, String traceId, String spanId, String parent) {
        StringBuilder sb = new StringBuilder(256);
        sb.append(header).append(type).append("\",\"timestamp\":\"");
        timestamp(sb);
        sb.append('"');
        if (traceId != null) {
            sb.append(",\"trace_id\":\"").append(traceId).append("\",\"span_id\":\"").append(spanId).append('"');
            if (parent != null) {
                sb.append(",\"parent_span_id\":\"").append(parent).append('"');
            }
        }
        Context ctx = context;
        if (callContext != null && !callContext.isEmpty()) {
            Map<String, Object> merged = new LinkedHashMap<>(ctx.map());
            callContext.forEach((k, v) -> merged.put(String.valueOf(k), v));
            sb.append(",\"context\":");
            checkDepth(merged, 0);
            Json.object(sb, merged);
        } else if (ctx.json() != null) {
            sb.append(",\"context\":").append(ctx.json());
        }
        return sb.append(",\"data\":");
    }

    private static byte[] finish(StringBuilder sb) {
        return sb.append("}\n").toString().getBytes(StandardCharsets.UTF_8);
    }

    private StringBuilder startMetric(String name) {
        StringBuilder sb = start("metric", null);
        sb.append("{\"name\":");
        Json.string(sb, name == null ? "" : name);
        return sb.append(",\"value\":");
    }

    private static byte[] finishMetric(StringBuilder sb, String unit, Map<String, ?> tags) {
        if (unit != null) {
            sb.append(",\"unit\":");
            Json.string(sb, unit);
        }
        if (tags != null && !tags.isEmpty()) {
            sb.append(",\"tags\":{");
            boolean first = true;
            for (Map.Entry<String, ?> e : tags.entrySet()) {
                if (!first) {
                    sb.append(',');
                }
                first = false;
                Json.string(sb, String.valueOf(e.getKey()));
                sb.append(':');
                Json.string(sb, e.getValue() == null ? "" : String.valueOf(e.getValue()));
            }
            sb.append('}');
        }
        return finish(sb.append('}'));
    }

    private StringBuilder startProgress(String jobId) {
        StringBuilder sb = start("progress", null);
        sb.append("{\"job_id\":");
        Json.string(sb, jobId == null ? "" : jobId);
        return sb.append(",\"percent\":");
    }

    private static byte[] finishProgress(StringBuilder sb, String status) {
        sb.append(",\"status\":");
        Json.string(sb, status == null ? "running" : status);
        return finish(sb.append('}'));
    }

    private void resourceValue(StringBuilder sb, int mark, String key, Number value) {
        if (value == null) {
            return;
        }
        int before = sb.length();
        if (before > mark) {
            sb.append(',');
        }
        sb.append('"').append(key).append("\":");
        boolean integral = value instanceof Long || value instanceof Integer || value instanceof Short
                || value instanceof Byte;
        if (integral) {
            sb.append(value.longValue());
        } else if (!Json.number(sb, value.doubleValue())) {
            sb.setLength(before);
            fail(new IllegalArgumentException("logResource: " + key + " is not a finite number"));
        }
    }

    private static void finite(StringBuilder sb, double value, String what) {
        if (!Json.number(sb, value)) {
            throw new IllegalArgumentException(what + " is not a finite number: " + value);
        }
    }

    /** (trace_id, span_id) of the calling thread's innermost active span, else the remote parent. */
    private String[] current() {
        ArrayList<String> stack = active.get();
        for (int i = stack.size() - 1; i >= 0; i--) {
            String id = stack.get(i);
            SpanState span = spans.get(id);
            if (span != null) {
                return new String[] {span.traceId(), id};
            }
        }
        return remote;
    }

    private static Context snapshot(Map<String, Object> map) {
        if (map.isEmpty()) {
            return new Context(Collections.emptyMap(), null);
        }
        checkDepth(map, 0);
        return new Context(Collections.unmodifiableMap(map), Json.encode(map));
    }

    /** Rejects values nested too deeply to encode (a map that contains itself, for one). */
    private static void checkDepth(Object v, int depth) {
        if (depth > MAX_DEPTH) {
            throw new IllegalArgumentException("context nested deeper than " + MAX_DEPTH + " levels");
        }
        if (v instanceof Map<?, ?> m) {
            for (Object item : m.values()) {
                checkDepth(item, depth + 1);
            }
        } else if (v instanceof Iterable<?> it) {
            for (Object item : it) {
                checkDepth(item, depth + 1);
            }
        } else if (v instanceof Object[] a) {
            for (Object item : a) {
                checkDepth(item, depth + 1);
            }
        }
    }

    private static String[] parseTraceparent(String value) {
        if (value == null) {
            return null;
        }
        Matcher m = TRACEPARENT.matcher(value.trim().toLowerCase(Locale.ROOT));
        if (!m.matches() || m.group(1).equals("ff") || ALL_ZERO.matcher(m.group(2)).matches()
                || ALL_ZERO.matcher(m.group(3)).matches()) {
            return null;
        }
        return new String[] {m.group(2), m.group(3)};
    }

    /** RFC 3339 UTC with milliseconds; the date and time part is formatted once per second. */
    static void timestamp(StringBuilder sb) {
        long now = System.currentTimeMillis();
        long second = Math.floorDiv(now, 1000);
        int ms = Math.floorMod(now, 1000);
        TimestampCache cached = tsCache;
        if (cached.second() != second) {
            cached = new TimestampCache(second, SECOND.format(LocalDateTime.ofEpochSecond(second, 0, ZoneOffset.UTC)));
            tsCache = cached;
        }
        sb.append(cached.prefix()).append('.').append((char) ('0' + ms / 100)).append((char) ('0' + ms / 10 % 10))
                .append((char) ('0' + ms % 10)).append('Z');
    }

    /** {@code longs} random 64-bit words as lowercase hex, never all zero (W3C ids). */
    private static String randomHex(int longs) {
        ThreadLocalRandom random = ThreadLocalRandom.current();
        char[] out = new char[16 * longs];
        boolean nonZero = false;
        for (int i = 0; i < longs; i++) {
            long v = random.nextLong();
            if (i == longs - 1 && !nonZero && v == 0) {
                v = 1;
            }
            nonZero |= v != 0;
            for (int j = 15; j >= 0; j--) {
                out[i * 16 + j] = HEX[(int) (v & 0xF)];
                v >>>= 4;
            }
        }
        return new String(out);
    }

    // -- queue (caller's thread) ---------------------------------------------------------------

    private void offer(byte[] bytes) {
        boolean full = false;
        boolean large = false;
        lock.lock();
        try {
            if (closed) {
                dropped++;
                return;
            }
            if (bytes.length > MAX_MESSAGE_BYTES || bytes.length > maxBytes) {
                dropped++;
                unreportedLarge++;
                large = true;
            } else {
                queue.addLast(bytes);
                queuedBytes += bytes.length;
                if (queue.size() > maxMessages || queuedBytes > maxBytes) {
                    full = trim() > 0;
                }
            }
            if (idle) { // only a sender waiting for work needs waking; signal() is not free
                idle = false;
                wake.signal();
            } else if (thread == null) {
                startSender();
            }
        } finally {
            lock.unlock();
        }
        if (full) {
            warnOnce("buffer_full", "buffer full: dropping the oldest messages (counted, reported after reconnect)");
        }
        if (large) {
            warnOnce("too_large", "dropping a message over " + MAX_MESSAGE_BYTES + " bytes (counted)");
        }
    }

    /** Drops the oldest messages until the queue is within bounds (lock held). */
    private int trim() {
        int n = 0;
        while (!queue.isEmpty() && (queue.size() > maxMessages || queuedBytes > maxBytes)) {
            queuedBytes -= queue.removeFirst().length;
            n++;
        }
        dropped += n;
        unreportedFull += n;
        return n;
    }

    private void startSender() {
        Thread t = new Thread(this::run, "monitoring-sdk-sender[" + source + "]");
        t.setDaemon(true);
        thread = t;
        LIVE.add(this);
        t.start();
    }

    private void fail(Throwable e) {
        lock.lock();
        try {
            errors++;
        } finally {
            lock.unlock();
        }
        report("call", e);
    }

    private void warnOnce(String kind, String text) {
        if (onError == null && warned.add(kind)) {
            LOG.log(System.Logger.Level.WARNING, "monitoring-sdk[" + source + "]: " + text
                    + "; further occurrences are only counted");
        }
    }

    private void report(String kind, Throwable e) {
        if (onError != null) {
            try {
                onError.accept(e);
            } catch (RuntimeException ignored) {
                // the hook must not break the SDK either
            }
        } else {
            warnOnce(kind, kind + " failed: " + e);
        }
    }

    // -- sender thread -------------------------------------------------------------------------

    private boolean ready() {
        if (queue.isEmpty()) {
            return closed;
        }
        return channel != null || kick || closed || System.nanoTime() - retryAt >= 0;
    }

    private void run() {
        long delay = BACKOFF_START;
        try {
            while (!abandon) {
                lock.lock();
                try {
                    while (!ready()) {
                        idle = queue.isEmpty(); // else backing off: new messages need not wake it
                        if (idle) {
                            wake.await();
                        } else {
                            wake.awaitNanos(Math.max(1, retryAt - System.nanoTime()));
                        }
                    }
                    idle = false;
                    if (queue.isEmpty()) { // closed and written out
                        break;
                    }
                    // Linger briefly so a burst goes out as one batch: fewer wake-ups and
                    // system calls, which leaves the CPU to the callers.
                    long lingerEnd = System.nanoTime() + LINGER;
                    long left;
                    while (!kick && !closed && channel != null && queue.size() < LINGER_MESSAGES
                            && (left = lingerEnd - System.nanoTime()) > 0) {
                        wake.awaitNanos(left);
                    }
                    kick = false;
                } finally {
                    lock.unlock();
                }
                boolean ok;
                try {
                    SocketChannel ch = channel != null ? channel : connect();
                    ok = ch != null && writeBatch(ch);
                } catch (RuntimeException e) { // a bug here must not end the sender for good
                    disconnect();
                    report("send", e);
                    ok = false;
                }
                if (ok) {
                    delay = BACKOFF_START;
                    continue;
                }
                lock.lock();
                try {
                    if (closed && channel == null) { // closing and the sidecar is unreachable: give up
                        break;
                    }
                    retryAt = System.nanoTime() + delay;
                } finally {
                    lock.unlock();
                }
                delay = Math.min(delay * 2, BACKOFF_CAP);
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            disconnect();
            lock.lock();
            try {
                drained.signalAll();
            } finally {
                lock.unlock();
            }
        }
    }

    private SocketChannel connect() {
        SocketChannel ch = null;
        Selector sel = null;
        try {
            long deadline = System.nanoTime() + connectTimeout.toNanos();
            if (unixSocket != null) {
                ch = SocketChannel.open(StandardProtocolFamily.UNIX);
                ch.configureBlocking(false);
                sel = Selector.open();
                connectWithin(ch, sel, UnixDomainSocketAddress.of(unixSocket), deadline);
            } else {
                InetSocketAddress address = new InetSocketAddress(host, port);
                if (address.isUnresolved()) {
                    throw new UnknownHostException(host);
                }
                ch = SocketChannel.open();
                ch.socket().setTcpNoDelay(true);
                ch.socket().connect(address, (int) Math.max(1, Math.min(Integer.MAX_VALUE, connectTimeout.toMillis())));
                ch.configureBlocking(false);
                sel = Selector.open();
            }
            ch.register(sel, SelectionKey.OP_WRITE);
            if (auth != null) {
                writeAuth(ch, sel, deadline);
            }
            selector = sel;
        } catch (IOException | RuntimeException e) {
            closeQuietly(sel);
            closeQuietly(ch);
            report("connect", e);
            return null;
        }
        lock.lock();
        try {
            channel = ch;
            connections++;
        } finally {
            lock.unlock();
        }
        return ch;
    }

    /** A non-blocking connect, finished within the deadline (a Unix socket connects or fails at once). */
    private void connectWithin(SocketChannel ch, Selector sel, SocketAddress address, long deadline) throws IOException {
        if (ch.connect(address)) {
            return;
        }
        SelectionKey key = ch.register(sel, SelectionKey.OP_CONNECT);
        while (!ch.finishConnect()) {
            long left = deadline - System.nanoTime();
            if (left <= 0 || abandon) {
                throw new IOException("connect to unix:" + unixSocket + " timed out");
            }
            sel.select(Math.max(1, TimeUnit.NANOSECONDS.toMillis(left)));
            sel.selectedKeys().clear();
        }
        key.interestOps(0);
    }

    /** The auth line, first on the new connection; its empty socket buffer takes it at once. */
    private void writeAuth(SocketChannel ch, Selector sel, long deadline) throws IOException {
        ByteBuffer line = ByteBuffer.wrap(auth);
        while (line.hasRemaining()) {
            if (ch.write(line) == 0) {
                long left = deadline - System.nanoTime();
                if (left <= 0 || abandon) {
                    throw new IOException("the sidecar did not take the auth line in time");
                }
                sel.select(Math.max(1, TimeUnit.NANOSECONDS.toMillis(left)));
                sel.selectedKeys().clear();
            }
        }
    }

    private void disconnect() {
        SocketChannel ch = channel;
        Selector sel = selector;
        channel = null;
        selector = null;
        closeQuietly(sel);
        closeQuietly(ch);
    }

    private static void closeQuietly(AutoCloseable c) {
        if (c != null) {
            try {
                c.close();
            } catch (Exception ignored) {
                // nothing left to do with it
            }
        }
    }

    /** Writes the whole queue in one go; on failure puts back what did not get out whole. */
    private boolean writeBatch(SocketChannel ch) {
        ArrayDeque<byte[]> batch;
        long reportFull;
        long reportLarge;
        lock.lock();
        try { // O(1) swap: callers never wait while a long batch is written
            batch = queue;
            queue = new ArrayDeque<>();
            queuedBytes = 0;
            inFlight = batch.size();
            reportFull = unreportedFull;
            reportLarge = unreportedLarge;
        } finally {
            lock.unlock();
        }
        int extra = 0;
        if (reportFull > 0 || reportLarge > 0) {
            batch.addFirst(dropReport(reportFull, reportLarge));
            extra = 1;
        }
        ByteBuffer[] buffers = new ByteBuffer[batch.size()];
        int k = 0;
        for (byte[] message : batch) {
            buffers[k++] = ByteBuffer.wrap(message);
        }
        IOException error = null;
        try {
            if (peerClosed(ch)) {
                throw new IOException("the sidecar closed the connection");
            }
            int first = 0;
            while (first < buffers.length) {
                long n = ch.write(buffers, first, Math.min(buffers.length - first, 1024));
                while (first < buffers.length && !buffers[first].hasRemaining()) {
                    first++;
                }
                if (n == 0 && first < buffers.length) { // the sidecar is not reading: wait, unless close() gave up
                    Selector sel = selector;
                    if (sel == null || abandon) {
                        throw new IOException("gave up writing to a sidecar that does not read");
                    }
                    sel.select(SEND_POLL_MS);
                    sel.selectedKeys().clear();
                }
            }
        } catch (IOException e) {
            error = e;
        }
        int done = error == null ? buffers.length : delivered(buffers);
        lock.lock();
        try {
            if (extra > 0 && done > 0) {
                unreportedFull -= reportFull;
                unreportedLarge -= reportLarge;
            }
            sent += Math.max(0, done - extra);
            int from = Math.max(done, extra);
            if (from < buffers.length && !abandon) { // back to the front of the queue, in order
                for (int i = buffers.length - 1; i >= from; i--) {
                    byte[] message = buffers[i].array();
                    queue.addFirst(message);
                    queuedBytes += message.length;
                }
                if (queue.size() > maxMessages || queuedBytes > maxBytes) {
                    trim();
                }
            }
            inFlight = 0;
            drained.signalAll();
        } finally {
            lock.unlock();
        }
        if (error != null) {
            disconnect();
            report("send", error);
            return false;
        }
        return true;
    }

    /**
     * How many messages of a batch the sidecar got whole. A JSON line counts even without its
     * newline: the sidecar takes an unterminated last line at EOF, so sending it again would
     * duplicate it.
     */
    private static int delivered(ByteBuffer[] buffers) {
        int done = 0;
        while (done < buffers.length && buffers[done].remaining() <= 1) {
            done++;
        }
        return done;
    }

    /** True if the sidecar closed the connection: writing now would lose the batch silently. */
    private boolean peerClosed(SocketChannel ch) throws IOException {
        while (true) {
            probe.clear();
            int n = ch.read(probe);
            if (n < 0) {
                return true;
            }
            if (n == 0) {
                return false;
            }
            // The sidecar only talks to refuse a stream: pass its words on.
            report("sidecar", new IOException("the sidecar said: "
                    + new String(probe.array(), 0, n, StandardCharsets.UTF_8).trim()));
        }
    }

    private byte[] dropReport(long full, long large) {
        StringBuilder sb = new StringBuilder();
        if (full > 0) {
            dropMetric(sb, "buffer_full", full);
        }
        if (large > 0) {
            dropMetric(sb, "too_large", large);
        }
        return sb.toString().getBytes(StandardCharsets.UTF_8);
    }

    private void dropMetric(StringBuilder sb, String reason, long count) {
        sb.append(header).append("metric\",\"timestamp\":\"");
        timestamp(sb);
        sb.append("\",\"data\":{\"name\":\"sdk.dropped_messages\",\"value\":").append(count)
                .append(",\"unit\":\"count\",\"tags\":{\"reason\":\"").append(reason).append("\"}}}\n");
    }

    // -- helpers -------------------------------------------------------------------------------

    private static long toNanos(Duration d) {
        try {
            return Math.max(0, d.toNanos());
        } catch (ArithmeticException tooLong) {
            return Long.MAX_VALUE / 2;
        }
    }

    private static Map<String, String> safeGetenv() {
        try {
            return System.getenv();
        } catch (SecurityException e) {
            return Map.of();
        }
    }

    private static void closeAllAtExit() {
        List<MonitoringClient> clients = new ArrayList<>(LIVE);
        long longest = 0;
        for (MonitoringClient c : clients) {
            longest = Math.max(longest, toNanos(c.closeTimeout));
        }
        long deadline = System.nanoTime() + longest;
        for (MonitoringClient c : clients) {
            c.close(Duration.ofNanos(Math.max(1_000_000, deadline - System.nanoTime())));
        }
    }
}
