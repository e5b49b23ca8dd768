//! The controller's TLS: its serving certificate and the client CA that client
//! certificates must chain to, both re-read when their files change (cert-manager and
//! the kubelet rewrite mounted Secrets in place), so renewing them needs no restart.
//! Client certificates are optional at the handshake: a node without one may only
//! call IdentityService.Bootstrap (`grpc::auth` refuses everything else).
//!
//! The client certificate is read once per connection, here (`Peer`, which tonic puts
//! in every request of the connection), never per call. Every live connection is
//! registered, so that one whose certificate stops being valid (the client CA replaced,
//! the certificate revoked or expired) is closed instead of serving until the client
//! hangs up; connections without a certificate are capped in number and closed when
//! idle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use twill_common::tls::Identity as CertIdentity;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How often the files are checked for a change.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections without a client certificate open at once, at most, unless told
/// otherwise (`--max-anonymous-connections`): they can only bootstrap, which takes one
/// call, but a cold start of thousands of nodes opens as many at once, each waiting
/// for its certificate.
pub const MAX_ANONYMOUS: usize = 4096;
/// A connection without a client certificate is closed after this long with no call
/// under way and no byte from its client.
pub const ANONYMOUS_IDLE: Duration = Duration::from_secs(10);
/// How long after a revocation its connections are closed: long enough for the open
/// calls and watches to be refused with the reason.
const REVOKED_GRACE: Duration = Duration::from_secs(1);
/// How often every connection's certificate is checked for expiry (revocations and a
/// replaced client CA are acted on at once).
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file (the flag that names it, the file) could not be read.
    #[error("{0} {1}: {2}")]
    Read(&'static str, PathBuf, #[source] std::io::Error),
    /// A file's content (the flag that names it, the file) is unusable: what is wrong.
    #[error("{0} {1}: {2}")]
    Bad(&'static str, PathBuf, String),
}

/// The files behind the TLS configuration.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `--tls-cert`.
    pub cert: PathBuf,
    /// `--tls-key`.
    pub key: PathBuf,
    /// `--tls-client-ca`.
    pub client_ca: PathBuf,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|e| TlsSetupError::Read(flag, path.to_path_buf(), e))
}

fn bad(flag: &'static str, path: &Path, msg: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Bad(flag, path.to_path_buf(), msg.to_string())
}

