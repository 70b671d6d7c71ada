//! Evidence export end to end: the controller as a real process on loopback
//! with mutual TLS, an agent stream opening an incident, `exfilctl incidents
//! evidence` writing the files and the manifest (checked with coreutils'
//! `sha256sum`), role checks and bad ids on `ExportEvidence`, the items
//! surviving a restart, and tampering with the stored bytes caught by the
//! export.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use exfilguard_controller::certs::{DevPki, write_dev_pki};
use exfilguard_proto::v1::{
    AgentMessage, ControllerMessage, Destination, Detection, DetectionKind, DnsSample, Evidence,
    ExportEvidenceRequest, Hello, ListIncidentsRequest, Severity, Workload,
    agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
    incidents_client::IncidentsClient,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

const WAIT: Duration = Duration::from_secs(20);

/// A controller process; SIGKILLed on drop.
struct Controller {
    child: Child,
    addr: String,
}

impl Controller {
    fn start(pki: &DevPki, db: &Path) -> Controller {
        let addr_file = db.with_extension(format!("addr-{}", std::process::id()));
        let _ = std::fs::remove_file(&addr_file);
        let child = Command::new(env!("CARGO_BIN_EXE_exfilguard-controller"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--db")
            .arg(db)
            .arg("--cert")
            .arg(pki.cert("controller"))
            .arg("--key")
            .arg(pki.key("controller"))
            .arg("--client-ca")
            .arg(pki.ca())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "controller did not start in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Controller { child, addr }
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn stop(mut self) {
        self.child.kill().expect("kill the controller");
        self.child.wait().expect("reap the controller");
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn channel(c: &Controller, pki: &DevPki, role: Option<&str>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca()).unwrap()))
        .domain_name("localhost");
    if let Some(role) = role {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(pki.cert(role)).unwrap(),
            std::fs::read(pki.key(role)).unwrap(),
        ));
    }
    Endpoint::from_shared(c.endpoint())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect as {role:?}: {e}"))
}

fn detection() -> AgentMessage {
    AgentMessage {
        seq: 1,
        sent_at_unix_ms: 1,
        payload: Some(agent_message::Payload::Detection(Detection {
            detection_id: "det-1".into(),
            kind: DetectionKind::DnsTunnel as i32,
            severity: Severity::High as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: "db-0".into(),
                cgroup_path: "/kubepods/burstable/pod1234/abcd".into(),
                cgroup_id: 42,
                ..Default::default()
            }),
            summary: "DNS tunnel to evil.example: 48 KB encoded in 900 queries".into(),
            bytes_estimate: 48_000,
            window_seconds: 60,
            threshold: 20_000,
            evidence: Some(Evidence {
                top_flows: vec![Destination {
                    address: "203.0.113.7".into(),
                    port: 53,
                    bytes: 90_000,
                    external: true,
                    ..Default::default()
                }],
                dns_samples: vec![DnsSample {
                    query_name: "mzxw6ytboi.evil.example".into(),
                    query_type: "TXT".into(),
                    response_code: "NOERROR".into(),
                    at_unix_ms: 1_795_356_192_000,
                }],
                registered_domain: "evil.example".into(),
                measurements: [("encoded_bytes_estimate".to_string(), 48_000.0)].into(),
            }),
            ..Default::default()
        })),
    }
}

