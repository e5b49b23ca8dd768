//! Authorization with controller replicas on etcd: every RPC of every service
//! (`twill_proto::METHODS`) admits exactly the callers its policy
//! (`twill_server::grpc::auth::POLICIES`) names, whether it is called on the leader or
//! on a follower (which forwards writes to the leader with the caller's certificate
//! chain in `x-twill-forwarded-cert`), and forwarding headers are believed only from a
//! replica, for a chain the client CA signed.
//!
//! server/tests/trust.rs checks the same matrix against one controller on sled; here
//! three replicas (`tests/src/replicas.rs`) run on a real 3-member etcd on 127.0.0.1.
//! Each RPC is called as raw bytes with a body that sets only its `node_name`
//! (`tests/src/raw_grpc.rs`), as each of these callers, through a follower and
//! directly on the leader:
//!
//! - no certificate: `IdentityService.Bootstrap` only;
//! - the node itself (`CN=self-node`): the node RPCs, the node-or-admin reads, Bootstrap;
//! - another node (`CN=other-node`): the same, except the node RPCs whose request names
//!   self-node (PERMISSION_DENIED from the handler, on the leader for writes);
//! - another node forging forwarding headers (an admin's certificate from the CA, a
//!   registered replica's URL): the headers are removed, it is another node;
//! - a node revoked through the admin API before the matrix (once every replica
//!   enforces it): Bootstrap only;
//! - a replica's certificate (`O=twill:controllers`, clientAuth) calling for itself:
//!   Bootstrap only;
//! - a replica forwarding a forged admin (an admin certificate of a CA the controllers
//!   do not trust, with that CA, `-by` a registered replica's URL its SANs name): the
//!   forwarded chain does not verify, so UNAUTHENTICATED for every RPC, Bootstrap too;
//! - a replica forwarding the revoked node: as the revoked node (Bootstrap only);
//! - a replica forwarding an expired certificate of the node (from the CA): the chain
//!   does not verify, UNAUTHENTICATED for every RPC;
//! - an admin: the admin API, the node-or-admin reads, Bootstrap;
//! - a replica forwarding a real admin (the admin's chain from the CA, `-by` a
//!   registered replica's URL): as the admin. On a follower, its writes are not
//!   forwarded again (a forwarded call never is) but served there, where the fenced
//!   store refuses them UNAVAILABLE "not the elected leader": admitted, not written.
//!
//! Forwarding headers name as the forwarding replica (`x-twill-forwarded-by`) another
//! registered replica than the one called: on the leader, the follower (what a follower
//! really sends); on the follower, the third replica. The replicas share one
//! certificate (IP:127.0.0.1), so its SANs name every replica's URL.
//!
//! The admins go last: their calls revoke self-node's certificates, its lease, a
//! reservation. Every mismatch is collected and reported at once.
//!
//! Skips loudly without etcd or the binaries (fails with CI set). With
//! `TWILL_HA_AUTHZ_VERBOSE` set it prints every verdict.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use twill_ctl::certs::{new_ca, Ca, Role, Validity};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::{Method, RevokeNodeCertificatesRequest, StatusRequest};
use twill_server::grpc::auth::{policy, Who};
use twill_tests::raw_grpc::{call, pem_certificates, Headers, Verdict};
use twill_tests::replicas::{
    replica_bins, run_kept, runtime, Pem, Pki, ReplicaSet, ADMIN, HA_NET_CONF,
};
use twill_tests::{wait_until, Bins, Check, EtcdCluster};

/// How long one gRPC call may take (a follower forwarding a write waits for the
/// leader as long as the call's own deadline allows, and the leader 5 s for etcd).
const CALL_TIMEOUT: Duration = Duration::from_secs(12);
/// How long an election may take on a busy machine.
const ELECTION: Duration = Duration::from_secs(30);
/// How often a call without a verdict (no leader for a moment, a connection reset) is
/// tried before it counts as a mismatch, and the pause between tries.
const TRIES: u32 = 10;
const PAUSE: Duration = Duration::from_millis(500);
/// Replicas in the set.
const REPLICAS: usize = 3;
/// The node every request body names.
const NODE: &str = "self-node";
/// The address forged and forwarded calls claim to come from.
const FORWARDED_FOR: &str = "203.0.113.9";

