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
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use foldhash::fast::RandomState;

use regex::Regex;
use sketches_ddsketch::{Config, DDSketch};

use crate::enrich::timestamp_of;
use crate::json::{
    find, members_of, number_of, plain_text, text_of, text_string, Member, Members, Parser, Range,
    Text, ValueKind,
};
use crate::time::{canonical_epoch_ms, Timestamp};
use crate::validate::{Message, MessageType};

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
            ClassItem::Range(low, high) => {
                out.push_str(&format!("\\x{{{:x}}}-\\x{{{:x}}}", low as u32, high as u32))
            }
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
                    chunks
                        .last_mut()
                        .expect("a chunk before a hyphen")
                        .push('-');
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
    unit: Option<SmallBytes<22>>, // the last one a point gave (UTF-8)
    sketch: Option<Box<DDSketch>>,
    // Values not yet in the sketch: added PENDING at a time, so that its bins are reached once
    // for several points rather than once a point (they are seldom in the CPU's cache).
    pending: [f64; PENDING],
    pending_count: u8,
}

const PENDING: usize = 16;

impl GroupStats {
    fn new(quantiles: bool) -> Self {
        GroupStats {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: 0.0,
            unit: None,
            sketch: quantiles.then(|| Box::new(DDSketch::new(sketch_config()))),
            pending: [0.0; PENDING],
            pending_count: 0,
        }
    }

    fn add(&mut self, value: f64, unit: Option<&str>) {
        if let Some(unit) = unit.filter(|u| !u.is_empty()) {
            if self.unit.as_ref().map(SmallBytes::bytes) != Some(unit.as_bytes()) {
                self.unit = Some(SmallBytes::of(unit.as_bytes()));
            }
        }
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
            self.pending[self.pending_count as usize] = value;
            self.pending_count += 1;
            if self.pending_count as usize == PENDING {
                for value in self.pending {
                    sketch.add(value);
                }
                self.pending_count = 0;
            }
        }
    }

    /// The last unit a point gave.
    pub fn unit(&self) -> Option<&str> {
        // Bytes of a str, whole: always UTF-8.
        self.unit
            .as_ref()
            .and_then(|u| std::str::from_utf8(u.bytes()).ok())
    }

    /// Add the pending values to the sketch (before its quantiles are read).
    fn settle(&mut self) {
        if let Some(sketch) = &mut self.sketch {
            for &value in &self.pending[..self.pending_count as usize] {
                sketch.add(value);
            }
        }
        self.pending_count = 0;
    }

    /// The quantile q, within [min, max] (where the exact one is too: never further from it).
    /// Of a settled group only (`Windows` hands out closed groups settled).
    pub fn quantile(&self, q: f64) -> f64 {
        debug_assert!(self.pending_count == 0);
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

/// The bytes a message's group-making parts are remembered by: the kind (`m` metric, `s`
/// span), as sent the name and the tags object (a metric's) or the status (a span's), and the
/// source. The parts sent are JSON the parser took, which holds no NUL byte (a control byte in
/// a string must be escaped), so a NUL after each tells them apart with the source last, and
/// the key stays short. Equal parts as sent name one group; a group may have several.
fn sent_key(out: &mut Vec<u8>, source: &str, kind: u8, name: &[u8], other: &[u8]) {
    out.clear();
    out.push(kind);
    out.extend_from_slice(name);
    out.push(0);
    out.extend_from_slice(other);
    out.push(0);
    out.extend_from_slice(source.as_bytes());
}

struct Window {
    start: f64,
    index: HashMap<Vec<u8>, usize, RandomState>,
    groups: Vec<(GroupKey, GroupStats)>, // in order of first point
    // A message's group-making parts as sent -> its group: met again, a point skips reading
    // its tags and naming its group.
    sent: SentMemo,
}

/// Sent keys (see `sent_key`) -> (group, folded into the overflow group). The table holds 16
/// bytes a key (its hash -> where its bytes are, its group), not the key: a table that small
/// stays in the CPU's cache where one of whole keys did not (its slot was the one miss of a
/// point met before), and the keys' bytes lie in the order first met, which is about the order
/// points come in. Two keys of one hash: the second is not remembered. The hashes are the
/// step's `memo_hasher`'s, the same for all its windows.
struct SentMemo {
    slots: HashMap<u64, (u32, u32), BuildHasherDefault<Prehashed>>, // hash -> (at, group | OVERFLOWED)
    bytes: Vec<u8>, // each key as its length (u16, little-endian) and its bytes, at its slot's `at`
}

const OVERFLOWED: u32 = 1 << 31;

impl SentMemo {
    fn new() -> Self {
        SentMemo {
            slots: HashMap::default(),
            bytes: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Reach for the slot of a key of this hash, so that it is in the CPU's cache when the key
    /// is looked up (see `Windows::warm`).
    fn touch(&self, hash: u64) {
        std::hint::black_box(self.slots.get(&hash));
    }

    fn get(&self, hash: u64, key: &[u8]) -> Option<(usize, bool)> {
        let &(at, group) = self.slots.get(&hash)?;
        let at = at as usize;
        let length = u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]]) as usize;
        (&self.bytes[at + 2..at + 2 + length] == key)
            .then_some(((group & !OVERFLOWED) as usize, group & OVERFLOWED != 0))
    }

    /// Remember `key` (at most MAX_SENT_KEY bytes), unless its hash is taken or the memo's
    /// offsets or group numbers would not fit (it is a shortcut: a key left out is read whole).
    fn insert(&mut self, hash: u64, key: &[u8], group: usize, overflowed: bool) {
        debug_assert!(key.len() <= MAX_SENT_KEY);
        let at = self.bytes.len();
        if group >= OVERFLOWED as usize || at + 2 + key.len() > u32::MAX as usize {
            return;
        }
        if let Entry::Vacant(slot) = self.slots.entry(hash) {
            slot.insert((
                at as u32,
                group as u32 | if overflowed { OVERFLOWED } else { 0 },
            ));
            self.bytes
                .extend_from_slice(&(key.len() as u16).to_le_bytes());
            self.bytes.extend_from_slice(key);
        }
    }
}

