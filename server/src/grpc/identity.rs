//! `twill.v1.IdentityService`: the one service a caller without a client certificate
//! may use (`auth::POLICIES`). Token attempts are limited per source address (an
//! IPv6 caller by its /64) and in total: each attempt takes a token from its
//! address's bucket before any work is done, and gets it back unless its token was
//! wrong; wrong tokens from all addresses together have a budget too.

use std::net::IpAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use twill_proto::identity_service_server::IdentityService;
use twill_proto::{BootstrapRequest, BootstrapResponse, RenewRequest};

use super::auth::Authorized;
use super::limit::NodeLimiter;
use crate::events::Hub;
use crate::identity::{Identity, IdentityError};
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::refusal::Refusal;

/// Failed token attempts one address may make in a burst, and per minute after it.
const FAILED_ATTEMPTS_BURST: f64 = 10.0;
const FAILED_ATTEMPTS_PER_MINUTE: f64 = 10.0;
/// Failed token attempts from all addresses together, in a burst and per minute: many
/// addresses guessing at once are held back too.
const GLOBAL_FAILURES_BURST: f64 = 100.0;
const GLOBAL_FAILURES_PER_MINUTE: f64 = 100.0;
/// Largest request this service takes: a token and a CSR are a few hundred bytes, an
/// RSA-4096 CSR under 2 KiB.
pub const MAX_REQUEST_BYTES: usize = 16 << 10;

/// The identity service.
pub struct IdentityApi {
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    leases: Leases,
    failures: NodeLimiter,
    global: NodeLimiter,
}

impl IdentityApi {
    /// Serves `identity`; `hub` tells which names hold live leases, and `leases` moves
    /// a lease to a renewed certificate's key.
    pub fn new(
        identity: Arc<Identity>,
        metrics: Arc<Metrics>,
        hub: Arc<Hub>,
        leases: Leases,
    ) -> Self {
        IdentityApi {
            identity,
            metrics,
            hub,
            leases,
            failures: NodeLimiter::new(FAILED_ATTEMPTS_PER_MINUTE / 60.0, FAILED_ATTEMPTS_BURST),
            global: NodeLimiter::new(GLOBAL_FAILURES_PER_MINUTE / 60.0, GLOBAL_FAILURES_BURST),
        }
    }
}

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::BadToken(_, msg) => Status::unauthenticated(msg),
            e @ IdentityError::BadCsr(..) => Status::invalid_argument(e.to_string()),
            IdentityError::Invalid(m) => Status::invalid_argument(m),
            e @ IdentityError::NoSigningCa => Status::failed_precondition(e.to_string()),
            IdentityError::NotFound(m) => Status::not_found(m),
            IdentityError::Alive(m) => Status::already_exists(m),
            IdentityError::TokenNotAllowed(_, msg) | IdentityError::Revoked(msg) => {
                Status::permission_denied(msg)
            }
            IdentityError::RateLimited(m) => Status::resource_exhausted(m),
            IdentityError::Store(e) => Status::unavailable(format!("{e}; retry")),
        }
    }
}

/// The key a caller's failed attempts count under: its IPv4 address, or its IPv6 /64
/// (one host usually holds a whole /64).
fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = a.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl IdentityApi {
    fn rate_limited(&self, from: &str) -> Status {
        // Debug, not warn: a guesser being held back would otherwise flood the log; the
        // refusal metric counts it.
        debug!(from = %from, "bootstrap refused: too many failed token attempts");
        self.metrics.cert_refused(Refusal::RateLimited);
        Status::resource_exhausted(format!(
            "too many failed bootstrap attempts from {from}, or from everywhere: at most \
             {FAILED_ATTEMPTS_PER_MINUTE} a minute per address; retry later"
        ))
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn bootstrap(
        &self,
        req: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        let from = source_key(Authorized::of(&req)?.ip);
        // The address's attempt is taken before any work (and given back when the
        // token was right), so attempts made at once cannot walk past the limit. The
        // budget of all addresses together counts failures only: taken up front, it
        // would cap how many nodes may bootstrap at once across the whole cluster.
        if !self.global.allows("") || self.failures.check(&from).is_err() {
            return Err(self.rate_limited(&from));
        }
        let r = req.into_inner();
        let hub = &self.hub;
        let result = self
            .identity
            .bootstrap(&r.token, &r.csr_pem, |node| {
                hub.held(node, twill_common::now_unix())
            })
            .await;
        if matches!(result, Err(IdentityError::BadToken(..))) {
            let _ = self.global.check("");
        } else {
            // Only a wrong token counts against the address and the budget.
            self.failures.refund(&from);
        }
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                if let Some(reason) = e.refusal() {
                    self.metrics.cert_refused(reason);
                }
                match &e {
                    IdentityError::BadToken(fault, msg) => {
                        self.metrics.bootstrap_token_failures.inc();
                        warn!(from = %from, fault = ?fault, reason = %msg, "bootstrap refused: token");
                    }
                    IdentityError::BadCsr(fault, msg) => {
                        warn!(from = %from, fault = ?fault, reason = %msg, "bootstrap refused: certificate request");
                    }
                    _ => warn!(from = %from, error = %e, "bootstrap refused"),
                }
                Err(e.into())
            }
        }
    }

    async fn renew(
        &self,
        req: Request<RenewRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        let current = Authorized::of(&req)?.cert()?.clone();
        let csr = &req.get_ref().csr_pem;
        let (resp, new_key) = match self.identity.renew(&current, csr).await {
            Ok(renewed) => renewed,
            Err(e) => {
                if let Some(reason) = e.refusal() {
                    self.metrics.cert_refused(reason);
                }
                warn!(node = %current.name, error = %e, "certificate renewal refused");
                return Err(e.into());
            }
        };
        // The node's lease follows it to its new key: only the holder's key, or one
        // renewed from it, may change the lease's addresses or release it.
        self.leases
            .rekey(&current.name, current.key_sha256, new_key)
            .await?;
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_per_ipv4_address_and_per_ipv6_64() {
        assert_eq!(source_key("10.0.0.7".parse().unwrap()), "10.0.0.7");
        assert_eq!(
            source_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            source_key("2001:db8:1:2:bbbb::9".parse().unwrap()),
            "one /64"
        );
        assert_ne!(
            source_key("2001:db8:1:2::1".parse().unwrap()),
            source_key("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(source_key("::ffff:10.0.0.7".parse().unwrap()), "10.0.0.7");
    }
}
