//! exfilguard itself, as a person would run it standalone: the controller
//! (embedded SQLite, mutual TLS with generated certificates) and the agent
//! (its eBPF programs on the lab's cgroup), as separate processes, plus a
//! gRPC client for the lab's own checks and `exfilctl` for what people see.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use exfilguard_controller::{
    certs::{DevPki, write_dev_pki},
    client::{ClientConfig, connect},
};
use exfilguard_proto::v1::{
    GetIncidentRequest, Incident, ListIncidentsRequest, incidents_client::IncidentsClient,
};
use exfilguard_tests::{
    ChildGuard,
    process::{output, workspace_bin},
};
use tonic::transport::Channel;

const START: Duration = Duration::from_secs(30);
/// The agent's node name in the lab.
pub const NODE: &str = "lab-node";

/// What the stack is started with.
pub struct StackConfig<'a> {
    /// Output directory (certificates, SQLite file, journal, reports).
    pub out: &'a Path,
    /// cgroup the agent attaches to.
    pub attach: &'a Path,
    /// The cgroup v2 mount, for attribution.
    pub cgroup_root: &'a Path,
    /// The agent's policy file contents.
    pub agent_policy: &'a str,
    /// Cluster-internal CIDRs.
    pub internal: &'a [&'a str],
    /// The agent's `--poll-interval` (its default is `1s`).
    pub poll_interval: &'a str,
}

/// The running controller and agent.
pub struct Stack {
    /// Certificates.
    pub pki: DevPki,
    /// `https://localhost:PORT`.
    pub endpoint: String,
    /// The agent's `/metrics` address.
    pub metrics: SocketAddr,
    /// Where everything is written.
    pub out: PathBuf,
    // Fields drop in order: the agent first (it detaches its programs).
    /// The agent process.
    pub agent: ChildGuard,
    /// The controller process.
    _controller: ChildGuard,
    rt: tokio::runtime::Runtime,
    client: IncidentsClient<Channel>,
}

