//! The sidecar's per-message hot path in one native call per chunk: parse, validate, enrich and
//! encode the JSON lines a connection sent, with no Python object per message but its line.
//!
//! It takes the messages the Python path (`sidecar.protocol` and `sidecar.message`) would
//! accept *unchanged* (canonical ids, no null optional keys, no duplicate keys where the protocol
//! looks), plus the normalisations most clients need: RFC 3339 timestamps with an offset or
//! another fraction, epoch seconds or milliseconds, and level aliases (`WARN`, `Error`),
//! rewritten in place as Python would.
//! For any other line `decode` names it instead, and the Python path, which stays the reference,
//! explains its error or normalises it and hands the chunk back. So this module decides only
//! "valid, maybe after those rewrites" or "not for me", and never has to agree with the
//! Python code on an error message. Hypothesis tests check both paths give the same lines.
//!
//! An accepted line is written out as received, with `received_at` and `host` (and, where the
//! Python path adds them, `timestamp` and `context.job_id`) spliced in before its closing brace:
//! the same JSON values as `orjson.dumps` of the enriched dict, without decoding the message.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

const LEVELS: [&str; 5] = ["debug", "info", "warning", "error", "critical"];
const MAX_SOURCE_LENGTH: usize = 200;
const KEY_EVENTS_PER_SOURCE: usize = 8;

/// The bytes that end a run of plain string content: a quote, a backslash, or a control byte
/// (which JSON allows only escaped).
static STRING_STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        stops[byte] = true;
        byte += 1;
    }
    stops[b'"' as usize] = true;
    stops[b'\\' as usize] = true;
    stops
};

