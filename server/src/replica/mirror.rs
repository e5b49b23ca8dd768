//! The mirror: this replica's own etcd watch on the prefix, applied to its hub.
//!
//! Events are applied by their Twill revision, so a replica serves exactly the
//! sequence the leader wrote; the leader's hub also gets them straight from its writer,
//! and whichever comes second is skipped. They are published as the lease writer
//! publishes (`events::Unpublished`), and not before the leader's batch they belong to
//! has been read whole (`meta/batch-end`): a batch etcd takes in parts, a
//! transaction every ~100 ms in a join storm, would otherwise go out a part at a time,
//! to every agent of every replica. Lease keys that change without an event are
//! renewals (a new expiry); reservation keys replace the reservation view of a
//! follower; revocation records are put in force.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};
use twill_proto::etcd::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest,
};
use twill_proto::etcd::mvccpb::event::EventType as EtcdEvent;
use twill_proto::{Lease, LeaseEvent};

use super::Replica;
use crate::events::{Hub, Unpublished};
use crate::identity::Identity as NodeIdentity;
use crate::store::etcd::{prefix_end, Entry};
use crate::store::schema::{Key, Range};
use crate::store::StoreError;

/// Follows etcd for as long as the process runs, reopening the watch after a failure.
pub async fn run(r: Arc<Replica>) {
    let mut reservations = r.hub.reservations();
    let mut size_tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        let from = *r.applied.borrow() + 1;
        let outcome = tokio::select! {
            o = follow(&r, from, &mut reservations) => o,
            _ = async { loop { size_tick.tick().await; r.store.refresh_size().await; } } => unreachable!(),
        };
        r.caught_up.store(false, Ordering::Relaxed);
        match outcome {
            Ok(never) => match never {},
            Err(Gap::Compacted) => {
                if let Err(e) = reload(&r, &mut reservations).await {
                    warn!(error = %e, "cannot reload from etcd after a compaction");
                }
            }
            Err(Gap::Broken(why)) => {
                warn!(reason = %why, "the etcd watch broke; reopening it");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

enum Gap {
    /// etcd no longer holds the revisions after ours: start again from a read.
    Compacted,
    /// The stream failed; reopen it where we are.
    Broken(String),
}

async fn follow(
    r: &Replica,
    from: i64,
    reservations: &mut BTreeMap<crate::store::LeaseKey, crate::store::Reservation>,
) -> Result<std::convert::Infallible, Gap> {
    let mut pending = Pending::default();
    let gap = follow_from(r, from, reservations, &mut pending).await;
    // What was read before the watch broke is this replica's to serve: `applied` is
    // already past it, and the watch resumes after it.
    pending.publish(&r.hub);
    gap
}

/// The longest the mirror holds a batch's first parts for the rest, when the leader
/// that writes it takes long or died half-way (a replica elected after it does not
/// wait this long: `Replica::elected`).
const BATCH_WAIT: Duration = Duration::from_secs(5);

/// What the mirror read and has not served yet.
#[derive(Default)]
struct Pending {
    events: Unpublished,
    /// The last event revision read.
    read: u64,
    /// Renewals read after unpublished events: applied once those are out (a renewal
    /// moves the expiry of a lease as the hub holds it).
    renewals: Vec<Lease>,
    /// The leader's batch being read: the revision it ends at, and since when.
    batch: Option<(u64, Instant)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Adds events read (in revision order).
    fn extend(&mut self, events: Vec<LeaseEvent>) {
        if let Some(last) = events.last() {
            self.read = self.read.max(last.revision);
        }
        self.events.extend(events);
    }

    /// The leader says its batch ends at `revision`.
    fn batch_ends_at(&mut self, revision: u64, now: Instant) {
        if revision > self.read {
            self.batch = Some((revision, now));
        }
    }

    /// Until when the events wait for the rest of their batch (`None`: they do not).
    fn held_until(&self) -> Option<Instant> {
        self.batch
            .filter(|&(end, since)| self.read < end && since.elapsed() < BATCH_WAIT)
            .map(|(_, since)| since + BATCH_WAIT)
    }

    fn is_due(&self, hub: &Hub) -> bool {
        self.held_until().is_none() && self.events.is_due(hub)
    }

    /// Waits until they may be due (ask [`Pending::is_due`] again).
    async fn until_due(&self, hub: &Hub) {
        match self.held_until() {
            Some(until) => tokio::time::sleep_until(until.into()).await,
            None => self.events.until_due(hub).await,
        }
    }

    /// Renewals: applied now, or after the events read before them.
    fn renew(&mut self, hub: &Hub, renewed: Vec<Lease>) {
        if self.events.is_empty() {
            hub.renew(&renewed);
        } else {
            self.renewals.extend(renewed);
        }
    }

    /// Publishes now, and holds nothing more for the batch being read: its leader is
    /// gone.
    fn release(&mut self, hub: &Hub) {
        self.batch = None;
        self.publish(hub);
    }

    fn publish(&mut self, hub: &Hub) {
        self.events.publish(hub);
        if !self.renewals.is_empty() {
            hub.renew(&std::mem::take(&mut self.renewals));
        }
    }
}

/// [`follow`], keeping what it read and has not published in `pending`.
async fn follow_from(
    r: &Replica,
    from: i64,
    reservations: &mut BTreeMap<crate::store::LeaseKey, crate::store::Reservation>,
    pending: &mut Pending,
) -> Result<std::convert::Infallible, Gap> {
    let key = r.store.etcd().range_start(Range::All);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                range_end: prefix_end(&key),
                key,
                start_revision: from,
                progress_notify: true,
                ..Default::default()
            },
        )),
    })
    .await
    .map_err(|_| Gap::Broken("the request channel closed".into()))?;
    let mut stream = WatchClient::new(r.store.etcd().channel())
        .max_decoding_message_size(usize::MAX)
        .watch(ReceiverStream::new(rx))
        .await
        .map_err(|s| Gap::Broken(s.message().to_string()))?
        .into_inner();
    loop {
        let next = if pending.is_empty() {
            stream.message().await
        } else {
            tokio::select! {
                next = stream.message() => next,
                () = pending.until_due(&r.hub) => {
                    if pending.is_due(&r.hub) {
                        pending.publish(&r.hub);
                    }
                    continue;
                }
                // The new leader waits for its hub to reach what etcd holds.
                () = r.elected.notified() => {
                    pending.release(&r.hub);
                    continue;
                }
            }
        };
        let resp = match next {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(Gap::Broken("etcd ended the watch".into())),
            Err(s) => return Err(Gap::Broken(s.message().to_string())),
        };
        if resp.compact_revision > 0 {
            warn!(
                compacted = resp.compact_revision,
                wanted = from,
                "etcd compacted the revisions this replica still needed"
            );
            return Err(Gap::Compacted);
        }
        if resp.canceled {
            return Err(Gap::Broken(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason
            )));
        }
        if resp.created {
            r.caught_up.store(true, Ordering::Relaxed);
            info!(from_etcd_revision = from, "following etcd");
        }
        let header_revision = resp.header.as_ref().map_or(0, |h| h.revision);
        apply(r, &resp.events, reservations, pending);
        if pending.is_due(&r.hub) {
            pending.publish(&r.hub);
        }
        // A progress notification (no events) still says everything up to its header
        // revision has been seen.
        let at = resp
            .events
            .iter()
            .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
            .max()
            .unwrap_or(if resp.events.is_empty() && !resp.created {
                header_revision
            } else {
                0
            });
        if at > *r.applied.borrow() {
            r.applied.send_replace(at);
        }
    }
}

