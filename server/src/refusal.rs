//! Why a node got no certificate from Bootstrap or Renew: the reasons the identity
//! service refuses with, counted by reason in the metrics and named in the logs. A
//! leaf of its own so that the identity service and the metrics both use it without
//! depending on each other.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use twill_pki::CsrFault;

/// What is wrong with a bootstrap token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenFault {
    /// Not `<id>.<secret>` of kubelet's form.
    Malformed,
    /// Never made here, or deleted.
    Unknown,
    /// Past its expiry.
    Expired,
    /// The id is known, the secret is not its.
    WrongSecret,
}

/// Why a Bootstrap or Renew request got no certificate: the `reason` label of
/// `twill_node_certificates_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The bootstrap token (`token_malformed`, `token_unknown`, `token_expired`,
    /// `token_wrong_secret`).
    Token(TokenFault),
    /// The certificate signing request (`csr_malformed`, `csr_bad_signature`,
    /// `csr_weak_key`, `csr_subject`).
    Csr(CsrFault),
    /// Renewal without a node certificate (`no_node_certificate`).
    NoNodeCertificate,
    /// Renewal with a certificate that has expired since its connection opened
    /// (`certificate_expired`).
    CertificateExpired,
    /// Renewal with a revoked certificate (`revoked`).
    Revoked,
    /// The controller has no signing CA (`no_signer`).
    NoSigner,
    /// Too many failed token attempts from the caller's address (`rate_limited`).
    RateLimited,
    /// Bootstrap of a node name that is alive: it holds a live lease or an unexpired,
    /// unrevoked certificate (`name_alive`).
    NameAlive,
    /// Bootstrap of a name the token is not bound to (`token_not_for_name`).
    TokenNotForName,
    /// Bootstrap with a token whose uses are spent (`token_used_up`).
    TokenUsedUp,
    /// Renewals faster than a node may make them (`renew_rate_limited`).
    RenewRateLimited,
}

impl Refusal {
    /// Every reason, so that each is exported (at zero) before it first happens and a
    /// rate over it has a starting point.
    pub(crate) const ALL: [Refusal; 17] = [
        Refusal::Token(TokenFault::Malformed),
        Refusal::Token(TokenFault::Unknown),
        Refusal::Token(TokenFault::Expired),
        Refusal::Token(TokenFault::WrongSecret),
        Refusal::Csr(CsrFault::Malformed),
        Refusal::Csr(CsrFault::BadSignature),
        Refusal::Csr(CsrFault::WeakKey),
        Refusal::Csr(CsrFault::Subject),
        Refusal::NoNodeCertificate,
        Refusal::CertificateExpired,
        Refusal::Revoked,
        Refusal::NoSigner,
        Refusal::RateLimited,
        Refusal::NameAlive,
        Refusal::TokenNotForName,
        Refusal::TokenUsedUp,
        Refusal::RenewRateLimited,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Token(TokenFault::Malformed) => "token_malformed",
            Refusal::Token(TokenFault::Unknown) => "token_unknown",
            Refusal::Token(TokenFault::Expired) => "token_expired",
            Refusal::Token(TokenFault::WrongSecret) => "token_wrong_secret",
            Refusal::Csr(CsrFault::Malformed) => "csr_malformed",
            Refusal::Csr(CsrFault::BadSignature) => "csr_bad_signature",
            Refusal::Csr(CsrFault::WeakKey) => "csr_weak_key",
            Refusal::Csr(CsrFault::Subject) => "csr_subject",
            Refusal::NoNodeCertificate => "no_node_certificate",
            Refusal::CertificateExpired => "certificate_expired",
            Refusal::Revoked => "revoked",
            Refusal::NoSigner => "no_signer",
            Refusal::RateLimited => "rate_limited",
            Refusal::NameAlive => "name_alive",
            Refusal::TokenNotForName => "token_not_for_name",
            Refusal::TokenUsedUp => "token_used_up",
            Refusal::RenewRateLimited => "renew_rate_limited",
        }
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}
