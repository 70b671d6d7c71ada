//! What each document says: the full incident report and the three drafts
//! (executive brief, internal escalation, regulator notification), built
//! from [`Facts`] with gaps where a person has to supply what the system
//! cannot know.

use super::{
    doc::{Block, Doc, Line, b, c, gap, t},
    facts::Facts,
};

/// Which document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// The full incident report.
    Full,
    /// Short update for executives (seed: the executive update email).
    ExecutiveBrief,
    /// Hand-over to the next escalation tier.
    InternalEscalation,
    /// Personal-data breach notification draft (GDPR Art. 33(3)).
    RegulatorNotification,
}

impl Template {
    /// `full`, `executive-brief`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Template::Full => "full",
            Template::ExecutiveBrief => "executive-brief",
            Template::InternalEscalation => "internal-escalation",
            Template::RegulatorNotification => "regulator-notification",
        }
    }
}

/// Builds the document.
pub fn build(f: &Facts, template: Template) -> Doc {
    match template {
        Template::Full => full(f),
        Template::ExecutiveBrief => executive_brief(f),
        Template::InternalEscalation => internal_escalation(f),
        Template::RegulatorNotification => regulator_notification(f),
    }
}

const GAP_DATA: &str = "what data was in the transfer (categories, classification) — exfilguard sees bytes and destinations, not content";
const GAP_SUBJECTS: &str = "approximate number of data subjects and records affected";
const GAP_ACTOR: &str = "who is behind it and how they got in";

fn zone_name(f: &Facts) -> String {
    f.zone.name().to_string()
}

fn status_line(f: &Facts) -> Line {
    let mut l = vec![t("Current status: "), b(f.state.clone())];
    match (f.contained_ms, f.closed_ms) {
        (_, Some(closed)) => l.push(t(format!(" since {}.", f.both(closed)))),
        (Some(at), None) => l.push(t(format!(
            " — the workload's egress has been blocked since {}.",
            f.both(at)
        ))),
        (None, None) => l.push(t(
            " — the workload's egress is NOT blocked (policy action: ".to_string()
                + &f.action
                + ").",
        )),
    }
    l
}

fn deadline_line(f: &Facts) -> Line {
    vec![
        b("72-hour regulatory notification deadline (GDPR Art. 33): "),
        t(format!(
            "{} — {} (72 h from first detection at {}).",
            f.both(f.deadline_ms),
            f.deadline_status(),
            f.utc(f.detected_ms)
        )),
    ]
}

fn key_events(f: &Facts) -> Vec<Line> {
    let mut events = vec![vec![
        b(f.both(f.detected_ms)),
        t(format!(
            ": exfilguard detected {} egress from {} on node {} ({}).",
            f.kind,
            f.workload,
            f.node,
            f.first_summary.trim_end_matches('.')
        )),
    ]];
    if let Some(at) = f.contained_ms {
        events.push(vec![
            b(f.both(at)),
            t(": containment applied — the workload's egress was blocked in the kernel."),
        ]);
    }
    for a in &f.actions {
        if a.what.starts_with("acknowledged") {
            events.push(vec![
                b(f.both(a.at_ms)),
                t(format!(": acknowledged by {}.", a.actor)),
            ]);
        }
    }
    if let Some(at) = f.closed_ms {
        events.push(vec![b(f.both(at)), t(format!(": incident {}.", f.state))]);
    }
    events
}