/// Applies one watch response: events first (by revision, to `pending`), then
/// renewals, reservations and revocations.
fn apply(
    r: &Replica,
    events: &[twill_proto::etcd::mvccpb::Event],
    reservations: &mut BTreeMap<crate::store::LeaseKey, crate::store::Reservation>,
    pending: &mut Pending,
) {
    let mut lease_events: Vec<LeaseEvent> = Vec::new();
    let mut renewed = Vec::new();
    let mut reservations_changed = false;
    let mut batch_end = None;
    for e in events {
        let Some(kv) = &e.kv else { continue };
        let deleted = e.r#type == EtcdEvent::Delete as i32;
        if deleted {
            if let Some(Key::Reservation(network, node)) = r.store.etcd().decode(&kv.key) {
                reservations.remove(&(network, node));
                reservations_changed = true;
            }
            continue;
        }
        match r.store.entry(kv) {
            Ok(Entry::Event(ev)) => lease_events.push(ev),
            Ok(Entry::Lease(l)) => renewed.push(l),
            Ok(Entry::BatchEnd(end)) => batch_end = Some(end),
            Ok(Entry::Reservation(at, subnet)) => {
                reservations.insert(at, subnet);
                reservations_changed = true;
            }
            Ok(Entry::Record(kind, node)) => {
                if let Some(at) = NodeIdentity::revocation_record(kind, &kv.value) {
                    r.identity.revoked_at(&node, at);
                }
            }
            Ok(_) => {}
            Err(err) => {
                error!(key = %String::from_utf8_lossy(&kv.key), error = %err, "ignoring an unreadable key in etcd")
            }
        }
    }
    lease_events.sort_by_key(|e| e.revision);
    pending.extend(lease_events);
    if let Some(end) = batch_end {
        pending.batch_ends_at(end, Instant::now());
    }
    if !renewed.is_empty() {
        pending.renew(&r.hub, renewed);
    }
    // The leader's writer keeps the reservation view itself, with the reasons some
    // cannot be honoured.
    if reservations_changed && !r.is_leading() {
        r.hub
            .set_reservations(reservations.clone(), BTreeMap::new());
    }
}

