//! Node identity: bootstrap tokens and the node certificates signed with them.
//!
//! A token is kubelet's `<id>.<secret>` (`[a-z0-9]{6}.[a-z0-9]{16}`). The controller
//! keeps only the SHA-256 of the secret, compares it in constant time, and forgets a
//! token once it has expired; one token may serve many nodes until then. A node sends
//! a certificate signing request with its token and gets back a certificate for the
//! request's key (`CN=<node>, O=twill:nodes`, clientAuth): its private key never
//! leaves it. Tokens and the record of every certificate issued are kept in the store
//! beside the leases, so they survive restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use twill_ctl::certs::{Ca, CertError, CsrFault, Validity};
use twill_proto::{BootstrapResponse, BootstrapToken, IssuedCertificate};

use crate::metrics::{now_unix, Metrics, Refusal};
use crate::store::{Store, StoreError};

const TOKEN_KIND: &str = "token";
const ISSUED_KIND: &str = "issued";
const REVOKED_KIND: &str = "revoked";
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;
/// Lifetime of a token made without one.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why an identity operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token is malformed, unknown, deleted, expired or its secret is wrong.
    #[error("{msg}")]
    BadToken {
        /// Which of those.
        fault: TokenFault,
        /// What is wrong, for a person (never the secret).
        msg: String,
    },
    /// The certificate signing request is refused: it does not parse or verify, its
    /// key is too weak, or its subject is no valid node name or not the caller's.
    #[error("csr_pem: {msg}")]
    BadCsr {
        /// Which of those.
        fault: CsrFault,
        /// What is wrong, for a person.
        msg: String,
    },
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The controller was started without a signing CA.
    #[error(
        "this controller does not issue node certificates: start it with --signing-cert and \
         --signing-key (a CA that is, or chains to, --tls-client-ca)"
    )]
    NoSigningCa,
    /// No such token.
    #[error("{0}")]
    NotFound(String),
    /// The store failed; nothing was issued.
    #[error("{0}")]
    Store(#[from] StoreError),
}

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

impl IdentityError {
    fn token(fault: TokenFault, msg: String) -> Self {
        IdentityError::BadToken { fault, msg }
    }

    /// Why a certificate was not issued, for the refusal metric; `None` when the
    /// failure says nothing about the request (the store, an unknown token id to
    /// delete).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            IdentityError::BadToken { fault, .. } => Some(Refusal::Token(*fault)),
            IdentityError::BadCsr { fault, .. } => Some(Refusal::Csr(*fault)),
            IdentityError::NoSigningCa => Some(Refusal::NoSigner),
            IdentityError::Invalid(_) | IdentityError::NotFound(_) | IdentityError::Store(_) => {
                None
            }
        }
    }
}

impl From<CertError> for IdentityError {
    fn from(e: CertError) -> Self {
        match e {
            CertError::Csr { fault, msg } => IdentityError::BadCsr { fault, msg },
            e => IdentityError::Invalid(e.to_string()),
        }
    }
}

/// A token as stored (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    secret_sha256: String,
    description: String,
    created_at_unix: i64,
    expires_at_unix: i64,
    uses: u64,
    last_used_unix: i64,
}

impl TokenRecord {
    fn public(&self) -> BootstrapToken {
        BootstrapToken {
            id: self.id.clone(),
            description: self.description.clone(),
            created_at_unix: self.created_at_unix,
            expires_at_unix: self.expires_at_unix,
            uses: self.uses,
            last_used_unix: self.last_used_unix,
        }
    }
}

/// An issued certificate as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IssuedRecord {
    node_name: String,
    serial: String,
    issued_at_unix: i64,
    not_after_unix: i64,
    token_id: String,
}

/// The CA that signs node certificates, and what agents need beside their own
/// certificate to chain to the client CA.
pub struct Signer {
    ca: Ca,
    chain: String,
}

impl Signer {
    /// Loads `--signing-cert` / `--signing-key`. When the signing certificate is not the
    /// client CA itself (an intermediate), it is sent after each node certificate.
    pub fn load(cert: &Path, key: &Path, client_ca_pem: &str) -> Result<Self, String> {
        let ca = Ca::load(cert, key).map_err(|e| format!("--signing-cert/--signing-key: {e}"))?;
        let same = ca.cert_pem().trim() == client_ca_pem.trim()
            || client_ca_pem.contains(ca.cert_pem().trim());
        let chain = if same {
            String::new()
        } else {
            ca.cert_pem().to_string()
        };
        Ok(Signer { ca, chain })
    }
}