fn full(f: &Facts) -> Doc {
    let mut blocks = vec![Block::Table(vec![
        ("State".into(), vec![b(f.state.clone())]),
        ("Severity".into(), vec![t(f.severity.clone())]),
        ("Type".into(), vec![t(f.kind.clone())]),
        ("Workload".into(), vec![c(f.workload.clone())]),
        (
            "Owner".into(),
            if f.owner.is_empty() {
                vec![t("not reported by the agent")]
            } else {
                vec![t(f.owner.clone())]
            },
        ),
        ("Node".into(), vec![c(f.node.clone())]),
        ("First detection".into(), vec![t(f.both(f.detected_ms))]),
        (
            "Contained".into(),
            vec![t(f.contained_ms.map_or("no".into(), |m| f.both(m)))],
        ),
        ("Detections".into(), vec![t(f.detection_count.to_string())]),
        (
            "Bytes sent (estimate)".into(),
            vec![t(Facts::bytes(f.bytes_estimate))],
        ),
        ("Policy action".into(), vec![t(f.action.clone())]),
        (
            "Acknowledged by".into(),
            vec![t(if f.acknowledged_by.is_empty() {
                "not yet".to_string()
            } else {
                f.acknowledged_by.clone()
            })],
        ),
    ])];
    blocks.push(Block::Heading("Summary".into()));
    let latest = if f.summary == f.first_summary {
        String::new()
    } else {
        format!(" Latest detection: {}.", f.summary.trim_end_matches('.'))
    };
    blocks.push(Block::Para(vec![t(capitalize(&format!(
        "{} {} egress from {} on node {}: {}.{latest} About {} left the workload to {}.",
        f.severity,
        f.kind,
        f.workload,
        f.node,
        f.first_summary.trim_end_matches('.'),
        Facts::bytes(f.bytes_estimate),
        f.top_destinations(3)
    )))]));
    blocks.push(Block::Para(status_line(f)));
    blocks.push(Block::Para(deadline_line(f)));
    blocks.push(Block::Heading("Egress over time".into()));
    blocks.push(Block::Chart);
    blocks.push(Block::Heading("Where the data went".into()));
    if f.destinations.is_empty() {
        blocks.push(Block::Para(vec![t("No destinations in the evidence.")]));
    } else {
        blocks.push(Block::Grid {
            header: vec![
                "Destination".into(),
                "Domain".into(),
                "Bytes (largest window)".into(),
            ],
            rows: f
                .destinations
                .iter()
                .map(|d| vec![d.endpoint.clone(), d.domain.clone(), d.bytes.to_string()])
                .collect(),
        });
    }
    blocks.push(Block::Heading("DNS evidence".into()));
    if f.dns.is_empty() && f.registered_domains.is_empty() {
        blocks.push(Block::Para(vec![t("No DNS queries in the evidence.")]));
    } else {
        if !f.registered_domains.is_empty() {
            blocks.push(Block::Para(vec![
                t("Registered domain(s) the DNS detector keyed on: "),
                c(f.registered_domains.join(", ")),
            ]));
        }
        blocks.push(Block::Grid {
            header: vec![
                "Query".into(),
                "Type".into(),
                "Answer".into(),
                "At (UTC)".into(),
            ],
            rows: f
                .dns
                .iter()
                .map(|q| {
                    vec![
                        q.name.clone(),
                        q.qtype.clone(),
                        q.rcode.clone(),
                        q.at.clone(),
                    ]
                })
                .collect(),
        });
    }
    blocks.push(Block::Heading("Actions taken".into()));
    blocks.push(if f.actions.is_empty() {
        Block::Para(vec![t("None recorded.")])
    } else {
        Block::List(
            f.actions
                .iter()
                .map(|a| vec![b(f.utc(a.at_ms)), t(format!(" — {}: {}", a.actor, a.what))])
                .collect(),
        )
    });
    blocks.push(Block::Heading(format!(
        "Timeline (UTC and {})",
        zone_name(f)
    )));
    blocks.push(Block::Grid {
        header: vec![
            "UTC".into(),
            zone_name(f),
            "Actor".into(),
            "What".into(),
            "State".into(),
        ],
        rows: f
            .timeline
            .iter()
            .map(|(at, actor, cause, state)| {
                vec![
                    f.utc(*at),
                    f.local(*at),
                    actor.clone(),
                    cause.clone(),
                    state.clone(),
                ]
            })
            .collect(),
    });
    blocks.push(Block::Heading("Evidence records".into()));
    blocks.push(if f.evidence.is_empty() {
        Block::Para(vec![t("No evidence records.")])
    } else {
        Block::Grid {
            header: vec![
                "Detection".into(),
                "SHA-256 of the canonical record".into(),
                "Stored (UTC)".into(),
            ],
            rows: f
                .evidence
                .iter()
                .map(|(id, sha, at)| vec![id.clone(), sha.clone(), f.utc(*at)])
                .collect(),
        }
    });
    blocks.push(Block::Heading("Not known to exfilguard".into()));
    blocks.push(Block::List(vec![
        vec![gap(GAP_DATA)],
        vec![gap(GAP_SUBJECTS)],
        vec![gap(GAP_ACTOR)],
        vec![gap("whether the data has appeared elsewhere")],
    ]));
    blocks.push(Block::Para(vec![t(format!(
        "Report generated {}.",
        f.both(f.now_ms)
    ))]));
    Doc {
        title: format!("Incident {}", f.id),
        blocks,
    }
}

