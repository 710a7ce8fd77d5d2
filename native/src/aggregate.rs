//! The aggregate step's windows on the native path: `sidecar.aggregation.Windows` and the point
//! picking of `sidecar.aggregate.AggregateStep.take`, with the same semantics, fed a batch's
//! enriched lines in one call so that no point becomes a Python object.
//!
//! A line this code cannot vouch for (an escaped key, a duplicate key, a number outside 64 bits,
//! a timestamp not canonical) stops `take` at that line: the Python step reads it as a dict and
//! adds it through `add`, then calls `take` again from the next line, so the order of points,
//! which `sum`, `last` and the overflow group depend on, is kept.
//!
//! Quantiles: `sketches-ddsketch` (a port of DataDog's DDSketch), `Config::new(0.01, 1024,
//! f64::MIN_POSITIVE)`: 1% relative accuracy like the Python path's sketch; 1024 bins per sign
//! (a store for positive values and one for negative ones, keyed by magnitude, the lowest
//! magnitudes collapsed beyond it), so a group holds at most 2 × 1024 × 8 bytes of bins; and
//! every normal float indexed (magnitudes under f64::MIN_POSITIVE count as zero, exactly 0).
//! Its quantile is the bin of rank floor(q·(n−1)) (q = 0 and 1 give the exact min and max).

use std::borrow::Cow;
use std::collections::HashMap;

use regex::Regex;
use sketches_ddsketch::{Config, DDSketch};

use crate::json::{
    find, members_of, number_of, plain_text, text_of, text_string, Member, Members, Parser,
    ValueKind,
};
use crate::time::canonical_epoch_ms;

pub const RELATIVE_ACCURACY: f64 = 0.01;
pub const SKETCH_BINS: u32 = 1024;
pub const OVERFLOW: &str = "__overflow__";
pub const SPAN_SUFFIX: &str = ".duration_ms";

/// What a group holds at most, whatever its count: both stores' bins full, the stores and the
/// statistics (its key's strings come on top).
pub const MAX_GROUP_BYTES: usize = 2 * SKETCH_BINS as usize * 8 + 512;

fn sketch_config() -> Config {
    Config::new(RELATIVE_ACCURACY, SKETCH_BINS, f64::MIN_POSITIVE)
}

// ---------------------------------------------------------------------------------------------
// Globs, as Python's fnmatch.fnmatchcase reads them.

/// One item of a bracket expression.
enum ClassItem {
    Char(char),
    Range(char, char),
}

/// The regex of a bracket expression's inside as fnmatch.translate writes it (`stuff`, without
/// the brackets) and Python's `re` reads it, spelt for the `regex` crate: every character as a
/// `\x{...}` escape, so nothing in it is a set operation or a nested class there.
fn class_regex(stuff: &[char]) -> Result<String, String> {
    let mut at = 0;
    let negated = stuff.first() == Some(&'^');
    if negated {
        at = 1;
    }
    // One item: an escape (`\X`, X literal) or a character.
    let item = |at: &mut usize| -> char {
        let c = stuff[*at];
        *at += 1;
        if c == '\\' && *at < stuff.len() {
            let escaped = stuff[*at];
            *at += 1;
            escaped
        } else {
            c
        }
    };
    let mut items = Vec::new();
    while at < stuff.len() {
        let low = item(&mut at);
        if at < stuff.len() && stuff[at] == '-' {
            if at + 1 == stuff.len() {
                // A hyphen before the closing bracket is itself.
                items.push(ClassItem::Char(low));
                items.push(ClassItem::Char('-'));
                at += 1;
                continue;
            }
            at += 1;
            let high = item(&mut at);
            if high < low {
                return Err(format!("bad character range {low}-{high}"));
            }
            items.push(ClassItem::Range(low, high));
        } else {
            items.push(ClassItem::Char(low));
        }
    }
    let mut out = String::from(if negated { "[^" } else { "[" });
    for item in items {
        match item {
            ClassItem::Char(c) => out.push_str(&format!("\\x{{{:x}}}", c as u32)),
            ClassItem::Range(low, high) => out.push_str(&format!(
                "\\x{{{:x}}}-\\x{{{:x}}}",
                low as u32, high as u32
            )),
        }
    }
    out.push(']');
    Ok(out)
}