/// The hasher of a table keyed by hashes already made: the key is its own hash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys come here (through write_u64); any other is folded in all the same.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ byte as u64;
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// Bytes held in place when at most N (most units are short), else on the heap: reading them
/// then costs no reach for a heap copy that is seldom in the CPU's cache (the group already is).
enum SmallBytes<const N: usize> {
    Inline(u8, [u8; N]),
    Heap(Box<[u8]>),
}

impl<const N: usize> SmallBytes<N> {
    fn of(bytes: &[u8]) -> Self {
        if bytes.len() <= N && N <= u8::MAX as usize {
            let mut inline = [0; N];
            inline[..bytes.len()].copy_from_slice(bytes);
            SmallBytes::Inline(bytes.len() as u8, inline)
        } else {
            SmallBytes::Heap(bytes.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            SmallBytes::Inline(length, bytes) => &bytes[..*length as usize],
            SmallBytes::Heap(bytes) => bytes,
        }
    }
}

impl Window {
    fn new(start: f64) -> Self {
        Window {
            start,
            index: HashMap::default(),
            groups: Vec::new(),
            sent: SentMemo::new(),
        }
    }
}

/// How many points ahead `take_messages` looks up the memo's slots (see `Windows::warm`).
const WARM_AHEAD: usize = 8;

/// A sent key longer than this is not remembered (a message's tags may be long).
pub const MAX_SENT_KEY: usize = 512;

/// How many sent keys a window remembers: a group may be sent several ways (its tags in
/// another order, tags `by` leaves out), and the overflow group's are many.
pub fn sent_limit(max_groups: usize) -> usize {
    2 * max_groups + 64
}

/// Where a point goes against the step's windows.
#[derive(Clone, Copy, PartialEq)]
enum Timeliness {
    OnTime,
    Late,  // stamped in a window already closed
    Early, // stamped more than a window ahead
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
    key_buffer: Vec<u8>,
    sent_buffer: Vec<u8>,
    warm_buffer: Vec<u8>,
    warm_hashes: [Option<u64>; WARM_AHEAD],
    memo_hasher: RandomState,             // the hashes of the windows' memos
    last_window: usize, // in `open`, the window the last point went to (where `warm` looks)
    last_stamp: Option<(Timestamp, f64)>, // the latest timestamp read, in seconds
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
            key_buffer: Vec::with_capacity(128),
            sent_buffer: Vec::with_capacity(128),
            warm_buffer: Vec::with_capacity(128),
            warm_hashes: [None; WARM_AHEAD],
            memo_hasher: RandomState::default(),
            last_window: 0,
            last_stamp: None,
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

