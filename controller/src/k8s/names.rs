//! Kubernetes names and label values built from pod names and incident ids.
use sha2::{Digest, Sha256};

use super::{Error, Result};

/// Longest object name (DNS subdomain, RFC 1123).
const MAX_NAME: usize = 253;

/// `prefix` + `base` + `suffix` as an object name: lowercase, only
/// `[a-z0-9.-]`, and when too long the middle is cut and 8 hex digits of a
/// hash of the whole keep it unique.
pub(crate) fn object_name(prefix: &str, base: &str, suffix: &str) -> String {
    let clean: String = format!("{prefix}{base}{suffix}")
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.len() <= MAX_NAME {
        return clean;
    }
    let hash = Sha256::digest(clean.as_bytes());
    let tag: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    // Cut, then trim what would leave an empty or non-alphanumeric edge in
    // the last dot-separated part.
    let head = clean[..MAX_NAME - 9].trim_end_matches(['-', '.']);
    format!("{head}-{tag}")
}

/// Checks that `id` can be a label value (the quarantine label carries it).
pub(crate) fn check_label_value(what: &'static str, id: &str) -> Result<()> {
    let bad = |problem| {
        Err(Error::Invalid {
            what,
            value: id.to_owned(),
            problem,
        })
    };
    if id.is_empty() {
        return bad("is empty");
    }
    if id.len() > 63 {
        return bad("is longer than a label value's 63 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("may only hold letters, digits, '-', '_' and '.'");
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge(id.bytes().next()) || !edge(id.bytes().last()) {
        return bad("must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks a namespace or pod name enough to build a URL path from it.
pub(crate) fn check_object_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what,
            value: name.to_owned(),
            problem: "is not a Kubernetes object name (lowercase letters, digits, '-', '.')",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_pass_through_lowercased() {
        assert_eq!(
            object_name("exfilguard-lockdown-", "web-7c9-abcde", ""),
            "exfilguard-lockdown-web-7c9-abcde"
        );
        assert_eq!(
            object_name("web.", "EXFIL-20261123-111500-ab12", ".lockdown"),
            "web.exfil-20261123-111500-ab12.lockdown"
        );
        assert_eq!(object_name("", "a_b", ""), "a-b");
    }

    #[test]
    fn long_names_are_cut_and_tagged() {
        let long = "a".repeat(250);
        let n = object_name("exfilguard-lockdown-", &long, "");
        assert_eq!(n.len(), 253);
        assert!(n.ends_with(|c: char| c.is_ascii_hexdigit()));
        let other = object_name("exfilguard-lockdown-", &format!("{long}b"), "");
        assert_ne!(n, other, "different pods, different names");
        let dotted = format!("{}.{}", "a".repeat(232), "b".repeat(30));
        let n = object_name("exfilguard-lockdown-", &dotted, "");
        assert!(!n.contains(".-"), "{n}");
    }

    #[test]
    fn label_values() {
        check_label_value("incident id", "EXFIL-20261123-111500-ab12").unwrap();
        for bad in ["", "-a", "a-", "a b", "é", &"a".repeat(64)] {
            let e = check_label_value("incident id", bad).unwrap_err();
            assert!(e.to_string().contains("incident id"), "{e}");
        }
    }

    #[test]
    fn object_names() {
        check_object_name("pod name", "web-0").unwrap();
        for bad in ["", "Web", "a/b", "a?b", "a b"] {
            assert!(check_object_name("pod name", bad).is_err(), "{bad}");
        }
    }
}
