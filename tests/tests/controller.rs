//! The agent's stream client and the controller as separate processes on
//! loopback with mutual TLS: kill -9 either side mid-stream and check that
//! every detection the agent produced is stored exactly once.
//!
//! Both sides are this test executable re-run as a child (`child_process`,
//! selected by `EXFILGUARD_TEST_CHILD`): the real `exfilguard_agent::stream`
//! client with its on-disk journal, and the real controller server on a
//! SQLite file — separate processes, so `kill -9` means what it says.
//! No root needed; runs with the rest of exfilguard-tests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use exfilguard_agent::stream::{StreamConfig, StreamHandle, TlsFiles};
use exfilguard_controller::{
    certs::{DevPki, write_dev_pki},
    server::{self, ServerConfig},
};
use exfilguard_proto::v1::{
    AckStatus, Capability, Detection, DetectionKind, FlowReport, GetIncidentRequest,
    ListIncidentsRequest, ListNodesRequest, Severity, Workload, WorkloadEgress,
    incidents_client::IncidentsClient,
};
use exfilguard_tests::process::ChildGuard;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const WAIT: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "EXFILGUARD_TEST_CHILD";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "exfilguard-{tag}-{}",
            exfilguard_tests::unique_name()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("remove {}: {e}", self.0.display());
        }
    }
}

fn child(role: &str, envs: &[(&str, String)]) -> ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().expect("test executable"));
    cmd.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--include-ignored",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, role)
    .env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    ChildGuard::spawn(cmd, format!("{role} child"))
}

fn start_controller(pki: &DevPki, db: &Path, listen: &str) -> (ChildGuard, String) {
    let c = child(
        "controller",
        &[
            ("PKI", pki.dir.display().to_string()),
            ("DB", db.display().to_string()),
            ("LISTEN", listen.into()),
        ],
    );
    let line = c.wait_for_line("LISTENING <addr>", |l| l.starts_with("LISTENING "), WAIT);
    let addr = line["LISTENING ".len()..].trim().to_string();
    (c, addr)
}

fn start_agent(pki: &DevPki, addr: &str, journal: &Path, count: u64, first_pod: u64) -> ChildGuard {
    child(
        "agent",
        &[
            ("PKI", pki.dir.display().to_string()),
            ("ENDPOINT", format!("https://{addr}")),
            ("JOURNAL", journal.display().to_string()),
            ("COUNT", count.to_string()),
            ("FIRST", first_pod.to_string()),
        ],
    )
}

/// Parses the agent child's closing `STATS k=v ...` line.
fn stats(line: &str) -> BTreeMap<String, u64> {
    line.trim_start_matches("STATS ")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("stat {k}={v}")),
            )
        })
        .collect()
}

/// Sequence numbers of every detection the controller stored, sorted (repeats kept).
fn stored_seqs(pki: &DevPki, addr: &str) -> Vec<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca()).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(pki.cert("viewer")).unwrap(),
                std::fs::read(pki.key("viewer")).unwrap(),
            ))
            .domain_name("localhost");
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to controller {addr}: {e}"));
        let mut api = IncidentsClient::new(ch);
        let list = api
            .list_incidents(ListIncidentsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut seqs = Vec::new();
        for i in list.incidents {
            let full = api
                .get_incident(GetIncidentRequest { id: i.id })
                .await
                .unwrap()
                .into_inner();
            seqs.extend(full.evidence.iter().map(|e| e.seq));
        }
        seqs.sort_unstable();
        seqs
    })
}

