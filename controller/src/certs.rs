//! Development PKI: a CA and the controller, agent and client certificates,
//! with roles encoded the way [`crate::auth`] reads them.
//!
//! For development, tests and the demo (`exfilguard-controller certs --out DIR`);
//! production clusters bring their own CA (cert-manager, SPIFFE) and only
//! need to put the same SAN URIs in the certificates.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{
    Error, Result,
    auth::{NODE_URI_PREFIX, ROLE_URI_PREFIX, Role},
};

/// A certificate and its private key, PEM and DER.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
    /// DER certificate.
    pub der: Vec<u8>,
}

/// The development CA.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Certificate(format!("{what}: {e}"))
}

impl CertificateAuthority {
    /// Makes a new self-signed CA.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "exfilguard development CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "exfilguard");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(cert_err("CA"))?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// Loads a CA written by [`CertificateAuthority::write`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err("CA certificate"))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// The CA certificate (PEM), what every party trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The controller's server certificate for `hosts` (DNS names or IP addresses).
    pub fn issue_server(&self, hosts: &[String]) -> Result<Issued> {
        self.issue(
            "exfilguard-controller",
            hosts,
            &[],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// An agent's client certificate for `node`.
    pub fn issue_agent(&self, node: &str) -> Result<Issued> {
        self.issue(
            &format!("agent {node}"),
            &[],
            &[
                format!("{ROLE_URI_PREFIX}agent"),
                format!("{NODE_URI_PREFIX}{node}"),
            ],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A person's (or tool's) client certificate with `role`.
    pub fn issue_client(&self, name: &str, role: Role) -> Result<Issued> {
        self.issue(
            name,
            &[],
            &[format!("{ROLE_URI_PREFIX}{role}")],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(
        &self,
        common_name: &str,
        hosts: &[String],
        uris: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Issued> {
        let key = KeyPair::generate().map_err(cert_err("key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(cert_err(common_name))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "exfilguard");
        for host in hosts {
            let san = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.as_str().try_into().map_err(cert_err(host))?),
            };
            params.subject_alt_names.push(san);
        }
        for uri in uris {
            params.subject_alt_names.push(SanType::URI(
                uri.as_str().try_into().map_err(cert_err(uri))?,
            ));
        }
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err(common_name))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}

/// What [`write_dev_pki`] writes.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// Directory holding everything.
    pub dir: PathBuf,
}

impl DevPki {
    /// `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `<name>.pem` (certificate).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// `<name>-key.pem` (private key).
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn write_issued(pki: &DevPki, name: &str, issued: &Issued) -> Result<()> {
    write(&pki.cert(name), &issued.cert_pem, false)?;
    write(&pki.key(name), &issued.key_pem, true)
}

/// Writes a development PKI into `dir`: `ca.pem`/`ca-key.pem` (reused when
/// present, so adding a node keeps existing certificates valid),
/// `controller.pem` for `hosts`, `agent-<node>.pem` per node, and
/// `viewer.pem` and `responder.pem` client certificates; keys as `*-key.pem` (0600).
pub fn write_dev_pki(dir: &Path, hosts: &[String], nodes: &[String]) -> Result<DevPki> {
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let pki = DevPki {
        dir: dir.to_path_buf(),
    };
    let (ca_cert, ca_key) = (pki.ca(), pki.key("ca"));
    let ca = if ca_cert.exists() && ca_key.exists() {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })
        };
        CertificateAuthority::load(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        let ca = CertificateAuthority::generate()?;
        write(&ca_cert, &ca.cert_pem, false)?;
        write(&ca_key, &ca.key_pem, true)?;
        ca
    };
    write_issued(&pki, "controller", &ca.issue_server(hosts)?)?;
    for node in nodes {
        write_issued(&pki, &format!("agent-{node}"), &ca.issue_agent(node)?)?;
    }
    write_issued(&pki, "viewer", &ca.issue_client("viewer", Role::Viewer)?)?;
    write_issued(
        &pki,
        "responder",
        &ca.issue_client("responder", Role::Responder)?,
    )?;
    Ok(pki)
}
