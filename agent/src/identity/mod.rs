//! Node identity: the agent's own client certificate.
//!
//! This module owns deciding whether the `--tls-cert`/`--tls-key` pair can be used,
//! and, when it cannot and a bootstrap token is given (`--bootstrap-token-file`),
//! getting a new one from the controller (`IdentityService.Bootstrap`):
//!
//! 1. [`check_certificate`]: the pair is unusable when either file is missing or
//!    unreadable, the certificate does not parse, is expired or not yet valid, is not a
//!    node certificate for this node (`CN=<node>, O=twill:nodes`), or the key does not
//!    belong to it.
//! 2. [`bootstrap`]: the key's directory must be private to the agent's user
//!    ([`check_key_dir`]: not a symlink, owned by the effective uid, mode 0700 or
//!    stricter; made with mode 0700 when missing). A fresh ECDSA P-256 key is staged
//!    beside `--tls-key` ([`install::Staged`], mode 0600), a CSR for
//!    `CN=<node>, O=twill:nodes` is sent with the token over TLS that verifies the
//!    controller with `--tls-ca` and presents no client certificate, and the returned
//!    chain is checked (this node, this key). Only then do the new certificate
//!    (mode 0644) and key replace the old pair, which a refusal, a wrong answer or an
//!    abandoned attempt leave untouched (a certificate that looks unusable may be one
//!    the clock is wrong about). Refusals and an unreachable controller are retried
//!    with the capped [`Backoff`]; the token file is read again before every retry,
//!    so a corrected token is picked up without a restart (a file that cannot be read
//!    then, e.g. half rewritten, leaves the token read before in use).
//!
//! The private key never leaves the node and is never logged; of the token only its
//! public id (the part before the dot) is. Replacing the certificate before it
//! expires, and picking up rewritten files, is [`rotation`]'s; how a new pair
//! replaces the old one, crash-safely, is [`install`]'s.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use rcgen::KeyPair;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Status};
use tracing::{info, warn};
use twill_common::now_unix;
use twill_common::tls::{read_pem, Identity, NODES_GROUP};
use twill_proto::identity_service_client::IdentityServiceClient;
use twill_proto::{BootstrapRequest, BootstrapResponse};
use x509_parser::prelude::*;

use crate::client::{self, Backoff};

pub mod install;
pub mod rotation;

/// Modes of the private key file (0600) and the certificate file (0644).
pub use twill_pki::{CERT_MODE, KEY_MODE};
/// Mode of a key directory the agent has to create.
pub const KEY_DIR_MODE: u32 = 0o700;
/// Mode of a certificate directory the agent has to create (when it is not the key's).
pub const CERT_DIR_MODE: u32 = 0o755;

/// What the controller's certificate says about itself, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject CN.
    pub node: String,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    /// `not_after` as RFC 3339, for logs.
    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }
}

/// Whether the certificate files can be used as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertCheck {
    /// They can.
    Usable(CertInfo),
    /// They cannot; why.
    Needed(String),
}

/// Decides whether `cert` and `key` make a usable client certificate for `node` at
/// `now` (Unix seconds). See the module documentation for what makes them unusable.
///
/// A key in a format this code cannot read (`EC PRIVATE KEY`, `RSA PRIVATE KEY`) is
/// not a reason to replace it: TLS will judge it.
pub fn check_certificate(cert: &Path, key: &Path, node: &str, now: i64) -> CertCheck {
    match inspect(cert, key, node, now) {
        Ok(info) => CertCheck::Usable(info),
        Err(why) => CertCheck::Needed(why),
    }
}

fn inspect(cert: &Path, key: &Path, node: &str, now: i64) -> Result<CertInfo, String> {
    let bad_cert = |e: String| format!("--tls-cert {}: {e}", cert.display());
    let der = first_certificate(&read_file(cert, "--tls-cert")?).map_err(bad_cert)?;
    let (info, spki) = describe(&der).map_err(bad_cert)?;
    if now < info.not_before {
        return Err(format!(
            "--tls-cert {} is not valid before {}",
            cert.display(),
            rfc3339(info.not_before)
        ));
    }
    if now > info.not_after {
        return Err(format!(
            "--tls-cert {} expired at {}",
            cert.display(),
            info.not_after_rfc3339()
        ));
    }
    let who = Identity::from_der(&der).map_err(|e| bad_cert(e.to_string()))?;
    if !who.is_node() {
        return Err(format!(
            "--tls-cert {} is not a node certificate (no O={NODES_GROUP})",
            cert.display()
        ));
    }
    if who.name != node {
        return Err(format!(
            "--tls-cert {} is for node {:?}, not {node:?}",
            cert.display(),
            who.name
        ));
    }
    let key_pem = read_file(key, "--tls-key")?;
    let key_text = String::from_utf8_lossy(&key_pem);
    read_pem(key, "--tls-key", "PRIVATE KEY").map_err(|e| e.to_string())?;
    match KeyPair::from_pem(&key_text) {
        Ok(pair) if pair.public_key_raw() != spki.as_slice() => {
            return Err(format!(
                "--tls-key {} does not belong to --tls-cert {}",
                key.display(),
                cert.display()
            ));
        }
        Ok(_) => {}
        Err(e) if key_text.contains("-----BEGIN PRIVATE KEY-----") => {
            return Err(format!("--tls-key {}: cannot parse: {e}", key.display()));
        }
        // Another key format: left to TLS.
        Err(_) => {}
    }
    Ok(info)
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{what} {} does not exist", path.display()),
        _ => format!("cannot read {what} {}: {e}", path.display()),
    })
}

