//! Report golden tests: every format × document against a committed file,
//! and the HTML parsed by html5ever (via scraper) with its chart checked.
//!
//! After an intended change: `EXFILGUARD_UPDATE_GOLDEN=1 cargo test -p
//! exfilguard-controller --test report`, then review the diff.

use std::path::PathBuf;

use exfilguard_controller::{
    json,
    report::{self, Format, Template},
    store::EgressPoint,
};
use exfilguard_proto::v1::{
    Destination, Detection, DetectionKind, DnsSample, Evidence, EvidenceRecord, Incident,
    IncidentState, L4Protocol, PolicyAction, Severity, TimelineEntry, Workload,
};
use scraper::{Html, Selector};

/// 2026-11-22T14:03:12Z, the first detection.
const OPENED: u64 = 1_795_356_192_000;
const MIN: u64 = 60_000;

fn workload() -> Workload {
    Workload {
        namespace: "shop".into(),
        pod: "db-0".into(),
        container: "postgres".into(),
        cgroup_id: 4242,
        owner_kind: "StatefulSet".into(),
        owner_name: "db".into(),
        ..Default::default()
    }
}

fn evidence(seq: u64, d: &Detection) -> EvidenceRecord {
    let canonical = json::detection("node-a", seq, d).to_string();
    EvidenceRecord {
        detection_id: d.detection_id.clone(),
        seq,
        sha256: format!("{:064x}", seq * 0x1111),
        stored_at_unix_ms: d.detected_at_unix_ms + 150,
        json: canonical,
    }
}

fn entry(at: u64, actor: &str, cause: &str, state: IncidentState) -> TimelineEntry {
    TimelineEntry {
        at_unix_ms: at,
        actor: actor.into(),
        cause: cause.into(),
        state: state as i32,
    }
}

