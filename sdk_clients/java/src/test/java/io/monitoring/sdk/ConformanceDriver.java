package io.monitoring.sdk;

import java.io.IOException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Replays a conformance scenario with the public API (sdk_clients/conformance/DRIVERS.md):
 * {@code conformance-driver.sh SCENARIO.json}. The client reads MONITORING_SIDECAR and the other
 * variables from the real environment, as a user's program would.
 */
public final class ConformanceDriver {
    private ConformanceDriver() {
    }

    public static void main(String[] args) {
        if (args.length != 1) {
            System.err.println("usage: conformance-driver.sh SCENARIO.json");
            System.exit(2);
        }
        try {
            run(Path.of(args[0]));
        } catch (Exception e) {
            System.err.println("conformance driver: " + e);
            System.exit(1);
        }
        System.exit(0);
    }

    @SuppressWarnings("unchecked")
    static void run(Path scenarioFile) throws IOException {
        Map<String, Object> scenario = (Map<String, Object>) Json.parse(Files.readString(scenarioFile, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        Object source = scenario.get("source");
        MonitoringClient mon = new MonitoringClient(source == null ? null : source.toString(), "localhost", 17000);
        Map<String, Object> saved = new HashMap<>();
        List<Object> calls = (List<Object>) scenario.getOrDefault("calls", List.of());
        for (Object c : calls) {
            Map<String, Object> call = (Map<String, Object>) c;
            List<Object> args = (List<Object>) call.getOrDefault("args", List.of());
            Object[] a = new Object[8];
            for (int i = 0; i < args.size() && i < a.length; i++) {
                a[i] = resolve(args.get(i), saved);
            }
            if ("print_env".equals(call.get("call"))) {
                // What a child started now would see: the SDK's documented way of starting one.
                String value = mon.applyTo(new ProcessBuilder()).environment().get(str(a[0]));
                out.println(value == null ? "" : value);
                continue;
            }
            Object result = perform(mon, (String) call.get("call"), a);
            if (call.get("save") != null) {
                saved.put(call.get("save").toString(), result);
            }
            if (Boolean.TRUE.equals(call.get("print"))) {
                out.println(result == null ? "" : result);
            }
        }
        if (!mon.close(Duration.ofSeconds(10))) { // generous: returns as soon as everything is written
            System.err.println("conformance driver: close() could not write out every message");
        }
    }

    private static Object resolve(Object arg, Map<String, Object> saved) {
        if (arg instanceof Map<?, ?> m && m.size() == 1 && m.containsKey("ref")) {
            String name = String.valueOf(m.get("ref"));
            if (!saved.containsKey(name)) {
                throw new IllegalArgumentException("no saved value named " + name);
            }
            return saved.get(name);
        }
        return arg;
    }

    @SuppressWarnings("unchecked")
    private static Object perform(MonitoringClient mon, String name, Object[] a) {
        switch (String.valueOf(name)) {
            case "set_context" -> mon.setContext(str(a[0]), a[1]);
            case "log_event" -> mon.logEvent(str(a[0]), str(a[1]), (Map<String, ?>) a[2]);
            case "log_metric" -> {
                if (a[1] instanceof Long v) {
                    mon.logMetric(str(a[0]), (long) v, str(a[2]), (Map<String, ?>) a[3]);
                } else {
                    mon.logMetric(str(a[0]), number(a[1]).doubleValue(), str(a[2]), (Map<String, ?>) a[3]);
                }
            }
            case "log_progress" -> {
                if (a[1] instanceof Long v) {
                    mon.logProgress(str(a[0]), (long) v, str(a[2]));
                } else {
                    mon.logProgress(str(a[0]), number(a[1]).doubleValue(), str(a[2]));
                }
            }
            case "log_resource" -> mon.logResource(number(a[0]), number(a[1]), number(a[2]), number(a[3]));
            case "start_span" -> {
                return mon.startSpan(str(a[0]));
            }
            case "end_span" -> mon.endSpan(str(a[0]), str(a[1]));
            default -> throw new IllegalArgumentException("unknown call " + name);
        }
        return null;
    }

    private static String str(Object v) {
        return v == null ? null : v.toString();
    }

    private static Number number(Object v) {
        if (v == null || v instanceof Number) {
            return (Number) v;
        }
        throw new IllegalArgumentException("not a number: " + v);
    }
}
