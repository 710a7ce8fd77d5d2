package io.monitoring.sdk;

/**
 * A span for try-with-resources:
 *
 * <pre>{@code
 * try (Span span = mon.span("load")) {
 *     try {
 *         load();
 *     } catch (IOException e) {
 *         span.fail();          // close() cannot see the exception: say so before it runs
 *         throw e;
 *     }
 * }
 * }</pre>
 *
 * <p>{@link #close()} ends the span once, with status "success" unless {@link #fail()} or
 * {@link #setStatus(String)} set another; closing a root span restores the context it started
 * with, as {@link MonitoringClient#endSpan(String, String)} does. Thread-safe; like every SDK
 * call it never throws.
 */
public final class Span implements AutoCloseable {
    private final MonitoringClient client;
    private final String id;
    private volatile String status = "success";
    private volatile boolean ended;

    Span(MonitoringClient client, String id) {
        this.client = client;
        this.id = id;
    }

    /** The span id (16 lowercase hex digits), as {@link MonitoringClient#startSpan(String)} returns it. */
    public String id() {
        return id;
    }

    /** Marks the span as failed: it ends with status "error". */
    public Span fail() {
        return setStatus("error");
    }

    /** Sets the status the span ends with (null: "success"). */
    public Span setStatus(String status) {
        this.status = status == null ? "success" : status;
        return this;
    }

    /** The status the span will end (or ended) with. */
    public String status() {
        return status;
    }

    /** Ends the span; later calls do nothing. */
    @Override
    public void close() {
        synchronized (this) {
            if (ended) {
                return;
            }
            ended = true;
        }
        client.endSpan(id, status);
    }

    @Override
    public String toString() {
        return id;
    }
}
