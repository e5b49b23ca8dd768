//! Trust in node identity, against the real controller over gRPC (issue 24): a token
//! cannot take over a live node, a lease belongs to the key that took it, forged
//! forwarding is ignored, oversized unauthenticated requests are refused, and every
//! RPC of every service admits exactly the callers its policy names.

#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use support::{acquire_request, Controller, Pki, NET_CONF};
use tonic::transport::Channel;
use tonic::{Code, Status};
use twill_pki::Role;
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::identity_service_client::IdentityServiceClient;
use twill_proto::{
    BootstrapRequest, CreateTokenRequest, GetLeaseRequest, ListTokensRequest, ReleaseRequest,
    RenewRequest, RevokeNodeCertificatesRequest,
};
use twill_tests::kit::http_get;
use twill_tests::raw_grpc::{body, Headers, Raw};

fn start(pki: &Pki, dir: &std::path::Path) -> Controller {
    let ca = pki.path("ca.crt").display().to_string();
    let key = pki.path("ca.key").display().to_string();
    Controller::start(
        pki,
        &dir.join("data"),
        NET_CONF,
        &["--signing-cert", &ca, "--signing-key", &key],
    )
}

/// A CSR for `cn` with a fresh key, and the key.
fn csr(cn: &str) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

async fn token(admin: &mut AdminServiceClient<Channel>, req: CreateTokenRequest) -> String {
    admin.create_token(req).await.unwrap().into_inner().token
}

async fn bootstrap(
    ctl: &Controller,
    pki: &Pki,
    token: &str,
    cn: &str,
) -> Result<twill_pki::Issued, Status> {
    let (csr_pem, key) = csr(cn);
    let resp = IdentityServiceClient::new(ctl.channel(pki, None).await.unwrap())
        .bootstrap(BootstrapRequest {
            token: token.into(),
            csr_pem,
        })
        .await?
        .into_inner();
    Ok(twill_pki::Issued {
        cert_der: Vec::new(),
        cert_pem: resp.certificate_chain_pem,
        key_pem: key.serialize_pem(),
        not_after: std::time::SystemTime::now(),
    })
}

