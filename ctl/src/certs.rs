//! The certificate tool behind `twillctl certs`: a CA, the controller's server
//! certificate and node / admin client certificates laid out as docs/compatibility.md
//! (Certificates and roles) says.
//!
//! * CA: `CN=twill-ca`, basic constraints `CA:TRUE`, key usages keyCertSign + cRLSign.
//! * controller: `CN=twill-controller`, subjectAltName with the DNS names / IPs agents
//!   dial, extended key usage serverAuth.
//! * node: `CN=<node name>, O=twill:nodes`, extended key usage clientAuth.
//! * admin: `CN=<user>, O=twill:admins`, extended key usage clientAuth.
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM (`PRIVATE KEY`), which rustls, openssl and
//! Go all read. Key files are created with mode 0600, certificates with 0644.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use thiserror::Error;
use time::OffsetDateTime;
use twill_common::tls::{ADMINS_GROUP, CONTROLLERS_GROUP, NODES_GROUP};

/// Common name of the CA certificate.
pub const CA_COMMON_NAME: &str = "twill-ca";
/// Common name of the controller's server certificate.
pub const CONTROLLER_COMMON_NAME: &str = "twill-controller";
/// File name of the CA certificate inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside the certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Default validity of the CA, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of controller, node and admin certificates, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// How far back `not_before` is set, to tolerate clocks that run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub const CERT_MODE: u32 = 0o644;

/// Why a certificate could not be made or written.
#[derive(Debug, Error)]
pub enum CertError {
    /// rcgen refused the parameters or failed to sign.
    #[error("cannot generate the {what}: {source}")]
    Generate {
        /// What was being made, e.g. "CA certificate".
        what: String,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A file to write exists already and `--force` was not given.
    #[error("{0} exists; pass --force to overwrite")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// "read", "write", "create" ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The CA certificate or key is unusable.
    #[error("{0}")]
    BadCa(String),
    /// A request parameter is invalid (node name, validity, SANs).
    #[error("{0}")]
    Invalid(String),
    /// A certificate signing request was refused.
    #[error("csr_pem: {msg}")]
    Csr {
        /// What kind of fault, for callers that count refusals by reason.
        fault: CsrFault,
        /// What is wrong, for a person.
        msg: String,
    },
}

/// What is wrong with a certificate signing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CsrFault {
    /// It is no PEM PKCS#10 request.
    Malformed,
    /// Its signature does not verify with the key it carries.
    BadSignature,
    /// Its key is too weak (RSA under 2048 bits).
    WeakKey,
    /// Its subject has no CN that is a valid node name.
    Subject,
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM, `CERTIFICATE`).
    pub cert_pem: String,
    /// The private key (PEM, PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
    /// The certificate in DER form.
    pub cert_der: Vec<u8>,
    /// End of the validity period.
    pub not_after: SystemTime,
}

/// The validity period of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of the validity period.
    pub not_before: SystemTime,
    /// End of the validity period.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from a few minutes ago (see [`BACKDATE`]) for `d` from now.
    pub fn lasting(d: Duration) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - BACKDATE,
            not_after: now + d,
        }
    }

    /// Valid from a few minutes ago (see [`BACKDATE`]) for `days` days from now.
    pub fn days(days: u32) -> Result<Self, CertError> {
        if days == 0 {
            return Err(CertError::Invalid("--days must be at least 1".into()));
        }
        let now = SystemTime::now();
        Ok(Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        })
    }
}

/// What kind of certificate to issue with the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The controller's server certificate (serverAuth) for these names and addresses.
    Controller {
        /// DNS subjectAltNames.
        dns: Vec<String>,
        /// IP subjectAltNames.
        ips: Vec<IpAddr>,
    },
    /// An agent's client certificate: `CN=<name>, O=twill:nodes`.
    Node(String),
    /// An operator's client certificate: `CN=<name>, O=twill:admins`.
    Admin(String),
}