fn executive_brief(f: &Facts) -> Doc {
    let mut mitigation = Vec::new();
    match f.contained_ms {
        Some(at) => mitigation.push(vec![t(format!(
            "The affected workload's outbound traffic was blocked automatically at {} ({} after detection).",
            f.both(at),
            minutes(at.saturating_sub(f.detected_ms))
        ))]),
        None => mitigation.push(vec![t(format!(
            "The workload has not been contained (policy action: {}).",
            f.action
        ))]),
    }
    mitigation.push(vec![t(
        "Network evidence (flows, DNS queries, hashes) was preserved at detection.",
    )]);
    if !f.acknowledged_by.is_empty() {
        mitigation.push(vec![t(format!(
            "The security team ({}) has acknowledged the incident.",
            f.acknowledged_by
        ))]);
    }
    mitigation.push(vec![gap("other mitigation steps taken (credentials rotated, access revoked, counsel or forensics engaged)")]);
    Doc {
        title: format!("Time Sensitive Security Update — {}", f.id),
        blocks: vec![
            Block::Heading("Summary".into()),
            Block::Para(vec![
                t(format!(
                    "Our security monitoring identified a {} security incident: a workload in our cluster ({}, node {}) sent about {} to {} outside the environment. ",
                    f.severity,
                    f.workload,
                    f.node,
                    Facts::bytes(f.bytes_estimate),
                    f.top_destinations(2)
                )),
                t("Data affected: "),
                gap(GAP_DATA),
                t(". People affected: "),
                gap(GAP_SUBJECTS),
                t(". Attribution: "),
                gap(GAP_ACTOR),
                t("."),
            ]),
            Block::Heading(format!(
                "Incident Timeline (all times UTC and {})",
                zone_name(f)
            )),
            Block::List(key_events(f)),
            Block::Heading("Mitigation Status".into()),
            Block::List(mitigation),
            Block::Para(status_line(f)),
            Block::Heading("Next Steps".into()),
            Block::Para(vec![
                t("The investigation is ongoing and could reveal additional exposure. "),
                gap("briefing cadence and owner"),
                t("."),
            ]),
            Block::Para(vec![
                t(
                    "If personal data was involved, regulatory reporting is due within 72 hours: by ",
                ),
                b(f.both(f.deadline_ms)),
                t(format!(" ({}). ", f.deadline_status())),
                t(
                    "The clock here starts at first detection; confirm the date the organisation became aware: ",
                ),
                gap("date of awareness (counsel to confirm)"),
                t("."),
            ]),
            Block::Para(vec![t("Sincerely,")]),
            Block::Para(vec![gap("your name and role")]),
        ],
    }
}

fn internal_escalation(f: &Facts) -> Doc {
    Doc {
        title: format!("Escalation: {} ({} {})", f.id, f.severity, f.kind),
        blocks: vec![
            Block::Para(vec![
                t("To: "),
                gap("next escalation tier / incident commander"),
                t(". From: "),
                gap("on-call responder"),
                t("."),
            ]),
            Block::Heading("What we know".into()),
            Block::Table(vec![
                ("Incident".into(), vec![c(f.id.clone())]),
                (
                    "Workload".into(),
                    vec![
                        c(f.workload.clone()),
                        t(if f.owner.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", f.owner)
                        }),
                    ],
                ),
                ("Node".into(), vec![c(f.node.clone())]),
                ("Detected".into(), vec![t(f.both(f.detected_ms))]),
                (
                    "Detector".into(),
                    vec![t(format!("{} — {}", f.kind, f.first_summary))],
                ),
                (
                    "Threshold".into(),
                    vec![t(f.threshold.map_or(
                        "not recorded in the evidence".into(),
                        |(bytes, w)| format!("{} in {w} s", Facts::bytes(bytes)),
                    ))],
                ),
                (
                    "Bytes sent (estimate)".into(),
                    vec![t(Facts::bytes(f.bytes_estimate))],
                ),
                ("Destinations".into(), vec![t(f.top_destinations(5))]),
                (
                    "DNS".into(),
                    vec![t(if f.registered_domains.is_empty() {
                        format!("{} queries captured", f.dns.len())
                    } else {
                        format!(
                            "registered domain(s) {}; {} queries captured",
                            f.registered_domains.join(", "),
                            f.dns.len()
                        )
                    })],
                ),
                (
                    "Containment".into(),
                    vec![t(f.contained_ms.map_or(
                        format!("none (policy action {})", f.action),
                        |at| format!("egress blocked since {}", f.both(at)),
                    ))],
                ),
                (
                    "Acknowledged".into(),
                    vec![t(if f.acknowledged_by.is_empty() {
                        "not yet".to_string()
                    } else {
                        f.acknowledged_by.clone()
                    })],
                ),
            ]),
            Block::Para(status_line(f)),
            Block::Para(deadline_line(f)),
            Block::Heading("Actions taken so far".into()),
            Block::List(
                f.actions
                    .iter()
                    .map(|a| vec![b(f.utc(a.at_ms)), t(format!(" — {}: {}", a.actor, a.what))])
                    .collect(),
            ),
            Block::Heading("Open questions".into()),
            Block::List(vec![
                vec![gap(GAP_DATA)],
                vec![gap(GAP_SUBJECTS)],
                vec![gap(
                    "how the workload was compromised (initial access, lateral movement)",
                )],
                vec![gap(
                    "whether other workloads using the same credentials or image are affected",
                )],
            ]),
            Block::Heading("Decisions needed".into()),
            Block::List(vec![
                vec![
                    t("Keep the containment, or release it (exfilctl incidents release "),
                    c(f.id.clone()),
                    t(" --reason …)?"),
                ],
                vec![
                    t("Engage counsel for the 72-hour notification clock (ends "),
                    b(f.utc(f.deadline_ms)),
                    t(")?"),
                ],
                vec![gap("other decisions")],
            ]),
            Block::Para(vec![
                t("Evidence: "),
                c(format!("exfilctl incidents evidence {} --out DIR", f.id)),
                t(format!(
                    " ({} record(s), SHA-256 hashed at capture).",
                    f.evidence.len()
                )),
            ]),
        ],
    }
}

