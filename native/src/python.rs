//! The Python glue: the classes and functions `sidecar._native` exports, and the conversion of
//! what the other modules find into Python objects, with named fields. `sidecar/ingest.py` is
//! their one user (through `sidecar/native.py`).

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFrozenSet, PyList, PyString, PyTuple};

use crate::aggregate::{self, By, Closed, Taken, Windows};
use crate::constants::{
    EPOCH_MS_THRESHOLD, ERROR_LEVELS, KEY_EVENTS_PER_SOURCE, LEVELS, LEVEL_ALIASES,
    MAX_SOURCE_LENGTH, MESSAGE_TYPES, SPAN_ID_LENGTH, TRACE_ID_LENGTH, URGENT_LEVELS,
};
use crate::enrich::{enrich, timestamp_of, Host};
use crate::json::{text_string, Members, Range};
use crate::time::Timestamp;
use crate::validate::{accept, accept_all, Declined, Message};

/// A number as orjson reads it: an integer that fits 64 bits stays one, anything else is a float.
fn number_object(py: Python<'_>, bytes: &[u8], span: Range) -> PyResult<Py<PyAny>> {
    let text = std::str::from_utf8(&bytes[span.start..span.end]).unwrap_or("0");
    if !text.contains(['.', 'e', 'E']) {
        if let Ok(value) = text.parse::<i64>() {
            return Ok(value.into_pyobject(py)?.into_any().unbind());
        }
        if let Ok(value) = text.parse::<u64>() {
            return Ok(value.into_pyobject(py)?.into_any().unbind());
        }
    }
    let value: f64 = text.parse().unwrap_or(f64::NAN);
    Ok(value.into_pyobject(py)?.into_any().unbind())
}

fn timestamp_str(timestamp: &Timestamp) -> &str {
    std::str::from_utf8(timestamp).unwrap_or("")
}

/// The bytes a chunk's messages point into: the received bytes themselves, or, for a chunk
/// mended with normalised lines, a copy of them with those lines after them.
enum Buffer {
    Received(Py<PyBytes>),
    Mended(Vec<u8>),
}

/// The complete lines of one connection's chunk, parsed and validated.
#[pyclass(frozen, module = "sidecar._native")]
struct Chunk {
    data: Buffer,
    messages: Vec<Message>,
}

/// What `decode` made of a chunk's lines: the accepted messages, and where the declined lines
/// are, for the Python decoder to decode them before `mend` makes the Chunk (once: it takes the
/// accepted messages).
#[pyclass(module = "sidecar._native")]
struct Decoded {
    data: Py<PyBytes>,
    accepted: Vec<(usize, Message)>, // (line number, message)
    /// `(line number, start, end)` of each declined line, in order.
    #[pyo3(get)]
    declined: Declined,
    /// How many lines the chunk had.
    #[pyo3(get)]
    lines: usize,
    max_depth: u32,
}

#[pymethods]
impl Decoded {
    /// The chunk with each declined line replaced: `replacements` are `(line number, line)` in
    /// line order, a line Python normalised; a declined line without one (an invalid or blank
    /// line) is left out. None if a replacement is itself declined.
    fn mend(&mut self, py: Python<'_>, replacements: Vec<(usize, Vec<u8>)>) -> Option<Chunk> {
        let accepted = std::mem::take(&mut self.accepted);
        if replacements.is_empty() {
            return Some(Chunk {
                data: Buffer::Received(self.data.clone_ref(py)),
                messages: accepted.into_iter().map(|(_, message)| message).collect(),
            });
        }
        let received = self.data.bind(py).as_bytes();
        let mut buffer = Vec::with_capacity(
            received.len() + replacements.iter().map(|(_, l)| l.len() + 1).sum::<usize>(),
        );
        buffer.extend_from_slice(received);
        let mut members = Members::new();
        let mut mended = Vec::with_capacity(replacements.len());
        for (number, line) in &replacements {
            buffer.push(b'\n');
            let start = buffer.len();
            buffer.extend_from_slice(line);
            if line.contains(&b'\n') || std::str::from_utf8(line).is_err() {
                return None;
            }
            mended.push((
                *number,
                accept(&buffer, start, &mut members, self.max_depth).ok()?,
            ));
        }
        // Both lists are in line order: merge them.
        let mut messages = Vec::with_capacity(accepted.len() + mended.len());
        let mut mended = mended.into_iter().peekable();
        for (number, message) in accepted {
            while let Some((_, replacement)) = mended.next_if(|(n, _)| *n < number) {
                messages.push(replacement);
            }
            messages.push(message);
        }
        messages.extend(mended.map(|(_, replacement)| replacement));
        Some(Chunk {
            data: Buffer::Mended(buffer),
            messages,
        })
    }
}

