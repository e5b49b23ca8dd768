//! Durable lease storage. The services only see the `Store` trait: sled (embedded, one
//! replica) or etcd (several replicas, one elected writer whose every write is fenced by
//! its leadership; see `etcd`). Both keep the one key space of `schema`.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net};
use twill_common::model::{Family, PerFamily};
use twill_common::networks::NetworkName;
use twill_proto::{Lease, LeaseEvent};

pub mod etcd;
pub mod schema;
mod sled_store;

pub use etcd::EtcdStore;
pub use schema::{Layout, RecordKind};
pub use sled_store::SledStore;

/// A storage failure; the message says what was being done, and the error it came
/// from is its source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed at what the message says.
    #[error("store: {0}: {1}")]
    Sled(String, #[source] sled::Error),
    /// etcd answered the request named with an error, or could not be reached for it.
    #[error("store: {0}: {said}", said = etcd_said(.1))]
    Etcd(String, #[source] tonic::Status),
    /// The connection to etcd cannot be set up (an endpoint URL, the TLS material): the
    /// flag at fault, and the transport's error.
    #[error("store: {0}: {1}")]
    Connect(String, #[source] tonic::transport::Error),
    /// A file the store needs (which, and for what) cannot be read.
    #[error("store: {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The revocation records cannot be read back (a replica taking the lead, or
    /// catching up after its watch lost events).
    #[error("store: reading revocations: {0}")]
    Revocations(#[source] Box<crate::identity::IdentityError>),
    /// etcd did not answer the request named in the time given.
    #[error("store: etcd did not answer within {secs}s while {0}: are a quorum of its members up and reachable?", secs = .1.as_secs())]
    Timeout(String, std::time::Duration),
    /// The backend failed in a way no underlying error describes (a misconfiguration);
    /// the message says what.
    #[error("store: {0}")]
    Backend(String),
    /// This replica may not write: it is not (or no longer) the elected leader, so a
    /// write from it could overwrite the leader's.
    #[error("store: {0}")]
    NotLeader(String),
    /// A stored record (its key) does not decode: the store was written by something
    /// else.
    #[error("store: corrupt record {0:?}: {1}")]
    Corrupt(String, #[source] Malformed),
}

/// What is wrong with a stored record.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// A lease or an event that is no protobuf of its type.
    #[error(transparent)]
    Protobuf(#[from] prost::DecodeError),
    /// A value stored as text (a revision, a reservation, the layout) or a key that
    /// does not read; the message says how.
    #[error("{0}")]
    Text(String),
}

/// What etcd's status says, in words: unreachable is not a refusal.
fn etcd_said(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unavailable => format!("etcd cannot be reached: {}", s.message()),
        _ => format!("etcd refused: {}", s.message()),
    }
}

impl StoreError {
    /// The record under `key` (as stored, prefix and all) does not decode.
    pub fn corrupt(key: &[u8], source: impl Into<Malformed>) -> Self {
        StoreError::Corrupt(String::from_utf8_lossy(key).into_owned(), source.into())
    }

    /// Whether etcd could not be reached or did not answer (down, starting, or without
    /// quorum), as opposed to an answer that refused the request: worth waiting for.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Timeout(..) => true,
            StoreError::Etcd(_, source) => matches!(
                source.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}

impl From<String> for Malformed {
    fn from(msg: String) -> Self {
        Malformed::Text(msg)
    }
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
    /// Reserved subnets by network and node name.
    pub reservations: BTreeMap<LeaseKey, Reservation>,
    /// The network layout the leases were allocated in,
    /// `None` for a new store.
    pub layout: Option<Layout>,
    /// The store's identity, made when it was created: revisions of one epoch mean
    /// nothing in another, so a watcher resuming with another epoch starts over.
    pub epoch: String,
}

/// The subnets kept for one node, at most one per family. Stored as text, the IPv4
/// subnet first and comma-separated (`10.244.9.0/24`, `10.244.9.0/24,fd00:0:0:9::/64`,
/// `fd00:0:0:9::/64`), so a reservation stored before dual-stack reads unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation(pub PerFamily<IpNet>);

impl std::fmt::Display for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.values().map(|s| s.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

impl From<Ipv4Net> for Reservation {
    fn from(v4: Ipv4Net) -> Self {
        Reservation(PerFamily::new(Some(v4.into()), None))
    }
}

impl std::str::FromStr for Reservation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut r = PerFamily::default();
        for part in s.split(',') {
            let subnet: IpNet = part
                .parse()
                .map_err(|_| format!("{part:?} is not a subnet in CIDR form"))?;
            *r.slot(Family::of_net(subnet)) = Some(subnet);
        }
        Ok(Reservation(r))
    }
}

/// Where a lease or a reservation lives: its network and its node (a node holds at
/// most one lease, and one reservation, per network).
pub type LeaseKey = (NetworkName, String);

/// One atomic write: what one batch of the lease writer changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Batch<'a> {
    /// Events (consecutive revisions, in order): applied to the leases and appended to
    /// the event history, whose oldest entries fall out of the retention window.
    pub events: &'a [LeaseEvent],
    /// Leases whose expiry alone moved (an unchanged renewal): rewritten in place, with
    /// no event and no new revision.
    pub renewed: &'a [Lease],
    /// The complete reservation set, when it changed.
    pub reservations: Option<&'a BTreeMap<LeaseKey, Reservation>>,
}

impl Batch<'_> {
    /// True when the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.renewed.is_empty() && self.reservations.is_none()
    }
}

/// Durable storage for leases and the revision counter. Writes are durable once
/// `flush` returns (etcd's are already when they return: each is a committed
/// transaction).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads everything (at start-up, and after a failed write).
    async fn load(&self) -> Result<Snapshot, StoreError>;
    /// Writes `batch` atomically (all or nothing) or, where the backend limits the size
    /// of one transaction, as consecutive parts that each leave a consistent store.
    /// When it fails, what `load` returns is the truth about what is stored.
    async fn write(&self, batch: &Batch<'_>) -> Result<(), StoreError>;
    /// Stores a durable record beside the leases (a bootstrap token, an issued
    /// certificate), by kind and id, replacing one with the same id.
    async fn put_record(&self, kind: RecordKind, id: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Deletes a record; false when there was none.
    async fn delete_record(&self, kind: RecordKind, id: &str) -> Result<bool, StoreError>;
    /// Every record of a kind, ordered by id.
    async fn records(&self, kind: RecordKind) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// One record of a kind, by id.
    async fn record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Records the network layout the leases belong to.
    async fn set_layout(&self, layout: &Layout) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
    /// Makes every applied change durable.
    async fn flush(&self) -> Result<(), StoreError>;
}
