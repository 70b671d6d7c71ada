//! `Incidents`: the security team's API. Reads need `viewer` or `responder`;
//! acknowledge and release need `responder`. An agent certificate gets
//! PERMISSION_DENIED on every call.

use std::{pin::Pin, sync::Arc};

use exfilguard_proto::v1::{
    AcknowledgeIncidentRequest, EvidenceItem, ExportEvidenceRequest, GetIncidentRequest,
    GetReportRequest, Incident, IncidentEvent, IncidentState, ListIncidentsRequest,
    ListIncidentsResponse, ListNodesRequest, ListNodesResponse, ReleaseIncidentRequest, Report,
    ReportFormat, ReportTemplate, ThrottleIncidentRequest, TopTalkersRequest, TopTalkersResponse,
    WatchIncidentsRequest, incidents_server,
};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    Error, Result,
    auth::{self, AuthMode, Identity, Role},
    correlate::workload_key,
    hub::Hub,
    report,
    store::{Cursor, Effect, IncidentFilter, Store},
    time::now_ms,
};

const READERS: &[Role] = &[Role::Viewer, Role::Responder];
const RESPONDERS: &[Role] = &[Role::Responder];
const MAX_ID: usize = 64;

/// The Incidents service.
pub struct IncidentsApi {
    mode: AuthMode,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    zone: chrono_tz::Tz,
}

impl IncidentsApi {
    /// An API over `store`, watching through `hub`.
    pub fn new(mode: AuthMode, store: Arc<dyn Store>, hub: Arc<Hub>) -> Self {
        Self {
            mode,
            store,
            hub,
            zone: chrono_tz::UTC,
        }
    }

    /// Local time zone of reports (default UTC).
    pub fn with_report_zone(mut self, zone: chrono_tz::Tz) -> Self {
        self.zone = zone;
        self
    }

    /// Runs a store call off the async runtime (SQLite blocks).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Error::Unavailable(format!("store task: {e}")))?
    }

    /// Hands committed effects (events, commands) to the hub; off the
    /// runtime, since delivering may write a timeline note (agent not
    /// connected).
    async fn deliver(&self, effects: Vec<Effect>) -> Result<(), Status> {
        let store = self.store.clone();
        let hub = self.hub.clone();
        tokio::task::spawn_blocking(move || hub.apply(store.as_ref(), effects))
            .await
            .map_err(|e| Status::internal(format!("hub task: {e}")))
    }
}

/// A responder's reason, trimmed and bounded; required because it goes
/// into the timeline.
fn required_reason(what: &str, reason: &str) -> Result<String> {
    let reason = reason.trim().chars().take(1024).collect::<String>();
    if reason.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{what} needs a reason (it goes into the timeline)"
        )));
    }
    Ok(reason)
}

fn check_id(id: &str) -> Result<String> {
    if id.len() > MAX_ID {
        // Not echoed: a huge id would make a huge status (a header).
        return Err(Error::InvalidArgument(format!(
            "an incident id has at most {MAX_ID} bytes; this one has {}",
            id.len()
        )));
    }
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{id:?} is not an incident id"
        )));
    }
    Ok(id.to_string())
}

