//! Node identity: bootstrap tokens and the node certificates signed with them.
//!
//! A token is kubelet's `<id>.<secret>` (`[a-z0-9]{6}.[a-z0-9]{16}`). The controller
//! keeps only the SHA-256 of the secret, compares it in constant time, and forgets a
//! token once it has expired; one token may serve many nodes until then. A node sends
//! a certificate signing request with its token and gets back a certificate for the
//! request's key (`CN=<node>, O=twill:nodes`, clientAuth): its private key never
//! leaves it. Tokens and the record of every certificate issued are kept in the store
//! beside the leases, so they survive restarts.
//!
//! A token never lets its holder act as a node that is alive (docs/threat-model.md): a
//! name with a live lease, or with an unexpired certificate issued here and not
//! revoked, is refused, and a token may be bound to names (`--node`, `--node-prefix`)
//! and to a number of uses. Revocation and issuance take one lock, so a renewal either
//! finishes before a revocation (and its certificate is revoked with the others) or is
//! refused after it. Issued records are pruned a grace period after they expire.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use twill_pki::{parse_node_csr, Ca, CertError, CsrFault, NodeCsr, Validity};
use twill_proto::{BootstrapResponse, BootstrapToken, IssuedCertificate};

use twill_common::now_unix;

use crate::metrics::Metrics;
use crate::refusal::{Refusal, TokenFault};
use crate::store::{RecordKind, Store, StoreError};

/// Revocation records of admin certificates are kept under this prefix of the name (a
/// node name cannot hold a colon, so the two never meet).
const ADMIN_REVOCATION: &str = "admin:";
/// An issued record is kept this long after its certificate expires.
pub const ISSUED_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Issued records are pruned at most this often (Unix seconds).
const PRUNE_EVERY_SECS: i64 = 600;
/// Renewals one node may make in a burst, and per hour after it: an agent renews once
/// per certificate lifetime (days), and retries a failed renewal with backoff.
const RENEW_BURST: f64 = 5.0;
const RENEWS_PER_HOUR: f64 = 12.0;
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;
/// Lifetime of a token made without one.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why an identity operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token is malformed, unknown, deleted, expired or its secret is wrong: which
    /// of those, and what is wrong for a person (never the secret).
    #[error("{1}")]
    BadToken(TokenFault, String),
    /// The certificate signing request is refused: it does not parse or verify, its
    /// key is too weak, or its subject is no valid node name or not the caller's. Which
    /// of those, and what is wrong for a person.
    #[error("csr_pem: {1}")]
    BadCsr(CsrFault, String),
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
    /// The name to bootstrap is alive: a live lease, or a certificate not expired and
    /// not revoked. The message names the way out.
    #[error("{0}")]
    Alive(String),
    /// The token may not be used for this: another name than it is bound to, or its
    /// uses are spent. Which of those, and what is wrong for a person.
    #[error("{1}")]
    TokenNotAllowed(Refusal, String),
    /// The certificate renewing is revoked.
    #[error("{0}")]
    Revoked(String),
    /// The node renews faster than it may.
    #[error("{0}")]
    RateLimited(String),
    /// The store failed; nothing was issued.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl IdentityError {
    /// Why a certificate was not issued, for the refusal metric; `None` when the
    /// failure says nothing about the request (the store, an unknown token id to
    /// delete).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            IdentityError::BadToken(fault, _) => Some(Refusal::Token(*fault)),
            IdentityError::BadCsr(fault, _) => Some(Refusal::Csr(*fault)),
            IdentityError::NoSigningCa => Some(Refusal::NoSigner),
            IdentityError::Alive(_) => Some(Refusal::NameAlive),
            IdentityError::TokenNotAllowed(refusal, _) => Some(*refusal),
            IdentityError::Revoked(_) => Some(Refusal::Revoked),
            IdentityError::RateLimited(_) => Some(Refusal::RenewRateLimited),
            IdentityError::Invalid(_) | IdentityError::NotFound(_) | IdentityError::Store(_) => {
                None
            }
        }
    }
}

impl From<CertError> for IdentityError {
    fn from(e: CertError) -> Self {
        match e {
            CertError::Csr { fault, msg } => IdentityError::BadCsr(fault, msg),
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
    /// Names it may bootstrap (records made before bindings existed have none).
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    node_prefix: String,
    /// Uses it was made for; 0: no limit.
    #[serde(default)]
    max_uses: u32,
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
            nodes: self.nodes.clone(),
            node_prefix: self.node_prefix.clone(),
            max_uses: self.max_uses,
        }
    }