    /// Count one point; false when it was dropped (late or early under `drop`).
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        source: &str,
        name: &str,
        tags: &[(Cow<str>, Cow<str>)],
        timestamp: f64,
        value: f64,
        unit: Option<&str>,
        now: f64,
    ) -> bool {
        self.add_placed(source, name, tags, timestamp, value, unit, now)
            .is_some()
    }

    /// `add`, telling where the point went: (its window, its group there, folded into the
    /// overflow group); None when it was dropped.
    #[allow(clippy::too_many_arguments)]
    fn add_placed(
        &mut self,
        source: &str,
        name: &str,
        tags: &[(Cow<str>, Cow<str>)],
        timestamp: f64,
        value: f64,
        unit: Option<&str>,
        now: f64,
    ) -> Option<(usize, usize, bool)> {
        let (start, timeliness) = self.place(timestamp, now);
        if !self.count(timeliness) {
            return None;
        }
        let position = match self.open.iter().position(|w| w.start == start) {
            Some(position) => position,
            None => {
                self.open.push(Window::new(start));
                self.open.len() - 1
            }
        };
        let window = &mut self.open[position];
        encode_key(&mut self.key_buffer, source, name, tags);
        let mut overflowed = false;
        let found = match window.index.get(self.key_buffer.as_slice()) {
            Some(&found) => found,
            None => {
                let mut key = None;
                let mut found = None;
                if window.groups.len() >= self.max_groups && name != OVERFLOW {
                    overflowed = true;
                    encode_key(&mut self.key_buffer, source, OVERFLOW, &[]);
                    found = window.index.get(self.key_buffer.as_slice()).copied();
                    key = Some(GroupKey {
                        source: source.to_owned(),
                        name: OVERFLOW.to_owned(),
                        tags: Vec::new(),
                    });
                }
                match found {
                    Some(found) => found,
                    None => {
                        let key = key.unwrap_or_else(|| GroupKey {
                            source: source.to_owned(),
                            name: name.to_owned(),
                            tags: tags
                                .iter()
                                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
                                .collect(),
                        });
                        window.groups.push((key, GroupStats::new(self.quantiles)));
                        window
                            .index
                            .insert(self.key_buffer.clone(), window.groups.len() - 1);
                        window.groups.len() - 1
                    }
                }
            }
        };
        if overflowed {
            self.counts.overflow += 1;
        }
        // The overflow group's points are of many metrics: it has no unit.
        let unit = if overflowed { None } else { unit };
        window.groups[found].1.add(value, unit);
        Some((position, found, overflowed))
    }

    /// The start of the window a point stamped `timestamp` goes to at `now`: its own, or (late
    /// or early) the current one.
    fn place(&self, timestamp: f64, now: f64) -> (f64, Timeliness) {
        let start = self.start_of(timestamp);
        let current = self.start_of(now).max(self.closed_until);
        if start < self.closed_until {
            (current, Timeliness::Late)
        } else if start > current + self.window {
            (current, Timeliness::Early)
        } else {
            (start, Timeliness::OnTime)
        }
    }