/// One source's messages of an enriched chunk, as `sidecar.batch.Batch` takes them.
#[pyclass(frozen, get_all, module = "sidecar._native")]
struct Group {
    source: Py<PyString>,
    lines: Py<PyList>,      // bytes, one JSON line per message
    timestamps: Py<PyList>, // str, each message's canonical timestamp
    urgent: bool,
    aggregates: bool,           // a metric with `data.aggregation` among them
    points: Option<Py<Points>>, // when asked for: what the aggregate steps read instead of lines
}

/// The decoder's record of a group's messages, line for line (`AggregateWindows.take` reads
/// the points from it instead of parsing each line again). It holds the chunk: let it go once
/// the aggregate steps have read it.
#[pyclass(frozen, module = "sidecar._native")]
struct Points {
    chunk: Py<Chunk>,
    numbers: Vec<u32>, // line i is the chunk's message numbers[i]
    received: Timestamp,
}

#[pymethods]
impl Points {
    fn __len__(&self) -> usize {
        self.numbers.len()
    }
}

impl Chunk {
    fn bytes<'a>(&'a self, py: Python<'a>) -> &'a [u8] {
        match &self.data {
            Buffer::Received(data) => data.bind(py).as_bytes(),
            Buffer::Mended(buffer) => buffer,
        }
    }
}

/// What one (job, trace, source) cell of an enriched chunk did, as
/// `sidecar.jobs.SourceActivity.of_cell` would summarise its messages.
#[pyclass(frozen, get_all, module = "sidecar._native")]
struct Cell {
    job_id: Option<String>,
    trace_id: Option<String>,
    source: String,
    count: usize,
    first: String,
    last: String,
    errors: usize,
    events: Py<PyList>,           // (timestamp, level, message), the latest few
    metrics: Py<PyDict>,          // name -> (value, unit), the latest
    progress: Option<Py<PyDict>>, // {"percent", "status", "at"}, the latest by time
    spans: Py<PyList>,            // the span messages' lines
}

/// What `Chunk.enrich` returns.
#[pyclass(frozen, get_all, module = "sidecar._native")]
struct Enrichment {
    groups: Py<PyList>, // of Group, in order of first appearance
    cells: Py<PyList>,  // of Cell
}

/// The enrichment's host: the Python `TraceJobs` (read through its `jobs` dict, written through
/// its `link`) and the lists each group's lines and timestamps go to.
struct PyHost<'py> {
    py: Python<'py>,
    jobs: Bound<'py, PyDict>,
    link: Bound<'py, PyAny>,
    // The last trace id and its str: a chunk's messages of one trace come together.
    last_trace: Option<(Vec<u8>, Bound<'py, PyString>)>,
    last_timestamp: Option<(Timestamp, Bound<'py, PyString>)>,
    groups: Vec<(Bound<'py, PyList>, Bound<'py, PyList>)>,
}

impl<'py> PyHost<'py> {
    fn trace_key(&mut self, trace: &[u8]) -> Bound<'py, PyString> {
        match &self.last_trace {
            Some((text, object)) if text == trace => object.clone(),
            _ => {
                let object = PyString::new(self.py, std::str::from_utf8(trace).unwrap_or(""));
                self.last_trace = Some((trace.to_vec(), object.clone()));
                object
            }
        }
    }
}

impl<'py> Host for PyHost<'py> {
    type Line = Bound<'py, PyBytes>;
    type Error = PyErr;