fn certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(flag, path)?;
    let certs: Vec<CertificateDer<'static>> = twill_pki::pem_blocks(&pem, "CERTIFICATE")
        .map_err(|e| bad(flag, path, e))?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if certs.is_empty() {
        return Err(bad(flag, path, "no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let chain = certificates("--tls-cert", &files.cert)?;
    let bad_key = |e: String| bad("--tls-key", &files.key, e);
    let pem = read("--tls-key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad_key(e.to_string()))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad_key(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| bad_key(format!("does not belong to --tls-cert: {e}")))?;
    Ok(Arc::new(ck))
}

fn client_verifier(path: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("--tls-client-ca", path)? {
        roots
            .add(cert)
            .map_err(|e| bad("--tls-client-ca", path, e))?;
    }
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| bad("--tls-client-ca", path, e))
}

/// The serving certificate in force.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The client CA in force.
#[derive(Debug)]
struct Verifier(RwLock<Arc<dyn ClientCertVerifier>>);

impl Verifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.read().clone()
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints (they would borrow from a CA that may be replaced): clients send the
        // one certificate they have.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// A TLS server configuration whose certificate and client CA follow their files.
pub struct ReloadingTls {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    verifier: Arc<Verifier>,
    acceptor: TlsAcceptor,
    connections: Arc<Connections>,
    /// Moves when the client CA is replaced.
    ca_changed: tokio::sync::watch::Sender<u64>,
}

/// When a file was last changed, and its length: what tells a rewrite.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Files followed for changes (cert-manager and the kubelet rewrite mounted Secrets in
/// place). A change counts as seen only once it loaded, so files caught half written
/// are read again at the next check instead of being skipped until the next change.
#[derive(Debug)]
pub struct Followed {
    paths: Vec<PathBuf>,
    loaded: Vec<Stamp>,
    failed: Option<Vec<Stamp>>,
}

impl Followed {
    /// Follows `paths`, taking what they hold now as loaded.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let loaded = paths.iter().map(|p| stamp(p)).collect();
        Followed {
            paths,
            loaded,
            failed: None,
        }
    }

    /// The files' stamps now, when they differ from those last loaded.
    pub fn changed(&self) -> Option<Vec<Stamp>> {
        let now: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
        (now != self.loaded).then_some(now)
    }

    /// The files as stamped `now` loaded.
    pub fn loaded(&mut self, now: Vec<Stamp>) {
        self.loaded = now;
        self.failed = None;
    }

    /// The files as stamped `now` did not load; true the first time for these stamps
    /// (say so once, not at every retry).
    pub fn failed(&mut self, now: Vec<Stamp>) -> bool {
        let first = self.failed.as_ref() != Some(&now);
        self.failed = Some(now);
        first
    }
}

impl ReloadingTls {
    /// Loads the files; the errors name the flag and the file.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsSetupError> {
        let resolver = Arc::new(Resolver(RwLock::new(certified_key(&files)?)));
        let verifier = Arc::new(Verifier(RwLock::new(client_verifier(&files.client_ca)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("--tls-cert", &files.cert, e))?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(ReloadingTls {
            files,
            resolver,
            verifier,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            connections: Arc::default(),
            ca_changed: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Sets how many connections without a client certificate may be open at once.
    pub fn set_max_anonymous(&self, n: usize) {
        self.connections.max_anonymous.store(n, Ordering::Relaxed);
    }

    /// Whether `chain` (a leaf, then intermediates) verifies against the client CA in
    /// force now, as at a handshake: how the leader checks a certificate a replica
    /// forwarded, and how open connections are re-checked when the CA is replaced.
    pub fn verify_client(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no certificate".to_string())?;
        self.verifier
            .current()
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Closes every open connection whose client certificate is no longer valid: it
    /// does not verify against the client CA in force, has expired, or `refused` (the
    /// revocations) names a reason. Runs until the process ends: at once when the CA
    /// changes or `revocations` moves, and every few seconds for expiries.
    pub fn enforce(
        self: &Arc<Self>,
        refused: impl Fn(&CertIdentity) -> Option<String> + Send + Sync + 'static,
        mut revocations: tokio::sync::watch::Receiver<u64>,
    ) {
        let tls = self.clone();
        let mut ca = self.ca_changed.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_CHECK_EVERY);
            loop {
                let reverify = tokio::select! {
                    _ = tick.tick() => false,
                    r = revocations.changed() => {
                        if r.is_err() { return; }
                        // The calls and watches of a revoked certificate are refused
                        // with the reason first (PERMISSION_DENIED); the connection
                        // closes a moment later.
                        tokio::time::sleep(REVOKED_GRACE).await;
                        false
                    }
                    r = ca.changed() => {
                        if r.is_err() { return; }
                        true
                    }
                };
                let now = twill_common::now_unix();
                tls.connections.close_where(|id, chain| {
                    if id.expired(now) {
                        return Some("the client certificate expired".to_string());
                    }
                    if reverify {
                        if let Err(e) = tls.verify_client(chain) {
                            return Some(format!(
                                "the client certificate no longer verifies against --tls-client-ca: {e}"
                            ));
                        }
                    }
                    refused(id)
                });
            }
        });
    }

    /// Re-reads the files whenever one changes, for as long as the process runs. A file
    /// that does not load is reported and the one in force is kept.
    pub fn watch(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut files = Followed::new(vec![
                tls.files.cert.clone(),
                tls.files.key.clone(),
                tls.files.client_ca.clone(),
            ]);
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tick.tick().await;
                let Some(now) = files.changed() else { continue };
                // All or nothing: a certificate rewritten before its key (or caught half
                // written) fails to load now and is read again at the next check.
                match (
                    certified_key(&tls.files),
                    client_verifier(&tls.files.client_ca),
                ) {
                    (Ok(ck), Ok(v)) => {
                        *tls.resolver.0.write() = ck;
                        *tls.verifier.0.write() = v;
                        tls.ca_changed.send_modify(|n| *n += 1);
                        files.loaded(now);
                        info!(cert = %tls.files.cert.display(), client_ca = %tls.files.client_ca.display(), "TLS files changed; new connections use them");
                    }
                    (ck, v) if files.failed(now) => {
                        for e in [ck.err(), v.err()].into_iter().flatten() {
                            warn!(error = %e, "TLS files not reloaded; keeping the ones in force and reading them again every few seconds");
                        }
                    }
                    _ => {}
                }
            }
        });
    }

    /// Accepts connections on `listener` and hands over those whose handshake
    /// completes; a slow or failed handshake never holds up the others.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<Conn, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(128);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                if tx.is_closed() {
                    return;
                }
                let (acceptor, out) = (tls.acceptor.clone(), tx.clone());
                let connections = tls.connections.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            if let Some(conn) = connections.admit(stream, peer) {
                                let _ = out.send(Ok(conn)).await;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// Who is at the other end of a connection: read once, when it opened.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client certificate's identity; `None` for a connection without one.
    pub identity: Option<Arc<CertIdentity>>,
    /// The certificates the client presented, leaf first (what a replica forwards).
    pub chain: Arc<Vec<CertificateDer<'static>>>,
    /// The client's address.
    pub remote: SocketAddr,
    /// What the connection is doing, for the idle timeout.
    state: Arc<ConnState>,
}

