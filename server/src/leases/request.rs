//! What an agent asks for: the raw fields of an acquisition, validated into typed
//! per-family requests. Every error names the field (the allocation itself is the
//! writer's, in `super`).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use twill_common::lease::{
    check_public_ip, check_public_ipv6, parse_subnet, parse_subnet6, validate_node_name, Mac,
};
use twill_common::netconf::{BackendType, Ipv6Pool};
use twill_common::NetConf;

use super::LeaseOpError;

/// What an agent asks for.
#[derive(Debug, Clone)]
pub struct AcquireParams {
    /// The node (from its certificate).
    pub node: String,
    /// The IPv4 side, present exactly when the network has IPv4.
    pub v4: Option<FamilyRequest<Ipv4Net, Ipv4Addr>>,
    /// The IPv6 side, present exactly when the network has IPv6.
    pub v6: Option<FamilyRequest<Ipv6Net, Ipv6Addr>>,
    /// Prefix length of the node's underlay subnet (0: not known).
    pub public_prefix_len: u8,
    /// SHA-256 of the caller's certificate key (empty: not known, only in tests); see
    /// `Lease.holder_key`.
    pub key: Vec<u8>,
}

/// One family's side of an acquisition.
#[derive(Debug, Clone)]
pub struct FamilyRequest<N, A> {
    /// Subnet from the node's previous subnet.env, if any.
    pub requested: Option<N>,
    /// The node's public address of this family.
    pub public_ip: A,
    /// The MAC of the node's VXLAN device of this family; `None` with host-gw.
    pub vtep_mac: Option<Mac>,
}

/// The raw fields of an acquisition request, as the wire carries them.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcquireFields<'a> {
    /// `requested_subnet`.
    pub requested: &'a str,
    /// `public_ip`.
    pub public_ip: &'a str,
    /// `backend_type`.
    pub backend: &'a str,
    /// `vtep_mac`.
    pub vtep_mac: &'a str,
    /// `requested_ipv6_subnet`.
    pub requested_ipv6: &'a str,
    /// `public_ipv6`.
    pub public_ipv6: &'a str,
    /// `vtep_mac_v6`.
    pub vtep_mac_v6: &'a str,
    /// `public_ip_prefix_len`.
    pub public_prefix_len: u32,
}

impl AcquireParams {
    /// Validates the raw request fields for a node of `conf`'s network; errors name
    /// the field. The fields of a family the network does not have are ignored.
    pub fn parse(conf: &NetConf, node: &str, f: AcquireFields<'_>) -> Result<Self, LeaseOpError> {
        let invalid = |m: String| LeaseOpError::Invalid(m);
        validate_node_name(node).map_err(|e| invalid(e.to_string()))?;
        let kind = conf.backend.kind;
        if !(f.backend.is_empty() || f.backend == kind.as_str()) {
            return Err(invalid(format!(
                "backend_type {:?} is not supported: this controller runs \"{kind}\"",
                f.backend
            )));
        }
        let v4 = match &conf.ipv4 {
            Some(pool) => {
                let requested = match f.requested {
                    "" => None,
                    s => Some(
                        parse_subnet(s).map_err(|e| invalid(format!("requested_subnet: {e}")))?,
                    ),
                };
                let public_ip = f.public_ip.parse().map_err(|_| {
                    invalid(format!(
                        "public_ip {:?} is not an IPv4 address",
                        f.public_ip
                    ))
                })?;
                check_public_ip(public_ip, pool.network).map_err(|e| invalid(e.to_string()))?;
                Some(FamilyRequest {
                    requested,
                    public_ip,
                    vtep_mac: vtep_mac_of(kind, "vtep_mac", f.vtep_mac)?,
                })
            }
            None => None,
        };
        let v6 = match &conf.ipv6 {
            Some(pool) => Some(parse_v6(kind, pool, f)?),
            None => None,
        };
        if let (Some(m), Some(m6)) = (
            v4.as_ref().and_then(|v| v.vtep_mac),
            v6.as_ref().and_then(|v| v.vtep_mac),
        ) {
            if m == m6 {
                return Err(invalid(format!(
                    "vtep_mac_v6 {m6} is the MAC of the IPv4 device too; flannel.<VNI> and \
                     flannel-v6.<VNI> are two devices with a MAC each"
                )));
            }
        }
        let max = if v4.is_some() { 32 } else { 128 };
        let public_prefix_len = u8::try_from(f.public_prefix_len)
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| {
                invalid(format!(
                    "public_ip_prefix_len {} is not a prefix length of the node's public address (0 to {max})",
                    f.public_prefix_len
                ))
            })?;
        Ok(AcquireParams {
            node: node.to_string(),
            v4,
            v6,
            public_prefix_len,
            key: Vec::new(),
        })
    }

    /// The MACs this request claims, of both families.
    pub(super) fn macs(&self) -> impl Iterator<Item = Mac> + '_ {
        self.v4
            .as_ref()
            .and_then(|v| v.vtep_mac)
            .into_iter()
            .chain(self.v6.as_ref().and_then(|v| v.vtep_mac))
    }
}

fn parse_v6(
    kind: BackendType,
    pool: &Ipv6Pool,
    f: AcquireFields<'_>,
) -> Result<FamilyRequest<Ipv6Net, Ipv6Addr>, LeaseOpError> {
    let invalid = |m: String| LeaseOpError::Invalid(m);
    if f.public_ipv6.is_empty() {
        return Err(invalid(
            "public_ipv6 is empty, but this network has EnableIPv6: give the node's public \
             interface an IPv6 address, or start the agent with --public-ipv6 (an agent \
             older than dual-stack support cannot join this network)"
                .into(),
        ));
    }
    let requested = match f.requested_ipv6 {
        "" => None,
        s => Some(parse_subnet6(s).map_err(|e| invalid(format!("requested_ipv6_subnet: {e}")))?),
    };
    let public_ip: Ipv6Addr = f.public_ipv6.parse().map_err(|_| {
        invalid(format!(
            "public_ipv6 {:?} is not an IPv6 address",
            f.public_ipv6
        ))
    })?;
    check_public_ipv6(public_ip, pool.network).map_err(|e| invalid(e.to_string()))?;
    Ok(FamilyRequest {
        requested,
        public_ip,
        vtep_mac: vtep_mac_of(kind, "vtep_mac_v6", f.vtep_mac_v6)?,
    })
}

/// A VTEP MAC field: required and unicast with VXLAN; host-gw leases carry no backend
/// data (flannel's neither), so a MAC sent anyway names no device and is dropped.
fn vtep_mac_of(kind: BackendType, field: &str, text: &str) -> Result<Option<Mac>, LeaseOpError> {
    match kind {
        BackendType::HostGw => Ok(None),
        BackendType::Vxlan => {
            let mac: Mac = text
                .parse()
                .map_err(|e| LeaseOpError::Invalid(format!("{field}: {e}")))?;
            mac.check_unicast()
                .map_err(|e| LeaseOpError::Invalid(e.to_string().replacen("vtep_mac", field, 1)))?;
            Ok(Some(mac))
        }
    }
}
