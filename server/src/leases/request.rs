//! What an agent asks for: an `AcquireRequest` from the wire, validated into a typed
//! request per family. Every error names the field (the allocation itself is the
//! writer's, in `super`).

use std::net::IpAddr;

use ipnet::IpNet;
use twill_common::model::{
    check_public_ip, parse_public_ip, parse_subnet, Family, Mac, NodeName, PerFamily,
};
use twill_common::netconf::BackendType;
use twill_common::networks::NetworkName;
use twill_common::NetConf;
use twill_proto::AcquireRequest;

use super::LeaseOpError;

/// What an agent asks for.
#[derive(Debug, Clone)]
pub struct AcquireParams {
    /// The network of the lease.
    pub network: NetworkName,
    /// The node (from its certificate).
    pub node: NodeName,
    /// One side per family of the network (exactly those).
    pub parts: PerFamily<FamilyRequest>,
    /// Prefix length of the node's underlay subnet (0: not known).
    pub public_prefix_len: u8,
    /// SHA-256 of the caller's certificate key (empty: not known, only in tests); see
    /// `Lease.holder_key`.
    pub key: Vec<u8>,
}

/// One family's side of an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyRequest {
    /// Subnet from the node's previous subnet.env, if any.
    pub requested: Option<IpNet>,
    /// The node's public address of this family.
    pub public_ip: IpAddr,
    /// The MAC of the node's VXLAN device of this family; `None` with host-gw.
    pub vtep_mac: Option<Mac>,
}

fn invalid(m: impl ToString) -> LeaseOpError {
    LeaseOpError::Invalid(m.to_string())
}

impl AcquireParams {
    /// Validates `req` for node `node` of network `network` (configured by `conf`);
    /// errors name the field. The fields of a family the network does not have are
    /// ignored (an agent of the previous version sends none).
    pub fn parse(
        network: NetworkName,
        conf: &NetConf,
        node: NodeName,
        req: &AcquireRequest,
    ) -> Result<Self, LeaseOpError> {
        let kind = conf.backend.kind;
        if !(req.backend_type.is_empty() || req.backend_type == kind.as_str()) {
            return Err(invalid(format!(
                "backend_type {:?} is not supported: this controller runs \"{kind}\"",
                req.backend_type
            )));
        }
        let parts = conf
            .networks()
            .try_map(|family, network| family_request(kind, family, network, req))?;
        if let (Some(m), Some(m6)) = (
            parts.v4.and_then(|v| v.vtep_mac),
            parts.v6.and_then(|v| v.vtep_mac),
        ) {
            if m == m6 {
                return Err(invalid(format!(
                    "vtep_mac_v6 {m6} is the MAC of the IPv4 device too; flannel.<VNI> and \
                     flannel-v6.<VNI> are two devices with a MAC each"
                )));
            }
        }
        let max = if parts.has(Family::V4) { 32 } else { 128 };
        let public_prefix_len = u8::try_from(req.public_ip_prefix_len)
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| {
                invalid(format!(
                    "public_ip_prefix_len {} is not a prefix length of the node's public address (0 to {max})",
                    req.public_ip_prefix_len
                ))
            })?;
        Ok(AcquireParams {
            network,
            node,
            parts,
            public_prefix_len,
            key: Vec::new(),
        })
    }

    /// The MACs this request claims, of every family.
    pub(super) fn macs(&self) -> impl Iterator<Item = Mac> + '_ {
        self.parts.values().filter_map(|r| r.vtep_mac)
    }
}

/// The request's side of `family`, whose pod network is `network`.
fn family_request(
    kind: BackendType,
    family: Family,
    network: IpNet,
    req: &AcquireRequest,
) -> Result<FamilyRequest, LeaseOpError> {
    let (requested, public_ip, vtep_mac) = match family {
        Family::V4 => (&req.requested_subnet, &req.public_ip, &req.vtep_mac),
        Family::V6 => (
            &req.requested_ipv6_subnet,
            &req.public_ipv6,
            &req.vtep_mac_v6,
        ),
    };
    let names = family.wire();
    if family == Family::V6 && public_ip.is_empty() {
        return Err(invalid(
            "public_ipv6 is empty, but this network has EnableIPv6: give the node's public \
             interface an IPv6 address, or start the agent with --public-ipv6 (an agent \
             older than dual-stack support cannot join this network)",
        ));
    }
    let requested = match requested.as_str() {
        "" => None,
        s => Some(
            parse_subnet(family, s).map_err(|e| invalid(format!("{}: {e}", names.requested)))?,
        ),
    };
    let public_ip = parse_public_ip(family, public_ip).map_err(invalid)?;
    check_public_ip(public_ip, network).map_err(invalid)?;
    // host-gw leases carry no backend data (flannel's neither), so a MAC sent anyway
    // names no device and is dropped.
    let vtep_mac = match kind {
        BackendType::HostGw => None,
        BackendType::Vxlan => {
            let mac: Mac = vtep_mac
                .parse()
                .map_err(|e| invalid(format!("{}: {e}", names.vtep_mac)))?;
            mac.check_unicast(names.vtep_mac).map_err(invalid)?;
            Some(mac)
        }
    };
    Ok(FamilyRequest {
        requested,
        public_ip,
        vtep_mac,
    })
}
