//! Who is calling, and what they may call: authenticated once, authorized in one place.
//!
//! The TLS acceptor reads the client certificate once per connection (`tls::Peer`).
//! `AuthLayer`, in front of every service, decides each call from `POLICIES` (one row
//! per RPC: who may call it, and whether it writes) before any handler runs, and hands
//! the handler the verified caller (`Authorized`). Handlers call no auth function;
//! the one check left to them is whether the node a request body names is the caller
//! (`Authorized::acts_for`), since only they decode the body.
//!
//! Who may do what (docs/threat-model.md):
//! - a connection without a client certificate: `IdentityService.Bootstrap` only;
//! - a node certificate (`O=twill:nodes`): the agent RPCs and `Renew`, for itself only;
//! - an admin certificate (`O=twill:admins`): the admin API, and the agents' reads;
//! - a controller replica (`O=twill:controllers`, with clientAuth): nothing as itself.
//!   With `--store etcd` it forwards calls to the leader, and the leader decides them
//!   as the original caller's, whose certificate chain it verifies against the client
//!   CA as at a handshake. The forwarding headers are believed only from a certificate
//!   of a registered replica whose address is in its subjectAltNames, and are removed
//!   from everyone else's calls.
//!
//! Every certificate is refused once expired or revoked (`twillctl certs revoke`, for
//! nodes and admins).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use tonic::body::Body;
use tonic::Status;
use twill_common::model::NodeName;
use twill_common::now_unix;
use twill_common::tls::{Identity, Role, ADMINS_GROUP, NODES_GROUP};

use super::{Answer, Inner, Middleware, Wrap};
use crate::identity::Identity as NodeIdentity;
use crate::refusal::Refusal;
use crate::replica::{forward, Replica};
use crate::tls::{Peer, ReloadingTls};

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Anyone, with or without a client certificate (bootstrap with a token).
    Anyone,
    /// A node, for itself.
    Node,
    /// A node or an admin (the read-only lease stream and network configuration).
    NodeOrAdmin,
    /// An admin.
    Admin,
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Who may call it.
    pub who: Who,
    /// It changes the store: with replicas, only the leader serves it.
    pub write: bool,
}

const fn read(who: Who) -> Policy {
    Policy { who, write: false }
}

const fn write(who: Who) -> Policy {
    Policy { who, write: true }
}

const IDENTITY_SERVICE: &str = "/twill.v1.IdentityService/";

/// Every RPC's policy. An RPC not listed is refused (and `every_rpc_has_a_policy`
/// fails for it).
pub const POLICIES: &[(&str, Policy)] = &[
    (
        "/twill.v1.AgentService/GetNetworkConfig",
        read(Who::NodeOrAdmin),
    ),
    ("/twill.v1.AgentService/Acquire", write(Who::Node)),
    ("/twill.v1.AgentService/Release", write(Who::Node)),
    ("/twill.v1.AgentService/Watch", read(Who::NodeOrAdmin)),
    ("/twill.v1.AgentService/ListNetworks", read(Who::Node)),
    // Kept in the leader's memory (crate::pods).
    ("/twill.v1.AgentService/ReportAttachments", write(Who::Node)),
    ("/twill.v1.AdminService/ListNetworks", read(Who::Admin)),
    ("/twill.v1.AdminService/ListLeases", read(Who::Admin)),
    ("/twill.v1.AdminService/GetLease", read(Who::Admin)),
    ("/twill.v1.AdminService/RevokeLease", write(Who::Admin)),
    ("/twill.v1.AdminService/Reserve", write(Who::Admin)),
    ("/twill.v1.AdminService/Unreserve", write(Who::Admin)),
    ("/twill.v1.AdminService/ListReservations", read(Who::Admin)),
    ("/twill.v1.AdminService/GetConfig", read(Who::Admin)),
    ("/twill.v1.AdminService/Status", read(Who::Admin)),
    ("/twill.v1.AdminService/Watch", read(Who::Admin)),
    ("/twill.v1.AdminService/CreateToken", write(Who::Admin)),
    // Listing forgets expired tokens, which is a write.
    ("/twill.v1.AdminService/ListTokens", write(Who::Admin)),
    ("/twill.v1.AdminService/DeleteToken", write(Who::Admin)),
    // Read on the leader: issued records are pruned there.
    (
        "/twill.v1.AdminService/ListIssuedCertificates",
        write(Who::Admin),
    ),
    (
        "/twill.v1.AdminService/RevokeNodeCertificates",
        write(Who::Admin),
    ),
    // Read on the leader: the pods are in its memory.
    ("/twill.v1.AdminService/ListPods", write(Who::Admin)),
    ("/twill.v1.AdminService/ListAddressUsage", write(Who::Admin)),
    ("/twill.v1.AdminService/CheckAddresses", write(Who::Admin)),
    ("/twill.v1.AdminService/ReleaseLeaked", write(Who::Admin)),
    ("/twill.v1.IdentityService/Bootstrap", write(Who::Anyone)),
    ("/twill.v1.IdentityService/Renew", write(Who::Node)),
];