    /// Count a point of the step; false when it is dropped.
    fn count(&mut self, timeliness: Timeliness) -> bool {
        self.counts.points += 1;
        match timeliness {
            Timeliness::OnTime => return true,
            Timeliness::Late => self.counts.late += 1,
            Timeliness::Early => self.counts.early += 1,
        }
        if self.drop_late {
            self.counts.dropped += 1;
            return false;
        }
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
        let (mut taken, kept): (Vec<Window>, Vec<Window>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|w| chosen(w.start));
        self.open = kept;
        taken.sort_by(|a, b| a.start.total_cmp(&b.start));
        let mut closed = Vec::new();
        for window in taken {
            let end = window.start + self.window;
            for (key, mut stats) in window.groups {
                stats.settle();
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
            let point = match self.line_point(line) {
                Some(point) => point,
                None => return Taken::StoppedAt(index),
            };
            if let Some(point) = point {
                self.add_point(source, point, now);
                taken(index);
            }
        }
        Taken::All
    }

    /// `take` fed the decoder's record of the lines instead of the lines: `messages[numbers[i]]`
    /// is line i's message, validated in `bytes` (the chunk it came in) and received at
    /// `received`. Nothing is parsed again but a metric's tags.
    #[allow(clippy::too_many_arguments)]
    pub fn take_messages(
        &mut self,
        source: &str,
        bytes: &[u8],
        messages: &[Message],
        numbers: &[u32],
        received: &Timestamp,
        from: usize,
        now: f64,
        mut taken: impl FnMut(usize),
    ) -> Taken {
        for block in (from..numbers.len()).step_by(WARM_AHEAD) {
            let end = (block + WARM_AHEAD).min(numbers.len());
            self.warm(source, bytes, messages, &numbers[block..end]);
            for (index, &number) in numbers.iter().enumerate().take(end).skip(block) {
                let hash = self.warm_hashes[index - block];
                match self.take_message(
                    source,
                    bytes,
                    &messages[number as usize],
                    received,
                    now,
                    hash,
                ) {
                    Some(true) => taken(index),
                    Some(false) => {}
                    None => return Taken::StoppedAt(index),
                }
            }
        }
        Taken::All
    }

    /// A message's kind (`m`, `s`), name, the other part of its sent key (see `sent_key`), value
    /// and unit, if it may be a point of this step (its name is matched later); None if not.
    fn sent_parts(&self, message: &Message) -> Option<(u8, Text, Range, Range, Option<Text>)> {
        match (message.kind, message.metric, message.span_end) {
            (MessageType::Metric, Some((name, value, unit)), _)
                if self.metrics.is_some() && !message.aggregate =>
            {
                Some((b'm', name, message.tags.unwrap_or_default(), value, unit))
            }
            (MessageType::Span, _, Some((name, status, duration))) if self.spans.is_some() => {
                Some((b's', name, status.range, duration, None))
            }
            _ => None,
        }
    }

    /// Look up, in the window the last point went to, the memo slots of the points among
    /// `numbers` (the next few): one after the other these lookups are independent, so their
    /// cache misses overlap, where in `take_message` each would wait alone.
    /// Their sent keys' hashes are kept in `warm_hashes` (by place among `numbers`) for
    /// `take_message`.
    fn warm(&mut self, source: &str, bytes: &[u8], messages: &[Message], numbers: &[u32]) {
        self.warm_hashes = [None; WARM_AHEAD];
        let Some(window) = self.open.get(self.last_window) else {
            return;
        };
        for (place, &number) in numbers.iter().enumerate() {
            if let Some((kind, name, other, _, _)) = self.sent_parts(&messages[number as usize]) {
                sent_key(
                    &mut self.warm_buffer,
                    source,
                    kind,
                    &bytes[name.range.start..name.range.end],
                    &bytes[other.start..other.end],
                );
                self.warm_hashes[place] = Some(self.memo_hasher.hash_one(&self.warm_buffer));
            }
        }
        for hash in self.warm_hashes.iter().flatten() {
            window.sent.touch(*hash);
        }
    }

    /// Some(true) when the message was a point of this step (added, or dropped as late),
    /// Some(false) when not, None when this code cannot read it.
    fn take_message(
        &mut self,
        source: &str,
        bytes: &[u8],
        message: &Message,
        received: &Timestamp,
        now: f64,
        hash: Option<u64>, // the sent key's, if `warm` made it
    ) -> Option<bool> {
        // What makes its group, as sent: a point whose parts its window has met goes to their
        // group without its tags read or its name matched again.
        let Some((kind, name, other, value, unit)) = self.sent_parts(message) else {
            return Some(false);
        };
        let stamp = timestamp_of(message, received);
        let stamped = match self.last_stamp {
            // A chunk's messages often share their millisecond.
            Some((last, seconds)) if last == stamp => seconds,
            _ => {
                let seconds = canonical_epoch_ms(&stamp)? as f64 / 1000.0;
                self.last_stamp = Some((stamp, seconds));
                seconds
            }
        };
        let (start, timeliness) = self.place(stamped, now);
        sent_key(
            &mut self.sent_buffer,
            source,
            kind,
            &bytes[name.range.start..name.range.end],
            &bytes[other.start..other.end],
        );
        let hash = hash.unwrap_or_else(|| self.memo_hasher.hash_one(&self.sent_buffer));
        if let Some(window) = self.open.iter().position(|w| w.start == start) {
            self.last_window = window;
            if let Some((group, overflowed)) = self.open[window].sent.get(hash, &self.sent_buffer) {
                if timeliness == Timeliness::OnTime || !self.drop_late {
                    let value = number(bytes, value)?;
                    let unit = match unit {
                        Some(unit) => Some(text_cow_of(bytes, unit)?).filter(|u| !u.is_empty()),
                        None => None,
                    };
                    self.count(timeliness);
                    if overflowed {
                        self.counts.overflow += 1;
                    }
                    let unit = if overflowed { None } else { unit };
                    self.open[window].groups[group]
                        .1
                        .add(value, unit.as_deref());
                    return Some(true);
                }
            }
        }
        let Some(point) = self.message_point(bytes, message, received)? else {
            return Some(false);
        };
        let placed = self.add_placed(
            source,
            &point.name,
            &point.tags,
            stamped,
            point.value,
            point.unit.as_deref(),
            now,
        );
        if let Some((window, group, overflowed)) = placed {
            let window = &mut self.open[window];
            if self.sent_buffer.len() <= MAX_SENT_KEY
                && window.sent.len() < sent_limit(self.max_groups)
            {
                window
                    .sent
                    .insert(hash, &self.sent_buffer, group, overflowed);
            }
        }
        Some(true)
    }

    fn add_point(&mut self, source: &str, point: Point<'_>, now: f64) {
        let stamped = point.stamped_ms as f64 / 1000.0;
        self.add(
            source,
            &point.name,
            &point.tags,
            stamped,
            point.value,
            point.unit.as_deref(),
            now,
        );
    }

    /// Some(Some(point)) when the line is a point of this step, Some(None) when not, None when
    /// this code cannot read it.
    fn line_point<'a>(&mut self, line: &'a [u8]) -> Option<Option<Point<'a>>> {
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
                return Some(None);
            };
            if find(line, data, b"aggregation").is_some() {
                return Some(None);
            }
            let name = text(b"name")??;
            if !metrics.is_match(&name) {
                return Some(None);
            }
            let value = number(line, number_of(find(line, data, b"value")?).ok()?)?;
            let unit = text(b"unit")?.filter(|u| !u.is_empty());
            let tags = match find(line, data, b"tags") {
                None => Vec::new(),
                Some(v) if v.kind == ValueKind::Null => Vec::new(),
                Some(v) if v.kind == ValueKind::Object => {
                    tags_of(line, v.whole.start, &self.by, &mut self.tag_members)?
                }
                Some(_) => return None,
            };
            (name, tags, value, unit)
        } else if kind == b"span" {
            let Some(spans) = &self.spans else {
                return Some(None);
            };
            if text(b"phase")?.as_deref() != Some("end") {
                return Some(None);
            }
            let name = text(b"name")??;
            if !spans.is_match(&name) {
                return Some(None);
            }
            let status = text(b"status")??;
            let value = number(line, number_of(find(line, data, b"duration_ms")?).ok()?)?;
            let name: Cow<str> = Cow::Owned(format!("{name}{SPAN_SUFFIX}"));
            (name, vec![(Cow::Borrowed("status"), status)], value, None)
        } else {
            return Some(None);
        };
        let stamp = plain_text(find(line, &members.top, b"timestamp")?).ok()?;
        let stamped_ms = canonical_epoch_ms(&line[stamp.start..stamp.end])?;
        Some(Some(Point {
            name,
            tags,
            value,
            unit,
            stamped_ms,
        }))
    }

    /// `line_point` of the line the decoder validated as `message` (so its fields are known to
    /// be of their types: the metric's tags strings, a span end's duration a number).
    fn message_point<'a>(
        &mut self,
        bytes: &'a [u8],
        message: &Message,
        received: &Timestamp,
    ) -> Option<Option<Point<'a>>> {
        let (name, tags, value, unit) = match message.kind {
            MessageType::Metric => {
                let (Some(metrics), Some((name, value, unit))) = (&self.metrics, message.metric)
                else {
                    return Some(None);
                };
                if message.aggregate {
                    return Some(None);
                }
                let name = text_cow_of(bytes, name)?;
                if !metrics.is_match(&name) {
                    return Some(None);
                }
                let value = number(bytes, value)?;
                let unit = match unit {
                    Some(unit) => Some(text_cow_of(bytes, unit)?).filter(|u| !u.is_empty()),
                    None => None,
                };
                let tags = match message.tags {
                    Some(whole) => tags_of(bytes, whole.start, &self.by, &mut self.tag_members)?,
                    None => Vec::new(),
                };
                (name, tags, value, unit)
            }
            MessageType::Span => {
                let (Some(spans), Some((name, status, duration))) = (&self.spans, message.span_end)
                else {
                    return Some(None);
                };
                let name = text_cow_of(bytes, name)?;
                if !spans.is_match(&name) {
                    return Some(None);
                }
                let status = text_cow_of(bytes, status)?;
                let value = number(bytes, duration)?;
                let name: Cow<str> = Cow::Owned(format!("{name}{SPAN_SUFFIX}"));
                (name, vec![(Cow::Borrowed("status"), status)], value, None)
            }
            _ => return Some(None),
        };
        let stamped_ms = canonical_epoch_ms(&timestamp_of(message, received))?;
        Some(Some(Point {
            name,
            tags,
            value,
            unit,
            stamped_ms,
        }))
    }
}

