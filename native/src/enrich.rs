//! Enrichment: every accepted message of a chunk as the Python path enriches it
//! (`sidecar.ingest.PythonChunk.correlate`): its line with the sidecar's fields spliced in, its
//! group per source, the job of its trace, and the summary of its (job, trace, source) cell for
//! the live index. What it needs from Python (the trace -> job memory, where a line goes) it asks
//! of its `Host`, so this module holds no Python object.
//!
//! A line is written as received, with the values Python would normalise rewritten (timestamp,
//! level) and `received_at` and `host` (and, where the Python path adds them, `timestamp` and
//! `context.job_id`) spliced in before its closing brace: the same JSON values as
//! `orjson.dumps` of the enriched dict, without decoding the message.

use crate::constants::{level_table, ERROR_LEVELS, KEY_EVENTS_PER_SOURCE, LEVELS, URGENT_LEVELS};
use crate::json::{push_json_string, text_string, Range, Text};
use crate::time::Timestamp;
use crate::validate::{Message, MessageType};

/// What enrichment asks of its caller.
pub trait Host {
    /// A message's line as the caller keeps it (a span's is kept in its cell too).
    type Line: Clone;
    type Error;
    /// The job remembered for a trace (its id: lowercase hex), if any.
    fn known_job(&mut self, trace: &[u8]) -> Result<Option<String>, Self::Error>;
    /// A message of `trace` named `job` as its own: the trace -> job memory decides what to keep.
    fn link(&mut self, trace: &[u8], job: &str) -> Result<(), Self::Error>;
    /// The enriched line of the next message, of the group at index `group` in
    /// `Enrichment::groups` (a new group's first line comes with the next index).
    fn line(
        &mut self,
        group: usize,
        line: &[u8],
        timestamp: &Timestamp,
    ) -> Result<Self::Line, Self::Error>;
}

/// One source's messages of a chunk (their lines went to the host).
pub struct Group {
    pub source: Range,
    pub urgent: bool,       // an event of one of URGENT_LEVELS among them
    pub aggregates: bool,   // a metric with `data.aggregation` among them
    pub messages: Vec<u32>, // the numbers (in `messages`) of its messages, in order
}

/// What one (job, trace, source) cell of a chunk did, for the live index.
pub struct Cell<L> {
    pub job: Option<String>,
    pub trace: Option<Range>,
    pub source: Range,
    pub count: usize,
    pub first: Timestamp,
    pub last: Timestamp,
    pub errors: usize,
    events: Vec<usize>, // message numbers; the latest are kept (see `key_events`)
    pub metrics: Vec<(String, Range, Option<Text>)>, // name, value, unit: the latest per name
    pub progress: Option<(usize, Timestamp)>, // the latest by timestamp (a tie: the later arrival)
    pub spans: Vec<L>,
}

impl<L> Cell<L> {
    /// The numbers of the cell's latest KEY_EVENTS_PER_SOURCE events, in order.
    pub fn key_events(&self) -> &[usize] {
        &self.events[self.events.len().saturating_sub(KEY_EVENTS_PER_SOURCE)..]
    }
}

/// A chunk enriched: its groups in order of first appearance, and its cells.
pub struct Enrichment<L> {
    pub groups: Vec<Group>,
    pub cells: Vec<Cell<L>>,
}

/// The time a message is written with: its own, or when it was received.
pub fn timestamp_of(message: &Message, received: &Timestamp) -> Timestamp {
    message.timestamp.unwrap_or(*received)
}

