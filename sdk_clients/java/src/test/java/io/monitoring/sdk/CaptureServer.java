package io.monitoring.sdk;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * A stand-in sidecar on 127.0.0.1 for the tests: it records every line it receives (the bytes,
 * undecoded) or, with {@code reading=false}, accepts connections and never reads from them.
 */
final class CaptureServer implements AutoCloseable {
    private final ServerSocket server;
    private final boolean reading;
    private final List<Socket> connections = new ArrayList<>();
    private final List<byte[]> lines = new ArrayList<>();
    private volatile boolean closed;

    private CaptureServer(int port, boolean reading) throws IOException {
        this.reading = reading;
        server = new ServerSocket();
        server.setReuseAddress(true);
        server.bind(new InetSocketAddress(InetAddress.getLoopbackAddress(), port));
        Thread acceptor = new Thread(this::acceptLoop, "capture-accept");
        acceptor.setDaemon(true);
        acceptor.start();
    }

    static CaptureServer start() throws IOException {
        return new CaptureServer(0, true);
    }

    static CaptureServer start(int port) throws IOException {
        return new CaptureServer(port, true);
    }

    static CaptureServer notReading() throws IOException {
        return new CaptureServer(0, false);
    }

    /** A port nothing listens on (bound, then released). */
    static int freePort() throws IOException {
        try (ServerSocket s = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
            return s.getLocalPort();
        }
    }

    int port() {
        return server.getLocalPort();
    }

    synchronized int connectionCount() {
        return connections.size();
    }

    private void acceptLoop() {
        while (!closed) {
            Socket s;
            try {
                s = server.accept();
            } catch (IOException e) {
                return;
            }
            synchronized (this) {
                connections.add(s);
            }
            if (reading) {
                Thread t = new Thread(() -> readLoop(s), "capture-read");
                t.setDaemon(true);
                t.start();
            }
        }
    }

    private void readLoop(Socket s) {
        ByteArrayOutputStream line = new ByteArrayOutputStream();
        byte[] buf = new byte[65536];
        try (InputStream in = s.getInputStream()) {
            int n;
            while ((n = in.read(buf)) > 0) {
                for (int i = 0; i < n; i++) {
                    if (buf[i] == '\n') {
                        add(line.toByteArray());
                        line.reset();
                    } else {
                        line.write(buf[i]);
                    }
                }
            }
        } catch (IOException e) {
            // closed by the test or the client
        }
        if (line.size() > 0) { // like the sidecar: an unterminated last line at EOF counts
            add(line.toByteArray());
        }
    }

    private synchronized void add(byte[] line) {
        lines.add(line);
        notifyAll();
    }

    /** Waits until at least {@code n} lines arrived (or the deadline passed) and returns all of them. */
    synchronized List<String> lines(int n, Duration timeout) throws InterruptedException {
        long deadline = System.nanoTime() + timeout.toNanos();
        while (lines.size() < n) {
            long left = deadline - System.nanoTime();
            if (left <= 0) {
                break;
            }
            wait(Math.max(1, left / 1_000_000));
        }
        List<String> out = new ArrayList<>();
        for (byte[] line : lines) {
            out.add(strictUtf8(line));
        }
        return out;
    }

    /** Exactly {@code n} lines, parsed; fails if fewer arrive in time or more arrive within a short grace. */
    List<Map<String, Object>> messages(int n) throws InterruptedException {
        List<String> got = lines(n, Duration.ofSeconds(15));
        if (got.size() == n) {
            Thread.sleep(50); // anything extra (a duplicate) arrives right behind
            got = lines(n, Duration.ZERO);
        }
        if (got.size() != n) {
            String shown = String.valueOf(got.size() > 3 ? got.subList(0, 3) : got);
            throw new AssertionError("expected " + n + " messages, got " + got.size() + ": "
                    + (shown.length() > 600 ? shown.substring(0, 600) + "..." : shown));
        }
        return parseAll(got);
    }

    @SuppressWarnings("unchecked")
    static List<Map<String, Object>> parseAll(List<String> lines) {
        List<Map<String, Object>> out = new ArrayList<>();
        for (String line : lines) {
            out.add((Map<String, Object>) Json.parse(line));
        }
        return out;
    }

    static String strictUtf8(byte[] bytes) {
        try {
            return StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT).decode(ByteBuffer.wrap(bytes)).toString();
        } catch (CharacterCodingException e) {
            throw new AssertionError("not valid UTF-8: " + new String(bytes, StandardCharsets.ISO_8859_1), e);
        }
    }

    /** Stops listening and closes every connection (the client sees EOF), like a sidecar that exits. */
    @Override
    public void close() {
        closed = true;
        try {
            server.close();
        } catch (IOException ignored) {
            // already closed
        }
        synchronized (this) {
            for (Socket s : connections) {
                try {
                    s.close();
                } catch (IOException ignored) {
                    // already closed
                }
            }
        }
    }
}
