//! The controller and exfilctl as real processes on loopback with mutual
//! TLS, driven by a real gRPC client speaking the agent protocol: detections
//! become incidents, exfilctl shows and releases them, `kill -9` loses and
//! duplicates nothing that was acknowledged, and bad callers get the right
//! status.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use exfilguard_controller::certs::{DevPki, write_dev_pki};
use exfilguard_proto::v1::{
    Ack, AckStatus, AcknowledgeIncidentRequest, AgentMessage, ControllerMessage, Detection,
    DetectionKind, Evidence, FlowReport, GetIncidentRequest, Hello, IncidentEventKind,
    ListIncidentsRequest, Severity, WatchIncidentsRequest, Workload, WorkloadEgress,
    agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
    incidents_client::IncidentsClient,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

const WAIT: Duration = Duration::from_secs(20);

fn pki(dir: &Path) -> DevPki {
    write_dev_pki(
        dir,
        &["localhost".into(), "127.0.0.1".into()],
        &["node-a".into(), "node-b".into()],
    )
    .unwrap_or_else(|e| panic!("write PKI in {}: {e}", dir.display()))
}

/// The contents of `path` once the controller has written it.
fn read_when_written(path: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(a) = std::fs::read_to_string(path) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "controller did not write {} in time",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A controller process; SIGKILLed on drop.
struct Controller {
    child: Child,
    addr: String,
}

impl Controller {
    fn start(pki: &DevPki, db: &Path, extra: &[&str]) -> Controller {
        let addr_file = db.with_extension(format!("addr-{}", std::process::id()));
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_exfilguard-controller"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
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
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        let addr = read_when_written(&addr_file);
        Controller { child, addr }
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// kill -9, and reap it.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the controller");
        self.child.wait().expect("reap the controller");
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn channel(
    endpoint: &str,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn as_role(c: &Controller, pki: &DevPki, name: &str) -> Channel {
    channel(
        &c.endpoint(),
        &pki.ca(),
        Some((pki.cert(name), pki.key(name))),
    )
    .await
    .unwrap_or_else(|e| panic!("connect as {name}: {e}"))
}

fn hello(node: &str) -> AgentMessage {
    AgentMessage {
        seq: 0,
        sent_at_unix_ms: 0,
        payload: Some(agent_message::Payload::Hello(Hello {
            node_name: node.into(),
            agent_version: "test".into(),
            kernel_release: "6.1".into(),
            ..Default::default()
        })),
    }
}

fn detection(seq: u64, pod: &str, severity: Severity, cgroup_id: u64) -> AgentMessage {
    AgentMessage {
        seq,
        sent_at_unix_ms: 1,
        payload: Some(agent_message::Payload::Detection(Detection {
            detection_id: format!("det-{seq}"),
            kind: DetectionKind::Volume as i32,
            severity: severity as i32,
            workload: Some(Workload {
                namespace: "shop".into(),
                pod: pod.into(),
                cgroup_id,
                ..Default::default()
            }),
            summary: format!("detection {seq}: 150 MB to 203.0.113.7:443 in 10 min"),
            bytes_estimate: 150_000_000,
            window_seconds: 600,
            threshold: 100_000_000,
            evidence: Some(Evidence::default()),
            ..Default::default()
        })),
    }
}

fn flow(seq: u64, pod: &str, bytes: u64) -> AgentMessage {
    AgentMessage {
        seq,
        sent_at_unix_ms: 1,
        payload: Some(agent_message::Payload::FlowReport(FlowReport {
            window_start_unix_ms: 0,
            window_end_unix_ms: exfilguard_controller::time::now_ms(),
            workloads: vec![WorkloadEgress {
                workload: Some(Workload {
                    namespace: "shop".into(),
                    pod: pod.into(),
                    ..Default::default()
                }),
                external_bytes: bytes,
                ..Default::default()
            }],
        })),
    }
}

/// One agent stream driven by the test.
struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<ControllerMessage>,
}

impl Agent {
    /// Opens a stream and says Hello; returns the Welcome's last stored seq.
    async fn open(ch: Channel, node: &str) -> Result<(Agent, u64), Status> {
        let (tx, out) = mpsc::channel(1024);
        tx.send(hello(node)).await.unwrap();
        let mut rx = AgentGatewayClient::new(ch)
            .connect(ReceiverStream::new(out))
            .await?
            .into_inner();
        let first = tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("Welcome in time")?
            .expect("a Welcome");
        let Some(controller_message::Payload::Welcome(w)) = first.payload else {
            panic!("not a Welcome: {first:?}")
        };
        Ok((Agent { tx, rx }, w.last_stored_seq))
    }

    async fn send(&self, msg: AgentMessage) {
        // The stream may already be closed by the controller; the status comes from `next`.
        let _ = self.tx.send(msg).await;
    }

    async fn next(&mut self) -> Result<Option<ControllerMessage>, Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("controller answered in time")
    }

    /// Reads until the stream fails; returns that status.
    async fn expect_error(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(s) => return s,
            }
        }
    }
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

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exfilctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "exfilctl JSON: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn detections_become_incidents_that_exfilctl_shows_contains_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let c = Controller::start(&pki, &dir.path().join("c.db"), &[]);
    runtime().block_on(async {
        // A watcher subscribed before anything happens sees the incidents open.
        let mut watch = IncidentsClient::new(as_role(&c, &pki, "viewer").await)
            .watch_incidents(WatchIncidentsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (mut agent, last) = Agent::open(as_role(&c, &pki, "agent-node-a").await, "node-a")
            .await
            .unwrap();
        assert_eq!(last, 0);
        agent
            .send(detection(1, "db-0", Severity::Critical, 42))
            .await;
        agent.send(detection(2, "web-1", Severity::High, 43)).await;
        agent.send(flow(3, "db-0", 5_000_000)).await;
        agent.send(detection(4, "db-0", Severity::High, 42)).await;
        let mut acked = BTreeSet::new();
        let mut block = None;
        while acked.len() < 4 || block.is_none() {
            let msg = agent.next().await.unwrap().expect("stream open");
            match msg.payload {
                Some(controller_message::Payload::Ack(a)) => {
                    assert_eq!(a.status, AckStatus::Ok as i32, "{a:?}");
                    acked.insert(a.seq);
                }
                Some(controller_message::Payload::Block(b)) => block = Some((msg.seq, b)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acked, BTreeSet::from([1, 2, 3, 4]));
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        assert_eq!(event.kind, IncidentEventKind::Opened as i32, "{event:?}");
        assert_eq!(event.incident.unwrap().workload.unwrap().pod, "db-0");
        let (block_seq, block) = block.unwrap();
        assert_eq!(block.cgroup_id, 42);
        // The agent applies the Block and says so; the timeline records it.
        agent
            .send(AgentMessage {
                seq: 0,
                sent_at_unix_ms: 0,
                payload: Some(agent_message::Payload::Ack(Ack {
                    seq: block_seq,
                    status: AckStatus::Ok as i32,
                    detail: String::new(),
                })),
            })
            .await;

        let list = json_of(&exfilctl(
            &c,
            &pki,
            "viewer",
            &["incidents", "list", "-o", "json"],
        ));
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 2, "{list:?}");
        let db = list
            .iter()
            .find(|i| i["workload"] == "shop/db-0")
            .expect("db-0 incident");
        assert_eq!(db["state"], "contained");
        assert_eq!(db["severity"], "critical");
        assert_eq!(db["detection_count"], 2);
        let id = db["id"].as_str().unwrap().to_string();
        assert!(
            id.starts_with("EXFIL-") && id.len() == "EXFIL-20261122-140312-7f3a".len(),
            "{id}"
        );

        // The agent's Block acknowledgement lands in the timeline (bounded wait).
        let deadline = Instant::now() + WAIT;
        loop {
            let show = json_of(&exfilctl(
                &c,
                &pki,
                "viewer",
                &["incidents", "show", &id, "-o", "json"],
            ));
            let causes: Vec<String> = show["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["cause"].as_str().unwrap().to_string())
                .collect();
            if causes
                .iter()
                .any(|c| c.contains("in-kernel Block applied on node-a"))
            {
                assert!(
                    causes[0].starts_with("opened: detection det-1"),
                    "{causes:?}"
                );
                assert_eq!(show["evidence"].as_array().unwrap().len(), 2);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Block ack never reached the timeline: {causes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let table = exfilctl(&c, &pki, "viewer", &["incidents", "list"]);
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
        assert!(table.contains(&id), "{table}");
        let yaml = exfilctl(&c, &pki, "viewer", &["nodes", "-o", "yaml"]);
        let yaml = String::from_utf8_lossy(&yaml.stdout);
        assert!(
            yaml.contains("name: node-a") && yaml.contains("connected: true"),
            "{yaml}"
        );
        let top = json_of(&exfilctl(&c, &pki, "viewer", &["top", "-o", "json"]));
        assert_eq!(top[0]["workload"], "shop/db-0");
        assert_eq!(top[0]["external_bytes"], 5_000_000);
        let report = exfilctl(&c, &pki, "viewer", &["incidents", "report", &id]);
        let report = String::from_utf8_lossy(&report.stdout);
        assert!(
            report.contains(&format!("# Incident {id}")) && report.contains("72-hour"),
            "{report}"
        );
        // HTML over the real API: self-contained, with the chart.
        let html = exfilctl(
            &c,
            &pki,
            "viewer",
            &["incidents", "report", &id, "--format", "html"],
        );
        let html = String::from_utf8_lossy(&html.stdout);
        assert!(
            html.starts_with("<!DOCTYPE html>") && html.contains("<svg id=\"egress-chart\""),
            "{html}"
        );
        // A draft in a requested zone, with its gaps marked.
        let brief = exfilctl(
            &c,
            &pki,
            "viewer",
            &[
                "incidents",
                "report",
                &id,
                "--template",
                "executive-brief",
                "--time-zone",
                "Europe/Berlin",
            ],
        );
        let brief = String::from_utf8_lossy(&brief.stdout);
        assert!(
            brief.contains("Time Sensitive Security Update")
                && brief.contains("Europe/Berlin")
                && brief.contains("[GAP:"),
            "{brief}"
        );
        let bad = exfilctl(
            &c,
            &pki,
            "viewer",
            &["incidents", "report", &id, "--time-zone", "Mars/Olympus"],
        );
        assert!(
            !bad.status.success()
                && String::from_utf8_lossy(&bad.stderr).contains("unknown time zone"),
            "{bad:?}"
        );

        // A viewer may not release; a responder may, and the agent gets the Unblock.
        let denied = exfilctl(
            &c,
            &pki,
            "viewer",
            &["incidents", "release", &id, "--reason", "test"],
        );
        assert!(!denied.status.success());
        assert!(
            String::from_utf8_lossy(&denied.stderr).contains("needs responder"),
            "{denied:?}"
        );
        let missing = exfilctl(
            &c,
            &pki,
            "viewer",
            &["incidents", "show", "EXFIL-20000101-000000-0000"],
        );
        assert!(
            String::from_utf8_lossy(&missing.stderr).contains("incident not found"),
            "{missing:?}"
        );
        let released = json_of(&exfilctl(
            &c,
            &pki,
            "responder",
            &[
                "incidents",
                "release",
                &id,
                "--reason",
                "owner confirmed backup job",
                "-o",
                "json",
            ],
        ));
        assert_eq!(released["state"], "released");
        let unblock = loop {
            let msg = agent.next().await.unwrap().expect("stream open");
            if let Some(controller_message::Payload::Unblock(u)) = msg.payload {
                break u;
            }
        };
        assert_eq!(
            (unblock.incident_id.as_str(), unblock.cgroup_id),
            (id.as_str(), 42)
        );
        let open = json_of(&exfilctl(
            &c,
            &pki,
            "viewer",
            &["incidents", "list", "--state", "released", "-o", "json"],
        ));
        assert_eq!(open.as_array().unwrap().len(), 1);
    });
}

#[test]
fn kill_9_mid_stream_loses_and_duplicates_no_acknowledged_detection() {
    const TOTAL: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let db = dir.path().join("c.db");
    let c = Controller::start(&pki, &db, &[]);
    let rt = runtime();
    let acked_before_kill = rt.block_on(async {
        let (mut agent, _) = Agent::open(as_role(&c, &pki, "agent-node-a").await, "node-a")
            .await
            .unwrap();
        for seq in 1..=TOTAL {
            agent
                .send(detection(
                    seq,
                    &format!("pod-{}", seq % 10),
                    Severity::High,
                    seq,
                ))
                .await;
        }
        let mut acked = BTreeSet::new();
        // Kill while messages are still in flight: after some acks, not all.
        while acked.len() < 40 {
            if let Some(controller_message::Payload::Ack(a)) =
                agent.next().await.unwrap().unwrap().payload
            {
                acked.insert(a.seq);
            }
        }
        acked
    });
    c.kill9();
    let c = Controller::start(&pki, &db, &[]);
    rt.block_on(async {
        let (mut agent, last_stored) =
            Agent::open(as_role(&c, &pki, "agent-node-a").await, "node-a")
                .await
                .unwrap();
        let max_acked = *acked_before_kill.iter().max().unwrap();
        assert!(
            last_stored >= max_acked,
            "acknowledged {max_acked} but the store only has {last_stored}"
        );
        // Resend everything not acknowledged, as the agent's journal would:
        // stored-but-unacked ones come back as duplicates.
        let resend: Vec<u64> = (1..=TOTAL)
            .filter(|s| !acked_before_kill.contains(s))
            .collect();
        for &seq in &resend {
            agent
                .send(detection(
                    seq,
                    &format!("pod-{}", seq % 10),
                    Severity::High,
                    seq,
                ))
                .await;
        }
        let (mut new, mut dup) = (0, 0);
        for _ in &resend {
            match agent.next().await.unwrap().unwrap().payload {
                Some(controller_message::Payload::Ack(a)) if a.status == AckStatus::Ok as i32 => {
                    new += 1
                }
                Some(controller_message::Payload::Ack(a))
                    if a.status == AckStatus::Duplicate as i32 =>
                {
                    assert!(
                        a.seq <= last_stored,
                        "{a:?} above the stored high-water {last_stored}"
                    );
                    dup += 1
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(new + dup, resend.len());
        eprintln!(
            "acked before kill: {}; resent after restart: {} ({new} new, {dup} already stored)",
            acked_before_kill.len(),
            resend.len()
        );
        // Every detection exactly once: the evidence of all incidents holds 1..=TOTAL with no repeats.
        let mut api = IncidentsClient::new(as_role(&c, &pki, "viewer").await);
        let list = api
            .list_incidents(ListIncidentsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.incidents.len(), 10);
        let mut seqs = Vec::new();
        for i in &list.incidents {
            let full = api
                .get_incident(GetIncidentRequest { id: i.id.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(full.detection_count as usize, full.evidence.len());
            seqs.extend(full.evidence.iter().map(|e| e.seq));
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=TOTAL).collect::<Vec<_>>(),
            "every detection stored exactly once"
        );
    });
}

/// Sends arbitrary bytes as a stream message: what a broken or hostile client can do.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct ProstDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes_buf::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ProstDecoder {
    type Item = ControllerMessage;
    type Error = Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ControllerMessage>, Status> {
        use prost::Message;
        ControllerMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ControllerMessage;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder {
        ProstDecoder
    }
}

mod bytes_buf {
    pub use prost::bytes::BufMut;
}

async fn raw_stream(ch: Channel, first: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/exfilguard.v1.AgentGateway/Connect");
    let result = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await;
    drop(tx);
    match result {
        Err(s) => s,
        Ok(resp) => {
            let mut inbound = resp.into_inner();
            loop {
                match tokio::time::timeout(WAIT, inbound.message())
                    .await
                    .expect("status in time")
                {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without a status"),
                    Err(s) => return s,
                }
            }
        }
    }
}

#[test]
fn bad_callers_and_bad_messages_get_the_right_status_and_nothing_else_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let c = Controller::start(
        &pki,
        &dir.path().join("c.db"),
        &["--max-message-bytes", "65536"],
    );
    let other = tempfile::tempdir().unwrap();
    let foreign = write_dev_pki(other.path(), &["localhost".into()], &[]).unwrap();
    runtime().block_on(async {
        // A healthy stream that must survive everything below.
        let (mut good, _) = Agent::open(as_role(&c, &pki, "agent-node-a").await, "node-a").await.unwrap();

        // No client certificate.
        let anon = channel(&c.endpoint(), &pki.ca(), None).await.unwrap();
        let err = IncidentsClient::new(anon.clone()).list_incidents(ListIncidentsRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = Agent::open(anon, "node-a").await.err().expect("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

        // Wrong roles.
        let err = IncidentsClient::new(as_role(&c, &pki, "agent-node-b").await)
            .list_incidents(ListIncidentsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let err = Agent::open(as_role(&c, &pki, "responder").await, "node-b").await.err().expect("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let err = IncidentsClient::new(as_role(&c, &pki, "viewer").await)
            .acknowledge_incident(AcknowledgeIncidentRequest { id: "EXFIL-x".into(), note: String::new() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        // An agent certificate speaks only for its own node.
        let err = Agent::open(as_role(&c, &pki, "agent-node-b").await, "node-a").await.err().expect("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        // A second stream for a node that has one.
        let err = Agent::open(as_role(&c, &pki, "agent-node-a").await, "node-a").await.err().expect("refused");
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

        // Protocol violations on node-b's stream, one stream each.
        let b = as_role(&c, &pki, "agent-node-b").await;
        let cases: Vec<(&str, Vec<AgentMessage>, Code)> = vec![
            ("replayed Hello", vec![hello("node-b")], Code::FailedPrecondition),
            ("unknown severity", vec![{
                let mut m = detection(1, "p", Severity::High, 1);
                if let Some(agent_message::Payload::Detection(d)) = &mut m.payload {
                    d.severity = 99;
                }
                m
            }], Code::InvalidArgument),
            ("sequence number 0", vec![detection(0, "p", Severity::High, 1)], Code::InvalidArgument),
            ("backwards", vec![detection(5, "p", Severity::High, 1), detection(4, "p", Severity::High, 1)], Code::InvalidArgument),
            ("lying leap", vec![detection(1 << 40, "p", Severity::High, 1)], Code::InvalidArgument),
            ("empty message", vec![AgentMessage::default()], Code::InvalidArgument),
            ("oversized", vec![{
                let mut m = detection(10, "p", Severity::High, 1);
                if let Some(agent_message::Payload::Detection(d)) = &mut m.payload {
                    d.evidence = Some(Evidence { registered_domain: "x".repeat(100_000), ..Default::default() });
                }
                m
            }], Code::OutOfRange),
        ];
        for (name, msgs, code) in cases {
            let (mut agent, _) = Agent::open(b.clone(), "node-b").await.unwrap_or_else(|e| panic!("{name}: open: {e:?}"));
            for m in msgs {
                agent.send(m).await;
            }
            let status = agent.expect_error().await;
            assert_eq!(status.code(), code, "{name}: {status:?}");
            // The stream is gone, so the node may connect again (bounded wait for cleanup).
            drop(agent);
        }
        // A Hello with a capability the contract does not know.
        let (tx, out) = mpsc::channel(4);
        let mut bad_hello = hello("node-b");
        if let Some(agent_message::Payload::Hello(h)) = &mut bad_hello.payload {
            h.capabilities = vec![99];
        }
        tx.send(bad_hello).await.unwrap();
        let err = AgentGatewayClient::new(b.clone()).connect(ReceiverStream::new(out)).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        // First message not Hello.
        let (tx, out) = mpsc::channel(4);
        tx.send(detection(1, "p", Severity::High, 1)).await.unwrap();
        let err = AgentGatewayClient::new(b.clone()).connect(ReceiverStream::new(out)).await.expect_err("refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        // Bytes that are not a protobuf message.
        let status = raw_stream(b.clone(), vec![0xff; 12]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // A certificate from another CA never gets through the handshake, and exfilctl says why.
        let out = Command::new(env!("CARGO_BIN_EXE_exfilctl"))
            .args(["--endpoint", &c.endpoint(), "--tls-server-name", "localhost", "incidents", "list"])
            .arg("--ca")
            .arg(pki.ca())
            .arg("--cert")
            .arg(foreign.cert("viewer"))
            .arg("--key")
            .arg(foreign.key("viewer"))
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("certificate rejected by controller"), "{stderr}");

        // None of that disturbed the healthy stream.
        good.send(detection(1, "db-0", Severity::High, 7)).await;
        let msg = good.next().await.unwrap().unwrap();
        assert!(
            matches!(msg.payload, Some(controller_message::Payload::Ack(Ack { seq: 1, status, .. })) if status == AckStatus::Ok as i32),
            "{msg:?}"
        );
    });
}

#[test]
fn health_and_reflection_describe_the_services() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let c = Controller::start(&pki, &dir.path().join("c.db"), &[]);
    runtime().block_on(async {
        let ch = as_role(&c, &pki, "viewer").await;
        for service in ["exfilguard.v1.Incidents", "exfilguard.v1.AgentGateway", ""] {
            let status = HealthClient::new(ch.clone())
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health {service:?}: {e:?}"))
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service}");
        }
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("{msg:?}")
        };
        let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "exfilguard.v1.Incidents",
            "exfilguard.v1.AgentGateway",
            "grpc.health.v1.Health",
        ] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
    });
}

#[test]
fn insecure_mode_serves_plain_text_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_exfilguard-controller"))
        .args(["serve", "--insecure", "--listen", "127.0.0.1:0"])
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--db")
        .arg(dir.path().join("c.db"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "insecure controller did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Command::new(env!("CARGO_BIN_EXE_exfilctl"))
        .args([
            "--insecure",
            "--endpoint",
            &format!("http://{addr}"),
            "nodes",
            "-o",
            "json",
        ])
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let _ = child.kill();
    let status = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let log = String::from_utf8_lossy(&status.stderr);
    assert!(
        log.contains("--insecure: plain-text gRPC, no authentication"),
        "{log}"
    );
    // Without --insecure the controller refuses to start without certificates.
    let refused = Command::new(env!("CARGO_BIN_EXE_exfilguard-controller"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("d.db"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--cert"),
        "{refused:?}"
    );
}

#[test]
fn kubernetes_on_without_a_cluster_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str], kubeconfig: &Path| {
        Command::new(env!("CARGO_BIN_EXE_exfilguard-controller"))
            .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.path().join("c.db"))
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("EXFILGUARD_KUBERNETES")
            .output()
            .unwrap()
    };
    let missing = dir.path().join("no-such-kubeconfig");
    let out = serve(&["--kubernetes", "on"], &missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Kubernetes client"), "{err}");
    // A CIDR that is not one is refused before anything starts.
    let out = serve(
        &["--kubernetes", "off", "--lockdown-keep-cidr", "10.0.0.0/33"],
        &missing,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--lockdown-keep-cidr \"10.0.0.0/33\" is not a CIDR"),
        "{err}"
    );
}

#[test]
fn an_egress_retention_under_an_hour_or_without_a_unit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (value, says) in [("10m", "at least 1h"), ("30", "has no unit")] {
        let out = Command::new(env!("CARGO_BIN_EXE_exfilguard-controller"))
            .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.path().join("c.db"))
            .args(["--kubernetes", "off", "--egress-retention", value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("--egress-retention") && err.contains(says),
            "{err}"
        );
    }
}

/// A webhook sink on 127.0.0.1 that answers 503 while `down`, and otherwise
/// records each alert's idempotency key (what it processed).
mod webhook {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use axum::{Router, http::HeaderMap, http::StatusCode};

    #[derive(Default)]
    pub struct Sink {
        pub down: AtomicBool,
        pub refused: AtomicUsize,
        pub processed: Mutex<Vec<String>>,
    }

    pub async fn start() -> (Arc<Sink>, String) {
        let sink = Arc::new(Sink::default());
        let state = sink.clone();
        let app = Router::new().fallback(move |headers: HeaderMap| {
            let state = state.clone();
            async move {
                if state.down.load(Ordering::SeqCst) {
                    state.refused.fetch_add(1, Ordering::SeqCst);
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                state.processed.lock().unwrap().push(key);
                StatusCode::OK
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/T0K3N", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (sink, url)
    }
}

#[test]
fn alerts_survive_kill_9_of_the_controller_and_reach_the_sink_once() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let db = dir.path().join("c.db");
    let rt = runtime();
    let (sink, url) = rt.block_on(webhook::start());
    sink.down.store(true, Ordering::SeqCst);
    // The URL (with its token) comes from a file, as a mounted Secret would.
    let url_file = dir.path().join("webhook-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let config = dir.path().join("controller.yaml");
    std::fs::write(
        &config,
        format!(
            "alerts:\n  retry: {{initial_backoff_ms: 100, max_backoff_ms: 500, max_attempts: 100}}\n  sinks:\n    - name: security-webhook\n      kind: webhook\n      url: {{file: {}}}\n",
            url_file.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let c = Controller::start(&pki, &db, &["--config", &config]);
    let id = rt.block_on(async {
        let (mut agent, _) = Agent::open(as_role(&c, &pki, "agent-node-a").await, "node-a")
            .await
            .unwrap();
        agent
            .send(detection(1, "db-0", Severity::Critical, 77))
            .await;
        // Acked (stored) and contained (Block sent).
        let mut acked = false;
        while !acked {
            if let Some(controller_message::Payload::Ack(a)) =
                agent.next().await.unwrap().unwrap().payload
            {
                acked = a.seq == 1;
            }
        }
        let deadline = Instant::now() + WAIT;
        while sink.refused.load(Ordering::SeqCst) < 3 {
            assert!(
                Instant::now() < deadline,
                "the controller did not try the sink"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let list = IncidentsClient::new(as_role(&c, &pki, "viewer").await)
            .list_incidents(ListIncidentsRequest::default())
            .await
            .unwrap()
            .into_inner();
        list.incidents[0].id.clone()
    });
    // Killed while its alerts are still pending; the sink comes back.
    c.kill9();
    assert!(sink.processed.lock().unwrap().is_empty());
    sink.down.store(false, Ordering::SeqCst);
    let c = Controller::start(&pki, &db, &["--config", &config]);
    let keys = |n: usize| {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = sink.processed.lock().unwrap().clone();
            if got.len() >= n {
                // Give a duplicate the chance to show up before judging.
                std::thread::sleep(Duration::from_millis(300));
                return sink.processed.lock().unwrap().clone();
            }
            assert!(Instant::now() < deadline, "alerts missing: {got:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(
        keys(2),
        [format!("{id}:opened"), format!("{id}:contained")],
        "after the restart"
    );
    // A release through exfilctl is announced too (the hub wakes the outbox).
    let released = exfilctl(
        &c,
        &pki,
        "responder",
        &["incidents", "release", &id, "--reason", "drill"],
    );
    assert!(released.status.success(), "{released:?}");
    assert_eq!(
        keys(3),
        [
            format!("{id}:opened"),
            format!("{id}:contained"),
            format!("{id}:released")
        ]
    );
    // The timeline records each delivery, and nowhere the secret URL.
    let show = json_of(&exfilctl(
        &c,
        &pki,
        "viewer",
        &["incidents", "show", &id, "-o", "json"],
    ));
    let timeline = show["timeline"].to_string();
    assert_eq!(
        timeline
            .matches("delivered to sink security-webhook")
            .count(),
        3,
        "{timeline}"
    );
    assert!(!timeline.contains("T0K3N"), "{timeline}");
}

/// The value of the sample named exactly `series` in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes `/metrics` until `ready` holds for it (the controller counts a
/// closed stream a moment after the client has gone); returns the text.
async fn scrape_until(addr: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        if ready(&text) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn metrics_count_stored_messages_their_latency_and_connected_agents() {
    const SENT: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let metrics_file = dir.path().join("metrics.addr");
    let c = Controller::start(
        &pki,
        &dir.path().join("c.db"),
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--metrics-addr-file",
            metrics_file.to_str().unwrap(),
        ],
    );
    let metrics = read_when_written(&metrics_file);
    let rt = runtime();
    let (c, pki) = (&c, &pki);
    rt.block_on(async {
        let acks = |n: u64| async move {
            let (mut agent, _) = Agent::open(as_role(c, pki, "agent-node-a").await, "node-a")
                .await
                .unwrap();
            for seq in 1..=n {
                agent.send(flow(seq, "web", 1000 * seq)).await;
            }
            let mut statuses = Vec::new();
            while (statuses.len() as u64) < n {
                if let Some(controller_message::Payload::Ack(a)) =
                    agent.next().await.unwrap().unwrap().payload
                {
                    statuses.push(a.status());
                }
            }
            (agent, statuses)
        };
        let (agent, statuses) = acks(SENT).await;
        assert!(statuses.iter().all(|s| *s == AckStatus::Ok));
        let text = scrape_until(&metrics, |_| true).await;
        let new = "exfilguard_controller_messages_total{outcome=\"new\"}";
        assert_eq!(sample(&text, new), Some(SENT as f64), "{text}");
        // Every acknowledged message was timed, and within the last bucket.
        let count = "exfilguard_controller_ingest_seconds_count";
        assert_eq!(sample(&text, count), Some(SENT as f64), "{text}");
        let within = "exfilguard_controller_ingest_seconds_bucket{le=\"10.0\"}";
        assert_eq!(sample(&text, within), Some(SENT as f64), "{text}");
        assert!(sample(&text, "exfilguard_controller_ingest_seconds_sum").unwrap() > 0.0);
        assert!(sample(&text, "exfilguard_controller_commit_seconds_count").unwrap() >= 1.0);
        let queued = "exfilguard_controller_queue_seconds_count";
        assert_eq!(sample(&text, queued), Some(SENT as f64), "{text}");
        let busy = "exfilguard_controller_writer_busy_seconds_total";
        assert!(sample(&text, busy).unwrap() > 0.0, "{text}");
        let streams = "exfilguard_controller_agent_streams";
        assert_eq!(sample(&text, streams), Some(1.0), "{text}");

        // The stream is counted until its session has ended (and the node
        // may connect again).
        drop(agent);
        let text = scrape_until(&metrics, |t| sample(t, streams) == Some(0.0)).await;
        assert_eq!(sample(&text, streams), Some(0.0), "{text}");

        // The agent reconnects and resends the first ten: duplicates.
        let (_agent, statuses) = acks(10).await;
        assert!(statuses.iter().all(|s| *s == AckStatus::Duplicate));
        let text = scrape_until(&metrics, |_| true).await;
        let dup = "exfilguard_controller_messages_total{outcome=\"duplicate\"}";
        assert_eq!(sample(&text, dup), Some(10.0), "{text}");
        assert_eq!(sample(&text, new), Some(SENT as f64), "{text}");
        assert_eq!(sample(&text, count), Some(SENT as f64 + 10.0), "{text}");
        assert_eq!(sample(&text, streams), Some(1.0), "{text}");
    });
}
