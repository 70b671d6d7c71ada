//! exfilctl's command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use clap_complete::Shell;
use exfilguard_proto::v1::IncidentState;

/// Command line.
#[derive(Parser)]
#[command(
    name = "exfilctl",
    version,
    about = "Query and respond to exfilguard incidents"
)]
pub struct Cli {
    /// Controller endpoint, e.g. https://controller.exfilguard:7443.
    #[arg(long, global = true, env = "EXFILCTL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// CA certificate that signed the controller's certificate (PEM).
    #[arg(long, global = true, env = "EXFILCTL_CA")]
    pub ca: Option<PathBuf>,
    /// Your client certificate (PEM; role viewer or responder).
    #[arg(long, global = true, env = "EXFILCTL_CERT")]
    pub cert: Option<PathBuf>,
    /// Your client key (PEM).
    #[arg(long, global = true, env = "EXFILCTL_KEY")]
    pub key: Option<PathBuf>,
    /// Server name to verify in the controller's certificate.
    #[arg(long, global = true, env = "EXFILCTL_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Plain text (only against a controller started with --insecure).
    #[arg(long, global = true, env = "EXFILCTL_INSECURE")]
    pub insecure: bool,
    /// YAML config with endpoint, ca, cert, key, tls_server_name, insecure
    /// (default ~/.config/exfilguard/exfilctl.yaml if present). Flags and env win.
    #[arg(long, global = true, env = "EXFILCTL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Top-level commands.
#[derive(Subcommand)]
pub enum Command {
    /// Incidents.
    Incidents {
        /// What to do with incidents.
        #[command(subcommand)]
        command: IncidentsCommand,
    },
    /// Workloads by external egress over a window.
    Top {
        /// Window back from now: 30s, 15m, 2h, 7d.
        #[arg(long, default_value = "1h")]
        window: String,
        /// Most workloads.
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Only this namespace.
        #[arg(long, short)]
        namespace: Option<String>,
    },
    /// Agents: versions, last seen, lag, journal drops.
    Nodes,
    /// Print shell completions. Example: exfilctl completions bash > /etc/bash_completion.d/exfilctl
    Completions {
        /// Shell.
        shell: Shell,
    },
}

/// Incident states for filters.
#[derive(Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Detected, not contained.
    Open,
    /// Lockdown applied.
    Contained,
    /// Released by a responder.
    Released,
    /// Closed without containment.
    Resolved,
}

impl From<StateArg> for IncidentState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Open => IncidentState::Open,
            StateArg::Contained => IncidentState::Contained,
            StateArg::Released => IncidentState::Released,
            StateArg::Resolved => IncidentState::Resolved,
        }
    }
}

/// Report formats.
#[derive(Clone, Copy, ValueEnum)]
pub enum ReportFormatArg {
    /// Markdown.
    Markdown,
    /// Self-contained HTML with the egress chart.
    Html,
    /// JSON.
    Json,
}

/// Documents drafted from an incident.
#[derive(Clone, Copy, ValueEnum)]
pub enum ReportTemplateArg {
    /// Short update for executives.
    ExecutiveBrief,
    /// Hand-over to the next escalation tier.
    InternalEscalation,
    /// GDPR Art. 33 breach notification draft.
    RegulatorNotification,
}

/// `exfilctl incidents ...`
#[derive(Subcommand)]
pub enum IncidentsCommand {
    /// List incidents, newest first.
    List {
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only this namespace.
        #[arg(long, short)]
        namespace: Option<String>,
        /// Only opened within this long: 30m, 24h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
    /// One incident with timeline and evidence.
    Show {
        /// Incident id (EXFIL-...).
        id: String,
    },
    /// Stream incident changes until interrupted.
    Watch {
        /// Only this namespace.
        #[arg(long, short)]
        namespace: Option<String>,
    },
    /// Acknowledge an incident (needs the responder role).
    Ack {
        /// Incident id.
        id: String,
        /// Note for the timeline.
        #[arg(long)]
        note: Option<String>,
    },
    /// Release a contained incident: lift the block (needs the responder role).
    Release {
        /// Incident id.
        id: String,
        /// Why (recorded in the timeline).
        #[arg(long)]
        reason: String,
    },
    /// Cap the workload's external egress in the kernel instead of (or
    /// besides) cutting it off (needs the responder role).
    ///
    /// Example: exfilctl incidents throttle EXFIL-… --bytes 1000000 --window 1m --reason "keep checkout alive"
    Throttle {
        /// Incident id.
        id: String,
        /// External egress bytes allowed per window.
        #[arg(long, required_unless_present = "lift")]
        bytes: Option<u64>,
        /// Window: 30s, 1m, 1h.
        #[arg(long, default_value = "1m")]
        window: String,
        /// Lift the cap instead.
        #[arg(long, conflicts_with = "bytes")]
        lift: bool,
        /// Why (recorded in the timeline).
        #[arg(long)]
        reason: String,
    },
    /// Export the incident's evidence: one file per item (the stored bytes,
    /// exact) and manifest.json with each item's kind, capture time, source,
    /// size and SHA-256; every file's hash is checked after writing.
    ///
    /// Example: exfilctl incidents evidence EXFIL-… --out ./EXFIL-…-evidence
    Evidence {
        /// Incident id.
        id: String,
        /// Directory to write into (created if missing; must be empty).
        #[arg(long)]
        out: PathBuf,
        /// Write into a non-empty directory (files of the same name are replaced).
        #[arg(long)]
        force: bool,
    },
    /// Render the incident report.
    Report {
        /// Incident id.
        id: String,
        /// Format.
        #[arg(long, value_enum, default_value = "markdown")]
        format: ReportFormatArg,
        /// Draft this document instead of the full report; gaps the system
        /// cannot fill are marked [GAP: ...].
        #[arg(long, value_enum)]
        template: Option<ReportTemplateArg>,
        /// IANA zone for local times (default: the controller's configured zone).
        #[arg(long)]
        time_zone: Option<String>,
    },
}
