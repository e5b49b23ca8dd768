//! Keeping the node certificate current without a restart.
//!
//! - [`Credentials`]: the certificate, key and CA the controller channel was built
//!   from. [`Credentials::reload`] builds a new channel when one of the files changed
//!   (this agent's rotation, cert-manager or an operator rewriting them, a new
//!   `--tls-ca`) and the new pair is usable; until then the old one stays in use.
//! - [`rotation_delay`]: when to rotate, at a jittered 70–90 % of the lifetime (as
//!   kubelet does). The lifetime is counted from when the certificate was written
//!   here, not from notBefore: issuers backdate notBefore by minutes for clock skew,
//!   which would otherwise make a short-lived certificate look already due.
//! - [`renew`]: a new key staged beside the old one, a CSR, `IdentityService.Renew`
//!   over the current mutual-TLS channel (the current certificate is the credential; no
//!   token), then the checked certificate and the new key moved into place
//!   ([`super::install`]). A refusal or a wrong answer leaves the old pair as it was; a
//!   crash leaves either the old pair or a state [`finish_install`] completes at the
//!   next start.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use rand::Rng;
use thiserror::Error;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::warn;
use twill_common::now_unix;
use twill_common::tls::ClientPem;
use twill_proto::RenewRequest;

pub use super::install::finish_install;
use super::install::Staged;
use super::{
    check_certificate, code_name, csr_pem, hint, identity_client, status_text, CertCheck, CertInfo,
};
use crate::client::{self, ClientError, Controllers, Dial, TlsFiles};

/// Earliest point of the lifetime at which the certificate is rotated.
pub const ROTATE_FROM: f64 = 0.7;
/// Latest point of the lifetime at which the certificate is rotated.
pub const ROTATE_TO: f64 = 0.9;

/// A fraction of the lifetime drawn from [`ROTATE_FROM`]..=[`ROTATE_TO`], so that nodes
/// bootstrapped together do not all rotate in the same second.
pub fn jitter() -> f64 {
    rand::rng().random_range(ROTATE_FROM..=ROTATE_TO)
}

/// How long from `now` until a certificate written at `received_at` (Unix seconds)
/// is due for rotation at `fraction` of its lifetime; zero when that is past.
pub fn rotation_delay(info: &CertInfo, received_at: i64, now: i64, fraction: f64) -> Duration {
    let start = received_at.clamp(info.not_before, info.not_after.max(info.not_before));
    let lifetime_ms = (info.not_after - start).max(0) as f64 * 1000.0;
    let due_ms = start as f64 * 1000.0 + lifetime_ms * fraction.clamp(0.0, 1.0);
    Duration::from_millis((due_ms - now as f64 * 1000.0).max(0.0) as u64)
}

/// The files the controller channel is built from, what they held when it was, and
/// which of the controller's URLs (replicas) it connects to.
#[derive(Debug)]
pub struct Credentials {
    controllers: Controllers,
    dial: Dial,
    node: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    pem: ClientPem,
    /// Contents found unusable once, so they are reported once, not on every check.
    refused: Option<ClientPem>,
    /// The certificate in use, when it reads as this node's and valid.
    pub info: Option<CertInfo>,
    /// When the certificate in use was written (its file's modification time).
    pub received_at: i64,
}

impl Credentials {
    /// Reads the files and builds the first channel with `dial`, to one of `urls` drawn
    /// at random so that agents spread over the replicas. A certificate this code
    /// cannot judge usable is still tried (TLS has the last word), but is not rotated.
    pub fn load(
        urls: &[String],
        node: &str,
        files: &TlsFiles<'_>,
        dial: Dial,
    ) -> Result<(Credentials, Channel), ClientError> {
        let pem = files.read()?;
        let controllers = Controllers::new(urls)?;
        let channel = dial.dial(controllers.url(), &pem)?;
        let info = match check_certificate(files.cert, files.key, node, now_unix()) {
            CertCheck::Usable(info) => Some(info),
            CertCheck::Needed(why) => {
                warn!(node = %node, reason = %why, "the node certificate looks unusable; trying it anyway");
                None
            }
        };
        let creds = Credentials {
            controllers,
            dial,
            node: node.to_string(),
            cert: files.cert.to_path_buf(),
            key: files.key.to_path_buf(),
            ca: files.ca.to_path_buf(),
            pem,
            refused: None,
            info,
            received_at: written_at(files.cert),
        };
        Ok((creds, channel))
    }

