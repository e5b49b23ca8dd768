//! `twill.v1.AdminService`: what operators (twillctl) call. Admin certificates only:
//! `auth::AuthLayer` admitted the caller before any method here runs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tonic::{Request, Response, Status};
use twill_common::model::{parse_subnet, Family, Peer, PerFamily};
use twill_common::netconf::{BackendType, Pool, PoolNet};
use twill_common::networks::NetworkName;
use twill_common::NetConf;
use twill_proto::admin_service_server::AdminService;
use twill_proto::{
    CheckAddressesRequest, CheckAddressesResponse, CreateTokenRequest, CreateTokenResponse,
    DeleteTokenRequest, DeleteTokenResponse, ListAddressUsageRequest, ListAddressUsageResponse,
    ListIssuedCertificatesRequest, ListIssuedCertificatesResponse, ListPodsRequest,
    ListPodsResponse, ListTokensRequest, ListTokensResponse, ReleaseLeakedRequest,
    ReleaseLeakedResponse, RevokeNodeCertificatesRequest, RevokeNodeCertificatesResponse,
};
use twill_proto::{
    ConnectedAgent, GetConfigRequest, GetConfigResponse, GetLeaseRequest, Lease,
    ListAdminNetworksRequest, ListAdminNetworksResponse, ListLeasesRequest, ListLeasesResponse,
    ListReservationsRequest, ListReservationsResponse, NetworkInfo, OffLink, Reservation,
    ReserveRequest, ReserveResponse, RevokeLeaseRequest, RevokeLeaseResponse, StatusRequest,
    StatusResponse, UnreserveRequest, UnreserveResponse, WatchRequest,
};

use super::agent::network_field;
use super::auth::Authorized;
use super::watch;
use crate::events::Networks;
use crate::leases::{unknown, Leases};
use crate::networks::Registry;
use crate::store::{LeaseKey, Reservation as StoredReservation, Store};

/// The admin service.
pub struct AdminApi {
    /// The networks served.
    pub networks: Arc<Registry>,
    /// The lease writer.
    pub leases: Leases,
    /// The table, metrics, agent records, tokens and issued certificates.
    pub watch: watch::Sources,
    /// The store (for its size).
    pub store: Arc<dyn Store>,
    /// This replica, with the etcd store (`None` with sled).
    pub replica: Option<Arc<crate::replica::Replica>>,
}

impl AdminApi {
    /// Every registered replica, and the agents of the others (this one's are read
    /// locally), asked of each with the admin's certificate.
    async fn replicas(
        &self,
        me: &crate::replica::Replica,
        req: &Request<StatusRequest>,
    ) -> (Vec<twill_proto::Replica>, Vec<ConnectedAgent>) {
        use crate::replica::forward::{FORWARDED_BY, FORWARDED_CERT};
        let (leader, here) = (me.leader(), &me.settings.advertise_url);
        let mut urls = me.replicas().await.unwrap_or_default();
        if !urls.contains(here) {
            urls.push(here.clone());
            urls.sort();
        }
        let admin_cert: Option<String> = Authorized::of(req)
            .ok()
            .filter(|c| !c.chain.is_empty())
            .map(|c| crate::replica::forward::encode_chain(&c.chain));
        let mut replicas = Vec::new();
        let mut agents = Vec::new();
        for url in urls {
            let mut replica = twill_proto::Replica {
                leader: leader.as_deref() == Some(url.as_str()),
                url: url.clone(),
                ..Default::default()
            };
            if url == *here {
                replica.agents = self.watch.agents.watchers().len() as u32;
                replicas.push(replica);
                continue;
            }
            let asked = async {
                let channel = me.peer(&url)?;
                let mut call = Request::new(StatusRequest {
                    this_replica_only: true,
                    ..Default::default()
                });
                let meta = call.metadata_mut();
                meta.insert(
                    FORWARDED_BY,
                    here.parse().map_err(|_| "bad URL".to_string())?,
                );
                if let Some(cert) = &admin_cert {
                    meta.insert(
                        FORWARDED_CERT,
                        cert.parse().map_err(|_| "bad cert".to_string())?,
                    );
                }
                call.set_timeout(std::time::Duration::from_secs(2));
                twill_proto::admin_service_client::AdminServiceClient::new(channel)
                    .status(call)
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| s.message().to_string())
            }
            .await;
            match asked {
                Ok(status) => {
                    replica.agents = status.agents.len() as u32;
                    agents.extend(status.agents);
                }
                Err(e) => {
                    me.forget_peer(&url);
                    replica.error = e;
                }
            }
            replicas.push(replica);
        }
        (replicas, agents)
    }
}

