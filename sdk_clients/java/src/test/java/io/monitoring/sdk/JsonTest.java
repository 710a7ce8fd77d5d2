package io.monitoring.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

class JsonTest {
    @Test
    void encodesEveryKindOfValue() {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("s", "a\"b\\c\n\u0001");
        m.put("i", 3);
        m.put("l", 10_000_000_000L);
        m.put("d", 1.5);
        m.put("whole", 2.0);
        m.put("nan", Double.NaN);
        m.put("b", true);
        m.put("n", null);
        m.put("list", List.of(1, "x"));
        m.put("array", new int[] {1, 2});
        m.put("other", new StringBuilder("sb"));
        assertEquals("{\"s\":\"a\\\"b\\\\c\\n\\u0001\",\"i\":3,\"l\":10000000000,\"d\":1.5,\"whole\":2.0,"
                + "\"nan\":null,\"b\":true,\"n\":null,\"list\":[1,\"x\"],\"array\":[1,2],\"other\":\"sb\"}", Json.encode(m));
    }

    @Test
    void replacesLoneSurrogatesAndKeepsPairs() {
        assertEquals("\"\uD83D\uDE00 \uFFFD \uFFFD \uFFFD\"", Json.encode("\uD83D\uDE00 \uD83D \uDE00 \uDBFF"));
    }

    @Test
    void escapesEveryControlCharacter() {
        for (char c = 0; c < 0x20; c++) {
            String out = Json.encode(String.valueOf(c));
            assertEquals(String.valueOf(c), Json.parse(out));
            assertEquals(-1, out.chars().filter(x -> x < 0x20).findAny().orElse(-1));
        }
    }

    @Test
    void parsesWhatItEncodes() {
        Object v = Json.parse(" {\"a\": [1, -2.5e3, true, false, null, \"\\u00e9\\/\\t\"], \"b\": {}, \"c\": 99999999999999999999} ");
        Map<String, Object> expected = new LinkedHashMap<>();
        expected.put("a", Arrays.asList(1L, -2500.0, true, false, null, "é/\t"));
        expected.put("b", Map.of());
        expected.put("c", 1.0E20);
        assertEquals(expected, v);
    }

    @Test
    void rejectsInvalidJson() {
        for (String bad : new String[] {"", "{", "{\"a\"}", "[1,]", "01x", "\"\\x\"", "tru", "{} x", "\"a\nb\"", "-"}) {
            assertThrows(IllegalArgumentException.class, () -> Json.parse(bad), bad);
        }
    }
}
