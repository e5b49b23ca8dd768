//! Certificate roles (docs/compatibility.md, Certificates and roles) and PEM loading.
//!
//! Roles come from the client certificate's subject, like Kubernetes node certificates:
//! `O=twill:nodes` makes the CN a node name, `O=twill:admins` makes the CN an admin.

use std::path::Path;

use thiserror::Error;
use x509_parser::prelude::*;

/// Organization (O) that marks a node (agent) certificate.
pub const NODES_GROUP: &str = "twill:nodes";
/// Organization (O) that marks an admin certificate.
pub const ADMINS_GROUP: &str = "twill:admins";
/// Organization (O) that marks a controller replica's certificate: with the etcd store,
/// replicas present it to each other when they forward a write to the leader.
pub const CONTROLLERS_GROUP: &str = "twill:controllers";

/// Why a certificate or key could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// What the file is for (e.g. "--tls-cert").
        what: String,
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable block.
    #[error("{what} {path} holds no PEM {expected}")]
    NoPem {
        /// What the file is for.
        what: String,
        /// The file.
        path: String,
        /// The expected PEM label, e.g. "CERTIFICATE".
        expected: String,
    },
    /// A certificate could not be parsed.
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    /// The certificate has no subject CN.
    #[error("certificate subject has no CN")]
    NoCommonName,
}

/// Who a client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject CN: a node name or a user name.
    pub name: String,
    /// The subject's organizations (O), e.g. `twill:nodes`.
    pub groups: Vec<String>,
    /// The start of the certificate's validity (Unix seconds): a revocation of the
    /// node refuses the certificates that start before it.
    pub not_before_unix: i64,
    /// The end of the certificate's validity (Unix seconds, inclusive as in X.509): TLS
    /// checks it only at the handshake, so a long-lived connection must check it again.
    pub not_after_unix: i64,
    /// SHA-256 of the certificate's public key (its SubjectPublicKeyInfo): a lease
    /// belongs to the key that took it.
    pub key_sha256: [u8; 32],
}

/// What a certificate's subject lets it do (docs/compatibility.md, Certificates and
/// roles). A certificate is of exactly one role; one that names several is of none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An agent: `O=twill:nodes`, the CN is the node it acts for.
    Node,
    /// An operator: `O=twill:admins`.
    Admin,
    /// A controller replica: `O=twill:controllers`.
    Controller,
}

impl Role {
    /// The name operators use for it (`twillctl certs revoke --role`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Admin => "admin",
            Role::Controller => "controller",
        }
    }
}

impl Identity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| TlsError::Parse(e.to_string()))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(TlsError::NoCommonName)?
            .to_string();
        let groups = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_string))
            .collect();
        Ok(Identity {
            name,
            groups,
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            key_sha256: spki_sha256(cert.public_key().raw),
        })
    }

    /// The certificate's role: `None` when it names no Twill group, or several.
    pub fn role(&self) -> Option<Role> {
        match (self.is_node(), self.is_admin(), self.is_controller()) {
            (true, false, false) => Some(Role::Node),
            (false, true, false) => Some(Role::Admin),
            (false, false, true) => Some(Role::Controller),
            _ => None,
        }
    }

    /// True once the certificate's validity has ended at `now_unix` (Unix seconds).
    pub fn expired(&self, now_unix: i64) -> bool {
        now_unix > self.not_after_unix
    }

    /// True for an agent's certificate (`O=twill:nodes`).
    pub fn is_node(&self) -> bool {
        self.groups.iter().any(|g| g == NODES_GROUP)
    }

    /// True for an operator's certificate (`O=twill:admins`).
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == ADMINS_GROUP)
    }

    /// True for a controller replica's certificate (`O=twill:controllers`).
    pub fn is_controller(&self) -> bool {
        self.groups.iter().any(|g| g == CONTROLLERS_GROUP)
    }
}

/// SHA-256 of a SubjectPublicKeyInfo (DER): the algorithm and the key, as a certificate
/// or a request carries them (`x509_parser`'s `public_key().raw`; rcgen's
/// `PublicKeyData::subject_public_key_info()` for a key pair).
pub fn spki_sha256(spki_der: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, spki_der).as_ref());
    out
}

/// Reads a PEM file and checks that it holds at least one block with `label`
/// (`CERTIFICATE`, or `PRIVATE KEY` which matches every key flavour).
/// `what` names the flag the file came from, for the error message.
pub fn read_pem(path: &Path, what: &str, label: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what: what.to_string(),
        path: path.display().to_string(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{label}-----")));
    if !found {
        return Err(TlsError::NoPem {
            what: what.to_string(),
            path: path.display().to_string(),
            expected: label.to_string(),
        });
    }
    Ok(bytes)
}

/// What a client of the controller presents and trusts, read from the PEM files of
/// `--tls-cert`, `--tls-key` and `--tls-ca` (the agent and twillctl alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPem {
    /// Client certificate chain.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// The CA the controller's certificate must chain to.
    pub ca: Vec<u8>,
}

impl ClientPem {
    /// Reads the three files, checking that each holds the PEM block it should.
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> Result<ClientPem, TlsError> {
        Ok(ClientPem {
            cert: read_pem(cert, "--tls-cert", "CERTIFICATE")?,
            key: read_pem(key, "--tls-key", "PRIVATE KEY")?,
            ca: read_pem(ca, "--tls-ca", "CERTIFICATE")?,
        })
    }

    /// Mutual TLS to the controller: trust the CA, present the certificate.
    pub fn client_tls(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
    }
}

/// Whether the certificate `der` names the host of `url` (`https://host:port`) in its
/// subjectAltNames, as a DNS name or an IP address: a replica's certificate must name
/// the address it is registered under.
pub fn names_host_of(der: &[u8], url: &str) -> bool {
    let Some(host) = url
        .strip_prefix("https://")
        .map(|rest| rest.split('/').next().unwrap_or_default())
        .map(|authority| match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        })
    else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let ip: Option<std::net::IpAddr> = host.parse().ok();
    san.value.general_names.iter().any(|n| match n {
        GeneralName::DNSName(d) => d.eq_ignore_ascii_case(host),
        GeneralName::IPAddress(b) => match (ip, b.len()) {
            (Some(std::net::IpAddr::V4(a)), 4) => a.octets()[..] == b[..],
            (Some(std::net::IpAddr::V6(a)), 16) => a.octets()[..] == b[..],
            _ => false,
        },
        _ => false,
    })
}
