package io.monitoring.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import org.junit.jupiter.api.Test;

/** The bad days: no sidecar, a sidecar that restarts, a full buffer, many threads, a sidecar that never reads. */
class ResilienceTest {

    static MonitoringClient.Builder builder(int port) {
        return MonitoringClient.builder("resilience").host("127.0.0.1").port(port).environment(Map.of())
                .onError(e -> { });
    }

    static List<Long> sequence(List<Map<String, Object>> messages) {
        List<Long> out = new ArrayList<>();
        for (Map<String, Object> m : messages) {
            out.add((Long) ((Map<?, ?>) m.get("data")).get("value"));
        }
        return out;
    }

    static List<Long> range(long from, long to) {
        List<Long> out = new ArrayList<>();
        for (long i = from; i < to; i++) {
            out.add(i);
        }
        return out;
    }

    @Test
    void sidecarDownCallsReturnAtOnce() throws Exception {
        int port = CaptureServer.freePort();
        try (MonitoringClient mon = builder(port).build()) {
            long worst = 0;
            long begin = System.nanoTime();
            for (int i = 0; i < 2000; i++) {
                long t0 = System.nanoTime();
                mon.logEvent("info", "nobody listens " + i);
                mon.logMetric("seq", i);
                worst = Math.max(worst, System.nanoTime() - t0);
            }
            long total = System.nanoTime() - begin;
            // Generous bounds for a busy shared machine: a call that waited on the network would take far longer.
            assertTrue(total < Duration.ofSeconds(5).toNanos(), "4000 calls took " + total / 1_000_000 + " ms");
            assertTrue(worst < Duration.ofMillis(500).toNanos(), "slowest call " + worst / 1_000_000 + " ms");
            assertEquals(4000, mon.statistics().queued());
            assertFalse(mon.flush(Duration.ofMillis(100)));

            long t0 = System.nanoTime();
            assertFalse(mon.close(Duration.ofMillis(300)));
            assertTrue(System.nanoTime() - t0 < Duration.ofSeconds(3).toNanos());
            MonitoringClient.Statistics s = mon.statistics();
            assertEquals(0, s.queued());
            assertEquals(4000, s.dropped());
            mon.logEvent("info", "after close"); // dropped and counted, never thrown
            assertEquals(4001, mon.statistics().dropped());
        }
    }

    @Test
    void sidecarBackThenRestartedEverythingArrivesOnceInOrder() throws Exception {
        int port = CaptureServer.freePort();
        try (MonitoringClient mon = builder(port).build()) {
            for (int i = 0; i < 100; i++) {
                mon.logMetric("seq", i);
            }
            Thread.sleep(300); // let the sender fail and back off
            try (CaptureServer server = CaptureServer.start(port)) {
                assertTrue(mon.flush(Duration.ofSeconds(10)));
                assertEquals(range(0, 100), sequence(server.messages(100)));
            }
            // the sidecar restarts: messages logged while it is away wait in the queue
            for (int i = 100; i < 200; i++) {
                mon.logMetric("seq", i);
            }
            Thread.sleep(200);
            try (CaptureServer server = CaptureServer.start(port)) {
                for (int i = 200; i < 300; i++) {
                    mon.logMetric("seq", i);
                }
                assertTrue(mon.flush(Duration.ofSeconds(10)));
                assertEquals(range(100, 300), sequence(server.messages(200)));
            }
            MonitoringClient.Statistics s = mon.statistics();
            assertEquals(300, s.sent());
            assertEquals(0, s.dropped());
            assertEquals(1, s.reconnects());
        }
    }

    @Test
    void overflowDropsTheOldestAndReportsTheCount() throws Exception {
        int port = CaptureServer.freePort();
        try (MonitoringClient mon = builder(port).maxMessages(100).build()) {
            for (int i = 0; i < 250; i++) {
                mon.logMetric("seq", i);
            }
            MonitoringClient.Statistics s = mon.statistics();
            assertEquals(100, s.queued());
            assertEquals(150, s.dropped());
            try (CaptureServer server = CaptureServer.start(port)) {
                assertTrue(mon.flush(Duration.ofSeconds(10)));
                List<Map<String, Object>> got = server.messages(101);
                assertEquals(Map.of("name", "sdk.dropped_messages", "value", 150L, "unit", "count",
                        "tags", Map.of("reason", "buffer_full")), got.get(0).get("data"));
                assertEquals("metric", got.get(0).get("type"));
                assertEquals(range(150, 250), sequence(got.subList(1, 101)));
                mon.logMetric("seq", 250); // once reported, the count is not sent again
                assertTrue(mon.flush(Duration.ofSeconds(10)));
                assertEquals(List.of(250L), sequence(server.messages(102).subList(101, 102)));
            }
        }
    }