/// The DER of the first `CERTIFICATE` block of a PEM file.
fn first_certificate(pem: &[u8]) -> Result<Vec<u8>, String> {
    twill_pki::pem_blocks(pem, "CERTIFICATE")
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "holds no PEM CERTIFICATE".into())
}

/// What the log needs of a certificate, and its raw subject public key.
fn describe(der: &[u8]) -> Result<(CertInfo, Vec<u8>), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let node = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let info = CertInfo {
        node,
        serial: twill_common::hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    Ok((info, cert.public_key().subject_public_key.data.to_vec()))
}

/// A bootstrap token, `<id>.<secret>`. Its `Debug` shows only the id.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The public part (before the dot), safe to log.
    pub fn id(&self) -> &str {
        self.0.split_once('.').map(|(id, _)| id).unwrap_or("?")
    }

    /// The whole token, for the request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the token replaced, so that a message that
    /// echoes it can be logged.
    pub fn redact(&self, text: &str) -> String {
        let secret = self.0.split_once('.').map(|(_, s)| s).unwrap_or(&self.0);
        if secret.is_empty() {
            return text.to_string();
        }
        text.replace(&self.0, "<token>").replace(secret, "<secret>")
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}.<secret>)", self.id())
    }
}

/// Reads a token file: the token is the file's content without surrounding
/// whitespace.
pub fn read_token(path: &Path) -> Result<Token> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --bootstrap-token-file {}", path.display()))?;
    let token = text.trim();
    ensure!(
        !token.is_empty(),
        "--bootstrap-token-file {} is empty",
        path.display()
    );
    ensure!(
        !token.contains(char::is_whitespace),
        "--bootstrap-token-file {} holds more than one word (want the token alone, <id>.<secret>)",
        path.display()
    );
    Ok(Token(token.to_string()))
}

/// A new ECDSA P-256 key, and the PKCS#10 request (PEM) for `CN=<node>,
/// O=twill:nodes` that a node sends to get its certificate: made by the PKI crate the
/// controller parses them with.
pub use twill_pki::{generate_key, node_csr_pem as csr_pem};

/// Creates `dir` (and missing parents) with `mode` unless it exists.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes sure the directory of `key` (`--tls-key`) may hold the node's private key,
/// creating it (and missing parents) with [`KEY_DIR_MODE`] when missing: it must not
/// be a symlink, must be owned by the user the agent runs as (its effective uid: root
/// in production) and must give group and others no access at all (no bit of
/// `0o077`). An existing key file must be a regular file, owned by that user and
/// unreadable by group and others too. The error names the path, what is wrong and
/// the command that fixes it. Used before every key is written and before staged
/// files are moved into place.
pub fn check_key_dir(key: &Path) -> Result<()> {
    let dir = parent_dir(key);
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e)
                .with_context(|| format!("cannot stat the --tls-key directory {}", dir.display()));
        }
        ensure_dir(dir, KEY_DIR_MODE)
            .with_context(|| format!("cannot create the --tls-key directory {}", dir.display()))?;
    }
    let euid = effective_uid();
    check_private(dir, Private::KeyDir, euid)?;
    match std::fs::symlink_metadata(key) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => check_private(key, Private::KeyFile, euid),
    }
}

/// What [`check_private`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Private {
    /// The directory holding `--tls-key`.
    KeyDir,
    /// `--tls-key`, or a new key staged beside it.
    KeyFile,
}

/// Fails unless `path` is private to the user `euid`: not a symlink, of the expected
/// kind, owned by `euid`, and without any permission bit for group or others.
fn check_private(path: &Path, what: Private, euid: u32) -> Result<()> {
    let (name, want_mode) = match what {
        Private::KeyDir => ("the --tls-key directory", KEY_DIR_MODE),
        Private::KeyFile => ("the key file", KEY_MODE),
    };
    let shown = path.display();
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("cannot stat {name} {shown}"))?;
    if meta.file_type().is_symlink() {
        let to = std::fs::read_link(path)
            .map(|t| format!(" (to {})", t.display()))
            .unwrap_or_default();
        bail!(
            "refusing {name} {shown}: it is a symlink{to}, and the node's private key is kept only where this agent's user alone controls it; replace the link with the real {} or point --tls-key at the real path",
            if what == Private::KeyDir { "directory" } else { "file" }
        );
    }
    match what {
        Private::KeyDir if !meta.is_dir() => {
            bail!("refusing {name} {shown}: it is not a directory")
        }
        Private::KeyFile if !meta.is_file() => {
            bail!("refusing {name} {shown}: it is not a regular file")
        }
        _ => {}
    }
    let user = if euid == 0 {
        "root".to_string()
    } else {
        euid.to_string()
    };
    if meta.uid() != euid {
        bail!(
            "refusing {name} {shown}: it is owned by uid {}, not by {user} (uid {euid}) whom this agent runs as, so another user controls the node's private key; fix with `chown {user} {shown}`",
            meta.uid()
        );
    }
    let mode = mode_bits(&meta);
    if mode & 0o077 != 0 {
        bail!(
            "refusing {name} {shown}: its mode {mode:04o} gives group or others access to the node's private key; fix with `chmod {want_mode:04o} {shown}`{}",
            if what == Private::KeyFile { " (or remove it to have a new key made)" } else { "" }
        );
    }
    Ok(())
}

/// The user this agent runs as: the one its key directory must belong to.
fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

pub use twill_common::fs::write_atomic;