/// After a compaction: read the table again and bring the hub up to it from the
/// stored event history.
async fn reload(
    r: &Replica,
    reservations: &mut BTreeMap<crate::store::LeaseKey, crate::store::Reservation>,
) -> Result<(), StoreError> {
    let (snap, at) = r.store.load_at().await?;
    let (_, revision) = r.hub.leases();
    let missed: Vec<LeaseEvent> = snap
        .history
        .into_iter()
        .filter(|e| e.revision > revision)
        .collect();
    if missed.first().is_some_and(|e| e.revision != revision + 1) && snap.revision > revision {
        error!(
            hub_revision = revision,
            stored_revision = snap.revision,
            "etcd no longer holds the events this replica missed; restart it to serve the current table"
        );
    }
    r.hub.commit(missed);
    r.hub.renew(&snap.leases);
    // Revocations made during the gap the watch lost.
    r.identity
        .reload()
        .await
        .map_err(|e| StoreError::Revocations(Box::new(e)))?;
    *reservations = snap.reservations;
    if !r.is_leading() {
        r.hub
            .set_reservations(reservations.clone(), BTreeMap::new());
    }
    r.applied.send_replace(at);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_proto::lease_event::Type as EventType;

    fn put(node: &str, revision: u64, expires: i64) -> LeaseEvent {
        LeaseEvent {
            r#type: EventType::Put as i32,
            revision,
            lease: Some(Lease {
                node_name: node.into(),
                revision,
                expires_at_unix: expires,
                ..Default::default()
            }),
        }
    }

    fn expiry(hub: &Hub, node: &str) -> Option<i64> {
        hub.lease(&Default::default(), node)
            .map(|l| l.expires_at_unix)
    }

    #[test]
    fn a_batch_read_in_parts_goes_out_once_its_last_part_is_read() {
        let hub = Hub::new(vec![], vec![], 0);
        let mut p = Pending::default();
        p.extend(vec![put("a", 1, 0), put("b", 2, 0)]);
        p.batch_ends_at(4, Instant::now());
        assert!(
            p.held_until().is_some(),
            "two of the batch's four events read"
        );
        assert!(!p.is_due(&hub));
        p.extend(vec![put("c", 3, 0)]);
        assert!(!p.is_due(&hub));
        p.extend(vec![put("d", 4, 0)]);
        assert_eq!(p.held_until(), None, "the whole batch is read");
        assert!(p.is_due(&hub), "a quiet hub takes it at once");
        p.publish(&hub);
        assert_eq!(hub.leases().1, 4);
        assert!(p.is_empty());
    }

    #[test]
    fn a_batch_end_already_read_holds_nothing_and_a_lost_one_holds_a_while() {
        let hub = Hub::new(vec![], vec![], 0);
        let mut p = Pending::default();
        p.extend(vec![put("a", 1, 0), put("b", 2, 0)]);
        p.batch_ends_at(2, Instant::now());
        assert_eq!(p.held_until(), None, "one response held the whole batch");
        assert!(p.is_due(&hub));
        // A leader that died half-way never writes the rest.
        p.batch_ends_at(9, Instant::now() - BATCH_WAIT);
        assert_eq!(p.held_until(), None);
        assert!(p.is_due(&hub));
        // A replica elected after such a leader publishes at once, and what it reads
        // of that batch afterwards is not held either.
        p.batch_ends_at(9, Instant::now());
        assert!(p.held_until().is_some());
        p.release(&hub);
        assert_eq!(hub.leases().1, 2);
        p.extend(vec![put("c", 3, 0)]);
        assert_eq!(p.held_until(), None);
    }

    #[test]
    fn a_renewal_read_behind_held_events_waits_for_them() {
        let hub = Hub::new(vec![], vec![], 0);
        let mut p = Pending::default();
        p.extend(vec![put("a", 1, 100)]);
        p.batch_ends_at(2, Instant::now());
        let renewed = Lease {
            node_name: "a".into(),
            revision: 1,
            expires_at_unix: 200,
            ..Default::default()
        };
        p.renew(&hub, vec![renewed.clone()]);
        assert_eq!(expiry(&hub, "a"), None, "held, with its event");
        p.extend(vec![put("b", 2, 100)]);
        p.publish(&hub);
        assert_eq!(
            expiry(&hub, "a"),
            Some(200),
            "its event first, then the renewal"
        );
        // With nothing unpublished a renewal is applied at once.
        p.renew(
            &hub,
            vec![Lease {
                expires_at_unix: 300,
                ..renewed
            }],
        );
        assert_eq!(expiry(&hub, "a"), Some(300));
    }
}