// ------------------------------------------------------------------ set-up

/// A lazily connecting TLS channel to `url`, with `pem`'s client certificate or none.
fn channel(url: &str, ca: &str, pem: Option<&Pem>) -> Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(p) = pem {
        tls = tls.identity(Identity::from_pem(&p.cert, &p.key));
    }
    Ok(Endpoint::from_shared(url.to_string())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

/// A certificate chain as `x-twill-forwarded-cert` carries it (the replicas' own
/// encoding).
fn chain_header(ders: &[Vec<u8>]) -> String {
    let chain: Vec<_> = ders
        .iter()
        .map(|d| rustls::pki_types::CertificateDer::from(d.clone()))
        .collect();
    twill_server::replica::forward::encode_chain(&chain)
}

// ------------------------------------------------------------------ callers

/// The callers of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    NoCertificate,
    TheNode,
    AnotherNode,
    AnotherNodeForging,
    RevokedNode,
    Replica,
    ReplicaForwardingForgedAdmin,
    ReplicaForwardingRevokedNode,
    ReplicaForwardingExpiredNode,
    Admin,
    ReplicaForwardingAdmin,
}

impl Caller {
    /// In order: the admins last, since their calls revoke and release self-node's.
    const ALL: [Caller; 11] = [
        Caller::NoCertificate,
        Caller::TheNode,
        Caller::AnotherNode,
        Caller::AnotherNodeForging,
        Caller::RevokedNode,
        Caller::Replica,
        Caller::ReplicaForwardingForgedAdmin,
        Caller::ReplicaForwardingRevokedNode,
        Caller::ReplicaForwardingExpiredNode,
        Caller::Admin,
        Caller::ReplicaForwardingAdmin,
    ];

    fn describe(self) -> &'static str {
        match self {
            Caller::NoCertificate => "no certificate",
            Caller::TheNode => "the node itself",
            Caller::AnotherNode => "another node",
            Caller::AnotherNodeForging => "another node forging forwarding headers",
            Caller::RevokedNode => "a revoked node",
            Caller::Replica => "a replica certificate calling for itself",
            Caller::ReplicaForwardingForgedAdmin => "a replica forwarding a forged admin",
            Caller::ReplicaForwardingRevokedNode => "a replica forwarding a revoked node",
            Caller::ReplicaForwardingExpiredNode => "a replica forwarding an expired node",
            Caller::Admin => "an admin",
            Caller::ReplicaForwardingAdmin => "a replica forwarding a real admin",
        }
    }

    /// What `m` must do for this caller: admit it, or refuse it with one of these codes.
    fn expect(self, m: &Method) -> Expect {
        let who = policy(m.path)
            .unwrap_or_else(|| panic!("{} has no policy", m.path))
            .who;
        let renew = m.path.starts_with("/twill.v1.IdentityService/") && who == Who::Node;
        let node_rpc_naming_another = who == Who::Node && m.node_name_field != 0;
        let admits = |admitted: &[Who]| {
            if admitted.contains(&who) {
                Expect::Admit
            } else {
                Expect::Refuse(Code::PermissionDenied)
            }
        };
        match self {
            Caller::NoCertificate => match who {
                Who::Anyone => Expect::Admit,
                // IdentityService.Renew's contract: PERMISSION_DENIED, bootstrap instead.
                _ if renew => Expect::Refuse(Code::PermissionDenied),
                _ => Expect::Refuse(Code::Unauthenticated),
            },
            Caller::TheNode => admits(&[Who::Anyone, Who::Node, Who::NodeOrAdmin]),
            // The request names self-node: the handler refuses another node's.
            Caller::AnotherNode | Caller::AnotherNodeForging if node_rpc_naming_another => {
                Expect::Refuse(Code::PermissionDenied)
            }
            Caller::AnotherNode | Caller::AnotherNodeForging => {
                admits(&[Who::Anyone, Who::Node, Who::NodeOrAdmin])
            }
            // A forwarded caller's revocation is checked as a direct caller's.
            Caller::RevokedNode | Caller::Replica | Caller::ReplicaForwardingRevokedNode => {
                admits(&[Who::Anyone])
            }
            // The forwarded chain does not verify (another CA; expired): refused before
            // the policy is looked at, Bootstrap too.
            Caller::ReplicaForwardingForgedAdmin | Caller::ReplicaForwardingExpiredNode => {
                Expect::Refuse(Code::Unauthenticated)
            }
            Caller::Admin | Caller::ReplicaForwardingAdmin => {
                admits(&[Who::Anyone, Who::NodeOrAdmin, Who::Admin])
            }
        }
    }
}

