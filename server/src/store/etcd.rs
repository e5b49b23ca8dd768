//! The etcd store: every durable record under one key prefix, reached over mutual TLS.
//!
//! Keys (under `--etcd-prefix`, default `/twill/`) are those of `schema`, in its etcd
//! dialect, including the replicas' election and registrations (see `crate::replica`).
//! Twill's revisions are its own counter,
//! stored in `meta/revision` and in the event keys, not etcd's: every replica therefore
//! numbers events the same way, and an agent that moves between replicas resumes from
//! its revision (etcd's revisions also count renewals, records and elections).
//!
//! Writes are fenced: each is a transaction that also compares the create revision of
//! this replica's leader key, so a replica deposed while it was frozen or cut off, and
//! which has not noticed yet, writes nothing. A replica that is not the leader has no
//! fence and refuses to write.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_proto::etcd::etcdserverpb::{
    compare, kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, response_op,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
    TxnResponse,
};
use twill_proto::etcd::mvccpb::KeyValue;
use twill_proto::{Lease, LeaseEvent};

use super::schema::{self, Dialect, Key, Layout, Op, Range, RecordKind};
use super::{Batch, Malformed, Snapshot, Store, StoreError};
use crate::metrics::Metrics;

/// How long one etcd request may take. Without a quorum etcd holds a write until its
/// own timeout (7 s by default); answering sooner lets the caller say so and retry.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd's default `--max-txn-ops` is 128: larger batches are written in parts of at most
/// this many operations, each leaving a consistent store (a prefix of the events).
const MAX_TXN_OPS: usize = 120;

/// Where etcd is and how to reach it (the `--etcd-*` flags).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`https://host:2379`).
    pub endpoints: Vec<String>,
    /// Client certificate presented to etcd (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA that signs the etcd members' certificates (PEM).
    pub ca: PathBuf,
    /// Key prefix every record lives under; ends with `/`.
    pub prefix: String,
}

/// The leader key this replica won: writes compare its create revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The election key (`<prefix>election/<etcd lease id>`).
    pub key: Vec<u8>,
    /// Its create revision: a later leader's key has another one.
    pub revision: i64,
}

/// An etcd connection: a channel over every endpoint, mutual TLS.
#[derive(Clone)]
pub struct Etcd {
    channel: Channel,
    prefix: String,
    metrics: Arc<Metrics>,
}

fn read(path: &PathBuf, flag: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Io(format!("cannot read {flag} {}", path.display()), e))
}

fn status(what: &str) -> impl Fn(tonic::Status) -> StoreError + '_ {
    move |source| StoreError::Etcd(what.to_string(), source)
}

impl Etcd {
    /// Makes the channel; members are dialled lazily, so a member that is down now is
    /// used once it is back.
    pub fn connect(config: &EtcdConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Backend(
                "--etcd-endpoints is empty: give the etcd client URLs, e.g. https://10.0.0.1:2379"
                    .into(),
            ));
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&config.ca, "--etcd-ca")?))
            .identity(Identity::from_pem(
                read(&config.cert, "--etcd-cert")?,
                read(&config.key, "--etcd-key")?,
            ));
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for url in &config.endpoints {
            if !url.starts_with("https://") {
                return Err(StoreError::Backend(format!(
                    "--etcd-endpoints {url}: etcd is reached over mutual TLS, so each URL starts with https://"
                )));
            }
            let bad_url = |e| StoreError::Connect(format!("--etcd-endpoints {url}"), e);
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(bad_url)?
                .tls_config(tls.clone())
                .map_err(bad_url)?
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        Ok(Etcd {
            channel: Channel::balance_list(endpoints.into_iter()),
            prefix: config.prefix.clone(),
            metrics,
        })
    }

    /// The channel, for the election, lease and watch clients.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A key, prefix and all.
    pub fn key(&self, key: &Key) -> Vec<u8> {
        [self.prefix.as_bytes(), &key.encode(Dialect::Etcd)].concat()
    }

    /// The first key of a range, prefix and all (a watch or read covers every key
    /// from it to its `prefix_end`).
    pub fn range_start(&self, range: Range) -> Vec<u8> {
        [self.prefix.as_bytes(), &range.prefix()].concat()
    }

    /// The key a stored key (prefix and all) is, `None` for one outside the prefix or
    /// one Twill does not write.
    pub fn decode(&self, key: &[u8]) -> Option<Key> {
        Key::decode(Dialect::Etcd, key.strip_prefix(self.prefix.as_bytes())?)
    }

    /// Runs one request with the request timeout, timing it.
    pub async fn timed<T, F>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let out = tokio::time::timeout(REQUEST_TIMEOUT, f).await;
        self.metrics
            .etcd_request_seconds
            .observe(started.elapsed().as_secs_f64());
        match out {
            Ok(r) => r.map(tonic::Response::into_inner).map_err(status(what)),
            Err(_) => Err(StoreError::Timeout(what.to_string(), REQUEST_TIMEOUT)),
        }
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// Every key of `range`, and etcd's revision of the read.
    pub async fn range(&self, range: Range) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let key = self.range_start(range);
        let range_end = prefix_end(&key);
        let r = self
            .timed(
                "a read",
                self.kv().range(RangeRequest {
                    key,
                    range_end,
                    ..Default::default()
                }),
            )
            .await?;
        Ok((r.kvs, r.header.map_or(0, |h| h.revision)))
    }

    /// One key's value.
    pub async fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self
            .timed(
                "a read",
                self.kv().range(RangeRequest {
                    key: self.key(key),
                    ..Default::default()
                }),
            )
            .await?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// A transaction: `ops` when every compare holds.
    pub async fn txn(
        &self,
        what: &str,
        compare: Vec<Compare>,
        ops: Vec<RequestOp>,
    ) -> Result<TxnResponse, StoreError> {
        self.timed(
            what,
            self.kv().txn(TxnRequest {
                compare,
                success: ops,
                failure: Vec::new(),
            }),
        )
        .await
    }

    /// Bytes the etcd member that answered holds on disk.
    pub async fn db_size(&self) -> Result<u64, StoreError> {
        let r = self
            .timed(
                "a status request",
                MaintenanceClient::new(self.channel.clone()).status(StatusRequest::default()),
            )
            .await?;
        Ok(r.db_size.max(0) as u64)
    }
}

