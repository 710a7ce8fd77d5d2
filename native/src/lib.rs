//! The sidecar's per-message hot path in one native call per chunk: parse, validate, enrich and
//! encode the JSON lines a connection sent, with no Python object per message but its line.
//!
//! It takes the messages the Python path (`sidecar.protocol` and `sidecar.message`) would
//! accept *unchanged* (canonical ids, no null optional keys, no duplicate keys where the protocol
//! looks), plus the normalisations most clients need: RFC 3339 timestamps with an offset or
//! another fraction, epoch seconds or milliseconds, and level aliases (`WARN`, `Error`),
//! rewritten in place as Python would.
//! For any other line `decode` names it instead, and the Python path, which stays the reference,
//! explains its error or normalises it and hands the chunk back. So this code decides only
//! "valid, maybe after those rewrites" or "not for me", and never has to agree with the
//! Python code on an error message. Hypothesis tests check both paths give the same lines.
//!
//! By subject: `json` scans JSON, `time` reads and writes timestamps, `validate` accepts or
//! declines a line, `enrich` writes the enriched lines and the live index's cells, `constants`
//! holds the copies of `sidecar/constants.py`, and `python` is the glue to Python.

use pyo3::prelude::*;

mod aggregate;
mod constants;
mod enrich;
mod json;
mod python;
mod time;
mod validate;

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(module)
}