impl Peer {
    /// Marks a call under way on this connection until the guard is dropped: a
    /// connection waiting for its answer is not idle.
    pub fn call_started(&self) -> CallGuard {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.state.clone())
    }
}

/// A call under way on a connection (see `Peer::call_started`).
#[derive(Debug)]
pub struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        // The idle time counts from the end of the last call.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the registry and a connection share.
#[derive(Debug)]
struct ConnState {
    /// Set to close the connection: its next read or write fails.
    closed: AtomicBool,
    waker: AtomicWaker,
    /// When the connection opened: `last_active_ms` counts from it.
    opened: Instant,
    /// Milliseconds since `opened` of the last byte read or call ended.
    last_active_ms: AtomicU64,
    /// Calls under way.
    in_flight: AtomicUsize,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            opened: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long nothing happened on the connection: zero while a call is under way.
    fn idle_ms(&self) -> u64 {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return 0;
        }
        self.now_ms()
            .saturating_sub(self.last_active_ms.load(Ordering::Relaxed))
    }
}

/// Every open connection with a client certificate, and the count of those without.
#[derive(Debug)]
struct Connections {
    max_anonymous: AtomicUsize,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Registered>>,
    anonymous: AtomicUsize,
}

#[derive(Debug)]
struct Registered {
    peer: Peer,
    state: Weak<ConnState>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            max_anonymous: AtomicUsize::new(MAX_ANONYMOUS),
            next_id: AtomicU64::new(0),
            live: Mutex::default(),
            anonymous: AtomicUsize::new(0),
        }
    }
}