impl Role {
    /// The file stem the certificate is written under: `controller`, `node-NAME`, `admin-NAME`.
    pub fn file_stem(&self) -> String {
        match self {
            Role::Controller { .. } => "controller".to_string(),
            Role::Node(name) => format!("node-{name}"),
            Role::Admin(name) => format!("admin-{name}"),
        }
    }

    /// Short human description, e.g. `CN=node-1, O=twill:nodes, clientAuth`.
    pub fn describe(&self) -> String {
        match self {
            Role::Controller { dns, ips } => {
                let sans: Vec<String> = dns
                    .iter()
                    .map(|d| format!("DNS:{d}"))
                    .chain(ips.iter().map(|i| format!("IP:{i}")))
                    .collect();
                format!(
                    "CN={CONTROLLER_COMMON_NAME}, O={CONTROLLERS_GROUP}, serverAuth + clientAuth, SANs {}",
                    sans.join(" ")
                )
            }
            Role::Node(name) => format!("CN={name}, O={NODES_GROUP}, clientAuth"),
            Role::Admin(name) => format!("CN={name}, O={ADMINS_GROUP}, clientAuth"),
        }
    }

    fn validate(&self) -> Result<(), CertError> {
        match self {
            Role::Controller { dns, ips } => {
                if dns.is_empty() && ips.is_empty() {
                    return Err(CertError::Invalid(
                        "a controller certificate needs at least one --dns name or --ip address"
                            .into(),
                    ));
                }
                Ok(())
            }
            Role::Node(name) | Role::Admin(name) => twill_common::lease::validate_node_name(name)
                .map_err(|e| CertError::Invalid(e.to_string())),
        }
    }
}

/// The CA that signs certificates: its certificate (PEM) and key.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads a CA from its certificate and PKCS#8 key (both PEM) and checks that
    /// they belong together and that the certificate is a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            CertError::BadCa(format!(
                "cannot use the CA key: {e} (an unencrypted PKCS#8 \"PRIVATE KEY\" is needed; \
                 convert with `openssl pkcs8 -topk8 -nocrypt -in ca.key -out ca.pkcs8.key`)"
            ))
        })?;
        let der = pem_block(cert_pem, "CERTIFICATE").ok_or_else(|| {
            CertError::BadCa("the CA certificate holds no PEM CERTIFICATE block".into())
        })?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CertError::BadCa(format!("cannot parse the CA certificate: {e}")))?;
        let is_ca = x509
            .basic_constraints()
            .ok()
            .flatten()
            .map(|bc| bc.value.ca)
            .unwrap_or(false);
        if !is_ca {
            return Err(CertError::BadCa(
                "the CA certificate is not a CA (basic constraints CA:TRUE missing)".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::BadCa(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .map_err(|e| CertError::BadCa(format!("cannot use the CA certificate: {e}")))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// Loads a CA from a certificate file and a key file.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CertError> {
        let cert_pem = read_to_string(cert)?;
        let key_pem = read_to_string(key)?;
        Ca::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            CertError::BadCa(msg) => {
                CertError::BadCa(format!("CA {} / {}: {msg}", cert.display(), key.display()))
            }
            other => other,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `role`, with a fresh key, valid for `validity`.
    pub fn issue(&self, role: &Role, validity: Validity) -> Result<Issued, CertError> {
        role.validate()?;
        let what = format!("{} certificate", role.file_stem());
        let mut params = leaf_params(validity, &what)?;
        let mut dn = DistinguishedName::new();
        match role {
            Role::Controller { dns, ips } => {
                dn.push(DnType::CommonName, CONTROLLER_COMMON_NAME);
                for d in dns {
                    let name = d.clone().try_into().map_err(|e| {
                        CertError::Invalid(format!("--dns {d:?} is not a valid DNS name: {e}"))
                    })?;
                    params.subject_alt_names.push(SanType::DnsName(name));
                }
                params
                    .subject_alt_names
                    .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
                // Replicas on etcd present their serving certificate to each other when
                // they forward a write to the leader: it is a client certificate too.
                dn.push(DnType::OrganizationName, CONTROLLERS_GROUP);
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Role::Node(name) => node_subject(&mut params, &mut dn, name),
            Role::Admin(name) => {
                dn.push(DnType::OrganizationName, ADMINS_GROUP);
                dn.push(DnType::CommonName, name.as_str());
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        params.distinguished_name = dn;
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: what.clone(),
            source,
        })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate { what, source })?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            not_after: validity.not_after,
        })
    }
}

/// A node certificate signed from a certificate signing request.
#[derive(Debug, Clone)]
pub struct SignedNode {
    /// The node (the request's CN).
    pub node: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its serial number, hex.
    pub serial: String,
    /// When it expires.
    pub not_after: SystemTime,
}

impl Ca {
    /// Signs a node certificate for the key of a PKCS#10 request (PEM): subject
    /// `CN=<the request's CN>, O=twill:nodes`, extended key usage clientAuth, valid for
    /// `validity`. The request's signature is verified; the rest of its subject and
    /// its extensions are not copied. Refused ([`CertError::Csr`], with its fault): a
    /// request that does not parse or whose signature is wrong, an RSA key under 2048
    /// bits, a CN that is no valid node name.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        validity: Validity,
    ) -> Result<SignedNode, CertError> {
        let (der, node) = parse_csr(csr_pem)?;
        // Verifies the request's signature.
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der.into()).map_err(|e| {
            let fault = match e {
                rcgen::Error::InvalidCertificationRequestSignature => CsrFault::BadSignature,
                _ => CsrFault::Malformed,
            };
            CertError::Csr {
                fault,
                msg: e.to_string(),
            }
        })?;
        let what = format!("node certificate for {node}");
        let mut params = leaf_params(validity, &what)?;
        let mut dn = DistinguishedName::new();
        node_subject(&mut params, &mut dn, &node);
        params.distinguished_name = dn;
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|source| CertError::Generate { what, source })?;
        let serial = x509_parser::parse_x509_certificate(cert.der())
            .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
            .unwrap_or_default();
        Ok(SignedNode {
            node,
            cert_pem: cert.pem(),
            serial,
            not_after: validity.not_after,
        })
    }
}