    fn known_job(&mut self, trace: &[u8]) -> PyResult<Option<String>> {
        let key = self.trace_key(trace);
        match self.jobs.get_item(&key)? {
            Some(known) => Ok(Some(known.extract::<String>()?)),
            None => Ok(None),
        }
    }

    fn link(&mut self, trace: &[u8], job: &str) -> PyResult<()> {
        let key = self.trace_key(trace);
        // A known trace keeps its job (TraceJobs.link would change nothing): no call then.
        if !self.jobs.contains(&key)? {
            self.link.call1((key, job))?;
        }
        Ok(())
    }

    fn line(&mut self, group: usize, line: &[u8], timestamp: &Timestamp) -> PyResult<Self::Line> {
        let py = self.py;
        if group == self.groups.len() {
            self.groups.push((PyList::empty(py), PyList::empty(py)));
        }
        let line = PyBytes::new(py, line);
        let timestamp = match &self.last_timestamp {
            Some((text, object)) if text == timestamp => object.clone(),
            _ => {
                let object = PyString::new(py, timestamp_str(timestamp));
                self.last_timestamp = Some((*timestamp, object.clone()));
                object
            }
        };
        let (lines, timestamps) = &self.groups[group];
        lines.append(&line)?;
        timestamps.append(timestamp)?;
        Ok(line)
    }
}

#[pymethods]
impl Chunk {
    fn __len__(&self) -> usize {
        self.messages.len()
    }

    /// Enrich every message as `sidecar.ingest.PythonChunk.enrich` does and encode its line;
    /// `trace_jobs` is the correlator's `sidecar.ingest.TraceJobs`. `points`: give each group
    /// its `Points` (for aggregate steps).
    #[pyo3(signature = (received_at, host, trace_jobs, points = false))]
    fn enrich<'py>(
        slf: &Bound<'py, Self>,
        received_at: &str,
        host: &str,
        trace_jobs: &Bound<'py, PyAny>,
        points: bool,
    ) -> PyResult<Enrichment> {
        let py = slf.py();
        let this = slf.get();
        let bytes = this.bytes(py);
        let received: Timestamp = received_at
            .as_bytes()
            .try_into()
            .map_err(|_| PyValueError::new_err("received_at must be YYYY-MM-DDTHH:MM:SS.mmmZ"))?;
        let mut python = PyHost {
            py,
            jobs: trace_jobs
                .getattr(intern!(py, "jobs"))?
                .cast_into::<PyDict>()?,
            link: trace_jobs.getattr(intern!(py, "link"))?,
            last_trace: None,
            last_timestamp: None,
            groups: Vec::new(),
        };
        let enriched = enrich(bytes, &this.messages, &received, host, &mut python)?;

        let slice = |range: Range| -> &str {
            std::str::from_utf8(&bytes[range.start..range.end]).unwrap_or("")
        };
        let groups = PyList::empty(py);
        for (group, (lines, timestamps)) in enriched.groups.into_iter().zip(python.groups) {
            let points = match points {
                true => Some(Py::new(
                    py,
                    Points {
                        chunk: slf.clone().unbind(),
                        numbers: group.messages,
                        received,
                    },
                )?),
                false => None,
            };
            let group = Group {
                source: PyString::new(py, slice(group.source)).unbind(),
                lines: lines.unbind(),
                timestamps: timestamps.unbind(),
                urgent: group.urgent,
                aggregates: group.aggregates,
                points,
            };
            groups.append(Py::new(py, group)?)?;
        }
        let level_objects: Vec<Bound<'py, PyString>> =
            LEVELS.iter().map(|l| PyString::intern(py, l)).collect();
        let cells = PyList::empty(py);
        for cell in enriched.cells {
            let events = PyList::empty(py);
            for &number in cell.key_events() {
                let message = &this.messages[number];
                let text = message
                    .text
                    .map(|t| text_string(bytes, t))
                    .unwrap_or_default();
                let at = timestamp_of(message, &received);
                events.append((timestamp_str(&at), &level_objects[message.level], text))?;
            }
            let metrics = PyDict::new(py);
            for (name, value, unit) in &cell.metrics {
                let unit = unit.map(|u| text_string(bytes, u));
                metrics.set_item(name, (number_object(py, bytes, *value)?, unit))?;
            }
            let progress = match cell
                .progress
                .and_then(|(n, _)| this.messages[n].progress.map(|p| (n, p)))
            {
                Some((number, (_job, percent, status))) => {
                    let progress = PyDict::new(py);
                    progress
                        .set_item(intern!(py, "percent"), number_object(py, bytes, percent)?)?;
                    progress.set_item(intern!(py, "status"), text_string(bytes, status))?;
                    let at = timestamp_of(&this.messages[number], &received);
                    progress.set_item(intern!(py, "at"), timestamp_str(&at))?;
                    Some(progress.unbind())
                }
                None => None,
            };
            let summary = Cell {
                job_id: cell.job,
                trace_id: cell.trace.map(|t| slice(t).to_owned()),
                source: slice(cell.source).to_owned(),
                count: cell.count,
                first: timestamp_str(&cell.first).to_owned(),
                last: timestamp_str(&cell.last).to_owned(),
                errors: cell.errors,
                events: events.unbind(),
                metrics: metrics.unbind(),
                progress,
                spans: PyList::new(py, cell.spans)?.unbind(),
            };
            cells.append(Py::new(py, summary)?)?;
        }
        Ok(Enrichment {
            groups: groups.unbind(),
            cells: cells.unbind(),
        })
    }
}

