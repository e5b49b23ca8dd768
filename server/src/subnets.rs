//! One address family's allocation policy: which node holds which subnet, which
//! subnets are reserved for whom (and which reservations cannot be honoured now), and
//! the free-subnet index under both. The lease writer keeps one per family of the
//! network (`PerFamily<Box<dyn FamilySubnets>>`) and asks each, through the same
//! calls, for a node's subnet of that family.
//!
//! The invariant kept here: a subnet's bit in the allocator is set exactly when a lease
//! holds it or a reservation that can be honoured keeps it, so `Allocator::allocate`
//! never hands out a subnet someone holds or has reserved.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use tracing::{info, warn};
use twill_common::netconf::{Pool, PoolNet};

use crate::alloc::Allocator;

/// Why a family's policy refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// The subnet is not one this pool hands out.
    #[error("{0}")]
    Invalid(String),
    /// Another node holds or has reserved it.
    #[error("{0}")]
    Conflict(String),
    /// No free subnet is left.
    #[error("{0}")]
    Exhausted(String),
}

/// One family's subnets, seen through `IpNet` so that one code path in the writer
/// serves every family. A subnet of another family is a caller's bug: it is never
/// held, and refused where a refusal can be said.
pub trait FamilySubnets: Send {
    /// Number of allocatable subnets.
    fn capacity(&self) -> u32;
    /// Number of subnets held or kept by a reservation.
    fn taken(&self) -> u32;
    /// Checks that `requested` is a node subnet of the pool's network (inside
    /// SubnetMin..SubnetMax or not: outside, the node is simply given another);
    /// `field` names it in the refusal.
    fn check_requested(&self, field: &str, requested: IpNet) -> Result<(), Refusal>;
    /// The reservations, by node.
    fn reservations(&self) -> Vec<(String, IpNet)>;
    /// Why some reservations cannot be honoured now, by node.
    fn stale(&self) -> &BTreeMap<String, String>;
    /// True once after the reservation view changed.
    fn take_changed(&mut self) -> bool;
    /// Forgets every holder and every taken bit, keeping the reservations (a rebuild
    /// from the store follows).
    fn reset(&mut self);
    /// Records the subnet of a stored lease; the error says why the store and the
    /// configured network disagree.
    fn restore(&mut self, node: &str, subnet: IpNet) -> Result<(), String>;
    /// After `restore`: keeps every reservation that can be honoured, records the
    /// others as stale.
    fn honour_reservations(&mut self);
    /// The node holding `subnet`, if a lease does.
    fn holder(&self, subnet: IpNet) -> Option<&str>;
    /// Records that `node`'s lease holds `subnet` (its bit is already taken).
    fn hold(&mut self, subnet: IpNet, node: &str);
    /// A subnet for `node`, which holds none of this family: its reservation when that
    /// can be honoured, else `requested` when free, else the next free one. Every path
    /// takes the subnet's bit; `hold` it once the lease is granted, or `free` it.
    fn pick(&mut self, node: &str, requested: Option<IpNet>) -> Result<IpNet, Refusal>;
    /// Returns a subnet that `node`'s lease held (or that `pick` took for it) to the
    /// pool, unless a reservation keeps it: for its own node or, when that reservation
    /// was stale because of this lease, for the node that reserved it (its reservation
    /// can be honoured from now on).
    fn free(&mut self, subnet: IpNet, node: &str);
    /// Whether `node` may reserve `subnet`; `own` is the subnet of this family its
    /// lease holds, if any. Checked for every family before any is changed.
    fn check_reserve(&self, node: &str, subnet: IpNet, own: Option<IpNet>) -> Result<(), Refusal>;
    /// Reserves `subnet` for `node` (after `check_reserve`), replacing the node's
    /// reservation of this family.
    fn reserve(&mut self, node: &str, subnet: IpNet);
    /// Drops `node`'s reservation of this family; the subnet it kept, if any.
    fn unreserve(&mut self, node: &str) -> Option<IpNet>;
}

/// The policy of `pool`, with `reservations` not yet honoured (`restore` the stored
/// leases, then `honour_reservations`).
pub fn family<N: PoolNet>(
    pool: Pool<N>,
    reservations: impl IntoIterator<Item = (String, IpNet)>,
) -> Box<dyn FamilySubnets> {
    let reservations = reservations
        .into_iter()
        .filter_map(|(node, s)| N::from_net(s).map(|s| (node, s)))
        .collect();
    Box::new(Subnets::new(pool, reservations))
}