/// One point of a step, as read from its line or its message.
struct Point<'a> {
    name: Cow<'a, str>,
    tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    value: f64,
    unit: Option<Cow<'a, str>>,
    stamped_ms: i64,
}

/// The group tags of the tags object at `at` in `bytes`: all (sorted by name), or those `by`
/// names, in its order; None when a value is not a string this code reads.
fn tags_of<'a>(
    bytes: &'a [u8],
    at: usize,
    by: &By,
    found: &mut Vec<Member>,
) -> Option<Vec<(Cow<'a, str>, Cow<'a, str>)>> {
    members_of(bytes, at, found).ok()?;
    let tag = |member: &Member| -> Option<(Cow<'a, str>, Cow<'a, str>)> {
        let key = std::str::from_utf8(&bytes[member.key.start..member.key.end]).ok()?;
        Some((Cow::Borrowed(key), text_cow(bytes, &member.value)?))
    };
    let mut tags = Vec::with_capacity(found.len());
    match by {
        By::AllTags => {
            for member in found.iter() {
                tags.push(tag(member)?);
            }
            tags.sort_by(|a, b| a.0.cmp(&b.0));
        }
        By::Tags(names) => {
            for wanted in names {
                if let Some(member) = found
                    .iter()
                    .find(|m| &bytes[m.key.start..m.key.end] == wanted.as_bytes())
                {
                    tags.push(tag(member)?);
                }
            }
        }
    }
    Some(tags)
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
    text_cow_of(line, text_of(value).ok()?)
}

