//! The sled implementation of `Store`: one tree holding the key space of `schema`
//! (sled dialect: event keys and the revision as big-endian bytes); each batch is
//! applied atomically.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use twill_proto::{Lease, LeaseEvent};

use super::schema::{self, Dialect, Key, Layout, Op, Range, RecordKind};
use super::{Batch, LeaseKey, Snapshot, Store, StoreError};

/// Leases in a sled database under the controller's data directory.
pub struct SledStore {
    db: sled::Db,
    retention: u64,
    /// Writes applied so far.
    written: AtomicU64,
    /// How many writes the last flush covered. One flush at a time: sled's flushes at
    /// once spin on each other (a hundred bootstraps took both cores for a minute),
    /// and a flush that began after a caller's writes covers them (group commit).
    flushed: tokio::sync::Mutex<u64>,
}

fn backend(what: &str) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |source| StoreError::Sled(what.to_string(), source)
}

fn key(k: &Key) -> Vec<u8> {
    k.encode(Dialect::Sled)
}

/// The value of `k` in `db`; `what` names the read in an error.
fn get(db: &sled::Db, k: &Key, what: &str) -> Result<Option<sled::IVec>, StoreError> {
    db.get(key(k)).map_err(backend(what))
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, keeping the last `retention` events. A
    /// new store is given its epoch here, durably, before anything else is written.
    pub fn open(dir: &Path, retention: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            StoreError::Sled(format!("cannot open the store in {}", dir.display()), e)
        })?;
        if get(&db, &Key::Epoch, "reading the epoch")?.is_none() {
            let epoch = format!("{:016x}", rand::random::<u64>());
            db.insert(key(&Key::Epoch), epoch.as_bytes())
                .map_err(backend("writing the epoch"))?;
            db.flush().map_err(backend("flushing the epoch"))?;
        }
        Ok(SledStore {
            db,
            retention,
            written: AtomicU64::new(0),
            flushed: tokio::sync::Mutex::new(0),
        })
    }

    /// Counts a write that was applied.
    fn wrote<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_ok() {
            self.written.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    /// Every record, as kind, id and value (for copying the store into etcd).
    pub fn all_records(&self) -> Result<Vec<(RecordKind, String, Vec<u8>)>, StoreError> {
        self.db
            .scan_prefix(Range::Records.prefix())
            .map(|item| {
                let (k, value) = item.map_err(backend("reading records"))?;
                match Key::decode(Dialect::Sled, &k) {
                    Some(Key::Record(kind, id)) => Ok((kind, id, value.to_vec())),
                    _ => Err(StoreError::corrupt(&k, "not a record key".to_string())),
                }
            })
            .collect()
    }

    /// The nodes whose reservations are stored, by network.
    fn stored_reservations(&self) -> Result<BTreeSet<LeaseKey>, StoreError> {
        let mut nodes = BTreeSet::new();
        for item in self.db.scan_prefix(Range::Reservations.prefix()).keys() {
            let k = item.map_err(backend("reading reservations"))?;
            match Key::decode(Dialect::Sled, &k) {
                Some(Key::Reservation(network, node)) => nodes.insert((network, node)),
                _ => return Err(StoreError::corrupt(&k, "not valid UTF-8".to_string())),
            };
        }
        Ok(nodes)
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        for item in self.db.scan_prefix(Range::Leases.prefix()) {
            let (k, value) = item.map_err(backend("reading leases"))?;
            let lease = Lease::decode(value.as_ref()).map_err(|e| StoreError::corrupt(&k, e))?;
            snap.leases.push(lease);
        }
        for item in self.db.scan_prefix(Range::Events.prefix()) {
            let (k, value) = item.map_err(backend("reading events"))?;
            let event =
                LeaseEvent::decode(value.as_ref()).map_err(|e| StoreError::corrupt(&k, e))?;
            snap.history.push(event);
        }
        for item in self.db.scan_prefix(Range::Reservations.prefix()) {
            let (k, value) = item.map_err(backend("reading reservations"))?;
            let Some(Key::Reservation(network, node)) = Key::decode(Dialect::Sled, &k) else {
                return Err(StoreError::corrupt(&k, "not valid UTF-8".to_string()));
            };
            let subnet = String::from_utf8_lossy(&value)
                .parse()
                .map_err(|e: String| StoreError::corrupt(&k, e))?;
            snap.reservations.insert((network, node), subnet);
        }
        if let Some(v) = get(&self.db, &Key::Revision, "reading the revision")? {
            snap.revision = Dialect::Sled
                .parse_revision(&v)
                .map_err(|e| StoreError::corrupt(&key(&Key::Revision), e))?;
        }
        if let Some(v) = get(&self.db, &Key::Layout, "reading the layout")? {
            snap.layout = Some(
                String::from_utf8_lossy(&v)
                    .parse()
                    .map_err(|e: String| StoreError::corrupt(&key(&Key::Layout), e))?,
            );
        }
        if let Some(v) = get(&self.db, &Key::Epoch, "reading the epoch")? {
            snap.epoch = String::from_utf8_lossy(&v).into_owned();
        }
        Ok(snap)
    }

    async fn write(&self, b: &Batch<'_>) -> Result<(), StoreError> {
        if b.is_empty() {
            return Ok(());
        }
        let stored = match b.reservations {
            Some(_) => self.stored_reservations()?,
            None => BTreeSet::new(),
        };
        // sled applies the whole batch at once, so its steps need no separate parts.
        let mut batch = sled::Batch::default();
        for op in schema::batch_steps(b, self.retention, Dialect::Sled, &stored)
            .into_iter()
            .flatten()
        {
            match op {
                Op::Put(k, v) => batch.insert(key(&k), v),
                Op::Delete(k) => batch.remove(key(&k)),
            }
        }
        self.wrote(
            self.db
                .apply_batch(batch)
                .map_err(backend("writing leases")),
        )
    }

    async fn put_record(&self, kind: RecordKind, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.wrote(
            self.db
                .insert(key(&Key::Record(kind, id.into())), value)
                .map(|_| ())
                .map_err(backend("writing a record")),
        )
    }

    async fn delete_record(&self, kind: RecordKind, id: &str) -> Result<bool, StoreError> {
        self.wrote(
            self.db
                .remove(key(&Key::Record(kind, id.into())))
                .map(|old| old.is_some())
                .map_err(backend("deleting a record")),
        )
    }

    async fn records(&self, kind: RecordKind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = Range::RecordsOf(kind).prefix();
        self.db
            .scan_prefix(&prefix)
            .map(|item| {
                let (k, value) = item.map_err(backend("reading records"))?;
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((id, value.to_vec()))
            })
            .collect()
    }

    async fn record(&self, kind: RecordKind, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let v = get(&self.db, &Key::Record(kind, id.into()), "reading a record")?;
        Ok(v.map(|v| v.to_vec()))
    }

    async fn set_layout(&self, layout: &Layout) -> Result<(), StoreError> {
        self.wrote(
            self.db
                .insert(key(&Key::Layout), layout.to_string().as_bytes())
                .map(|_| ())
                .map_err(backend("writing the layout")),
        )
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let mine = self.written.load(Ordering::SeqCst);
        let mut flushed = self.flushed.lock().await;
        if *flushed >= mine {
            return Ok(());
        }
        let covers = self.written.load(Ordering::SeqCst);
        self.db.flush_async().await.map_err(backend("flushing"))?;
        *flushed = covers;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_proto::lease_event::Type as EventType;

    fn lease(node: &str, subnet: &str) -> Lease {
        Lease {
            node_name: node.into(),
            subnet: subnet.into(),
            ..Default::default()
        }
    }

    fn event(kind: EventType, lease: Lease, revision: u64) -> LeaseEvent {
        LeaseEvent {
            r#type: kind as i32,
            lease: Some(lease),
            revision,
        }
    }

    const LAYOUT: &str = "Network=10.244.0.0/16 SubnetLen=24";

    /// Flushes at once share one sled flush at a time; each still returns only once
    /// its own write is covered, and nothing waits forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushes_at_once_each_cover_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SledStore::open(dir.path(), 2).unwrap());
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let id = format!("r{i}");
                    s.put_record(RecordKind::Issued, &id, b"v").await.unwrap();
                    s.flush().await.unwrap();
                    *s.flushed.lock().await >= 1
                })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap(), "a flush covered the write");
        }
        assert_eq!(
            *s.flushed.lock().await,
            200,
            "the last flush covered every write"
        );
        drop(s);
        let s = SledStore::open(dir.path(), 2).unwrap();
        assert_eq!(s.records(RecordKind::Issued).await.unwrap().len(), 200);
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 2).unwrap();
            fn events(e: &[LeaseEvent]) -> Batch<'_> {
                Batch {
                    events: e,
                    ..Batch::default()
                }
            }
            s.write(&events(&[
                event(EventType::Put, lease("a", "10.244.1.0/24"), 1),
                event(EventType::Put, lease("b", "10.244.2.0/24"), 2),
            ]))
            .await
            .unwrap();
            s.write(&events(&[event(
                EventType::Delete,
                lease("a", "10.244.1.0/24"),
                3,
            )]))
            .await
            .unwrap();
            s.set_layout(&LAYOUT.parse().unwrap()).await.unwrap();
            let mut renewed = lease("b", "10.244.2.0/24");
            renewed.expires_at_unix = 42;
            s.write(&Batch {
                renewed: &[renewed],
                reservations: Some(
                    &[(
                        (Default::default(), "c".to_string()),
                        "10.244.9.0/24".parse().unwrap(),
                    )]
                    .into(),
                ),
                ..Batch::default()
            })
            .await
            .unwrap();
            s.flush().await.unwrap();
        }
        let epoch = SledStore::open(dir.path(), 2)
            .unwrap()
            .load()
            .await
            .unwrap()
            .epoch;
        assert_eq!(epoch.len(), 16, "made at creation: {epoch:?}");
        let s = SledStore::open(dir.path(), 2).unwrap();
        let snap = s.load().await.unwrap();
        assert_eq!(snap.epoch, epoch, "kept across opens");
        assert_eq!(snap.revision, 3, "a renewal is no revision");
        let kept: Vec<u64> = snap.history.iter().map(|e| e.revision).collect();
        assert_eq!(
            kept,
            vec![2, 3],
            "history keeps the last two events, in order"
        );
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(snap.leases[0].expires_at_unix, 42, "renewed in place");
        assert_eq!(snap.layout.map(|l| l.to_string()).as_deref(), Some(LAYOUT));
        assert_eq!(snap.reservations.len(), 1);
    }
}