/// The policy of the RPC at `path`, if it has one.
pub fn policy(path: &str) -> Option<Policy> {
    POLICIES.iter().find(|(p, _)| *p == path).map(|(_, p)| *p)
}

/// The caller a handler serves, put in the request by `AuthLayer` once the policy
/// allowed the call: for a call a replica forwarded, the original caller.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The caller's certificate; `None` for a caller without one (bootstrap).
    pub identity: Option<Arc<Identity>>,
    /// The caller's certificate chain, leaf first (empty without one).
    pub chain: Arc<Vec<CertificateDer<'static>>>,
    /// The caller's address.
    pub ip: IpAddr,
}

impl Authorized {
    /// The caller of `req`: the layer put it there before any handler runs.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<&Authorized, Status> {
        req.extensions()
            .get::<Authorized>()
            .ok_or_else(|| Status::internal("served without the authorization layer"))
    }

    /// The caller's certificate; the policy guaranteed one for every RPC but Bootstrap.
    pub fn cert(&self) -> Result<&Identity, Status> {
        self.identity
            .as_deref()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))
    }

    /// The node the caller acts for when a request names `claimed`: its certificate's
    /// CN, and nobody else, whatever the body says.
    pub fn acts_for(&self, claimed: &str) -> Result<NodeName, Status> {
        let claimed = NodeName::new(claimed)
            .map_err(|e| Status::invalid_argument(format!("node_name: {e}")))?;
        let id = self.cert()?;
        if *claimed != *id.name {
            return Err(Status::permission_denied(format!(
                "certificate of node {:?} cannot act for node {:?}",
                id.name,
                claimed.as_str()
            )));
        }
        Ok(claimed)
    }
}

/// The refusal of a certificate whose validity has ended: UNAUTHENTICATED, saying when
/// and what to do.
pub fn expired(id: &Identity) -> Status {
    let whose = match id.role() {
        Some(Role::Node) => format!("node {}", id.name),
        Some(Role::Admin) => format!("admin {}", id.name),
        _ => format!("{:?}", id.name),
    };
    let at = UNIX_EPOCH + Duration::from_secs(id.not_after_unix.max(0) as u64);
    Status::unauthenticated(format!(
        "client certificate of {whose} expired at {}; reconnect with a current certificate",
        humantime::format_rfc3339_seconds(at)
    ))
}

