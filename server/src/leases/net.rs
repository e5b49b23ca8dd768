//! One network's part of the lease table: its leases, the subnets each family holds
//! and keeps for reservations, and the VTEP MAC index. Here a lease is allocated,
//! renewed, released and expired; the writer (`super`) batches the operations of every
//! network, stores them together and numbers their events in one sequence.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ipnet::IpNet;
use tracing::{info, warn};
use twill_common::model::{self, validate_node_name, Family, Mac, Peer, PerFamily};
use twill_common::networks::NetworkName;
use twill_common::NetConf;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

use super::{AcquireParams, LeaseOpError};
use crate::store::Reservation;
use crate::subnets::{self, FamilySubnets, Refusal};

/// What one batch changed, to be written to the store as one.
#[derive(Default)]
pub(super) struct Changes {
    pub(super) events: Vec<LeaseEvent>,
    pub(super) renewed: Vec<Lease>,
    pub(super) reservations: bool,
}

impl Changes {
    /// Stores `lease` as renewed, in place of an earlier renewal of it in the batch.
    fn renew(&mut self, lease: Lease) {
        self.renewed
            .retain(|r| !(r.node_name == lease.node_name && r.network == lease.network));
        self.renewed.push(lease);
    }
}

/// The writer's clock and counter, lent to one acquisition.
pub(super) struct Clock<'a> {
    pub(super) now: i64,
    pub(super) ttl: Duration,
    pub(super) revision: &'a mut u64,
}

/// The next revision of the one sequence every network's events share.
fn next(revision: &mut u64) -> u64 {
    *revision += 1;
    *revision
}

/// What a network without `family` lacks, for refusals.
fn missing(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4 (EnableIPv4 is false)",
        Family::V6 => "IPv6 (EnableIPv6 is not set)",
    }
}

/// One network's leases and subnets.
pub(super) struct Net {
    pub(super) name: NetworkName,
    /// Its configuration; `None` for a network the store holds leases of that is not
    /// configured (its file is gone or was refused at start): its leases run out.
    pub(super) conf: Option<NetConf>,
    /// Its file was removed: no new leases or renewals, existing ones run out.
    pub(super) retired: bool,
    /// Each family's subnets, present exactly when the network has the family.
    subnets: PerFamily<Box<dyn FamilySubnets>>,
    pub(super) leases: BTreeMap<String, model::Lease>,
    /// The node holding each VTEP MAC (both devices' MACs share one index: no MAC may
    /// name two nodes).
    by_mac: HashMap<Mac, String>,
}

impl Net {
    /// An empty network (`load_reservations` and `rebuild` fill it).
    pub(super) fn new(name: NetworkName, conf: Option<NetConf>, retired: bool) -> Self {
        Net {
            name,
            conf,
            retired,
            subnets: PerFamily::default(),
            leases: BTreeMap::new(),
            by_mac: HashMap::new(),
        }
    }

    /// Takes the reservations (as the store holds them) for the next `rebuild`. A
    /// part for a family the network does not have cannot be honoured and is dropped
    /// (the store layout pins the families, so only a hand-edited store holds one).
    pub(super) fn load_reservations(&mut self, all: &[(String, Reservation)]) {
        let Some(conf) = &self.conf else {
            self.subnets = PerFamily::default();
            return;
        };
        let parts: Vec<(String, PerFamily<IpNet>)> =
            all.iter().map(|(node, r)| (node.clone(), r.0)).collect();
        let networks = conf.networks();
        for (node, p) in &parts {
            for (family, s) in p.iter().filter(|(f, _)| !networks.has(*f)) {
                warn!(network = %self.name, node = %node, subnet = %s, "dropping a stored {family} reservation: the network has no {family}");
            }
        }
        let of = |family: Family| {
            parts
                .iter()
                .filter_map(move |(node, p)| p.get(family).map(|s| (node.clone(), *s)))
        };
        self.subnets = PerFamily::new(
            conf.ipv4
                .clone()
                .map(|pool| subnets::family(pool, of(Family::V4))),
            conf.ipv6
                .clone()
                .map(|pool| subnets::family(pool, of(Family::V6))),
        );
    }