/// The complete lines of a chunk (`data` up to its last newline, without it) as a Decoded: the
/// lines for the fast path accepted, the others declined (blank, longer than
/// `max_message_size`, nested deeper than `max_depth`, not UTF-8, or anything the Python decoder
/// would reject or normalise otherwise). None if this code panicked (a bug): the caller then
/// takes the Python path for the whole chunk.
#[pyfunction]
fn decode(data: Bound<'_, PyBytes>, max_message_size: usize, max_depth: u32) -> Option<Decoded> {
    let bytes = data.as_bytes();
    // A bug here must not take the listener down.
    let (accepted, declined, lines) =
        std::panic::catch_unwind(|| accept_all(bytes, max_message_size, max_depth)).ok()?;
    Some(Decoded {
        data: data.unbind(),
        accepted,
        declined,
        lines,
        max_depth,
    })
}

/// CRC-32 (IEEE, as zlib.crc32) of `data`, continuing from `value`: the disk log's checksum,
/// several times faster than zlib's here (crc32fast uses the CPU's carry-less multiply).
#[pyfunction]
#[pyo3(signature = (data, value = 0))]
fn crc32(data: &[u8], value: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(value);
    hasher.update(data);
    hasher.finalize()
}

/// The native code's copies of `sidecar.constants`, by the same names and in the same types.
#[pyfunction]
fn constants(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let exported = PyDict::new(py);
    exported.set_item("MESSAGE_TYPES", PyFrozenSet::new(py, MESSAGE_TYPES)?)?;
    exported.set_item("LEVELS", PyTuple::new(py, LEVELS)?)?;
    exported.set_item(
        "LEVEL_ALIASES",
        LEVEL_ALIASES
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
    )?;
    exported.set_item("URGENT_LEVELS", PyFrozenSet::new(py, URGENT_LEVELS)?)?;
    exported.set_item("ERROR_LEVELS", PyFrozenSet::new(py, ERROR_LEVELS)?)?;
    exported.set_item("MAX_SOURCE_LENGTH", MAX_SOURCE_LENGTH)?;
    exported.set_item("TRACE_ID_LENGTH", TRACE_ID_LENGTH)?;
    exported.set_item("SPAN_ID_LENGTH", SPAN_ID_LENGTH)?;
    exported.set_item("EPOCH_MS_THRESHOLD", EPOCH_MS_THRESHOLD)?;
    exported.set_item("KEY_EVENTS_PER_SOURCE", KEY_EVENTS_PER_SOURCE)?;
    Ok(exported)
}

