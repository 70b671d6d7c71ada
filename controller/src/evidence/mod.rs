//! Evidence preservation (the runbook's step 3): append-only items per
//! incident, each with the SHA-256 of its exact stored bytes, its capture
//! time and where it came from.
//!
//! This module holds what every store backend shares: the size bound and the
//! hashes ([`bound`]), and the items derived from the detection that opened
//! an incident ([`from_detection`]). [`capture`] adds the pod's object and
//! Events from the API server when the controller runs in a cluster.

pub mod capture;

use exfilguard_proto::v1::Detection;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::json;

/// Largest item stored; anything bigger is truncated (with a note), never
/// refused, so a capture can not fail an incident.
pub const MAX_ITEM_BYTES: usize = 256 * 1024;

/// Media type of JSON items.
pub const JSON: &str = "application/json";
/// Media type of text items.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Item kinds.
pub mod kind {
    /// A stored detection record (canonical JSON).
    pub const DETECTION: &str = "detection";
    /// The workload's identity as the agent reported it (cgroup path, pod, ...).
    pub const WORKLOAD: &str = "workload";
    /// Top destinations with bytes, the rule and its threshold.
    pub const FLOWS: &str = "flows";
    /// Sampled DNS queries and the DNS measurements (encoded-bytes estimate, ...).
    pub const DNS_SAMPLES: &str = "dns_samples";
    /// The Pod object exactly as the API server returned it.
    pub const POD: &str = "pod";
    /// Labels, owner chain, node and image digests extracted from the pod.
    pub const POD_SUMMARY: &str = "pod_summary";
    /// The pod's Events exactly as the API server returned them.
    pub const POD_EVENTS: &str = "pod_events";
    /// The pod was not there (or was another pod) when captured.
    pub const POD_GONE: &str = "pod_gone";
    /// A capture from the API server failed after all its attempts.
    pub const CAPTURE_FAILED: &str = "capture_failed";
}

/// An item to append to an incident's evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvidence {
    /// What it is (see [`kind`]).
    pub kind: String,
    /// Media type of `content`.
    pub media_type: String,
    /// Where it came from (`agent:<node>`, `kubernetes-api GET <path>`).
    pub source: String,
    /// When it was captured (Unix ms).
    pub captured_ms: u64,
    /// The captured bytes (bounded by the store, see [`bound`]).
    pub content: Vec<u8>,
}

impl NewEvidence {
    /// A JSON item; `value` is rendered compact with sorted keys.
    pub fn json(kind: &str, source: &str, captured_ms: u64, value: &serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            media_type: JSON.into(),
            source: source.into(),
            captured_ms,
            content: value.to_string().into_bytes(),
        }
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An item's content after the size bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded {
    /// What is stored (at most [`MAX_ITEM_BYTES`]).
    pub content: Vec<u8>,
    /// Hex SHA-256 of `content`.
    pub sha256: String,
    /// Why it differs from what was captured; empty if it does not.
    pub note: String,
    /// Size of what was captured.
    pub original_size: u64,
    /// Hex SHA-256 of what was captured.
    pub original_sha256: String,
}

/// Applies the size bound to `content` and hashes it (and the original).
pub fn bound(mut content: Vec<u8>) -> Bounded {
    let original_size = content.len() as u64;
    let original_sha256 = sha256_hex(&content);
    let note = if content.len() > MAX_ITEM_BYTES {
        content.truncate(MAX_ITEM_BYTES);
        format!(
            "truncated: {original_size} bytes captured, the first {MAX_ITEM_BYTES} stored \
             (original SHA-256 {original_sha256})"
        )
    } else {
        String::new()
    };
    Bounded {
        sha256: sha256_hex(&content),
        content,
        note,
        original_size,
        original_sha256,
    }
}

