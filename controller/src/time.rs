//! Wall-clock helpers: the wire and the store use Unix milliseconds (UTC).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Civil UTC date and time of a Unix-ms timestamp: (year, month, day, hour, minute, second).
///
/// Howard Hinnant's days-from-civil inverse, so no calendar crate is needed
/// for incident ids and reports.
pub fn civil(ms: u64) -> (i64, u32, u32, u32, u32, u32) {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

/// RFC 3339 UTC rendering (`2026-11-22T14:03:12Z`); empty for 0.
pub fn rfc3339(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    let (y, mo, d, h, mi, s) = civil(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// RFC 3339 UTC rendering with milliseconds (`2026-11-22T14:03:12.345Z`),
/// for evidence capture times; empty for 0.
pub fn rfc3339_ms(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    let (y, mo, d, h, mi, s) = civil(ms);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_matches_known_dates() {
        assert_eq!(rfc3339(0), "");
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01Z");
        // 2026-11-22T14:03:12Z
        assert_eq!(rfc3339(1_795_356_192_000), "2026-11-22T14:03:12Z");
        // Leap day.
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_ms(1_795_356_192_045), "2026-11-22T14:03:12.045Z");
    }
}