fn text_cow_of(line: &[u8], text: Text) -> Option<Cow<'_, str>> {
    Some(if text.escaped {
        Cow::Owned(text_string(line, text))
    } else {
        Cow::Borrowed(std::str::from_utf8(&line[text.range.start..text.range.end]).ok()?)
    })
}

/// A JSON number as `float()` of orjson's reading: an integer within 64 bits converted (so -0
/// is 0.0), a float parsed; None for any other (Python's to read).
fn number(line: &[u8], span: Range) -> Option<f64> {
    let text = std::str::from_utf8(&line[span.start..span.end]).ok()?;
    if !text.contains(['.', 'e', 'E']) {
        if let Ok(integer) = text.parse::<i64>() {
            return Some(integer as f64);
        }
        return text.parse::<u64>().ok().map(|integer| integer as f64);
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memo_gives_a_remembered_key_its_group_and_its_overflow_mark() {
        let mut memo = SentMemo::new();
        memo.insert(1, b"m\0rows\0{}\0svc", 7, false);
        memo.insert(2, b"m\0rows\0{\"a\":\"b\"}\0svc", 8, true);
        assert_eq!(memo.get(1, b"m\0rows\0{}\0svc"), Some((7, false)));
        assert_eq!(memo.get(2, b"m\0rows\0{\"a\":\"b\"}\0svc"), Some((8, true)));
        assert_eq!(memo.get(3, b"m\0rows\0{}\0svc"), None); // another hash: not met
        assert_eq!(memo.len(), 2);
    }

    #[test]
    fn a_second_key_of_a_taken_hash_is_not_remembered_and_never_given_the_first_ones_group() {
        let mut memo = SentMemo::new();
        memo.insert(5, b"first", 1, false);
        memo.insert(5, b"second", 2, false);
        assert_eq!(memo.get(5, b"first"), Some((1, false)));
        assert_eq!(memo.get(5, b"second"), None); // read the full way, every time
        assert_eq!(memo.get(5, b"firs"), None); // the bytes are compared, not only the hash
        assert_eq!(memo.len(), 1);
    }

    #[test]
    fn a_group_number_that_does_not_fit_beside_the_mark_is_not_remembered() {
        let mut memo = SentMemo::new();
        memo.insert(9, b"key", OVERFLOWED as usize, false);
        assert_eq!(memo.get(9, b"key"), None);
        memo.insert(9, b"key", OVERFLOWED as usize - 1, true);
        assert_eq!(memo.get(9, b"key"), Some((OVERFLOWED as usize - 1, true)));
    }

    #[test]
    fn keys_of_every_length_up_to_the_limit_come_back_whole() {
        let mut memo = SentMemo::new();
        let keys: Vec<Vec<u8>> = (0..=MAX_SENT_KEY)
            .map(|n| (0..n).map(|i| (i % 251) as u8).collect())
            .collect();
        for (n, key) in keys.iter().enumerate() {
            memo.insert(n as u64, key, n, n % 2 == 0);
        }
        for (n, key) in keys.iter().enumerate() {
            assert_eq!(memo.get(n as u64, key), Some((n, n % 2 == 0)));
        }
    }
}
