//! Durable lease storage. The services only see the `Store` trait, so the sled
//! implementation can be swapped (an etcd-backed store is planned for an HA controller).

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use twill_proto::{Lease, LeaseEvent};

mod sled_store;

pub use sled_store::SledStore;

/// A storage failure; the message says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing database failed.
    #[error("store: {0}")]
    Backend(String),
    /// A stored record does not decode: the store was written by something else.
    #[error("store: corrupt record {key:?}: {msg}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
}

/// What the store holds at start-up.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every stored lease.
    pub leases: Vec<Lease>,
    /// The revision of the last applied batch.
    pub revision: u64,
    /// The most recent events, oldest first, for watchers resuming from a revision.
    pub history: Vec<LeaseEvent>,
    /// Reserved subnets by node name.
    pub reservations: BTreeMap<String, Ipv4Net>,
    /// The network layout the leases were allocated in (`Network` and `SubnetLen`),
    /// `None` for a new store.
    pub layout: Option<String>,
}

/// Durable storage for leases and the revision counter.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads everything at start-up.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `events` (consecutive revisions, in order) to the leases, appends them
    /// to the event history and drops history that falls out of the retention window,
    /// atomically (all or nothing). Not durable until `flush` returns.
    fn apply(&self, events: &[LeaseEvent]) -> Result<(), StoreError>;
    /// Replaces the reservations.
    fn set_reservations(&self, reservations: &BTreeMap<String, Ipv4Net>) -> Result<(), StoreError>;
    /// Records the network layout the leases belong to.
    fn set_layout(&self, layout: &str) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
    /// Makes every applied change durable.
    async fn flush(&self) -> Result<(), StoreError>;
}