/// Checks what the controller returned: a PEM chain whose first certificate is for
/// `node`, a node certificate, and certifies `key`.
pub fn check_issued(chain_pem: &str, node: &str, key: &KeyPair) -> Result<CertInfo> {
    let der = first_certificate(chain_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the controller's certificate chain {e}"))?;
    let (info, spki) = describe(&der).map_err(|e| anyhow::anyhow!("the controller's {e}"))?;
    let who = Identity::from_der(&der).context("the controller's certificate")?;
    ensure!(
        who.name == node,
        "the controller issued a certificate for {:?}, not {node:?}",
        who.name
    );
    ensure!(
        who.is_node(),
        "the controller issued a certificate without O={NODES_GROUP}"
    );
    ensure!(
        spki == key.public_key_raw(),
        "the controller's certificate is not for the key this node sent"
    );
    Ok(info)
}

/// Where and how to bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap<'a> {
    /// Controller URLs (`--controller`): tried in turn while unreachable.
    pub controller: &'a [String],
    /// This node's name: the CSR's CN.
    pub node: &'a str,
    /// `--tls-cert`: the issued certificate is written here.
    pub cert: &'a Path,
    /// `--tls-key`: the node's new key is written here.
    pub key: &'a Path,
    /// `--tls-ca`: verifies the controller.
    pub ca: &'a Path,
    /// `--bootstrap-token-file`.
    pub token_file: &'a Path,
    /// Deadline of each Bootstrap call (`--call-timeout`).
    pub call_timeout: Duration,
    /// Longest wait between attempts.
    pub backoff_cap: Duration,
}

/// What [`bootstrap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The files were usable; nothing was changed.
    Present(CertInfo),
    /// A new key and certificate were written.
    Issued(CertInfo),
}

/// Makes sure `--tls-cert`/`--tls-key` are usable, getting a new certificate from the
/// controller when they are not (see the module documentation). Returns only once
/// they are, or with an error retrying cannot fix (a key directory that is not
/// private, a token or CA file unreadable at the start, a key that cannot be written,
/// a certificate that is not for this node's key). On every error the old key and
/// certificate are as they were.
/// Cancel-safe: dropped while it waits, it removes the key it staged and leaves the
/// old pair untouched (a crash leaves the staged key, which the next start removes).
pub async fn bootstrap(cfg: &Bootstrap<'_>) -> Result<Outcome> {
    check_key_dir(cfg.key)?;
    install::finish_install(cfg.cert, cfg.key)
        .context("cannot finish the node key and certificate installation a restart interrupted")?;
    let why = match check_certificate(cfg.cert, cfg.key, cfg.node, now_unix()) {
        CertCheck::Usable(info) => {
            info!(node = %cfg.node, serial = %info.serial, not_after = %info.not_after_rfc3339(), "node certificate present; not bootstrapping");
            return Ok(Outcome::Present(info));
        }
        CertCheck::Needed(why) => why,
    };
    let token = read_token(cfg.token_file)?;
    info!(node = %cfg.node, reason = %why, token_id = %token.id(), "no usable node certificate; asking the controller for one with the bootstrap token");
    let ca = read_pem(cfg.ca, "--tls-ca", "CERTIFICATE")?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let channels = cfg
        .controller
        .iter()
        .map(|url| client::endpoint(url, tls.clone()).map(|e| e.connect_lazy()))
        .collect::<Result<Vec<Channel>, _>>()?;
    ensure!(!channels.is_empty(), "no controller URL given");
    let mut at = client::first_pick(channels.len());

    // The old pair stays in place until the new certificate is in hand: dropping
    // `staged` (an error, a cancelled bootstrap) removes the new key.
    let staged = install::Staged::new(cfg.cert, cfg.key)?;
    let csr = csr_pem(cfg.node, staged.key())?;

    let mut backoff = Backoff::new(cfg.backoff_cap);
    let mut token = token;
    loop {
        match call(&channels[at], &token, &csr, cfg.call_timeout).await {
            Ok(resp) => {
                let info = staged.install(&resp.certificate_chain_pem, cfg.node)?;
                info!(node = %cfg.node, not_after = %info.not_after_rfc3339(), serial = %info.serial, token_id = %token.id(), cert = %cfg.cert.display(), key = %cfg.key.display(), "node certificate issued");
                return Ok(Outcome::Issued(info));
            }
            Err(s) => {
                let wait = backoff.next_delay();
                let tried = &cfg.controller[at];
                if client::no_answer(&s) {
                    at = (at + 1) % channels.len();
                }
                warn!(
                    controller = %tried,
                    code = %code_name(s.code()),
                    error = %token.redact(&status_text(&s)),
                    hint = hint(s.code()),
                    token_id = %token.id(),
                    retry_in = ?wait,
                    "the controller did not issue a node certificate; retrying"
                );
                tokio::time::sleep(wait).await;
                // A token file being rewritten may be empty for a moment: keep the
                // token read before until it reads well again.
                match read_token(cfg.token_file) {
                    Ok(t) => token = t,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), token_id = %token.id(), "cannot read the bootstrap token file again; retrying with the token read before")
                    }
                }
            }
        }
    }
}

/// One Bootstrap call, within `deadline`.
async fn call(
    channel: &Channel,
    token: &Token,
    csr: &str,
    deadline: Duration,
) -> Result<BootstrapResponse, Status> {
    let mut api = identity_client(channel.clone());
    let req = BootstrapRequest {
        token: token.expose().to_string(),
        csr_pem: csr.to_string(),
    };
    client::within(deadline, api.bootstrap(client::request(req, deadline)))
        .await
        .map(tonic::Response::into_inner)
}

/// The identity API over `channel`, with its message limits (a certificate chain is a
/// few KiB).
fn identity_client(channel: Channel) -> IdentityServiceClient<Channel> {
    IdentityServiceClient::new(channel)
        .max_decoding_message_size(1 << 20)
        .max_encoding_message_size(64 << 10)
}