    /// The controller URL in use.
    pub fn url(&self) -> &str {
        self.controllers.url()
    }

    /// How many controller URLs there are.
    pub fn replicas(&self) -> usize {
        self.controllers.replicas()
    }

    /// A channel to another controller URL ([`Controllers::fail_over`]), when there is
    /// more than one: the one in use could not be reached.
    pub fn fail_over(&mut self) -> Option<Channel> {
        if !self.controllers.fail_over() {
            return None;
        }
        // Every URL was checked when loading, and the files read then are unchanged.
        self.dial.dial(self.url(), &self.pem).ok()
    }

    /// The files, for calls that read them.
    pub fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            ca: &self.ca,
        }
    }

    /// A new channel when the files changed since the last (re)load and make a usable
    /// configuration; `Ok(None)` when nothing changed. An error says why changed files
    /// are not used; it is returned once per content, and the old channel stays.
    pub fn reload(&mut self) -> Result<Option<Channel>, String> {
        let pem = self.files().read().map_err(|e| e.to_string())?;
        if pem == self.pem || self.refused.as_ref() == Some(&pem) {
            return Ok(None);
        }
        let pair_changed = pem.cert != self.pem.cert || pem.key != self.pem.key;
        let info = match check_certificate(&self.cert, &self.key, &self.node, now_unix()) {
            CertCheck::Usable(info) => Some(info),
            // A pair being rewritten is checked again on the next call.
            CertCheck::Needed(why) if pair_changed => {
                self.refused = Some(pem);
                return Err(why);
            }
            CertCheck::Needed(_) => self.info.clone(),
        };
        let channel = match self.dial.dial(self.url(), &pem) {
            Ok(c) => c,
            Err(e) => {
                self.refused = Some(pem);
                return Err(e.to_string());
            }
        };
        if pair_changed {
            self.received_at = written_at(&self.cert);
        }
        self.info = info;
        self.pem = pem;
        self.refused = None;
        Ok(Some(channel))
    }
}

/// The modification time of `path` (Unix seconds), or now when it cannot be read.
fn written_at(path: &Path) -> i64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_unix, |d| d.as_secs() as i64)
}

/// Why a rotation did not happen.
#[derive(Debug, Error)]
pub enum RotateError {
    /// The controller answered with a refusal or could not be reached.
    #[error("the controller did not renew the certificate: {}: {}", code_name(.0.code()), status_text(.0))]
    Refused(Status),
    /// Something on this node failed (a key directory that is not private, key
    /// generation, writing the files) or the controller's answer was not a certificate
    /// for this node's new key. The old key and certificate are as they were.
    #[error("{0:#}")]
    Local(#[from] anyhow::Error),
}

impl RotateError {
    /// What an operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            RotateError::Refused(s) if s.code() == Code::PermissionDenied => {
                "this node's certificates were revoked (`twillctl certs revoke`): it can rejoin only with a bootstrap token"
            }
            RotateError::Refused(s) if s.code() == Code::InvalidArgument => {
                "the controller refused the certificate request"
            }
            RotateError::Refused(s) => hint(s.code()),
            RotateError::Local(_) => {
                "check the --tls-cert and --tls-key paths are writable and the key's directory is the agent user's alone (mode 0700)"
            }
        }
    }
}

/// Replaces the node certificate and key with new ones signed by the controller,
/// asking over `channel` (which presents the current certificate). The new key is
/// staged until the controller's certificate for it is in hand and checked; on any
/// error the old key and certificate are left as they were.
pub async fn renew(
    channel: Channel,
    node: &str,
    cert: &Path,
    key: &Path,
    deadline: Duration,
) -> Result<CertInfo, RotateError> {
    let staged = Staged::new(cert, key)?;
    let req = RenewRequest {
        csr_pem: csr_pem(node, staged.key()).map_err(anyhow::Error::from)?,
    };
    let mut api = identity_client(channel);
    let resp = client::within(deadline, api.renew(client::request(req, deadline)))
        .await
        .map_err(RotateError::Refused)?
        .into_inner();
    Ok(staged.install(&resp.certificate_chain_pem, node)?)
}