/// A byte range of the chunk.
#[derive(Clone, Copy, Debug, Default)]
struct Range {
    start: usize,
    end: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ValueKind {
    Object,
    Array,
    String { escaped: bool },
    Number,
    True,
    False,
    Null,
}

/// A parsed value: its whole text, and for a string the text between the quotes.
#[derive(Clone, Copy, Debug)]
struct Value {
    kind: ValueKind,
    whole: Range,
    inner: Range,
}

#[derive(Clone, Copy, Debug)]
struct Member {
    key: Range,
    value: Value,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MessageType {
    Event,
    Metric,
    Progress,
    Resource,
    Span,
}

#[derive(Clone, Copy, Debug)]
struct Text {
    range: Range,
    escaped: bool,
}

#[derive(Clone, Copy, Debug)]
struct Context {
    close: usize, // its closing brace
    empty: bool,
    job: Option<Text>,
}

/// One accepted message: where its parts are in the chunk.
#[derive(Clone, Copy, Debug)]
struct Message {
    close: usize, // the closing brace of the message object
    start: usize,
    source: Range,
    kind: MessageType,
    level: usize,                // events: index into LEVELS
    timestamp: Option<[u8; 24]>, // canonical
    // Values the Python path normalises in place, rewritten in the line: the whole value as sent.
    timestamp_sent: Option<Range>,
    level_sent: Option<Range>,
    trace_id: Option<Range>,
    context: Option<Context>,
    text: Option<Text>,                          // an event's message
    metric: Option<(Text, Range, Option<Text>)>, // name, value, unit
    progress: Option<(Text, Range, Text)>,       // job_id, percent, status
}

/// Not on the fast path: the chunk goes to the Python decoder, which says why if it is wrong.
#[derive(Debug)]
struct Decline;

type Parsed<T> = Result<T, Decline>;

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
    depth: u32,
    // Levels of nesting taken (the message itself is level 1): deeper is Python's to reject.
    max_depth: u32,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8], at: usize, max_depth: u32) -> Self {
        Parser {
            bytes,
            at,
            depth: 0,
            max_depth,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Parsed<()> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(Decline)
        }
    }

    fn value(&mut self) -> Parsed<Value> {
        let start = self.at;
        let kind = match self.peek().ok_or(Decline)? {
            b'{' => {
                self.object(|parser, _key| parser.value().map(drop))?;
                ValueKind::Object
            }
            b'[' => {
                self.array()?;
                ValueKind::Array
            }
            b'"' => {
                let (inner, escaped) = self.string()?;
                return Ok(Value {
                    kind: ValueKind::String { escaped },
                    whole: Range {
                        start,
                        end: self.at,
                    },
                    inner,
                });
            }
            b't' => {
                self.literal(b"true")?;
                ValueKind::True
            }
            b'f' => {
                self.literal(b"false")?;
                ValueKind::False
            }
            b'n' => {
                self.literal(b"null")?;
                ValueKind::Null
            }
            b'-' | b'0'..=b'9' => {
                self.number()?;
                ValueKind::Number
            }
            _ => return Err(Decline),
        };
        let whole = Range {
            start,
            end: self.at,
        };
        Ok(Value {
            kind,
            whole,
            inner: whole,
        })
    }

    fn literal(&mut self, word: &[u8]) -> Parsed<()> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(Decline)
        }
    }

    /// A string; returns the span between the quotes and whether it holds escapes. The line is
    /// valid UTF-8 (checked before it is parsed), so only JSON's own rules are checked here.
    fn string(&mut self) -> Parsed<(Range, bool)> {
        self.at += 1;
        let start = self.at;
        let bytes = self.bytes;
        let mut escaped = false;
        loop {
            // Keys and ids are short: a table lookup per byte finds their end before a SIMD
            // search would have started. Longer text goes on with memchr.
            let limit = bytes.len().min(self.at + 24);
            while self.at < limit && !STRING_STOPS[bytes[self.at] as usize] {
                self.at += 1;
            }
            if self.at == limit {
                let found = memchr::memchr2(b'"', b'\\', &bytes[self.at..]).ok_or(Decline)?;
                if bytes[self.at..self.at + found].iter().any(|b| *b < 0x20) {
                    return Err(Decline);
                }
                self.at += found;
            }
            match bytes[self.at] {
                b'"' => {
                    let inner = Range {
                        start,
                        end: self.at,
                    };
                    self.at += 1;
                    return Ok((inner, escaped));
                }
                b'\\' => {}
                _ => return Err(Decline), // a control byte must be escaped
            }
            escaped = true;
            match *bytes.get(self.at + 1).ok_or(Decline)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 2,
                b'u' => {
                    let digits = bytes.get(self.at + 2..self.at + 6).ok_or(Decline)?;
                    if !digits.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Decline);
                    }
                    let code = digits.iter().fold(0u32, |code, digit| {
                        code * 16 + (*digit as char).to_digit(16).unwrap_or(0)
                    });
                    if (0xD800..=0xDFFF).contains(&code) {
                        return Err(Decline); // surrogates: orjson's rules, left to it
                    }
                    self.at += 6;
                }
                _ => return Err(Decline),
            }
        }
    }

    /// JSON's number grammar. A float that parses to infinity is refused by orjson, so it is
    /// left to the Python path; so is an integer outside 64 bits, which orjson reads as a float.
    fn number(&mut self) -> Parsed<()> {
        let start = self.at;
        let bytes = self.bytes;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits_start = self.at;
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(Decline),
        }
        let integer_digits = self.at - digits_start;
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(Decline);
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(Decline);
            }
            float = true;
        }
        if float {
            let text = std::str::from_utf8(&bytes[start..self.at]).map_err(|_| Decline)?;
            let value: f64 = text.parse().map_err(|_| Decline)?;
            if !value.is_finite() {
                return Err(Decline);
            }
        } else if integer_digits >= 19 {
            let text = std::str::from_utf8(&bytes[start..self.at]).map_err(|_| Decline)?;
            if text.parse::<i64>().is_err() && text.parse::<u64>().is_err() {
                return Err(Decline);
            }
        }
        Ok(())
    }

    /// Skips ASCII digits; returns how many.
    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        self.at - start
    }

    fn array(&mut self) -> Parsed<()> {
        if self.open(b'[', b']')? {
            return Ok(());
        }
        loop {
            self.skip_whitespace();
            self.value()?;
            if self.next_or_close(b']')? {
                return Ok(());
            }
        }
    }

    /// An object; `member` is given each key and parses its value. Returns the position of the
    /// closing brace.
    fn object(&mut self, mut member: impl FnMut(&mut Self, Range) -> Parsed<()>) -> Parsed<usize> {
        if self.open(b'{', b'}')? {
            return Ok(self.at - 1);
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(Decline);
            }
            let (key, escaped) = self.string()?;
            self.skip_whitespace();
            self.expect(b':')?;
            self.skip_whitespace();
            if escaped {
                // A key spelt with escapes could be any of the protocol's: left to Python.
                return Err(Decline);
            }
            member(self, key)?;
            if self.next_or_close(b'}')? {
                return Ok(self.at - 1);
            }
        }
    }

    /// The opening byte of an array or object, one level deeper; true if it is empty (and so
    /// closed already).
    fn open(&mut self, open: u8, close: u8) -> Parsed<bool> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(Decline);
        }
        self.expect(open)?;
        self.skip_whitespace();
        if self.peek() == Some(close) {
            self.at += 1;
            self.depth -= 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// After an element: a comma (false: more follow) or the closing byte (true: done).
    fn next_or_close(&mut self, close: u8) -> Parsed<bool> {
        self.skip_whitespace();
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(false)
            }
            Some(byte) if byte == close => {
                self.at += 1;
                self.depth -= 1;
                Ok(true)
            }
            _ => Err(Decline),
        }
    }
}

