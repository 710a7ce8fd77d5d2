package io.monitoring.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Pattern;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** What each call puts on the wire, byte for byte where the format is fixed. */
class MessagesTest {
    static final Pattern TIMESTAMP = Pattern.compile("\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{3}Z");
    static final Pattern TRACE_ID = Pattern.compile("[0-9a-f]{32}");
    static final Pattern SPAN_ID = Pattern.compile("[0-9a-f]{16}");

    CaptureServer server;
    MonitoringClient mon;

    @BeforeEach
    void setUp() throws IOException {
        server = CaptureServer.start();
        mon = client("test-service", Map.of());
    }

    @AfterEach
    void tearDown() {
        mon.close(Duration.ofSeconds(1));
        server.close();
    }

    MonitoringClient client(String source, Map<String, String> env) {
        return MonitoringClient.builder(source).host("127.0.0.1").port(server.port()).environment(env)
                .onError(e -> { }).build();
    }

    /** The raw line with its timestamp replaced by TS, after checking the timestamp's format. */
    static String masked(String line) {
        var m = Pattern.compile("\"timestamp\":\"([^\"]*)\"").matcher(line);
        assertTrue(m.find(), line);
        assertTrue(TIMESTAMP.matcher(m.group(1)).matches(), m.group(1));
        return m.replaceFirst("\"timestamp\":\"TS\"");
    }

    List<String> linesOf(int n) throws InterruptedException {
        assertTrue(mon.flush(Duration.ofSeconds(10)));
        List<Map<String, Object>> parsed = server.messages(n);
        assertEquals(n, parsed.size());
        return server.lines(n, Duration.ZERO).stream().map(MessagesTest::masked).toList();
    }

    @Test
    void eachCallSendsItsExactMessage() throws Exception {
        mon.setContext("job_id", "job-1");
        mon.logEvent("info", "hello", Map.of("file", "a.csv"));
        mon.logEvent("WARN", "careful");
        mon.logMetric("rows", 10000, "count", Map.of("table", "orders"));
        mon.logMetric("file_valid", 1);
        mon.logMetric("latency", 12.5, "ms");
        mon.logMetric("empty_tags", 2L, null, Map.of());
        mon.logProgress("job-1", 50, "running");
        mon.logProgress("job-1", 75.5);
        mon.logResource(12.5, 256, null, null);
        mon.logResource(null, null, null, 3L);
        mon.setContext("job_id", null);
        mon.logEvent(null, null);

        String ctx = ",\"context\":{\"job_id\":\"job-1\"}";
        String head = "{\"source\":\"test-service\",\"type\":";
        assertEquals(List.of(
                head + "\"event\",\"timestamp\":\"TS\",\"context\":{\"job_id\":\"job-1\",\"file\":\"a.csv\"},"
                        + "\"data\":{\"level\":\"info\",\"message\":\"hello\"}}",
                head + "\"event\",\"timestamp\":\"TS\"" + ctx + ",\"data\":{\"level\":\"warning\",\"message\":\"careful\"}}",
                head + "\"metric\",\"timestamp\":\"TS\"" + ctx
                        + ",\"data\":{\"name\":\"rows\",\"value\":10000,\"unit\":\"count\",\"tags\":{\"table\":\"orders\"}}}",
                head + "\"metric\",\"timestamp\":\"TS\"" + ctx + ",\"data\":{\"name\":\"file_valid\",\"value\":1}}",
                head + "\"metric\",\"timestamp\":\"TS\"" + ctx + ",\"data\":{\"name\":\"latency\",\"value\":12.5,\"unit\":\"ms\"}}",
                head + "\"metric\",\"timestamp\":\"TS\"" + ctx + ",\"data\":{\"name\":\"empty_tags\",\"value\":2}}",
                head + "\"progress\",\"timestamp\":\"TS\"" + ctx
                        + ",\"data\":{\"job_id\":\"job-1\",\"percent\":50,\"status\":\"running\"}}",
                head + "\"progress\",\"timestamp\":\"TS\"" + ctx
                        + ",\"data\":{\"job_id\":\"job-1\",\"percent\":75.5,\"status\":\"running\"}}",
                head + "\"resource\",\"timestamp\":\"TS\"" + ctx + ",\"data\":{\"cpu_percent\":12.5,\"memory_mb\":256}}",
                head + "\"resource\",\"timestamp\":\"TS\"" + ctx + ",\"data\":{\"network_io_mb\":3}}",
                head + "\"event\",\"timestamp\":\"TS\",\"data\":{\"level\":\"info\",\"message\":\"\"}}"),
                linesOf(11));
        assertEquals(new MonitoringClient.Statistics(0, 11, 0, 0, 0), mon.statistics());
    }

    @Test
    void callContextWinsOverClientContext() throws Exception {
        mon.setContext("job_id", "job-1");
        mon.setContext("attempt", 2);
        mon.logEvent("info", "x", Map.of("job_id", "job-2"));
        Map<String, Object> m = CaptureServer.parseAll(linesOf(1)).get(0);
        assertEquals(Map.of("job_id", "job-2", "attempt", 2L), m.get("context"));
    }

