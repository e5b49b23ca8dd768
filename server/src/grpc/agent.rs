//! `twill.v1.AgentService`: what every agent calls. `auth::AuthLayer` has admitted the
//! caller before any method here runs (a current, unrevoked node certificate; an admin
//! too for the reads); a method checks that the node a request names is the caller,
//! and that the network it names admits the caller (its `"Nodes"`; admins read any).

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Request, Response, Status};
use twill_common::model::Peer;
use twill_common::networks::NetworkName;
use twill_common::tls::Identity as CertIdentity;
use twill_proto::agent_service_server::{AgentService, AgentServiceServer};
use twill_proto::{
    AcquireRequest, AcquireResponse, GetNetworkConfigRequest, ListNetworksRequest,
    ListNetworksResponse, NetworkConfig, ReleaseRequest, ReleaseResponse, ReportAttachmentsRequest,
    ReportAttachmentsResponse, WatchRequest,
};

use super::auth::Authorized;
use super::limit::NodeLimiter;
use super::watch;
use crate::events::Networks;
use crate::leases::{unknown, AcquireParams, Leases};
use crate::networks::{Registry, ServedNetwork};

/// The agent service.
pub struct AgentApi {
    /// The networks served to agents.
    pub networks: Arc<Registry>,
    /// The lease writer.
    pub leases: Leases,
    /// The table, metrics, agent records and revocations (shared with watches).
    pub watch: watch::Sources,
    /// Per-node limit of lease writes.
    pub limiter: NodeLimiter,
    /// Per-node limit of pod reports.
    pub reports: NodeLimiter,
}