fn refusals(ctl: &Controller, reason: &str) -> u64 {
    let page = http_get(ctl.metrics, "/metrics")
        .expect("metrics answer")
        .body;
    let series = format!("twill_node_certificates_refused_total{{reason=\"{reason}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
}

async fn public_ip(admin: &mut AdminServiceClient<Channel>, node: &str) -> String {
    admin
        .get_lease(GetLeaseRequest {
            node_name: node.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .public_ip
}

#[tokio::test]
async fn a_token_cannot_take_over_a_live_node_and_binds_names_and_uses() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path());
    let mut admin = ctl.admin(&pki).await;
    let any = token(&mut admin, CreateTokenRequest::default()).await;

    // The victim joins with the token and takes a lease.
    let victim = bootstrap(&ctl, &pki, &any, "victim").await.unwrap();
    ctl.grant(&pki, &victim, acquire_request("victim", ""))
        .await;
    // Anyone else holding the token cannot get a certificate for the live name.
    let s = bootstrap(&ctl, &pki, &any, "victim").await.unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    assert!(
        s.message().contains("twillctl certs revoke victim"),
        "names the way out: {s:?}"
    );
    // Nor for a name whose certificate is unexpired though it holds no lease yet.
    bootstrap(&ctl, &pki, &any, "quiet").await.unwrap();
    let s = bootstrap(&ctl, &pki, &any, "quiet").await.unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    assert_eq!(refusals(&ctl, "name_alive"), 2);
    assert_eq!(public_ip(&mut admin, "victim").await, "192.0.2.10");

    // Once an admin revokes the node, it rejoins with a new key.
    admin
        .revoke_node_certificates(RevokeNodeCertificatesRequest {
            node_name: "victim".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rejoined = bootstrap(&ctl, &pki, &any, "victim").await.unwrap();
    let mut moved = acquire_request("victim", "");
    moved.public_ip = "192.0.2.99".into();
    ctl.grant(&pki, &rejoined, moved).await;

    // A token bound to names and a number of uses.
    let bound = token(
        &mut admin,
        CreateTokenRequest {
            nodes: vec!["db-1".into()],
            node_prefix: "w-".into(),
            max_uses: 2,
            ..Default::default()
        },
    )
    .await;
    let s = bootstrap(&ctl, &pki, &bound, "other").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("db-1, w-*"), "{s:?}");
    bootstrap(&ctl, &pki, &bound, "db-1").await.unwrap();
    bootstrap(&ctl, &pki, &bound, "w-7").await.unwrap();
    let s = bootstrap(&ctl, &pki, &bound, "w-8").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("used 2 times"), "{s:?}");
    assert_eq!(refusals(&ctl, "token_not_for_name"), 1);
    assert_eq!(refusals(&ctl, "token_used_up"), 1);
    let tokens = admin
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let listed = tokens.iter().find(|t| t.max_uses == 2).unwrap();
    assert_eq!(
        (
            listed.nodes.clone(),
            listed.node_prefix.as_str(),
            listed.uses
        ),
        (vec!["db-1".to_string()], "w-", 2)
    );
}

#[tokio::test]
async fn a_lease_belongs_to_the_key_that_took_it_across_renewal_and_restart() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = start(&pki, dir.path());
    let mut admin = ctl.admin(&pki).await;
    let any = token(&mut admin, CreateTokenRequest::default()).await;
    let holder = bootstrap(&ctl, &pki, &any, "n1").await.unwrap();
    ctl.grant(&pki, &holder, acquire_request("n1", "")).await;

    // Another certificate of the same node (another key) may renew the lease as it
    // is, and nothing more.
    let other = pki.node("n1");
    ctl.grant(&pki, &other, acquire_request("n1", "")).await;
    let mut redirect = acquire_request("n1", "");
    redirect.public_ip = "192.0.2.66".into();
    for round in ["before", "after a kill -9"] {
        let s = ctl
            .agent(&pki, &other)
            .await
            .acquire(redirect.clone())
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{round}: {s:?}");
        let s = ctl
            .agent(&pki, &other)
            .await
            .release(ReleaseRequest {
                node_name: "n1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{round}: {s:?}");
        assert_eq!(public_ip(&mut admin, "n1").await, "192.0.2.10", "{round}");
        if round == "before" {
            ctl.kill9();
            ctl.restart();
            admin = ctl.admin(&pki).await;
        }
    }

    // The holder renews its certificate with a new key: the lease follows it.
    let (csr_pem, key) = csr("n1");
    let renewed = IdentityServiceClient::new(ctl.channel(&pki, Some(&holder)).await.unwrap())
        .renew(RenewRequest { csr_pem })
        .await
        .unwrap()
        .into_inner();
    let renewed = twill_pki::Issued {
        cert_der: Vec::new(),
        cert_pem: renewed.certificate_chain_pem,
        key_pem: key.serialize_pem(),
        not_after: std::time::SystemTime::now(),
    };
    ctl.grant(&pki, &renewed, redirect).await;
    assert_eq!(public_ip(&mut admin, "n1").await, "192.0.2.66");
    ctl.agent(&pki, &renewed)
        .await
        .release(ReleaseRequest {
            node_name: "n1".into(),
            ..Default::default()
        })
        .await
        .expect("the holder's renewed key releases it");
}

#[tokio::test]
async fn a_bootstrap_larger_than_16_kib_is_refused_before_the_token_is_read() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path());
    let s = IdentityServiceClient::new(ctl.channel(&pki, None).await.unwrap())
        .bootstrap(BootstrapRequest {
            token: "a".repeat(20 << 10),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{s:?}"
    );
    assert_eq!(
        refusals(&ctl, "token_malformed"),
        0,
        "refused before the token was looked at"
    );
}