/// One family's subnets.
struct Subnets<N> {
    pool: Pool<N>,
    alloc: Allocator<N>,
    /// The node whose lease holds each leased subnet.
    holders: HashMap<N, String>,
    reservations: BTreeMap<String, N>,
    /// The node each honoured reservation keeps its subnet for.
    reserved: HashMap<N, String>,
    /// Reservations that cannot be honoured now, and why.
    stale: BTreeMap<String, String>,
    /// The reservation view (honoured or stale) changed since `take_changed`.
    changed: bool,
}

impl<N: PoolNet> Subnets<N> {
    fn new(pool: Pool<N>, reservations: BTreeMap<String, N>) -> Self {
        Subnets {
            alloc: Allocator::new(&pool),
            pool,
            holders: HashMap::new(),
            reservations,
            reserved: HashMap::new(),
            stale: BTreeMap::new(),
            changed: false,
        }
    }

    /// Why `node`'s reservation of `subnet` cannot be honoured now, if it cannot.
    fn problem(&self, node: &str, subnet: N) -> Option<String> {
        if self.pool.index_of(subnet).is_none() {
            return Some(format!("{subnet} is outside {}", self.pool.range_text()));
        }
        if let Some(holder) = self.holders.get(&subnet).filter(|h| *h != node) {
            return Some(format!("{subnet} is leased to node {holder}"));
        }
        if let Some(other) = self.reserved.get(&subnet).filter(|o| *o != node) {
            return Some(format!("{subnet} is also reserved for node {other}"));
        }
        None
    }

    /// Stops keeping `subnet` for `node`: only an idle reservation's bit goes back, a
    /// leased subnet stays taken.
    fn release_reserved(&mut self, node: &str, subnet: N) {
        if self.reserved.get(&subnet).is_some_and(|n| n == node) {
            self.reserved.remove(&subnet);
            if !self.holders.contains_key(&subnet) {
                self.alloc.free(subnet);
            }
        }
    }

    /// `subnet` as this family's, or the refusal naming what it is not.
    fn typed(&self, subnet: IpNet) -> Result<N, Refusal> {
        N::from_net(subnet).ok_or_else(|| {
            Refusal::Invalid(format!(
                "{subnet} is not an {} subnet of {}",
                N::FAMILY,
                self.pool.network
            ))
        })
    }
}

impl<N: PoolNet> FamilySubnets for Subnets<N> {
    fn capacity(&self) -> u32 {
        self.alloc.capacity()
    }

    fn taken(&self) -> u32 {
        self.alloc.taken()
    }

    fn check_requested(&self, field: &str, requested: IpNet) -> Result<(), Refusal> {
        match N::from_net(requested) {
            Some(r) if self.pool.fits(r) => Ok(()),
            _ => Err(Refusal::Invalid(format!(
                "{field} {requested} is not a /{} subnet of {}Network {}",
                self.pool.subnet_len,
                N::KEY,
                self.pool.network
            ))),
        }
    }

    fn reservations(&self) -> Vec<(String, IpNet)> {
        self.reservations
            .iter()
            .map(|(node, s)| (node.clone(), (*s).into()))
            .collect()
    }

    fn stale(&self) -> &BTreeMap<String, String> {
        &self.stale
    }

    fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn reset(&mut self) {
        let reservations = std::mem::take(&mut self.reservations);
        *self = Subnets::new(self.pool.clone(), reservations);
    }

    fn restore(&mut self, node: &str, subnet: IpNet) -> Result<(), String> {
        let taken = N::from_net(subnet).is_some_and(|s| self.alloc.take(s));
        if !taken {
            return Err(format!(
                "stored lease of {node} holds {subnet}, which is outside {k}SubnetMin..{k}SubnetMax \
                 of the configured network or overlaps another lease; restore the previous \
                 net-conf.json or move the data directory aside to start a new network",
                k = N::KEY
            ));
        }
        self.hold(subnet, node);
        Ok(())
    }

    fn honour_reservations(&mut self) {
        self.reserved.clear();
        self.stale.clear();
        let reservations = self.reservations.clone();
        for (node, subnet) in reservations {
            match self.problem(&node, subnet) {
                Some(why) => {
                    warn!(node = %node, subnet = %subnet, reason = %why, "reservation cannot be honoured; the node will be given another subnet until that changes");
                    self.stale.insert(node, why);
                }
                None => {
                    self.alloc.take(subnet);
                    self.reserved.insert(subnet, node);
                }
            }
        }
        self.changed = true;
    }

    fn holder(&self, subnet: IpNet) -> Option<&str> {
        let subnet = N::from_net(subnet)?;
        self.holders.get(&subnet).map(String::as_str)
    }

    fn hold(&mut self, subnet: IpNet, node: &str) {
        if let Some(subnet) = N::from_net(subnet) {
            self.holders.insert(subnet, node.to_string());
        }
    }