/// The members of the object at the parser's position, appended to `found`.
fn collect_members(parser: &mut Parser, found: &mut Vec<Member>) -> Parsed<usize> {
    parser.object(|parser, key| {
        let value = parser.value()?;
        found.push(Member { key, value });
        Ok(())
    })
}

/// No key twice (the Python path would keep the last value, but this one would check the first).
fn check_unique(bytes: &[u8], members: &[Member]) -> Parsed<()> {
    for (index, member) in members.iter().enumerate() {
        let key = &bytes[member.key.start..member.key.end];
        if members[..index]
            .iter()
            .any(|other| &bytes[other.key.start..other.key.end] == key)
        {
            return Err(Decline);
        }
    }
    Ok(())
}

/// The members of the object that starts at `at`, each key once.
fn members_of(bytes: &[u8], at: usize, found: &mut Vec<Member>) -> Parsed<usize> {
    found.clear();
    // Only tags are read this way, parsed (and their depth checked) with the message already.
    let close = collect_members(&mut Parser::new(bytes, at, u32::MAX), found)?;
    check_unique(bytes, found)?;
    Ok(close)
}

/// A message's members, and those of its `data` and `context` objects, in one pass.
struct Members {
    top: Vec<Member>,
    data: Vec<Member>,
    context: Vec<Member>,
}

impl Members {
    fn new() -> Self {
        Members {
            top: Vec::with_capacity(16),
            data: Vec::with_capacity(16),
            context: Vec::with_capacity(8),
        }
    }

    /// Parse the message object at the parser's position; returns its closing brace.
    fn parse(&mut self, parser: &mut Parser) -> Parsed<usize> {
        let Members { top, data, context } = self;
        top.clear();
        data.clear();
        context.clear();
        let close = parser.object(|parser, key| {
            let name = &parser.bytes[key.start..key.end];
            let start = parser.at;
            let value = if parser.peek() == Some(b'{') && (name == b"data" || name == b"context") {
                // A second `data` or `context` would mix into the first: the key check below
                // declines the message then.
                collect_members(
                    parser,
                    if name == b"data" {
                        &mut *data
                    } else {
                        &mut *context
                    },
                )?;
                let whole = Range {
                    start,
                    end: parser.at,
                };
                Value {
                    kind: ValueKind::Object,
                    whole,
                    inner: whole,
                }
            } else {
                parser.value()?
            };
            top.push(Member { key, value });
            Ok(())
        })?;
        check_unique(parser.bytes, top)?;
        check_unique(parser.bytes, data)?;
        check_unique(parser.bytes, context)?;
        Ok(close)
    }
}

fn find<'m>(bytes: &[u8], members: &'m [Member], name: &[u8]) -> Option<&'m Value> {
    members
        .iter()
        .find(|m| &bytes[m.key.start..m.key.end] == name)
        .map(|m| &m.value)
}

