//! Who is calling: roles and node identity from the client certificate.
//!
//! A certificate carries its role as a SAN URI `spiffe://exfilguard/role/<role>`
//! (or, for certificates made elsewhere, as the subject's OU); an agent
//! certificate also names its node as `spiffe://exfilguard/node/<name>`, so a
//! node cannot speak for another. The TLS layer has already verified the chain
//! against the controller's CA; this module only reads what it says.

use std::fmt;

use tonic::Request;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{Error, Result};

/// SAN URI prefix that carries the role.
pub const ROLE_URI_PREFIX: &str = "spiffe://exfilguard/role/";
/// SAN URI prefix that carries an agent's node name.
pub const NODE_URI_PREFIX: &str = "spiffe://exfilguard/node/";

/// What a certificate may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node agent: may only open the agent stream.
    Agent,
    /// Reads incidents, reports, nodes.
    Viewer,
    /// A viewer that may also acknowledge and release.
    Responder,
}

impl Role {
    /// Parses the role name used in certificates.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "viewer" => Some(Role::Viewer),
            "responder" => Some(Role::Responder),
            _ => None,
        }
    }

    /// The role name used in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Viewer => "viewer",
            Role::Responder => "responder",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate's role.
    pub role: Role,
    /// Subject common name (for timeline entries: who released it).
    pub name: String,
    /// Node named by an agent certificate.
    pub node: Option<String>,
}

/// How the server authenticates callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Mutual TLS: every call needs a certificate with the right role.
    MutualTls,
    /// `--insecure`: plain text, no identities, everything allowed.
    Insecure,
}

/// The caller of a request, or `None` in insecure mode.
pub fn caller<T>(mode: AuthMode, request: &Request<T>) -> Result<Option<Identity>> {
    match mode {
        AuthMode::Insecure => Ok(None),
        AuthMode::MutualTls => {
            let certs = request.peer_certs().ok_or(Error::Unauthenticated)?;
            let leaf = certs.first().ok_or(Error::Unauthenticated)?;
            identity_from_der(leaf.as_ref()).map(Some)
        }
    }
}

/// Requires one of `allowed` roles; returns the caller (None when insecure).
pub fn require<T>(
    mode: AuthMode,
    request: &Request<T>,
    allowed: &[Role],
) -> Result<Option<Identity>> {
    let caller = caller(mode, request)?;
    if let Some(id) = &caller
        && !allowed.contains(&id.role)
    {
        let wanted: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        return Err(Error::PermissionDenied(format!(
            "certificate {:?} has role {}; this call needs {}",
            id.name,
            id.role,
            wanted.join(" or ")
        )));
    }
    Ok(caller)
}

/// Reads role, name and node from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<Identity> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| Error::PermissionDenied(format!("unreadable client certificate: {e}")))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let mut roles = Vec::new();
    let mut node = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general in &san.value.general_names {
            if let GeneralName::URI(uri) = general {
                if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    roles.push(role.to_string());
                } else if let Some(n) = uri.strip_prefix(NODE_URI_PREFIX) {
                    node = Some(n.to_string());
                }
            }
        }
    }
    if roles.is_empty() {
        for ou in cert.subject().iter_organizational_unit() {
            if let Ok(s) = ou.as_str() {
                roles.push(s.to_string());
            }
        }
    }
    // Exactly one role: a certificate claiming two would let the most
    // privileged one win silently.
    let role = match roles.as_slice() {
        [one] => Role::parse(one).ok_or_else(|| {
            Error::PermissionDenied(format!("certificate {name:?} has unknown role {one:?}"))
        })?,
        [] => {
            return Err(Error::PermissionDenied(format!(
                "certificate {name:?} names no role (SAN URI {ROLE_URI_PREFIX}<role> or OU)"
            )));
        }
        many => {
            return Err(Error::PermissionDenied(format!(
                "certificate {name:?} names several roles {many:?}"
            )));
        }
    };
    if role == Role::Agent && node.is_none() {
        return Err(Error::PermissionDenied(format!(
            "agent certificate {name:?} names no node ({NODE_URI_PREFIX}<name>)"
        )));
    }
    Ok(Identity { role, name, node })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    #[test]
    fn roles_and_nodes_come_from_the_certificate() {
        let ca = certs::CertificateAuthority::generate().unwrap();
        let agent = ca.issue_agent("node-a").unwrap();
        let id = identity_from_der(&agent.der).unwrap();
        assert_eq!(id.role, Role::Agent);
        assert_eq!(id.node.as_deref(), Some("node-a"));
        let responder = ca.issue_client("alice", Role::Responder).unwrap();
        let id = identity_from_der(&responder.der).unwrap();
        assert_eq!(
            (id.role, id.name.as_str(), id.node),
            (Role::Responder, "alice", None)
        );
        let server = ca.issue_server(&["localhost".into()]).unwrap();
        let err = identity_from_der(&server.der).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        assert!(identity_from_der(b"not a certificate").is_err());
    }
}
