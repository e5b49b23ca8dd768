//! `twill.v1.AgentService`: what every agent calls.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use twill_common::NetConf;
use twill_proto::agent_service_server::AgentService;
use twill_proto::{
    AcquireRequest, AcquireResponse, GetNetworkConfigRequest, NetworkConfig, ReleaseRequest,
    ReleaseResponse, WatchRequest,
};

use super::{auth, watch};
use crate::events::Hub;
use crate::leases::{AcquireParams, Leases};
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
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn get_network_config(
        &self,
        req: Request<GetNetworkConfigRequest>,
    ) -> Result<Response<NetworkConfig>, Status> {
        auth::watcher(&req)?;
        Ok(Response::new(NetworkConfig {
            net_conf_json: self.conf.raw.clone(),
        }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let node = auth::node_caller(&req, &req.get_ref().node_name)?;
        let r = req.get_ref();
        self.agents.seen(&node);
        let params = AcquireParams::parse(
            &node,
            &r.requested_subnet,
            &r.public_ip,
            &r.backend_type,
            &r.vtep_mac,
        )?;
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
        let released = self.leases.release(&node).await?;
        Ok(Response::new(ReleaseResponse { released }))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = auth::watcher(&req)?.name;
        let from = req.get_ref().from_revision;
        Ok(Response::new(watch::stream(
            &self.hub,
            &self.metrics,
            &self.agents,
            who,
            from,
        )))
    }
}