/// The items an incident gets from the detection that opened it: the
/// workload's identity, its flows with the rule and threshold, and the DNS
/// samples (when there are any). Each detection's full record is kept too
/// (kind [`kind::DETECTION`]).
pub fn from_detection(node: &str, d: &Detection, captured_ms: u64) -> Vec<NewEvidence> {
    let source = format!("agent:{node}");
    let rule = json!({
        "kind": json::kind(d.kind), "severity": json::severity(d.severity),
        "detection_id": d.detection_id, "window_seconds": d.window_seconds,
        "threshold": d.threshold, "bytes_estimate": d.bytes_estimate, "summary": d.summary,
    });
    let evidence = d.evidence.clone().unwrap_or_default();
    let detection = json::detection(node, 0, d);
    let mut items = vec![
        NewEvidence::json(
            kind::WORKLOAD,
            &source,
            captured_ms,
            &json!({ "node": node, "workload": json::workload(d.workload.as_ref()) }),
        ),
        NewEvidence::json(
            kind::FLOWS,
            &source,
            captured_ms,
            &json!({ "rule": rule, "top_flows": detection["evidence"]["top_flows"] }),
        ),
    ];
    if !evidence.dns_samples.is_empty() || !evidence.registered_domain.is_empty() {
        items.push(NewEvidence::json(
            kind::DNS_SAMPLES,
            &source,
            captured_ms,
            &json!({
                "rule": rule,
                "registered_domain": evidence.registered_domain,
                "samples": detection["evidence"]["dns_samples"],
                // The DNS detector's numbers: encoded-bytes estimate, entropy, query rate.
                "measurements": detection["evidence"]["measurements"],
            }),
        ));
    }
    items
}

#[cfg(test)]
mod tests {
    use exfilguard_proto::v1::{DnsSample, Evidence, Workload};

    use super::*;

    #[test]
    fn small_items_are_kept_whole_and_big_ones_truncated_with_a_note() {
        let small = bound(b"abc".to_vec());
        assert_eq!(
            small.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!((small.note.as_str(), small.original_size), ("", 3));
        assert_eq!(small.original_sha256, small.sha256);
        let big = bound(vec![b'x'; MAX_ITEM_BYTES + 10]);
        assert_eq!(big.content.len(), MAX_ITEM_BYTES);
        assert_eq!(big.sha256, sha256_hex(&vec![b'x'; MAX_ITEM_BYTES]));
        assert_eq!(big.original_size, (MAX_ITEM_BYTES + 10) as u64);
        assert!(
            big.note.starts_with("truncated: 262154 bytes"),
            "{}",
            big.note
        );
        assert_ne!(big.original_sha256, big.sha256);
    }

    #[test]
    fn a_dns_detection_gives_workload_flows_and_dns_items() {
        let d = Detection {
            detection_id: "d1".into(),
            threshold: 100,
            workload: Some(Workload {
                cgroup_path: "/system.slice/x.service".into(),
                ..Default::default()
            }),
            evidence: Some(Evidence {
                registered_domain: "evil.example".into(),
                dns_samples: vec![DnsSample {
                    query_name: "aGVsbG8.evil.example".into(),
                    query_type: "TXT".into(),
                    ..Default::default()
                }],
                measurements: [("encoded_bytes_estimate".to_string(), 4096.0)].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let items = from_detection("n1", &d, 7);
        let kinds: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(kinds, ["workload", "flows", "dns_samples"]);
        let dns: serde_json::Value = serde_json::from_slice(&items[2].content).unwrap();
        assert_eq!(dns["samples"][0]["query_name"], "aGVsbG8.evil.example");
        assert_eq!(dns["measurements"]["encoded_bytes_estimate"], 4096.0);
        assert_eq!(dns["rule"]["threshold"], 100);
        let w: serde_json::Value = serde_json::from_slice(&items[0].content).unwrap();
        assert_eq!(w["workload"]["cgroup_path"], "/system.slice/x.service");
        assert!(
            items
                .iter()
                .all(|i| i.source == "agent:n1" && i.captured_ms == 7)
        );
        // No DNS evidence: no DNS item.
        let plain = from_detection("n1", &Detection::default(), 7);
        assert_eq!(plain.len(), 2);
    }
}
