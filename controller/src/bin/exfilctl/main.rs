//! exfilctl: the security team's CLI for the exfilguard controller.
//!
//! Endpoint and credentials come from flags, then `EXFILCTL_*` environment
//! variables, then a YAML config file (`--config`, default
//! `~/.config/exfilguard/exfilctl.yaml` when it exists).

mod args;
mod evidence;
mod output;

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, anyhow, bail};
use args::{Cli, Command, IncidentsCommand, ReportFormatArg, ReportTemplateArg, StateArg};
use clap::{CommandFactory, Parser};
use exfilguard_controller::client::{self, ClientConfig};
use exfilguard_proto::v1::{
    AcknowledgeIncidentRequest, GetIncidentRequest, GetReportRequest, IncidentState,
    ListIncidentsRequest, ListNodesRequest, ReleaseIncidentRequest, ReportFormat, ReportTemplate,
    ThrottleIncidentRequest, TopTalkersRequest, WatchIncidentsRequest,
    incidents_client::IncidentsClient,
};
use serde::Deserialize;
use tonic::transport::Channel;

/// The config file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    endpoint: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    tls_server_name: Option<String>,
    insecure: Option<bool>,
}

fn load_file_config(explicit: Option<&PathBuf>) -> anyhow::Result<FileConfig> {
    let path = match explicit {
        Some(p) => p.clone(),
        None => match std::env::var_os("HOME") {
            Some(home) => {
                let p = PathBuf::from(home).join(".config/exfilguard/exfilctl.yaml");
                if !p.exists() {
                    return Ok(FileConfig::default());
                }
                p
            }
            None => return Ok(FileConfig::default()),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read config {}", path.display()))?;
    serde_norway::from_str(&text).with_context(|| format!("parse config {}", path.display()))
}

fn client_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let file = load_file_config(cli.config.as_ref())?;
    Ok(ClientConfig {
        endpoint: cli
            .endpoint
            .clone()
            .or(file.endpoint)
            .unwrap_or_else(|| "https://localhost:7443".to_string()),
        ca: cli.ca.clone().or(file.ca),
        cert: cli.cert.clone().or(file.cert),
        key: cli.key.clone().or(file.key),
        tls_server_name: cli.tls_server_name.clone().or(file.tls_server_name),
        insecure: cli.insecure || file.insecure.unwrap_or(false),
    })
}

/// Parses `30s`, `15m`, `2h`, `7d`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a duration like 30s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("{s:?} is not a duration like 30s, 15m, 2h or 7d"),
    };
    Ok(Duration::from_secs(secs))
}

pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!(client::explain_status(&s))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "exfilctl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let config = client_config(&cli)?;
    let endpoint = config.endpoint.clone();
    let channel: Channel = client::connect(&config).await.map_err(|e| anyhow!("{e}"))?;
    let mut api = IncidentsClient::new(channel).max_decoding_message_size(64 << 20);
    let out = cli.output;
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Completions { .. } => unreachable!("handled above"),
        Command::Incidents { command } => match command {
            IncidentsCommand::List {
                state,
                namespace,
                since,
                limit,
                all,
            } => {
                let since_unix_ms = match since {
                    Some(s) => exfilguard_controller::time::now_ms()
                        .saturating_sub(parse_duration(&s)?.as_millis() as u64),
                    None => 0,
                };
                let mut incidents = Vec::new();
                let mut token = String::new();
                loop {
                    let page = api
                        .list_incidents(ListIncidentsRequest {
                            state: state.map_or(IncidentState::Unspecified, StateArg::into) as i32,
                            namespace: namespace.clone().unwrap_or_default(),
                            since_unix_ms,
                            page_size: limit,
                            page_token: token,
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    incidents.extend(page.incidents);
                    token = page.next_page_token;
                    if !all || token.is_empty() {
                        break;
                    }
                }
                output::incidents(&mut stdout, out, &incidents)?;
                if !all && !token.is_empty() {
                    eprintln!("(more incidents: use --all, or --limit)");
                }
            }
            IncidentsCommand::Show { id } => {
                let incident = api
                    .get_incident(GetIncidentRequest { id })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                output::incident(&mut stdout, out, &incident)?;
            }
            IncidentsCommand::Watch { namespace } => {
                let mut stream = api
                    .watch_incidents(WatchIncidentsRequest {
                        namespace: namespace.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                while let Some(event) = stream.message().await.map_err(status_err)? {
                    output::event(&mut stdout, out, &event)?;
                    stdout.flush()?;
                }
            }
            IncidentsCommand::Ack { id, note } => {
                let incident = api
                    .acknowledge_incident(AcknowledgeIncidentRequest {
                        id,
                        note: note.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                output::incident(&mut stdout, out, &incident)?;
            }
            IncidentsCommand::Release { id, reason } => {
                let incident = api
                    .release_incident(ReleaseIncidentRequest { id, reason })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                output::incident(&mut stdout, out, &incident)?;
            }
            IncidentsCommand::Throttle {
                id,
                bytes,
                window,
                lift,
                reason,
            } => {
                let window_seconds = if lift {
                    0
                } else {
                    u32::try_from(parse_duration(&window)?.as_secs())
                        .map_err(|_| anyhow::anyhow!("--window {window:?} is too long"))?
                };
                let incident = api
                    .throttle_incident(ThrottleIncidentRequest {
                        id,
                        bytes: if lift { 0 } else { bytes.unwrap_or(0) },
                        window_seconds,
                        reason,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                output::incident(&mut stdout, out, &incident)?;
            }
            IncidentsCommand::Evidence { id, out, force } => {
                let done = evidence::export(&mut api, &endpoint, &id, &out, force).await?;
                writeln!(
                    stdout,
                    "exported {} evidence item(s) of {id} to {}, every SHA-256 verified\nmanifest.json sha256 {}",
                    done.items,
                    done.dir.display(),
                    done.manifest_sha256
                )?;
            }
            IncidentsCommand::Report {
                id,
                format,
                template,
                time_zone,
            } => {
                let format = match format {
                    ReportFormatArg::Markdown => ReportFormat::Markdown,
                    ReportFormatArg::Html => ReportFormat::Html,
                    ReportFormatArg::Json => ReportFormat::Json,
                };
                let template = match template {
                    None => ReportTemplate::Unspecified,
                    Some(ReportTemplateArg::ExecutiveBrief) => ReportTemplate::ExecutiveBrief,
                    Some(ReportTemplateArg::InternalEscalation) => {
                        ReportTemplate::InternalEscalation
                    }
                    Some(ReportTemplateArg::RegulatorNotification) => {
                        ReportTemplate::RegulatorNotification
                    }
                };
                let report = api
                    .get_report(GetReportRequest {
                        id,
                        format: format as i32,
                        template: template as i32,
                        time_zone: time_zone.unwrap_or_default(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                writeln!(stdout, "{}", report.content)?;
            }
        },
        Command::Top {
            window,
            limit,
            namespace,
        } => {
            let window_seconds =
                u32::try_from(parse_duration(&window)?.as_secs()).context("--window too long")?;
            let talkers = api
                .top_talkers(TopTalkersRequest {
                    window_seconds,
                    limit,
                    namespace: namespace.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .talkers;
            output::talkers(&mut stdout, out, &talkers)?;
        }
        Command::Nodes => {
            let nodes = api
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .nodes;
            output::nodes(&mut stdout, out, &nodes)?;
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exfilctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