    /// Rebuilds the lease map, its indexes and the free-subnet indexes from `leases` and
    /// the reservations; reservations that cannot be honoured are recorded as stale.
    pub(super) fn rebuild(&mut self, leases: Vec<Lease>) -> Result<(), String> {
        for (_, f) in self.subnets.iter_mut() {
            f.reset();
        }
        self.leases.clear();
        self.by_mac.clear();
        // Every lease holds a subnet of the network's first family; an IPv6 subnet is
        // optional on a dual-stack network (a lease granted before the network had IPv6
        // gets one at its next renewal).
        let first = self.subnets.iter().next().map(|(f, _)| f);
        for stored in leases {
            let l = model::Lease::try_from(&stored).map_err(|e| {
                format!(
                    "stored lease of {} in network {} cannot be read ({e}); restore the \
                     previous net-conf.json or move the data directory aside to start a new \
                     network",
                    stored.node_name, self.name
                )
            })?;
            for (family, f) in self.subnets.iter_mut() {
                match l.parts.get(family) {
                    Some(p) => f.restore(&l.node, p.subnet)?,
                    None if Some(family) == first => {
                        return Err(format!(
                            "stored lease of {} in network {} has no {family} subnet, which \
                             the configured network needs; restore the previous net-conf.json \
                             or move the data directory aside to start a new network",
                            l.node, self.name
                        ))
                    }
                    None => {}
                }
            }
            for m in l.macs() {
                if let Some(other) = self.by_mac.get(&m) {
                    warn!(network = %self.name, node = %l.node, other = %other, vtep_mac = %m, "stored leases share a VTEP MAC; the next acquisition of either must change it");
                }
            }
            self.index_macs(&l);
            self.leases.insert(l.node.to_string(), l);
        }
        for (_, f) in self.subnets.iter_mut() {
            f.honour_reservations();
        }
        Ok(())
    }

    /// Every reservation, both families of a node together.
    pub(super) fn reservations(&self) -> BTreeMap<String, Reservation> {
        let mut all: BTreeMap<String, Reservation> = BTreeMap::new();
        for (node, s) in self.subnets.values().flat_map(|f| f.reservations()) {
            *all.entry(node).or_default().0.slot(Family::of_net(s)) = Some(s);
        }
        all
    }

    /// True when a family's reservation view moved since the last call (every family's
    /// flag is taken: no short circuit).
    pub(super) fn take_changed(&mut self) -> bool {
        self.subnets
            .iter_mut()
            .fold(false, |moved, (_, f)| f.take_changed() | moved)
    }

    /// Why some reservations cannot be honoured now, by node (the families' reasons
    /// joined).
    pub(super) fn stale(&self) -> BTreeMap<String, String> {
        let mut stale: BTreeMap<String, String> = BTreeMap::new();
        for (node, why) in self.subnets.values().flat_map(|f| f.stale()) {
            stale
                .entry(node.clone())
                .and_modify(|w| {
                    w.push_str("; ");
                    w.push_str(why);
                })
                .or_insert_with(|| why.clone());
        }
        stale
    }

    /// Subnets of the first family: how many in all, how many taken.
    pub(super) fn capacity(&self) -> (u32, u32) {
        self.subnets
            .first()
            .map_or((0, 0), |f| (f.capacity(), f.taken()))
    }

    fn index_macs(&mut self, l: &model::Lease) {
        for m in l.macs() {
            self.by_mac.entry(m).or_insert_with(|| l.node.to_string());
        }
    }

    fn unindex_macs(&mut self, l: &model::Lease) {
        for m in l.macs() {
            if self.by_mac.get(&m).is_some_and(|n| *n == *l.node) {
                self.by_mac.remove(&m);
            }
        }
    }

    /// Forgets a lease that ended: its MACs and its subnets go back.
    fn forget(&mut self, l: &model::Lease) {
        self.unindex_macs(l);
        for (family, f) in self.subnets.iter_mut() {
            if let Some(p) = l.parts.get(family) {
                f.free(p.subnet, &l.node);
            }
        }
    }