/// One glob as a regex body, by CPython 3.11's `fnmatch.translate` step for step (a bracket
/// expression's ranges and escapes included), emitted for the `regex` crate.
pub fn glob_regex(glob: &str) -> Result<String, String> {
    let pat: Vec<char> = glob.chars().collect();
    let n = pat.len();
    let mut out = String::new();
    let mut star = false; // the last piece was a star: consecutive ones are one
    let mut i = 0;
    while i < n {
        let c = pat[i];
        i += 1;
        if c == '*' {
            if !star {
                out.push_str(".*");
            }
            star = true;
            continue;
        }
        star = false;
        if c == '?' {
            out.push('.');
        } else if c == '[' {
            let mut j = i;
            if j < n && pat[j] == '!' {
                j += 1;
            }
            if j < n && pat[j] == ']' {
                j += 1;
            }
            while j < n && pat[j] != ']' {
                j += 1;
            }
            if j >= n {
                out.push_str("\\[");
                continue;
            }
            let mut stuff: Vec<char>;
            if !pat[i..j].contains(&'-') {
                stuff = Vec::new();
                for &s in &pat[i..j] {
                    if s == '\\' {
                        stuff.push('\\');
                    }
                    stuff.push(s);
                }
            } else {
                let mut chunks: Vec<Vec<char>> = Vec::new();
                let mut k = if pat[i] == '!' { i + 2 } else { i + 1 };
                loop {
                    let found = (k..j).find(|&p| pat[p] == '-');
                    let Some(found) = found else { break };
                    chunks.push(pat[i..found].to_vec());
                    i = found + 1;
                    k = found + 3;
                }
                let chunk = pat[i.min(j)..j].to_vec();
                if !chunk.is_empty() {
                    chunks.push(chunk);
                } else {
                    chunks.last_mut().expect("a chunk before a hyphen").push('-');
                }
                // Empty ranges removed, as fnmatch does (invalid in a regex).
                let mut k = chunks.len() - 1;
                while k > 0 {
                    let (before, after) = (&chunks[k - 1], &chunks[k]);
                    let (Some(&last), Some(&first)) = (before.last(), after.first()) else {
                        // Python's chunks[k-1][-1] raises on an empty chunk: so does this.
                        return Err(format!("cannot translate the glob {glob:?}"));
                    };
                    if last > first {
                        let mut merged = before[..before.len() - 1].to_vec();
                        merged.extend_from_slice(&after[1..]);
                        chunks[k - 1] = merged;
                        chunks.remove(k);
                    }
                    k -= 1;
                }
                stuff = Vec::new();
                for (index, chunk) in chunks.iter().enumerate() {
                    if index > 0 {
                        stuff.push('-');
                    }
                    for &s in chunk {
                        if s == '\\' || s == '-' {
                            stuff.push('\\');
                        }
                        stuff.push(s);
                    }
                }
            }
            // Set operations escaped (&&, ~~, ||): a backslash before each of & ~ |.
            let mut escaped = Vec::with_capacity(stuff.len());
            for s in stuff {
                if matches!(s, '&' | '~' | '|') {
                    escaped.push('\\');
                }
                escaped.push(s);
            }
            let mut stuff = escaped;
            i = j + 1;
            if stuff.is_empty() {
                out.push_str("[^\\x{0}-\\x{10ffff}]"); // an empty set: never matches
            } else if stuff == ['!'] {
                out.push('.');
            } else {
                if stuff[0] == '!' {
                    stuff[0] = '^';
                } else if stuff[0] == '^' || stuff[0] == '[' {
                    stuff.insert(0, '\\');
                }
                out.push_str(&class_regex(&stuff)?);
            }
        } else {
            out.push_str(&format!("\\x{{{:x}}}", c as u32));
        }
    }
    Ok(out)
}

