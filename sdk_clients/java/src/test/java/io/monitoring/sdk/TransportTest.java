package io.monitoring.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** A Unix socket in place of host and port, and the ingest token sent first on every connection. */
class TransportTest {

    /** A stand-in sidecar on a Unix socket: the lines of each connection, in accept order. */
    static final class UnixCaptureServer implements AutoCloseable {
        private final Path path;
        private final ServerSocketChannel server;
        private final List<List<String>> connections = new CopyOnWriteArrayList<>();
        private final List<SocketChannel> channels = new CopyOnWriteArrayList<>();

        UnixCaptureServer(Path path) throws IOException {
            this.path = path;
            Files.deleteIfExists(path);
            server = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
            server.bind(UnixDomainSocketAddress.of(path));
            Thread acceptor = new Thread(this::acceptLoop, "unix-capture-accept");
            acceptor.setDaemon(true);
            acceptor.start();
        }

        private void acceptLoop() {
            while (server.isOpen()) {
                SocketChannel ch;
                try {
                    ch = server.accept();
                } catch (IOException e) {
                    return;
                }
                List<String> lines = new CopyOnWriteArrayList<>();
                connections.add(lines);
                channels.add(ch);
                Thread reader = new Thread(() -> readLoop(ch, lines), "unix-capture-read");
                reader.setDaemon(true);
                reader.start();
            }
        }

        private static void readLoop(SocketChannel ch, List<String> lines) {
            ByteArrayOutputStream line = new ByteArrayOutputStream();
            ByteBuffer buf = ByteBuffer.allocate(65536);
            try (ch) {
                while (ch.read(buf) > 0) {
                    buf.flip();
                    while (buf.hasRemaining()) {
                        byte b = buf.get();
                        if (b == '\n') {
                            lines.add(CaptureServer.strictUtf8(line.toByteArray()));
                            line.reset();
                        } else {
                            line.write(b);
                        }
                    }
                    buf.clear();
                }
            } catch (IOException e) {
                // closed by the test or the client
            }
        }

        /** Waits until {@code n} lines arrived over all connections (or 15 s); the lines of each connection. */
        List<List<String>> lines(int n) throws InterruptedException {
            long deadline = System.nanoTime() + Duration.ofSeconds(15).toNanos();
            while (connections.stream().mapToInt(List::size).sum() < n && System.nanoTime() < deadline) {
                Thread.sleep(5);
            }
            List<List<String>> out = new ArrayList<>();
            connections.forEach(c -> out.add(List.copyOf(c)));
            return out;
        }

        @Override
        public void close() throws IOException {
            server.close();
            for (SocketChannel ch : channels) {
                ch.close();
            }
            Files.deleteIfExists(path);
        }
    }

    private static String message(String line) {
        return (String) ((Map<?, ?>) ((Map<?, ?>) Json.parse(line)).get("data")).get("message");
    }

    @Test
    void aUnixSocketFromTheBuilderOrFromMonitoringSidecar(@TempDir Path dir) throws Exception {
        Path socket = dir.resolve("sidecar.sock");
        try (UnixCaptureServer server = new UnixCaptureServer(socket)) {
            try (MonitoringClient mon = MonitoringClient.builder("unix").host("10.255.255.1").port(1)
                    .unixSocket(socket).environment(Map.of()).build()) {
                mon.logEvent("info", "by the builder");
                assertTrue(mon.flush(Duration.ofSeconds(5)));
            }
            Map<String, String> env = Map.of("MONITORING_SIDECAR", "unix:" + socket);
            try (MonitoringClient mon = new MonitoringClient("unix", "10.255.255.1", 1, env)) {
                assertEquals(socket, mon.unixSocket());
                mon.logEvent("info", "by MONITORING_SIDECAR");
                assertTrue(mon.flush(Duration.ofSeconds(5)));
            }
            List<List<String>> got = server.lines(2);
            assertEquals(2, got.size());
            assertEquals(List.of("by the builder"), got.get(0).stream().map(TransportTest::message).toList());
            assertEquals(List.of("by MONITORING_SIDECAR"), got.get(1).stream().map(TransportTest::message).toList());
        }
    }

    @Test
    void noSocketYetCallsReturnAtOnceThenEverythingArrivesInOrder(@TempDir Path dir) throws Exception {
        Path socket = dir.resolve("later.sock");
        List<Throwable> errors = new CopyOnWriteArrayList<>();
        try (MonitoringClient mon = MonitoringClient.builder("later").unixSocket(socket).environment(Map.of())
                .onError(errors::add).build()) {
            long worst = 0;
            for (int i = 0; i < 500; i++) {
                long t0 = System.nanoTime();
                mon.logEvent("info", "m" + i);
                worst = Math.max(worst, System.nanoTime() - t0);
            }
            assertTrue(worst < Duration.ofMillis(500).toNanos(), "slowest call " + worst / 1_000_000 + " ms");
            assertFalse(mon.flush(Duration.ofMillis(200)));
            assertFalse(errors.isEmpty());
            assertInstanceOf(IOException.class, errors.get(0));
            try (UnixCaptureServer server = new UnixCaptureServer(socket)) {
                assertTrue(mon.flush(Duration.ofSeconds(10)));
                List<String> got = server.lines(500).stream().flatMap(List::stream).map(TransportTest::message).toList();
                List<String> want = new ArrayList<>();
                for (int i = 0; i < 500; i++) {
                    want.add("m" + i);
                }
                assertEquals(want, got);
            }
        }
    }

    @Test
    void theTokenGoesFirstOnEveryConnectionAndTheVariableWins(@TempDir Path dir) throws Exception {
        Path socket = dir.resolve("token.sock");
        Map<String, String> env = Map.of("MONITORING_SIDECAR_TOKEN", "from \"the\" environment");
        try (MonitoringClient mon = MonitoringClient.builder("token").unixSocket(socket).token("from the builder")
                .environment(env).onError(e -> { }).build()) {
            try (UnixCaptureServer server = new UnixCaptureServer(socket)) {
                mon.logEvent("info", "one");
                assertTrue(mon.flush(Duration.ofSeconds(5)));
                assertEquals(2, server.lines(2).get(0).size());
            } // the sidecar restarts: the next connection authenticates again
            try (UnixCaptureServer server = new UnixCaptureServer(socket)) {
                long deadline = System.nanoTime() + Duration.ofSeconds(10).toNanos();
                mon.logEvent("info", "two");
                while (!mon.flush(Duration.ofMillis(200)) && System.nanoTime() < deadline) {
                    Thread.sleep(10); // the sender noticed the old connection closed, and backs off
                }
                List<List<String>> got = server.lines(2);
                assertEquals(1, got.size());
                assertEquals(Map.of("auth", "from \"the\" environment"), Json.parse(got.get(0).get(0)));
                assertEquals(List.of("two"), got.get(0).subList(1, got.get(0).size()).stream().map(TransportTest::message).toList());
            }
        }
        try (CaptureServer server = CaptureServer.start();
             MonitoringClient mon = MonitoringClient.builder("token").host("127.0.0.1").port(server.port())
                     .token("tcp too").environment(Map.of()).build()) {
            mon.logEvent("info", "three");
            assertTrue(mon.flush(Duration.ofSeconds(5)));
            List<Map<String, Object>> got = server.messages(2);
            assertEquals(Map.of("auth", "tcp too"), got.get(0));
            assertEquals("three", ((Map<?, ?>) got.get(1).get("data")).get("message"));
        }
    }
}
