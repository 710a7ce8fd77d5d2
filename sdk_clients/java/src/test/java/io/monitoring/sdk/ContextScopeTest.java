package io.monitoring.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** How context and spans scope each other: a root span undoes, when it ends, the context set inside it. */
class ContextScopeTest {
    CaptureServer server;
    MonitoringClient mon;

    @BeforeEach
    void setUp() throws IOException {
        server = CaptureServer.start();
        mon = client(Map.of());
    }

    @AfterEach
    void tearDown() {
        mon.close(Duration.ofSeconds(1));
        server.close();
    }

    MonitoringClient client(Map<String, String> env) {
        return MonitoringClient.builder("queue-service").host("127.0.0.1").port(server.port()).environment(env)
                .onError(e -> { }).build();
    }

    List<Map<String, Object>> messages(MonitoringClient c, int n) throws InterruptedException {
        assertTrue(c.flush(Duration.ofSeconds(10)));
        List<Map<String, Object>> got = server.messages(n);
        assertEquals(n, got.size());
        return got;
    }

    static Object context(Map<String, Object> message) {
        return message.getOrDefault("context", Map.of());
    }

    static Object data(Map<String, Object> message, String key) {
        return ((Map<?, ?>) message.get("data")).get(key);
    }

    @Test
    void queueServiceLoopKeepsEachJobIdInItsOwnSpan() throws Exception {
        mon.setContext("service", "qs");
        for (String job : List.of("job-1", "job-2")) {
            String span = mon.startSpan("process_job");
            mon.setContext("job_id", job);
            mon.logProgress(job, 100, "completed");
            mon.endSpan(span, "success");
            mon.logMetric("jobs_processed", 1, "count");
        }
        List<Map<String, Object>> m = messages(mon, 8);

        assertEquals(Map.of("service", "qs"), context(m.get(0)));
        assertEquals(Map.of("service", "qs", "job_id", "job-1"), context(m.get(1)));
        assertEquals(Map.of("service", "qs", "job_id", "job-1"), context(m.get(2))); // the end still has it
        assertEquals("end", data(m.get(2), "phase"));
        assertEquals(Map.of("service", "qs"), context(m.get(3))); // jobs_processed: after the span, no job
        assertFalse(m.get(3).containsKey("trace_id"));
        List<Map<String, Object>> job2 = m.subList(4, 8);
        for (Map<String, Object> x : job2) {
            assertNotEquals("job-1", ((Map<?, ?>) context(x)).get("job_id"), x.toString());
        }
        assertEquals(Map.of("service", "qs"), context(job2.get(0)));
        assertEquals("start", data(job2.get(0), "phase"));
        assertEquals(Map.of("service", "qs", "job_id", "job-2"), context(job2.get(2)));
        assertEquals(Map.of("service", "qs"), context(job2.get(3)));
        assertNotEquals(m.get(0).get("trace_id"), job2.get(0).get("trace_id"));
        assertEquals(Map.of("MONITORING_CONTEXT", "{\"service\":\"qs\"}"), mon.childEnvironment());
    }

    @Test
    void changedAndRemovedKeysComeBackWhenTheRootSpanEnds() throws Exception {
        mon.setContext("service", "qs");
        mon.setContext("tenant", "acme");
        String id;
        try (Span span = mon.span("process_job")) {
            id = span.id();
            mon.setContext("service", "other");
            mon.setContext("tenant", null);
            mon.logEvent("info", "inside");
        }
        mon.logEvent("info", "after");
        List<Map<String, Object>> m = messages(mon, 4);
        assertEquals(Map.of("service", "other"), context(m.get(1)));
        assertEquals(Map.of("service", "other"), context(m.get(2)));
        assertEquals(List.of(id, "end"), List.of(m.get(2).get("span_id"), data(m.get(2), "phase")));
        assertEquals(Map.of("service", "qs", "tenant", "acme"), context(m.get(3)));
    }

    @Test
    void nestedSpansDoNotScopeContext() throws Exception {
        String root = mon.startSpan("process_job");
        try (Span load = mon.span("load")) {
            mon.setContext("stage", "load");
            load.setStatus("loaded");
        }
        mon.logEvent("info", "after the nested span");
        mon.endSpan(root);
        mon.logEvent("info", "after the root span");
        List<Map<String, Object>> m = messages(mon, 6);
        assertEquals(Map.of("stage", "load"), context(m.get(2))); // end of load
        assertEquals(List.of(root, "loaded"), List.of(m.get(2).get("parent_span_id"), data(m.get(2), "status")));
        assertEquals(Map.of("stage", "load"), context(m.get(3)));
        assertEquals(Map.of("stage", "load"), context(m.get(4))); // end of the root
        assertFalse(m.get(5).containsKey("context"));
        assertEquals(Map.of(), mon.childEnvironment());
    }