/// Globs as one anchored regex; None for no globs (the step takes none of that kind).
pub fn globs_regex(globs: &[String]) -> Result<Option<Regex>, String> {
    if globs.is_empty() {
        return Ok(None);
    }
    let bodies = globs
        .iter()
        .map(|g| glob_regex(g).map(|body| format!("(?:{body})")))
        .collect::<Result<Vec<_>, _>>()?;
    let pattern = format!("(?s)^(?:{})$", bodies.join("|"));
    regex::RegexBuilder::new(&pattern)
        .size_limit(64 << 20)
        .build()
        .map(Some)
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Groups and windows.

pub struct GroupStats {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    sketch: Option<Box<DDSketch>>,
}

impl GroupStats {
    fn new(quantiles: bool) -> Self {
        GroupStats {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: 0.0,
            sketch: quantiles.then(|| Box::new(DDSketch::new(sketch_config()))),
        }
    }

    fn add(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        if value < self.min {
            self.min = value;
        }
        if value > self.max {
            self.max = value;
        }
        self.last = value;
        if let Some(sketch) = &mut self.sketch {
            sketch.add(value);
        }
    }

    /// The quantile q, within [min, max] (where the exact one is too: never further from it).
    pub fn quantile(&self, q: f64) -> f64 {
        let estimate = self
            .sketch
            .as_ref()
            .and_then(|s| s.quantile(q).ok().flatten())
            .unwrap_or(f64::NAN);
        estimate.max(self.min).min(self.max)
    }
}

/// A group's key: source, name and (tag, value) pairs.
pub struct GroupKey {
    pub source: String,
    pub name: String,
    pub tags: Vec<(String, String)>,
}

/// The bytes a group is looked up by: each part length-prefixed, so no two keys share them.
fn encode_key(out: &mut Vec<u8>, source: &str, name: &str, tags: &[(Cow<str>, Cow<str>)]) {
    out.clear();
    for part in [source, name] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    for (key, value) in tags {
        for part in [key.as_ref(), value.as_ref()] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
}

struct Window {
    start: f64,
    index: HashMap<Vec<u8>, usize>,
    groups: Vec<(GroupKey, GroupStats)>, // in order of first point
}

/// A closed group's window, as `sidecar.aggregation.ClosedGroup` holds it.
pub struct Closed {
    pub key: GroupKey,
    pub start: f64,
    pub end: f64,
    pub stats: GroupStats,
    pub partial: bool,
}

#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub points: u64,
    pub late: u64,
    pub early: u64,
    pub dropped: u64,
    pub overflow: u64,
}

/// How a step names its groups: all tags, or the ones `by` names (in its order).
pub enum By {
    AllTags,
    Tags(Vec<String>),
}

pub struct Windows {
    pub window: f64,
    drop_late: bool,
    max_groups: usize,
    quantiles: bool,
    pub closed_until: f64,
    open: Vec<Window>,
    pub counts: Counts,
    metrics: Option<Regex>,
    spans: Option<Regex>,
    by: By,
    // (source, name) -> the last unit, forgetting all when full (sidecar.bounded.ForgetfulCache).
    units: HashMap<Vec<u8>, String>,
    units_limit: usize,
    key_buffer: Vec<u8>,
    members: Members,
    tag_members: Vec<Member>,
}

/// What `take` did with a batch's lines.
pub enum Taken {
    /// Every line from the start on was read.
    All,
    /// The line at this index could not be read here: the Python step reads it.
    StoppedAt(usize),
}

impl Windows {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        window: f64,
        drop_late: bool,
        max_groups: usize,
        quantiles: bool,
        now: f64,
        metrics: Option<Regex>,
        spans: Option<Regex>,
        by: By,
    ) -> Self {
        let mut windows = Windows {
            window,
            drop_late,
            max_groups,
            quantiles,
            closed_until: 0.0,
            open: Vec::new(),
            counts: Counts::default(),
            metrics,
            spans,
            by,
            units: HashMap::new(),
            units_limit: max_groups,
            key_buffer: Vec::with_capacity(128),
            members: Members::new(),
            tag_members: Vec::with_capacity(16),
        };
        windows.closed_until = windows.start_of(now);
        windows
    }

    pub fn start_of(&self, moment: f64) -> f64 {
        (moment / self.window).floor() * self.window
    }

    pub fn next_close(&self) -> f64 {
        self.closed_until + self.window
    }

    pub fn groups(&self) -> usize {
        self.open.iter().map(|w| w.groups.len()).sum()
    }

    pub fn remember_unit(&mut self, source: &str, name: &str, unit: &str) {
        encode_key(&mut self.key_buffer, source, name, &[]);
        if self.units.len() >= self.units_limit {
            self.units.clear();
        } else if self.units.get(self.key_buffer.as_slice()).map(String::as_str) == Some(unit) {
            return;
        }
        self.units.insert(self.key_buffer.clone(), unit.to_owned());
    }

    pub fn unit(&mut self, source: &str, name: &str) -> Option<String> {
        encode_key(&mut self.key_buffer, source, name, &[]);
        self.units.get(self.key_buffer.as_slice()).cloned()
    }

    /// Count one point; false when it was dropped (late or early under `drop`).
    pub fn add(
        &mut self,
        source: &str,
        name: &str,
        tags: &[(Cow<str>, Cow<str>)],
        timestamp: f64,
        value: f64,
        now: f64,
    ) -> bool {
        self.counts.points += 1;
        let mut start = self.start_of(timestamp);
        let current = self.start_of(now).max(self.closed_until);
        if start < self.closed_until || start > current + self.window {
            if start < self.closed_until {
                self.counts.late += 1;
            } else {
                self.counts.early += 1;
            }
            if self.drop_late {
                self.counts.dropped += 1;
                return false;
            }
            start = current;
        }
        let position = match self.open.iter().position(|w| w.start == start) {
            Some(position) => position,
            None => {
                self.open.push(Window {
                    start,
                    index: HashMap::new(),
                    groups: Vec::new(),
                });
                self.open.len() - 1
            }
        };
        let window = &mut self.open[position];
        encode_key(&mut self.key_buffer, source, name, tags);
        let found = match window.index.get(self.key_buffer.as_slice()) {
            Some(&found) => found,
            None => {
                let mut key = GroupKey {
                    source: source.to_owned(),
                    name: name.to_owned(),
                    tags: tags
                        .iter()
                        .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
                        .collect(),
                };
                let mut found = None;
                if window.groups.len() >= self.max_groups && name != OVERFLOW {
                    self.counts.overflow += 1;
                    encode_key(&mut self.key_buffer, source, OVERFLOW, &[]);
                    key = GroupKey {
                        source: source.to_owned(),
                        name: OVERFLOW.to_owned(),
                        tags: Vec::new(),
                    };
                    found = window.index.get(self.key_buffer.as_slice()).copied();
                }
                match found {
                    Some(found) => found,
                    None => {
                        window.groups.push((key, GroupStats::new(self.quantiles)));
                        window
                            .index
                            .insert(self.key_buffer.clone(), window.groups.len() - 1);
                        window.groups.len() - 1
                    }
                }
            }
        };
        window.groups[found].1.add(value);
        true
    }

    /// The windows that ended at or before `now`, closed, oldest first.
    pub fn close(&mut self, now: f64) -> Vec<Closed> {
        let boundary = self.start_of(now);
        if boundary <= self.closed_until {
            return Vec::new();
        }
        self.closed_until = boundary;
        let window = self.window;
        self.take_windows(|start| start + window <= boundary, now)
    }

    /// Every open window, closed; those not yet ended are partial.
    pub fn flush(&mut self, now: f64) -> Vec<Closed> {
        self.closed_until = self.closed_until.max(self.start_of(now));
        self.take_windows(|_| true, now)
    }

    fn take_windows(&mut self, chosen: impl Fn(f64) -> bool, now: f64) -> Vec<Closed> {
        let (mut taken, kept): (Vec<Window>, Vec<Window>) =
            std::mem::take(&mut self.open).into_iter().partition(|w| chosen(w.start));
        self.open = kept;
        taken.sort_by(|a, b| a.start.total_cmp(&b.start));
        let mut closed = Vec::new();
        for window in taken {
            let end = window.start + self.window;
            for (key, stats) in window.groups {
                closed.push(Closed {
                    key,
                    start: window.start,
                    end,
                    stats,
                    partial: end > now,
                });
            }
        }
        closed
    }

    /// Add the points among `lines[from..]`: metric points whose name matches the metric globs
    /// and that are not aggregates themselves, and the ends of spans whose name matches the span
    /// globs (`NAME.duration_ms` by status); `taken` hears each point's index.
    pub fn take<'a>(
        &mut self,
        source: &str,
        lines: impl Iterator<Item = &'a [u8]>,
        from: usize,
        now: f64,
        mut taken: impl FnMut(usize),
    ) -> Taken {
        for (index, line) in lines.enumerate().skip(from) {
            match self.take_line(source, line, now) {
                Some(true) => taken(index),
                Some(false) => {}
                None => return Taken::StoppedAt(index),
            }
        }
        Taken::All
    }

    /// Some(true) when the line was a point of this step (added, or dropped as late), Some(false)
    /// when not, None when this code cannot read it.
    fn take_line(&mut self, source: &str, line: &[u8], now: f64) -> Option<bool> {
        let mut parser = Parser::new(line, 0, u32::MAX);
        parser.skip_whitespace();
        self.members.parse(&mut parser).ok()?;
        let members = &self.members;
        let kind = plain_text(find(line, &members.top, b"type")?).ok()?;
        let kind = &line[kind.start..kind.end];
        let data = &members.data;
        let text = |name: &[u8]| text_in(line, data, name);
        let (name, tags, value, unit) = if kind == b"metric" {
            let Some(metrics) = &self.metrics else {
                return Some(false);
            };
            if find(line, data, b"aggregation").is_some() {
                return Some(false);
            }
            let name = text(b"name")??;
            if !metrics.is_match(&name) {
                return Some(false);
            }
            let value = number(line, find(line, data, b"value")?)?;
            let unit = text(b"unit")?.filter(|u| !u.is_empty());
            let mut tags: Vec<(Cow<str>, Cow<str>)> = Vec::new();
            match find(line, data, b"tags") {
                None => {}
                Some(v) if v.kind == ValueKind::Null => {}
                Some(v) if v.kind == ValueKind::Object => {
                    members_of(line, v.whole.start, &mut self.tag_members).ok()?;
                    let tag_text = |member: &Member| -> Option<(Cow<'_, str>, Cow<'_, str>)> {
                        let key = std::str::from_utf8(&line[member.key.start..member.key.end]).ok()?;
                        Some((Cow::Borrowed(key), text_cow(line, &member.value)?))
                    };
                    match &self.by {
                        By::AllTags => {
                            for member in &self.tag_members {
                                tags.push(tag_text(member)?);
                            }
                            tags.sort_by(|a, b| a.0.cmp(&b.0));
                        }
                        By::Tags(names) => {
                            for wanted in names {
                                if let Some(member) = self.tag_members.iter().find(|m| {
                                    &line[m.key.start..m.key.end] == wanted.as_bytes()
                                }) {
                                    tags.push(tag_text(member)?);
                                }
                            }
                        }
                    }
                }
                Some(_) => return None,
            }
            (name, tags, value, unit)
        } else if kind == b"span" {
            let Some(spans) = &self.spans else {
                return Some(false);
            };
            if text(b"phase")?.as_deref() != Some("end") {
                return Some(false);
            }
            let name = text(b"name")??;
            if !spans.is_match(&name) {
                return Some(false);
            }
            let status = text(b"status")??;
            let value = number(line, find(line, data, b"duration_ms")?)?;
            let name: Cow<str> = Cow::Owned(format!("{name}{SPAN_SUFFIX}"));
            (name, vec![(Cow::Borrowed("status"), status)], value, None)
        } else {
            return Some(false);
        };
        let stamp = plain_text(find(line, &members.top, b"timestamp")?).ok()?;
        let stamped = canonical_epoch_ms(&line[stamp.start..stamp.end])?;
        if let Some(unit) = &unit {
            self.remember_unit(source, &name, unit);
        }
        self.add(source, &name, &tags, stamped as f64 / 1000.0, value, now);
        Some(true)
    }
}