    fn pick(&mut self, node: &str, requested: Option<IpNet>) -> Result<IpNet, Refusal> {
        if let Some(reserved) = self.reservations.get(node).copied() {
            match self.problem(node, reserved) {
                None => {
                    // Its bit is normally kept on the node's behalf; take it when it
                    // was not (a reservation that was stale until now).
                    self.alloc.take(reserved);
                    self.reserved.insert(reserved, node.to_string());
                    self.changed |= self.stale.remove(node).is_some();
                    info!(node = %node, subnet = %reserved, "granting the node its reserved subnet");
                    return Ok(reserved.into());
                }
                Some(why) => {
                    warn!(node = %node, subnet = %reserved, reason = %why, "reservation cannot be honoured; allocating another subnet");
                    self.changed |= self.stale.insert(node.to_string(), why).is_none();
                }
            }
        }
        if let Some(r) = requested.and_then(N::from_net) {
            if !self.reserved.contains_key(&r) && self.alloc.take(r) {
                return Ok(r.into());
            }
            let why = if self.pool.index_of(r).is_none() {
                format!("it is outside {}", self.pool.range_text())
            } else {
                "another node holds or has reserved it".to_string()
            };
            info!(node = %node, requested = %r, "requested subnet not granted: {why}; allocating a fresh one");
        }
        self.alloc.allocate().map(Into::into).ok_or_else(|| {
            warn!(node = %node, family = N::FAMILY, "out of subnets");
            Refusal::Exhausted(format!(
                "out of {k}{space}subnets: all {} subnets between {k}SubnetMin {} and {k}SubnetMax {} are leased or reserved",
                self.alloc.capacity(),
                self.pool.subnet_min,
                self.pool.subnet_max,
                k = N::KEY,
                space = if N::KEY.is_empty() { "" } else { " " }
            ))
        })
    }

    fn free(&mut self, subnet: IpNet, node: &str) {
        let Some(subnet) = N::from_net(subnet) else {
            return;
        };
        if self.holders.get(&subnet).is_some_and(|h| h == node) {
            self.holders.remove(&subnet);
        }
        if self.reserved.contains_key(&subnet) {
            return;
        }
        let waiting = self
            .reservations
            .iter()
            .find(|(_, s)| **s == subnet)
            .map(|(n, _)| n.clone());
        match waiting.filter(|n| self.problem(n, subnet).is_none()) {
            Some(waiting) => {
                info!(node = %waiting, subnet = %subnet, "reservation can be honoured again");
                self.stale.remove(&waiting);
                self.reserved.insert(subnet, waiting);
                self.changed = true;
            }
            None => self.alloc.free(subnet),
        }
    }

    fn check_reserve(&self, node: &str, subnet: IpNet, own: Option<IpNet>) -> Result<(), Refusal> {
        let subnet = self.typed(subnet)?;
        if self.pool.index_of(subnet).is_none() {
            return Err(Refusal::Invalid(format!(
                "{subnet} is not a /{} subnet between {k}SubnetMin {} and {k}SubnetMax {}",
                self.pool.subnet_len,
                self.pool.subnet_min,
                self.pool.subnet_max,
                k = N::KEY
            )));
        }
        if let Some((other, _)) = self
            .reservations
            .iter()
            .find(|(n, s)| **s == subnet && n.as_str() != node)
        {
            return Err(Refusal::Conflict(format!(
                "{subnet} is already reserved for node {other}"
            )));
        }
        if let Some(holder) = self.holders.get(&subnet).filter(|h| *h != node) {
            return Err(Refusal::Conflict(format!(
                "{subnet} is leased to node {holder}; revoke that lease first"
            )));
        }
        if let Some(own) = own.and_then(N::from_net).filter(|o| *o != subnet) {
            return Err(Refusal::Conflict(format!(
                "node {node} holds {own}; revoke its lease first or reserve that subnet"
            )));
        }
        Ok(())
    }

    fn reserve(&mut self, node: &str, subnet: IpNet) {
        let Some(subnet) = N::from_net(subnet) else {
            return;
        };
        if let Some(previous) = self.reservations.insert(node.to_string(), subnet) {
            if previous != subnet {
                self.release_reserved(node, previous);
            }
        }
        // Taken now, so the allocator never hands it to anyone else (already taken when
        // the node's own lease holds it).
        self.alloc.take(subnet);
        self.reserved.insert(subnet, node.to_string());
        self.stale.remove(node);
        info!(node = %node, subnet = %subnet, "subnet reserved");
    }

    fn unreserve(&mut self, node: &str) -> Option<IpNet> {
        let subnet = self.reservations.remove(node)?;
        self.stale.remove(node);
        self.release_reserved(node, subnet);
        info!(node = %node, subnet = %subnet, "reservation removed");
        Some(subnet.into())
    }
}
