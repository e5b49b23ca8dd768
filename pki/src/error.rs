//! Why a certificate could not be made, read or written, and why a request was refused.

use std::path::PathBuf;

use thiserror::Error;

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
    /// A certificate (DER) does not parse.
    #[error("cannot parse the certificate: {0}")]
    BadCert(String),
}

/// What is wrong with a certificate signing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CsrFault {
    /// It is not exactly one PEM block holding one PKCS#10 request (no other text, no
    /// second block, no bytes after the request), or it is too long.
    Malformed,
    /// Its signature does not verify with the key it carries, or is made with an
    /// algorithm that is not accepted (SHA-1, an unknown one).
    BadSignature,
    /// Its key is not one Twill signs: RSA under 2048 or over 4096 bits, or a kind other
    /// than RSA, ECDSA P-256 / P-384 and Ed25519.
    WeakKey,
    /// Its subject has not exactly one CN, or the CN is no valid node name.
    Subject,
}

impl CertError {
    /// A refused request (see [`CertError::Csr`]).
    pub(crate) fn csr(fault: CsrFault, msg: impl Into<String>) -> CertError {
        CertError::Csr {
            fault,
            msg: msg.into(),
        }
    }
}