impl Connections {
    /// A connection whose handshake completed, ready for the gRPC server; `None` when
    /// it is refused (too many without a certificate, or a certificate that does not
    /// parse).
    fn admit(self: &Arc<Self>, stream: TlsStream<TcpStream>, remote: SocketAddr) -> Option<Conn> {
        let chain: Vec<CertificateDer<'static>> = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let identity = match chain
            .first()
            .map(|leaf| CertIdentity::from_der(leaf.as_ref()))
        {
            None => None,
            Some(Ok(id)) => Some(Arc::new(id)),
            Some(Err(e)) => {
                warn!(peer = %remote, error = %e, "refused a connection: its client certificate cannot be read");
                return None;
            }
        };
        let state = Arc::new(ConnState::new());
        let anonymous = identity.is_none();
        if anonymous {
            let limit = self.max_anonymous.load(Ordering::Relaxed);
            if self.anonymous.fetch_add(1, Ordering::AcqRel) >= limit {
                self.anonymous.fetch_sub(1, Ordering::AcqRel);
                warn!(peer = %remote, limit, "refused a connection without a client certificate: too many are open (--max-anonymous-connections)");
                return None;
            }
            close_when_idle(&state);
        }
        let peer = Peer {
            identity,
            chain: Arc::new(chain),
            remote,
            state: state.clone(),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !anonymous {
            self.live.lock().insert(
                id,
                Registered {
                    peer: peer.clone(),
                    state: Arc::downgrade(&state),
                },
            );
        }
        Some(Conn {
            inner: stream,
            peer,
            state,
            registry: self.clone(),
            id,
            anonymous,
        })
    }

    /// Closes every registered connection for which `why` gives a reason.
    fn close_where(
        &self,
        why: impl Fn(&CertIdentity, &[CertificateDer<'static>]) -> Option<String>,
    ) {
        let live = self.live.lock();
        for r in live.values() {
            let Some(id) = &r.peer.identity else { continue };
            if let (Some(reason), Some(state)) = (why(id, &r.peer.chain), r.state.upgrade()) {
                if !state.closed.load(Ordering::Acquire) {
                    info!(peer = %r.peer.remote, name = %id.name, reason = %reason, "closing a connection whose certificate is no longer valid");
                    state.close();
                }
            }
        }
    }
}

/// Closes an anonymous connection once it has been idle (`ConnState::idle_ms`) for
/// `ANONYMOUS_IDLE`.
fn close_when_idle(state: &Arc<ConnState>) {
    let state = Arc::downgrade(state);
    tokio::spawn(async move {
        let limit = ANONYMOUS_IDLE.as_millis() as u64;
        let mut wait = ANONYMOUS_IDLE;
        loop {
            tokio::time::sleep(wait).await;
            let Some(state) = state.upgrade() else { return };
            let idle = state.idle_ms();
            if idle >= limit {
                tracing::debug!("closing an idle connection without a client certificate");
                state.close();
                return;
            }
            wait = Duration::from_millis(limit - idle);
        }
    });
}

/// A TLS connection the gRPC server serves; see `Peer`.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    peer: Peer,
    state: Arc<ConnState>,
    registry: Arc<Connections>,
    id: u64,
    anonymous: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.anonymous {
            self.registry.anonymous.fetch_sub(1, Ordering::AcqRel);
        } else {
            self.registry.live.lock().remove(&self.id);
        }
    }
}

impl Conn {
    /// Fails every read and write once the controller closed the connection.
    fn check_open(&self) -> std::io::Result<()> {
        if !self.state.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed by the controller: the client certificate is no longer valid, or the connection was idle",
        ))
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.state.waker.register(cx.waker());
        this.check_open()?;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.anonymous && buf.filled().len() > before {
            this.state.touch();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check_open()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check_open()?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_waiting_for_its_answer_is_not_idle() {
        let state = Arc::new(ConnState::new());
        state.last_active_ms.store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert!(state.idle_ms() >= 20);
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        let call = CallGuard(state.clone());
        assert_eq!(state.idle_ms(), 0, "a call under way");
        drop(call);
        assert!(state.idle_ms() < 20, "idle again from the end of the call");
    }

    #[test]
    fn a_change_is_seen_until_it_loads_and_said_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cert.pem");
        std::fs::write(&f, "one").unwrap();
        let mut files = Followed::new(vec![f.clone()]);
        assert!(files.changed().is_none());
        std::fs::write(&f, "half-").unwrap();
        let now = files.changed().expect("changed");
        assert!(files.failed(now.clone()), "said the first time");
        assert!(!files.failed(now), "not at every retry");
        let again = files.changed().expect("still to load: read again");
        files.loaded(again);
        assert!(files.changed().is_none());
    }
}