/// What a call must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Admit,
    Refuse(Code),
}

impl Expect {
    fn holds(self, v: &Verdict) -> bool {
        match (self, v) {
            (Expect::Admit, Verdict::Admitted(_)) => true,
            (Expect::Refuse(want), Verdict::Refused(got, _)) => want == *got,
            _ => false,
        }
    }

    fn describe(self) -> String {
        match self {
            Expect::Admit => "admitted".into(),
            Expect::Refuse(c) => format!("refused {c:?}"),
        }
    }
}

/// The certificates the callers use.
struct Certs {
    node: Pem,
    other: Pem,
    revoked: Pem,
    replica: Pem,
    admin: Pem,
    /// The admin's certificate and the CA's, hex DER.
    admin_chain: String,
    /// An admin certificate (same CN) of a CA the controllers do not trust, and that
    /// CA's (self-signed) certificate, hex DER.
    forged_chain: String,
    /// revoked-node's certificate, hex DER.
    revoked_chain: String,
    /// A certificate of self-node from the CA that expired a minute ago, hex DER.
    expired_chain: String,
}

impl Certs {
    fn new(pki: &Pki) -> Result<Certs> {
        let read = |f: &str| {
            std::fs::read_to_string(pki.dir().join(f))
                .with_context(|| format!("reading {}", pki.dir().join(f).display()))
        };
        let mut admin_chain = pem_certificates(&pki.admin().cert)?;
        admin_chain.extend(pem_certificates(pki.ca_pem())?);
        let foreign = new_ca(Validity::days(1)?)?;
        let forged = Ca::from_pem(&foreign.cert_pem, &foreign.key_pem)?
            .issue(&Role::Admin(ADMIN.into()), Validity::days(1)?)?;
        let now = SystemTime::now();
        let expired = Ca::load(&pki.ca_file(), &pki.dir().join("ca.key"))?.issue(
            &Role::Node(NODE.into()),
            Validity {
                not_before: now - Duration::from_secs(2 * 86_400),
                not_after: now - Duration::from_secs(60),
            },
        )?;
        let revoked = (*pki.node("revoked-node")?).clone();
        Ok(Certs {
            node: (*pki.node(NODE)?).clone(),
            other: (*pki.node("other-node")?).clone(),
            revoked_chain: chain_header(&pem_certificates(&revoked.cert)?),
            revoked,
            // The replicas' own: O=twill:controllers, clientAuth, IP:127.0.0.1, so its
            // SANs name every replica's URL (https://127.0.0.1:PORT).
            replica: Pem {
                cert: read("controller.crt")?,
                key: read("controller.key")?,
            },
            admin: pki.admin().clone(),
            admin_chain: chain_header(&admin_chain),
            forged_chain: chain_header(&[forged.cert_der, foreign.cert_der]),
            expired_chain: chain_header(&[expired.cert_der]),
        })
    }

    /// The certificate `who` presents.
    fn of(&self, who: Caller) -> Option<&Pem> {
        Some(match who {
            Caller::NoCertificate => return None,
            Caller::TheNode => &self.node,
            Caller::AnotherNode | Caller::AnotherNodeForging => &self.other,
            Caller::RevokedNode => &self.revoked,
            Caller::Replica
            | Caller::ReplicaForwardingForgedAdmin
            | Caller::ReplicaForwardingRevokedNode
            | Caller::ReplicaForwardingExpiredNode
            | Caller::ReplicaForwardingAdmin => &self.replica,
            Caller::Admin => &self.admin,
        })
    }

