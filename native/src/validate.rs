//! Validation: one line as a `Message` when the Python path (`sidecar.message.validate_message`)
//! would accept it unchanged or after the rewrites done here (timestamps, level aliases), else
//! a `Decline`.

use crate::constants::{
    LEVELS, LEVEL_ALIASES, MAX_SOURCE_LENGTH, MESSAGE_TYPES, SPAN_ID_LENGTH, TRACE_ID_LENGTH,
};
use crate::json::{
    find, members_of, number_of, number_value, plain_text, text_of, Decline, Members, Parsed,
    Parser, Range, Text, ValueKind,
};
use crate::time::{is_canonical_timestamp, normalise_epoch, normalise_rfc3339, Timestamp};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MessageType {
    Event,
    Metric,
    Progress,
    Resource,
    Span,
}

impl MessageType {
    /// In the order of `MESSAGE_TYPES`.
    const ALL: [MessageType; MESSAGE_TYPES.len()] = [
        MessageType::Event,
        MessageType::Metric,
        MessageType::Progress,
        MessageType::Resource,
        MessageType::Span,
    ];

    /// The type named `name`: a match on the names, which every line takes (quicker than a
    /// search of `MESSAGE_TYPES`).
    fn named(name: &[u8]) -> Option<Self> {
        const EVENT: &[u8] = MESSAGE_TYPES[0].as_bytes();
        const METRIC: &[u8] = MESSAGE_TYPES[1].as_bytes();
        const PROGRESS: &[u8] = MESSAGE_TYPES[2].as_bytes();
        const RESOURCE: &[u8] = MESSAGE_TYPES[3].as_bytes();
        const SPAN: &[u8] = MESSAGE_TYPES[4].as_bytes();
        Some(match name {
            EVENT => Self::ALL[0],
            METRIC => Self::ALL[1],
            PROGRESS => Self::ALL[2],
            RESOURCE => Self::ALL[3],
            SPAN => Self::ALL[4],
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub close: usize, // its closing brace
    pub empty: bool,
    pub job: Option<Text>,
}

/// One accepted message: where its parts are in the chunk.
#[derive(Clone, Copy, Debug)]
pub struct Message {
    pub close: usize, // the closing brace of the message object
    pub start: usize,
    pub source: Range,
    pub kind: MessageType,
    pub level: usize,                 // events: index into LEVELS
    pub timestamp: Option<Timestamp>, // canonical
    // Values the Python path normalises in place, rewritten in the line: the whole value as sent.
    pub timestamp_sent: Option<Range>,
    pub level_sent: Option<Range>,
    pub trace_id: Option<Range>,
    pub context: Option<Context>,
    pub text: Option<Text>,                          // an event's message
    pub metric: Option<(Text, Range, Option<Text>)>, // name, value, unit
    pub progress: Option<(Text, Range, Text)>,       // job_id, percent, status
    pub aggregate: bool, // a metric with `data.aggregation`: what filter.aggregated tells apart
    pub tags: Option<Range>, // a metric's `data.tags` object (its whole value)
    pub span_end: Option<(Text, Text, Range)>, // a span end's name, status and duration_ms
}

fn is_lower_hex(bytes: &[u8], span: Range, length: usize) -> bool {
    span.end - span.start == length
        && bytes[span.start..span.end]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An event level (its index in `LEVELS`) as the Python path normalises it
/// (`sidecar.message._check_event`), for ASCII.
fn level_of(text: &[u8]) -> Option<usize> {
    let index = |name: &[u8]| LEVELS.iter().position(|level| level.as_bytes() == name);
    if let Some(level) = index(text) {
        return Some(level);
    }
    if !text.is_ascii() {
        return None; // Unicode lower-casing is Python's
    }
    let lowered = text.to_ascii_lowercase();
    let canonical = LEVEL_ALIASES
        .iter()
        .find(|(alias, _)| alias.as_bytes() == lowered)
        .map_or(lowered.as_slice(), |(_, level)| level.as_bytes());
    index(canonical)
}

/// One line, if the Python path would accept it unchanged.
pub fn accept(
    bytes: &[u8],
    start: usize,
    members: &mut Members,
    max_depth: u32,
) -> Parsed<Message> {
    let mut parser = Parser::new(bytes, start, max_depth);
    parser.skip_whitespace();
    let object_start = parser.at;
    let close = members.parse(&mut parser)?;
    let (top, inner, context) = (&members.top, &members.data, &members.context);
    parser.skip_whitespace();
    if parser.at != bytes.len() {
        return Err(Decline);
    }
    let mut message = Message {
        close,
        start: object_start,
        source: Range::default(),
        kind: MessageType::Event,
        level: 0,
        timestamp: None,
        timestamp_sent: None,
        level_sent: None,
        trace_id: None,
        context: None,
        text: None,
        metric: None,
        progress: None,
        aggregate: false,
        tags: None,
        span_end: None,
    };
    let mut data = false;
    let mut span_id = false;
    for member in top.iter() {
        let value = &member.value;
        match &bytes[member.key.start..member.key.end] {
            b"source" => {
                let span = plain_text(value)?;
                let text = &bytes[span.start..span.end];
                if text.is_empty()
                    || text.len() > MAX_SOURCE_LENGTH
                    || !text.iter().all(|b| (0x20..0x7f).contains(b))
                {
                    return Err(Decline);
                }
                message.source = span;
            }
            b"type" => {
                let span = plain_text(value)?;
                message.kind = MessageType::named(&bytes[span.start..span.end]).ok_or(Decline)?;
            }
            b"data" => {
                if value.kind != ValueKind::Object {
                    return Err(Decline);
                }
                data = true;
            }
            b"timestamp" => {
                if value.kind == ValueKind::Number {
                    let text = &bytes[value.whole.start..value.whole.end];
                    message.timestamp = Some(normalise_epoch(text).ok_or(Decline)?);
                    message.timestamp_sent = Some(value.whole);
                } else {
                    let span = plain_text(value)?;
                    let text = &bytes[span.start..span.end];
                    if is_canonical_timestamp(text) {
                        message.timestamp = text.try_into().ok();
                    } else {
                        message.timestamp = Some(normalise_rfc3339(text).ok_or(Decline)?);
                        message.timestamp_sent = Some(value.whole);
                    }
                }
            }
            b"trace_id" => {
                let span = plain_text(value)?;
                if !is_lower_hex(bytes, span, TRACE_ID_LENGTH) {
                    return Err(Decline);
                }
                message.trace_id = Some(span);
            }
            b"span_id" | b"parent_span_id" => {
                let span = plain_text(value)?;
                if !is_lower_hex(bytes, span, SPAN_ID_LENGTH) {
                    return Err(Decline);
                }
                span_id |= &bytes[member.key.start..member.key.end] == b"span_id";
            }
            b"context" => {
                if value.kind != ValueKind::Object {
                    return Err(Decline);
                }
                let job = match find(bytes, context, b"job_id") {
                    None => None,
                    Some(job) => {
                        let text = text_of(job)?;
                        if text.range.start == text.range.end {
                            return Err(Decline); // "" is replaced by a trace's job in place
                        }
                        Some(text)
                    }
                };
                message.context = Some(Context {
                    close: value.whole.end - 1,
                    empty: context.is_empty(),
                    job,
                });
            }
            // Set by the sidecar: a message carrying them is rewritten in place by Python.
            b"received_at" | b"host" => return Err(Decline),
            _ => {}
        }
    }
    if message.source.end == 0
        || !top
            .iter()
            .any(|m| &bytes[m.key.start..m.key.end] == b"type")
    {
        return Err(Decline);
    }
    if !data {
        return Err(Decline);
    }
    let field = |name: &[u8]| find(bytes, inner, name);
    match message.kind {
        MessageType::Event => {
            let sent = field(b"level").ok_or(Decline)?;
            let level = plain_text(sent)?;
            let text = &bytes[level.start..level.end];
            message.level = level_of(text).ok_or(Decline)?;
            if LEVELS[message.level].as_bytes() != text {
                message.level_sent = Some(sent.whole);
            }
            message.text = Some(text_of(field(b"message").ok_or(Decline)?)?);
        }
        MessageType::Metric => {
            let name = text_of(field(b"name").ok_or(Decline)?)?;
            if name.range.start == name.range.end {
                return Err(Decline);
            }
            let value = number_of(field(b"value").ok_or(Decline)?)?;
            let unit = match field(b"unit") {
                None => None,
                Some(v) if v.kind == ValueKind::Null => None,
                Some(v) => Some(text_of(v)?),
            };
            if let Some(tags) = field(b"tags") {
                match tags.kind {
                    ValueKind::Null => {}
                    ValueKind::Object => {
                        let mut values = Vec::new();
                        members_of(bytes, tags.whole.start, &mut values)?;
                        if !values
                            .iter()
                            .all(|m| matches!(m.value.kind, ValueKind::String { .. }))
                        {
                            return Err(Decline);
                        }
                    }
                    _ => return Err(Decline),
                }
                message.tags = (tags.kind == ValueKind::Object).then_some(tags.whole);
            }
            message.metric = Some((name, value, unit));
            message.aggregate = field(b"aggregation").is_some();
        }
        MessageType::Progress => {
            let job = text_of(field(b"job_id").ok_or(Decline)?)?;
            if job.range.start == job.range.end {
                return Err(Decline);
            }
            let percent = number_of(field(b"percent").ok_or(Decline)?)?;
            let value = number_value(bytes, percent);
            if !(0.0..=100.0).contains(&value) {
                return Err(Decline);
            }
            let status = text_of(field(b"status").ok_or(Decline)?)?;
            message.progress = Some((job, percent, status));
        }
        MessageType::Resource => {
            if !inner
                .iter()
                .all(|m| matches!(m.value.kind, ValueKind::Number | ValueKind::Null))
            {
                return Err(Decline);
            }
        }
        MessageType::Span => {
            let name = text_of(field(b"name").ok_or(Decline)?)?;
            let phase = plain_text(field(b"phase").ok_or(Decline)?)?;
            match &bytes[phase.start..phase.end] {
                b"start" => {}
                b"end" => {
                    let status = text_of(field(b"status").ok_or(Decline)?)?;
                    let duration = number_of(field(b"duration_ms").ok_or(Decline)?)?;
                    let milliseconds = number_value(bytes, duration);
                    if milliseconds.is_nan() || milliseconds < 0.0 {
                        return Err(Decline);
                    }
                    message.span_end = Some((name, status, duration));
                }
                _ => return Err(Decline),
            }
            if !span_id {
                return Err(Decline);
            }
        }
    }
    Ok(message)
}

pub type Declined = Vec<(usize, usize, usize)>;

/// The accepted messages with their line numbers, the declined lines, and the number of lines.
pub fn accept_all(
    bytes: &[u8],
    max_message_size: usize,
    max_depth: u32,
) -> (Vec<(usize, Message)>, Declined, usize) {
    let mut accepted = Vec::with_capacity(bytes.len() / 256 + 1);
    let mut declined = Vec::new();
    let mut members = Members::new();
    let mut start = 0;
    let mut number = 0;
    while start <= bytes.len() {
        let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |p| start + p);
        // Each line is parsed as its own document: the parser stops at its end.
        let line = &bytes[..end];
        let outcome =
            if end - start > max_message_size || std::str::from_utf8(&line[start..]).is_err() {
                Err(Decline)
            } else {
                accept(line, start, &mut members, max_depth)
            };
        match outcome {
            Ok(message) => accepted.push((number, message)),
            Err(Decline) => declined.push((number, start, end)),
        }
        start = end + 1;
        number += 1;
    }
    (accepted, declined, number)
}