/// One aggregate step's windows (`sidecar.aggregation.Windows`'s semantics) and the picking of
/// its points out of a batch's lines (`sidecar.aggregate.AggregateStep.take`'s).
#[pyclass(module = "sidecar._native")]
struct AggregateWindows {
    windows: Windows,
    stats: Vec<(Py<PyString>, Option<f64>)>, // each statistic asked for, and its quantile
}

impl AggregateWindows {
    fn closed<'py>(&self, py: Python<'py>, closed: Vec<Closed>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for group in closed {
            let tags = PyTuple::new(
                py,
                group.key.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )?;
            let key = (group.key.source.as_str(), group.key.name.as_str(), tags);
            let stats = PyDict::new(py);
            let s = &group.stats;
            for (name, quantile) in &self.stats {
                let name = name.bind(py);
                match (name.to_str()?, quantile) {
                    ("count", _) => stats.set_item(name, s.count)?,
                    ("sum", _) => stats.set_item(name, s.sum)?,
                    ("min", _) => stats.set_item(name, s.min)?,
                    ("max", _) => stats.set_item(name, s.max)?,
                    ("avg", _) => stats.set_item(name, s.sum / s.count as f64)?,
                    ("last", _) => stats.set_item(name, s.last)?,
                    (_, Some(q)) => stats.set_item(name, s.quantile(*q))?,
                    (other, None) => {
                        return Err(PyValueError::new_err(format!(
                            "unknown statistic {other:?}"
                        )))
                    }
                }
            }
            out.append((
                key,
                group.start,
                group.end,
                stats,
                s.sum,
                group.partial,
                s.unit(),
            ))?;
        }
        Ok(out)
    }
}

