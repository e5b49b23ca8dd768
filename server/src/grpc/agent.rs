//! `twill.v1.AgentService`: what every agent calls.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use twill_common::NetConf;
use twill_proto::agent_service_server::{AgentService, AgentServiceServer};
use twill_proto::{
    AcquireRequest, AcquireResponse, GetNetworkConfigRequest, NetworkConfig, ReleaseRequest,
    ReleaseResponse, WatchRequest,
};

use super::limit::NodeLimiter;
use super::{auth, watch};
use crate::events::Hub;
use crate::identity::Identity;
use crate::leases::{AcquireFields, AcquireParams, Leases};
use crate::metrics::{Agents, Metrics};

/// The agent service.
pub struct AgentApi {
    /// The configuration served to agents.
    pub conf: Arc<NetConf>,
    /// The lease writer.
    pub leases: Leases,
    /// The committed table and its fan-out.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Connected agents.
    pub agents: Arc<Agents>,
    /// Per-node limit of lease writes.
    pub limiter: NodeLimiter,
    /// Revoked node certificates.
    pub identity: Arc<Identity>,
}

impl AgentApi {
    /// The caller's certificate, refused when revoked.
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.identity.has_revocations() {
            return Ok(());
        }
        match auth::caller(req) {
            Ok(id) => auth::not_revoked(&id, &self.identity),
            Err(_) => Ok(()),
        }
    }

    fn limit(&self, node: &str) -> Result<(), Status> {
        self.limiter.check(node).inspect_err(|_| {
            self.metrics.rate_limited.inc();
            tracing::debug!(node = %node, "lease write refused: rate limit");
        })
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn get_network_config(
        &self,
        req: Request<GetNetworkConfigRequest>,
    ) -> Result<Response<NetworkConfig>, Status> {
        auth::watcher(&req)?;
        self.check(&req)?;
        Ok(Response::new(NetworkConfig {
            net_conf_json: self.conf.raw.clone(),
        }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let node = auth::node_caller(&req, &req.get_ref().node_name)?;
        self.check(&req)?;
        let r = req.get_ref();
        self.agents.seen(&node);
        let params = AcquireParams::parse(
            &self.conf,
            &node,
            AcquireFields {
                requested: &r.requested_subnet,
                public_ip: &r.public_ip,
                backend: &r.backend_type,
                vtep_mac: &r.vtep_mac,
                requested_ipv6: &r.requested_ipv6_subnet,
                public_ipv6: &r.public_ipv6,
                vtep_mac_v6: &r.vtep_mac_v6,
                public_prefix_len: r.public_ip_prefix_len,
            },
        )?;
        // Checked once the request is known to be well formed: only what would reach the
        // lease writer counts.
        self.limit(&node)?;
        let lease = self.leases.acquire(params).await?;
        Ok(Response::new(AcquireResponse {
            lease: Some(lease),
            ttl_seconds: self.leases.ttl().as_secs(),
        }))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let node = auth::node_caller(&req, &req.get_ref().node_name)?;
        self.agents.seen(&node);
        self.limit(&node)?;
        let released = self.leases.release(&node).await?;
        Ok(Response::new(ReleaseResponse { released }))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = auth::watcher(&req)?;
        self.check(&req)?;
        let (from, epoch) = (req.get_ref().from_revision, &req.get_ref().epoch);
        Ok(Response::new(watch::stream(
            &self.hub,
            &self.metrics,
            &self.agents,
            &self.identity,
            &who,
            from,
            epoch,
        )))
    }
}

/// Largest request an agent may send: every agent request is a few short strings.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest response: watch messages hold at most `MAX_MESSAGE_BYTES` of events.
const MAX_RESPONSE_BYTES: usize = crate::events::MAX_MESSAGE_BYTES + (64 << 10);

/// `AgentServiceServer` with the Watch method served pre-encoded (see `watch`): the
/// hot path of a 5,000-node fan-out. Every other method goes to the generated server.
#[derive(Clone)]
pub struct AgentRouter {
    api: Arc<AgentApi>,
    generated: AgentServiceServer<AgentApi>,
}

impl AgentRouter {
    /// Serves `api`.
    pub fn new(api: AgentApi) -> Self {
        let api = Arc::new(api);
        AgentRouter {
            generated: AgentServiceServer::from_arc(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            api,
        }
    }
}

impl tonic::server::NamedService for AgentRouter {
    const NAME: &'static str = twill_proto::agent_service_server::SERVICE_NAME;
}

/// The agents' Watch as tonic sees it: tonic decodes the request, runs this and writes
/// the response headers (or the error); the messages themselves leave through
/// `stream`, for `AgentRouter` to serve as a `WatchBody`, and tonic's own body stays
/// empty.
struct EncodedWatch {
    api: Arc<AgentApi>,
    stream: Option<tokio::sync::oneshot::Sender<watch::EncodedStream>>,
}

impl tonic::server::ServerStreamingService<WatchRequest> for EncodedWatch {
    type Response = twill_proto::WatchResponse;
    type ResponseStream = futures::stream::Empty<Result<Self::Response, Status>>;
    type Future =
        futures::future::BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<WatchRequest>) -> Self::Future {
        let api = self.api.clone();
        let out = self.stream.take();
        Box::pin(async move {
            let id = auth::watcher(&req)?;
            auth::not_revoked(&id, &api.identity)?;
            let (from, epoch) = (req.get_ref().from_revision, &req.get_ref().epoch);
            let stream = watch::encoded(
                &api.hub,
                &api.metrics,
                &api.agents,
                &api.identity,
                &id,
                from,
                epoch,
            );
            out.and_then(|tx| tx.send(stream).ok())
                .ok_or_else(|| Status::internal("watch stream handed over twice"))?;
            Ok(Response::new(futures::stream::empty()))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for AgentRouter
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == "/twill.v1.AgentService/Watch" {
            let api = self.api.clone();
            Box::pin(async move {
                let (tx, mut rx) = tokio::sync::oneshot::channel();
                let svc = EncodedWatch {
                    api,
                    stream: Some(tx),
                };
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                    twill_proto::WatchResponse,
                    WatchRequest,
                >::default())
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), Some(MAX_RESPONSE_BYTES));
                let resp = grpc.server_streaming(svc, req).await;
                // No stream: the call was refused, and tonic's response says why.
                Ok(match rx.try_recv() {
                    Ok(stream) => {
                        let (parts, _) = resp.into_parts();
                        http::Response::from_parts(
                            parts,
                            tonic::body::Body::new(watch::body::WatchBody::new(stream)),
                        )
                    }
                    Err(_) => resp,
                })
            })
        } else {
            Box::pin(self.generated.call(req))
        }
    }
}