/// Enrich `messages` (accepted from `bytes`), received at `received` on the machine `host_name`.
pub fn enrich<H: Host>(
    bytes: &[u8],
    messages: &[Message],
    received: &Timestamp,
    host_name: &str,
    host: &mut H,
) -> Result<Enrichment<H::Line>, H::Error> {
    let slice = |range: Range| -> &[u8] { &bytes[range.start..range.end] };
    let received_at = std::str::from_utf8(received).unwrap_or("");
    let urgent_levels = level_table(&URGENT_LEVELS);
    let error_levels = level_table(&ERROR_LEVELS);
    let mut suffix = Vec::with_capacity(64 + host_name.len());
    suffix.extend_from_slice(b",\"received_at\":");
    push_json_string(&mut suffix, received_at);
    suffix.extend_from_slice(b",\"host\":");
    push_json_string(&mut suffix, host_name);

    let mut groups: Vec<Group> = Vec::new();
    let mut cells: Vec<Cell<H::Line>> = Vec::new();
    let mut line = Vec::with_capacity(512);
    let mut edits: Vec<(Range, Vec<u8>)> = Vec::with_capacity(3);
    let mut last_group = usize::MAX;
    let mut last_cell = usize::MAX;

    for (number, message) in messages.iter().enumerate() {
        // The job of a message: its own (context.job_id), else its trace's, else a progress
        // message's job_id. A trace's job is remembered by the host.
        let mut job: Option<String> = message
            .context
            .and_then(|c| c.job)
            .map(|t| text_string(bytes, t));
        let mut added_job = false;
        if let Some(trace) = message.trace_id {
            let trace = slice(trace);
            if let Some(own) = &job {
                host.link(trace, own)?;
            } else if let Some(known) = host.known_job(trace)? {
                job = Some(known);
                added_job = true;
            }
        }

        // The line: as received, with the values Python would normalise rewritten, and the
        // sidecar's fields spliced in before the closing brace.
        edits.clear();
        if let Some(sent) = message.timestamp_sent {
            let mut value = Vec::with_capacity(26);
            push_json_string(
                &mut value,
                std::str::from_utf8(&timestamp_of(message, received)).unwrap_or(""),
            );
            edits.push((sent, value));
        }
        if let Some(sent) = message.level_sent {
            let mut value = Vec::with_capacity(10);
            push_json_string(&mut value, LEVELS[message.level]);
            edits.push((sent, value));
        }
        if let (true, Some(context)) = (added_job, message.context) {
            let mut value = Vec::with_capacity(32);
            value.extend_from_slice(if context.empty {
                b"\"job_id\":"
            } else {
                b",\"job_id\":"
            });
            push_json_string(&mut value, job.as_deref().unwrap_or(""));
            edits.push((
                Range {
                    start: context.close,
                    end: context.close,
                },
                value,
            ));
        }
        edits.sort_unstable_by_key(|(range, _)| range.start);
        line.clear();
        let mut position = message.start;
        for (range, value) in &edits {
            line.extend_from_slice(&bytes[position..range.start]);
            line.extend_from_slice(value);
            position = range.end;
        }
        line.extend_from_slice(&bytes[position..message.close]);
        line.extend_from_slice(&suffix);
        let timestamp = timestamp_of(message, received);
        if message.timestamp.is_none() {
            line.extend_from_slice(b",\"timestamp\":");
            push_json_string(&mut line, received_at);
        }
        if added_job && message.context.is_none() {
            line.extend_from_slice(b",\"context\":{\"job_id\":");
            push_json_string(&mut line, job.as_deref().unwrap_or(""));
            line.push(b'}');
        }
        line.push(b'}');

        // Its source's group.
        let source = slice(message.source);
        if last_group >= groups.len() || slice(groups[last_group].source) != source {
            last_group = match groups.iter().position(|g| slice(g.source) == source) {
                Some(found) => found,
                None => {
                    groups.push(Group {
                        source: message.source,
                        urgent: false,
                        aggregates: false,
                        messages: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
        }
        let line_kept = host.line(last_group, &line, &timestamp)?;
        if message.kind == MessageType::Event && urgent_levels[message.level] {
            groups[last_group].urgent = true;
        }
        groups[last_group].aggregates |= message.aggregate;
        groups[last_group].messages.push(number as u32);

        // Its cell of the live index.
        if job.is_none() && message.kind == MessageType::Progress {
            job = message.progress.map(|(j, _, _)| text_string(bytes, j));
        }
        if job.is_none() && message.trace_id.is_none() {
            continue;
        }
        let same_cell = |cell: &Cell<H::Line>| {
            cell.job == job
                && cell.trace.map(slice) == message.trace_id.map(slice)
                && slice(cell.source) == source
        };
        if last_cell >= cells.len() || !same_cell(&cells[last_cell]) {
            last_cell = match cells.iter().position(same_cell) {
                Some(found) => found,
                None => {
                    cells.push(Cell {
                        job: job.clone(),
                        trace: message.trace_id,
                        source: message.source,
                        count: 0,
                        first: timestamp,
                        last: timestamp,
                        errors: 0,
                        events: Vec::new(),
                        metrics: Vec::new(),
                        progress: None,
                        spans: Vec::new(),
                    });
                    cells.len() - 1
                }
            };
        }
        let cell = &mut cells[last_cell];
        cell.count += 1;
        if timestamp < cell.first {
            cell.first = timestamp;
        }
        if timestamp > cell.last {
            cell.last = timestamp;
        }
        match message.kind {
            MessageType::Event => {
                if error_levels[message.level] {
                    cell.errors += 1;
                }
                cell.events.push(number);
                if cell.events.len() > 4 * KEY_EVENTS_PER_SOURCE {
                    cell.events
                        .drain(..cell.events.len() - KEY_EVENTS_PER_SOURCE);
                }
            }
            MessageType::Metric => {
                if let Some((name, value, unit)) = message.metric {
                    let name = text_string(bytes, name);
                    match cell.metrics.iter_mut().find(|(n, _, _)| *n == name) {
                        Some(entry) => {
                            entry.1 = value;
                            entry.2 = unit;
                        }
                        None => cell.metrics.push((name, value, unit)),
                    }
                }
            }
            MessageType::Progress => {
                if cell.progress.is_none_or(|(_, at)| timestamp >= at) {
                    cell.progress = Some((number, timestamp));
                }
            }
            MessageType::Span => cell.spans.push(line_kept),
            MessageType::Resource => {}
        }
    }
    Ok(Enrichment { groups, cells })
}