fn regulator_notification(f: &Facts) -> Doc {
    Doc {
        title: "Notification of a personal data breach (GDPR Art. 33) — DRAFT".into(),
        blocks: vec![
            Block::Para(vec![
                b("Draft prepared from the incident record "),
                c(f.id.clone()),
                t(
                    ". Every marked gap must be completed and the whole text reviewed by the data protection officer or counsel before it is sent.",
                ),
            ]),
            Block::Heading("1. Controller and contact point".into()),
            Block::Table(vec![
                (
                    "Organisation".into(),
                    vec![gap("legal name and registration of the controller")],
                ),
                (
                    "Data protection officer / contact".into(),
                    vec![gap("name, e-mail, phone (Art. 33(3)(b))")],
                ),
            ]),
            Block::Heading("2. Timing".into()),
            Block::Table(vec![
                ("Breach detected".into(), vec![t(f.both(f.detected_ms))]),
                (
                    "Organisation became aware".into(),
                    vec![gap("date and time of awareness, if later than detection")],
                ),
                (
                    "Notification deadline".into(),
                    vec![t(format!(
                        "{} ({}) — 72 h from first detection",
                        f.both(f.deadline_ms),
                        f.deadline_status()
                    ))],
                ),
                (
                    "Reason for any delay".into(),
                    vec![gap("only if notifying after 72 hours (Art. 33(1))")],
                ),
            ]),
            Block::Heading("3. Nature of the breach (Art. 33(3)(a))".into()),
            Block::Para(vec![t(format!(
                "Unauthorised transfer of data out of our environment (confidentiality breach). A workload ({}, node {}) sent about {} to {}. Detected by automated egress monitoring ({}).",
                f.workload,
                f.node,
                Facts::bytes(f.bytes_estimate),
                f.top_destinations(3),
                f.kind
            ))]),
            Block::Table(vec![
                (
                    "Categories of data subjects".into(),
                    vec![gap("e.g. customers, employees")],
                ),
                (
                    "Approximate number of data subjects".into(),
                    vec![gap(GAP_SUBJECTS)],
                ),
                ("Categories of personal data".into(), vec![gap(GAP_DATA)]),
                (
                    "Approximate number of records".into(),
                    vec![gap("records concerned")],
                ),
            ]),
            Block::Heading("4. Likely consequences (Art. 33(3)(c))".into()),
            Block::Para(vec![gap(
                "likely consequences for the data subjects (identity theft, fraud, loss of confidentiality, …)",
            )]),
            Block::Heading("5. Measures taken or proposed (Art. 33(3)(d))".into()),
            Block::List({
                let mut m: Vec<Line> = Vec::new();
                if let Some(at) = f.contained_ms {
                    m.push(vec![t(format!(
                        "{}: outbound traffic of the affected workload blocked.",
                        f.both(at)
                    ))]);
                }
                m.push(vec![t(format!(
                    "{}: network evidence preserved with cryptographic hashes.",
                    f.both(f.detected_ms)
                ))]);
                if let Some(at) = f.closed_ms {
                    m.push(vec![t(format!(
                        "{}: incident {} by the security team.",
                        f.both(at),
                        f.state
                    ))]);
                }
                m.push(vec![gap("measures to mitigate adverse effects on data subjects; communication to data subjects (Art. 34) if high risk")]);
                m
            }),
            Block::Heading("6. Phased notification".into()),
            Block::Para(vec![t(
                "The investigation is ongoing; this notification may be supplemented as further information becomes available (Art. 33(4)).",
            )]),
        ],
    }
}

fn minutes(ms: u64) -> String {
    let s = ms / 1000;
    if s < 120 {
        format!("{s} s")
    } else {
        format!("{} min", s / 60)
    }
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