/// Opens node-a's stream, sends the detection, waits for its Ack; returns the incident id.
async fn open_incident(c: &Controller, pki: &DevPki) -> String {
    let (tx, out) = mpsc::channel(16);
    tx.send(AgentMessage {
        seq: 0,
        sent_at_unix_ms: 0,
        payload: Some(agent_message::Payload::Hello(Hello {
            node_name: "node-a".into(),
            agent_version: "test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    tx.send(detection()).await.unwrap();
    let mut rx: Streaming<ControllerMessage> =
        AgentGatewayClient::new(channel(c, pki, Some("agent-node-a")).await)
            .connect(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
    loop {
        let msg = tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("Ack in time")
            .unwrap()
            .expect("stream open");
        if let Some(controller_message::Payload::Ack(a)) = msg.payload
            && a.seq == 1
        {
            break;
        }
    }
    drop(tx);
    let page = IncidentsClient::new(channel(c, pki, Some("viewer")).await)
        .list_incidents(ListIncidentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.incidents.len(), 1);
    page.incidents[0].id.clone()
}

fn exfilctl(c: &Controller, pki: &DevPki, role: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_exfilctl"))
        .arg("--endpoint")
        .arg(c.endpoint())
        .arg("--ca")
        .arg(pki.ca())
        .arg("--cert")
        .arg(pki.cert(role))
        .arg("--key")
        .arg(pki.key(role))
        .arg("--tls-server-name")
        .arg("localhost")
        .args(args)
        .env("HOME", pki.dir.as_os_str())
        .output()
        .expect("run exfilctl")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exfilctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// `sha256sum -c` over the manifest's files: the independent check a
/// reviewer would run.
fn sha256sum_check(dir: &Path, m: &Value) {
    let list: String = m["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}  {}\n",
                i["sha256"].as_str().unwrap(),
                i["file"].as_str().unwrap()
            )
        })
        .collect();
    std::fs::write(dir.join("SHA256SUMS.test"), list).unwrap();
    let out = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS.test"])
        .current_dir(dir)
        .output()
        .expect("run sha256sum (coreutils)");
    assert!(
        out.status.success(),
        "sha256sum disagrees with the manifest: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(dir.join("SHA256SUMS.test")).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pki(dir: &Path) -> DevPki {
    write_dev_pki(
        dir,
        &["localhost".into(), "127.0.0.1".into()],
        &["node-a".into()],
    )
    .unwrap()
}

#[test]
fn exfilctl_exports_evidence_that_sha256sum_confirms_and_catches_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let db = dir.path().join("c.db");
    let c = Controller::start(&pki, &db);
    let rt = runtime();
    let id = rt.block_on(open_incident(&c, &pki));

    // Export as a viewer.
    let out_dir = dir.path().join("export");
    let stdout = ok(&exfilctl(
        &c,
        &pki,
        "viewer",
        &[
            "incidents",
            "evidence",
            &id,
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ));
    assert!(stdout.contains("every SHA-256 verified"), "{stdout}");
    let m = manifest(&out_dir);
    assert_eq!(m["incident_id"], id.as_str());
    assert_eq!(m["controller_endpoint"], c.endpoint().as_str());
    assert!(m["exported_at"].as_str().unwrap().ends_with('Z'));
    let items = m["items"].as_array().unwrap();
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    // Standalone: the detection's items, no pod items.
    assert_eq!(
        kinds,
        ["detection", "workload", "flows", "dns_samples"],
        "{m:#}"
    );
    for i in items {
        assert_eq!(i["sha256_verified"], true);
        assert_eq!(i["media_type"], "application/json");
        assert_eq!(i["source"], "agent:node-a");
        assert!(i["captured_at"].as_str().unwrap().ends_with('Z'));
        assert!(i["captured_at_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
        let file = std::fs::read(out_dir.join(i["file"].as_str().unwrap())).unwrap();
        assert_eq!(file.len() as u64, i["size"].as_u64().unwrap());
    }
    sha256sum_check(&out_dir, &m);
    let dns: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join(items[3]["file"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(dns["samples"][0]["query_name"], "mzxw6ytboi.evil.example");
    assert_eq!(dns["measurements"]["encoded_bytes_estimate"], 48_000.0);
    let workload: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join(items[1]["file"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        workload["workload"]["cgroup_path"],
        "/kubepods/burstable/pod1234/abcd"
    );

    // A non-empty directory is refused without --force, accepted with it.
    let again = exfilctl(
        &c,
        &pki,
        "responder",
        &[
            "incidents",
            "evidence",
            &id,
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("is not empty") && err.contains("--force"),
        "{err}"
    );
    ok(&exfilctl(
        &c,
        &pki,
        "responder",
        &[
            "incidents",
            "evidence",
            &id,
            "--out",
            out_dir.to_str().unwrap(),
            "--force",
        ],
    ));
    // Unknown incident: a readable error, no panic.
    let unknown = exfilctl(
        &c,
        &pki,
        "viewer",
        &[
            "incidents",
            "evidence",
            "EXFIL-20990101-000000-0000",
            "--out",
            dir.path().join("u").to_str().unwrap(),
        ],
    );
    assert!(!unknown.status.success());
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        err.contains("incident not found: EXFIL-20990101-000000-0000"),
        "{err}"
    );

    // The items survive a restart, byte for byte.
    c.stop();
    let c = Controller::start(&pki, &db);
    let after = dir.path().join("after-restart");
    ok(&exfilctl(
        &c,
        &pki,
        "viewer",
        &[
            "incidents",
            "evidence",
            &id,
            "--out",
            after.to_str().unwrap(),
        ],
    ));
    let m2 = manifest(&after);
    for (a, b) in items.iter().zip(m2["items"].as_array().unwrap()) {
        assert_eq!((&a["sha256"], &a["item_id"]), (&b["sha256"], &b["item_id"]));
    }
    sha256sum_check(&after, &m2);

    // Tampering: someone with the database file drops the append-only
    // trigger and edits the flows item. The export must refuse to vouch for it.
    c.stop();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let refused = conn
            .execute(
                "UPDATE evidence SET content = CAST('{}' AS BLOB) WHERE kind = 'flows'",
                [],
            )
            .unwrap_err();
        assert!(refused.to_string().contains("append-only"), "{refused}");
        conn.execute_batch(
            "DROP TRIGGER evidence_append_only_update;
             UPDATE evidence SET content = CAST('{\"top_flows\":[]}' AS BLOB) WHERE kind = 'flows';",
        )
        .unwrap();
    }
    let c = Controller::start(&pki, &db);
    let tampered = dir.path().join("tampered");
    let out = exfilctl(
        &c,
        &pki,
        "viewer",
        &[
            "incidents",
            "evidence",
            &id,
            "--out",
            tampered.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "a tampered item was exported as good"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("EVIDENCE INTEGRITY FAILURE"), "{err}");
    assert!(err.contains("flows"), "{err}");
    let m3 = manifest(&tampered);
    let verified: Vec<bool> = m3["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sha256_verified"].as_bool().unwrap())
        .collect();
    assert_eq!(verified, [true, true, false, true]);
}

#[test]
fn export_evidence_is_for_viewers_and_responders_only_and_checks_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let c = Controller::start(&pki, &dir.path().join("c.db"));
    runtime().block_on(async {
        let id = open_incident(&c, &pki).await;
        let export = |ch: Channel, id: String| async move {
            let mut stream = IncidentsClient::new(ch)
                .export_evidence(ExportEvidenceRequest { incident_id: id })
                .await?
                .into_inner();
            let mut n = 0;
            while stream.message().await?.is_some() {
                n += 1;
            }
            Ok::<usize, tonic::Status>(n)
        };
        for role in ["viewer", "responder"] {
            let n = export(channel(&c, &pki, Some(role)).await, id.clone())
                .await
                .unwrap_or_else(|e| panic!("{role}: {e:?}"));
            assert_eq!(n, 4, "{role}");
        }
        let err = export(channel(&c, &pki, Some("agent-node-a")).await, id.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let err = export(channel(&c, &pki, None).await, id.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let viewer = channel(&c, &pki, Some("viewer")).await;
        let err = export(viewer.clone(), "EXFIL-nope".into())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        for bad in [
            String::new(),
            "X".repeat(1 << 20),
            "EXFIL-\u{0}\u{ffff}".repeat(10),
        ] {
            let err = export(viewer.clone(), bad.clone()).await.unwrap_err();
            assert_eq!(
                err.code(),
                Code::InvalidArgument,
                "{} bytes: {err:?}",
                bad.len()
            );
            assert!(err.message().len() < 4096, "the error echoes a huge id");
        }
        // The controller is still fine.
        assert_eq!(export(viewer, id).await.unwrap(), 4);
    });
}