/// A string member of `data`: Some(None) when absent or null, None when not a string.
fn text_in<'a>(line: &'a [u8], data: &[Member], name: &[u8]) -> Option<Option<Cow<'a, str>>> {
    match find(line, data, name) {
        None => Some(None),
        Some(value) if value.kind == ValueKind::Null => Some(None),
        Some(value) => Some(Some(text_cow(line, value)?)),
    }
}

fn text_cow<'a>(line: &'a [u8], value: &crate::json::Value) -> Option<Cow<'a, str>> {
    let text = text_of(value).ok()?;
    Some(if text.escaped {
        Cow::Owned(text_string(line, text))
    } else {
        Cow::Borrowed(std::str::from_utf8(&line[text.range.start..text.range.end]).ok()?)
    })
}

/// A JSON number as `float()` of orjson's reading: an integer within 64 bits converted (so -0
/// is 0.0), a float parsed; None for any other (Python's to read).
fn number(line: &[u8], value: &crate::json::Value) -> Option<f64> {
    let span = number_of(value).ok()?;
    let text = std::str::from_utf8(&line[span.start..span.end]).ok()?;
    if !text.contains(['.', 'e', 'E']) {
        if let Ok(integer) = text.parse::<i64>() {
            return Some(integer as f64);
        }
        return text.parse::<u64>().ok().map(|integer| integer as f64);
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}
