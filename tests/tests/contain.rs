//! Detection to containment on real parts: the `exfilguard-agent` binary with
//! its eBPF programs on a test cgroup, the `exfilguard-controller` binary on a
//! SQLite file, mutual TLS on loopback, `exfilctl` as the responder, and real
//! TCP traffic from the workload's cgroup to a peer namespace.
//!
//! The agent's own policy file is the runbook default (100 MB in 10 minutes);
//! only the policy the controller pushes (1 MB, lockdown) makes the upload a
//! detection, so the test also proves PolicyUpdate reaches the kernel-side
//! agent. Run as root (`cargo xtask test`).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use exfilguard_controller::certs::{DevPki, write_dev_pki};
use exfilguard_tests::{
    ChildGuard, Lab, TestCgroup,
    cgroup::cgroup_root,
    kernel_test_guard,
    process::{output, workspace_bin},
    traffic::{self, TcpSink},
    unique_name,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("exfilguard-contain-{}", unique_name()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Controller + agent + PKI for one test.
struct Stack {
    pki: DevPki,
    port: u16,
    // Dropped first: the agent (it detaches its programs), then the controller.
    agent: ChildGuard,
    _controller: ChildGuard,
    _dir: TempDir,
}

impl Stack {
    fn start(attach: &TestCgroup, agent_policy: &str) -> Self {
        let dir = TempDir::new();
        let pki = write_dev_pki(
            &dir.0.join("pki"),
            &["localhost".into(), "127.0.0.1".into()],
            &["node-a".into()],
        )
        .expect("write dev PKI");
        let policy = dir.0.join("agent-policy.yaml");
        std::fs::write(&policy, agent_policy).expect("write agent policy");
        let addr_file = dir.0.join("addr");
        let mut c = Command::new(workspace_bin("exfilguard-controller"));
        c.args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--db")
            .arg(dir.0.join("controller.db"))
            .arg("--cert")
            .arg(pki.cert("controller"))
            .arg("--key")
            .arg(pki.key("controller"))
            .arg("--client-ca")
            .arg(pki.ca())
            .arg("--agent-policy")
            .arg(&policy)
            .env("RUST_LOG", "info");
        let controller = ChildGuard::spawn(c, "controller");
        let port = wait_for_file(&addr_file)
            .trim()
            .parse::<SocketAddr>()
            .expect("controller address")
            .port();
        let mut a = Command::new(workspace_bin("exfilguard-agent"));
        a.arg("run")
            .arg("--cgroup")
            .arg(attach.path())
            .arg("--cgroup-root")
            .arg(cgroup_root())
            .args([
                "--no-pin",
                "--metrics-addr",
                "off",
                "--poll-interval",
                "200ms",
                "--report-interval",
                "1s",
                "--node-name",
                "node-a",
            ])
            .arg("--controller")
            .arg(format!("https://localhost:{port}"))
            .arg("--tls-ca")
            .arg(pki.ca())
            .arg("--tls-cert")
            .arg(pki.cert("agent-node-a"))
            .arg("--tls-key")
            .arg(pki.key("agent-node-a"))
            .arg("--journal-dir")
            .arg(dir.0.join("journal"))
            .env("RUST_LOG", "info");
        let agent = ChildGuard::spawn(a, "agent");
        agent.wait_for_line(
            "the controller's policy applied",
            |l| l.contains("controller command applied") && l.contains("policy version"),
            WAIT,
        );
        Self {
            pki,
            port,
            agent,
            _controller: controller,
            _dir: dir,
        }
    }

    /// exfilctl as `role` with `args`, its exit status left to the caller.
    fn exfilctl_run(&self, role: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(workspace_bin("exfilctl"));
        cmd.arg("--endpoint")
            .arg(format!("https://localhost:{}", self.port))
            .arg("--ca")
            .arg(self.pki.ca())
            .arg("--cert")
            .arg(self.pki.cert(role))
            .arg("--key")
            .arg(self.pki.key(role))
            .args(args)
            .env("HOME", &self.pki.dir);
        output(cmd, "exfilctl", WAIT)
    }

    /// Runs exfilctl as `role` and parses its JSON output.
    fn exfilctl(&self, role: &str, args: &[&str]) -> Value {
        let out = self.exfilctl_run(role, &[&["--output", "json"], args].concat());
        assert!(
            out.status.success(),
            "exfilctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "exfilctl {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn incidents(&self) -> Vec<Value> {
        let v = self.exfilctl("viewer", &["incidents", "list"]);
        match v {
            Value::Array(a) => a,
            Value::Object(ref o) if o.contains_key("incidents") => {
                o["incidents"].as_array().cloned().unwrap_or_default()
            }
            other => panic!("unexpected incidents list: {other}"),
        }
    }

    /// Polls `show ID` until `pred` holds on the incident.
    fn wait_incident(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let i = self.exfilctl("viewer", &["incidents", "show", id]);
            if pred(&i) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "incident {id}: not {what} within {WAIT:?}: {i:#}\nagent:\n{}",
                self.agent.transcript()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn timeline_has(incident: &Value, needle: &str) -> bool {
    incident["timeline"].as_array().is_some_and(|t| {
        t.iter()
            .any(|e| e["cause"].as_str().is_some_and(|c| c.contains(needle)))
    })
}

#[test]
fn a_bulk_upload_is_detected_contained_in_the_kernel_and_released_by_a_responder() {
    if !kernel_test_guard(&["ip", "python3"]) {
        return;
    }
    let lab = Lab::new();
    // The agent watches `parent`; `app` exfiltrates, `bystander` shares the
    // node and must never be touched. Children are declared after the parent
    // so they are removed first.
    let parent = TestCgroup::new();
    let app = TestCgroup::under(parent.path());
    let bystander = TestCgroup::under(parent.path());
    let stack = Stack::start(
        &parent,
        "volume_threshold_bytes: 1000000\nvolume_window: 60s\naction: lockdown\n",
    );
    let sink = TcpSink::start(lab.peer(), (lab.peer_v4(), 9300).into());

    // Below the pushed threshold: no incident.
    traffic::send_tcp(lab.client(), &app, sink.addr(), 300_000);
    traffic::send_tcp(lab.client(), &bystander, sink.addr(), 300_000);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        stack.incidents().is_empty(),
        "an incident below the threshold"
    );

    // Across it.
    let crossed = Instant::now();
    traffic::send_tcp(lab.client(), &app, sink.addr(), 2_000_000);
    let deadline = Instant::now() + WAIT;
    let id = loop {
        if let Some(i) = stack.incidents().first() {
            break i["id"].as_str().expect("incident id").to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no incident within {WAIT:?}; agent:\n{}",
            stack.agent.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let contained = stack.wait_incident(&id, "contained with the Block applied", |i| {
        i["state"] == "contained" && timeline_has(i, "in-kernel Block applied on node-a")
    });
    let to_contain = crossed.elapsed();
    eprintln!("threshold crossed → Block applied in the kernel: {to_contain:?}");
    assert_eq!(contained["severity"], "critical");
    assert_eq!(contained["node"], "node-a");
    let rel = app.path().strip_prefix(cgroup_root()).unwrap();
    assert_eq!(contained["workload"], format!("/{}", rel.display()));
    assert!(
        contained["bytes_estimate"].as_u64().unwrap() >= 1_000_000,
        "{contained:#}"
    );

    // Contained: the workload's egress is dropped; the bystander's is not.
    let blocked = traffic::try_send_tcp(
        lab.client(),
        &app,
        sink.addr(),
        10_000,
        Duration::from_secs(2),
    );
    assert!(
        blocked.is_err(),
        "the contained workload still sends: {blocked:?}"
    );
    traffic::send_tcp(lab.client(), &bystander, sink.addr(), 10_000);

    // Exactly one incident, and only the app was blocked.
    let all = stack.incidents();
    assert_eq!(all.len(), 1, "{all:#?}");

    // A viewer may not release; a responder may.
    let denied = stack.exfilctl_run("viewer", &["incidents", "release", &id, "--reason", "nope"]);
    assert!(!denied.status.success(), "a viewer released an incident");

    stack.exfilctl(
        "responder",
        &["incidents", "release", &id, "--reason", "drill: backup job"],
    );
    let released = stack.wait_incident(&id, "released with the Unblock applied", |i| {
        i["state"] == "released" && timeline_has(i, "in-kernel Unblock applied on node-a")
    });
    assert!(timeline_has(&released, "drill: backup job"), "{released:#}");
    // Egress flows again (the episode going on does not re-contain it).
    traffic::send_tcp(lab.client(), &app, sink.addr(), 10_000);
    std::thread::sleep(Duration::from_millis(600));
    traffic::send_tcp(lab.client(), &app, sink.addr(), 10_000);
    let after = stack.exfilctl("viewer", &["incidents", "show", &id]);
    assert_eq!(after["state"], "released", "{after:#}");
    assert_eq!(stack.incidents().len(), 1);
}

#[test]
fn a_responder_throttles_an_open_incident_in_the_kernel_and_the_release_lifts_it() {
    if !kernel_test_guard(&["ip", "python3"]) {
        return;
    }
    let lab = Lab::new();
    let parent = TestCgroup::new();
    let app = TestCgroup::under(parent.path());
    // `alert`: the incident stays open and nothing is cut off by itself.
    let stack = Stack::start(
        &parent,
        "volume_threshold_bytes: 1000000\nvolume_window: 60s\naction: alert\n",
    );
    let tcp = TcpSink::start(lab.peer(), (lab.peer_v4(), 9301).into());
    let udp = traffic::UdpSink::start(lab.peer(), (lab.peer_v4(), 9302).into());
    traffic::send_tcp(lab.client(), &app, tcp.addr(), 2_000_000);
    let deadline = Instant::now() + WAIT;
    let id = loop {
        if let Some(i) = stack.incidents().first() {
            break i["id"].as_str().expect("incident id").to_string();
        }
        assert!(Instant::now() < deadline, "no incident");
        std::thread::sleep(Duration::from_millis(50));
    };
    let open = stack.exfilctl("viewer", &["incidents", "show", &id]);
    assert_eq!(open["state"], "open", "{open:#}");

    // A viewer may not throttle.
    let denied = stack.exfilctl_run(
        "viewer",
        &[
            "incidents",
            "throttle",
            &id,
            "--bytes",
            "1",
            "--reason",
            "x",
        ],
    );
    assert!(!denied.status.success(), "a viewer throttled an incident");

    const CAP: u64 = 100_000;
    stack.exfilctl(
        "responder",
        &[
            "incidents",
            "throttle",
            &id,
            "--bytes",
            &CAP.to_string(),
            "--window",
            "10m",
            "--reason",
            "keep it alive while we look",
        ],
    );
    stack.wait_incident(&id, "throttled in the kernel", |i| {
        timeline_has(i, "in-kernel SetCap applied on node-a")
    });
    // 1000-byte datagrams are 1028 bytes at IP level: at most 97 fit in the
    // budget (a little less when other egress of the workload shares the
    // window), plus at most one per CPU racing on the last bytes; the sender
    // stops at the first refusal (EPERM).
    let refused = traffic::try_send_udp(lab.client(), &app, udp.addr(), 400, 1000);
    assert!(refused.is_err(), "the cap did not refuse anything");
    let got = udp.collect(400, Duration::from_secs(2));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        got.units >= CAP / 1028 - 5 && got.units <= CAP / 1028 + cpus,
        "{} datagrams got through a {CAP} B cap",
        got.units
    );
    let still_open = stack.exfilctl("viewer", &["incidents", "show", &id]);
    assert_eq!(still_open["state"], "open", "a throttle is not a lockdown");

    stack.exfilctl(
        "responder",
        &[
            "incidents",
            "release",
            &id,
            "--reason",
            "checked: a report job",
        ],
    );
    stack.wait_incident(&id, "cap lifted", |i| {
        timeline_has(i, "in-kernel cap removal applied on node-a")
    });
    // Few enough to fit the receiver's socket buffer.
    traffic::send_udp(lab.client(), &app, udp.addr(), 50, 1000);
    assert_eq!(udp.collect(50, Duration::from_secs(5)).units, 50);
}
