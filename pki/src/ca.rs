//! The CA and the certificates it issues: with a fresh key ([`Ca::issue`]) or for the
//! key of a node's request ([`Ca::sign_node`]).

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use twill_common::tls::{ADMINS_GROUP, CONTROLLERS_GROUP, NODES_GROUP};

use crate::csr::NodeCsr;
use crate::error::CertError;
use crate::files::read_to_string;

/// Common name of the CA certificate.
pub const CA_COMMON_NAME: &str = "twill-ca";
/// Common name of the controller's server certificate.
pub const CONTROLLER_COMMON_NAME: &str = "twill-controller";
/// Default validity of the CA, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of controller, node and admin certificates, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// How far back `not_before` is set, to tolerate clocks that run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

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
        Ok(Self::lasting(Duration::from_secs(u64::from(days) * 86_400)))
    }
}

/// What kind of certificate to issue with the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The controller's certificate for these names and addresses:
    /// `CN=twill-controller, O=twill:controllers`, serverAuth; with `replica` also
    /// clientAuth.
    Controller {
        /// DNS subjectAltNames.
        dns: Vec<String>,
        /// IP subjectAltNames.
        ips: Vec<IpAddr>,
        /// For one of several replicas on etcd (`--store etcd`): also a client
        /// certificate (clientAuth), which a replica presents when it forwards a write
        /// to the leader. A single controller's certificate serves only.
        replica: bool,
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
            Role::Controller { dns, ips, replica } => {
                let sans: Vec<String> = dns
                    .iter()
                    .map(|d| format!("DNS:{d}"))
                    .chain(ips.iter().map(|i| format!("IP:{i}")))
                    .collect();
                let usage = if *replica {
                    "serverAuth + clientAuth (replica)"
                } else {
                    "serverAuth"
                };
                format!(
                    "CN={CONTROLLER_COMMON_NAME}, O={CONTROLLERS_GROUP}, {usage}, SANs {}",
                    sans.join(" ")
                )
            }
            Role::Node(name) => format!("CN={name}, O={NODES_GROUP}, clientAuth"),
            Role::Admin(name) => format!("CN={name}, O={ADMINS_GROUP}, clientAuth"),
        }
    }

    fn validate(&self) -> Result<(), CertError> {
        match self {
            Role::Controller { dns, ips, .. } if dns.is_empty() && ips.is_empty() => {
                Err(CertError::Invalid(
                    "a controller certificate needs at least one --dns name or --ip address".into(),
                ))
            }
            Role::Controller { .. } => Ok(()),
            Role::Node(name) | Role::Admin(name) => twill_common::model::validate_node_name(name)
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

/// A node certificate signed for a certificate signing request.
#[derive(Debug, Clone)]
pub struct SignedNode {
    /// The node (the request's CN).
    pub node: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// Its serial number, hex.
    pub serial: String,
    /// When it expires.
    pub not_after: SystemTime,
    /// SHA-256 of its SubjectPublicKeyInfo: the request's key (see [`crate::spki_sha256`]).
    pub key_sha256: [u8; 32],
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
            .is_some_and(|bc| bc.value.ca);
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
            Role::Controller { dns, ips, replica } => {
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
                dn.push(DnType::OrganizationName, CONTROLLERS_GROUP);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                // Replicas on etcd present their serving certificate to each other when
                // they forward a write to the leader: theirs is a client certificate too.
                // A single controller's is not, so it cannot act as a client anywhere.
                if *replica {
                    params
                        .extended_key_usages
                        .push(ExtendedKeyUsagePurpose::ClientAuth);
                }
            }
            Role::Node(name) => client_subject(&mut params, &mut dn, NODES_GROUP, name),
            Role::Admin(name) => client_subject(&mut params, &mut dn, ADMINS_GROUP, name),
        }
        params.distinguished_name = dn;
        with_new_key(validity, what, |key| params.signed_by(key, &self.issuer))
    }

    /// Signs a node certificate for the key of a request that [`parse_node_csr`] accepted:
    /// subject `CN=<the request's CN>, O=twill:nodes`, extended key usage clientAuth,
    /// valid for `validity`. Nothing else of the request (the rest of its subject, its
    /// extensions) is copied.
    pub fn sign_node(&self, csr: &NodeCsr, validity: Validity) -> Result<SignedNode, CertError> {
        let node = csr.common_name.clone();
        let what = format!("node certificate for {node}");
        let mut params = leaf_params(validity, &what)?;
        let mut dn = DistinguishedName::new();
        client_subject(&mut params, &mut dn, NODES_GROUP, &node);
        params.distinguished_name = dn;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| CertError::Generate { what, source })?;
        let serial = x509_parser::parse_x509_certificate(cert.der())
            .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
            .unwrap_or_default();
        Ok(SignedNode {
            node,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            serial,
            not_after: validity.not_after,
            key_sha256: csr.key_sha256,
        })
    }
}

