//! Timestamps: the canonical form the sidecar writes, and the RFC 3339 and epoch forms the
//! Python path (`sidecar.message.normalise_timestamp`) turns into it, computed alike.

use crate::constants::EPOCH_MS_THRESHOLD;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`: the one form the sidecar writes.
pub type Timestamp = [u8; 24];

/// RFC 3339 with a `T`, seconds, any fraction of at least one digit, and `Z` or `±HH:MM`, as the
/// canonical `YYYY-MM-DDTHH:MM:SS.mmmZ` (the fraction cut to milliseconds, as Python's
/// `fromisoformat` and `format_timestamp` do); None for any other form, an impossible date, or
/// one that the offset moves out of the years 1-9999 (all left to Python, which says why).
pub fn normalise_rfc3339(text: &[u8]) -> Option<Timestamp> {
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
fn canonical_timestamp(seconds: i64, millis: i64) -> Option<Timestamp> {
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
/// from `EPOCH_MS_THRESHOLD` on, through `datetime.fromtimestamp`'s float arithmetic, cut to
/// milliseconds. None where Python refuses it, or might compute it differently (integers from
/// 2**53 on).
pub fn normalise_epoch(text: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(text).ok()?;
    let (seconds, micros) = if text.contains(['.', 'e', 'E']) {
        let value: f64 = text.parse().ok()?;
        if !value.is_finite() {
            return None;
        }
        split_seconds(if value.abs() >= EPOCH_MS_THRESHOLD as f64 {
            value / 1000.0
        } else {
            value
        })?
    } else {
        let value: i64 = text.parse().ok()?;
        if value.unsigned_abs() < EPOCH_MS_THRESHOLD {
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

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the one form the sidecar writes, and a real time: the shape
/// alone admits year 0 and month 13, which no backend stores.
pub fn is_canonical_timestamp(text: &[u8]) -> bool {
    const PATTERN: &Timestamp = b"0000-00-00T00:00:00.000Z";
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

/// Milliseconds since the epoch of a canonical timestamp (`is_canonical_timestamp`), as
/// `sidecar.message.epoch_ms` reads it; None for any other text.
pub fn canonical_epoch_ms(text: &[u8]) -> Option<i64> {
    if !is_canonical_timestamp(text) {
        return None;
    }
    let number = |start: usize, end: usize| {
        text[start..end]
            .iter()
            .fold(0i64, |n, c| n * 10 + i64::from(c - b'0'))
    };
    let days = days_from_civil(number(0, 4), number(5, 7), number(8, 10));
    let seconds = days * 86_400 + number(11, 13) * 3_600 + number(14, 16) * 60 + number(17, 19);
    Some(seconds * 1_000 + number(20, 23))
}