    /// Whether the token may bootstrap `node`.
    fn admits(&self, node: &str) -> bool {
        (self.nodes.is_empty() && self.node_prefix.is_empty())
            || self.nodes.iter().any(|n| n == node)
            || (!self.node_prefix.is_empty() && node.starts_with(&self.node_prefix))
    }

    /// The names it is bound to, for a message.
    fn binding(&self) -> String {
        let mut names: Vec<String> = self.nodes.clone();
        if !self.node_prefix.is_empty() {
            names.push(format!("{}*", self.node_prefix));
        }
        names.join(", ")
    }
}

/// What a new token is bound to.
#[derive(Debug, Clone, Default)]
pub struct TokenBinding {
    /// Exact node names it may bootstrap.
    pub nodes: Vec<String>,
    /// Names starting with this it may bootstrap.
    pub node_prefix: String,
    /// Certificates it may be exchanged for; 0: no limit.
    pub max_uses: u32,
}

/// An issued certificate as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IssuedRecord {
    node_name: String,
    serial: String,
    issued_at_unix: i64,
    not_after_unix: i64,
    token_id: String,
    /// Records made before key hashes were kept have none.
    #[serde(default)]
    key_sha256: String,
    /// The start of the certificate's validity (0 in records made before it was kept:
    /// such a certificate counts as not revoked until it expires).
    #[serde(default)]
    not_before_unix: i64,
}

/// The certificates of one node that may still be in use, from the issued records.
#[derive(Debug, Clone, Copy)]
struct LiveCert {
    not_before_unix: i64,
    not_after_unix: i64,
}

/// What the identity lock guards.
#[derive(Default)]
struct State {
    /// Unexpired certificates issued here, by node (pruned as they expire).
    certs: HashMap<String, Vec<LiveCert>>,
    /// When issued records were last pruned (Unix seconds).
    pruned_at: i64,
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
        if !twill_pki::chains_to(ca.cert_pem(), client_ca_pem) {
            return Err(format!(
                "--signing-cert {} is neither the client CA (--tls-client-ca) nor signed by it: \
                 the certificates it signs would be refused at every handshake",
                cert.display()
            ));
        }
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
    signer: parking_lot::RwLock<Option<Arc<Signer>>>,
    node_cert_ttl: Duration,
    metrics: Arc<Metrics>,
    /// Token records are read, changed and written back (use counts), certificates
    /// issued and revocations made: one at a time, so none of them races another.
    lock: tokio::sync::Mutex<State>,
    /// When each revoked node's (or admin's, under `ADMIN_REVOCATION`) certificates
    /// stopped being accepted (Unix seconds), and a counter that moves at every
    /// revocation (open watches and connections check theirs).
    revoked: parking_lot::RwLock<HashMap<String, i64>>,
    revocations: tokio::sync::watch::Sender<u64>,
    /// Renewals per node.
    renewals: crate::grpc::limit::NodeLimiter,
}

