//! One delivery attempt over HTTP, and what its answer means for the outbox.

use std::time::{Duration, SystemTime};

use reqwest::{StatusCode, header::RETRY_AFTER};

use super::{
    alert::Alert,
    config::{Sink, SinkKind},
    render,
};

/// Header carrying the alert's key, so a webhook receiver can drop the
/// duplicates at-least-once delivery implies.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The sink took it (2xx).
    Delivered {
        /// HTTP status.
        status: u16,
    },
    /// Try again later: the sink is down, overloaded, or rate-limiting.
    Retry {
        /// Why (no URL in it: URLs carry tokens).
        reason: String,
        /// The sink's `Retry-After`, if it sent one.
        after: Option<Duration>,
    },
    /// The sink refused it for good (e.g. 400 bad routing key, 404); retrying cannot help.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// Makes the HTTP client all sinks share.
pub fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("exfilguard-controller/", env!("CARGO_PKG_VERSION")))
        .build()
}

fn endpoint(sink: &Sink) -> String {
    match sink.kind {
        SinkKind::Alertmanager => {
            format!("{}/api/v2/alerts", sink.url.expose().trim_end_matches('/'))
        }
        _ => sink.url.expose().to_string(),
    }
}

/// Sends `alert` to `sink` once.
pub async fn deliver(client: &reqwest::Client, sink: &Sink, alert: &Alert) -> Attempt {
    let response = client
        .post(endpoint(sink))
        .header(IDEMPOTENCY_HEADER, alert.key())
        .json(&render::body(sink, alert))
        .send()
        .await;
    let response = match response {
        Ok(r) => r,
        // Connection refused, timeout, TLS failure: the sink may come back.
        Err(e) => {
            return Attempt::Retry {
                reason: e.without_url().to_string(),
                after: None,
            };
        }
    };
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered {
            status: status.as_u16(),
        };
    }
    let after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // A short excerpt of the body says why; sinks do not echo secrets back.
    let text = response.text().await.unwrap_or_default();
    let excerpt: String = text.chars().take(200).collect();
    let reason = format!("HTTP {status}: {}", excerpt.trim());
    if retryable(status) {
        Attempt::Retry { reason, after }
    } else {
        Attempt::Rejected { reason }
    }
}

/// 5xx, 429 and 408 are the sink's trouble, not the alert's.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// `Retry-After` is seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_356_192);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 14:03:22 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 14:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn only_sink_trouble_is_retried() {
        assert!(retryable(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable(StatusCode::BAD_REQUEST));
        assert!(!retryable(StatusCode::NOT_FOUND));
    }
}
