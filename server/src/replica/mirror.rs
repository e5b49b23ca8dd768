//! The mirror: this replica's own etcd watch on the prefix, applied to its hub.
//!
//! Events are applied by their Twill revision, so a replica serves exactly the
//! sequence the leader wrote; the leader's hub also gets them straight from its writer,
//! and whichever comes second is skipped. They are published as the lease writer
//! publishes (`events::Unpublished`): in a burst, several of the leader's transactions
//! go out to this replica's agents as one message. Lease keys that change without an
//! event are renewals (a new expiry); reservation keys replace the reservation view of
//! a follower; revocation records are put in force.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};
use twill_proto::etcd::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest,
};
use twill_proto::etcd::mvccpb::event::EventType as EtcdEvent;
use twill_proto::LeaseEvent;

use super::Replica;
use crate::events::Unpublished;
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
    let mut unpublished = Unpublished::default();
    let gap = follow_from(r, from, reservations, &mut unpublished).await;
    // What was read before the watch broke is this replica's to serve: `applied` is
    // already past it, and the watch resumes after it.
    unpublished.publish(&r.hub);
    gap
}

/// [`follow`], keeping what it read and has not published in `unpublished`.
async fn follow_from(
    r: &Replica,
    from: i64,
    reservations: &mut BTreeMap<crate::store::LeaseKey, crate::store::Reservation>,
    unpublished: &mut Unpublished,
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
        let next = if unpublished.is_empty() {
            stream.message().await
        } else {
            tokio::select! {
                next = stream.message() => next,
                () = unpublished.until_due(&r.hub) => {
                    if unpublished.is_due(&r.hub) {
                        unpublished.publish(&r.hub);
                    }
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
        apply(r, &resp.events, reservations, unpublished);
        if unpublished.is_due(&r.hub) {
            unpublished.publish(&r.hub);
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

/// Applies one watch response: events first (by revision, to `unpublished`), then
/// renewals, reservations and revocations.
fn apply(
    r: &Replica,
    events: &[twill_proto::etcd::mvccpb::Event],
    reservations: &mut BTreeMap<crate::store::LeaseKey, crate::store::Reservation>,
    unpublished: &mut Unpublished,
) {
    let mut lease_events: Vec<LeaseEvent> = Vec::new();
    let mut renewed = Vec::new();
    let mut reservations_changed = false;
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
    unpublished.extend(lease_events);
    if !renewed.is_empty() {
        // A renewal moves the expiry of a lease as the hub holds it: after its events.
        unpublished.publish(&r.hub);
        r.hub.renew(&renewed);
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
