//! One namespace of `ExfilIncident` objects (and `Lease`s) behind several
//! kube mock handles, so that several controller replicas in one test share
//! it with the API server's rules: `resourceVersion` bumps on every write, a
//! stale version is a 409, a second create is a 409, watches see every write
//! after the version they ask from. Only the requests the incident store and
//! the leader election make are understood; anything else fails the test.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use kube::client::Body;
use serde_json::{Value, json};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

use super::kube_mock::{Handle, parse_query, status};

type Respond = mock::SendResponse<Response<Body>>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    version: u64,
    /// Every write, as a watch event, with its version.
    events: Vec<(u64, Value)>,
    /// Watches waiting for a write after their version.
    held: Vec<(u64, Respond)>,
    /// Writes refused with a 409.
    conflicts: u64,
    /// Leases by name.
    leases: BTreeMap<String, Value>,
}

/// The shared namespace.
#[derive(Clone, Default)]
pub struct SharedApi {
    state: Arc<Mutex<State>>,
    base: String,
    leases: String,
}

fn reply(send: Respond, code: StatusCode, body: &Value) {
    let mut res = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
    *res.status_mut() = code;
    send.send_response(res);
}

fn events_body(events: &[&Value]) -> Body {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(e).unwrap());
        body.push(b'\n');
    }
    Body::from(body)
}

impl SharedApi {
    /// An empty namespace `ns`.
    pub fn new(ns: &str) -> Self {
        Self {
            state: Arc::default(),
            base: format!("/apis/exfilguard.io/v1alpha1/namespaces/{ns}/exfilincidents"),
            leases: format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
        }
    }

    /// Serves one client's requests until it is dropped.
    pub fn serve(&self, handle: Handle) -> tokio::task::JoinHandle<()> {
        let api = self.clone();
        tokio::spawn(async move {
            let mut handle = Box::pin(handle);
            while let Some((req, send)) = handle.next_request().await {
                api.handle(req, send).await;
            }
        })
    }

    /// The object named `name`, as stored.
    pub fn object(&self, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(name).cloned()
    }

    /// Writes refused as stale so far.
    pub fn conflicts(&self) -> u64 {
        self.state.lock().unwrap().conflicts
    }

    fn write(state: &mut State, name: &str, mut obj: Value, kind: &str) -> Value {
        state.version += 1;
        obj["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.objects.insert(name.to_string(), obj.clone());
        let event = json!({"type": kind, "object": obj});
        state.events.push((state.version, event.clone()));
        for (_, send) in state.held.drain(..) {
            let mut res = Response::new(events_body(&[&event]));
            *res.status_mut() = StatusCode::OK;
            send.send_response(res);
        }
        obj
    }

    /// The holder of lease `name`, if any.
    pub fn lease_holder(&self, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state.leases.get(name)?["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    }

    fn lease(state: &mut State, method: &Method, rest: &str, body: Value, send: Respond) {
        let name = rest.trim_start_matches('/').to_string();
        match (method.clone(), name.is_empty()) {
            (Method::GET, false) => match state.leases.get(&name) {
                Some(l) => reply(send, StatusCode::OK, l),
                None => {
                    let (code, v) = status(404, "NotFound", "not found");
                    reply(send, code, &v);
                }
            },
            (Method::POST, true) => {
                let name = body["metadata"]["name"].as_str().unwrap().to_string();
                if state.leases.contains_key(&name) {
                    let (code, v) = status(409, "AlreadyExists", "already exists");
                    reply(send, code, &v);
                    return;
                }
                state.version += 1;
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = json!(state.version.to_string());
                state.leases.insert(name, obj.clone());
                reply(send, StatusCode::CREATED, &obj);
            }
            (Method::PUT, false) => {
                let current = state.leases.get(&name).cloned();
                match current {
                    Some(c)
                        if c["metadata"]["resourceVersion"]
                            == body["metadata"]["resourceVersion"] =>
                    {
                        state.version += 1;
                        let mut obj = body;
                        obj["metadata"]["resourceVersion"] = json!(state.version.to_string());
                        state.leases.insert(name, obj.clone());
                        reply(send, StatusCode::OK, &obj);
                    }
                    Some(_) => {
                        let (code, v) = status(409, "Conflict", "the object has been modified");
                        reply(send, code, &v);
                    }
                    None => {
                        let (code, v) = status(404, "NotFound", "not found");
                        reply(send, code, &v);
                    }
                }
            }
            (m, _) => panic!("unexpected lease request {m} {rest}"),
        }
    }

    async fn handle(&self, req: Request<Body>, send: Respond) {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = parse_query(req.uri().query());
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let q = |k: &str| query.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let mut state = self.state.lock().unwrap();
        if let Some(rest) = path.strip_prefix(&self.leases) {
            return Self::lease(&mut state, &method, rest, body, send);
        }
        let rest = path
            .strip_prefix(&self.base)
            .unwrap_or_else(|| panic!("unexpected path {path}"));
        match (method, rest) {
            (Method::GET, "") if q("watch").as_deref() == Some("true") => {
                let from: u64 = q("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let newer: Vec<&Value> = state
                    .events
                    .iter()
                    .filter(|(v, _)| *v > from)
                    .map(|(_, e)| e)
                    .collect();
                if newer.is_empty() {
                    state.held.push((from, send));
                } else {
                    let mut res = Response::new(events_body(&newer));
                    *res.status_mut() = StatusCode::OK;
                    send.send_response(res);
                }
            }
            (Method::GET, "") => {
                let items: Vec<Value> = state.objects.values().cloned().collect();
                let list = json!({"apiVersion": "exfilguard.io/v1alpha1", "kind": "ExfilIncidentList",
                    "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
                reply(send, StatusCode::OK, &list);
            }
            (Method::POST, "") => {
                let name = body["metadata"]["name"].as_str().unwrap().to_string();
                if state.objects.contains_key(&name) {
                    state.conflicts += 1;
                    let (code, v) = status(409, "AlreadyExists", "already exists");
                    reply(send, code, &v);
                    return;
                }
                let mut obj = body;
                obj["apiVersion"] = json!("exfilguard.io/v1alpha1");
                obj["kind"] = json!("ExfilIncident");
                // The status is a subresource: a create does not set it.
                obj.as_object_mut().unwrap().remove("status");
                let made = Self::write(&mut state, &name, obj, "ADDED");
                reply(send, StatusCode::CREATED, &made);
            }
            (Method::PUT, r) if r.ends_with("/status") => {
                let name = r
                    .trim_start_matches('/')
                    .trim_end_matches("/status")
                    .to_string();
                let Some(current) = state.objects.get(&name).cloned() else {
                    let (code, v) = status(404, "NotFound", "not found");
                    reply(send, code, &v);
                    return;
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    state.conflicts += 1;
                    let (code, v) = status(409, "Conflict", "the object has been modified");
                    reply(send, code, &v);
                    return;
                }
                let mut obj = current;
                obj["status"] = body["status"].clone();
                let made = Self::write(&mut state, &name, obj, "MODIFIED");
                reply(send, StatusCode::OK, &made);
            }
            (Method::GET, r) => {
                let name = r.trim_start_matches('/');
                match state.objects.get(name) {
                    Some(o) => reply(send, StatusCode::OK, o),
                    None => {
                        let (code, v) = status(404, "NotFound", "not found");
                        reply(send, code, &v);
                    }
                }
            }
            (m, r) => panic!("unexpected request {m} {r}"),
        }
    }
}