/// A contained, acknowledged incident with a volume and a DNS detection.
fn incident() -> Incident {
    let volume = Detection {
        detection_id: "d-vol-1".into(),
        kind: DetectionKind::Volume as i32,
        severity: Severity::Critical as i32,
        workload: Some(workload()),
        detected_at_unix_ms: OPENED,
        summary: "1.2 GB to 203.0.113.9:443 in 60 s".into(),
        bytes_estimate: 1_200_000_000,
        window_seconds: 60,
        threshold: 500_000_000,
        evidence: Some(Evidence {
            top_flows: vec![
                Destination {
                    address: "203.0.113.9".into(),
                    port: 443,
                    protocol: L4Protocol::Tcp as i32,
                    bytes: 1_150_000_000,
                    packets: 800_000,
                    domain: "files.exfil-drop.example".into(),
                    external: true,
                },
                Destination {
                    address: "198.51.100.20".into(),
                    port: 8443,
                    protocol: L4Protocol::Tcp as i32,
                    bytes: 50_000_000,
                    packets: 40_000,
                    domain: String::new(),
                    external: true,
                },
            ],
            ..Default::default()
        }),
        action: PolicyAction::Unspecified as i32,
    };
    let dns = Detection {
        detection_id: "d-dns-2".into(),
        kind: DetectionKind::DnsTunnel as i32,
        severity: Severity::High as i32,
        workload: Some(workload()),
        detected_at_unix_ms: OPENED + 2 * MIN,
        summary: "high-entropy subdomains of exfil-drop.example".into(),
        bytes_estimate: 40_000,
        window_seconds: 60,
        evidence: Some(Evidence {
            dns_samples: vec![
                DnsSample {
                    query_name: "a9f3k2.exfil-drop.example".into(),
                    query_type: "TXT".into(),
                    response_code: "NOERROR".into(),
                    at_unix_ms: OPENED + 90_000,
                },
                DnsSample {
                    query_name: "zz81qp.exfil-drop.example".into(),
                    query_type: "TXT".into(),
                    response_code: "NXDOMAIN".into(),
                    at_unix_ms: OPENED + 95_000,
                },
            ],
            registered_domain: "exfil-drop.example".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Incident {
        id: "EXFIL-20261122-140312-7f3a".into(),
        node: "node-a".into(),
        workload: Some(workload()),
        state: IncidentState::Contained as i32,
        severity: Severity::Critical as i32,
        kind: DetectionKind::Volume as i32,
        action: PolicyAction::Lockdown as i32,
        opened_at_unix_ms: OPENED,
        updated_at_unix_ms: OPENED + 2 * MIN,
        detection_count: 2,
        bytes_estimate: 1_200_040_000,
        summary: "high-entropy subdomains of exfil-drop.example".into(),
        acknowledged_by: "alice (responder)".into(),
        notification_deadline_unix_ms: OPENED + 72 * 60 * MIN,
        timeline: vec![
            entry(
                OPENED,
                "agent:node-a",
                "opened: detection d-vol-1 (volume): 1.2 GB to 203.0.113.9:443 in 60 s",
                IncidentState::Open,
            ),
            entry(
                OPENED,
                "controller",
                "lockdown: in-kernel Block of cgroup 4242 sent to the agent on node-a",
                IncidentState::Contained,
            ),
            entry(
                OPENED + 1_000,
                "controller",
                "alert (opened) delivered to sink pagerduty after 1 attempt (HTTP 202)",
                IncidentState::Contained,
            ),
            entry(
                OPENED + 2 * MIN,
                "agent:node-a",
                "detection d-dns-2 (dns_tunnel): high-entropy subdomains of exfil-drop.example",
                IncidentState::Contained,
            ),
            entry(
                OPENED + 9 * MIN,
                "alice (responder)",
                "acknowledged: investigating with the DBA team",
                IncidentState::Contained,
            ),
        ],
        evidence: vec![evidence(17, &volume), evidence(18, &dns)],
    }
}

/// External egress per minute: quiet, then the burst the detector caught, then nothing after containment.
fn egress() -> Vec<EgressPoint> {
    [
        (-5i64, 2_000_000u64),
        (-4, 1_500_000),
        (-3, 2_500_000),
        (-2, 3_000_000),
        (-1, 400_000_000),
        (0, 800_000_000),
        (1, 0),
        (2, 0),
    ]
    .into_iter()
    .map(|(m, bytes)| EgressPoint {
        window_end_ms: (OPENED as i64 + m * MIN as i64) as u64,
        external_bytes: bytes,
        internal_bytes: 10_000,
    })
    .collect()
}

/// Rendered at a fixed time: 2 h after detection, so 70 h remain.
fn render(format: Format, template: Template) -> String {
    report::render(
        &incident(),
        &egress(),
        OPENED + 120 * MIN,
        report::parse_zone("America/Los_Angeles").unwrap(),
        format,
        template,
    )
    .content
}

const TEMPLATES: [Template; 4] = [
    Template::Full,
    Template::ExecutiveBrief,
    Template::InternalEscalation,
    Template::RegulatorNotification,
];
const FORMATS: [(Format, &str); 3] = [
    (Format::Markdown, "md"),
    (Format::Html, "html"),
    (Format::Json, "json"),
];

#[test]
fn every_format_and_template_matches_its_golden_file() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("EXFILGUARD_UPDATE_GOLDEN").is_some();
    let mut mismatched = Vec::new();
    for template in TEMPLATES {
        for (format, ext) in FORMATS {
            let got = render(format, template);
            let path = dir.join(format!("{}.{ext}", template.as_str()));
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "read {}: {e} (EXFILGUARD_UPDATE_GOLDEN=1 writes it)",
                    path.display()
                )
            });
            if got != want {
                let line = got
                    .lines()
                    .zip(want.lines())
                    .position(|(a, b)| a != b)
                    .map_or("length".to_string(), |n| format!("line {}", n + 1));
                mismatched.push(format!("{} differs at {line}", path.display()));
            }
        }
    }
    assert!(mismatched.is_empty(), "{mismatched:#?}");
}