/// What the layer consults.
#[derive(Clone)]
pub struct Gate {
    /// Revocations.
    pub identity: Arc<NodeIdentity>,
    /// The client CA a forwarded certificate must verify against.
    pub tls: Arc<ReloadingTls>,
    /// This replica, with `--store etcd`: only then are forwarded calls believed.
    pub replica: Option<Arc<Replica>>,
    /// Counts the refused renewals (`twill_node_certificates_refused_total`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Gate {
    /// Decides a call: the caller it is served for, or the refusal.
    async fn authorize(
        &self,
        path: &str,
        peer: &Peer,
        headers: &mut http::HeaderMap,
    ) -> Result<Authorized, Status> {
        let policy = policy(path).ok_or_else(|| {
            Status::unimplemented(format!("{path} is not an RPC of this controller"))
        })?;
        let caller = match self.forwarder(peer, headers).await? {
            Some(replica) => self.forwarded(peer, headers).inspect_err(|e| {
                tracing::warn!(replica = %replica, error = %e.message(), "refused a forwarded call");
            })?,
            None => {
                // Only a replica speaks for someone else.
                forward::remove_headers(headers);
                Authorized {
                    identity: peer.identity.clone(),
                    chain: peer.chain.clone(),
                    ip: peer.remote.ip(),
                }
            }
        };
        let identity_service = path.starts_with(IDENTITY_SERVICE);
        if let Err((refusal, status)) = self.allows(policy.who, &caller, identity_service) {
            // A refused certificate request is counted with the reason, whoever decided.
            if identity_service {
                self.metrics.cert_refused(refusal);
            }
            return Err(status);
        }
        Ok(caller)
    }

    /// The registered replica that forwarded this call, when it is forwarded: `None`
    /// for a call that is not (no replica set, not a controller certificate, no
    /// forwarding header). A controller certificate forwarding for a URL that is not a
    /// registered replica's is refused: UNAVAILABLE while it is not registered (a
    /// replica whose etcd session lapsed re-registers; the caller retries), and
    /// PERMISSION_DENIED when the certificate does not name the URL's host.
    async fn forwarder(
        &self,
        peer: &Peer,
        headers: &http::HeaderMap,
    ) -> Result<Option<String>, Status> {
        let (Some(replica), Some(id)) = (self.replica.as_ref(), peer.identity.as_deref()) else {
            return Ok(None);
        };
        if id.role() != Some(Role::Controller) {
            return Ok(None);
        }
        let Some(by) = headers
            .get(forward::FORWARDED_BY)
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(None);
        };
        let names_it = peer
            .chain
            .first()
            .is_some_and(|der| twill_common::tls::names_host_of(der.as_ref(), by));
        if !names_it {
            tracing::warn!(url = %by, name = %id.name, "refused a call forwarded for a replica URL the certificate's subjectAltNames do not name");
            return Err(Status::permission_denied(format!(
                "the forwarding certificate does not name {by} in its subjectAltNames"
            )));
        }
        if !replica.is_registered(by).await {
            tracing::warn!(url = %by, name = %id.name, "refused a call forwarded by a replica that is not registered");
            return Err(Status::unavailable(format!(
                "{by} forwarded this call but is not a registered replica right now (its etcd \
                 session may have lapsed); retry"
            )));
        }
        Ok(Some(by.to_string()))
    }

    /// The original caller of a forwarded call: its chain verified against the client
    /// CA, as if it were the TLS peer; no certificate means a caller without one.
    fn forwarded(&self, peer: &Peer, headers: &http::HeaderMap) -> Result<Authorized, Status> {
        let ip = headers
            .get(forward::FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(peer.remote.ip());
        let Some(v) = headers.get(forward::FORWARDED_CERT) else {
            return Ok(Authorized {
                identity: None,
                chain: Arc::default(),
                ip,
            });
        };
        let chain = v
            .to_str()
            .ok()
            .and_then(forward::decode_chain)
            .ok_or_else(|| {
                Status::invalid_argument("x-twill-forwarded-cert is not a hex DER chain")
            })?;
        self.tls.verify_client(&chain).map_err(|e| {
            Status::unauthenticated(format!("forwarded client certificate does not verify: {e}"))
        })?;
        let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
        let id = Identity::from_der(leaf)
            .map_err(|e| Status::unauthenticated(format!("forwarded client certificate: {e}")))?;
        Ok(Authorized {
            identity: Some(Arc::new(id)),
            chain: Arc::new(chain),
            ip,
        })
    }

    /// Whether `caller` is one `who` admits: a current, unrevoked certificate of the
    /// right role. A refusal says why, for the refusal metric.
    fn allows(
        &self,
        who: Who,
        caller: &Authorized,
        renewing: bool,
    ) -> Result<(), (Refusal, Status)> {
        let Some(id) = caller.identity.as_deref() else {
            return match who {
                Who::Anyone => Ok(()),
                // The one certificate call of the identity service says what to do
                // instead (IdentityService.Renew's contract: PERMISSION_DENIED).
                Who::Node if renewing => Err((
                    Refusal::NoNodeCertificate,
                    Status::permission_denied(
                        "renewal needs the node's current certificate (bootstrap with a token otherwise)",
                    ),
                )),
                _ => Err((
                    Refusal::NoNodeCertificate,
                    Status::unauthenticated(
                        "a client certificate is required (a connection without one may only \
                         call IdentityService.Bootstrap)",
                    ),
                )),
            };
        };
        if who == Who::Anyone {
            return Ok(());
        }
        if id.expired(now_unix()) {
            return Err((Refusal::CertificateExpired, expired(id)));
        }
        let role = id.role();
        let admitted = match who {
            Who::Anyone => true,
            Who::Node => role == Some(Role::Node),
            Who::NodeOrAdmin => matches!(role, Some(Role::Node | Role::Admin)),
            Who::Admin => role == Some(Role::Admin),
        };
        if !admitted {
            let needs = match who {
                Who::Node => format!("O={NODES_GROUP}"),
                Who::Admin => format!("O={ADMINS_GROUP}"),
                _ => format!("O={NODES_GROUP} or O={ADMINS_GROUP}"),
            };
            let is = match role {
                Some(r) => format!("a {} certificate", r.as_str()),
                None => "not a certificate of exactly one Twill role".to_string(),
            };
            return Err((
                Refusal::NoNodeCertificate,
                Status::permission_denied(format!(
                    "certificate {:?} is {is}: this call needs {needs}",
                    id.name
                )),
            ));
        }
        if let Some(why) = self.identity.refused(id) {
            return Err((Refusal::Revoked, Status::permission_denied(why)));
        }
        Ok(())
    }
}

