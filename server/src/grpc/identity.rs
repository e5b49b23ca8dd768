//! `twill.v1.IdentityService`: the one service a caller without a client certificate
//! may use. Failed token attempts are limited per source address.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::warn;
use twill_proto::identity_service_server::IdentityService;
use twill_proto::{BootstrapRequest, BootstrapResponse, RenewRequest};

use super::auth;
use super::limit::NodeLimiter;
use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;

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
            IdentityError::BadToken(m) => Status::unauthenticated(m),
            IdentityError::Invalid(m) => Status::invalid_argument(m),
            e @ IdentityError::NoSigningCa => Status::failed_precondition(e.to_string()),
            IdentityError::NotFound(m) => Status::not_found(m),
            IdentityError::Store(e) => Status::unavailable(format!("{e}; retry")),
        }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn bootstrap(
        &self,
        req: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        let from = req
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
        if !self.failures.allows(&from) {
            return Err(Status::resource_exhausted(format!(
                "too many failed bootstrap attempts from {from}: at most {FAILED_ATTEMPTS_PER_MINUTE} a minute; retry later"
            )));
        }
        let r = req.into_inner();
        match self.identity.bootstrap(&r.token, &r.csr_pem).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                match &e {
                    IdentityError::BadToken(why) => {
                        self.metrics.bootstrap_token_failures.inc();
                        let _ = self.failures.check(&from);
                        warn!(from = %from, reason = %why, "bootstrap refused: token");
                    }
                    IdentityError::Invalid(why) => {
                        self.metrics.bootstrap_csr_refused.inc();
                        warn!(from = %from, reason = %why, "bootstrap refused: certificate request");
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
        let id = auth::caller(&req).map_err(|_| {
            Status::permission_denied(
                "renewal needs the node's current certificate (bootstrap with a token otherwise)",
            )
        })?;
        if !id.is_node() {
            return Err(Status::permission_denied(format!(
                "certificate {:?} is not a node certificate",
                id.name
            )));
        }
        auth::not_revoked(&id, &self.identity)?;
        let resp = self
            .identity
            .renew(&id.name, &req.get_ref().csr_pem)
            .await
            .inspect_err(|e| warn!(node = %id.name, error = %e, "certificate renewal refused"))?;
        Ok(Response::new(resp))
    }
}