    @Test
    void byteBoundAlsoDropsTheOldest() throws Exception {
        int port = CaptureServer.freePort();
        String pad = "x".repeat(1000);
        try (MonitoringClient mon = builder(port).maxBytes(10_000).build()) {
            for (int i = 0; i < 30; i++) {
                mon.logEvent("info", pad + i);
            }
            MonitoringClient.Statistics s = mon.statistics();
            assertTrue(s.queued() >= 8 && s.queued() <= 9, s.toString());
            assertEquals(30, s.queued() + s.dropped());
            mon.logEvent("info", "y".repeat(20_000)); // larger than the whole buffer: dropped alone
            assertEquals(s.queued(), mon.statistics().queued());
        }
    }

    @Test
    void manyThreadsEveryMessageIntactNoneInterleaved() throws Exception {
        int threads = 8;
        int calls = 1000;
        try (CaptureServer server = CaptureServer.start();
             MonitoringClient mon = builder(server.port()).build()) {
            CountDownLatch go = new CountDownLatch(1);
            List<Thread> workers = new ArrayList<>();
            for (int t = 0; t < threads; t++) {
                String name = "worker-" + t;
                Thread w = new Thread(() -> {
                    try {
                        go.await();
                    } catch (InterruptedException e) {
                        return;
                    }
                    for (int i = 0; i < calls; i++) {
                        if (i % 2 == 0) {
                            mon.logEvent("info", name + " " + i + " \"quoted\"\n", Map.of("thread", name));
                        } else {
                            mon.logMetric(name, i, "count", Map.of("seq", Integer.toString(i)));
                        }
                    }
                });
                w.start();
                workers.add(w);
            }
            go.countDown();
            for (Thread w : workers) {
                w.join(30_000);
            }
            assertTrue(mon.flush(Duration.ofSeconds(20)));
            List<Map<String, Object>> got = server.messages(threads * calls);
            Map<String, Integer> next = new HashMap<>();
            for (Map<String, Object> m : got) {
                Map<?, ?> data = (Map<?, ?>) m.get("data");
                String thread;
                int seq;
                if ("event".equals(m.get("type"))) {
                    String[] words = ((String) data.get("message")).split(" ");
                    thread = words[0];
                    seq = Integer.parseInt(words[1]);
                    assertEquals(thread + " " + seq + " \"quoted\"\n", data.get("message"));
                    assertEquals(Map.of("thread", thread), m.get("context"));
                } else {
                    thread = (String) data.get("name");
                    seq = ((Long) data.get("value")).intValue();
                    assertEquals(Map.of("seq", Integer.toString(seq)), data.get("tags"));
                }
                assertEquals(next.getOrDefault(thread, 0), seq, "order of " + thread);
                next.put(thread, seq + 1);
            }
            assertEquals(threads, next.size());
            assertEquals(new MonitoringClient.Statistics(0, threads * calls, 0, 0, 0), mon.statistics());
        }
    }

    @Test
    void sidecarThatNeverReadsCannotStallCallersOrClose() throws Exception {
        try (CaptureServer server = CaptureServer.notReading()) {
            MonitoringClient mon = builder(server.port()).maxMessages(1000).build();
            String big = "z".repeat(10_000);
            long begin = System.nanoTime();
            for (int i = 0; i < 3000; i++) { // 30 MB: far more than the socket buffers hold
                mon.logEvent("info", big);
            }
            assertTrue(System.nanoTime() - begin < Duration.ofSeconds(10).toNanos());
            assertTrue(mon.statistics().dropped() > 0);
            long t0 = System.nanoTime();
            assertFalse(mon.close(Duration.ofMillis(300)));
            assertTrue(System.nanoTime() - t0 < Duration.ofSeconds(3).toNanos(),
                    "close took " + (System.nanoTime() - t0) / 1_000_000 + " ms");
            assertEquals(0, mon.statistics().queued());
        }
    }

    @Test
    void closeFlushesWhatIsQueued() throws Exception {
        try (CaptureServer server = CaptureServer.start()) {
            MonitoringClient mon = builder(server.port()).build();
            for (int i = 0; i < 500; i++) {
                mon.logMetric("seq", i);
            }
            assertTrue(mon.close(Duration.ofSeconds(10)));
            assertTrue(mon.close(Duration.ofSeconds(1))); // idempotent
            assertEquals(range(0, 500), sequence(server.messages(500)));
        }
    }
}
