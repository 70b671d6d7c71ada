//! Client side of the controller's API: a channel with mutual TLS from
//! certificate files, and readable explanations of gRPC failures. Used by
//! exfilctl and by tests.

use std::{path::PathBuf, time::Duration};

use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{Error, Result};

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// `https://host:port` (or `http://` with `insecure`).
    pub endpoint: String,
    /// CA that signed the controller's certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate (role viewer or responder).
    pub cert: Option<PathBuf>,
    /// Client private key.
    pub key: Option<PathBuf>,
    /// Name to check in the controller's certificate (default: the endpoint's host).
    pub tls_server_name: Option<String>,
    /// Plain text.
    pub insecure: bool,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Connects (eagerly, so a TLS rejection shows up here with a clear message).
pub async fn connect(config: &ClientConfig) -> Result<Channel> {
    let mut endpoint = config.endpoint.clone();
    if !endpoint.contains("://") {
        endpoint = format!(
            "{}://{endpoint}",
            if config.insecure { "http" } else { "https" }
        );
    }
    let mut ep = Endpoint::from_shared(endpoint.clone())
        .map_err(|e| Error::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if !config.insecure {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &config.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?))
            }
            (None, None) => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "--cert and --key go together".into(),
                ));
            }
        }
        if let Some(name) = &config.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| Error::Certificate(format!("TLS configuration: {e}")))?;
    }
    let channel = ep
        .connect()
        .await
        .map_err(|e| Error::Unavailable(explain_transport(&endpoint, &e)))?;
    // With TLS 1.3 the server judges the client certificate after the client
    // considers the handshake done, so a rejected certificate only shows on
    // the first call, as a bare "cancelled" or "broken pipe". Probe with a
    // health check (open to any verified caller) so the rejection is reported
    // as what it is.
    if config.cert.is_some() && !config.insecure {
        let probe = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if let Err(status) = probe
            && matches!(
                status.code(),
                Code::Unknown | Code::Cancelled | Code::Unavailable
            )
        {
            let detail = std::error::Error::source(&status)
                .map(chain)
                .unwrap_or_else(|| status.message().to_string());
            return Err(Error::Unavailable(format!(
                "certificate rejected by controller at {endpoint} (is your certificate signed by the controller's client CA?): {detail}"
            )));
        }
    }
    Ok(channel)
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// A transport failure in words a responder can act on.
pub fn explain_transport(endpoint: &str, err: &(dyn std::error::Error + 'static)) -> String {
    let detail = chain(err);
    let lower = detail.to_ascii_lowercase();
    if lower.contains("unknownissuer") || lower.contains("invalid peer certificate") {
        format!("the controller's certificate is not trusted (check --ca): {detail}")
    } else if lower.contains("certificate")
        || lower.contains("alert")
        || lower.contains("handshake")
    {
        format!(
            "certificate rejected by controller at {endpoint} (is your certificate signed by its CA?): {detail}"
        )
    } else if lower.contains("connection refused") {
        format!("cannot reach the controller at {endpoint}: connection refused")
    } else {
        format!("cannot reach the controller at {endpoint}: {detail}")
    }
}

/// A gRPC status in words a responder can act on.
pub fn explain_status(status: &Status) -> String {
    match status.code() {
        Code::Unauthenticated => {
            "the controller needs a client certificate: pass --cert and --key (or set cert/key in the config file)".into()
        }
        Code::PermissionDenied => status.message().to_string(),
        Code::NotFound => status.message().to_string(),
        Code::Unavailable => {
            let mut text = format!("controller unavailable: {}", status.message());
            if let Some(src) = std::error::Error::source(status) {
                text = format!("controller unavailable: {}", chain(src));
                let lower = text.to_ascii_lowercase();
                if lower.contains("certificate") || lower.contains("alert") {
                    text = format!("certificate rejected by controller: {text}");
                }
            }
            text
        }
        code => match std::error::Error::source(status) {
            Some(src) => format!("{}: {}: {}", code.description(), status.message(), chain(src)),
            None => format!("{}: {}", code.description(), status.message()),
        },
    }
}