fn text_of(value: &Value) -> Parsed<Text> {
    match value.kind {
        ValueKind::String { escaped } => Ok(Text {
            range: value.inner,
            escaped,
        }),
        _ => Err(Decline),
    }
}

/// A string spelt without escapes (protocol keywords and ids: an escape is left to Python).
fn plain_text(value: &Value) -> Parsed<Range> {
    match value.kind {
        ValueKind::String { escaped: false } => Ok(value.inner),
        _ => Err(Decline),
    }
}

fn number_of(value: &Value) -> Parsed<Range> {
    if value.kind == ValueKind::Number {
        Ok(value.whole)
    } else {
        Err(Decline)
    }
}

fn number_value(bytes: &[u8], span: Range) -> f64 {
    std::str::from_utf8(&bytes[span.start..span.end])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(f64::NAN)
}

fn is_lower_hex(bytes: &[u8], span: Range, length: usize) -> bool {
    span.end - span.start == length
        && bytes[span.start..span.end]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// RFC 3339 with a `T`, seconds, any fraction of at least one digit, and `Z` or `±HH:MM`, as the
/// canonical `YYYY-MM-DDTHH:MM:SS.mmmZ` (the fraction cut to milliseconds, as Python's
/// `fromisoformat` and `format_timestamp` do); None for any other form, an impossible date, or
/// one that the offset moves out of the years 1-9999 (all left to Python, which says why).
fn normalise_rfc3339(text: &[u8]) -> Option<[u8; 24]> {
    let number = |start: usize, end: usize| -> Option<i64> {
        text.get(start..end)?.iter().try_fold(0i64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    if text.len() < 20
        || text[4] != b'-'
        || text[7] != b'-'
        || text[10] != b'T'
        || text[13] != b':'
        || text[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if !(1..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if text.get(at) == Some(&b'.') {
        let digits = text[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        for place in 0..3 {
            millis = millis * 10
                + if place < digits {
                    i64::from(text[at + 1 + place] - b'0')
                } else {
                    0
                };
        }
        at += 1 + digits;
    }
    let offset_minutes = match &text[at..] {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (number(at + 1, at + 3)?, number(at + 4, at + 6)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            if *sign == b'-' {
                -(hours * 60 + minutes)
            } else {
                hours * 60 + minutes
            }
        }
        _ => return None,
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_minutes * 60;
    canonical_timestamp(seconds, millis)
}

/// Seconds since the epoch and milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`; None outside the
/// years 1-9999.
fn canonical_timestamp(seconds: i64, millis: i64) -> Option<[u8; 24]> {
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    if !(1..=9999).contains(&year) {
        return None;
    }
    let formatted = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    formatted.as_bytes().try_into().ok()
}

/// An epoch number as `sidecar.message.normalise_timestamp` reads it: seconds, or milliseconds
/// from 1e11 on, through `datetime.fromtimestamp`'s float arithmetic, cut to milliseconds. None
/// where Python refuses it, or might compute it differently (integers from 2**53 on).
fn normalise_epoch(text: &[u8]) -> Option<[u8; 24]> {
    let text = std::str::from_utf8(text).ok()?;
    let (seconds, micros) = if text.contains(['.', 'e', 'E']) {
        let value: f64 = text.parse().ok()?;
        if !value.is_finite() {
            return None;
        }
        split_seconds(if value.abs() >= 1e11 {
            value / 1000.0
        } else {
            value
        })?
    } else {
        let value: i64 = text.parse().ok()?;
        if value.unsigned_abs() < 100_000_000_000 {
            (value, 0) // whole seconds: exact in Python too
        } else if value.unsigned_abs() < 1 << 53 {
            split_seconds(value as f64 / 1000.0)? // Python's int / 1000, the same double
        } else {
            return None;
        }
    };
    canonical_timestamp(seconds, micros / 1000)
}

/// Whole seconds and microseconds of a float timestamp, as CPython's
/// `_PyTime_DoubleToDenominator` makes them for `fromtimestamp` (round half to even).
fn split_seconds(seconds: f64) -> Option<(i64, i64)> {
    let mut whole = seconds.trunc();
    let mut micros = round_half_even((seconds - whole) * 1e6);
    if micros >= 1e6 {
        micros -= 1e6;
        whole += 1.0;
    } else if micros < 0.0 {
        micros += 1e6;
        whole -= 1.0;
    }
    if whole.abs() > 1e12 {
        return None; // far outside the years 1-9999 anyway
    }
    Some((whole as i64, micros as i64))
}

/// CPython's `_PyTime_RoundHalfEven`.
fn round_half_even(value: f64) -> f64 {
    let rounded = value.round();
    if (value - rounded).abs() == 0.5 {
        2.0 * (value / 2.0).round()
    } else {
        rounded
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day number from `days_from_civil`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

/// An event level as the Python path normalises it (`sidecar.message._check_event`), for ASCII.
fn level_of(text: &[u8]) -> Option<usize> {
    if !text.is_ascii() {
        return None; // Unicode lower-casing is Python's
    }
    let lowered = text.to_ascii_lowercase();
    let canonical: &[u8] = match lowered.as_slice() {
        b"warn" => b"warning",
        b"fatal" | b"crit" => b"critical",
        b"err" => b"error",
        other => other,
    };
    LEVELS.iter().position(|l| l.as_bytes() == canonical)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the one form the sidecar writes, and a real time: the shape
/// alone admits year 0 and month 13, which no backend stores.
fn is_canonical_timestamp(text: &[u8]) -> bool {
    const PATTERN: &[u8; 24] = b"0000-00-00T00:00:00.000Z";
    if text.len() != 24
        || !text.iter().zip(PATTERN.iter()).all(|(b, p)| {
            if *p == b'0' {
                b.is_ascii_digit()
            } else {
                b == p
            }
        })
    {
        return false;
    }
    let number = |start: usize, end: usize| {
        text[start..end]
            .iter()
            .fold(0i64, |n, c| n * 10 + i64::from(c - b'0'))
    };
    let (year, month, day) = (number(0, 4), number(5, 7), number(8, 10));
    year >= 1
        && (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && number(11, 13) <= 23
        && number(14, 16) <= 59
        && number(17, 19) <= 59
}

/// One line, if the Python path would accept it unchanged.
fn accept(bytes: &[u8], start: usize, members: &mut Members, max_depth: u32) -> Parsed<Message> {
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
                message.kind = match &bytes[span.start..span.end] {
                    b"event" => MessageType::Event,
                    b"metric" => MessageType::Metric,
                    b"progress" => MessageType::Progress,
                    b"resource" => MessageType::Resource,
                    b"span" => MessageType::Span,
                    _ => return Err(Decline),
                };
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
                if !is_lower_hex(bytes, span, 32) {
                    return Err(Decline);
                }
                message.trace_id = Some(span);
            }
            b"span_id" | b"parent_span_id" => {
                let span = plain_text(value)?;
                if !is_lower_hex(bytes, span, 16) {
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
            }
            message.metric = Some((name, value, unit));
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
            text_of(field(b"name").ok_or(Decline)?)?;
            let phase = plain_text(field(b"phase").ok_or(Decline)?)?;
            match &bytes[phase.start..phase.end] {
                b"start" => {}
                b"end" => {
                    text_of(field(b"status").ok_or(Decline)?)?;
                    let duration = number_of(field(b"duration_ms").ok_or(Decline)?)?;
                    let duration = number_value(bytes, duration);
                    if duration.is_nan() || duration < 0.0 {
                        return Err(Decline);
                    }
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

/// The decoded text of a JSON string's inside (escapes resolved; surrogates were refused).
fn unescape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let next = raw[index..]
            .iter()
            .position(|b| *b == b'\\')
            .map_or(raw.len(), |p| index + p);
        out.push_str(std::str::from_utf8(&raw[index..next]).unwrap_or(""));
        if next == raw.len() {
            break;
        }
        let escape = raw[next + 1];
        index = next + 2;
        match escape {
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let code = std::str::from_utf8(&raw[index..index + 4])
                    .ok()
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                out.push(code.and_then(char::from_u32).unwrap_or('\u{fffd}'));
                index += 4;
            }
            other => out.push(other as char),
        }
    }
    out
}

fn text_string(bytes: &[u8], text: Text) -> String {
    let raw = &bytes[text.range.start..text.range.end];
    if text.escaped {
        unescape(raw)
    } else {
        std::str::from_utf8(raw).unwrap_or("").to_owned()
    }
}

/// A JSON string literal, escaped as orjson escapes.
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => out.extend_from_slice(format!("\\u{:04x}", byte).as_bytes()),
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

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

/// The bytes a chunk's messages point into: the received bytes themselves, or, for a mended
/// chunk, a copy of them with the normalised lines after them.
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

/// A chunk some of whose lines were declined: the accepted ones, and where the others are.
#[pyclass(frozen, module = "sidecar._native")]
struct Partial {
    data: Py<PyBytes>,
    accepted: Vec<(usize, Message)>, // (line number, message)
    #[pyo3(get)]
    declined: Vec<(usize, usize, usize)>, // (line number, start, end)
    #[pyo3(get)]
    lines: usize,
    max_depth: u32,
}

#[pymethods]
impl Partial {
    /// The chunk with each declined line replaced: `replacements` are `(line number, line)` in
    /// line order, a line Python normalised; a declined line without one (an invalid or blank
    /// line) is left out. None if a replacement is itself declined.
    fn mend(&self, py: Python<'_>, replacements: Vec<(usize, Vec<u8>)>) -> Option<Chunk> {
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
        let mut messages = Vec::with_capacity(self.accepted.len() + mended.len());
        let mut mended = mended.into_iter().peekable();
        for (number, message) in &self.accepted {
            while let Some((_, replacement)) = mended.next_if(|(n, _)| n < number) {
                messages.push(replacement);
            }
            messages.push(*message);
        }
        messages.extend(mended.map(|(_, replacement)| replacement));
        Some(Chunk {
            data: Buffer::Mended(buffer),
            messages,
        })
    }
}

/// What one (job, trace, source) cell of a chunk did, for the live index.
struct Cell {
    job: Option<String>,
    trace: Option<Range>,
    source: Range,
    count: usize,
    first: [u8; 24],
    last: [u8; 24],
    errors: usize,
    events: Vec<usize>, // message numbers, the latest few
    metrics: Vec<(String, Range, Option<Text>)>,
    progress: Option<(usize, [u8; 24])>, // the latest by timestamp (a tie: the later arrival)
    spans: Vec<Py<PyBytes>>,
}

/// One source's messages of a chunk: their lines and timestamps, in order.
struct Group<'py> {
    source: Range,
    lines: Bound<'py, PyList>,
    timestamps: Bound<'py, PyList>,
    urgent: bool,
}

#[pymethods]
impl Chunk {
    fn __len__(&self) -> usize {
        self.messages.len()
    }

    /// Enrich every message as `Correlator.enrich` does and encode its line. Returns
    /// `(groups, cells)`: per source `(source, lines, timestamps, urgent)`, in order of first
    /// appearance, and per (job, trace, source) cell its summary for the live index:
    /// `(job, trace, source, count, first, last, errors, events, metrics, progress, span_lines)`.
    fn enrich<'py>(
        &self,
        py: Python<'py>,
        received_at: &str,
        host: &str,
        trace_jobs: &Bound<'py, PyDict>,
        trace_cache_size: usize,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let bytes: &[u8] = match &self.data {
            Buffer::Received(data) => data.bind(py).as_bytes(),
            Buffer::Mended(buffer) => buffer,
        };
        let received_at_object = PyString::new(py, received_at);
        let mut suffix = Vec::with_capacity(64 + host.len());
        suffix.extend_from_slice(b",\"received_at\":");
        push_json_string(&mut suffix, received_at);
        suffix.extend_from_slice(b",\"host\":");
        push_json_string(&mut suffix, host);
        let level_objects: Vec<Bound<'py, PyString>> =
            LEVELS.iter().map(|l| PyString::intern(py, l)).collect();

        let mut groups: Vec<Group<'py>> = Vec::new();
        let mut cells: Vec<Cell> = Vec::new();
        let mut line = Vec::with_capacity(512);
        let mut last_group = usize::MAX;
        let mut last_cell = usize::MAX;
        let mut last_timestamp: Option<([u8; 24], Bound<'py, PyString>)> = None;
        let mut last_trace: Option<(Range, Bound<'py, PyString>)> = None;
        let received: [u8; 24] = received_at.as_bytes().try_into().map_err(|_| {
            pyo3::exceptions::PyValueError::new_err("received_at must be YYYY-MM-DDTHH:MM:SS.mmmZ")
        })?;
        let slice = |range: Range| -> &[u8] { &bytes[range.start..range.end] };
        let mut edits: Vec<(Range, Vec<u8>)> = Vec::with_capacity(3);

        for (number, message) in self.messages.iter().enumerate() {
            // Correlation: a trace's first job is remembered; a message of the trace without
            // a job of its own gets it.
            let mut job: Option<String> = message
                .context
                .and_then(|c| c.job)
                .map(|t| text_string(bytes, t));
            let mut added_job = false;
            if let Some(trace) = message.trace_id {
                let key = match &last_trace {
                    Some((span, object)) if slice(*span) == slice(trace) => object.clone(),
                    _ => {
                        let object =
                            PyString::new(py, std::str::from_utf8(slice(trace)).unwrap_or(""));
                        last_trace = Some((trace, object.clone()));
                        object
                    }
                };
                if let Some(own) = &job {
                    if !trace_jobs.contains(&key)? {
                        trace_jobs.set_item(&key, own)?;
                        if trace_jobs.len() > trace_cache_size {
                            if let Some((oldest, _)) = trace_jobs.iter().next() {
                                trace_jobs.del_item(oldest)?;
                            }
                        }
                    }
                } else if let Some(known) = trace_jobs.get_item(&key)? {
                    job = Some(known.extract::<String>()?);
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
                    std::str::from_utf8(&message.timestamp.unwrap_or(received)).unwrap_or(""),
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
            let timestamp = message.timestamp.unwrap_or(received);
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
            let line_object = PyBytes::new(py, &line);

            let timestamp_object = match &last_timestamp {
                Some((text, object)) if *text == timestamp => object.clone(),
                _ => {
                    let object = if message.timestamp.is_none() {
                        received_at_object.clone()
                    } else {
                        PyString::new(py, std::str::from_utf8(&timestamp).unwrap_or(""))
                    };
                    last_timestamp = Some((timestamp, object.clone()));
                    object
                }
            };

            let source = &bytes[message.source.start..message.source.end];
            if last_group >= groups.len() || slice(groups[last_group].source) != source {
                last_group = match groups.iter().position(|g| slice(g.source) == source) {
                    Some(found) => found,
                    None => {
                        groups.push(Group {
                            source: message.source,
                            lines: PyList::empty(py),
                            timestamps: PyList::empty(py),
                            urgent: false,
                        });
                        groups.len() - 1
                    }
                };
            }
            let group = &mut groups[last_group];
            group.lines.append(&line_object)?;
            group.timestamps.append(&timestamp_object)?;
            if message.kind == MessageType::Event && message.level >= 3 {
                group.urgent = true;
            }

            // The live index's cell.
            if job.is_none() && message.kind == MessageType::Progress {
                job = message.progress.map(|(j, _, _)| text_string(bytes, j));
            }
            if job.is_none() && message.trace_id.is_none() {
                continue;
            }
            let same_cell = |cell: &Cell| {
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
                    if message.level >= 3 {
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
                MessageType::Span => cell.spans.push(line_object.clone().unbind()),
                MessageType::Resource => {}
            }
        }

        let timestamp_text = |number: usize| -> String {
            let timestamp = self.messages[number].timestamp.unwrap_or(received);
            String::from_utf8_lossy(&timestamp).into_owned()
        };
        let grouped = PyList::empty(py);
        for group in groups {
            let source = PyString::new(py, std::str::from_utf8(slice(group.source)).unwrap_or(""));
            grouped.append(PyTuple::new(
                py,
                [
                    source.into_any(),
                    group.lines.into_any(),
                    group.timestamps.into_any(),
                    group.urgent.into_pyobject(py)?.to_owned().into_any(),
                ],
            )?)?;
        }
        let summaries = PyList::empty(py);
        for cell in cells {
            let events = PyList::empty(py);
            let keep = cell.events.len().saturating_sub(KEY_EVENTS_PER_SOURCE);
            for &number in &cell.events[keep..] {
                let message = &self.messages[number];
                let text = message
                    .text
                    .map(|t| text_string(bytes, t))
                    .unwrap_or_default();
                events.append((timestamp_text(number), &level_objects[message.level], text))?;
            }
            let metrics = PyDict::new(py);
            for (name, value, unit) in &cell.metrics {
                let unit = unit.map(|u| text_string(bytes, u));
                metrics.set_item(name, (number_object(py, bytes, *value)?, unit))?;
            }
            let progress = match cell
                .progress
                .and_then(|(n, _)| self.messages[n].progress.map(|p| (n, p)))
            {
                Some((number, (_job, percent, status))) => Some((
                    number_object(py, bytes, percent)?,
                    text_string(bytes, status),
                    timestamp_text(number),
                )),
                None => None,
            };
            let spans = PyList::new(py, cell.spans)?;
            let trace = cell
                .trace
                .map(|t| std::str::from_utf8(slice(t)).unwrap_or("").to_owned());
            let source = std::str::from_utf8(slice(cell.source)).unwrap_or("");
            let first = std::str::from_utf8(&cell.first).unwrap_or("");
            let last = std::str::from_utf8(&cell.last).unwrap_or("");
            let summary = (
                cell.job,
                trace,
                source,
                cell.count,
                first,
                last,
                cell.errors,
                events,
                metrics,
                progress,
                spans,
            );
            summaries.append(summary.into_pyobject(py)?)?;
        }
        Ok((grouped, summaries))
    }
}

/// The complete lines of a chunk (`data` up to its last newline, without it) as a Chunk when
/// every line is for the fast path. Otherwise a Partial naming the lines that are not: blank,
/// longer than `max_message_size`, nested deeper than `max_depth`, not UTF-8, or anything the
/// Python decoder would reject or normalise; the caller decodes those and may `mend` it into a
/// Chunk. None if this code panicked (a bug): the caller then takes the Python path for the
/// whole chunk.
#[pyfunction]
fn decode(
    py: Python<'_>,
    data: Bound<'_, PyBytes>,
    max_message_size: usize,
    max_depth: u32,
) -> PyResult<Option<Py<PyAny>>> {
    let bytes = data.as_bytes();
    // A bug here must not take the listener down.
    let Ok((accepted, declined, lines)) =
        std::panic::catch_unwind(|| accept_all(bytes, max_message_size, max_depth))
    else {
        return Ok(None);
    };
    let data = data.unbind();
    Ok(Some(if declined.is_empty() {
        let messages = accepted.into_iter().map(|(_, message)| message).collect();
        Chunk {
            data: Buffer::Received(data),
            messages,
        }
        .into_pyobject(py)?
        .into_any()
        .unbind()
    } else {
        Partial {
            data,
            accepted,
            declined,
            lines,
            max_depth,
        }
        .into_pyobject(py)?
        .into_any()
        .unbind()
    }))
}

type Declined = Vec<(usize, usize, usize)>;

/// The accepted messages with their line numbers, the declined lines, and the number of lines.
fn accept_all(
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

/// CRC-32 (IEEE, as zlib.crc32) of `data`, continuing from `value`: the disk log's checksum,
/// several times faster than zlib's here (crc32fast uses the CPU's carry-less multiply).
#[pyfunction]
#[pyo3(signature = (data, value = 0))]
fn crc32(data: &[u8], value: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(value);
    hasher.update(data);
    hasher.finalize()
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Chunk>()?;
    module.add_class::<Partial>()?;
    module.add_function(wrap_pyfunction!(decode, module)?)?;
    module.add_function(wrap_pyfunction!(crc32, module)?)?;
    Ok(())
}