    @Test
    void outOfOrderEndRestoresWhenTheRootSpanEnds() throws Exception {
        mon.setContext("service", "qs");
        String root = mon.startSpan("process_job");
        String nested = mon.startSpan("load");
        mon.setContext("job_id", "job-1");
        mon.endSpan(root);
        mon.logEvent("info", "nested still open");
        mon.endSpan(nested);
        mon.logEvent("info", "all ended");
        List<Map<String, Object>> m = messages(mon, 6);
        assertEquals(Map.of("service", "qs", "job_id", "job-1"), context(m.get(2)));
        assertEquals(root, m.get(2).get("span_id"));
        assertEquals(Map.of("service", "qs"), context(m.get(3)));
        assertEquals(nested, m.get(3).get("span_id"));
        assertEquals(Map.of("service", "qs"), context(m.get(4))); // ending the nested span changes nothing
        assertEquals(Map.of("service", "qs"), context(m.get(5)));
        assertEquals(0, mon.statistics().errors());
    }

    @Test
    void aSpanOfAnotherThreadInsideTheRootSpanIsNested() throws Exception {
        String root = mon.startSpan("process_job");
        Thread worker = new Thread(() -> {
            String theirs = mon.startSpan("worker");
            mon.setContext("worker", "w1");
            mon.endSpan(theirs);
        });
        worker.start();
        worker.join(10_000);
        assertEquals("{\"worker\":\"w1\"}", mon.childEnvironment().get("MONITORING_CONTEXT"));
        mon.endSpan(root);
        assertNull(mon.childEnvironment().get("MONITORING_CONTEXT"));
        messages(mon, 4);
    }

    @Test
    void endingAnUnknownOrEndedSpanLeavesTheContextAlone() throws Exception {
        String root = mon.startSpan("process_job");
        mon.setContext("job_id", "job-1");
        mon.endSpan(root);
        mon.setContext("service", "qs");
        mon.endSpan(root);
        mon.endSpan("0123456789abcdef");
        assertEquals(Map.of("MONITORING_CONTEXT", "{\"service\":\"qs\"}"), mon.childEnvironment());
        assertEquals(2, mon.statistics().errors());
    }

    @Test
    void inheritedContextComesBackForChildren() throws Exception {
        String trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        String remoteSpan = "00f067aa0ba902b7";
        String inherited = "{\"job_id\":\"job-parent\",\"tenant\":\"acme\"}";
        try (MonitoringClient child = client(Map.of("TRACEPARENT", "00-" + trace + "-" + remoteSpan + "-01",
                "MONITORING_CONTEXT", inherited))) {
            String span = child.startSpan("load_data");
            child.setContext("job_id", "job-child");
            child.setContext("file", "a.csv");
            assertEquals(Map.of("job_id", "job-child", "tenant", "acme", "file", "a.csv"),
                    Json.parse(child.childEnvironment().get("MONITORING_CONTEXT")));
            child.endSpan(span);
            assertEquals(Map.of("job_id", "job-parent", "tenant", "acme"),
                    Json.parse(child.childEnvironment().get("MONITORING_CONTEXT")));
            assertEquals("00-" + trace + "-" + remoteSpan + "-01", child.childEnvironment().get("TRACEPARENT"));
            child.logEvent("info", "inherited context back");
            List<Map<String, Object>> m = messages(child, 3);
            assertEquals(remoteSpan, m.get(0).get("parent_span_id"));
            assertEquals(Map.of("job_id", "job-child", "tenant", "acme", "file", "a.csv"), context(m.get(1)));
            assertEquals(Map.of("job_id", "job-parent", "tenant", "acme"), context(m.get(2)));
            assertEquals(remoteSpan, m.get(2).get("span_id"));
        }
    }

    @Test
    void aChildStartedAfterTheRootSpanGetsTheRestoredContext() throws Exception {
        mon.setContext("service", "qs");
        try (Span span = mon.span("process_job")) {
            mon.setContext("job_id", "job-1");
            span.setStatus("success");
        }
        assertEquals("{\"service\":\"qs\"}", printedByChild());
        try (Span span = mon.span("process_job")) {
            mon.setContext("service", null);
            mon.setContext("job_id", "job-2");
            span.setStatus("success");
        }
        mon.setContext("service", null);
        try (Span span = mon.span("process_job")) {
            mon.setContext("job_id", "job-3");
            span.setStatus("success");
        }
        assertEquals("", printedByChild()); // an empty context: MONITORING_CONTEXT unset
    }

    /** $MONITORING_CONTEXT as a real child process sees it, started the SDK's documented way. */
    String printedByChild() throws Exception {
        ProcessBuilder pb = new ProcessBuilder("sh", "-c", "printf '%s' \"${MONITORING_CONTEXT-}\"");
        pb.environment().put("MONITORING_CONTEXT", "{\"stale\":true}"); // applyTo must replace or remove it
        Process p = mon.applyTo(pb).start();
        String printed = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        assertEquals(0, p.waitFor());
        return printed;
    }
}
