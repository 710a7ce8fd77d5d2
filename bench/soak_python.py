"""One client of bench/soak.py: the Python SDK sending a numbered sequence at a steady rate.

Message seq N carries N in context.seq (events) or tags.seq (metrics), so the soak can find each
one in every backend. At the end: flush, then one JSON line of counts on stdout.

    python bench/soak_python.py SOURCE HOST PORT PER_SECOND SECONDS
"""

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk_clients" / "python" / "src"))

from monitoring_sdk import MonitoringClient  # noqa: E402


def send_one(mon: MonitoringClient, source: str, seq: int) -> None:
    """The same mix in every client: mostly info, some warnings, a metric in five, a rare error."""
    if seq % 5 == 4:
        mon.log_metric("soak.seq", seq, "count", {"seq": seq})
    else:
        level = "error" if seq % 997 == 0 else "warning" if seq % 3 == 0 else "info"
        mon.log_event(level, f"soak {source} #{seq}", {"seq": seq})


def main() -> int:
    source, host, port, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    logging.getLogger("monitoring_sdk").setLevel(logging.ERROR)  # a restarting sidecar is expected
    mon = MonitoringClient(source, host=host, port=port)
    started = time.monotonic()
    called = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) + 1
        while called < due:
            send_one(mon, source, called)
            called += 1
        time.sleep(0.005)
    flushed = mon.flush(timeout=30)
    stats = mon.statistics()
    print(json.dumps({"called": called, **stats, "flushed": flushed}), flush=True)
    mon.close(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
