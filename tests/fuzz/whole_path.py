"""A coverage-guided fuzzer (atheris, libFuzzer) over the sidecar's whole path and its config
loader: `make fuzz` (`FUZZ_SECONDS`, default 300). Each input is split by its first bytes into a
mode, chunk cuts and a payload:

- `json`: the payload as JSON lines, run on both decode paths, which must route the same lines
  and report the same reasons;
- `msgpack`: the payload after a MessagePack map header;
- `config`: the payload as a routes.d drop-in, which must load or raise ConfigError naming it.

Every run must hold `tests.whole_path.check_outcome`: nothing raises, no `internal_error`, every
routed line is JSON within the nesting limit, every view renders. A failure is written by
libFuzzer as `crash-*` in the working directory, with the input that found it.
"""

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["sidecar"]):
    import orjson

    from sidecar.config import ConfigError, load_config
    from sidecar.protocol import NATIVE_AVAILABLE

    from tests.whole_path import WholePath, check_outcome

WORKDIR = Path(tempfile.mkdtemp(prefix="sidecar-fuzz-"))
PYTHON = WholePath(WORKDIR, native=False)
NATIVE = WholePath(WORKDIR, native=NATIVE_AVAILABLE)
ROUTES = WORKDIR / "routes.d"
ROUTES.mkdir()
MAIN = WORKDIR / "sidecar.yaml"
MAIN.write_text("backends:\n  files: {type: filesystem, base_path: /tmp}\n")

SEEDS = [
    b"j" + b'{"source":"a","type":"span","timestamp":"0001-01-01T00:00:00.000Z","trace_id":"0123456789abcdef0123456789abcdef","span_id":"0123456789abcdef","data":{"name":"x","phase":"end","status":"ok","duration_ms":1e20}}\n',
    b"j" + b'{"source":"b","type":"metric","timestamp":1764658800123,"data":{"name":"rows","value":99999999999999999999,"tags":{"k":"v"}},"context":{"job_id":"j"}}\n',
    b"j" + b'{"source":"c","type":"event","data":{"level":"WARN","message":"\\u00e9"},"x":[[[[[[1]]]]]]}\n{"source":"c","type":"progress","data":{"job_id":7,"percent":50,"status":"s"}}\n',
    b"m" + b"\xa6source\xa1a\xa4type\xa6metric\xa4data\x82\xa4name\xa1n\xa5value\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"c" + b"svc:\n  - backend: files\n    filter: {types: [event], names: ['rows*']}\n    config: {path: '{source}/x.jsonl'}\n",
]


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, cuts, payload = data[0], data[1], data[2:]
    chunks = [payload[i : i + 1 + cuts] for i in range(0, len(payload), 1 + cuts)] if cuts < 128 else [payload]
    if mode % 3 == 0:
        if not payload.startswith(b"{"):
            chunks = [b"{", *chunks]
        by_python = PYTHON.run(chunks)
        check_outcome(by_python)
        by_native = NATIVE.run(chunks)
        check_outcome(by_native)
        assert {k: list(map(orjson.loads, v)) for k, v in by_native.lines.items()} == {k: list(map(orjson.loads, v)) for k, v in by_python.lines.items()}
        assert [r for r, _ in by_native.errors] == [r for r, _ in by_python.errors]
    elif mode % 3 == 1:
        check_outcome(PYTHON.run([bytes([0x80 | (cuts & 0x0F)]), *chunks]))
    else:
        drop_in = ROUTES / "50-fuzz.yaml"
        drop_in.write_bytes(payload)
        try:
            load_config(MAIN, ROUTES, {})
        except ConfigError as exc:
            assert all(str(p).startswith(str(drop_in) + ":") for p in exc.problems), exc.problems


def main() -> None:
    corpus = Path(sys.argv[-1]) if len(sys.argv) > 1 and not sys.argv[-1].startswith("-") else None
    if corpus is not None and corpus.is_dir() and not any(corpus.iterdir()):
        for number, seed in enumerate(SEEDS):
            mode = {ord("j"): 0, ord("m"): 1, ord("c"): 2}[seed[0]]
            (corpus / f"seed-{number}").write_bytes(bytes([mode, 200]) + seed[1:])
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
