//! Node identity bootstrap: an agent with only the CA certificate and a token makes
//! its key, sends a CSR and gets a node certificate it can then use; every bad input
//! is refused with a clear error, counted by its reason, and issues nothing; tokens
//! and the issuance record survive a controller kill -9; a certificate that expires
//! on an open connection ends its watch and its calls.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use support::{acquire_request, Controller, Pki, NET_CONF};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use twill_pki::{Role, Validity};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::identity_service_client::IdentityServiceClient;
use twill_proto::{
    BootstrapRequest, CreateTokenRequest, DeleteTokenRequest, ListIssuedCertificatesRequest,
    ListTokensRequest, RenewRequest, RevokeNodeCertificatesRequest, StatusRequest, WatchRequest,
};
use twill_tests::kit::http_get;

fn signing(pki: &Pki) -> Vec<String> {
    vec![
        "--signing-cert".into(),
        pki.path("ca.crt").display().to_string(),
        "--signing-key".into(),
        pki.path("ca.key").display().to_string(),
        "--node-cert-ttl".into(),
        "2h".into(),
    ]
}

fn start(pki: &Pki, dir: &std::path::Path, extra: &[String]) -> Controller {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Controller::start(pki, &dir.join("data"), NET_CONF, &extra)
}

/// A CSR for `cn` with a fresh P-256 key, and the key.
fn csr(cn: &str) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    // What the request asks for beyond its CN is ignored: the controller decides.
    dn.push(DnType::OrganizationName, "twill:admins");
    params.distinguished_name = dn;
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

async fn identity(ctl: &Controller, pki: &Pki) -> IdentityServiceClient<tonic::transport::Channel> {
    IdentityServiceClient::new(
        ctl.channel(pki, None)
            .await
            .expect("connect without a certificate"),
    )
}

