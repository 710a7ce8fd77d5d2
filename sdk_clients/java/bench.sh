#!/bin/sh
# Per-call latency of the Java SDK (logEvent, logMetric; sidecar up and down): ./bench.sh [CALLS [ROUNDS]]
set -e
here=$(cd "$(dirname "$0")" && pwd)
mvn -q -B -Dstyle.color=never -f "$here/pom.xml" test-compile >&2
exec java -cp "$here/target/classes:$here/target/test-classes" io.monitoring.sdk.JavaSdkBench "$@"
