//! UTC time formatting (RFC 3339) from milliseconds since 1970, and parsing of RFC 3339
//! times with any offset back to them, without a date crate.

/// Formats `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Now, in milliseconds since 1970 (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, restricted to days on or after the epoch).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date on or after it (Howard Hinnant's
/// `days_from_civil`); `None` before 1970.
pub fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses an RFC 3339 date-time (`2026-11-27T10:00:00Z`, `2026-11-27T11:00:00.250+01:00`;
/// `t`, `z` and a space for `T` are accepted as RFC 3339 allows) into milliseconds
/// since 1970 (UTC). Fractions finer than a millisecond are cut; a leap second (`:60`)
/// counts as the last millisecond of its minute. The error says what is wrong.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize, what: &str| -> Result<u64, String> {
        let part = b
            .get(from..from + len)
            .filter(|p| p.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| format!("{what} must be {len} digits at character {}", from + 1))?;
        Ok(part.iter().fold(0u64, |v, &c| v * 10 + u64::from(c - b'0')))
    };
    let sep = |at: usize, want: &[u8], what: &str| -> Result<(), String> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err(format!("expected {what} at character {}", at + 1)),
        }
    };
    let y = num(0, 4, "the year")?;
    sep(4, b"-", "'-'")?;
    let mo = num(5, 2, "the month")?;
    sep(7, b"-", "'-'")?;
    let d = num(8, 2, "the day")?;
    sep(10, b"Tt ", "'T'")?;
    let h = num(11, 2, "the hour")?;
    sep(13, b":", "':'")?;
    let mi = num(14, 2, "the minute")?;
    sep(16, b":", "':'")?;
    let sec = num(17, 2, "the second")?;
    if !(1..=12).contains(&mo) {
        return Err(format!("month {mo} is not 1..=12"));
    }
    if d == 0 || d > days_in_month(y, mo) {
        return Err(format!("day {d} is not a day of {y:04}-{mo:02}"));
    }
    if h > 23 || mi > 59 || sec > 60 {
        return Err(format!("time {h:02}:{mi:02}:{sec:02} is not a time of day"));
    }
    let mut at = 19;
    let mut ms = 0u64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                ms = ms * 10 + u64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err("a '.' must be followed by digits".into());
        }
        for _ in (at - start)..3 {
            ms *= 10;
        }
    }
    // The offset: local time = UTC + offset.
    let (sign, off_min) = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            (0i64, 0u64)
        }
        Some(&c @ (b'+' | b'-')) => {
            let oh = num(at + 1, 2, "the offset hours")?;
            sep(at + 3, b":", "':' in the offset")?;
            let om = num(at + 4, 2, "the offset minutes")?;
            if oh > 23 || om > 59 {
                return Err(format!("offset {oh:02}:{om:02} is out of range"));
            }
            at += 6;
            (if c == b'+' { 1 } else { -1 }, oh * 60 + om)
        }
        _ => {
            return Err(format!(
                "expected 'Z' or an offset like +01:00 at character {}",
                at + 1
            ));
        }
    };
    if at != b.len() {
        return Err(format!(
            "unexpected text after the time at character {}",
            at + 1
        ));
    }
    let days = days_from_civil(y, mo, d).ok_or("times before 1970 are not supported")?;
    let (sec, ms) = if sec == 60 { (59, 999) } else { (sec, ms) };
    let local_ms = ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000) + ms;
    let off_ms = off_min * 60_000;
    let utc = if sign > 0 {
        local_ms.checked_sub(off_ms)
    } else {
        local_ms.checked_add(off_ms)
    };
    utc.ok_or_else(|| "times before 1970 are not supported".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves the formatter matches known instants, leap days and year ends included.
    #[test]
    fn known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    /// Proves RFC 3339 times with offsets, fractions and the allowed variants parse to
    /// the right instant, and round-trip through the formatter.
    #[test]
    fn parses_rfc3339() {
        let t = 1_700_000_000_123;
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.123Z"), Ok(t));
        assert_eq!(parse_rfc3339("2023-11-14t22:13:20.123z"), Ok(t));
        assert_eq!(parse_rfc3339("2023-11-14 22:13:20.123Z"), Ok(t));
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20.123+01:00"), Ok(t));
        assert_eq!(parse_rfc3339("2023-11-14T17:43:20.123-04:30"), Ok(t));
        assert_eq!(parse_rfc3339("2023-11-15T00:13:20.1234567+02:00"), Ok(t));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Ok(t - 123));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.1Z"), Ok(t - 23));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), Ok(1_483_228_799_999));
        for ms in [0, 951_782_400_000, 1_735_689_599_999, 4_107_542_400_000, t] {
            assert_eq!(parse_rfc3339(&rfc3339_ms(ms)), Ok(ms), "{ms}");
        }
    }

    /// Proves garbage and impossible dates are refused with a reason, never a panic.
    #[test]
    fn refuses_bad_times() {
        for bad in [
            "",
            "now",
            "2023",
            "2023-11-14",
            "2023-11-14T22:13",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20+0100",
            "2023-11-14T22:13:20+01",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20Zjunk",
            "2023-13-14T22:13:20Z",
            "2023-02-29T22:13:20Z",
            "2023-04-31T00:00:00Z",
            "2023-11-00T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:60:00Z",
            "2023-11-14T22:13:61Z",
            "2023-11-14T22:13:20+24:00",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "２０２３-11-14T22:13:20Z",
            "2023-11-14T22:13:20\u{0}Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
