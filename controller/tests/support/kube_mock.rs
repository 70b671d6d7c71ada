//! kube's `tower-test` mock API server, scripted: each expected request
//! (method, path, query, content type, body) and the answer it gets.

use std::{pin::Pin, time::Duration};

use kube::client::Body;
use serde_json::{Value, json};
use tonic::codegen::http::{Method, Request, Response, StatusCode};
use tower_test::mock;

/// The test's side of the mock API server.
pub type Handle = mock::Handle<Request<Body>, Response<Body>>;

pub fn status(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

pub fn ok(v: Value) -> (StatusCode, Value) {
    (StatusCode::OK, v)
}

/// One expected request and the answer the mock server gives.
pub struct Expect {
    method: Method,
    path: String,
    /// Query parameters, order-free.
    query: Vec<(&'static str, String)>,
    content_type: Option<&'static str>,
    /// Checks the JSON body (None: no body expected).
    body: Option<Box<dyn FnOnce(Value) + Send>>,
    reply: (StatusCode, Value),
}

pub fn expect(method: Method, path: &str) -> Expect {
    Expect {
        method,
        path: path.into(),
        query: vec![],
        content_type: None,
        body: None,
        reply: ok(json!({})),
    }
}

impl Expect {
    pub fn query(mut self, q: &[(&'static str, &str)]) -> Self {
        self.query = q.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        self
    }
    pub fn body(
        mut self,
        content_type: &'static str,
        check: impl FnOnce(Value) + Send + 'static,
    ) -> Self {
        self.content_type = Some(content_type);
        self.body = Some(Box::new(check));
        self
    }
    pub fn reply(mut self, r: (StatusCode, Value)) -> Self {
        self.reply = r;
        self
    }
}

/// A request's query parameters, sorted.
pub fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = q
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    v.sort();
    v
}

/// Answers the next requests with `script`, in order, checking each one.
pub async fn answer(handle: &mut Pin<Box<Handle>>, script: Vec<Expect>) {
    for (i, e) in script.into_iter().enumerate() {
        let (req, send) = next(handle, &format!("request #{i} ({} {})", e.method, e.path)).await;
        check_and_reply(i, e, req, send).await;
    }
}

/// Answers requests until every one of `script` came, in any order (matched
/// by method and path, first unmatched first); requests `background`
/// answers (another task's, such as evidence capture) may come in between.
pub async fn answer_unordered(
    handle: &mut Pin<Box<Handle>>,
    mut script: Vec<Expect>,
    background: &Background,
) {
    let mut i = 0;
    while !script.is_empty() {
        let (req, send) = next(handle, &format!("{} more expected requests", script.len())).await;
        if let Some(reply) = background(&req) {
            respond(send, reply);
            continue;
        }
        let Some(at) = script
            .iter()
            .position(|e| e.method == *req.method() && e.path == req.uri().path())
        else {
            panic!("unexpected request {} {}", req.method(), req.uri());
        };
        check_and_reply(i, script.remove(at), req, send).await;
        i += 1;
    }
}

/// Checks that no request other than `background`'s comes within `quiet`.
pub async fn no_request_but(
    handle: &mut Pin<Box<Handle>>,
    quiet: Duration,
    background: &Background,
) {
    let until = tokio::time::Instant::now() + quiet;
    while let Ok(Some((req, send))) = tokio::time::timeout_at(until, handle.next_request()).await {
        match background(&req) {
            Some(reply) => respond(send, reply),
            None => panic!("unexpected request {} {}", req.method(), req.uri()),
        }
    }
}

type Respond = mock::SendResponse<Response<Body>>;

/// Answers the requests of another task running alongside (`None`: not one
/// of its requests).
pub type Background = dyn Fn(&Request<Body>) -> Option<(StatusCode, Value)>;

async fn next(handle: &mut Pin<Box<Handle>>, what: &str) -> (Request<Body>, Respond) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("{what} never came"))
        .unwrap_or_else(|| panic!("client gone before {what}"))
}

fn respond(send: Respond, (code, body): (StatusCode, Value)) {
    let mut res = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *res.status_mut() = code;
    send.send_response(res);
}

async fn check_and_reply(i: usize, e: Expect, req: Request<Body>, send: Respond) {
    assert_eq!(req.method(), e.method, "request #{i}: {}", req.uri());
    assert_eq!(req.uri().path(), e.path, "request #{i}");
    let mut want: Vec<(String, String)> = e
        .query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    want.sort();
    assert_eq!(
        parse_query(req.uri().query()),
        want,
        "request #{i} query: {}",
        req.uri()
    );
    let ct = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    if let Some(want_ct) = e.content_type {
        assert_eq!(ct.as_deref(), Some(want_ct), "request #{i} content type");
    }
    let bytes = req.into_body().collect_bytes().await.unwrap();
    match e.body {
        Some(check) => check(
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|err| panic!("request #{i} body not JSON: {err}")),
        ),
        None => assert!(bytes.is_empty(), "request #{i}: unexpected body"),
    }
    respond(send, e.reply);
}

/// Checks that no request comes within `quiet`.
pub async fn no_request(handle: &mut Pin<Box<Handle>>, quiet: Duration) {
    if let Ok(Some((req, _))) = tokio::time::timeout(quiet, handle.next_request()).await {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

/// Serves `script` in order, checking each request, then checks that the
/// client makes no further request before it is dropped.
pub fn serve(handle: Handle, script: Vec<Expect>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut handle = Box::pin(handle);
        answer(&mut handle, script).await;
        // The client is dropped when the test is done with it: any request
        // before that is one too many.
        if let Some((req, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    })
}
