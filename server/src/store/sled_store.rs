//! The sled implementation of `Store`: one tree, keys `lease/<node>` (protobuf-encoded
//! `Lease`), `event/<revision, big-endian>` (protobuf-encoded `LeaseEvent`, the last
//! `retention` of them), `reservation/<node>` (the subnet as text) and
//! `meta/revision`, `meta/layout`, `meta/epoch`, and other records as
//! `record/<kind>/<id>`; each batch is applied atomically.

use std::path::Path;

use prost::Message;
use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

use super::{Batch, Snapshot, Store, StoreError};

const LEASE_PREFIX: &[u8] = b"lease/";
const EVENT_PREFIX: &[u8] = b"event/";
const RESERVATION_PREFIX: &[u8] = b"reservation/";
const REVISION_KEY: &[u8] = b"meta/revision";
const LAYOUT_KEY: &[u8] = b"meta/layout";
const EPOCH_KEY: &[u8] = b"meta/epoch";
const RECORD_PREFIX: &str = "record/";

/// Leases in a sled database under the controller's data directory.
pub struct SledStore {
    db: sled::Db,
    retention: u64,
}

fn backend(what: &str) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("{what}: {e}"))
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, keeping the last `retention` events. A
    /// new store is given its epoch here, durably, before anything else is written.
    pub fn open(dir: &Path, retention: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            StoreError::Backend(format!("cannot open the store in {}: {e}", dir.display()))
        })?;
        if db
            .get(EPOCH_KEY)
            .map_err(backend("reading the epoch"))?
            .is_none()
        {
            let epoch = format!("{:016x}", rand::random::<u64>());
            db.insert(EPOCH_KEY, epoch.as_bytes())
                .map_err(backend("writing the epoch"))?;
            db.flush().map_err(backend("flushing the epoch"))?;
        }
        Ok(SledStore { db, retention })
    }
}

impl SledStore {
    /// Every record, keyed `<kind>/<id>` (for copying the store into etcd).
    pub fn all_records(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db
            .scan_prefix(RECORD_PREFIX.as_bytes())
            .map(|item| {
                let (key, value) = item.map_err(backend("reading records"))?;
                let id = String::from_utf8_lossy(&key[RECORD_PREFIX.len()..]).into_owned();
                Ok((id, value.to_vec()))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        for item in self.db.scan_prefix(LEASE_PREFIX) {
            let (key, value) = item.map_err(backend("reading leases"))?;
            let lease = Lease::decode(value.as_ref()).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                msg: e.to_string(),
            })?;
            snap.leases.push(lease);
        }
        for item in self.db.scan_prefix(EVENT_PREFIX) {
            let (key, value) = item.map_err(backend("reading events"))?;
            let event = LeaseEvent::decode(value.as_ref()).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                msg: e.to_string(),
            })?;
            snap.history.push(event);
        }
        for item in self.db.scan_prefix(RESERVATION_PREFIX) {
            let (key, value) = item.map_err(backend("reading reservations"))?;
            let corrupt = |msg: String| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                msg,
            };
            let node = String::from_utf8(key[RESERVATION_PREFIX.len()..].to_vec())
                .map_err(|e| corrupt(e.to_string()))?;
            let subnet = String::from_utf8_lossy(&value).parse().map_err(corrupt)?;
            snap.reservations.insert(node, subnet);
        }
        if let Some(v) = self
            .db
            .get(REVISION_KEY)
            .map_err(backend("reading the revision"))?
        {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                key: "meta/revision".into(),
                msg: format!("{} bytes, expected 8", v.len()),
            })?;
            snap.revision = u64::from_be_bytes(bytes);
        }
        if let Some(v) = self
            .db
            .get(LAYOUT_KEY)
            .map_err(backend("reading the layout"))?
        {
            snap.layout = Some(String::from_utf8_lossy(&v).into_owned());
        }
        if let Some(v) = self
            .db
            .get(EPOCH_KEY)
            .map_err(backend("reading the epoch"))?
        {
            snap.epoch = String::from_utf8_lossy(&v).into_owned();
        }
        Ok(snap)
    }

    async fn write(&self, b: &Batch<'_>) -> Result<(), StoreError> {
        if b.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for lease in b.renewed {
            batch.insert(lease_key(&lease.node_name), lease.encode_to_vec());
        }
        for event in b.events {
            let Some(lease) = &event.lease else { continue };
            if event.r#type == EventType::Delete as i32 {
                batch.remove(lease_key(&lease.node_name));
            } else {
                batch.insert(lease_key(&lease.node_name), lease.encode_to_vec());
            }
            batch.insert(event_key(event.revision), event.encode_to_vec());
            // Revisions are consecutive, so each new event pushes exactly one out.
            if let Some(old) = event.revision.checked_sub(self.retention) {
                batch.remove(event_key(old));
            }
        }
        if let Some(last) = b.events.last() {
            batch.insert(REVISION_KEY, &last.revision.to_be_bytes());
        }
        if let Some(reservations) = b.reservations {
            for item in self.db.scan_prefix(RESERVATION_PREFIX).keys() {
                batch.remove(item.map_err(backend("reading reservations"))?);
            }
            for (node, subnet) in reservations {
                batch.insert(
                    [RESERVATION_PREFIX, node.as_bytes()].concat(),
                    subnet.to_string().as_bytes(),
                );
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(backend("writing leases"))
    }

    async fn put_record(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.db
            .insert(record_key(kind, id), value)
            .map(|_| ())
            .map_err(backend("writing a record"))
    }

    async fn delete_record(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        self.db
            .remove(record_key(kind, id))
            .map(|old| old.is_some())
            .map_err(backend("deleting a record"))
    }

    async fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = record_key(kind, "");
        self.db
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item.map_err(backend("reading records"))?;
                let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                Ok((id, value.to_vec()))
            })
            .collect()
    }

    async fn record(&self, kind: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get(record_key(kind, id))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(backend("reading a record"))
    }

    async fn set_layout(&self, layout: &str) -> Result<(), StoreError> {
        self.db
            .insert(LAYOUT_KEY, layout.as_bytes())
            .map(|_| ())
            .map_err(backend("writing the layout"))
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(backend("flushing"))
    }
}

fn record_key(kind: &str, id: &str) -> Vec<u8> {
    format!("{RECORD_PREFIX}{kind}/{id}").into_bytes()
}

fn lease_key(node: &str) -> Vec<u8> {
    [LEASE_PREFIX, node.as_bytes()].concat()
}

fn event_key(revision: u64) -> Vec<u8> {
    [EVENT_PREFIX, &revision.to_be_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            s.set_layout("10.244.0.0/16 /24").await.unwrap();
            let mut renewed = lease("b", "10.244.2.0/24");
            renewed.expires_at_unix = 42;
            s.write(&Batch {
                renewed: &[renewed],
                reservations: Some(&[("c".to_string(), "10.244.9.0/24".parse().unwrap())].into()),
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
        assert_eq!(snap.layout.as_deref(), Some("10.244.0.0/16 /24"));
        assert_eq!(snap.reservations.len(), 1);
    }
}