fn wait_for_file(path: &Path, controller: &ChildGuard) -> anyhow::Result<String> {
    let deadline = Instant::now() + START;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "the controller did not start within {START:?}:\n{}",
                controller.transcript()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Stack {
    /// Starts the controller, then the agent, and waits until the agent's
    /// stream is welcomed.
    pub fn start(c: &StackConfig<'_>) -> anyhow::Result<Self> {
        let out = c.out.to_path_buf();
        // A fresh store and journal each run; the CA is kept.
        for stale in [
            "controller.db",
            "controller.db-wal",
            "controller.db-shm",
            "addr",
        ] {
            let _ = std::fs::remove_file(out.join(stale));
        }
        let _ = std::fs::remove_dir_all(out.join("journal"));
        let pki = write_dev_pki(
            &out.join("pki"),
            &["localhost".into(), "127.0.0.1".into()],
            &[NODE.into()],
        )
        .context("writing the lab's certificates")?;
        let policy = out.join("agent-policy.yaml");
        std::fs::write(&policy, c.agent_policy).context("writing the agent policy")?;

        let addr_file = out.join("addr");
        let mut cmd = Command::new(workspace_bin("exfilguard-controller"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--db")
            .arg(out.join("controller.db"))
            .arg("--cert")
            .arg(pki.cert("controller"))
            .arg("--key")
            .arg(pki.key("controller"))
            .arg("--client-ca")
            .arg(pki.ca())
            .env("RUST_LOG", "info");
        let controller = ChildGuard::spawn(cmd, "exfilguard-controller");
        let addr: SocketAddr = wait_for_file(&addr_file, &controller)?
            .trim()
            .parse()
            .context("controller address")?;
        let endpoint = format!("https://localhost:{}", addr.port());

        let mut cmd = Command::new(workspace_bin("exfilguard-agent"));
        cmd.arg("run")
            .arg("--cgroup")
            .arg(c.attach)
            .arg("--cgroup-root")
            .arg(c.cgroup_root)
            .args(["--no-pin", "--metrics-addr", "127.0.0.1:0"])
            .args([
                "--poll-interval",
                c.poll_interval,
                "--report-interval",
                "1s",
            ])
            .args(["--node-name", NODE])
            .arg("--policy")
            .arg(&policy)
            .args(c.internal.iter().flat_map(|n| ["--internal", n]))
            .arg("--controller")
            .arg(&endpoint)
            .arg("--tls-ca")
            .arg(pki.ca())
            .arg("--tls-cert")
            .arg(pki.cert(&format!("agent-{NODE}")))
            .arg("--tls-key")
            .arg(pki.key(&format!("agent-{NODE}")))
            .arg("--journal-dir")
            .arg(out.join("journal"))
            .env("RUST_LOG", "info");
        let agent = ChildGuard::spawn(cmd, "exfilguard-agent");
        let line = agent.wait_for_line("metrics address", |l| l.contains("metrics on"), START);
        let metrics = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bound="))
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no metrics address in {line:?}"))?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let config = ClientConfig {
            endpoint: endpoint.clone(),
            ca: Some(pki.ca()),
            cert: Some(pki.cert("viewer")),
            key: Some(pki.key("viewer")),
            tls_server_name: None,
            insecure: false,
        };
        let channel = rt
            .block_on(connect(&config))
            .context("connecting to the controller")?;
        let client = IncidentsClient::new(channel);
        let stack = Self {
            pki,
            endpoint,
            metrics,
            out,
            agent,
            _controller: controller,
            rt,
            client,
        };
        stack.wait_for_agent()?;
        Ok(stack)
    }

    /// Waits until the controller lists the agent's node.
    fn wait_for_agent(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START;
        loop {
            let mut c = self.client.clone();
            let nodes = self
                .rt
                .block_on(c.list_nodes(exfilguard_proto::v1::ListNodesRequest {}))
                .map(|r| r.into_inner().nodes)
                .unwrap_or_default();
            if nodes.iter().any(|n| n.name == NODE && n.connected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not connect within {START:?}:\n{}",
                    self.agent.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every incident (newest first), with timelines.
    pub fn incidents(&self) -> anyhow::Result<Vec<Incident>> {
        let mut c = self.client.clone();
        let page = self
            .rt
            .block_on(c.list_incidents(ListIncidentsRequest {
                page_size: 100,
                ..Default::default()
            }))
            .context("listing incidents")?
            .into_inner();
        page.incidents
            .iter()
            .map(|i| self.incident(&i.id))
            .collect()
    }

    /// One incident, with its timeline.
    pub fn incident(&self, id: &str) -> anyhow::Result<Incident> {
        let mut c = self.client.clone();
        Ok(self
            .rt
            .block_on(c.get_incident(GetIncidentRequest { id: id.into() }))
            .with_context(|| format!("getting incident {id}"))?
            .into_inner())
    }

    /// Streams incident events to `each` on the runtime until the stack goes.
    pub fn watch(&self, each: impl Fn(exfilguard_proto::v1::IncidentEvent) + Send + 'static) {
        let mut c = self.client.clone();
        self.rt.spawn(async move {
            let Ok(resp) = c
                .watch_incidents(exfilguard_proto::v1::WatchIncidentsRequest::default())
                .await
            else {
                return;
            };
            let mut stream = resp.into_inner();
            while let Ok(Some(event)) = stream.message().await {
                each(event);
            }
        });
    }

    /// The exfilctl command line a person would type, as `role`.
    pub fn exfilctl_command(&self, role: &str) -> Command {
        let mut cmd = Command::new(workspace_bin("exfilctl"));
        cmd.arg("--endpoint")
            .arg(&self.endpoint)
            .arg("--ca")
            .arg(self.pki.ca())
            .arg("--cert")
            .arg(self.pki.cert(role))
            .arg("--key")
            .arg(self.pki.key(role));
        cmd
    }

    /// Runs exfilctl as `role` with `args`; fails on a non-zero exit.
    pub fn exfilctl(&self, role: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.exfilctl_command(role);
        cmd.args(args);
        let out = output(cmd, "exfilctl", START);
        if !out.status.success() {
            bail!(
                "exfilctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Writes an exfilctl config file for people poking at a kept lab.
    pub fn write_exfilctl_config(&self, role: &str) -> anyhow::Result<PathBuf> {
        let path = self.out.join(format!("exfilctl-{role}.yaml"));
        let text = format!(
            "endpoint: {}\nca: {}\ncert: {}\nkey: {}\n",
            self.endpoint,
            self.pki.ca().display(),
            self.pki.cert(role).display(),
            self.pki.key(role).display()
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