#[pymethods]
impl AggregateWindows {
    /// `stats`: (name, quantile or None) for each; `late`: "current" or "drop"; `metrics` and
    /// `spans`: name globs (fnmatch's); `tags`: None for all tags, else the names `by` gives.
    #[new]
    #[pyo3(signature = (window, stats, *, late, max_groups, now, metrics, spans, tags))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        window: f64,
        stats: Vec<(Py<PyString>, Option<f64>)>,
        late: &str,
        max_groups: usize,
        now: f64,
        metrics: Vec<String>,
        spans: Vec<String>,
        tags: Option<Vec<String>>,
    ) -> PyResult<Self> {
        if window.is_nan() || window <= 0.0 {
            return Err(PyValueError::new_err("window must be positive"));
        }
        let drop_late = match late {
            "current" => false,
            "drop" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown late policy {other:?}"
                )))
            }
        };
        let metrics = aggregate::globs_regex(&metrics).map_err(PyValueError::new_err)?;
        let spans = aggregate::globs_regex(&spans).map_err(PyValueError::new_err)?;
        let quantiles = stats.iter().any(|(_, q)| q.is_some());
        let by = match tags {
            None => By::AllTags,
            Some(names) => By::Tags(names),
        };
        Ok(AggregateWindows {
            windows: Windows::new(
                window, drop_late, max_groups, quantiles, now, metrics, spans, by,
            ),
            stats,
        })
    }

    /// Add the step's points among `lines[start:]` (a batch's enriched lines, of `source`),
    /// appending each one's index to `taken` when given; returns the index of the first line it
    /// could not read (for the Python step to read), or len(lines) when it read them all.
    /// `points`: the decoder's record of the same lines (`Group.points`), read in their place.
    #[pyo3(signature = (source, lines, start, now, taken = None, points = None))]
    fn take(
        &mut self,
        py: Python<'_>,
        source: &str,
        lines: &Bound<'_, PyList>,
        start: usize,
        now: f64,
        taken: Option<&Bound<'_, PyList>>,
        points: Option<&Bound<'_, Points>>,
    ) -> PyResult<usize> {
        let mut failed = None;
        let hear = |index: usize| {
            if let Some(taken) = taken {
                if let Err(error) = taken.append(index) {
                    failed.get_or_insert(error);
                }
            }
        };
        // A bug here must not take the sidecar down (see `unpanicked`).
        let run = std::panic::AssertUnwindSafe(|| -> PyResult<(Taken, usize)> {
            Ok(match points {
                Some(points) => {
                    let points = points.get();
                    if points.numbers.len() != lines.len() {
                        return Err(PyValueError::new_err(
                            "points and lines of different batches",
                        ));
                    }
                    let chunk = points.chunk.get();
                    let outcome = self.windows.take_messages(
                        source,
                        chunk.bytes(py),
                        &chunk.messages,
                        &points.numbers,
                        &points.received,
                        start,
                        now,
                        hear,
                    );
                    (outcome, points.numbers.len())
                }
                None => {
                    let lines: Vec<Bound<'_, PyBytes>> = lines
                        .iter()
                        .map(|line| line.cast_into::<PyBytes>().map_err(PyErr::from))
                        .collect::<PyResult<_>>()?;
                    let outcome = self.windows.take(
                        source,
                        lines.iter().map(|line| line.as_bytes()),
                        start,
                        now,
                        hear,
                    );
                    (outcome, lines.len())
                }
            })
        });
        let (outcome, count) = unpanicked(run)??;
        if let Some(error) = failed {
            return Err(error);
        }
        Ok(match outcome {
            Taken::All => count,
            Taken::StoppedAt(index) => index,
        })
    }

    /// Count one point of group `key` (source, name, ((tag, value), ...)); False when dropped.
    #[pyo3(signature = (key, timestamp, value, now, unit = None))]
    fn add(
        &mut self,
        key: (String, String, Vec<(String, String)>),
        timestamp: f64,
        value: f64,
        now: f64,
        unit: Option<&str>,
    ) -> bool {
        let (source, name, tags) = key;
        let tags: Vec<(std::borrow::Cow<str>, std::borrow::Cow<str>)> = tags
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self.windows
            .add(&source, &name, &tags, timestamp, value, unit, now)
    }

    /// The windows that ended at or before `now`, as (key, start, end, stats, sum, partial,
    /// unit).
    fn close<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let windows = &mut self.windows;
        let closed = unpanicked(std::panic::AssertUnwindSafe(|| windows.close(now)))?;
        self.closed(py, closed)
    }

    /// Every open window, as `close` gives them; those not ended partial.
    fn flush<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
        let windows = &mut self.windows;
        let closed = unpanicked(std::panic::AssertUnwindSafe(|| windows.flush(now)))?;
        self.closed(py, closed)
    }

    fn next_close(&self) -> f64 {
        self.windows.next_close()
    }

    #[getter]
    fn groups(&self) -> usize {
        self.windows.groups()
    }

    #[getter]
    fn closed_until(&self) -> f64 {
        self.windows.closed_until
    }

    /// (points, late, early, dropped, overflow), as `sidecar.aggregation.WindowCounts`.
    fn counts(&self) -> (u64, u64, u64, u64, u64) {
        let c = self.windows.counts;
        (c.points, c.late, c.early, c.dropped, c.overflow)
    }
}

/// A call into the windows, with a panic (a bug) as a RuntimeError the correlator counts:
/// pyo3's PanicException is a BaseException, which would stop the sidecar.
fn unpanicked<T>(call: impl FnOnce() -> T + std::panic::UnwindSafe) -> PyResult<T> {
    std::panic::catch_unwind(call)
        .map_err(|_| PyRuntimeError::new_err("internal error in the native aggregate windows"))
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Chunk>()?;
    module.add_class::<Points>()?;
    module.add_class::<Decoded>()?;
    module.add_class::<Group>()?;
    module.add_class::<Cell>()?;
    module.add_class::<Enrichment>()?;
    module.add_class::<AggregateWindows>()?;
    module.add("AGGREGATE_MAX_GROUP_BYTES", aggregate::MAX_GROUP_BYTES)?;
    module.add("AGGREGATE_RELATIVE_ACCURACY", aggregate::RELATIVE_ACCURACY)?;
    module.add_function(wrap_pyfunction!(decode, module)?)?;
    module.add_function(wrap_pyfunction!(crc32, module)?)?;
    module.add_function(wrap_pyfunction!(constants, module)?)?;
    Ok(())
}