/// Puts `Gate`'s decision in front of every service.
pub type AuthLayer = Wrap<Gate>;

impl Middleware for Gate {
    fn call<S: Inner>(&self, inner: &mut S, mut req: http::Request<Body>) -> Answer {
        // The ready inner service serves this call; a clone waits for the next.
        let clone = inner.clone();
        let mut inner = std::mem::replace(inner, clone);
        let gate = self.clone();
        Box::pin(async move {
            let Some(peer) = req.extensions().get::<Peer>().cloned() else {
                return Ok(Status::internal("a call without its connection's peer").into_http());
            };
            let path = req.uri().path().to_string();
            let _call = peer.call_started();
            match gate.authorize(&path, &peer, req.headers_mut()).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(status) => {
                    tracing::debug!(path = %path, peer = %peer.remote, error = %status.message(), "call refused");
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_has_a_policy_and_every_policy_an_rpc() {
        for m in twill_proto::METHODS {
            assert!(
                policy(m.path).is_some(),
                "{} has no row in grpc::auth::POLICIES: say who may call it and whether it writes",
                m.path
            );
        }
        for (path, _) in POLICIES {
            assert!(
                twill_proto::METHODS.iter().any(|m| m.path == *path),
                "POLICIES names {path}, which no .proto declares"
            );
        }
    }

    #[test]
    fn only_the_leader_serves_writes() {
        for path in [
            "/twill.v1.AgentService/Acquire",
            "/twill.v1.IdentityService/Bootstrap",
            "/twill.v1.AdminService/RevokeNodeCertificates",
        ] {
            assert!(policy(path).is_some_and(|p| p.write), "{path}");
        }
        for path in [
            "/twill.v1.AgentService/Watch",
            "/twill.v1.AgentService/GetNetworkConfig",
            "/twill.v1.AdminService/Status",
            "/twill.v1.AdminService/ListLeases",
        ] {
            assert!(policy(path).is_some_and(|p| !p.write), "{path}");
        }
    }
}