/// What every leaf certificate has: not a CA, digital signature, the CA's key id.
fn leaf_params(validity: Validity, what: &str) -> Result<CertificateParams, CertError> {
    let mut params = base_params(validity, what)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A node's or an admin's certificate subject and usage (docs/compatibility.md,
/// Certificates and roles): `group` is their role.
fn client_subject(
    params: &mut CertificateParams,
    dn: &mut DistinguishedName,
    group: &str,
    name: &str,
) {
    dn.push(DnType::OrganizationName, group);
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
    with_new_key(validity, what, |key| params.self_signed(key))
}

/// A new key and the certificate `sign` makes for it (`what` names it in errors).
fn with_new_key(
    validity: Validity,
    what: String,
    sign: impl FnOnce(&KeyPair) -> Result<rcgen::Certificate, rcgen::Error>,
) -> Result<Issued, CertError> {
    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: what.clone(),
        source,
    })?;
    let cert = sign(&key).map_err(|source| CertError::Generate { what, source })?;
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

/// Whether the certificate in `cert_pem` is one of the CA certificates in `bundle_pem`,
/// or is signed by one of them: a signing CA must chain to the client CA, or the
/// certificates it signs would be refused at every handshake.
pub fn chains_to(cert_pem: &str, bundle_pem: &str) -> bool {
    let Some(der) = pem_block(cert_pem, "CERTIFICATE") else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    pem_blocks(bundle_pem.as_bytes(), "CERTIFICATE")
        .unwrap_or_default()
        .into_iter()
        .any(|ca_der| {
            ca_der == der
                || x509_parser::parse_x509_certificate(&ca_der).is_ok_and(|(_, ca)| {
                    cert.issuer() == ca.subject()
                        && cert.verify_signature(Some(ca.public_key())).is_ok()
                })
        })
}

/// Decodes the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    pem_blocks(text.as_bytes(), label).ok()?.into_iter().next()
}

/// The contents (DER) of every PEM block labelled `label` (`CERTIFICATE`), in order:
/// the one PEM reader of the controller, the agent and twillctl. Blocks of other labels
/// are skipped; text that is not PEM at all, or a block that does not decode, is an
/// error.
pub fn pem_blocks(pem: &[u8], label: &str) -> Result<Vec<Vec<u8>>, CertError> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter(|p| p.as_ref().map_or(true, |p| p.label == label))
        .map(|p| {
            p.map(|p| p.contents)
                .map_err(|e| CertError::BadCert(format!("cannot read PEM: {e}")))
        })
        .collect()
}

/// Formats a time as RFC 3339 (UTC, seconds), e.g. `2035-01-01T00:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509Certificate};

    #[test]
    fn a_certificate_chains_to_its_ca_only() {
        let (a, b) = (test_ca(), test_ca());
        let leaf = a
            .issue(&Role::Node("n1".into()), Validity::days(1).unwrap())
            .unwrap();
        let bundle = format!("{}{}", b.cert_pem(), a.cert_pem());
        assert!(chains_to(a.cert_pem(), a.cert_pem()), "the CA itself");
        assert!(
            chains_to(&leaf.cert_pem, &bundle),
            "signed by one in the bundle"
        );
        assert!(!chains_to(&leaf.cert_pem, b.cert_pem()), "another CA");
        assert!(!chains_to(b.cert_pem(), a.cert_pem()));
        assert!(!chains_to("not PEM", a.cert_pem()));
    }

    fn test_ca() -> Ca {
        let ca = new_ca(Validity::days(1).unwrap()).unwrap();
        Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap()
    }

    /// (serverAuth, clientAuth) of a certificate.
    fn ekus(der: &[u8]) -> (bool, bool) {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        (eku.server_auth, eku.client_auth)
    }

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
        let ca = test_ca();
        let node = ca
            .issue(&Role::Node("n1".into()), Validity::days(1).unwrap())
            .unwrap();
        let err = Ca::from_pem(&node.cert_pem, &node.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn bad_names_refused() {
        let ca = test_ca();
        let v = Validity::days(1).unwrap();
        assert!(ca.issue(&Role::Node("bad name".into()), v).is_err());
        assert!(ca.issue(&Role::Admin(String::new()), v).is_err());
        assert!(ca
            .issue(
                &Role::Controller {
                    dns: vec![],
                    ips: vec![],
                    replica: false,
                },
                v
            )
            .is_err());
    }

    #[test]
    fn only_a_replica_controller_certificate_is_a_client_certificate() {
        let ca = test_ca();
        let v = Validity::days(1).unwrap();
        let role = |replica| Role::Controller {
            dns: vec!["twill.example.com".into()],
            ips: vec!["10.0.0.1".parse().unwrap()],
            replica,
        };
        let single = ca.issue(&role(false), v).unwrap();
        assert_eq!(ekus(&single.cert_der), (true, false));
        let replica = ca.issue(&role(true), v).unwrap();
        assert_eq!(ekus(&replica.cert_der), (true, true));
        for issued in [&single, &replica] {
            let (_, cert) = X509Certificate::from_der(&issued.cert_der).unwrap();
            let orgs: Vec<&str> = cert
                .subject()
                .iter_organization()
                .map(|o| o.as_str().unwrap())
                .collect();
            assert_eq!(orgs, [CONTROLLERS_GROUP]);
        }
        assert!(role(false)
            .describe()
            .contains(", serverAuth, SANs DNS:twill"));
        assert!(role(true).describe().contains("serverAuth + clientAuth"));
    }

    #[test]
    fn node_and_admin_certificates_are_client_certificates() {
        let ca = test_ca();
        let v = Validity::days(1).unwrap();
        for role in [Role::Node("n1".into()), Role::Admin("alice".into())] {
            assert_eq!(ekus(&ca.issue(&role, v).unwrap().cert_der), (false, true));
        }
    }
}
