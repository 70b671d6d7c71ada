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

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
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
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("request #{i} ({} {}) never came", e.method, e.path))
            .unwrap_or_else(|| panic!("client gone before request #{i} ({} {})", e.method, e.path));
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
        let (code, body) = e.reply;
        let mut res = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *res.status_mut() = code;
        send.send_response(res);
    }
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