/// The DER of a PKCS#10 request (PEM) and its subject CN, checked to be a valid node
/// name; RSA keys under 2048 bits are refused. The signature is checked by the signer.
fn parse_csr(csr_pem: &str) -> Result<(Vec<u8>, String), CertError> {
    use x509_parser::prelude::FromDer;
    let bad = |fault: CsrFault, msg: String| CertError::Csr { fault, msg };
    let der = pem_block(csr_pem, "CERTIFICATE REQUEST").ok_or_else(|| {
        bad(
            CsrFault::Malformed,
            "no PEM CERTIFICATE REQUEST block".into(),
        )
    })?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| bad(CsrFault::Malformed, format!("not a PKCS#10 request: {e}")))?;
    if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) =
        parsed.certification_request_info.subject_pki.parsed()
    {
        if rsa.key_size() < 2048 {
            return Err(bad(
                CsrFault::WeakKey,
                format!(
                    "an RSA key of {} bits is too weak: use ECDSA P-256 or RSA of 2048 bits or more",
                    rsa.key_size()
                ),
            ));
        }
    }
    let node = parsed
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .ok_or_else(|| {
            bad(
                CsrFault::Subject,
                "the subject has no CN (the node name)".into(),
            )
        })?
        .as_str()
        .map_err(|e| {
            bad(
                CsrFault::Subject,
                format!("subject CN is not a string: {e}"),
            )
        })?
        .to_string();
    twill_common::lease::validate_node_name(&node)
        .map_err(|e| bad(CsrFault::Subject, format!("subject CN: {e}")))?;
    Ok((der, node))
}

/// The node a certificate signing request (PEM) is for: its subject CN.
pub fn csr_common_name(csr_pem: &str) -> Result<String, CertError> {
    parse_csr(csr_pem).map(|(_, node)| node)
}