    /// The headers `who` adds, naming `by` (a registered replica's URL) as the
    /// forwarding replica.
    fn headers(&self, who: Caller, by: &str) -> Headers {
        let forwarded = |chain: &str| {
            vec![
                ("x-twill-forwarded-cert", chain.to_string()),
                ("x-twill-forwarded-by", by.to_string()),
                ("x-twill-forwarded-for", FORWARDED_FOR.to_string()),
            ]
        };
        match who {
            // A real admin's certificate from the CA, but sent by a node.
            Caller::AnotherNodeForging => forwarded(&self.admin_chain),
            Caller::ReplicaForwardingForgedAdmin => forwarded(&self.forged_chain),
            Caller::ReplicaForwardingRevokedNode => forwarded(&self.revoked_chain),
            Caller::ReplicaForwardingExpiredNode => forwarded(&self.expired_chain),
            Caller::ReplicaForwardingAdmin => forwarded(&self.admin_chain),
            _ => Vec::new(),
        }
    }
}

// ------------------------------------------------------------------ the matrix

/// Calls `m`, again while there is no verdict (a leader change, a connection reset).
async fn verdict(ch: &Channel, m: &Method, headers: &Headers) -> (Verdict, u32) {
    let mut tries = 1;
    loop {
        let v = call(ch, m, NODE, headers, CALL_TIMEOUT).await;
        if !matches!(v, Verdict::Trouble(_)) || tries == TRIES {
            return (v, tries);
        }
        tries += 1;
        tokio::time::sleep(PAUSE).await;
    }
}

#[test]
fn every_rpc_admits_exactly_the_callers_its_policy_names_on_replicas() {
    let test = "ha_authz::every_rpc_admits_exactly_the_callers_its_policy_names_on_replicas";
    let Some(bins) = replica_bins(test) else {
        return;
    };
    run_kept("twill-ha-authz", |dir| scenario(&bins, dir));
}

