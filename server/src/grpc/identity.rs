//! `twill.v1.IdentityService`: the one service a caller without a client certificate
//! may use. Failed token attempts are limited per source address.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use twill_proto::identity_service_server::IdentityService;
use twill_proto::{BootstrapRequest, BootstrapResponse, RenewRequest};

use super::auth;
use super::limit::NodeLimiter;
use crate::identity::{Identity, IdentityError};
use crate::metrics::{Metrics, Refusal};

/// Failed token attempts one address may make in a burst, and per minute after it.
const FAILED_ATTEMPTS_BURST: f64 = 10.0;
const FAILED_ATTEMPTS_PER_MINUTE: f64 = 10.0;

/// The identity service.
pub struct IdentityApi {
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    failures: NodeLimiter,
}

impl IdentityApi {
    /// Serves `identity`.
    pub fn new(identity: Arc<Identity>, metrics: Arc<Metrics>) -> Self {
        IdentityApi {
            identity,
            metrics,
            failures: NodeLimiter::new(FAILED_ATTEMPTS_PER_MINUTE / 60.0, FAILED_ATTEMPTS_BURST),
        }
    }
}

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::BadToken { msg, .. } => Status::unauthenticated(msg),
            e @ IdentityError::BadCsr { .. } => Status::invalid_argument(e.to_string()),
            IdentityError::Invalid(m) => Status::invalid_argument(m),
            e @ IdentityError::NoSigningCa => Status::failed_precondition(e.to_string()),
            IdentityError::NotFound(m) => Status::not_found(m),
            IdentityError::Store(e) => Status::unavailable(format!("{e}; retry")),
        }
    }
}

impl IdentityApi {
    /// Counts a refused request and hands its status back.
    fn refuse(&self, reason: Refusal, status: Status) -> Status {
        self.metrics.cert_refused(reason);
        status
    }

    /// The node certificate a renewal is made on: presented, a node's, not expired,
    /// not revoked.
    fn renewing_node<T>(&self, req: &Request<T>) -> Result<twill_common::tls::Identity, Status> {
        let id = match auth::presented(req) {
            Ok(Some(id)) if id.is_node() => id,
            Ok(Some(id)) => {
                return Err(self.refuse(
                    Refusal::NoNodeCertificate,
                    Status::permission_denied(format!(
                        "certificate {:?} is not a node certificate",
                        id.name
                    )),
                ))
            }
            Ok(None) | Err(_) => {
                return Err(self.refuse(
                    Refusal::NoNodeCertificate,
                    Status::permission_denied(
                        "renewal needs the node's current certificate (bootstrap with a token otherwise)",
                    ),
                ))
            }
        };
        auth::unexpired(&id).map_err(|s| self.refuse(Refusal::CertificateExpired, s))?;
        auth::not_revoked(&id, &self.identity).map_err(|s| self.refuse(Refusal::Revoked, s))?;
        Ok(id)
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn bootstrap(
        &self,
        req: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        let from = super::auth::client_ip(&req);
        if !self.failures.allows(&from) {
            // Debug, not warn: a guesser being held back would otherwise flood the log;
            // the refusal metric counts it.
            debug!(from = %from, "bootstrap refused: too many failed token attempts");
            return Err(self.refuse(
                Refusal::RateLimited,
                Status::resource_exhausted(format!(
                    "too many failed bootstrap attempts from {from}: at most {FAILED_ATTEMPTS_PER_MINUTE} a minute; retry later"
                )),
            ));
        }
        let r = req.into_inner();
        match self.identity.bootstrap(&r.token, &r.csr_pem).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                if let Some(reason) = e.refusal() {
                    self.metrics.cert_refused(reason);
                }
                match &e {
                    IdentityError::BadToken { fault, msg } => {
                        self.metrics.bootstrap_token_failures.inc();
                        let _ = self.failures.check(&from);
                        warn!(from = %from, fault = ?fault, reason = %msg, "bootstrap refused: token");
                    }
                    IdentityError::BadCsr { fault, msg } => {
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
        let id = self
            .renewing_node(&req)
            .inspect_err(|s| warn!(error = %s.message(), "certificate renewal refused"))?;
        match self.identity.renew(&id.name, &req.get_ref().csr_pem).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                if let Some(reason) = e.refusal() {
                    self.metrics.cert_refused(reason);
                }
                warn!(node = %id.name, error = %e, "certificate renewal refused");
                Err(e.into())
            }
        }
    }
}