    @Test
    void badValuesAreCountedNotSentNotThrown() throws Exception {
        mon.logMetric("nan", Double.NaN);
        mon.logMetric("inf", Double.POSITIVE_INFINITY, "ms");
        mon.logProgress("job", Double.NaN);
        mon.endSpan("0123456789abcdef");
        mon.endSpan(null);
        Map<Object, Object> cyclic = new LinkedHashMap<>();
        cyclic.put("self", cyclic);
        mon.logEvent("info", "cyclic", Map.of("c", cyclic));
        mon.logResource(Double.NaN, 5, null, null); // the bad value is left out, the rest is sent
        mon.logEvent("info", "after");
        List<String> lines = linesOf(2);
        assertTrue(lines.get(0).endsWith("\"data\":{\"memory_mb\":5}}"), lines.get(0));
        assertTrue(lines.get(1).contains("\"message\":\"after\""), lines.get(1));
        assertEquals(7, mon.statistics().errors());
    }

    @Test
    void hostileStringsAreEscapedIntoOneValidLineEach() throws Exception {
        String hostile = "quote\" backslash\\ nl\n cr\r tab\t nul\0 esc\u001b del\u007f ls\u2028 "
                + "emoji\uD83D\uDE00 e\u0301 }\n{\"source\":\"forged\",\"type\":\"event\"}";
        String lone = "high\uD800 low\uDC00 end\uD83D";
        try (MonitoringClient evil = client(hostile, Map.of())) {
            evil.setContext(hostile, hostile);
            evil.logEvent("info", hostile, Map.of("k", lone));
            evil.logMetric(hostile, 1, hostile, Map.of(hostile, hostile));
            evil.startSpan(hostile);
            evil.logProgress(hostile, 1, hostile);
            assertTrue(evil.flush(Duration.ofSeconds(10)));
        }
        List<Map<String, Object>> got = server.messages(4);
        for (Map<String, Object> m : got) {
            assertEquals(hostile, m.get("source"));
            assertEquals(hostile, ((Map<?, ?>) m.get("context")).get(hostile));
        }
        assertEquals(hostile, ((Map<?, ?>) got.get(0).get("data")).get("message"));
        assertEquals("high\uFFFD low\uFFFD end\uFFFD", ((Map<?, ?>) got.get(0).get("context")).get("k"));
        Map<?, ?> metric = (Map<?, ?>) got.get(1).get("data");
        assertEquals(hostile, metric.get("name"));
        assertEquals(hostile, metric.get("unit"));
        assertEquals(Map.of(hostile, hostile), metric.get("tags"));
        assertEquals(hostile, ((Map<?, ?>) got.get(2).get("data")).get("name"));
        assertEquals(hostile, ((Map<?, ?>) got.get(3).get("data")).get("status"));
        for (String line : server.lines(4, Duration.ZERO)) {
            for (char c : line.toCharArray()) {
                assertTrue(c >= 0x20, "raw control character in " + line);
            }
        }
    }

    @Test
    void spansNestAndLinkToTheirParents() throws Exception {
        String outer = mon.startSpan("load");
        mon.logEvent("info", "inside");
        String inner;
        try (Span span = mon.span("parse")) {
            inner = span.id();
            mon.logMetric("rows", 3);
            span.fail();
        }
        mon.endSpan(outer);
        mon.logEvent("info", "outside");
        List<Map<String, Object>> m = CaptureServer.parseAll(linesOf(7));

        String trace = (String) m.get(0).get("trace_id");
        assertTrue(TRACE_ID.matcher(trace).matches(), trace);
        assertTrue(SPAN_ID.matcher(outer).matches() && SPAN_ID.matcher(inner).matches());
        assertNotEquals(outer, inner);
        // start of outer: a new trace, no parent
        assertEquals(Map.of("name", "load", "phase", "start"), m.get(0).get("data"));
        assertEquals(outer, m.get(0).get("span_id"));
        assertFalse(m.get(0).containsKey("parent_span_id"));
        // a message inside a span carries its ids, no parent
        assertEquals(List.of(trace, outer), List.of(m.get(1).get("trace_id"), m.get(1).get("span_id")));
        assertFalse(m.get(1).containsKey("parent_span_id"));
        // the inner span is the outer one's child
        for (int i : new int[] {2, 4}) {
            assertEquals(List.of(trace, inner, outer),
                    List.of(m.get(i).get("trace_id"), m.get(i).get("span_id"), m.get(i).get("parent_span_id")));
        }
        assertEquals(List.of(trace, inner), List.of(m.get(3).get("trace_id"), m.get(3).get("span_id")));
        Map<?, ?> innerEnd = (Map<?, ?>) m.get(4).get("data");
        assertEquals("end", innerEnd.get("phase"));
        assertEquals("error", innerEnd.get("status"));
        assertTrue(((Number) innerEnd.get("duration_ms")).doubleValue() >= 0);
        Map<?, ?> outerEnd = (Map<?, ?>) m.get(5).get("data");
        assertEquals(List.of("load", "end", "success"),
                List.of(outerEnd.get("name"), outerEnd.get("phase"), outerEnd.get("status")));
        assertEquals(outer, m.get(5).get("span_id"));
        assertFalse(m.get(5).containsKey("parent_span_id"));
        // after the last span ends, messages carry no trace
        assertFalse(m.get(6).containsKey("trace_id"));
        assertEquals(0, mon.statistics().errors());
    }