fn scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    // tonic's lazy channels need the runtime's context
    let rt = runtime();
    let _rt = rt.enter();
    let pki = Pki::create(bins, &dir.join("certs"))?;
    let certs = Certs::new(&pki)?;
    let etcd = EtcdCluster::start(3)?;
    let set = ReplicaSet::start(bins, &etcd, &pki, dir, REPLICAS, "/twill/", HA_NET_CONF)?;
    let leader = set.wait_leader(ELECTION, None)?;
    let follower = (leader + 1) % REPLICAS;
    let third = (leader + 2) % REPLICAS;
    let ca = pki.ca_pem();

    // Every replica serves (an admin read, answered where it arrives).
    for i in 0..REPLICAS {
        let admin = AdminServiceClient::new(channel(&set.url(i), ca, Some(pki.admin()))?);
        wait_until(
            Duration::from_secs(30),
            &format!("replica {i} to answer Status"),
            || {
                rt.block_on(admin.clone().status(StatusRequest {
                    this_replica_only: true,
                    ..Default::default()
                }))
            },
        )?;
    }
    // Revoke revoked-node through the follower (a forwarded write: forwarding works),
    // then wait until both replicas the matrix calls refuse it.
    let via_follower = AdminServiceClient::new(channel(&set.url(follower), ca, Some(pki.admin()))?);
    wait_until(
        Duration::from_secs(30),
        "the admin to revoke revoked-node through the follower",
        || {
            rt.block_on(via_follower.clone().revoke_node_certificates(
                RevokeNodeCertificatesRequest {
                    node_name: "revoked-node".into(),
                    ..Default::default()
                },
            ))
        },
    )?;
    let get_config = twill_proto::METHODS
        .iter()
        .find(|m| m.path == "/twill.v1.AgentService/GetNetworkConfig")
        .context("no GetNetworkConfig in twill_proto::METHODS")?;
    for i in [follower, leader] {
        let ch = channel(&set.url(i), ca, Some(&certs.revoked))?;
        wait_until(
            Duration::from_secs(20),
            &format!("replica {i} to refuse revoked-node"),
            || match rt.block_on(call(&ch, get_config, NODE, &[], CALL_TIMEOUT)) {
                Verdict::Refused(Code::PermissionDenied, m) if m.contains("revoked") => {
                    Check::Ready(())
                }
                v => Check::NotYet(v.describe()),
            },
        )?;
    }

    // The matrix: each caller through the follower, then on the leader.
    let targets = [("follower", follower, third), ("leader", leader, follower)];
    let started = Instant::now();
    let mut wrong = Vec::new();
    let mut checked = 0usize;
    let mut retried = Vec::new();
    let mut served_by_follower = Vec::new();
    // TWILL_HA_AUTHZ_VERBOSE: every verdict, as it comes.
    let verbose = std::env::var_os("TWILL_HA_AUTHZ_VERBOSE").is_some();
    let mut summary: BTreeMap<(usize, &str), (usize, usize)> = BTreeMap::new();
    for (k, who) in Caller::ALL.into_iter().enumerate() {
        for (target, i, by) in targets {
            let ch = channel(&set.url(i), ca, certs.of(who))?;
            let headers = certs.headers(who, &set.url(by));
            for m in twill_proto::METHODS {
                let want = who.expect(m);
                let (got, tries) = rt.block_on(verdict(&ch, m, &headers));
                checked += 1;
                if verbose {
                    println!(
                        "ha_authz: {} -> {} on the {target}: {}",
                        who.describe(),
                        m.path,
                        got.describe()
                    );
                }
                let (admitted, refused) = summary.entry((k, target)).or_default();
                if got.admitted() {
                    *admitted += 1;
                } else {
                    *refused += 1;
                }
                if tries > 1 {
                    retried.push(format!(
                        "{} -> {} on the {target}: {tries} tries",
                        who.describe(),
                        m.path
                    ));
                }
                if let Verdict::Admitted(a) = &got {
                    if a.contains("not the elected leader")
                        || a.contains("not the leader right now")
                    {
                        served_by_follower.push(format!("{} ({a})", m.path));
                    }
                }
                if !want.holds(&got) {
                    wrong.push(format!(
                        "{} -> {} on the {target} (replica {i}): wanted {}, got {}",
                        who.describe(),
                        m.path,
                        want.describe(),
                        got.describe()
                    ));
                }
            }
        }
    }
    let took = started.elapsed();
    // The verdicts are only those of this leader and follower if nobody else led.
    let leaders = set.leaders();
    ensure!(
        leaders == [leader],
        "the leader changed during the matrix (replica {leader} led, now {leaders:?}): \
         rerun{}",
        set.log_tails()
    );

    let callers = Caller::ALL.len();
    let methods = twill_proto::METHODS.len();
    println!(
        "ha_authz: checked {checked} (method, caller, replica) combinations ({methods} methods × \
         {callers} callers × 2 replicas: follower {follower}, leader {leader}) in {took:.1?}; \
         {} mismatches; all in {:.1?}",
        wrong.len(),
        t0.elapsed()
    );
    for ((k, target), (a, r)) in &summary {
        println!(
            "ha_authz:   {:<45} on the {target:<8}: {a:>2} admitted, {r:>2} refused",
            Caller::ALL[*k].describe()
        );
    }
    if !served_by_follower.is_empty() {
        println!(
            "ha_authz: writes a replica forwarded to the follower, served there and refused by \
             its fenced store (admitted, not written): {}",
            served_by_follower.join("; ")
        );
    }
    if !retried.is_empty() {
        println!(
            "ha_authz: calls tried again for want of a verdict: {}",
            retried.join("; ")
        );
    }
    ensure!(
        wrong.is_empty(),
        "{} of {checked} calls were not decided as their policy says:\n  {}",
        wrong.len(),
        wrong.join("\n  ")
    );
    Ok(())
}