/// The network a request field names (empty: `default`), refused when it is not a name.
pub fn network_field(field: &str, value: &str) -> Result<NetworkName, Status> {
    NetworkName::from_wire(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

impl AgentApi {
    /// Network `name` as served, if the caller may use it: NOT_FOUND when none is
    /// served by that name, PERMISSION_DENIED (naming the rule) when its `"Nodes"` do
    /// not admit the calling node. Admins may read every network.
    fn network_for(&self, who: &CertIdentity, name: &NetworkName) -> Result<ServedNetwork, Status> {
        let served = self.networks.get(name).ok_or_else(|| unknown(name))?;
        if !who.is_admin() && !served.network.nodes.admits(&who.name) {
            tracing::warn!(node = %who.name, network = %name, "refused a node its network does not admit");
            return Err(Status::permission_denied(format!(
                "network {name} does not admit node {}: its file allows {}",
                who.name, served.network.nodes
            )));
        }
        Ok(served)
    }

    fn limit(&self, node: &str) -> Result<(), Status> {
        self.limiter.check(node).inspect_err(|_| {
            self.watch.metrics.rate_limited.inc();
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
        let who = Authorized::of(&req)?.cert()?;
        let name = network_field("network", &req.get_ref().network)?;
        let served = self.network_for(who, &name)?;
        Ok(Response::new(NetworkConfig {
            net_conf_json: served.network.conf.raw,
            name: name.to_string(),
        }))
    }

    async fn list_networks(
        &self,
        req: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        let who = Authorized::of(&req)?.cert()?;
        let networks = self
            .networks
            .current()
            .values()
            .filter(|s| !s.retired && s.network.nodes.admits(&who.name))
            .map(|s| NetworkConfig {
                net_conf_json: s.network.conf.raw.clone(),
                name: s.network.name.to_string(),
            })
            .collect();
        Ok(Response::new(ListNetworksResponse { networks }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let caller = Authorized::of(&req)?;
        let node = caller.acts_for(&req.get_ref().node_name)?;
        let key = caller.cert()?.key_sha256.to_vec();
        self.watch.agents.seen(&node);
        let network = network_field("network", &req.get_ref().network)?;
        let served = self.network_for(caller.cert()?, &network)?;
        let mut params =
            AcquireParams::parse(network, &served.network.conf, node.clone(), req.get_ref())?;
        params.key = key;
        // Checked once the request is known to be well formed: only what would reach the
        // lease writer counts.
        self.limit(&node)?;
        let mut lease = self.leases.acquire(params).await?;
        lease.holder_key.clear();
        Ok(Response::new(AcquireResponse {
            lease: Some(lease),
            ttl_seconds: self.leases.ttl().as_secs(),
        }))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let caller = Authorized::of(&req)?;
        let node = caller.acts_for(&req.get_ref().node_name)?;
        let key = caller.cert()?.key_sha256;
        self.watch.agents.seen(&node);
        let network = network_field("network", &req.get_ref().network)?;
        self.limit(&node)?;
        let released = self.leases.release(&network, &node, &key).await?;
        Ok(Response::new(ReleaseResponse { released }))
    }

    async fn report_attachments(
        &self,
        req: Request<ReportAttachmentsRequest>,
    ) -> Result<Response<ReportAttachmentsResponse>, Status> {
        let caller = Authorized::of(&req)?;
        let node = caller.acts_for(&req.get_ref().node_name)?;
        self.reports.check(&node).map_err(|_| {
            Status::resource_exhausted(format!(
                "node {node} reports its pods more often than once a second; retry later"
            ))
        })?;
        let hub = &self.watch.hub;
        let subnets = |network: &NetworkName| {
            let lease = hub.lease(network, &node)?;
            let parts = Peer::parts(&lease).ok()?;
            Some(parts.map(|_, p| p.subnet))
        };
        let count = self
            .watch
            .pods
            .report(&node, req.get_ref(), &subnets)
            .map_err(|e| {
                tracing::warn!(node = %node, error = %e, "pod report refused");
                Status::invalid_argument(e.to_string())
            })?;
        let (leaks, conflicts) = self.watch.pods.totals();
        self.watch.metrics.ipam_leaks.set(leaks as i64);
        self.watch.metrics.ipam_conflicts.set(conflicts as i64);
        tracing::debug!(node = %node, pods = count, "pods reported");
        let release = self.watch.pods.take_releases(&node);
        if !release.is_empty() {
            tracing::info!(node = %node, addresses = release.len(), "asking the node to release leaked pod addresses");
        }
        Ok(Response::new(ReportAttachmentsResponse { release }))
    }

    /// Empty: the messages leave pre-encoded, through the `WatchSlot` that
    /// `AgentRouter` put in the request (see there).
    type WatchStream = futures::stream::Empty<Result<twill_proto::WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = Authorized::of(&req)?.cert()?.clone();
        let slot = req
            .extensions()
            .get::<WatchSlot>()
            .cloned()
            .ok_or_else(|| Status::internal("Watch served without AgentRouter"))?;
        let networks = self.watched(&who, &req.get_ref().networks)?;
        let start = watch::Start {
            from: req.get_ref().from_revision,
            epoch: &req.get_ref().epoch,
        };
        *slot.0.lock() = Some(self.watch.encoded(&who, start, networks));
        Ok(Response::new(futures::stream::empty()))
    }
}

impl AgentApi {
    /// The networks a watch asks for (none: `default`), each one served and admitting
    /// the caller.
    fn watched(&self, who: &CertIdentity, names: &[String]) -> Result<Networks, Status> {
        if names.is_empty() {
            return Ok(Networks::default_only());
        }
        let mut networks = Vec::with_capacity(names.len());
        for n in names {
            let name = network_field("networks", n)?;
            self.network_for(who, &name)?;
            networks.push(name);
        }
        Ok(Networks::new(networks))
    }
}

/// Where `AgentApi::watch` leaves a watch's pre-encoded messages for `AgentRouter`.
#[derive(Clone, Default)]
struct WatchSlot(Arc<parking_lot::Mutex<Option<watch::EncodedStream>>>);

/// Largest request an agent may send: every agent request is a few short strings.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest response: watch messages hold at most `MAX_MESSAGE_BYTES` of events.
const MAX_RESPONSE_BYTES: usize = crate::events::MAX_MESSAGE_BYTES + (64 << 10);

/// `AgentServiceServer` with the Watch responses served pre-encoded: the hot path of a
/// 5,000-node fan-out. Every call, Watch included, goes through the generated server
/// and `AgentApi`; for a Watch this layer first puts a `WatchSlot` in the request, and
/// once `AgentApi::watch` has accepted the call (tonic has written the response headers,
/// or the refusal) it serves the slot's frames as the body (`WatchBody`: the bytes the
/// hub encoded once, shared by every watcher) instead of tonic's empty stream.
#[derive(Clone)]
pub struct AgentRouter {
    generated: AgentServiceServer<AgentApi>,
}

impl AgentRouter {
    /// Serves `api`.
    pub fn new(api: AgentApi) -> Self {
        AgentRouter {
            generated: AgentServiceServer::new(api)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        }
    }
}

impl tonic::server::NamedService for AgentRouter {
    const NAME: &'static str = twill_proto::agent_service_server::SERVICE_NAME;
}

impl<B> tower::Service<http::Request<B>> for AgentRouter
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/twill.v1.AgentService/Watch" {
            return Box::pin(self.generated.call(req));
        }
        let slot = WatchSlot::default();
        req.extensions_mut().insert(slot.clone());
        let call = self.generated.call(req);
        Box::pin(async move {
            let resp = call.await?;
            // No stream: the call was refused, and tonic's response says why.
            let stream = slot.0.lock().take();
            Ok(match stream {
                Some(stream) => {
                    let (parts, _) = resp.into_parts();
                    http::Response::from_parts(
                        parts,
                        tonic::body::Body::new(watch::body::WatchBody::new(stream)),
                    )
                }
                None => resp,
            })
        })
    }
}