fn actor(caller: &Option<Identity>) -> String {
    match caller {
        Some(id) => format!("{} ({})", id.name, id.role),
        // --insecure: nobody is authenticated, and the timeline says so.
        None => "unauthenticated (--insecure)".to_string(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<IncidentEvent, Status>> + Send>>;
type EvidenceStream = Pin<Box<dyn Stream<Item = Result<EvidenceItem, Status>> + Send>>;

#[tonic::async_trait]
impl incidents_server::Incidents for IncidentsApi {
    async fn list_incidents(
        &self,
        request: Request<ListIncidentsRequest>,
    ) -> Result<Response<ListIncidentsResponse>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let r = request.into_inner();
        let state = match IncidentState::try_from(r.state) {
            Ok(IncidentState::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                return Err(
                    Error::InvalidArgument(format!("state: unknown value {}", r.state)).into(),
                );
            }
        };
        let after =
            if r.page_token.is_empty() {
                None
            } else {
                Some(Cursor::decode(&r.page_token).ok_or_else(|| {
                    Error::InvalidArgument("page_token is not one we issued".into())
                })?)
            };
        let filter = IncidentFilter {
            state,
            namespace: (!r.namespace.is_empty()).then_some(r.namespace),
            since_ms: r.since_unix_ms,
            limit: match r.page_size {
                0 => 50,
                n => n.min(500),
            },
            after,
        };
        let page = self.blocking(move |s| s.list_incidents(&filter)).await?;
        Ok(Response::new(ListIncidentsResponse {
            incidents: page.incidents,
            next_page_token: page.next.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn get_incident(
        &self,
        request: Request<GetIncidentRequest>,
    ) -> Result<Response<Incident>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let id = check_id(&request.get_ref().id)?;
        Ok(Response::new(
            self.blocking(move |s| s.get_incident(&id)).await?,
        ))
    }

    type WatchIncidentsStream = WatchStream;

    async fn watch_incidents(
        &self,
        request: Request<WatchIncidentsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let namespace = request.into_inner().namespace;
        let mut rx = self.hub.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        let ns = event
                            .incident
                            .as_ref()
                            .and_then(|i| i.workload.as_ref())
                            .map(|w| w.namespace.as_str());
                        if !namespace.is_empty() && ns != Some(namespace.as_str()) {
                            continue;
                        }
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        // Tell the watcher instead of silently skipping; it can re-list.
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell behind and missed {n} events; list again"
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn acknowledge_incident(
        &self,
        request: Request<AcknowledgeIncidentRequest>,
    ) -> Result<Response<Incident>, Status> {
        let caller = auth::require(self.mode, &request, RESPONDERS)?;
        let r = request.into_inner();
        let id = check_id(&r.id)?;
        let note: String = r.note.chars().take(1024).collect();
        let who = actor(&caller);
        let incident = self
            .blocking(move |s| s.acknowledge(&id, &who, &note, now_ms()))
            .await?;
        self.hub.apply(
            self.store.as_ref(),
            vec![Effect::Incident {
                kind: exfilguard_proto::v1::IncidentEventKind::StateChanged,
                incident: Box::new(incident.clone()),
            }],
        );
        Ok(Response::new(incident))
    }

    async fn release_incident(
        &self,
        request: Request<ReleaseIncidentRequest>,
    ) -> Result<Response<Incident>, Status> {
        let caller = auth::require(self.mode, &request, RESPONDERS)?;
        let r = request.into_inner();
        let id = check_id(&r.id)?;
        let reason = required_reason("a release", &r.reason)?;
        let who = actor(&caller);
        let (incident, effects) = self
            .blocking(move |s| s.release(&id, &who, &reason, now_ms()))
            .await?;
        self.deliver(effects).await?;
        Ok(Response::new(incident))
    }

    async fn throttle_incident(
        &self,
        request: Request<ThrottleIncidentRequest>,
    ) -> Result<Response<Incident>, Status> {
        let caller = auth::require(self.mode, &request, RESPONDERS)?;
        let r = request.into_inner();
        let id = check_id(&r.id)?;
        let reason = required_reason("a throttle", &r.reason)?;
        if r.bytes > 0 && !(1..=86_400).contains(&r.window_seconds) {
            return Err(Error::InvalidArgument(format!(
                "window_seconds {} is not between 1 and 86400",
                r.window_seconds
            ))
            .into());
        }
        let who = actor(&caller);
        let (bytes, window) = (r.bytes, r.window_seconds);
        let (incident, effects) = self
            .blocking(move |s| s.throttle(&id, &who, bytes, window, &reason, now_ms()))
            .await?;
        self.deliver(effects).await?;
        Ok(Response::new(incident))
    }

    async fn get_report(
        &self,
        request: Request<GetReportRequest>,
    ) -> Result<Response<Report>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let r = request.into_inner();
        let id = check_id(&r.id)?;
        let format = ReportFormat::try_from(r.format)
            .map_err(|_| Error::InvalidArgument(format!("format: unknown value {}", r.format)))?;
        let template = match ReportTemplate::try_from(r.template) {
            Ok(ReportTemplate::Unspecified) => report::Template::Full,
            Ok(ReportTemplate::ExecutiveBrief) => report::Template::ExecutiveBrief,
            Ok(ReportTemplate::InternalEscalation) => report::Template::InternalEscalation,
            Ok(ReportTemplate::RegulatorNotification) => report::Template::RegulatorNotification,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "template: unknown value {}",
                    r.template
                ))
                .into());
            }
        };
        let zone = if r.time_zone.is_empty() {
            self.zone
        } else {
            report::parse_zone(&r.time_zone)
                .map_err(|m| Error::InvalidArgument(format!("time_zone: {m}")))?
        };
        let now = now_ms();
        let (incident, egress) = self
            .blocking(move |s| {
                let incident = s.get_incident(&id)?;
                let key = workload_key(
                    &incident.node,
                    &incident.workload.clone().unwrap_or_default(),
                );
                let from = incident
                    .opened_at_unix_ms
                    .saturating_sub(report::EGRESS_LOOKBACK_MS);
                let egress = s.egress_series(&key, from, now)?;
                Ok((incident, egress))
            })
            .await?;
        let (format, rformat) = match format {
            ReportFormat::Json => (ReportFormat::Json, report::Format::Json),
            ReportFormat::Html => (ReportFormat::Html, report::Format::Html),
            ReportFormat::Markdown | ReportFormat::Unspecified => {
                (ReportFormat::Markdown, report::Format::Markdown)
            }
        };
        let rendered = report::render(&incident, &egress, now, zone, rformat, template);
        Ok(Response::new(Report {
            id: incident.id,
            format: format as i32,
            content_type: rendered.content_type.into(),
            content: rendered.content,
        }))
    }

    async fn top_talkers(
        &self,
        request: Request<TopTalkersRequest>,
    ) -> Result<Response<TopTalkersResponse>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let r = request.into_inner();
        let window_ms = u64::from(if r.window_seconds == 0 {
            3600
        } else {
            r.window_seconds
        }) * 1000;
        let limit = match r.limit {
            0 => 10,
            n => n.min(1000),
        };
        let since = now_ms().saturating_sub(window_ms);
        let namespace = (!r.namespace.is_empty()).then_some(r.namespace);
        let talkers = self
            .blocking(move |s| s.top_talkers(since, limit, namespace.as_deref()))
            .await?;
        Ok(Response::new(TopTalkersResponse { talkers }))
    }

    type ExportEvidenceStream = EvidenceStream;

    async fn export_evidence(
        &self,
        request: Request<ExportEvidenceRequest>,
    ) -> Result<Response<EvidenceStream>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let id = check_id(&request.get_ref().incident_id)?;
        // Read in one go (one consistent snapshot of an append-only list; each
        // item is bounded), then streamed one message per item so no message
        // nears the size limit however many items there are.
        let items = self.blocking(move |s| s.evidence(&id)).await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            items.into_iter().map(Ok),
        ))))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        auth::require(self.mode, &request, READERS)?;
        let mut nodes = self.blocking(|s| s.list_nodes()).await?;
        for n in &mut nodes {
            n.connected = self.hub.is_connected(&n.name);
        }
        Ok(Response::new(ListNodesResponse { nodes }))
    }
}