/// The node and network a pod listing is narrowed to (empty: every one).
fn pod_filters(
    node: &str,
    network: &str,
) -> Result<(Option<twill_common::model::NodeName>, Option<NetworkName>), Status> {
    let node = match node {
        "" => None,
        n => Some(
            twill_common::model::NodeName::new(n)
                .map_err(|e| Status::invalid_argument(format!("node_name: {e}")))?,
        ),
    };
    let network = match network {
        "" => None,
        n => Some(network_field("network", n)?),
    };
    Ok((node, network))
}

fn node_arg(name: &str) -> Result<&str, Status> {
    twill_common::model::validate_node_name(name)
        .map_err(|e| Status::invalid_argument(format!("node_name: {e}")))?;
    Ok(name)
}

impl AdminApi {
    /// Whether a node holds a lease in a network now (a node's pods leave with it).
    fn holds_lease(&self) -> impl Fn(&twill_common::model::NodeName, &NetworkName) -> bool + '_ {
        |n, net| self.watch.hub.lease(net, n).is_some()
    }

    fn mark_reserved(&self, network: &NetworkName, mut leases: Vec<Lease>) -> Vec<Lease> {
        let reservations = self.watch.hub.reservations();
        for l in &mut leases {
            let key = (network.clone(), l.node_name.clone());
            l.reserved = reservations.get(&key).is_some_and(|r| holds(l, r));
        }
        leases
    }

    /// The configuration of `network` (served now, or retired), NOT_FOUND otherwise.
    fn conf(&self, network: &NetworkName) -> Result<NetConf, Status> {
        let served = self.networks.get(network);
        served
            .map(|s| s.network.conf)
            .ok_or_else(|| unknown(network).into())
    }
}

/// A pool's network, subnet length and bounds as `GetConfigResponse` carries them
/// (empty and 0 for a family the network does not have).
fn pool_fields<N: PoolNet>(p: Option<&Pool<N>>) -> (String, u32, String, String) {
    p.map_or_else(Default::default, |p| {
        (
            p.network.to_string(),
            p.subnet_len.into(),
            p.subnet_min.to_string(),
            p.subnet_max.to_string(),
        )
    })
}

/// Subnets in a network: those of its first family's pool, IPv4, or IPv6 on an IPv6-only
/// network (on a dual-stack one every lease holds a subnet of each).
fn subnets_total(conf: &NetConf) -> u32 {
    let first = conf.ipv4.as_ref().map(|p| p.count());
    first
        .or_else(|| conf.ipv6.as_ref().map(|p| p.count()))
        .unwrap_or(0)
}

/// The entries of `network` in a map of every network's, by node name.
fn of_network<V>(all: BTreeMap<LeaseKey, V>, network: &NetworkName) -> BTreeMap<String, V> {
    all.into_iter()
        .filter(|((n, _), _)| n == network)
        .map(|((_, node), v)| (node, v))
        .collect()
}

/// Whether `l` holds the subnets `r` reserves.
fn holds(l: &Lease, r: &StoredReservation) -> bool {
    let held = Peer::parts(l).unwrap_or_default().map(|_, p| p.subnet);
    let reserved = r.0;
    !reserved.is_empty() && reserved.iter().all(|(f, s)| held.get(f) == Some(s))
}

/// A reservation's subnet of `family` as the request writes it (empty: none).
fn reserved_part(family: Family, text: &str) -> Result<Option<IpNet>, Status> {
    match text {
        "" => Ok(None),
        s => parse_subnet(family, s)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("{}: {e}", family.wire().subnet))),
    }
}

fn reservation_message(
    network: &NetworkName,
    node: &str,
    r: StoredReservation,
    stale: String,
) -> Reservation {
    Reservation {
        network: network.wire().to_string(),
        node_name: node.to_string(),
        subnet: r.0.v4.map(|s| s.to_string()).unwrap_or_default(),
        ipv6_subnet: r.0.v6.map(|s| s.to_string()).unwrap_or_default(),
        stale,
    }
}