/// A status's message and, for transport errors, what caused them (a TLS failure
/// is otherwise just "transport error").
fn status_text(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// What an operator can do about a refusal.
fn hint(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => "the token was refused (unknown, deleted, expired or malformed): put a valid one from `twillctl token create` in --bootstrap-token-file",
        Code::InvalidArgument => "the controller refused the certificate request",
        Code::FailedPrecondition => "the controller cannot sign node certificates: start it with --signing-cert and --signing-key",
        Code::ResourceExhausted => "too many failed token attempts from this address; waiting",
        Code::PermissionDenied => "the controller does not allow this node a certificate",
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => "the controller is unreachable or did not answer (check --controller and --tls-ca)",
        Code::Unimplemented => "the controller has no IdentityService (too old?)",
        _ => "",
    }
}

/// The canonical gRPC name of a code (`UNAUTHENTICATED`), as the controller's and
/// twillctl's messages write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn rfc3339(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(secs) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        }
        Err(_) => format!("@{unix}"),
    }
}

/// The permission bits of a file (with setuid, setgid and sticky).
fn mode_bits(meta: &std::fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o7777
}

/// Fails unless `path` is `mode` exactly.
#[cfg(test)]
fn check_mode(path: &Path, mode: u32) -> Result<()> {
    let got = mode_bits(
        &std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?,
    );
    if got != mode {
        bail!("{} has mode {got:o}, want {mode:o}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::Permissions;
    use std::path::PathBuf;

    use super::*;
    use rcgen::{
        date_time_ymd, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyUsagePurpose,
    };
    use x509_parser::certification_request::X509CertificationRequest;

    const NOW: i64 = 1_767_225_600; // 2026-01-01

    /// A node certificate for `node` valid from `from` to `until` (years), self-signed.
    fn node_cert(node: &str, from: i32, until: i32) -> (String, KeyPair) {
        let key = generate_key().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        dn.push(DnType::OrganizationName, NODES_GROUP);
        params.distinguished_name = dn;
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(until, 1, 1);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        (params.self_signed(&key).unwrap().pem(), key)
    }

    fn write_pair(dir: &Path, cert: &str, key: &KeyPair) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join("node.crt"), dir.join("node.key"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn needed(check: CertCheck) -> String {
        match check {
            CertCheck::Needed(why) => why,
            CertCheck::Usable(info) => panic!("usable: {info:?}"),
        }
    }

    #[test]
    fn missing_files_need_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (
            dir.path().join("pki/node.crt"),
            dir.path().join("pki/node.key"),
        );
        let why = needed(check_certificate(&c, &k, "node-a", NOW));
        assert!(why.contains("does not exist"), "{why}");

        let (cert, _) = node_cert("node-a", 2020, 2030);
        std::fs::write(dir.path().join("only.crt"), cert).unwrap();
        let why = needed(check_certificate(
            &dir.path().join("only.crt"),
            &dir.path().join("none.key"),
            "node-a",
            NOW,
        ));
        assert!(
            why.contains("--tls-key") && why.contains("does not exist"),
            "{why}"
        );
    }

    #[test]
    fn a_valid_pair_is_used_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = node_cert("node-a", 2020, 2030);
        let (c, k) = write_pair(dir.path(), &cert, &key);
        match check_certificate(&c, &k, "node-a", NOW) {
            CertCheck::Usable(info) => {
                assert_eq!(info.node, "node-a");
                assert!(!info.serial.is_empty());
                assert!(info.not_before < NOW && NOW < info.not_after);
            }
            CertCheck::Needed(why) => panic!("{why}"),
        }
    }

    #[test]
    fn expired_or_not_yet_valid_certificates_need_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = node_cert("node-a", 2020, 2025);
        let (c, k) = write_pair(dir.path(), &cert, &key);
        let why = needed(check_certificate(&c, &k, "node-a", NOW));
        assert!(why.contains("expired at 2025-01-01"), "{why}");

        let (cert, key) = node_cert("node-a", 2027, 2030);
        let (c, k) = write_pair(dir.path(), &cert, &key);
        let why = needed(check_certificate(&c, &k, "node-a", NOW));
        assert!(why.contains("not valid before 2027-01-01"), "{why}");
    }

    #[test]
    fn unusable_contents_need_a_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = node_cert("node-a", 2020, 2030);
        let (c, k) = write_pair(dir.path(), &cert, &key);

        // Another node's certificate.
        assert!(needed(check_certificate(&c, &k, "node-b", NOW)).contains("for node \"node-a\""));
        // A key that is not the certificate's.
        std::fs::write(&k, generate_key().unwrap().serialize_pem()).unwrap();
        assert!(needed(check_certificate(&c, &k, "node-a", NOW)).contains("does not belong"));
        // Garbage.
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&c, "not a certificate\n").unwrap();
        assert!(needed(check_certificate(&c, &k, "node-a", NOW)).contains("no PEM CERTIFICATE"));
        std::fs::write(
            &c,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(needed(check_certificate(&c, &k, "node-a", NOW)).contains("cannot parse"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(
            &k,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(needed(check_certificate(&c, &k, "node-a", NOW)).contains("cannot parse"));
        // Unreadable (a directory).
        let why = needed(check_certificate(dir.path(), &k, "node-a", NOW));
        assert!(why.contains("cannot read --tls-cert"), "{why}");
    }

    #[test]
    fn a_certificate_without_the_nodes_group_is_not_a_node_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "node-a");
        dn.push(DnType::OrganizationName, "twill:admins");
        params.distinguished_name = dn;
        let (c, k) = write_pair(dir.path(), &params.self_signed(&key).unwrap().pem(), &key);
        assert!(needed(check_certificate(&c, &k, "node-a", NOW)).contains("not a node certificate"));
    }

    #[test]
    fn the_csr_names_the_node_and_carries_the_key() {
        let key = generate_key().unwrap();
        let pem = csr_pem("node-a", &key).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&block.contents).unwrap();
        let subject = &csr.certification_request_info.subject;
        let cns: Vec<_> = subject
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(cns, ["node-a"]);
        let orgs: Vec<_> = subject
            .iter_organization()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(orgs, [NODES_GROUP]);
        assert_eq!(
            csr.certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .as_ref(),
            key.public_key_raw()
        );
        assert!(
            !pem.contains("PRIVATE"),
            "the request must not carry the key"
        );
    }

    #[test]
    fn the_key_is_written_0600_atomically_in_a_0700_directory() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("a/pki");
        let path = pki.join("node.key");
        let key = generate_key().unwrap();
        ensure_dir(&pki, KEY_DIR_MODE).unwrap();
        write_atomic(&path, key.serialize_pem().as_bytes(), KEY_MODE).unwrap();
        check_mode(&path, 0o600).unwrap();
        check_mode(&pki, 0o700).unwrap();
        check_mode(&dir.path().join("a"), 0o700).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), key.serialize_pem());

        // Replacing a file that was readable by all leaves a 0600 file, and no
        // temporary file behind.
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new", KEY_MODE).unwrap();
        check_mode(&path, 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(&pki)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["node.key"]);

        // An existing directory keeps its mode.
        std::fs::set_permissions(&pki, Permissions::from_mode(0o750)).unwrap();
        ensure_dir(&pki, KEY_DIR_MODE).unwrap();
        check_mode(&pki, 0o750).unwrap();

        // A failed write leaves the old file and no temporary one.
        assert!(write_atomic(&dir.path().join("missing/x.key"), b"k", KEY_MODE).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    /// `<tmp>/pki/node.key`, its directory made by [`check_key_dir`].
    fn private_pki() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let key = pki.join("node.key");
        check_key_dir(&key).unwrap();
        (dir, pki, key)
    }

    /// Why `check_key_dir(key)` refuses, which must name `path`.
    fn refused(key: &Path, path: &Path) -> String {
        let why = format!("{:#}", check_key_dir(key).unwrap_err());
        assert!(
            why.contains(&path.display().to_string()),
            "the message names {}: {why}",
            path.display()
        );
        why
    }

    /// Whether the tests run as root, which the ownership cases need (to chown).
    fn root() -> bool {
        let euid = effective_uid();
        if euid != 0 {
            eprintln!("skipped: giving a file to another user needs root (euid {euid})");
        }
        euid == 0
    }

    #[test]
    fn a_missing_key_directory_is_made_0700_and_an_open_one_is_refused() {
        let (_dir, pki, key) = private_pki();
        check_mode(&pki, KEY_DIR_MODE).unwrap();
        std::fs::write(&key, "key").unwrap();
        std::fs::set_permissions(&key, Permissions::from_mode(0o600)).unwrap();
        check_key_dir(&key).unwrap();
        std::fs::set_permissions(&pki, Permissions::from_mode(0o500)).unwrap();
        check_key_dir(&key).unwrap();

        for (mode, what) in [
            (0o770, "group-writable"),
            (0o750, "group-readable"),
            (0o704, "world-readable"),
            (0o701, "world-searchable"),
        ] {
            std::fs::set_permissions(&pki, Permissions::from_mode(mode)).unwrap();
            let why = refused(&key, &pki);
            assert!(
                why.contains(&format!("mode {mode:04o}"))
                    && why.contains(&format!("chmod 0700 {}", pki.display())),
                "{what}: {why}"
            );
        }
        std::fs::set_permissions(&pki, Permissions::from_mode(0o700)).unwrap();
        check_key_dir(&key).unwrap();
    }

    #[test]
    fn a_symlinked_key_directory_is_refused() {
        let (dir, pki, _) = private_pki();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&pki, &link).unwrap();
        let why = refused(&link.join("node.key"), &link);
        assert!(why.contains("symlink"), "{why}");
        // Dangling: refused as a symlink, not created through.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let why = refused(&dangling.join("node.key"), &dangling);
        assert!(why.contains("symlink"), "{why}");
        assert!(!dir.path().join("nowhere").exists());
        // Not a directory at all.
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_key_dir(&file.join("node.key")).is_err());
    }

    #[test]
    fn a_key_directory_owned_by_another_user_is_refused() {
        if !root() {
            return;
        }
        let (_dir, pki, key) = private_pki();
        std::os::unix::fs::chown(&pki, Some(65534), Some(65534)).unwrap();
        let why = refused(&key, &pki);
        assert!(
            why.contains("owned by uid 65534")
                && why.contains(&format!("chown root {}", pki.display())),
            "{why}"
        );
    }

    #[test]
    fn an_exposed_or_linked_key_file_is_refused() {
        let (dir, _pki, key) = private_pki();
        std::fs::write(&key, "key").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&key, Permissions::from_mode(mode)).unwrap();
            let why = refused(&key, &key);
            assert!(
                why.contains(&format!("chmod 0600 {}", key.display())),
                "{mode:o}: {why}"
            );
        }
        std::fs::set_permissions(&key, Permissions::from_mode(0o600)).unwrap();
        if root() {
            std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
            let why = refused(&key, &key);
            assert!(why.contains("chown root"), "{why}");
            std::os::unix::fs::chown(&key, Some(0), None).unwrap();
        }
        check_key_dir(&key).unwrap();

        let elsewhere = dir.path().join("elsewhere.key");
        std::fs::rename(&key, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
        let why = refused(&key, &key);
        assert!(why.contains("symlink"), "{why}");
        std::fs::remove_file(&key).unwrap();
        std::fs::create_dir(&key).unwrap();
        std::fs::set_permissions(&key, Permissions::from_mode(0o700)).unwrap();
        let why = refused(&key, &key);
        assert!(why.contains("not a regular file"), "{why}");
    }

    /// Bootstrap refuses an open key directory before it reads the token or calls
    /// anyone, and leaves the key in it alone.
    #[tokio::test]
    async fn bootstrap_refuses_an_open_key_directory() {
        let (dir, pki, key) = private_pki();
        let (cert_pem, pair) = node_cert("node-a", 2020, 2021);
        let cert = pki.join("node.crt");
        std::fs::write(&cert, &cert_pem).unwrap();
        std::fs::write(&key, pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&pki, Permissions::from_mode(0o755)).unwrap();
        let urls = ["https://127.0.0.1:1".to_string()];
        let cfg = Bootstrap {
            controller: &urls,
            node: "node-a",
            cert: &cert,
            key: &key,
            ca: &dir.path().join("no-ca.crt"),
            token_file: &dir.path().join("no-token"),
            call_timeout: Duration::from_secs(1),
            backoff_cap: Duration::from_millis(100),
        };
        let why = format!("{:#}", bootstrap(&cfg).await.unwrap_err());
        assert!(
            why.contains(&format!("chmod 0700 {}", pki.display())),
            "{why}"
        );
        assert_eq!(std::fs::read_to_string(&key).unwrap(), pair.serialize_pem());
    }

    #[test]
    fn tokens_are_trimmed_and_never_shown_whole() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  abcdef.0123456789abcdef\n").unwrap();
        let t = read_token(&f).unwrap();
        assert_eq!(t.expose(), "abcdef.0123456789abcdef");
        assert_eq!(t.id(), "abcdef");
        assert_eq!(format!("{t:?}"), "Token(abcdef.<secret>)");
        assert_eq!(
            t.redact("bad token abcdef.0123456789abcdef (0123456789abcdef)"),
            "bad token <token> (<secret>)"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token(&f).unwrap_err().to_string().contains("empty"));
        std::fs::write(&f, "a.b c.d").unwrap();
        assert!(read_token(&f).is_err());
        assert!(read_token(&dir.path().join("none")).is_err());
    }

    /// A CA signing `csr` as the controller does.
    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl TestCa {
        fn new() -> TestCa {
            let key = generate_key().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "test-ca");
            params.distinguished_name = dn;
            let cert = params.self_signed(&key).unwrap();
            TestCa {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        fn sign(&self, csr: &str) -> String {
            let mut req = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
            req.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            req.signed_by(&self.issuer).unwrap().pem()
        }

        /// A node certificate for `node` and the key `csr` carries (whatever its CN).
        fn sign_for(&self, csr: &str, node: &str) -> String {
            let mut req = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, node);
            dn.push(DnType::OrganizationName, NODES_GROUP);
            req.params.distinguished_name = dn;
            req.signed_by(&self.issuer).unwrap().pem()
        }

        fn server_cert(&self) -> (String, String) {
            let key = generate_key().unwrap();
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    #[test]
    fn an_issued_chain_must_be_for_this_node_and_this_key() {
        let ca = TestCa::new();
        let key = generate_key().unwrap();
        let chain = ca.sign(&csr_pem("node-a", &key).unwrap());
        let info = check_issued(&chain, "node-a", &key).unwrap();
        assert_eq!(info.node, "node-a");
        assert!(check_issued(&chain, "node-b", &key).is_err());
        assert!(check_issued(&chain, "node-a", &generate_key().unwrap()).is_err());
        assert!(check_issued("", "node-a", &key).is_err());
    }

    mod fake_controller {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        use tonic::transport::{Identity as ServerIdentity, Server, ServerTlsConfig};
        use tonic::{Request, Response, Status};
        use twill_proto::identity_service_server::{IdentityService, IdentityServiceServer};
        use twill_proto::{BootstrapRequest, BootstrapResponse};

        use super::*;

        /// What the fake controller answers a valid request with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Answer {
            /// A certificate for the request's node and key.
            Sign,
            /// An error.
            Refuse,
            /// A certificate for the node, but for another key.
            OtherKey,
            /// A certificate for the request's key, but for node-b.
            OtherNode,
            /// Not a certificate.
            Garbage,
        }

        struct Fake {
            ca: Arc<TestCa>,
            token: String,
            calls: Arc<AtomicUsize>,
            answer: Answer,
        }

        impl Fake {
            fn new(ca: &Arc<TestCa>, answer: Answer) -> Fake {
                Fake {
                    ca: ca.clone(),
                    token: "abcdef.0123456789abcdef".into(),
                    calls: Arc::new(AtomicUsize::new(0)),
                    answer,
                }
            }

            fn answer(&self, csr: &str) -> Result<Response<BootstrapResponse>, Status> {
                let chain = match self.answer {
                    Answer::Sign => self.ca.sign(csr),
                    Answer::Refuse => return Err(Status::permission_denied("revoked")),
                    Answer::OtherKey => self
                        .ca
                        .sign(&csr_pem("node-a", &generate_key().unwrap()).unwrap()),
                    Answer::OtherNode => self.ca.sign_for(csr, "node-b"),
                    Answer::Garbage => "not a certificate".into(),
                };
                Ok(Response::new(BootstrapResponse {
                    certificate_chain_pem: chain,
                    not_after_unix: 0,
                }))
            }
        }

        #[tonic::async_trait]
        impl IdentityService for Fake {
            async fn bootstrap(
                &self,
                req: Request<BootstrapRequest>,
            ) -> Result<Response<BootstrapResponse>, Status> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                assert!(
                    req.peer_certs().is_none_or(|c| c.is_empty()),
                    "no client certificate on a bootstrap connection"
                );
                let req = req.into_inner();
                if req.token != self.token {
                    return Err(Status::unauthenticated(format!(
                        "unknown token {}",
                        req.token
                    )));
                }
                self.answer(&req.csr_pem)
            }

            async fn renew(
                &self,
                req: Request<twill_proto::RenewRequest>,
            ) -> Result<Response<BootstrapResponse>, Status> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                self.answer(&req.into_inner().csr_pem)
            }
        }

        /// Serves `fake` on a local port, over TLS with the CA's server certificate
        /// when `tls`, else in clear (enough for [`rotation::renew`], which is given
        /// its channel).
        async fn serve(fake: Fake, tls: bool) -> std::net::SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut server = Server::builder();
            if tls {
                let (cert, key) = fake.ca.server_cert();
                server = server
                    .tls_config(
                        ServerTlsConfig::new().identity(ServerIdentity::from_pem(cert, key)),
                    )
                    .unwrap();
            }
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(
                server
                    .add_service(IdentityServiceServer::new(fake))
                    .serve_with_incoming(incoming),
            );
            addr
        }

        /// The names in `dir`, sorted.
        fn names(dir: &Path) -> Vec<String> {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }

        /// A private `pki` directory holding `cert_pem` and `key` as node.crt and
        /// node.key (0600).
        fn old_pair(dir: &Path, cert_pem: &str, key: &KeyPair) -> (PathBuf, PathBuf) {
            let pki = dir.join("pki");
            let (cert, key_file) = (pki.join("node.crt"), pki.join("node.key"));
            check_key_dir(&key_file).unwrap();
            std::fs::write(&cert, cert_pem).unwrap();
            write_atomic(&key_file, key.serialize_pem().as_bytes(), KEY_MODE).unwrap();
            (cert, key_file)
        }

        /// A renewal the controller refuses, or answers with a certificate for another
        /// key or node, or with garbage, leaves the old key and certificate byte for
        /// byte, and nothing beside them; one it answers well replaces both.
        #[tokio::test]
        async fn a_failed_renewal_leaves_the_old_pair_untouched() {
            let ca = Arc::new(TestCa::new());
            let dir = tempfile::tempdir().unwrap();
            let old_key = generate_key().unwrap();
            let old_cert = ca.sign(&csr_pem("node-a", &old_key).unwrap());
            let (cert, key) = old_pair(dir.path(), &old_cert, &old_key);
            let pki = key.parent().unwrap().to_path_buf();
            let old_key_bytes = std::fs::read(&key).unwrap();
            for answer in [
                Answer::Refuse,
                Answer::OtherKey,
                Answer::OtherNode,
                Answer::Garbage,
            ] {
                let addr = serve(Fake::new(&ca, answer), false).await;
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy();
                let err = rotation::renew(channel, "node-a", &cert, &key, Duration::from_secs(5))
                    .await
                    .unwrap_err();
                match answer {
                    Answer::Refuse => assert!(matches!(err, rotation::RotateError::Refused(_))),
                    _ => assert!(matches!(err, rotation::RotateError::Local(_)), "{err}"),
                }
                assert_eq!(std::fs::read(&key).unwrap(), old_key_bytes, "{answer:?}");
                assert_eq!(
                    std::fs::read_to_string(&cert).unwrap(),
                    old_cert,
                    "{answer:?}"
                );
                assert_eq!(names(&pki), ["node.crt", "node.key"], "{answer:?}");
                check_mode(&key, KEY_MODE).unwrap();
            }

            let addr = serve(Fake::new(&ca, Answer::Sign), false).await;
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy();
            let info = rotation::renew(channel, "node-a", &cert, &key, Duration::from_secs(5))
                .await
                .unwrap();
            assert_ne!(std::fs::read(&key).unwrap(), old_key_bytes);
            assert_eq!(names(&pki), ["node.crt", "node.key"]);
            check_mode(&key, KEY_MODE).unwrap();
            check_mode(&cert, CERT_MODE).unwrap();
            match check_certificate(&cert, &key, "node-a", now_unix()) {
                CertCheck::Usable(again) => assert_eq!(again, info),
                CertCheck::Needed(why) => panic!("{why}"),
            }
        }

        /// An expired certificate (or one a wrong clock calls expired) is replaced
        /// only by a certificate in hand: a wrong answer, or a bootstrap abandoned
        /// while refused, leaves the old key and certificate as they were.
        #[tokio::test]
        async fn a_failed_or_abandoned_bootstrap_leaves_the_old_pair_untouched() {
            let ca = Arc::new(TestCa::new());
            let dir = tempfile::tempdir().unwrap();
            let (old_cert, old_key) = node_cert("node-a", 2020, 2021);
            let (cert, key) = old_pair(dir.path(), &old_cert, &old_key);
            let pki = key.parent().unwrap().to_path_buf();
            let old_key_bytes = std::fs::read(&key).unwrap();
            let ca_file = dir.path().join("ca.crt");
            std::fs::write(&ca_file, &ca.pem).unwrap();
            let token_file = dir.path().join("token");
            std::fs::write(&token_file, "abcdef.0123456789abcdef").unwrap();

            for answer in [Answer::OtherKey, Answer::OtherNode, Answer::Garbage] {
                let url = format!("https://{}", serve(Fake::new(&ca, answer), true).await);
                let urls = [url];
                let cfg = Bootstrap {
                    controller: &urls,
                    node: "node-a",
                    cert: &cert,
                    key: &key,
                    ca: &ca_file,
                    token_file: &token_file,
                    call_timeout: Duration::from_secs(5),
                    backoff_cap: Duration::from_millis(100),
                };
                let err = tokio::time::timeout(Duration::from_secs(10), bootstrap(&cfg))
                    .await
                    .unwrap()
                    .unwrap_err();
                assert!(format!("{err:#}").contains("the controller"), "{err:#}");
                assert_eq!(std::fs::read(&key).unwrap(), old_key_bytes, "{answer:?}");
                assert_eq!(
                    std::fs::read_to_string(&cert).unwrap(),
                    old_cert,
                    "{answer:?}"
                );
                assert_eq!(names(&pki), ["node.crt", "node.key"], "{answer:?}");
            }

            // Refused (a wrong token), retried, then abandoned.
            std::fs::write(&token_file, "abcdef.wrongwrongwrong00").unwrap();
            let fake = Fake::new(&ca, Answer::Sign);
            let calls = fake.calls.clone();
            let urls = [format!("https://{}", serve(fake, true).await)];
            let cfg = Bootstrap {
                controller: &urls,
                node: "node-a",
                cert: &cert,
                key: &key,
                ca: &ca_file,
                token_file: &token_file,
                call_timeout: Duration::from_secs(5),
                backoff_cap: Duration::from_millis(100),
            };
            {
                let run = bootstrap(&cfg);
                tokio::pin!(run);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while calls.load(Ordering::SeqCst) < 2 {
                    tokio::select! {
                        r = &mut run => panic!("finished with a wrong token: {r:?}"),
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                    assert!(tokio::time::Instant::now() < deadline, "no retries");
                }
                // Meanwhile the new key waits beside the old one.
                assert_eq!(names(&pki), [".node.key.next", "node.crt", "node.key"]);
                check_mode(&pki.join(".node.key.next"), KEY_MODE).unwrap();
            }
            assert_eq!(std::fs::read(&key).unwrap(), old_key_bytes);
            assert_eq!(std::fs::read_to_string(&cert).unwrap(), old_cert);
            assert_eq!(names(&pki), ["node.crt", "node.key"]);
        }

        /// Against a TLS controller: a refused token is retried, the corrected token
        /// file is read again, and the files are written; a second run finds them.
        #[tokio::test]
        async fn refusals_are_retried_and_the_issued_files_written() {
            let ca = Arc::new(TestCa::new());
            let fake = Fake::new(&ca, Answer::Sign);
            let calls = fake.calls.clone();
            let addr = serve(fake, true).await;

            let dir = tempfile::tempdir().unwrap();
            let ca_file = dir.path().join("ca.crt");
            std::fs::write(&ca_file, &ca.pem).unwrap();
            let token_file = dir.path().join("token");
            std::fs::write(&token_file, "abcdef.wrongwrongwrong00\n").unwrap();
            let pki = dir.path().join("host/pki");
            let (cert_file, key_file) = (pki.join("node.crt"), pki.join("node.key"));
            let url = format!("https://{addr}");
            let urls = [url.clone()];
            let cfg = Bootstrap {
                controller: &urls,
                node: "node-a",
                cert: &cert_file,
                key: &key_file,
                ca: &ca_file,
                token_file: &token_file,
                call_timeout: Duration::from_secs(5),
                backoff_cap: Duration::from_millis(500),
            };
            let run = bootstrap(&cfg);
            tokio::pin!(run);
            // Refused while the token is wrong.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while calls.load(Ordering::SeqCst) < 2 {
                tokio::select! {
                    r = &mut run => panic!("finished with a wrong token: {r:?}"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                assert!(tokio::time::Instant::now() < deadline, "no retries");
            }
            // Nothing in place until the certificate is: the new key waits beside.
            assert!(!cert_file.exists());
            assert!(!key_file.exists());
            check_mode(&pki.join(".node.key.next"), KEY_MODE).unwrap();
            check_mode(&pki, KEY_DIR_MODE).unwrap();
            // A token file emptied while retrying (being rewritten) is no reason to stop.
            std::fs::write(&token_file, "").unwrap();
            let refused = calls.load(Ordering::SeqCst);
            while calls.load(Ordering::SeqCst) < refused + 2 {
                tokio::select! {
                    r = &mut run => panic!("finished with an empty token file: {r:?}"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                assert!(tokio::time::Instant::now() < deadline, "no retries");
            }
            std::fs::write(&token_file, "abcdef.0123456789abcdef").unwrap();
            let issued = tokio::time::timeout(Duration::from_secs(10), run)
                .await
                .unwrap()
                .unwrap();
            let Outcome::Issued(info) = issued else {
                panic!("{issued:?}")
            };
            assert_eq!(info.node, "node-a");
            check_mode(&cert_file, CERT_MODE).unwrap();
            check_mode(&key_file, KEY_MODE).unwrap();
            assert_eq!(names(&pki), ["node.crt", "node.key"]);
            match check_certificate(&cert_file, &key_file, "node-a", now_unix()) {
                CertCheck::Usable(again) => assert_eq!(again, info),
                CertCheck::Needed(why) => panic!("{why}"),
            }
            // The files now make a working mTLS channel configuration.
            client::channel(
                &url,
                &client::TlsFiles {
                    cert: &cert_file,
                    key: &key_file,
                    ca: &ca_file,
                },
            )
            .unwrap();

            let before = calls.load(Ordering::SeqCst);
            assert_eq!(bootstrap(&cfg).await.unwrap(), Outcome::Present(info));
            assert_eq!(calls.load(Ordering::SeqCst), before, "no second bootstrap");
        }
    }
}