fn wait_until_stored(pki: &DevPki, addr: &str, at_least: usize) {
    let deadline = Instant::now() + WAIT;
    while stored_seqs(pki, addr).len() < at_least {
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} detections stored within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn controller_kill_9_mid_stream_loses_and_duplicates_nothing() {
    const COUNT: u64 = 300;
    let dir = TempDir::new("ctl-kill");
    let pki = write_dev_pki(
        &dir.0.join("pki"),
        &["localhost".into()],
        &["node-a".into()],
    )
    .unwrap();
    let db = dir.0.join("controller.db");
    let (mut controller, addr) = start_controller(&pki, &db, "127.0.0.1:0");
    let mut agent = start_agent(&pki, &addr, &dir.0.join("journal"), COUNT, 0);
    wait_until_stored(&pki, &addr, 50);
    controller.kill();
    // While the controller is down the agent keeps producing into its journal.
    std::thread::sleep(Duration::from_millis(500));
    let (_controller, addr2) = start_controller(&pki, &db, &addr);
    assert_eq!(addr, addr2, "restarted on the same address");
    let line = agent.wait_for_line("STATS", |l| l.starts_with("STATS "), WAIT);
    let s = stats(&line);
    agent.wait(WAIT);
    eprintln!("agent: {s:?}");
    assert_eq!(s["last_seq"], COUNT);
    assert_eq!(s["pending"], 0, "journal drained");
    assert!(s["connects"] >= 2, "the agent reconnected: {s:?}");
    assert_eq!(s["dropped"], 0);
    assert_eq!(
        stored_seqs(&pki, &addr),
        (1..=COUNT).collect::<Vec<_>>(),
        "every detection exactly once"
    );
}

#[test]
fn agent_kill_9_mid_stream_resends_nothing_acknowledged_as_new() {
    const FIRST: u64 = 200;
    const SECOND: u64 = 50;
    let dir = TempDir::new("agent-kill");
    let pki = write_dev_pki(
        &dir.0.join("pki"),
        &["localhost".into()],
        &["node-a".into()],
    )
    .unwrap();
    let (_controller, addr) = start_controller(&pki, &dir.0.join("controller.db"), "127.0.0.1:0");
    let journal = dir.0.join("journal");
    let mut agent = start_agent(&pki, &addr, &journal, FIRST, 0);
    wait_until_stored(&pki, &addr, 40);
    agent.kill();
    // Messages the controller had already received still commit after the
    // kill: wait until the count is stable.
    let mut stored_at_kill = stored_seqs(&pki, &addr).len() as u64;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = stored_seqs(&pki, &addr).len() as u64;
        if now == stored_at_kill {
            break;
        }
        stored_at_kill = now;
    }
    // The restarted agent reuses its journal: the unacknowledged tail is
    // resent (what the controller already has comes back as duplicates) and
    // new detections continue the sequence.
    let mut agent = start_agent(&pki, &addr, &journal, SECOND, 1000);
    let s = stats(&agent.wait_for_line("STATS", |l| l.starts_with("STATS "), WAIT));
    agent.wait(WAIT);
    eprintln!("stored at kill: {stored_at_kill}; restarted agent: {s:?}");
    let high = s["last_seq"];
    assert!(high > SECOND, "sequence continued after the restart: {s:?}");
    assert_eq!(s["pending"], 0);
    let seqs = stored_seqs(&pki, &addr);
    assert_eq!(
        seqs,
        (1..=high).collect::<Vec<_>>(),
        "every journaled detection exactly once"
    );
    // Welcome told the restarted agent what is stored: it sends only the rest.
    assert_eq!(
        s["sent"],
        high - stored_at_kill,
        "only unstored messages are sent: {s:?}"
    );
    // Everything the second run sent beyond its own new detections was a
    // resend; only those the controller had not stored may count as new.
    assert!(s["acked"] >= SECOND, "{s:?}");
    assert_eq!(
        s["acked"],
        high - stored_at_kill.min(high),
        "new acks = what was not stored at the kill: {s:?}"
    );
}

/// The `i`-th message of an agent child: a FlowReport when `flow_every`
/// divides `i + 1`, else a Detection.
fn child_message(i: u64, first_pod: u64, flow_every: u64) -> (bool, Vec<u8>) {
    use prost::Message as _;
    let pod = first_pod + i % 10;
    let workload = Workload {
        namespace: "shop".into(),
        pod: format!("pod-{pod}"),
        cgroup_id: pod + 1,
        ..Default::default()
    };
    if flow_every > 0 && (i + 1).is_multiple_of(flow_every) {
        let report = FlowReport {
            window_start_unix_ms: 0,
            window_end_unix_ms: i,
            workloads: vec![WorkloadEgress {
                workload: Some(workload),
                external_bytes: 1000 + i,
                ..Default::default()
            }],
        };
        (true, report.encode_to_vec())
    } else {
        let d = Detection {
            detection_id: format!("det-{first_pod}-{i}"),
            kind: DetectionKind::Volume as i32,
            severity: Severity::High as i32,
            workload: Some(workload),
            summary: format!("detection {i}"),
            bytes_estimate: 1_000_000,
            ..Default::default()
        };
        (false, d.encode_to_vec())
    }
}