#[cfg(test)]
mod tests {
    use super::super::generate_key;
    use super::super::install::tests::cert_for;
    use super::*;

    fn info(not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            node: "node-a".into(),
            serial: "01".into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn rotation_is_due_at_the_fraction_of_the_lifetime_since_receipt() {
        // Issued at 1000 for 30 s, backdated five minutes.
        let cert = info(700, 1030);
        let d = rotation_delay(&cert, 1000, 1000, 0.7);
        assert_eq!(d, Duration::from_secs(21));
        assert_eq!(
            rotation_delay(&cert, 1000, 1010, 0.9),
            Duration::from_secs(17)
        );
        // Past due, or received after expiry: now.
        assert_eq!(rotation_delay(&cert, 1000, 1029, 0.7), Duration::ZERO);
        assert_eq!(rotation_delay(&cert, 2000, 2000, 0.7), Duration::ZERO);
        // Received before notBefore (a file copied early): from notBefore.
        assert_eq!(
            rotation_delay(&info(1000, 2000), 0, 1000, 0.8),
            Duration::from_secs(800)
        );
        for _ in 0..100 {
            let f = jitter();
            assert!((ROTATE_FROM..=ROTATE_TO).contains(&f));
        }
    }

    #[test]
    fn changed_files_give_a_new_channel_and_a_broken_pair_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = (
            dir.path().join("node.crt"),
            dir.path().join("node.key"),
            dir.path().join("ca.crt"),
        );
        let k1 = generate_key().unwrap();
        std::fs::write(&cert, cert_for("node-a", &k1)).unwrap();
        std::fs::write(&key, k1.serialize_pem()).unwrap();
        std::fs::write(&ca, cert_for("ca", &generate_key().unwrap())).unwrap();
        let files = TlsFiles {
            cert: &cert,
            key: &key,
            ca: &ca,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let urls = ["https://127.0.0.1:1".to_string()];
        let (mut creds, _) = Credentials::load(&urls, "node-a", &files, Dial::mtls()).unwrap();
        assert!(creds.fail_over().is_none(), "one controller: nowhere to go");
        let two = [
            "https://127.0.0.1:1".to_string(),
            "https://127.0.0.2:1".to_string(),
        ];
        let (mut replicas, _) = Credentials::load(&two, "node-a", &files, Dial::mtls()).unwrap();
        let first = replicas.url().to_string();
        assert!(replicas.fail_over().is_some());
        assert_ne!(replicas.url(), first);
        assert!(replicas.fail_over().is_some());
        assert_eq!(replicas.url(), first, "round and round");
        let bad = ["https://127.0.0.1:1".to_string(), "http://x:1".to_string()];
        let err = Credentials::load(&bad, "node-a", &files, Dial::mtls()).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        let first = creds.info.clone().unwrap();
        assert!(creds.reload().unwrap().is_none(), "nothing changed");

        // A new CA alone: a new channel.
        std::fs::write(&ca, cert_for("ca2", &generate_key().unwrap())).unwrap();
        assert!(creds.reload().unwrap().is_some());

        // Half a rotation (certificate without its key): refused once, old kept.
        let k2 = generate_key().unwrap();
        std::fs::write(&cert, cert_for("node-a", &k2)).unwrap();
        let why = creds.reload().unwrap_err();
        assert!(why.contains("does not belong"), "{why}");
        assert!(creds.reload().unwrap().is_none(), "reported once");
        assert_eq!(creds.info.as_ref(), Some(&first));

        // The key arrives: a new channel and the new certificate's details.
        std::fs::write(&key, k2.serialize_pem()).unwrap();
        assert!(creds.reload().unwrap().is_some());
        assert_ne!(creds.info.as_ref().unwrap().serial, first.serial);
    }
}