fn hash(secret: &str) -> String {
    twill_common::hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
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
        _ => Err(IdentityError::BadToken(
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
    /// Tokens and records in `store`; issuance on when `signer` is given. Fails when
    /// the revocations or the issued records cannot be read: a controller that started
    /// without them would accept revoked certificates (fail closed).
    pub async fn new(
        store: Arc<dyn Store>,
        signer: Option<Signer>,
        node_cert_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IdentityError> {
        let identity = Identity {
            store,
            signer: parking_lot::RwLock::new(signer.map(Arc::new)),
            node_cert_ttl,
            metrics,
            lock: tokio::sync::Mutex::new(State::default()),
            revoked: parking_lot::RwLock::new(HashMap::new()),
            revocations: tokio::sync::watch::Sender::new(0),
            renewals: crate::grpc::limit::NodeLimiter::new(RENEWS_PER_HOUR / 3600.0, RENEW_BURST),
        };
        identity.reload().await?;
        Ok(identity)
    }

    /// Reads the revocations and the issued certificates again from the store: at
    /// start, when this replica becomes the leader, and after the etcd watch lost
    /// events (compaction). Revocations are only ever added here, never dropped: one
    /// that cannot be read again stays in force.
    pub async fn reload(&self) -> Result<(), IdentityError> {
        let revoked = self.store.records(RecordKind::Revoked).await?;
        for (name, v) in revoked {
            if let Some(at) = Self::revocation_record(RecordKind::Revoked, &v) {
                self.revoked_at(&name, at);
            } else {
                warn!(name = %name, "ignoring an unreadable revocation record");
            }
        }
        let now = now_unix();
        let mut certs: HashMap<String, Vec<LiveCert>> = HashMap::new();
        for (_, v) in self.store.records(RecordKind::Issued).await? {
            let Ok(r) = serde_json::from_slice::<IssuedRecord>(&v) else {
                continue;
            };
            if r.not_after_unix > now {
                certs.entry(r.node_name).or_default().push(LiveCert {
                    not_before_unix: r.not_before_unix,
                    not_after_unix: r.not_after_unix,
                });
            }
        }
        self.lock.lock().await.certs = certs;
        Ok(())
    }

    /// Why `node`'s certificate valid from `not_before_unix` is refused, if it is.
    pub fn revoked(&self, node: &str, not_before_unix: i64) -> Option<String> {
        let at = *self.revoked.read().get(node)?;
        (not_before_unix <= at).then(|| {
            format!(
                "the certificates of node {node} were revoked at {at} (Unix time); it can rejoin \
                 only by bootstrapping with a token"
            )
        })
    }

    /// Why the certificate `id` is refused for a revocation, if it is: node and admin
    /// certificates can be revoked.
    pub fn refused(&self, id: &twill_common::tls::Identity) -> Option<String> {
        match id.role()? {
            twill_common::tls::Role::Node => self.revoked(&id.name, id.not_before_unix),
            twill_common::tls::Role::Admin => {
                let at = *self
                    .revoked
                    .read()
                    .get(&format!("{ADMIN_REVOCATION}{}", id.name))?;
                (id.not_before_unix <= at).then(|| {
                    format!(
                        "the certificates of admin {} were revoked at {at} (Unix time); ask for a new one",
                        id.name
                    )
                })
            }
            twill_common::tls::Role::Controller => None,
        }
    }

    fn signer(&self) -> Result<Arc<Signer>, IdentityError> {
        self.signer.read().clone().ok_or(IdentityError::NoSigningCa)
    }

    /// Re-reads the signing CA (and the client CA it must chain to) whenever one of the
    /// files changes; a pair that does not load is reported and the one in force kept.
    pub fn watch_signer(self: &Arc<Self>, cert: PathBuf, key: PathBuf, client_ca: PathBuf) {
        let identity = self.clone();
        tokio::spawn(async move {
            let mut files =
                crate::tls::Followed::new(vec![cert.clone(), key.clone(), client_ca.clone()]);
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let Some(now) = files.changed() else { continue };
                let loaded = std::fs::read_to_string(&client_ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", client_ca.display()))
                    .and_then(|ca| Signer::load(&cert, &key, &ca));
                match loaded {
                    Ok(s) => {
                        *identity.signer.write() = Some(Arc::new(s));
                        files.loaded(now);
                        info!(cert = %cert.display(), "signing CA changed; new node certificates use it");
                    }
                    Err(e) if files.failed(now) => {
                        warn!(error = %e, "signing CA not reloaded; keeping the one in force and reading it again every few seconds")
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// Moves at every revocation.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Revokes every certificate of `node` (or, with `admin`, of the admin of that
    /// name) valid from before now. Under the issuance lock: a renewal in progress
    /// finishes first, and its certificate is revoked with the others.
    pub async fn revoke(&self, name: &str, admin: bool) -> Result<i64, IdentityError> {
        twill_common::model::validate_node_name(name)
            .map_err(|e| IdentityError::Invalid(format!("node_name: {e}")))?;
        let mut state = self.lock.lock().await;
        // One second back: a certificate issued from now on starts at the current
        // second (certificate times have no finer grain) and must not be caught, nor
        // be valid only from the future. Every certificate issued before now started
        // minutes earlier (backdated), so it is caught.
        let key = if admin {
            format!("{ADMIN_REVOCATION}{name}")
        } else {
            name.to_string()
        };
        // A second revocation within the second of the first must still catch what was
        // issued between them (valid from the first's second + 1): it moves forward.
        let before = self.revoked.read().get(&key).copied();
        let at = (now_unix() - 1).max(before.map_or(i64::MIN, |b| b + 1));
        self.store
            .put_record(RecordKind::Revoked, &key, at.to_string().as_bytes())
            .await?;
        self.store.flush().await?;
        self.revoked_at(&key, at);
        if !admin {
            if let Some(certs) = state.certs.get_mut(name) {
                certs.retain(|c| c.not_before_unix > at);
            }
        }
        info!(name = %name, role = if admin { "admin" } else { "node" }, revoked_at_unix = at, "certificates revoked");
        Ok(at)
    }

    /// Puts a revocation in force: made here, or seen in the store when another
    /// replica made it.
    pub fn revoked_at(&self, node: &str, at: i64) {
        let mut revoked = self.revoked.write();
        if revoked.get(node) == Some(&at) {
            return;
        }
        revoked.insert(node.to_string(), at);
        drop(revoked);
        self.revocations.send_modify(|n| *n += 1);
    }

    /// A revocation record's kind and value, as the store holds it.
    pub fn revocation_record(kind: RecordKind, value: &[u8]) -> Option<i64> {
        (kind == RecordKind::Revoked)
            .then(|| std::str::from_utf8(value).ok()?.parse().ok())
            .flatten()
    }

    /// The validity of a certificate issued now for `node`: it starts after the node's
    /// revocation, if any, so that a certificate issued after it is never refused.
    fn validity_for(&self, node: &str) -> Validity {
        let mut v = Validity::lasting(self.node_cert_ttl);
        if let Some(at) = self.revoked.read().get(node) {
            let after = UNIX_EPOCH + Duration::from_secs(at.saturating_add(1).max(0) as u64);
            v.not_before = v.not_before.max(after);
        }
        v
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, IdentityError> {
        Ok(self
            .store
            .records(RecordKind::Token)
            .await?
            .into_iter()
            .filter_map(|(id, v)| {
                serde_json::from_slice(&v)
                    .inspect_err(|e| warn!(token_id = %id, error = %e, "ignoring an unreadable token record"))
                    .ok()
            })
            .collect())
    }

    async fn put_token(&self, t: &TokenRecord) -> Result<(), IdentityError> {
        let value = serde_json::to_vec(t).map_err(|e| IdentityError::Invalid(e.to_string()))?;
        self.store
            .put_record(RecordKind::Token, &t.id, &value)
            .await?;
        Ok(())
    }

    /// Makes a token valid for `ttl` (zero: the default); returns it whole, once.
    pub async fn create_token(
        &self,
        ttl: Duration,
        description: &str,
        binding: TokenBinding,
    ) -> Result<(String, BootstrapToken), IdentityError> {
        for n in &binding.nodes {
            twill_common::model::validate_node_name(n)
                .map_err(|e| IdentityError::Invalid(format!("nodes: {n:?}: {e}")))?;
        }
        let prefix = &binding.node_prefix;
        let name_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b);
        if prefix.len() > 63 || !prefix.bytes().all(name_byte) {
            return Err(IdentityError::Invalid(format!(
                "node_prefix {prefix:?}: at most 63 characters of a-z, 0-9, '-' and '.' (the start of a node name)"
            )));
        }
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
        let id = loop {
            let id = random_chars(ID_LEN);
            if self.store.record(RecordKind::Token, &id).await?.is_none() {
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
            nodes: binding.nodes,
            node_prefix: binding.node_prefix,
            max_uses: binding.max_uses,
        };
        self.put_token(&record).await?;
        self.store.flush().await?;
        info!(token_id = %id, expires_at_unix = record.expires_at_unix, description = %description, nodes = %record.binding(), max_uses = record.max_uses, "bootstrap token created");
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
                self.store.delete_record(RecordKind::Token, &t.id).await?;
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
        if !self.store.delete_record(RecordKind::Token, id).await? {
            return Err(IdentityError::NotFound(format!(
                "no bootstrap token with id {id:?}"
            )));
        }
        self.store.flush().await?;
        info!(token_id = %id, "bootstrap token deleted");
        Ok(())
    }

    /// Signs a node certificate for `csr_pem`, given a valid `token`. `has_lease`
    /// says whether a node name holds a live lease that a key holds (not one whose
    /// certificates were revoked since): such a name is alive, and no token may take it
    /// over.
    pub async fn bootstrap(
        &self,
        token: &str,
        csr_pem: &str,
        has_lease: impl Fn(&str) -> bool,
    ) -> Result<BootstrapResponse, IdentityError> {
        let signer = self.signer()?;
        let (id, secret) = parse_token(token)?;
        // Parsed before the lock (it is CPU only), but its error is told only after the
        // token's: a wrong token must count as one whatever the request holds.
        let request = parse_node_csr(csr_pem);
        let mut state = self.lock.lock().await;
        let mut record = match self.store.record(RecordKind::Token, id).await? {
            Some(v) => serde_json::from_slice::<TokenRecord>(&v).map_err(|e| {
                warn!(token_id = %id, error = %e, "unreadable token record");
                IdentityError::BadToken(
                    TokenFault::Unknown,
                    format!("unknown bootstrap token {id}: its record does not read"),
                )
            })?,
            None => {
                return Err(IdentityError::BadToken(
                    TokenFault::Unknown,
                    format!("unknown bootstrap token {id}: it was never made here, or was deleted"),
                ))
            }
        };
        let now = now_unix();
        if record.expires_at_unix <= now {
            // Forgotten now: an expired token is no use to anyone.
            self.store.delete_record(RecordKind::Token, id).await?;
            return Err(IdentityError::BadToken(
                TokenFault::Expired,
                format!(
                    "bootstrap token {id} expired {}s ago: make a new one with `twillctl token create`",
                    now - record.expires_at_unix
                ),
            ));
        }
        if !constant_time_eq(hash(secret).as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(IdentityError::BadToken(
                TokenFault::WrongSecret,
                format!("bootstrap token {id}: wrong secret"),
            ));
        }
        if record.max_uses > 0 && record.uses >= u64::from(record.max_uses) {
            return Err(IdentityError::TokenNotAllowed(
                Refusal::TokenUsedUp,
                format!(
                    "bootstrap token {id} has been used {} times, all it was made for: make a new one with `twillctl token create`",
                    record.uses
                ),
            ));
        }
        let request = request?;
        let csr = request.common_name.clone();
        if !record.admits(&csr) {
            return Err(IdentityError::TokenNotAllowed(
                Refusal::TokenNotForName,
                format!(
                    "bootstrap token {id} may not bootstrap node {csr:?}: it is bound to {}",
                    record.binding()
                ),
            ));
        }
        if let Some(why) = self.alive(&state, &csr, now, has_lease(&csr)) {
            return Err(IdentityError::Alive(format!(
                "node {csr} is alive ({why}): a bootstrap token cannot take over a live node. \
                 If this machine really is {csr} and lost its key, run `twillctl certs revoke {csr}` \
                 first (or wait until its lease and certificates expire)"
            )));
        }
        record.uses += 1;
        record.last_used_unix = now;
        let issued = self.issue(&mut state, &signer, &request, None, id).await?;
        self.put_token(&record).await?;
        drop(state);
        // Made durable outside the lock, so that the bootstraps arriving together share
        // their flushes (group commit) instead of taking one fsync each, in turn. A
        // bootstrap that saw this one's writes answers only after a flush of its own,
        // which covers them.
        self.store.flush().await?;
        Ok(issued)
    }

    /// Why node `name` counts as alive, if it does: a live lease, or a certificate
    /// issued here that has not expired and was not revoked.
    fn alive(&self, state: &State, name: &str, now: i64, has_lease: bool) -> Option<String> {
        if has_lease {
            return Some("it holds a live lease".into());
        }
        let revoked_at = self.revoked.read().get(name).copied();
        let live = state.certs.get(name)?.iter().find(|c| {
            c.not_after_unix > now && revoked_at.is_none_or(|at| c.not_before_unix > at)
        })?;
        Some(format!(
            "a certificate issued to it is valid until {}",
            humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_secs(live.not_after_unix.max(0) as u64)
            )
        ))
    }

    /// Signs a new certificate for `node`, which presented the certificate `current`
    /// (rotation), and says the new key's hash. Checked again under the lock: a
    /// revocation made since the call was admitted refuses it.
    pub async fn renew(
        &self,
        current: &twill_common::tls::Identity,
        csr_pem: &str,
    ) -> Result<(BootstrapResponse, [u8; 32]), IdentityError> {
        let signer = self.signer()?;
        let node = current.name.as_str();
        if self.renewals.check(node).is_err() {
            return Err(IdentityError::RateLimited(format!(
                "node {node} renews its certificate faster than {RENEW_BURST} times at once or \
                 {RENEWS_PER_HOUR} an hour; retry later"
            )));
        }
        let request = parse_node_csr(csr_pem)?;
        let mut state = self.lock.lock().await;
        if let Some(why) = self.refused(current) {
            return Err(IdentityError::Revoked(why));
        }
        let issued = self
            .issue(&mut state, &signer, &request, Some(node), "")
            .await?;
        drop(state);
        // Outside the lock, as a bootstrap's.
        self.store.flush().await?;
        self.metrics.certs_renewed.inc();
        Ok((issued, request.key_sha256))
    }

    /// Signs `csr` (for `node` only, when given) and records it; not flushed.
    async fn issue(
        &self,
        state: &mut State,
        signer: &Signer,
        csr: &NodeCsr,
        node: Option<&str>,
        token_id: &str,
    ) -> Result<BootstrapResponse, IdentityError> {
        let cn = &csr.common_name;
        if let Some(node) = node.filter(|n| n != cn) {
            return Err(IdentityError::BadCsr(
                CsrFault::Subject,
                format!(
                    "subject CN {cn:?} is not this node ({node:?}): a node renews only its own certificate"
                ),
            ));
        }
        let validity = self.validity_for(cn);
        let signed = signer.ca.sign_node(csr, validity)?;
        let now = now_unix();
        let key_sha256 = twill_common::hex(&signed.key_sha256);
        let issued = IssuedRecord {
            node_name: signed.node.clone(),
            serial: signed.serial.clone(),
            issued_at_unix: now,
            not_after_unix: unix(signed.not_after),
            token_id: token_id.to_string(),
            key_sha256,
            not_before_unix: unix(validity.not_before),
        };
        let value =
            serde_json::to_vec(&issued).map_err(|e| IdentityError::Invalid(e.to_string()))?;
        // Keyed by the time of issue (nanoseconds), so the records list oldest first.
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.store
            .put_record(
                RecordKind::Issued,
                &format!("{at:024}-{}", issued.serial),
                &value,
            )
            .await?;
        let certs = state.certs.entry(issued.node_name.clone()).or_default();
        certs.retain(|c| c.not_after_unix > now);
        certs.push(LiveCert {
            not_before_unix: issued.not_before_unix,
            not_after_unix: issued.not_after_unix,
        });
        self.metrics.certs_issued.inc();
        info!(node = %issued.node_name, serial = %issued.serial, token_id = %token_id, not_after_unix = issued.not_after_unix, renewal = node.is_some(), "node certificate issued");
        if now - state.pruned_at >= PRUNE_EVERY_SECS {
            state.pruned_at = now;
            self.prune(now).await?;
        }
        Ok(BootstrapResponse {
            certificate_chain_pem: format!("{}{}", signed.cert_pem, signer.chain),
            not_after_unix: issued.not_after_unix,
        })
    }

    /// Deletes the issued records whose certificates expired more than `ISSUED_GRACE`
    /// ago; returns how many.
    async fn prune(&self, now: i64) -> Result<usize, IdentityError> {
        let cutoff = now - ISSUED_GRACE.as_secs() as i64;
        let mut pruned = 0;
        for (key, v) in self.store.records(RecordKind::Issued).await? {
            let expired = serde_json::from_slice::<IssuedRecord>(&v)
                .map_or(true, |r| r.not_after_unix < cutoff);
            if expired && self.store.delete_record(RecordKind::Issued, &key).await? {
                pruned += 1;
            }
        }
        if pruned > 0 {
            info!(
                pruned,
                "pruned the records of certificates that expired over a day ago"
            );
        }
        Ok(pruned)
    }

    /// Issued certificates, oldest first: up to `page_size` (0: 1,000; at most 10,000)
    /// after the record `page_token`, and the token of the next page (empty: none).
    /// Records expired beyond the grace period are pruned first.
    pub async fn issued(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<IssuedCertificate>, String), IdentityError> {
        let limit = match page_size {
            0 => 1000,
            n => n.min(10_000),
        } as usize;
        {
            let mut state = self.lock.lock().await;
            let now = now_unix();
            if now - state.pruned_at >= PRUNE_EVERY_SECS {
                state.pruned_at = now;
                self.prune(now).await?;
                self.store.flush().await?;
            }
        }
        let records = self.store.records(RecordKind::Issued).await?;
        let mut page: Vec<(String, IssuedCertificate)> = records
            .into_iter()
            .filter(|(key, _)| page_token.is_empty() || key.as_str() > page_token)
            .filter_map(|(key, v)| Some((key, serde_json::from_slice::<IssuedRecord>(&v).ok()?)))
            .take(limit + 1)
            .map(|(key, r)| {
                (
                    key,
                    IssuedCertificate {
                        node_name: r.node_name,
                        serial: r.serial,
                        issued_at_unix: r.issued_at_unix,
                        not_after_unix: r.not_after_unix,
                        token_id: r.token_id,
                        key_sha256: r.key_sha256,
                    },
                )
            })
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|(k, _)| k.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page.into_iter().map(|(_, c)| c).collect(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_common::tls::{Identity as CertIdentity, NODES_GROUP};

    /// An identity with a signing CA on a throwaway store; the directory lives as long
    /// as it.
    async fn signing() -> (tempfile::TempDir, Arc<Identity>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = twill_pki::new_ca(Validity::days(1).unwrap()).unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        std::fs::write(&key, &ca.key_pem).unwrap();
        let signer = Signer::load(&cert, &key, &ca.cert_pem).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(&dir.path().join("db"), 16).unwrap());
        let metrics = Arc::new(Metrics::default());
        let identity = Identity::new(store, Some(signer), Duration::from_secs(3600), metrics)
            .await
            .unwrap();
        (dir, Arc::new(identity))
    }

    /// The certificate a node presents: issued minutes ago, as every certificate is.
    fn presented(node: &str) -> CertIdentity {
        let now = now_unix();
        CertIdentity {
            name: node.into(),
            groups: vec![NODES_GROUP.into()],
            not_before_unix: now - 300,
            not_after_unix: now + 3600,
            key_sha256: [1; 32],
        }
    }

    fn csr(node: &str) -> String {
        twill_pki::node_csr_pem(node, &twill_pki::generate_key().unwrap()).unwrap()
    }

    /// What a certificate in a BootstrapResponse says of itself.
    fn identity_of(chain_pem: &str) -> CertIdentity {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        CertIdentity::from_der(&CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap())
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_renewal_racing_a_revocation_survives_it() {
        let (_dir, identity) = signing().await;
        for round in 0..20 {
            let node = format!("n{round}");
            let mut renewals = tokio::task::JoinSet::new();
            for _ in 0..5 {
                let (identity, node, csr) = (identity.clone(), node.clone(), csr(&node));
                renewals.spawn(async move { identity.renew(&presented(&node), &csr).await });
            }
            tokio::task::yield_now().await;
            identity.revoke(&node, false).await.unwrap();
            while let Some(r) = renewals.join_next().await {
                match r.unwrap() {
                    Ok((resp, _)) => {
                        let cert = identity_of(&resp.certificate_chain_pem);
                        assert!(
                            identity.refused(&cert).is_some(),
                            "{node}: a certificate renewed around the revocation survived it"
                        );
                    }
                    Err(IdentityError::Revoked(_)) => {}
                    Err(e) => panic!("{node}: {e}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn renewals_are_limited_per_node() {
        let (_dir, identity) = signing().await;
        for _ in 0..RENEW_BURST as usize {
            identity.renew(&presented("a"), &csr("a")).await.unwrap();
        }
        let e = identity
            .renew(&presented("a"), &csr("a"))
            .await
            .unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::RenewRateLimited), "{e}");
        identity
            .renew(&presented("b"), &csr("b"))
            .await
            .expect("another node is not held back");
    }

    #[tokio::test]
    async fn issued_records_are_pruned_after_the_grace_and_listed_in_pages() {
        let (_dir, identity) = signing().await;
        let now = now_unix();
        let long_ago = IssuedRecord {
            node_name: "old".into(),
            serial: "01".into(),
            issued_at_unix: 0,
            not_after_unix: now - ISSUED_GRACE.as_secs() as i64 - 1,
            token_id: String::new(),
            key_sha256: String::new(),
            not_before_unix: 0,
        };
        identity
            .store
            .put_record(
                RecordKind::Issued,
                "0",
                &serde_json::to_vec(&long_ago).unwrap(),
            )
            .await
            .unwrap();
        for n in ["a", "b", "c"] {
            identity.renew(&presented(n), &csr(n)).await.unwrap();
        }
        // The first issue pruned it (records are pruned at most every few minutes).
        let (first, token) = identity.issued(2, "").await.unwrap();
        assert_eq!((first.len(), token.is_empty()), (2, false));
        let (rest, token) = identity.issued(2, &token).await.unwrap();
        assert_eq!((rest.len(), token.as_str()), (1, ""));
        let names: Vec<_> = first
            .iter()
            .chain(&rest)
            .map(|c| c.node_name.as_str())
            .collect();
        assert_eq!(
            names,
            ["a", "b", "c"],
            "oldest first, the expired one pruned"
        );
        assert!(rest[0].key_sha256.len() == 64, "the key's hash, hex");
    }

    #[tokio::test]
    async fn a_bootstrap_never_takes_a_live_name_and_a_token_keeps_its_binding() {
        let (_dir, identity) = signing().await;
        let (token, _) = identity
            .create_token(
                Duration::ZERO,
                "t",
                TokenBinding {
                    nodes: vec!["a".into()],
                    node_prefix: "w-".into(),
                    max_uses: 3,
                },
            )
            .await
            .unwrap();
        identity
            .bootstrap(&token, &csr("a"), |_| false)
            .await
            .unwrap();
        let e = identity
            .bootstrap(&token, &csr("a"), |_| false)
            .await
            .unwrap_err();
        assert_eq!(
            e.refusal(),
            Some(Refusal::NameAlive),
            "a live certificate: {e}"
        );
        let e = identity
            .bootstrap(&token, &csr("w-1"), |_| true)
            .await
            .unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::NameAlive), "a live lease: {e}");
        let e = identity
            .bootstrap(&token, &csr("x"), |_| false)
            .await
            .unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::TokenNotForName), "{e}");
        identity.revoke("a", false).await.unwrap();
        identity
            .bootstrap(&token, &csr("a"), |_| false)
            .await
            .expect("a revoked node rejoins");
        identity
            .bootstrap(&token, &csr("w-2"), |_| false)
            .await
            .unwrap();
        let e = identity
            .bootstrap(&token, &csr("w-3"), |_| false)
            .await
            .unwrap_err();
        assert_eq!(e.refusal(), Some(Refusal::TokenUsedUp), "{e}");
    }

    /// Bootstraps flush outside the lock: at once, a token's uses still add up and a
    /// name is still issued once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bootstraps_at_once_keep_the_token_count_and_one_certificate_per_name() {
        let (_dir, identity) = signing().await;
        let binding = TokenBinding {
            node_prefix: "w-".into(),
            max_uses: 5,
            ..Default::default()
        };
        let (token, _) = identity
            .create_token(Duration::ZERO, "t", binding)
            .await
            .unwrap();
        let names = (0..12).map(|i| format!("w-{}", i % 8));
        let calls = names.map(|name| {
            let (identity, token) = (identity.clone(), token.clone());
            let csr = csr(&name);
            tokio::spawn(async move { identity.bootstrap(&token, &csr, |_| false).await })
        });
        let mut issued = Vec::new();
        let mut refused = Vec::new();
        for call in calls.collect::<Vec<_>>() {
            match call.await.unwrap() {
                Ok(r) => issued.push(identity_of(&r.certificate_chain_pem).name),
                Err(e) => refused.push(e.refusal()),
            }
        }
        assert_eq!(issued.len(), 5, "the token's five uses: {issued:?}");
        issued.sort();
        issued.dedup();
        assert_eq!(issued.len(), 5, "no name twice");
        assert!(
            refused
                .iter()
                .all(|r| matches!(r, Some(Refusal::TokenUsedUp | Refusal::NameAlive))),
            "{refused:?}"
        );
        let (page, _) = identity.issued(0, "").await.unwrap();
        assert_eq!(page.len(), 5, "one record per certificate");
    }

    /// A store whose records cannot be read (etcd unreachable at start, say).
    struct Unreadable(crate::store::SledStore);

    #[async_trait::async_trait]
    impl Store for Unreadable {
        async fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
            self.0.load().await
        }
        async fn write(&self, b: &crate::store::Batch<'_>) -> Result<(), StoreError> {
            self.0.write(b).await
        }
        async fn put_record(&self, kind: RecordKind, id: &str, v: &[u8]) -> Result<(), StoreError> {
            self.0.put_record(kind, id, v).await
        }
        async fn delete_record(&self, kind: RecordKind, id: &str) -> Result<bool, StoreError> {
            self.0.delete_record(kind, id).await
        }
        async fn records(&self, _: RecordKind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Err(StoreError::Backend("injected read failure".into()))
        }
        async fn record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.record(kind, id).await
        }
        async fn set_layout(&self, layout: &crate::store::Layout) -> Result<(), StoreError> {
            self.0.set_layout(layout).await
        }
        fn size_on_disk(&self) -> u64 {
            0
        }
        async fn flush(&self) -> Result<(), StoreError> {
            self.0.flush().await
        }
    }

    #[tokio::test]
    async fn revocations_that_cannot_be_read_stop_the_start_and_a_failed_reload_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let sled = crate::store::SledStore::open(dir.path(), 16).unwrap();
        sled.put_record(RecordKind::Revoked, "n1", b"1000")
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let e = Identity::new(
            Arc::new(Unreadable(sled)),
            None,
            Duration::from_secs(60),
            metrics.clone(),
        )
        .await
        .err()
        .expect("no identity without its revocations");
        assert!(e.to_string().contains("injected read failure"), "{e}");

        let (_dir, identity) = signing().await;
        identity.revoke("n1", false).await.unwrap();
        let mut old = presented("n1");
        old.not_before_unix = 0;
        assert!(identity.refused(&old).is_some());
        identity.reload().await.unwrap();
        assert!(identity.refused(&old).is_some(), "a reload never drops one");
    }

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