async fn token(admin: &mut AdminServiceClient<tonic::transport::Channel>, ttl: u64) -> String {
    admin
        .create_token(CreateTokenRequest {
            ttl_seconds: ttl,
            description: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn bootstrap(
    ctl: &Controller,
    pki: &Pki,
    token: &str,
    csr_pem: &str,
) -> Result<twill_proto::BootstrapResponse, tonic::Status> {
    identity(ctl, pki)
        .await
        .bootstrap(BootstrapRequest {
            token: token.into(),
            csr_pem: csr_pem.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The value of counter `series` (name and labels, as exported) on the metrics page.
fn counter(ctl: &Controller, series: &str) -> u64 {
    let page = http_get(ctl.metrics, "/metrics")
        .expect("metrics answer")
        .body;
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
}

/// The refusal counter for `reason`.
fn refusals(ctl: &Controller, reason: &str) -> u64 {
    counter(
        ctl,
        &format!("twill_node_certificates_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn refused(r: Result<twill_proto::BootstrapResponse, tonic::Status>, code: Code, says: &str) {
    let s = r.expect_err("refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(says),
        "{:?} should say {says:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_only_the_ca_and_a_token_gets_a_certificate_it_can_use() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = start(&pki, dir.path(), &signing(&pki));
    let mut admin = ctl.admin(&pki).await;
    let token = token(&mut admin, 0).await;
    assert!(
        token.len() == 23 && token.as_bytes()[6] == b'.',
        "kubelet's form: {token}"
    );

    // Without a certificate nothing but Bootstrap answers.
    let bare = ctl.channel(&pki, None).await.unwrap();
    let s = AgentServiceClient::new(bare.clone())
        .acquire(acquire_request("node-1", ""))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = AdminServiceClient::new(bare)
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    let (csr_pem, key) = csr("node-1");
    let issued = bootstrap(&ctl, &pki, &token, &csr_pem).await.unwrap();
    let pem = x509_parser::pem::parse_x509_pem(issued.certificate_chain_pem.as_bytes())
        .unwrap()
        .1;
    let cert = pem.parse_x509().unwrap();
    let subject = cert.subject().to_string();
    assert!(
        subject.contains("CN=node-1") && subject.contains("O=twill:nodes"),
        "{subject}"
    );
    assert!(
        !subject.contains("admins"),
        "the request's O is not copied: {subject}"
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (7200..=7200 + 600).contains(&lifetime),
        "--node-cert-ttl 2h (+ backdating): {lifetime}s"
    );
    assert_eq!(issued.not_after_unix, cert.validity().not_after.timestamp());
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the certificate is for the node's own key"
    );

    // The certificate works as node-1's, and only node-1's.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(Identity::from_pem(
            &issued.certificate_chain_pem,
            key.serialize_pem(),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(ctl.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut node = AgentServiceClient::new(channel);
    node.acquire(acquire_request("node-1", "")).await.unwrap();
    let s = node
        .acquire(acquire_request("node-2", ""))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // One token serves many nodes; its use is counted, and recorded per certificate.
    bootstrap(&ctl, &pki, &token, &csr("node-2").0)
        .await
        .unwrap();
    let tokens = admin
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!((tokens.len(), tokens[0].uses), (1, 2));
    assert!(
        !format!("{tokens:?}").contains(&token[7..]),
        "the secret is never shown"
    );

    // Tokens and records survive kill -9.
    ctl.restart();
    let mut admin = ctl.admin(&pki).await;
    let issued = admin
        .list_issued_certificates(ListIssuedCertificatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .certificates;
    let nodes: Vec<&str> = issued.iter().map(|c| c.node_name.as_str()).collect();
    assert_eq!(nodes, vec!["node-1", "node-2"]);
    assert!(issued
        .iter()
        .all(|c| c.token_id == token[..6] && !c.serial.is_empty()));
    bootstrap(&ctl, &pki, &token, &csr("node-3").0)
        .await
        .expect("the token still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_requests_are_refused_clearly_and_issue_nothing() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path(), &signing(&pki));
    let mut admin = ctl.admin(&pki).await;
    let good = token(&mut admin, 0).await;
    let (csr_pem, _) = csr("node-1");

    refused(
        bootstrap(&ctl, &pki, "nope", &csr_pem).await,
        Code::Unauthenticated,
        "malformed",
    );
    refused(
        bootstrap(&ctl, &pki, "abcdef.0123456789abcdef", &csr_pem).await,
        Code::Unauthenticated,
        "unknown bootstrap token abcdef",
    );
    let wrong = format!("{}.0123456789abcdef", &good[..6]);
    refused(
        bootstrap(&ctl, &pki, &wrong, &csr_pem).await,
        Code::Unauthenticated,
        "wrong secret",
    );
    let deleted = token(&mut admin, 0).await;
    admin
        .delete_token(DeleteTokenRequest {
            id: deleted[..6].into(),
        })
        .await
        .unwrap();
    refused(
        bootstrap(&ctl, &pki, &deleted, &csr_pem).await,
        Code::Unauthenticated,
        "unknown",
    );
    let s = admin
        .delete_token(DeleteTokenRequest {
            id: deleted[..6].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    let short = token(&mut admin, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match bootstrap(&ctl, &pki, &short, &csr("short").0).await {
            Err(s) if s.message().contains("expired") => {
                assert_eq!(s.code(), Code::Unauthenticated);
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "still accepted after 10s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    refused(
        bootstrap(&ctl, &pki, &good, "garbage").await,
        Code::InvalidArgument,
        "csr_pem",
    );
    refused(
        bootstrap(&ctl, &pki, &good, &csr("a/b").0).await,
        Code::InvalidArgument,
        "subject CN",
    );
    // A request whose signature does not match its content.
    let der = x509_parser::pem::parse_x509_pem(csr("node-9").0.as_bytes())
        .unwrap()
        .1
        .contents;
    let mut tampered = der.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    let tampered_pem = pem_of("CERTIFICATE REQUEST", &tampered);
    refused(
        bootstrap(&ctl, &pki, &good, &tampered_pem).await,
        Code::InvalidArgument,
        "csr_pem",
    );
    // A weak RSA key, made by openssl (scripts/setup.sh installs it).
    let weak = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-subj",
            "/CN=weak",
            "-keyout",
            "/dev/null",
        ])
        .output()
        .expect("openssl");
    assert!(
        weak.status.success(),
        "{}",
        String::from_utf8_lossy(&weak.stderr)
    );
    refused(
        bootstrap(&ctl, &pki, &good, &String::from_utf8_lossy(&weak.stdout)).await,
        Code::InvalidArgument,
        "too weak",
    );

    let issued = admin
        .list_issued_certificates(ListIssuedCertificatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .certificates;
    assert!(
        issued.iter().all(|c| c.node_name == "short"),
        "nothing issued but while the short token lived: {issued:?}"
    );
    assert!(http_get(ctl.metrics, "/readyz").is_ok_and(|r| r.status == 200));

    // Guessing is limited per address: past ten failures even a good token waits.
    let mut limited = false;
    for _ in 0..15 {
        if let Err(s) = bootstrap(&ctl, &pki, "abcdef.0123456789abcdef", &csr_pem).await {
            limited |= s.code() == Code::ResourceExhausted;
        }
    }
    assert!(limited, "failed attempts were not rate limited");
    refused(
        bootstrap(&ctl, &pki, &good, &csr_pem).await,
        Code::ResourceExhausted,
        "too many failed",
    );
    // Every refusal is counted by its reason; failed token attempts also on their own.
    for (reason, n) in [
        ("token_malformed", 1),
        ("token_wrong_secret", 1),
        ("token_expired", 1),
        ("csr_malformed", 1),
        ("csr_subject", 1),
        ("csr_bad_signature", 1),
        ("csr_weak_key", 1),
        ("no_signer", 0),
        ("revoked", 0),
    ] {
        assert_eq!(refusals(&ctl, reason), n, "{reason}");
    }
    // Unknown: a made-up id, a deleted token, then guesses until the limit held them back.
    let unknown = refusals(&ctl, "token_unknown");
    let limited = refusals(&ctl, "rate_limited");
    assert!(
        unknown >= 3 && limited >= 2,
        "{unknown} unknown, {limited} limited"
    );
    assert_eq!(
        counter(&ctl, "twill_bootstrap_token_failures_total"),
        3 + unknown,
        "failed token attempts: every token refusal, not the rate-limited ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_signing_ca_bootstrap_says_how_to_enable_it() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path(), &[]);
    let token = token(&mut ctl.admin(&pki).await, 0).await;
    refused(
        bootstrap(&ctl, &pki, &token, &csr("node-1").0).await,
        Code::FailedPrecondition,
        "--signing-cert",
    );
    assert_eq!(refusals(&ctl, "no_signer"), 1);
}

/// An mTLS channel with `cert_pem` and `key`.
async fn channel_as(
    ctl: &Controller,
    pki: &Pki,
    cert_pem: &str,
    key: &KeyPair,
) -> tonic::transport::Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(Identity::from_pem(cert_pem, key.serialize_pem()))
        .domain_name("localhost");
    Endpoint::from_shared(ctl.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Bootstraps `node`: its certificate chain and key.
async fn join(ctl: &Controller, pki: &Pki, token: &str, node: &str) -> (String, KeyPair) {
    let (csr_pem, key) = csr(node);
    let issued = bootstrap(ctl, pki, token, &csr_pem).await.unwrap();
    (issued.certificate_chain_pem, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_needs_the_current_certificate_and_revocation_cuts_one_node_off() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path(), &signing(&pki));
    let mut admin = ctl.admin(&pki).await;
    let token = token(&mut admin, 0).await;
    let (cert1, key1) = join(&ctl, &pki, &token, "node-1").await;
    let (cert2, key2) = join(&ctl, &pki, &token, "node-2").await;

    // Rotation: a new key, signed on the strength of the current certificate.
    let ch1 = channel_as(&ctl, &pki, &cert1, &key1).await;
    let (csr_new, key_new) = csr("node-1");
    let renewed = IdentityServiceClient::new(ch1.clone())
        .renew(RenewRequest { csr_pem: csr_new })
        .await
        .unwrap()
        .into_inner();
    let ch1_new = channel_as(&ctl, &pki, &renewed.certificate_chain_pem, &key_new).await;
    AgentServiceClient::new(ch1_new.clone())
        .acquire(acquire_request("node-1", ""))
        .await
        .expect("the rotated certificate works");
    let s = IdentityServiceClient::new(ch1.clone())
        .renew(RenewRequest {
            csr_pem: csr("node-2").0,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "another node's CN: {s:?}");
    let s = identity(&ctl, &pki)
        .await
        .renew(RenewRequest {
            csr_pem: csr("node-1").0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "no certificate, no renewal: {s:?}"
    );
    assert_eq!(refusals(&ctl, "no_node_certificate"), 1);
    assert_eq!(refusals(&ctl, "csr_subject"), 1, "another node's CN");

    // Revocation: node-1's certificates (both) are refused, its watch is closed; node-2 goes on.
    let ch2 = channel_as(&ctl, &pki, &cert2, &key2).await;
    let mut node2 = AgentServiceClient::new(ch2);
    node2.acquire(acquire_request("node-2", "")).await.unwrap();
    let mut watch1 = AgentServiceClient::new(ch1_new.clone())
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch1.message().await.unwrap().expect("snapshot");
    admin
        .revoke_node_certificates(RevokeNodeCertificatesRequest {
            node_name: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch1.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked node's watch closes");
    assert_eq!(closed.unwrap_err().code(), Code::PermissionDenied);
    for ch in [ch1, ch1_new.clone()] {
        let s = AgentServiceClient::new(ch)
            .acquire(acquire_request("node-1", ""))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert!(s.message().contains("revoked"), "{s:?}");
    }
    node2
        .acquire(acquire_request("node-2", ""))
        .await
        .expect("node-2 is unaffected");
    let s = IdentityServiceClient::new(ch1_new.clone())
        .renew(RenewRequest {
            csr_pem: csr("node-1").0,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(refusals(&ctl, "revoked"), 1);

    // With a token, node-1 comes back; its new certificate is not caught by the revocation.
    let (cert1, key1) = join(&ctl, &pki, &token, "node-1").await;
    AgentServiceClient::new(channel_as(&ctl, &pki, &cert1, &key1).await)
        .acquire(acquire_request("node-1", ""))
        .await
        .expect("rejoined with a token");
}

fn pem_of(label: &str, der: &[u8]) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            text.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        text.push_str(&"=".repeat(3 - chunk.len()));
    }
    let body: Vec<String> = text
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_on_an_open_connection_ends_its_watch_and_its_calls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path(), &signing(&pki));
    let mut admin = ctl.admin(&pki).await;
    // node-1's certificate lasts a few seconds; node-2's a day (as one rotated in time).
    let short = Validity::lasting(Duration::from_secs(4));
    let node1 = pki.ca.issue(&Role::Node("node-1".into()), short).unwrap();
    let not_after = node1
        .not_after
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ch1 = ctl.channel(&pki, Some(&node1)).await.expect("connect");
    let mut agent1 = AgentServiceClient::new(ch1.clone());
    agent1.acquire(acquire_request("node-1", "")).await.unwrap();
    let mut watch1 = agent1
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch1.message().await.unwrap().expect("snapshot");
    let mut agent2 = ctl.agent(&pki, &pki.node("node-2")).await;
    let mut watch2 = agent2
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch2.message().await.unwrap().expect("snapshot");

    // Status shows when each watcher's certificate runs out.
    let agents = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let expiry: Vec<(&str, i64)> = agents
        .iter()
        .map(|a| (a.name.as_str(), a.cert_not_after_unix))
        .collect();
    assert_eq!(expiry[0], ("node-1", not_after), "{agents:?}");
    assert_eq!(expiry[1].0, "node-2");
    assert!(expiry[1].1 > not_after + 3600, "{agents:?}");

    // node-1's watch ends with its certificate, not before.
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match watch1.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch of an expired certificate ends")
    .expect_err("ends with an error status");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now > not_after,
        "ended at {now}, the certificate was valid through {not_after}"
    );
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let says = format!(
        "client certificate of node node-1 expired at {}; reconnect with a current certificate",
        humantime::format_rfc3339_seconds(node1.not_after)
    );
    assert_eq!(ended.message(), says);

    // The connection it was opened on is still up, but calls on it are refused: they
    // reach the controller (a new handshake would fail before any RPC) and get the same
    // answer.
    let s = agent1
        .acquire(acquire_request("node-1", ""))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::Unauthenticated, says.as_str())
    );
    let s = IdentityServiceClient::new(ch1)
        .renew(RenewRequest {
            csr_pem: csr("node-1").0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::Unauthenticated, says.as_str())
    );
    assert_eq!(refusals(&ctl, "certificate_expired"), 1);

    // node-2, whose certificate is current, goes on watching and calling.
    agent2.acquire(acquire_request("node-2", "")).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watch2.message())
        .await
        .expect("node-2's watch goes on")
        .unwrap()
        .expect("an event");
    assert!(
        format!("{event:?}").contains("node-2"),
        "node-2's own lease: {event:?}"
    );
    let names: Vec<String> = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["node-2"], "the expired watcher is no longer listed");
}