/// The end of the range of keys starting with `key` (etcd's `range_end`).
pub fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A put operation.
pub fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    put_leased(key, value, 0)
}

/// A put of a key that lives as long as etcd lease `lease` (0: for good).
pub fn put_leased(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// A delete of one key.
pub fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

/// Holds when `key` does not exist.
pub fn absent(key: Vec<u8>) -> Compare {
    created_at(key, 0)
}

/// Holds when `key` was created at etcd revision `revision` (0: it does not exist).
fn created_at(key: Vec<u8>, revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key,
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
        ..Default::default()
    }
}

/// Leases, events, reservations and metadata under the prefix.
pub struct EtcdStore {
    etcd: Etcd,
    retention: u64,
    fence: RwLock<Option<Fence>>,
    size: AtomicU64,
}

/// What one key under the prefix is, once its prefix is stripped.
pub enum Entry {
    /// A node's lease.
    Lease(Lease),
    /// An event of the log.
    Event(LeaseEvent),
    /// A node's reservation in a network.
    Reservation(super::LeaseKey, super::Reservation),
    /// A record (`kind`, `id`).
    Record(RecordKind, String),
    /// `meta/revision`.
    Revision(u64),
    /// `meta/layout`.
    Layout(Layout),
    /// `meta/epoch`.
    Epoch(String),
    /// `meta/batch-end`: the revision the batch being written ends at.
    BatchEnd(u64),
    /// Election and replica keys, and anything else under the prefix.
    Other,
}

impl EtcdStore {
    /// Connects and makes sure the prefix has an epoch (made by whichever replica
    /// comes first).
    pub async fn open(etcd: Etcd, retention: u64) -> Result<Self, StoreError> {
        let epoch = etcd.key(&Key::Epoch);
        etcd.txn(
            "creating the store epoch",
            vec![absent(epoch.clone())],
            vec![put(
                epoch,
                format!("{:016x}", rand::random::<u64>()).into_bytes(),
            )],
        )
        .await?;
        Ok(EtcdStore {
            etcd,
            retention,
            fence: RwLock::new(None),
            size: AtomicU64::new(0),
        })
    }