#[test]
fn a_full_journal_while_disconnected_drops_flow_reports_first_and_the_controller_learns_the_counts()
{
    const COUNT: u64 = 40;
    const FLOW_EVERY: u64 = 2;
    let dir = TempDir::new("journal-full");
    let pki = write_dev_pki(
        &dir.0.join("pki"),
        &["localhost".into()],
        &["node-a".into()],
    )
    .unwrap();
    // A port with nothing listening yet: the agent starts disconnected.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // Room for every detection and three flow reports.
    let cost = |(_, bytes): (bool, Vec<u8>)| {
        bytes.len() as u64 + exfilguard_agent::stream::journal::ENTRY_OVERHEAD
    };
    let detections: u64 = (0..COUNT)
        .map(|i| child_message(i, 0, FLOW_EVERY))
        .filter(|m| !m.0)
        .map(cost)
        .sum();
    let flow_max = (0..COUNT)
        .map(|i| child_message(i, 0, FLOW_EVERY))
        .filter(|m| m.0)
        .map(cost)
        .max()
        .unwrap();
    let limit = detections + 3 * flow_max;
    let mut agent = child(
        "agent",
        &[
            ("PKI", pki.dir.display().to_string()),
            ("ENDPOINT", format!("https://{addr}")),
            ("JOURNAL", dir.0.join("journal").display().to_string()),
            ("JOURNAL_MAX", limit.to_string()),
            ("COUNT", COUNT.to_string()),
            ("FIRST", "0".into()),
            ("FLOW_EVERY", FLOW_EVERY.to_string()),
        ],
    );
    agent.wait_for_line("PRODUCED", |l| l.starts_with("PRODUCED"), WAIT);
    let (_controller, _) = start_controller(&pki, &dir.0.join("controller.db"), &addr);
    let s = stats(&agent.wait_for_line("STATS", |l| l.starts_with("STATS "), WAIT));
    agent.wait(WAIT);
    eprintln!("journal limit {limit} B: {s:?}");
    let flows = COUNT / FLOW_EVERY;
    assert_eq!(s["dropped_detections"], 0, "detections go last: {s:?}");
    assert!(
        s["dropped_flow_reports"] >= flows - 3,
        "flow reports went first: {s:?}"
    );
    assert!(
        s["dropped_flow_reports"] < flows,
        "what fits is kept: {s:?}"
    );
    // Every detection arrived, exactly once; the controller knows what was dropped.
    let detection_seqs: Vec<u64> = (1..=COUNT)
        .filter(|seq| !child_message(seq - 1, 0, FLOW_EVERY).0)
        .collect();
    assert_eq!(stored_seqs(&pki, &addr), detection_seqs);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nodes = rt.block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca()).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(pki.cert("viewer")).unwrap(),
                std::fs::read(pki.key("viewer")).unwrap(),
            ))
            .domain_name("localhost");
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        IncidentsClient::new(ch)
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
    });
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].dropped_flow_reports, s["dropped_flow_reports"]);
    assert_eq!(nodes[0].dropped_detections, 0);
    assert_eq!(
        nodes[0].last_seq, COUNT,
        "the newest flow report was kept and stored"
    );
}