/// Tokens and issuance.
pub struct Identity {
    store: Arc<dyn Store>,
    signer: std::sync::RwLock<Option<Arc<Signer>>>,
    node_cert_ttl: Duration,
    metrics: Arc<Metrics>,
    /// Token records are read, changed and written back (use counts): one at a time.
    lock: tokio::sync::Mutex<()>,
    /// When each revoked node's certificates stopped being accepted (Unix seconds),
    /// and a counter that moves at every revocation (open watches check theirs).
    revoked: std::sync::RwLock<HashMap<String, i64>>,
    revocations: tokio::sync::watch::Sender<u64>,
}

fn hash(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal in time that does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn token_chars(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Splits `<id>.<secret>`; the error never repeats the secret.
fn parse_token(token: &str) -> Result<(&str, &str), IdentityError> {
    match token.trim().split_once('.') {
        Some((id, secret)) if token_chars(id, ID_LEN) && token_chars(secret, SECRET_LEN) => {
            Ok((id, secret))
        }
        _ => Err(IdentityError::token(
            TokenFault::Malformed,
            "malformed bootstrap token: expected <id>.<secret>, 6 and 16 characters of a-z0-9 \
             (as `twillctl token create` prints)"
                .into(),
        )),
    }
}

fn random_chars(n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Identity {
    /// Tokens and records in `store`; issuance on when `signer` is given.
    pub async fn new(
        store: Arc<dyn Store>,
        signer: Option<Signer>,
        node_cert_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let revoked = store
            .records(REVOKED_KIND)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot read the revocations; none in force");
                Vec::new()
            })
            .into_iter()
            .filter_map(|(node, v)| Some((node, String::from_utf8(v).ok()?.parse().ok()?)))
            .collect();
        Identity {
            store,
            signer: std::sync::RwLock::new(signer.map(Arc::new)),
            node_cert_ttl,
            metrics,
            lock: tokio::sync::Mutex::new(()),
            revoked: std::sync::RwLock::new(revoked),
            revocations: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Why `node`'s certificate valid from `not_before_unix` is refused, if it is.
    pub fn revoked(&self, node: &str, not_before_unix: i64) -> Option<String> {
        let at = *self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)?;
        (not_before_unix <= at).then(|| {
            format!(
                "the certificates of node {node} were revoked at {at} (Unix time); it can rejoin \
                 only by bootstrapping with a token"
            )
        })
    }

    fn signer(&self) -> Result<Arc<Signer>, IdentityError> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(IdentityError::NoSigningCa)
    }

    /// Re-reads the signing CA (and the client CA it must chain to) whenever one of the
    /// files changes; a pair that does not load is reported and the one in force kept.
    pub fn watch_signer(self: &Arc<Self>, cert: PathBuf, key: PathBuf, client_ca: PathBuf) {
        let identity = self.clone();
        tokio::spawn(async move {
            let stamp = |p: &Path| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            };
            let mut seen = [stamp(&cert), stamp(&key), stamp(&client_ca)];
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let now = [stamp(&cert), stamp(&key), stamp(&client_ca)];
                if now == seen {
                    continue;
                }
                seen = now;
                let loaded = std::fs::read_to_string(&client_ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", client_ca.display()))
                    .and_then(|ca| Signer::load(&cert, &key, &ca));
                match loaded {
                    Ok(s) => {
                        *identity.signer.write().unwrap_or_else(|p| p.into_inner()) =
                            Some(Arc::new(s));
                        info!(cert = %cert.display(), "signing CA changed; new node certificates use it");
                    }
                    Err(e) => {
                        warn!(error = %e, "signing CA not reloaded; keeping the one in force")
                    }
                }
            }
        });
    }

    /// Whether any node was ever revoked (most controllers: never, so the per-call
    /// check costs nothing).
    pub fn has_revocations(&self) -> bool {
        !self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Moves at every revocation.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Revokes every certificate of `node` valid from before now.
    pub async fn revoke(&self, node: &str) -> Result<i64, IdentityError> {
        twill_common::lease::validate_node_name(node)
            .map_err(|e| IdentityError::Invalid(format!("node_name: {e}")))?;
        // One second back: a certificate issued from now on starts at the current
        // second (certificate times have no finer grain) and must not be caught, nor
        // be valid only from the future.
        let at = now_unix() - 1;
        self.store
            .put_record(REVOKED_KIND, node, at.to_string().as_bytes())
            .await?;
        self.store.flush().await?;
        self.revoked_at(node, at);
        info!(node = %node, revoked_at_unix = at, "node certificates revoked");
        Ok(at)
    }

    /// Puts a revocation in force: made here, or seen in the store when another
    /// replica made it.
    pub fn revoked_at(&self, node: &str, at: i64) {
        let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        if revoked.get(node) == Some(&at) {
            return;
        }
        revoked.insert(node.to_string(), at);
        drop(revoked);
        self.revocations.send_modify(|n| *n += 1);
    }

    /// A revocation record's kind and value, as the store holds it.
    pub fn revocation_record(kind: &str, value: &[u8]) -> Option<i64> {
        (kind == REVOKED_KIND)
            .then(|| std::str::from_utf8(value).ok()?.parse().ok())
            .flatten()
    }

    /// The validity of a certificate issued now for `node`: it starts after the node's
    /// revocation, if any, so that a certificate issued after it is never refused.
    fn validity_for(&self, node: &str) -> Validity {
        let mut v = Validity::lasting(self.node_cert_ttl);
        if let Some(at) = self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
        {
            let after = UNIX_EPOCH + Duration::from_secs(at.saturating_add(1).max(0) as u64);
            v.not_before = v.not_before.max(after);
        }
        v
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, IdentityError> {
        Ok(self
            .store
            .records(TOKEN_KIND)
            .await?
            .into_iter()
            .filter_map(|(id, v)| match serde_json::from_slice::<TokenRecord>(&v) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(token_id = %id, error = %e, "ignoring an unreadable token record");
                    None
                }
            })
            .collect())
    }

    async fn put_token(&self, t: &TokenRecord) -> Result<(), IdentityError> {
        let value = serde_json::to_vec(t).map_err(|e| IdentityError::Invalid(e.to_string()))?;
        self.store.put_record(TOKEN_KIND, &t.id, &value).await?;
        Ok(())
    }

    /// Makes a token valid for `ttl` (zero: the default); returns it whole, once.
    pub async fn create_token(
        &self,
        ttl: Duration,
        description: &str,
    ) -> Result<(String, BootstrapToken), IdentityError> {
        let ttl = if ttl.is_zero() {
            DEFAULT_TOKEN_TTL
        } else {
            ttl
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(IdentityError::Invalid(format!(
                "ttl_seconds: a token may live at most {}",
                humantime::format_duration(MAX_TOKEN_TTL)
            )));
        }
        let _guard = self.lock.lock().await;
        let existing = self.tokens().await?;
        let id = loop {
            let id = random_chars(ID_LEN);
            if !existing.iter().any(|t| t.id == id) {
                break id;
            }
        };
        let secret = random_chars(SECRET_LEN);
        let now = now_unix();
        let record = TokenRecord {
            id: id.clone(),
            secret_sha256: hash(&secret),
            description: description.to_string(),
            created_at_unix: now,
            expires_at_unix: now.saturating_add(ttl.as_secs() as i64),
            uses: 0,
            last_used_unix: 0,
        };
        self.put_token(&record).await?;
        self.store.flush().await?;
        info!(token_id = %id, expires_at_unix = record.expires_at_unix, description = %description, "bootstrap token created");
        Ok((format!("{id}.{secret}"), record.public()))
    }

    /// The tokens that have not expired, by id; expired ones are forgotten here.
    pub async fn list_tokens(&self) -> Result<Vec<BootstrapToken>, IdentityError> {
        let _guard = self.lock.lock().await;
        let now = now_unix();
        let (live, expired): (Vec<_>, Vec<_>) = self
            .tokens()
            .await?
            .into_iter()
            .partition(|t| t.expires_at_unix > now);
        if !expired.is_empty() {
            for t in &expired {
                self.store.delete_record(TOKEN_KIND, &t.id).await?;
                info!(token_id = %t.id, "bootstrap token expired; forgotten");
            }
            self.store.flush().await?;
        }
        Ok(live.iter().map(TokenRecord::public).collect())
    }

    /// Deletes a token (by id, or the whole token).
    pub async fn delete_token(&self, id: &str) -> Result<(), IdentityError> {
        let id = id.split_once('.').map_or(id, |(id, _)| id).trim();
        let _guard = self.lock.lock().await;
        if !self.store.delete_record(TOKEN_KIND, id).await? {
            return Err(IdentityError::NotFound(format!(
                "no bootstrap token with id {id:?}"
            )));
        }
        self.store.flush().await?;
        info!(token_id = %id, "bootstrap token deleted");
        Ok(())
    }

    /// Signs a node certificate for `csr_pem`, given a valid `token`.
    pub async fn bootstrap(
        &self,
        token: &str,
        csr_pem: &str,
    ) -> Result<BootstrapResponse, IdentityError> {
        let signer = self.signer()?;
        let (id, secret) = parse_token(token)?;
        let _guard = self.lock.lock().await;
        let mut record = self
            .tokens()
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| {
                IdentityError::token(
                    TokenFault::Unknown,
                    format!("unknown bootstrap token {id}: it was never made here, or was deleted"),
                )
            })?;
        let now = now_unix();
        if record.expires_at_unix <= now {
            // Forgotten now: an expired token is no use to anyone.
            self.store.delete_record(TOKEN_KIND, id).await?;
            return Err(IdentityError::token(
                TokenFault::Expired,
                format!(
                    "bootstrap token {id} expired {}s ago: make a new one with `twillctl token create`",
                    now - record.expires_at_unix
                ),
            ));
        }
        if !constant_time_eq(hash(secret).as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(IdentityError::token(
                TokenFault::WrongSecret,
                format!("bootstrap token {id}: wrong secret"),
            ));
        }
        record.uses += 1;
        record.last_used_unix = now;
        let issued = self.issue(&signer, csr_pem, None, id).await?;
        self.put_token(&record).await?;
        self.store.flush().await?;
        Ok(issued)
    }

    /// Signs a new certificate for `node`, which presented a valid one (rotation).
    pub async fn renew(
        &self,
        node: &str,
        csr_pem: &str,
    ) -> Result<BootstrapResponse, IdentityError> {
        let signer = self.signer()?;
        let _guard = self.lock.lock().await;
        let issued = self.issue(&signer, csr_pem, Some(node), "").await?;
        self.store.flush().await?;
        self.metrics.certs_renewed.inc();
        Ok(issued)
    }

    /// Signs `csr_pem` (for `node` only, when given) and records it; not flushed.
    async fn issue(
        &self,
        signer: &Signer,
        csr_pem: &str,
        node: Option<&str>,
        token_id: &str,
    ) -> Result<BootstrapResponse, IdentityError> {
        let cn = twill_ctl::certs::csr_common_name(csr_pem)?;
        if let Some(node) = node.filter(|n| *n != cn) {
            return Err(IdentityError::BadCsr {
                fault: CsrFault::Subject,
                msg: format!(
                    "subject CN {cn:?} is not this node ({node:?}): a node renews only its own certificate"
                ),
            });
        }
        let signed = signer.ca.sign_node_csr(csr_pem, self.validity_for(&cn))?;
        let now = now_unix();
        let issued = IssuedRecord {
            node_name: signed.node.clone(),
            serial: signed.serial.clone(),
            issued_at_unix: now,
            not_after_unix: unix(signed.not_after),
            token_id: token_id.to_string(),
        };
        let value =
            serde_json::to_vec(&issued).map_err(|e| IdentityError::Invalid(e.to_string()))?;
        // Keyed by the time of issue (nanoseconds), so the records list oldest first.
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.store
            .put_record(ISSUED_KIND, &format!("{at:024}-{}", issued.serial), &value)
            .await?;
        self.metrics.certs_issued.inc();
        info!(node = %issued.node_name, serial = %issued.serial, token_id = %token_id, not_after_unix = issued.not_after_unix, renewal = node.is_some(), "node certificate issued");
        Ok(BootstrapResponse {
            certificate_chain_pem: format!("{}{}", signed.cert_pem, signer.chain),
            not_after_unix: issued.not_after_unix,
        })
    }

    /// Every certificate issued, oldest first.
    pub async fn issued(&self) -> Result<Vec<IssuedCertificate>, IdentityError> {
        Ok(self
            .store
            .records(ISSUED_KIND)
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<IssuedRecord>(&v).ok())
            .map(|r| IssuedCertificate {
                node_name: r.node_name,
                serial: r.serial,
                issued_at_unix: r.issued_at_unix,
                not_after_unix: r.not_after_unix,
                token_id: r.token_id,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_kubelets_form_and_bad_ones_never_echo_the_secret() {
        let t = format!("{}.{}", random_chars(6), random_chars(16));
        let (id, secret) = parse_token(&t).unwrap();
        assert!(token_chars(id, 6) && token_chars(secret, 16));
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdef.0123456789abcdeX",
        ] {
            let e = parse_token(bad).unwrap_err();
            assert_eq!(e.refusal(), Some(Refusal::Token(TokenFault::Malformed)));
            let e = e.to_string();
            assert!(
                e.contains("malformed") && !e.contains("0123456789"),
                "{bad}: {e}"
            );
        }
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sane") && !constant_time_eq(b"a", b"ab"));
    }
}