    /// The connection.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Arms (Some) or disarms (None) the fence: only a leader writes.
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.write() = fence;
    }

    fn fence(&self) -> Result<Fence, StoreError> {
        self.fence.read().clone().ok_or_else(|| {
            StoreError::NotLeader(
                "this controller replica is not the elected leader, so it does not write; \
                     the write goes to the leader"
                    .into(),
            )
        })
    }

    /// Refreshes the size `size_on_disk` reports.
    pub async fn refresh_size(&self) {
        if let Ok(n) = self.etcd.db_size().await {
            self.size.store(n, Ordering::Relaxed);
        }
    }

    /// Classifies a key under the prefix.
    pub fn entry(&self, kv: &KeyValue) -> Result<Entry, StoreError> {
        let corrupt = |e: Malformed| StoreError::corrupt(&kv.key, e);
        let text = || String::from_utf8_lossy(&kv.value).into_owned();
        Ok(match self.etcd.decode(&kv.key) {
            Some(Key::Lease(..)) => {
                Entry::Lease(Lease::decode(kv.value.as_slice()).map_err(|e| corrupt(e.into()))?)
            }
            Some(Key::Event(_)) => Entry::Event(
                LeaseEvent::decode(kv.value.as_slice()).map_err(|e| corrupt(e.into()))?,
            ),
            Some(Key::Reservation(network, node)) => Entry::Reservation(
                (network, node),
                text().parse().map_err(|e: String| corrupt(e.into()))?,
            ),
            Some(Key::Record(kind, id)) => Entry::Record(kind, id),
            Some(Key::Revision) => Entry::Revision(
                Dialect::Etcd
                    .parse_revision(&kv.value)
                    .map_err(|e| corrupt(e.into()))?,
            ),
            Some(Key::Layout) => {
                Entry::Layout(text().parse().map_err(|e: String| corrupt(e.into()))?)
            }
            Some(Key::Epoch) => Entry::Epoch(text()),
            Some(Key::BatchEnd) => Entry::BatchEnd(
                Dialect::Etcd
                    .parse_revision(&kv.value)
                    .map_err(|e| corrupt(e.into()))?,
            ),
            Some(Key::Election | Key::Replica(_)) | None => Entry::Other,
        })
    }

    /// Everything, and the etcd revision it was read at (a watch continues from the
    /// next one).
    pub async fn load_at(&self) -> Result<(Snapshot, i64), StoreError> {
        let (kvs, at) = self.etcd.range(Range::All).await?;
        let mut snap = Snapshot::default();
        for kv in &kvs {
            match self.entry(kv)? {
                Entry::Lease(l) => snap.leases.push(l),
                Entry::Event(e) => snap.history.push(e),
                Entry::Reservation(node, subnet) => {
                    snap.reservations.insert(node, subnet);
                }
                Entry::Revision(r) => snap.revision = r,
                Entry::Layout(l) => snap.layout = Some(l),
                Entry::Epoch(e) => snap.epoch = e,
                Entry::Record(..) | Entry::BatchEnd(_) | Entry::Other => {}
            }
        }
        Ok((snap, at))
    }

    /// Commits `ops` (and the fence) as one transaction.
    async fn fenced(&self, what: &str, ops: Vec<RequestOp>) -> Result<TxnResponse, StoreError> {
        let fence = self.fence()?;
        let r = self
            .etcd
            .txn(
                what,
                vec![created_at(fence.key.clone(), fence.revision)],
                ops,
            )
            .await?;
        if !r.succeeded {
            self.set_fence(None);
            return Err(StoreError::NotLeader(format!(
                "this replica's leadership ended (its election key {} is gone from etcd): \
                 nothing of {what} was written",
                String::from_utf8_lossy(&fence.key)
            )));
        }
        Ok(r)
    }

    /// Writes the copy of another store (`twill-controller --migrate-from-sled`):
    /// leases, events, reservations, records and metadata, in parts, unfenced. The
    /// caller has checked that the prefix holds no leases.
    pub async fn import(
        &self,
        snap: &Snapshot,
        records: &[(RecordKind, String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let key = |k: Key| self.etcd.key(&k);
        let mut ops: Vec<RequestOp> = Vec::new();
        for l in &snap.leases {
            ops.push(put(
                key(Key::Lease(schema::network_of(l), l.node_name.clone())),
                l.encode_to_vec(),
            ));
        }
        for e in &snap.history {
            ops.push(put(key(Key::Event(e.revision)), e.encode_to_vec()));
        }
        for ((network, node), subnet) in &snap.reservations {
            ops.push(put(
                key(Key::Reservation(network.clone(), node.clone())),
                subnet.to_string().into_bytes(),
            ));
        }
        for (kind, id, value) in records {
            ops.push(put(key(Key::Record(*kind, id.clone())), value.clone()));
        }
        for part in ops.chunks(MAX_TXN_OPS) {
            self.etcd
                .txn("copying the store", Vec::new(), part.to_vec())
                .await?;
        }
        // The metadata last: a copy that stopped half-way has no revision yet, and a
        // rerun (which the emptiness check allows, as it looks at the revision) finishes it.
        let mut meta = vec![
            put(key(Key::Epoch), snap.epoch.clone().into_bytes()),
            put(key(Key::Revision), Dialect::Etcd.revision(snap.revision)),
        ];
        if let Some(layout) = &snap.layout {
            meta.push(put(key(Key::Layout), layout.to_string().into_bytes()));
        }
        self.etcd.txn("copying the store", Vec::new(), meta).await?;
        Ok(())
    }
}

/// The puts and deletes of one part of a batch, last write of a key winning (etcd
/// refuses a transaction that names a key twice).
#[derive(Default)]
struct Part {
    ops: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Part {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.insert(key, Some(value));
    }
    fn delete(&mut self, key: Vec<u8>) {
        self.ops.insert(key, None);
    }
    fn len(&self) -> usize {
        self.ops.len()
    }
    fn into_ops(self) -> Vec<RequestOp> {
        self.ops
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => put(k, v),
                None => delete(k),
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        self.load_at().await.map(|(snap, _)| snap)
    }

    async fn write(&self, b: &Batch<'_>) -> Result<(), StoreError> {
        if b.is_empty() {
            return Ok(());
        }
        let stored = match b.reservations {
            Some(_) => {
                let (kvs, _) = self.etcd.range(Range::Reservations).await?;
                kvs.iter()
                    .filter_map(|kv| match self.etcd.decode(&kv.key) {
                        Some(Key::Reservation(network, node)) => Some((network, node)),
                        _ => None,
                    })
                    .collect()
            }
            None => Default::default(),
        };
        // Parts hold whole steps, so whatever parts landed, the store is the state after
        // some prefix of the events.
        let mut parts = Vec::new();
        let mut part = Part::default();
        for step in schema::batch_steps(b, self.retention, Dialect::Etcd, &stored) {
            if part.len() + step.len() > MAX_TXN_OPS {
                parts.push(std::mem::take(&mut part));
            }
            for op in step {
                match op {
                    Op::Put(k, v) => part.put(self.etcd.key(&k), v),
                    Op::Delete(k) => part.delete(self.etcd.key(&k)),
                }
            }
        }
        parts.push(part);
        // One op over MAX_TXN_OPS at most, within etcd's 128.
        if let (true, Some(last)) = (parts.len() > 1, b.events.last()) {
            parts[0].put(
                self.etcd.key(&Key::BatchEnd),
                Dialect::Etcd.revision(last.revision),
            );
        }
        for part in parts {
            if part.len() > 0 {
                self.fenced("writing leases", part.into_ops()).await?;
            }
        }
        Ok(())
    }

    async fn put_record(&self, kind: RecordKind, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.fenced(
            "writing a record",
            vec![put(
                self.etcd.key(&Key::Record(kind, id.into())),
                value.to_vec(),
            )],
        )
        .await
        .map(|_| ())
    }

    async fn delete_record(&self, kind: RecordKind, id: &str) -> Result<bool, StoreError> {
        let key = self.etcd.key(&Key::Record(kind, id.into()));
        let r = self.fenced("deleting a record", vec![delete(key)]).await?;
        Ok(r.responses.iter().any(|op| {
            matches!(&op.response, Some(response_op::Response::ResponseDeleteRange(d)) if d.deleted > 0)
        }))
    }

    async fn records(&self, kind: RecordKind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let range = Range::RecordsOf(kind);
        let (kvs, _) = self.etcd.range(range).await?;
        let strip = self.etcd.range_start(range).len();
        Ok(kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key[strip..]).into_owned(),
                    kv.value,
                )
            })
            .collect())
    }

    async fn record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.etcd.get(&Key::Record(kind, id.into())).await
    }

    async fn set_layout(&self, layout: &Layout) -> Result<(), StoreError> {
        let key = self.etcd.key(&Key::Layout);
        // Whichever replica starts first records the layout; the others compare theirs
        // with it at start.
        self.etcd
            .txn(
                "recording the network layout",
                vec![absent(key.clone())],
                vec![put(key, layout.to_string().into_bytes())],
            )
            .await
            .map(|_| ())
    }

    fn size_on_disk(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/twill/"), b"/twill0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0], "all of the key space");
    }

    #[test]
    fn a_part_names_each_key_once_and_the_last_write_wins() {
        let mut part = Part::default();
        part.put(b"k".to_vec(), b"1".to_vec());
        part.delete(b"k".to_vec());
        part.put(b"j".to_vec(), b"2".to_vec());
        assert_eq!(part.len(), 2);
        let ops = part.into_ops();
        assert!(matches!(
            &ops[1].request,
            Some(request_op::Request::RequestDeleteRange(d)) if d.key == b"k"
        ));
    }
}