/// What every leaf certificate has: not a CA, digital signature, the CA's key id.
fn leaf_params(validity: Validity, what: &str) -> Result<CertificateParams, CertError> {
    let mut params = base_params(validity, what)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A node certificate's subject and usage (docs/compatibility.md, Certificates and roles:
/// the node role).
fn node_subject(params: &mut CertificateParams, dn: &mut DistinguishedName, name: &str) {
    dn.push(DnType::OrganizationName, NODES_GROUP);
    dn.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
}

/// Makes a new self-signed CA (`CN=twill-ca`) with a fresh key.
pub fn new_ca(validity: Validity) -> Result<Issued, CertError> {
    let what = "CA certificate".to_string();
    let mut params = base_params(validity, &what)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: what.clone(),
        source,
    })?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate { what, source })?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
        not_after: validity.not_after,
    })
}

fn base_params(validity: Validity, what: &str) -> Result<CertificateParams, CertError> {
    if validity.not_after <= validity.not_before {
        return Err(CertError::Invalid(format!(
            "the {what} would end its validity before it starts"
        )));
    }
    let mut params = CertificateParams::default();
    params.not_before = to_offset(validity.not_before)?;
    params.not_after = to_offset(validity.not_after)?;
    Ok(params)
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, CertError> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| CertError::Invalid(format!("validity date out of range: {e}")))
}

/// Decodes the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == label)
        .map(|p| p.contents)
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// The two files a certificate is written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The certificate file (mode 0644).
    pub cert: PathBuf,
    /// The key file (mode 0600).
    pub key: PathBuf,
}

/// Writes `issued` as `DIR/STEM.crt` (0644) and `DIR/STEM.key` (0600), creating `dir`
/// when missing. Without `force`, refuses when either file exists (before writing any).
pub fn write_pair(
    dir: &Path,
    stem: &str,
    issued: &Issued,
    force: bool,
) -> Result<Written, CertError> {
    let written = Written {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    if !force {
        for p in [&written.key, &written.cert] {
            if p.symlink_metadata().is_ok() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&written.key, issued.key_pem.as_bytes(), KEY_MODE, force)?;
    write_file(&written.cert, issued.cert_pem.as_bytes(), CERT_MODE, force)?;
    Ok(written)
}

/// Writes `data` to `path`, creating it with `mode` (subject to the umask).
/// Without `force` the file must not exist (checked atomically with `O_EXCL`); with
/// `force` a temporary file is created with `mode` beside it and renamed over `path`,
/// so an old file's looser permissions never carry over to a new key.
pub fn write_file(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<(), CertError> {
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| CertError::Io {
            action,
            path: p,
            source,
        }
    };
    if !force {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    CertError::Exists(path.to_path_buf())
                } else {
                    io("create", path)(e)
                }
            })?;
        f.write_all(data).map_err(io("write", path))?;
        f.sync_all().map_err(io("write", path))?;
        return Ok(());
    }
    twill_common::fs::write_atomic(path, data, mode).map_err(io("write", path))
}

/// Formats a time as RFC 3339 (UTC, seconds), e.g. `2035-01-01T00:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_key_must_match() {
        let a = new_ca(Validity::days(1).unwrap()).unwrap();
        let b = new_ca(Validity::days(1).unwrap()).unwrap();
        assert!(Ca::from_pem(&a.cert_pem, &a.key_pem).is_ok());
        let err = Ca::from_pem(&a.cert_pem, &b.key_pem).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn leaf_cannot_sign() {
        let ca = new_ca(Validity::days(1).unwrap()).unwrap();
        let ca = Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let node = ca
            .issue(&Role::Node("n1".into()), Validity::days(1).unwrap())
            .unwrap();
        let err = Ca::from_pem(&node.cert_pem, &node.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn bad_names_refused() {
        let ca = new_ca(Validity::days(1).unwrap()).unwrap();
        let ca = Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let v = Validity::days(1).unwrap();
        assert!(ca.issue(&Role::Node("bad name".into()), v).is_err());
        assert!(ca.issue(&Role::Admin(String::new()), v).is_err());
        assert!(ca
            .issue(
                &Role::Controller {
                    dns: vec![],
                    ips: vec![]
                },
                v
            )
            .is_err());
    }
}
