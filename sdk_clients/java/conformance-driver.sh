#!/bin/sh
# Conformance driver of the Java SDK (see ../conformance/DRIVERS.md): replays SCENARIO.json with
# the public API. Compiles the SDK and the driver first when they are missing or out of date;
# the lock keeps drivers started in parallel from compiling over each other.
set -e
here=$(cd "$(dirname "$0")" && pwd)
class="$here/target/test-classes/io/monitoring/sdk/ConformanceDriver.class"
mkdir -p "$here/target"
(
    flock 9 2>/dev/null || true
    if [ ! -f "$class" ] || [ -n "$(find "$here/src" "$here/pom.xml" -newer "$class" -print -quit)" ]; then
        mvn -q -B -Dstyle.color=never -f "$here/pom.xml" test-compile >&2
    fi
) 9>"$here/target/.build.lock"
exec java -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -cp "$here/target/classes:$here/target/test-classes" io.monitoring.sdk.ConformanceDriver "$@"
