//! The value syntax every exfilguard policy shares — the agent's `--policy`
//! file, the controller's `--agent-policy` file and `ExfilPolicy` objects —
//! so a value valid in one is valid in all. Errors are plain sentences for
//! the caller to prefix with the field.
use std::{net::IpAddr, time::Duration};

/// Parses `500ms`, `30s`, `10m`, `1h`, `1d` (surrounding space ignored).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Checks a domain name: labels of letters, digits, `-` and `_` (service
/// names), at most 63 bytes each and 253 in all; a trailing dot is allowed.
pub fn check_domain(d: &str) -> Result<(), String> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{d:?} is not a domain name"))
    }
}

/// Parses `address/prefix-length` (IPv4 or IPv6) into its parts.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix length)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR (address/prefix length)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok((addr, l)),
        _ => Err(format!("{s:?} has a bad prefix length (0 to {max})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("m").unwrap_err().contains("whole number"));
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("99999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn domains() {
        for ok in [
            "example.com",
            "_dmarc.example.com",
            "backup.example.",
            "a-b.c",
        ] {
            assert_eq!(check_domain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a b", "a..b", &"x".repeat(64), "a/b"] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok(("10.0.0.0".parse().unwrap(), 8))
        );
        assert_eq!(parse_cidr("2001:db8::/32").unwrap().1, 32);
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("prefix length")
        );
        assert!(parse_cidr("10.0.0.0").unwrap_err().contains("not a CIDR"));
        assert!(parse_cidr("nope/8").unwrap_err().contains("not a CIDR"));
    }
}