    @Test
    void spansBelongToTheThreadThatStartedThem() throws Exception {
        String mine = mon.startSpan("main");
        Thread other = new Thread(() -> {
            mon.logEvent("info", "other thread");
            String theirs = mon.startSpan("worker");
            mon.endSpan(theirs);
        });
        other.start();
        other.join(10_000);
        mon.endSpan(mine);
        List<Map<String, Object>> m = CaptureServer.parseAll(linesOf(5));
        Map<String, Object> otherEvent = m.stream()
                .filter(x -> "other thread".equals(((Map<?, ?>) x.get("data")).get("message"))).findFirst().orElseThrow();
        assertNull(otherEvent.get("trace_id"));
        Map<String, Object> workerStart = m.stream()
                .filter(x -> "worker".equals(((Map<?, ?>) x.get("data")).get("name"))).findFirst().orElseThrow();
        assertNull(workerStart.get("parent_span_id"));
        assertNotEquals(m.get(0).get("trace_id"), workerStart.get("trace_id"));
    }

    @Test
    void environmentIsPickedUpAtConstruction() throws Exception {
        String trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        String remoteSpan = "00f067aa0ba902b7";
        Map<String, String> env = Map.of(
                "TRACEPARENT", "00-" + trace + "-" + remoteSpan + "-01",
                "MONITORING_CONTEXT", "{\"job_id\":\"job-12345\",\"n\":3}",
                "MONITORING_SOURCE", "db-loader",
                "MONITORING_SIDECAR", "127.0.0.1:" + server.port());
        try (MonitoringClient child = MonitoringClient.builder("ignored").host("192.0.2.1").port(1)
                .environment(env).onError(e -> { }).build()) {
            assertEquals("db-loader", child.source());
            assertEquals("127.0.0.1", child.host());
            assertEquals(server.port(), child.port());
            assertEquals(Map.of("TRACEPARENT", "00-" + trace + "-" + remoteSpan + "-01",
                    "MONITORING_CONTEXT", "{\"job_id\":\"job-12345\",\"n\":3}"), child.childEnvironment());

            child.logEvent("info", "start", Map.of("job_id", "mine"));
            String span;
            Map<String, String> inside;
            try (Span s = child.span("load")) {
                span = s.id();
                child.setContext("rows", "10");
                inside = child.childEnvironment();
            }
            assertEquals("00-" + trace + "-" + span + "-01", inside.get("TRACEPARENT"));
            assertEquals(Map.of("job_id", "job-12345", "n", 3L, "rows", "10"), Json.parse(inside.get("MONITORING_CONTEXT")));
            assertTrue(child.flush(Duration.ofSeconds(10)));
        }
        List<Map<String, Object>> m = server.messages(3);
        assertEquals("db-loader", m.get(0).get("source"));
        assertEquals(List.of(trace, remoteSpan), List.of(m.get(0).get("trace_id"), m.get(0).get("span_id")));
        assertEquals(Map.of("job_id", "mine", "n", 3L), m.get(0).get("context"));
        assertEquals(List.of(trace, remoteSpan), List.of(m.get(1).get("trace_id"), m.get(1).get("parent_span_id")));
        assertEquals(Map.of("job_id", "job-12345", "n", 3L), m.get(1).get("context"));
    }

    @Test
    void malformedEnvironmentIsIgnored() {
        List<Throwable> problems = new java.util.concurrent.CopyOnWriteArrayList<>();
        MonitoringClient c = MonitoringClient.builder("svc").host("127.0.0.1").port(4000)
                .environment(Map.of("TRACEPARENT", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                        "MONITORING_CONTEXT", "[1,2]", "MONITORING_SIDECAR", "nonsense", "MONITORING_SOURCE", ""))
                .onError(problems::add).build();
        assertEquals("svc", c.source());
        assertEquals(4000, c.port());
        assertEquals(Map.of(), c.childEnvironment());
        assertEquals(2, problems.size(), problems.toString());
        c.close();
    }

    @Test
    void childProcessReceivesThePropagationVariables() throws Exception {
        mon.setContext("job_id", "job-7");
        String printed;
        String span;
        try (Span s = mon.span("run-child")) {
            span = s.id();
            ProcessBuilder pb = mon.applyTo(new ProcessBuilder("sh", "-c", "printf '%s|%s' \"$TRACEPARENT\" \"$MONITORING_CONTEXT\""));
            Process p = pb.start();
            printed = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
            assertEquals(0, p.waitFor());
        }
        assertTrue(printed.matches("00-[0-9a-f]{32}-" + span + "-01\\|\\{\"job_id\":\"job-7\"\\}"), printed);
    }
}