#[test]
fn reports_state_the_facts_and_the_deadline() {
    let md = render(Format::Markdown, Template::Full);
    for needle in [
        "# Incident EXFIL-20261122-140312-7f3a",
        "`shop/db-0`",
        "StatefulSet db",
        "`node-a`",
        "1.2 GB (1200040000 bytes)",
        "203.0.113.9:443/tcp | files.exfil-drop.example | 1150000000",
        "a9f3k2.exfil-drop.example | TXT | NOERROR",
        // The 72-hour clock in UTC and Pacific time, with the time left.
        "2026-11-25 14:03:12 UTC (2026-11-25 06:03:12 PST) — 70 h 0 min remaining",
        // The timeline in both zones.
        "| 2026-11-22 14:12:12 UTC | 2026-11-22 06:12:12 PST | alice (responder) |",
        "**[GAP: approximate number of data subjects and records affected]**",
    ] {
        assert!(md.contains(needle), "{needle:?} missing from:\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&render(Format::Json, Template::Full)).unwrap();
    assert_eq!(json["report"]["notification_remaining_seconds"], 70 * 3600);
    assert_eq!(json["report"]["contained_at"], "2026-11-22T14:03:12Z");
    assert_eq!(json["report"]["threshold"]["bytes"], 500_000_000);
    assert_eq!(json["report"]["egress"].as_array().unwrap().len(), 8);
    assert_eq!(json["id"], "EXFIL-20261122-140312-7f3a");
}

#[test]
fn drafts_mark_what_the_system_cannot_know() {
    for template in [
        Template::ExecutiveBrief,
        Template::InternalEscalation,
        Template::RegulatorNotification,
    ] {
        let v: serde_json::Value = serde_json::from_str(&render(Format::Json, template)).unwrap();
        let gaps: Vec<&str> = v["gaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap())
            .collect();
        assert!(
            gaps.iter().any(|g| g.contains("number of data subjects")),
            "{template:?}: {gaps:?}"
        );
        assert!(
            gaps.iter().any(|g| g.contains("data")),
            "{template:?}: {gaps:?}"
        );
        let md = v["markdown"].as_str().unwrap();
        assert!(
            md.contains("2026-11-25 14:03:12 UTC"),
            "{template:?} lacks the deadline:\n{md}"
        );
    }
    let brief = render(Format::Markdown, Template::ExecutiveBrief);
    assert!(
        brief.starts_with("# Time Sensitive Security Update — EXFIL-20261122-140312-7f3a"),
        "{brief}"
    );
    assert!(
        brief.contains("## Incident Timeline (all times UTC and America/Los_Angeles)"),
        "{brief}"
    );
    let regulator = render(Format::Markdown, Template::RegulatorNotification);
    assert!(
        regulator.contains("Art. 33(3)(a)") && regulator.contains("[GAP: name, e-mail, phone"),
        "{regulator}"
    );
}

fn select<'a>(doc: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    doc.select(&Selector::parse(css).unwrap()).collect()
}

#[test]
fn the_html_report_is_valid_self_contained_and_has_the_chart() {
    let html = render(Format::Html, Template::Full);
    let doc = Html::parse_document(&html);
    assert!(doc.errors.is_empty(), "HTML parse errors: {:?}", doc.errors);
    assert_eq!(select(&doc, "h1").len(), 1);
    let svg = select(&doc, "figure svg#egress-chart");
    assert_eq!(svg.len(), 1, "no chart");
    let line = select(&doc, "svg#egress-chart polyline.egress");
    assert_eq!(line.len(), 1);
    let points = line[0]
        .value()
        .attr("points")
        .unwrap()
        .split_whitespace()
        .count();
    assert_eq!(points, egress().len());
    for marker in ["line.threshold", "line.detection", "line.containment"] {
        assert_eq!(
            select(&doc, &format!("svg#egress-chart {marker}")).len(),
            1,
            "{marker} missing"
        );
    }
    // Detection is drawn left of containment or at it, never right of it.
    let x = |css: &str| -> f64 {
        select(&doc, css)[0]
            .value()
            .attr("x1")
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(x("line.detection") <= x("line.containment"));
    // Self-contained: no scripts, no external resources.
    assert!(select(&doc, "script").is_empty() && select(&doc, "link").is_empty());
    assert!(select(&doc, "[src]").is_empty(), "external resource");
    // The only URL is the SVG namespace.
    assert_eq!(
        html.matches("http").count(),
        html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
    );
    // Templates in HTML mark gaps visibly.
    let brief = Html::parse_document(&render(Format::Html, Template::ExecutiveBrief));
    assert!(brief.errors.is_empty(), "{:?}", brief.errors);
    assert!(select(&brief, "mark.gap").len() >= 3);
}

#[test]
fn a_workload_without_flow_reports_still_gets_a_chart_that_says_so() {
    let html = report::render(
        &incident(),
        &[],
        OPENED,
        chrono_tz::UTC,
        Format::Html,
        Template::Full,
    )
    .content;
    let doc = Html::parse_document(&html);
    assert!(doc.errors.is_empty(), "{:?}", doc.errors);
    assert_eq!(select(&doc, "svg#egress-chart text.no-data").len(), 1);
    assert!(select(&doc, "svg#egress-chart polyline").is_empty());
}
