//! The protocol's constants the native code uses: copies of `sidecar/constants.py`, exported by
//! `constants()` (python.rs) so that tests/test_native.py can check they are the same.

pub const MESSAGE_TYPES: [&str; 5] = ["event", "metric", "progress", "resource", "span"];
pub const LEVELS: [&str; 5] = ["debug", "info", "warning", "error", "critical"];
/// Spellings read as the level they name (after lower-casing).
pub const LEVEL_ALIASES: [(&str, &str); 4] = [
    ("warn", "warning"),
    ("fatal", "critical"),
    ("crit", "critical"),
    ("err", "error"),
];
/// Levels that make the batcher flush at once.
pub const URGENT_LEVELS: [&str; 2] = ["error", "critical"];
/// Levels the live view counts as errors.
pub const ERROR_LEVELS: [&str; 2] = ["error", "critical"];
pub const MAX_SOURCE_LENGTH: usize = 200;
pub const TRACE_ID_LENGTH: usize = 32;
pub const SPAN_ID_LENGTH: usize = 16;
/// Epoch numbers at or above this are milliseconds.
pub const EPOCH_MS_THRESHOLD: u64 = 100_000_000_000;
/// The latest events the live view keeps per source of a job or trace.
pub const KEY_EVENTS_PER_SOURCE: usize = 8;

/// For each of `LEVELS`, whether it is one of `levels`.
pub fn level_table(levels: &[&str]) -> [bool; LEVELS.len()] {
    LEVELS.map(|level| levels.contains(&level))
}