/// The Python interpreter with grpcio, grpcio-reflection and
/// grpcio-health-checking: `EXFILGUARD_PYTHON`, else `python3` on PATH.
fn grpc_python() -> Option<String> {
    let python = std::env::var("EXFILGUARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import grpc, grpc_reflection, grpc_health"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

#[test]
fn a_generic_grpc_client_discovers_checks_health_and_lists_incidents() {
    let Some(python) = grpc_python() else {
        let reason = "python3 lacks grpcio, grpcio-reflection, grpcio-health-checking (run `cargo xtask setup`)";
        if std::env::var(exfilguard_tests::skip::REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!(
                "{}=1 but this test cannot run: {reason}",
                exfilguard_tests::skip::REQUIRE_ENV
            );
        }
        eprintln!("SKIPPED: {reason}");
        return;
    };
    let dir = TempDir::new("python");
    let pki = write_dev_pki(
        &dir.0.join("pki"),
        &["localhost".into()],
        &["node-a".into()],
    )
    .unwrap();
    let (_controller, addr) = start_controller(&pki, &dir.0.join("controller.db"), "127.0.0.1:0");
    let mut agent = start_agent(&pki, &addr, &dir.0.join("journal"), 3, 0);
    agent.wait_for_line("STATS", |l| l.starts_with("STATS "), WAIT);
    agent.wait(WAIT);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/generic_client.py");
    let out = exfilguard_tests::process::output(
        {
            let mut cmd = Command::new(&python);
            cmd.arg(&script)
                .arg(&addr)
                .arg(pki.ca())
                .arg(pki.cert("viewer"))
                .arg(pki.key("viewer"));
            cmd
        },
        "generic gRPC client",
        WAIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "generic client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("OK ") && stdout.contains("EXFIL-"),
        "{stdout}"
    );
}

/// The child side of the tests above; ignored unless re-run by them.
#[test]
#[ignore = "child process of the other tests in this file"]
fn child_process() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{role} child needs {k}"));
    let pki = DevPki {
        dir: PathBuf::from(var("PKI")),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match role.as_str() {
        "controller" => rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(var("LISTEN")).await.expect("bind");
            // Leading newline: libtest has printed "test child_process ... " without one.
            println!("\nLISTENING {}", listener.local_addr().unwrap());
            let config = ServerConfig::new(PathBuf::from(var("DB")), Some(server::TlsFiles { cert: pki.cert("controller"), key: pki.key("controller"), client_ca: pki.ca() }));
            server::serve(config, listener, std::future::pending()).await.expect("serve");
        }),
        "agent" => rt.block_on(async {
            let mut config = StreamConfig::new(var("ENDPOINT"), "node-a", var("JOURNAL"));
            config.tls = Some(TlsFiles {
                ca: pki.ca(),
                cert: pki.cert("agent-node-a"),
                key: pki.key("agent-node-a"),
                server_name: Some("localhost".into()),
            });
            config.capabilities = vec![Capability::Block];
            if let Ok(max) = std::env::var("JOURNAL_MAX") {
                config.journal_max_bytes = max.parse().expect("JOURNAL_MAX");
            }
            config.backoff_initial = Duration::from_millis(50);
            config.backoff_max = Duration::from_millis(500);
            let handle = Arc::new(StreamHandle::start(config).expect("start stream"));
            let mut commands = handle.commands().expect("commands");
            let h = handle.clone();
            // A real agent would apply these to the kernel maps; here every command is accepted.
            tokio::spawn(async move {
                while let Some(c) = commands.recv().await {
                    h.ack_command(c.seq, AckStatus::Ok, "");
                }
            });
            let count: u64 = var("COUNT").parse().unwrap();
            let first: u64 = var("FIRST").parse().unwrap();
            let flow_every: u64 = std::env::var("FLOW_EVERY").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut last_seq = 0;
            for i in 0..count {
                let (is_flow, bytes) = child_message(i, first, flow_every);
                last_seq = if is_flow {
                    handle.send_flow_report(prost::Message::decode(bytes.as_slice()).unwrap()).await
                } else {
                    handle.send_detection(prost::Message::decode(bytes.as_slice()).unwrap()).await
                }
                .expect("journal");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            println!("\nPRODUCED {count}");
            let deadline = Instant::now() + WAIT;
            while handle.stats().pending > 0 {
                assert!(Instant::now() < deadline, "journal not drained: {:?}", handle.stats());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let s = handle.stats();
            println!(
                "\nSTATS last_seq={last_seq} pending={} acked={} duplicates={} connects={} sent={} dropped={} dropped_flow_reports={} dropped_detections={}",
                s.pending,
                s.acked,
                s.duplicates,
                s.connects,
                s.sent,
                s.drops.flow_reports + s.drops.detections,
                s.drops.flow_reports,
                s.drops.detections
            );
        }),
        other => panic!("unknown child role {other}"),
    }
}