    pub(super) fn acquire(
        &mut self,
        p: AcquireParams,
        at: Clock,
        changes: &mut Changes,
    ) -> Result<Lease, LeaseOpError> {
        let Some(conf) = self.conf.as_ref().filter(|_| !self.retired) else {
            return Err(LeaseOpError::Retired(format!(
                "network {} is no longer configured (its file left --networks-dir): its \
                 leases are not renewed and run out; join another network, or put the file \
                 back",
                self.name
            )));
        };
        let (kind, vni) = (conf.backend.kind, conf.backend.vni);
        let now = at.now;
        for (family, r) in p.parts.iter() {
            if let (Some(f), Some(requested)) = (self.subnets.get(family), r.requested) {
                f.check_requested(family.wire().requested, requested)?;
            }
        }
        if let Some((mac, holder)) = p
            .macs()
            .find_map(|m| self.by_mac.get(&m).map(|h| (m, h)))
            .filter(|(_, h)| **h != *p.node)
        {
            warn!(network = %self.name, node = %p.node, vtep_mac = %mac, holder = %holder, "refused a lease whose VTEP MAC another node holds");
            return Err(LeaseOpError::AlreadyExists(format!(
                "vtep_mac {mac} is the VTEP MAC of node {holder}'s lease; every node's VXLAN device \
                 needs a MAC of its own (delete and recreate the device to get a new one)"
            )));
        }
        let expires = now.saturating_add(at.ttl.as_secs() as i64);
        let existing = self
            .leases
            .get(p.node.as_str())
            .filter(|l| l.expires_at_unix > now)
            .cloned();
        // Whose the lease is: the holder's, or nobody's yet (granted before holders
        // were kept, or its certificates revoked) and then the caller's from now on.
        let holder = match existing.as_ref().map(|l| &l.holder_key) {
            Some(h) if !h.is_empty() => h.clone(),
            _ => p.key.clone(),
        };
        let endpoints = p.parts.map(|_, r| (r.public_ip, r.vtep_mac));
        match &existing {
            Some(l)
                if l.parts.map(|_, x| (x.public_ip, x.vtep_mac)) == endpoints
                    && l.public_prefix_len == p.public_prefix_len =>
            {
                // Only the expiry moves: stored, but no revision and no broadcast. Any
                // certificate of the node may renew it unchanged (the holder stays).
                let mut renewed = l.clone();
                renewed.expires_at_unix = expires;
                renewed.holder_key = holder;
                let wire = Lease::from(&renewed);
                tracing::debug!(network = %self.name, node = %p.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, "lease renewed");
                self.leases.insert(p.node.to_string(), renewed);
                changes.renew(wire.clone());
                return Ok(wire);
            }
            Some(_) if holder != p.key => {
                warn!(network = %self.name, node = %p.node, "refused a change of the lease's address or VTEP MAC from a key that does not hold it");
                return Err(LeaseOpError::Forbidden(format!(
                    "the lease of node {} is held by another key: only the certificate that took \
                     it (or one renewed from it) may change its public address or VTEP MAC. If \
                     this node really lost its key, an admin can run `twillctl certs revoke {}` \
                     (or `twillctl lease revoke {}`)",
                    p.node, p.node, p.node
                )));
            }
            Some(_) => {}
            None => {
                // An expired lease not yet swept: give its subnets back first.
                if let Some(old) = self.leases.remove(p.node.as_str()) {
                    let old_wire = Lease::from(&old);
                    warn!(network = %self.name, node = %p.node, subnet = %old_wire.subnet, ipv6_subnet = %old_wire.ipv6_subnet, expired_secs_ago = now - old.expires_at_unix, "renewal missed: the lease had expired; granting again");
                    self.forget(&old);
                }
            }
        }
        let mut granted: PerFamily<(IpNet, bool)> = PerFamily::default();
        for (family, r) in p.parts.iter() {
            let Some(f) = self.subnets.get_mut(family) else {
                continue;
            };
            let held = existing
                .as_ref()
                .and_then(|l| l.parts.get(family))
                .map(|x| x.subnet);
            match grant(f.as_mut(), held, &p.node, r.requested) {
                Ok(g) => *granted.slot(family) = Some(g),
                Err(e) => {
                    // The families granted before give back what was picked for them.
                    for (family, (s, picked)) in granted.iter() {
                        if let (true, Some(f)) = (*picked, self.subnets.get_mut(family)) {
                            f.free(*s, &p.node);
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        let lease = model::Lease {
            network: self.name.clone(),
            node: p.node.clone(),
            parts: granted.zip(p.parts).map(|_, ((subnet, _), r)| Peer {
                subnet,
                public_ip: r.public_ip,
                vtep_mac: r.vtep_mac,
            }),
            backend: kind,
            vni,
            expires_at_unix: expires,
            revision: next(at.revision),
            reserved: false,
            public_prefix_len: p.public_prefix_len,
            holder_key: holder,
        };
        let wire = Lease::from(&lease);
        if existing.is_some() {
            info!(network = %self.name, node = %p.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, public_ip = %wire.public_ip, public_ipv6 = %wire.public_ipv6, vtep_mac = %wire.vtep_mac, revision = wire.revision, "lease renewed with a new address or VTEP MAC");
        } else {
            info!(network = %self.name, node = %p.node, subnet = %wire.subnet, ipv6_subnet = %wire.ipv6_subnet, public_ip = %wire.public_ip, public_ipv6 = %wire.public_ipv6, revision = wire.revision, "lease granted");
        }
        for (family, part) in lease.parts.iter() {
            if let Some(f) = self.subnets.get_mut(family) {
                f.hold(part.subnet, &p.node);
            }
        }
        if let Some(old) = self.leases.insert(p.node.to_string(), lease.clone()) {
            self.unindex_macs(&old);
        }
        self.index_macs(&lease);
        changes.events.push(LeaseEvent {
            r#type: EventType::Put as i32,
            lease: Some(wire.clone()),
            revision: wire.revision,
        });
        Ok(wire)
    }

    /// Releases `node`'s lease for a caller with certificate key `key`.
    pub(super) fn release(
        &mut self,
        node: &str,
        key: &[u8],
        revision: &mut u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<bool, LeaseOpError> {
        match self.leases.get(node) {
            Some(l) if !l.holder_key.is_empty() && l.holder_key != key => {
                warn!(network = %self.name, node = %node, "refused a release from a key that does not hold the lease");
                Err(LeaseOpError::Forbidden(format!(
                    "the lease of node {node} is held by another key: only the certificate that \
                     took it (or one renewed from it) may release it"
                )))
            }
            _ => Ok(self.remove(node, revision, events)),
        }
    }

    /// See `Op::Rekey`.
    pub(super) fn rekey(
        &mut self,
        node: &str,
        from: &[u8],
        to: Vec<u8>,
        changes: &mut Changes,
    ) -> bool {
        let Some(l) = self.leases.get_mut(node) else {
            return false;
        };
        if !from.is_empty() && l.holder_key != from {
            return false;
        }
        if l.holder_key == to {
            return true;
        }
        l.holder_key = to;
        changes.renew(Lease::from(&*l));
        true
    }

    pub(super) fn remove(
        &mut self,
        node: &str,
        revision: &mut u64,
        events: &mut Vec<LeaseEvent>,
    ) -> bool {
        let Some(lease) = self.leases.remove(node) else {
            return false;
        };
        self.forget(&lease);
        let mut wire = Lease::from(&lease);
        wire.revision = next(revision);
        events.push(LeaseEvent {
            r#type: EventType::Delete as i32,
            revision: wire.revision,
            lease: Some(wire),
        });
        true
    }

    pub(super) fn reserve(&mut self, node: &str, r: Reservation) -> Result<(), LeaseOpError> {
        validate_node_name(node).map_err(|e| LeaseOpError::Invalid(e.to_string()))?;
        let parts = r.0;
        if parts.is_empty() {
            return Err(LeaseOpError::Invalid(
                "no subnet to reserve: give an IPv4 subnet, an IPv6 subnet, or one of each".into(),
            ));
        }
        let own = self.leases.get(node);
        for (family, s) in parts.iter() {
            let Some(f) = self.subnets.get(family) else {
                return Err(LeaseOpError::Invalid(format!(
                    "cannot reserve {s}: network {} has no {}",
                    self.name,
                    missing(family)
                )));
            };
            let held = own.and_then(|l| l.parts.get(family)).map(|p| p.subnet);
            f.check_reserve(node, *s, held)?;
        }
        for (family, f) in self.subnets.iter_mut() {
            match parts.get(family) {
                Some(s) => f.reserve(node, *s),
                None => {
                    f.unreserve(node);
                }
            }
        }
        Ok(())
    }

    pub(super) fn unreserve(&mut self, node: &str) -> bool {
        // Every family's reservation goes (no short circuit).
        self.subnets
            .iter_mut()
            .fold(false, |done, (_, f)| f.unreserve(node).is_some() | done)
    }

    pub(super) fn sweep(&mut self, now: i64, revision: &mut u64, events: &mut Vec<LeaseEvent>) {
        let expired: Vec<(String, String)> = self
            .leases
            .values()
            .filter(|l| l.expires_at_unix <= now)
            .map(|l| {
                let first = l.parts.first().map(|p| p.subnet.to_string());
                (l.node.to_string(), first.unwrap_or_default())
            })
            .collect();
        for (node, subnet) in expired {
            info!(network = %self.name, node = %node, subnet = %subnet, "lease expired");
            self.remove(&node, revision, events);
        }
    }
}

/// The node's subnet of one family: the one its live lease holds (`held`, when the
/// family's index still names the node), else a new pick. The flag says whether it
/// was picked now (and must be freed if the grant fails).
fn grant(
    f: &mut dyn FamilySubnets,
    held: Option<IpNet>,
    node: &str,
    requested: Option<IpNet>,
) -> Result<(IpNet, bool), Refusal> {
    if let Some(s) = held.filter(|s| f.holder(*s) == Some(node)) {
        if let Some(r) = requested.filter(|r| *r != s) {
            info!(node = %node, subnet = %s, requested = %r, "node asked for another subnet; keeping the one it holds");
        }
        return Ok((s, false));
    }
    f.pick(node, requested).map(|s| (s, true))
}