/// What one caller gets from one RPC: `Ok` when the controller let the call through
/// to its handler (whatever the handler then answered about the body), `Err` with the
/// refusal otherwise.
async fn call(
    channel: Option<Channel>,
    m: &twill_proto::Method,
    headers: &[(&'static str, String)],
) -> Result<(), String> {
    let Some(channel) = channel else {
        return Err("no connection (the handshake refused the certificate)".into());
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(body(m.node_name_field, "self-node"));
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_static(m.path);
    let answer = if m.server_streaming {
        grpc.server_streaming(req, path, Raw).await.map(drop)
    } else {
        grpc.unary(req, path, Raw).await.map(drop)
    };
    match answer {
        // A handler's answer about the body (a malformed token, a missing field).
        Err(s)
            if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied)
                && !s.message().contains("bootstrap token") =>
        {
            Err(format!("{:?}: {}", s.code(), s.message()))
        }
        Err(s) if s.code() == Code::Unimplemented => Err(format!("unimplemented: {}", s.message())),
        // The TLS handshake refused the certificate: nothing reached the controller's
        // services (this test's controller has a healthy store, so nothing else answers
        // these).
        Err(s)
            if matches!(
                s.code(),
                Code::Unknown | Code::Unavailable | Code::Cancelled | Code::Internal
            ) =>
        {
            Err(format!("{:?}: {}", s.code(), s.message()))
        }
        Err(s) => {
            println!("{} answered {:?}: {}", m.path, s.code(), s.message());
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

#[tokio::test]
async fn every_rpc_admits_exactly_the_callers_its_policy_names() {
    use twill_server::grpc::auth::{policy, Who};
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path());
    let mut admin = ctl.admin(&pki).await;
    admin
        .revoke_node_certificates(RevokeNodeCertificatesRequest {
            node_name: "revoked-node".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Backdated, as every certificate is: it starts before the revocation.
    let revoked = pki.issue(Role::Node("revoked-node".into()));
    let expired = {
        let mut v = twill_pki::Validity::days(1).unwrap();
        v.not_after = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        pki.ca.issue(&Role::Node("self-node".into()), v).unwrap()
    };
    let replica = pki.issue(Role::Controller {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        replica: true,
    });
    let admin_id = pki.admin("root");
    let forged = [
        (
            "x-twill-forwarded-cert",
            twill_common::hex(&pki.admin("mallory").cert_der),
        ),
        ("x-twill-forwarded-by", ctl.url()),
        ("x-twill-forwarded-for", "203.0.113.9".into()),
    ];
    let connect = |id: Option<twill_pki::Issued>| {
        let f = ctl.channel_factory().with_ca(&pki);
        async move { f.connect_as(id.as_ref()).await.ok() }
    };
    // Role, its connection, the headers it adds, and which policies admit it.
    let roles: Vec<(&str, Option<Channel>, Headers, Vec<Who>)> = vec![
        (
            "no certificate",
            connect(None).await,
            vec![],
            vec![Who::Anyone],
        ),
        (
            "the node itself",
            connect(Some(pki.node("self-node"))).await,
            vec![],
            vec![Who::Anyone, Who::Node, Who::NodeOrAdmin],
        ),
        (
            "another node",
            connect(Some(pki.node("other-node"))).await,
            vec![],
            vec![Who::Anyone, Who::NodeOrAdmin, Who::Node],
        ),
        (
            "another node forging a forwarded admin",
            connect(Some(pki.node("other-node"))).await,
            forged.to_vec(),
            vec![Who::Anyone, Who::NodeOrAdmin, Who::Node],
        ),
        (
            "a revoked node",
            connect(Some(revoked)).await,
            vec![],
            vec![Who::Anyone],
        ),
        (
            "an expired node",
            connect(Some(expired)).await,
            vec![],
            vec![],
        ),
        (
            "a replica certificate",
            connect(Some(replica.clone())).await,
            vec![],
            vec![Who::Anyone],
        ),
        (
            "a replica certificate forwarding an admin to a single controller",
            connect(Some(replica)).await,
            forged.to_vec(),
            vec![Who::Anyone],
        ),
        // Last: its calls revoke and release things.
        (
            "an admin",
            connect(Some(admin_id)).await,
            vec![],
            vec![Who::Anyone, Who::NodeOrAdmin, Who::Admin],
        ),
    ];
    let mut wrong = Vec::new();
    for (role, channel, headers, admitted) in roles {
        for m in twill_proto::METHODS {
            let p = policy(m.path).unwrap_or_else(|| panic!("{} has no policy", m.path));
            // A node acts only for itself: a body naming another node is refused.
            let names_another = role.starts_with("another node") && m.node_name_field != 0;
            let want = admitted.contains(&p.who) && !(names_another && p.who == Who::Node);
            let got = call(channel.clone(), m, &headers).await;
            if got.is_ok() != want {
                wrong.push(format!(
                    "{role} -> {}: wanted {}, got {got:?}",
                    m.path,
                    if want { "admitted" } else { "refused" }
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn wrong_tokens_sent_at_once_are_held_back_before_any_is_checked() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(&pki, dir.path());
    let mut admin = ctl.admin(&pki).await;
    let real = token(&mut admin, CreateTokenRequest::default()).await;
    // The right id with a wrong secret: each costs the controller a lookup.
    let wrong = format!("{}.{}", &real[..6], "0".repeat(16));
    let channel = ctl.channel(&pki, None).await.unwrap();
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (channel, wrong) = (channel.clone(), wrong.clone());
        attempts.spawn(async move {
            IdentityServiceClient::new(channel)
                .bootstrap(BootstrapRequest {
                    token: wrong,
                    csr_pem: csr("guess").0,
                })
                .await
                .unwrap_err()
                .code()
        });
    }
    let mut codes = std::collections::BTreeMap::new();
    while let Some(code) = attempts.join_next().await {
        *codes.entry(format!("{:?}", code.unwrap())).or_insert(0) += 1;
    }
    let checked = codes.get("Unauthenticated").copied().unwrap_or(0);
    assert!(
        checked <= 10,
        "at most the burst of 10 reach the token check: {codes:?}"
    );
    assert_eq!(
        codes.get("ResourceExhausted").copied().unwrap_or(0),
        40 - checked,
        "{codes:?}"
    );
    assert_eq!(refusals(&ctl, "token_wrong_secret"), checked as u64);
}

#[tokio::test]
async fn a_replaced_client_ca_closes_the_connections_it_no_longer_verifies() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let node = pki.node("n1");
    let mut agent = ctl.agent(&pki, &node).await;
    agent.acquire(acquire_request("n1", "")).await.unwrap();
    let mut watch = agent
        .watch(twill_proto::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the snapshot");

    let other = twill_pki::new_ca(twill_pki::Validity::days(1).unwrap()).unwrap();
    std::fs::write(pki.path("ca.crt"), &other.cert_pem).unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the watch of a certificate the new CA does not sign ends");
    assert!(ended.is_err(), "closed under it: {ended:?}");
    let fresh = ctl.channel(&pki, Some(&node)).await;
    let refused = match fresh {
        Err(_) => true,
        Ok(ch) => twill_proto::agent_service_client::AgentServiceClient::new(ch)
            .acquire(acquire_request("n1", ""))
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a new handshake with the old CA's certificate fails"
    );
}

#[tokio::test]
async fn a_revoked_admin_certificate_is_refused_and_others_are_not() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&pki, &dir.path().join("data"), NET_CONF, &[]);
    let mallory = pki.admin("mallory");
    let mut theirs = twill_proto::admin_service_client::AdminServiceClient::new(
        ctl.channel(&pki, Some(&mallory)).await.unwrap(),
    );
    theirs
        .list_tokens(ListTokensRequest {})
        .await
        .expect("an admin before the revocation");
    let mut admin = ctl.admin(&pki).await;
    admin
        .revoke_node_certificates(RevokeNodeCertificatesRequest {
            node_name: "mallory".into(),
            role: "admin".into(),
        })
        .await
        .unwrap();
    let s = theirs.list_tokens(ListTokensRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("admin mallory"), "{s:?}");
    admin
        .list_tokens(ListTokensRequest {})
        .await
        .expect("another admin is not affected");
    let s = admin
        .revoke_node_certificates(RevokeNodeCertificatesRequest {
            node_name: "mallory".into(),
            role: "operator".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
}

/// A TLS connection without a client certificate, as a node before its bootstrap.
async fn anonymous(
    ctl: &Controller,
    pki: &Pki,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(ctl.addr).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

#[tokio::test]
async fn connections_without_a_certificate_are_capped_and_closed_when_idle() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(
        &pki,
        &dir.path().join("data"),
        NET_CONF,
        &["--max-anonymous-connections", "16"],
    );
    let started = std::time::Instant::now();
    let mut idle = anonymous(&ctl, &pki).await.unwrap();
    // It says nothing: the controller closes it (after its HTTP/2 preface, if any).
    let closed = tokio::time::timeout(std::time::Duration::from_secs(40), async {
        let mut buf = [0u8; 4096];
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an idle connection without a certificate stays open"
    );
    println!(
        "idle connection without a certificate closed after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // At most 16 at once here: the next is closed right after its handshake.
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(anonymous(&ctl, &pki).await.unwrap());
    }
    let mut extra = anonymous(&ctl, &pki).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("the connection over the cap is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    drop(held);
    let page = http_get(ctl.metrics, "/healthz");
    assert!(page.is_ok(), "the controller still serves");
}