/// host-gw: for each node whose underlay subnet is known, the peers whose public address
/// lies outside it (the agent programs no route to them and says so in its log and
/// metrics; this is the same judgement made centrally). Nodes on one subnet share the
/// answer, so each distinct subnet is worked out once.
fn off_link(leases: &[Lease]) -> Vec<OffLink> {
    // The address the prefix length belongs to: IPv4, or IPv6 on an IPv6-only network.
    let addr = |l: &Lease| {
        l.public_ip
            .parse::<IpAddr>()
            .or_else(|_| l.public_ipv6.parse())
            .ok()
    };
    let mut by_subnet: BTreeMap<IpNet, Vec<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for l in leases {
        let Some(net) = addr(l).and_then(|ip| {
            let len = u8::try_from(l.public_ip_prefix_len)
                .ok()
                .filter(|n| *n > 0)?;
            IpNet::new(ip, len).ok().map(|n| n.trunc())
        }) else {
            continue;
        };
        let peers = by_subnet.entry(net).or_insert_with(|| {
            leases
                .iter()
                .filter(|p| addr(p).is_some_and(|ip| !net.contains(&ip)))
                .map(|p| p.node_name.clone())
                .collect()
        });
        if !peers.is_empty() {
            out.push(OffLink {
                node: l.node_name.clone(),
                underlay: net.to_string(),
                peers: peers.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_leases(
        &self,
        req: Request<ListLeasesRequest>,
    ) -> Result<Response<ListLeasesResponse>, Status> {
        let r = req.into_inner();
        let network = network_field("network", &r.network)?;
        let within: Option<IpNet> = match r.subnet.as_str() {
            "" => None,
            s => Some(
                s.parse::<IpNet>()
                    .map_err(|_| {
                        Status::invalid_argument(format!(
                            "subnet {s:?} is not a CIDR such as 10.244.0.0/16 or fd00:10:244::/56"
                        ))
                    })?
                    .trunc(),
            ),
        };
        // A lease is within when its subnet of the filter's family is.
        let keep = |l: &Lease| {
            l.node_name.starts_with(r.node_prefix.as_str())
                && within.is_none_or(|w| {
                    [&l.subnet, &l.ipv6_subnet]
                        .into_iter()
                        .filter_map(|s| s.parse::<IpNet>().ok())
                        .any(|s| w.contains(&s))
                })
        };
        let (leases, more, revision) =
            self.watch
                .hub
                .page(&network, &r.page_token, r.page_size as usize, keep);
        let next_page_token = match (more, leases.last()) {
            (true, Some(last)) => last.node_name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(ListLeasesResponse {
            leases: self.mark_reserved(&network, leases),
            revision,
            next_page_token,
        }))
    }

    async fn get_lease(&self, req: Request<GetLeaseRequest>) -> Result<Response<Lease>, Status> {
        let node = node_arg(&req.get_ref().node_name)?;
        let network = network_field("network", &req.get_ref().network)?;
        let lease = self.watch.hub.lease(&network, node).ok_or_else(|| {
            Status::not_found(format!("node {node:?} holds no lease in network {network}"))
        })?;
        Ok(Response::new(
            self.mark_reserved(&network, vec![lease]).remove(0),
        ))
    }

    async fn revoke_lease(
        &self,
        req: Request<RevokeLeaseRequest>,
    ) -> Result<Response<RevokeLeaseResponse>, Status> {
        let admin = Authorized::of(&req)?.cert()?.name.clone();
        let node = node_arg(&req.get_ref().node_name)?;
        let network = network_field("network", &req.get_ref().network)?;
        let before = self.watch.hub.lease(&network, node);
        if !self.leases.revoke(&network, node, &admin).await? {
            return Err(Status::not_found(format!(
                "node {node:?} holds no lease in network {network}"
            )));
        }
        Ok(Response::new(RevokeLeaseResponse { lease: before }))
    }

    async fn reserve(
        &self,
        req: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        let r = req.get_ref();
        let node = node_arg(&r.node_name)?;
        let subnet = StoredReservation(PerFamily::new(
            reserved_part(Family::V4, &r.subnet)?,
            reserved_part(Family::V6, &r.ipv6_subnet)?,
        ));
        let network = network_field("network", &r.network)?;
        self.leases.reserve(&network, node, subnet).await?;
        Ok(Response::new(ReserveResponse {
            reservation: Some(reservation_message(&network, node, subnet, String::new())),
        }))
    }

    async fn unreserve(
        &self,
        req: Request<UnreserveRequest>,
    ) -> Result<Response<UnreserveResponse>, Status> {
        let node = node_arg(&req.get_ref().node_name)?;
        let network = network_field("network", &req.get_ref().network)?;
        let key = (network.clone(), node.to_string());
        let subnet = self.watch.hub.reservations().get(&key).copied();
        match subnet {
            Some(subnet) if self.leases.unreserve(&network, node).await? => {
                Ok(Response::new(UnreserveResponse {
                    reservation: Some(reservation_message(&network, node, subnet, String::new())),
                }))
            }
            _ => Err(Status::not_found(format!(
                "node {node:?} has no reservation in network {network}"
            ))),
        }
    }

    async fn list_reservations(
        &self,
        req: Request<ListReservationsRequest>,
    ) -> Result<Response<ListReservationsResponse>, Status> {
        let network = network_field("network", &req.get_ref().network)?;
        let mut stale = self.watch.hub.stale_reservations();
        let reservations = self
            .watch
            .hub
            .reservations()
            .into_iter()
            .filter(|((n, _), _)| *n == network)
            .map(|(key, r)| {
                let why = stale.remove(&key).unwrap_or_default();
                reservation_message(&network, &key.1, r, why)
            })
            .collect();
        Ok(Response::new(ListReservationsResponse { reservations }))
    }

    async fn get_config(
        &self,
        req: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        let network = network_field("network", &req.get_ref().network)?;
        let c = &self.conf(&network)?;
        let (network, subnet_len, subnet_min, subnet_max) = pool_fields(c.ipv4.as_ref());
        let (ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) =
            pool_fields(c.ipv6.as_ref());
        Ok(Response::new(GetConfigResponse {
            net_conf_json: c.raw.clone(),
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend_type: c.backend.kind.as_str().into(),
            vni: c.backend.vni,
            port: c.backend.port.into(),
            mtu: c.backend.mtu.unwrap_or(0),
            direct_routing: c.backend.direct_routing,
            lease_ttl_seconds: self.leases.ttl().as_secs(),
            ipv6_network,
            ipv6_subnet_len,
            ipv6_subnet_min,
            ipv6_subnet_max,
        }))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let replicas = match &self.replica {
            Some(r) if !req.get_ref().this_replica_only => Some(self.replicas(r, &req).await),
            _ => None,
        };
        // The counts are of one network (`twillctl networks` has every one's).
        let network = network_field("network", &req.get_ref().network)?;
        let conf = self.conf(&network)?;
        let (leases, _, revision) = self.watch.hub.page(&network, "", 0, |_| true);
        let reservations = of_network(self.watch.hub.reservations(), &network);
        let stale = of_network(self.watch.hub.stale_reservations(), &network);
        let total = subnets_total(&conf);
        let used = leases.len() as u32;
        // A reservation held by its own node's lease takes one subnet, not two; a stale
        // one takes none of its own.
        let reserved_idle = reservations
            .iter()
            .filter(|(node, s)| {
                !stale.contains_key(*node)
                    && self
                        .watch
                        .hub
                        .lease(&network, node)
                        .is_none_or(|l| !holds(&l, s))
            })
            .count() as u32;
        let here = self.replica.as_ref().map(|r| &r.settings.advertise_url);
        let mut agents: Vec<ConnectedAgent> = self
            .watch
            .agents
            .watchers()
            .into_iter()
            .map(|w| ConnectedAgent {
                last_seen_unix: self
                    .watch
                    .agents
                    .last_seen(&w.name)
                    .unwrap_or(w.connected_at),
                revision_lag: revision.saturating_sub(w.revision),
                name: w.name,
                connected_at_unix: w.connected_at,
                revision: w.revision,
                cert_not_after_unix: w.cert_not_after,
                replica: here.cloned().unwrap_or_default(),
            })
            .collect();
        let (replicas, others) = replicas.unwrap_or_default();
        agents.extend(others);
        agents.sort_by(|a, b| a.name.cmp(&b.name).then(a.replica.cmp(&b.replica)));
        Ok(Response::new(StatusResponse {
            subnets_total: total,
            subnets_used: used,
            subnets_free: total.saturating_sub(used + reserved_idle),
            subnets_reserved: reservations.len() as u32,
            agents,
            revision,
            store_size_bytes: self.store.size_on_disk(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            reservations_stale: stale.len() as u32,
            replicas,
            off_link: match conf.backend.kind {
                BackendType::HostGw => off_link(&leases),
                BackendType::Vxlan => Vec::new(),
            },
        }))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let admin = Authorized::of(&req)?.cert()?.name.clone();
        let r = req.get_ref();
        let ttl = std::time::Duration::from_secs(r.ttl_seconds);
        let (token, info) = self
            .watch
            .identity
            .create_token(
                ttl,
                &r.description,
                crate::identity::TokenBinding {
                    nodes: r.nodes.clone(),
                    node_prefix: r.node_prefix.clone(),
                    max_uses: r.max_uses,
                },
            )
            .await?;
        tracing::info!(admin = %admin, token_id = %info.id, "bootstrap token made");
        Ok(Response::new(CreateTokenResponse {
            token,
            info: Some(info),
        }))
    }

    async fn list_tokens(
        &self,
        _req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self.watch.identity.list_tokens().await?;
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn delete_token(
        &self,
        req: Request<DeleteTokenRequest>,
    ) -> Result<Response<DeleteTokenResponse>, Status> {
        self.watch.identity.delete_token(&req.get_ref().id).await?;
        Ok(Response::new(DeleteTokenResponse {}))
    }

    async fn list_issued_certificates(
        &self,
        req: Request<ListIssuedCertificatesRequest>,
    ) -> Result<Response<ListIssuedCertificatesResponse>, Status> {
        let r = req.get_ref();
        let (certificates, next_page_token) = self
            .watch
            .identity
            .issued(r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(ListIssuedCertificatesResponse {
            certificates,
            next_page_token,
        }))
    }

    async fn revoke_node_certificates(
        &self,
        req: Request<RevokeNodeCertificatesRequest>,
    ) -> Result<Response<RevokeNodeCertificatesResponse>, Status> {
        let admin = Authorized::of(&req)?.cert()?.name.clone();
        let node = node_arg(&req.get_ref().node_name)?;
        let as_admin = match req.get_ref().role.as_str() {
            "" | "node" => false,
            "admin" => true,
            other => {
                return Err(Status::invalid_argument(format!(
                    "role {other:?}: give \"node\" or \"admin\""
                )))
            }
        };
        let revoked_at_unix = self.watch.identity.revoke(node, as_admin).await?;
        if !as_admin {
            // The revoked key no longer holds the node's lease: the node's next
            // certificate (bootstrapped after this) may take it over.
            self.leases.disown(node).await?;
        }
        tracing::info!(admin = %admin, name = %node, role = if as_admin { "admin" } else { "node" }, "certificates revoked by an operator");
        Ok(Response::new(RevokeNodeCertificatesResponse {
            revoked_at_unix,
        }))
    }

    async fn check_addresses(
        &self,
        req: Request<CheckAddressesRequest>,
    ) -> Result<Response<CheckAddressesResponse>, Status> {
        let r = req.get_ref();
        let (node, network) = pod_filters(&r.node_name, &r.network)?;
        let holds = self.holds_lease();
        let findings = self
            .watch
            .pods
            .check(node.as_ref(), network.as_ref(), &holds);
        Ok(Response::new(CheckAddressesResponse { findings }))
    }

    async fn release_leaked(
        &self,
        req: Request<ReleaseLeakedRequest>,
    ) -> Result<Response<ReleaseLeakedResponse>, Status> {
        let admin = Authorized::of(&req)?.cert()?.name.clone();
        let r = req.get_ref();
        let (node, network) = pod_filters(&r.node_name, &r.network)?;
        let asked = self
            .watch
            .pods
            .release_leaked(node.as_ref(), network.as_ref());
        tracing::info!(admin = %admin, addresses = asked.len(), "release of leaked pod addresses asked");
        Ok(Response::new(ReleaseLeakedResponse { asked }))
    }

    async fn list_address_usage(
        &self,
        req: Request<ListAddressUsageRequest>,
    ) -> Result<Response<ListAddressUsageResponse>, Status> {
        let r = req.get_ref();
        let (node, network) = pod_filters(&r.node_name, &r.network)?;
        let (leases, _) = self.watch.hub.leases();
        let usage = self
            .watch
            .pods
            .usage(&leases, node.as_ref(), network.as_ref());
        Ok(Response::new(ListAddressUsageResponse { usage }))
    }

    async fn list_pods(
        &self,
        req: Request<ListPodsRequest>,
    ) -> Result<Response<ListPodsResponse>, Status> {
        let r = req.get_ref();
        let (node, network) = pod_filters(&r.node_name, &r.network)?;
        let holds = self.holds_lease();
        let pods = self
            .watch
            .pods
            .list(node.as_ref(), network.as_ref(), &holds);
        Ok(Response::new(ListPodsResponse { pods }))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = Authorized::of(&req)?.cert()?.clone();
        let r = req.get_ref();
        let networks = if r.networks.is_empty() {
            Networks::default_only()
        } else {
            let names: Result<Vec<NetworkName>, Status> = r
                .networks
                .iter()
                .map(|n| network_field("networks", n))
                .collect();
            Networks::new(names?)
        };
        let start = watch::Start {
            from: r.from_revision,
            epoch: &r.epoch,
        };
        Ok(Response::new(watch::decoded(
            self.watch.encoded(&who, start, networks),
        )))
    }

    async fn list_networks(
        &self,
        _req: Request<ListAdminNetworksRequest>,
    ) -> Result<Response<ListAdminNetworksResponse>, Status> {
        let counts = self.watch.hub.counts();
        let reservations = self.watch.hub.reservations();
        let networks = self
            .networks
            .current()
            .values()
            .map(|s| {
                let conf = &s.network.conf;
                let leases = counts.get(&s.network.name).copied().unwrap_or(0) as u32;
                let reserved_idle = reservations
                    .keys()
                    .filter(|(n, node)| {
                        *n == s.network.name && self.watch.hub.lease(n, node).is_none()
                    })
                    .count() as u32;
                let total = subnets_total(conf);
                NetworkInfo {
                    name: s.network.name.to_string(),
                    ipv4_network: conf.network4().map(|n| n.to_string()).unwrap_or_default(),
                    ipv6_network: conf.network6().map(|n| n.to_string()).unwrap_or_default(),
                    backend_type: conf.backend.kind.as_str().into(),
                    vni: s.network.vni().unwrap_or(0),
                    nodes: s.network.nodes.patterns().to_vec(),
                    leases,
                    subnets_free: total.saturating_sub(leases + reserved_idle),
                    subnets_total: total,
                    retired: s.retired,
                    net_conf_json: conf.raw.clone(),
                }
            })
            .collect();
        Ok(Response::new(ListAdminNetworksResponse { networks }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_link_lists_the_peers_outside_each_nodes_underlay_subnet() {
        let lease = |node: &str, ip: &str, len: u32| Lease {
            node_name: node.into(),
            public_ip: ip.into(),
            public_ip_prefix_len: len,
            ..Default::default()
        };
        let leases = [
            lease("a", "198.18.3.1", 24),
            lease("b", "198.18.3.2", 24),
            lease("c", "192.0.2.1", 24),
            lease("old", "198.18.3.9", 0),
        ];
        let got: Vec<(String, String, Vec<String>)> = off_link(&leases)
            .into_iter()
            .map(|o| (o.node, o.underlay, o.peers))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), "198.18.3.0/24".into(), vec!["c".to_string()]),
                ("b".into(), "198.18.3.0/24".into(), vec!["c".to_string()]),
                (
                    "c".into(),
                    "192.0.2.0/24".into(),
                    vec!["a".to_string(), "b".into(), "old".into()]
                ),
            ],
            "a node of unknown subnet ('old', an older agent) is judged only as a peer"
        );
        assert!(off_link(&leases[..2]).is_empty());
    }
}
