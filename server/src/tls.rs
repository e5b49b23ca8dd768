//! The controller's TLS: its serving certificate and the client CA that client
//! certificates must chain to, both re-read when their files change (cert-manager and
//! the kubelet rewrite mounted Secrets in place), so renewing them needs no restart.
//! Client certificates are optional at the handshake: a node without one may only
//! call IdentityService.Bootstrap (the services refuse everything else).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

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

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("{flag} {path}: {source}")]
    Read {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{flag} {path}: {msg}")]
    Bad {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
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
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn bad(flag: &'static str, path: &Path, msg: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Bad {
        flag,
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(flag, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(flag, path, e))?;
    if certs.is_empty() {
        return Err(bad(flag, path, "no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let chain = certificates("--tls-cert", &files.cert)?;
    let pem = read("--tls-key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad("--tls-key", &files.key, e))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| bad("--tls-key", &files.key, e))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        bad(
            "--tls-key",
            &files.key,
            format!("does not belong to --tls-cert: {e}"),
        )
    })?;
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
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The client CA in force.
#[derive(Debug)]
struct Verifier(RwLock<Arc<dyn ClientCertVerifier>>);

impl Verifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
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
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
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
        }))
    }

    /// Re-reads the files whenever one changes, for as long as the process runs. A file
    /// that does not load is reported and the one in force is kept.
    pub fn watch(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let paths = [&tls.files.cert, &tls.files.key, &tls.files.client_ca];
            let mut seen: Vec<_> = paths.iter().map(|p| stamp(p)).collect();
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tick.tick().await;
                let now: Vec<_> = paths.iter().map(|p| stamp(p)).collect();
                if now == seen {
                    continue;
                }
                seen = now;
                match certified_key(&tls.files) {
                    Ok(ck) => {
                        *tls.resolver.0.write().unwrap_or_else(|p| p.into_inner()) = ck;
                    }
                    Err(e) => {
                        warn!(error = %e, "serving certificate not reloaded; keeping the one in force")
                    }
                }
                match client_verifier(&tls.files.client_ca) {
                    Ok(v) => *tls.verifier.0.write().unwrap_or_else(|p| p.into_inner()) = v,
                    Err(e) => warn!(error = %e, "client CA not reloaded; keeping the one in force"),
                }
                info!(cert = %tls.files.cert.display(), client_ca = %tls.files.client_ca.display(), "TLS files changed; new connections use them");
            }
        });
    }

    /// Accepts connections on `listener` and hands over those whose handshake
    /// completes; a slow or failed handshake never holds up the others.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
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
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = out.send(Ok(stream)).await;
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
