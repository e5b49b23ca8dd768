//! One watch stream: the initial snapshot or replay, then the live feed, with a
//! bounded buffer per watcher. A watcher too slow to keep up lags behind the
//! broadcast and is sent a reset snapshot instead of growing memory.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{info, warn};
use twill_proto::WatchResponse;

use crate::events::Hub;
use crate::metrics::{Agents, Metrics};

/// Responses buffered per watcher before its feed task waits (and, waiting too long,
/// lags and gets a reset): bounds memory per slow watcher.
const WATCH_BUFFER: usize = 16;

/// The response stream of a Watch call.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// Starts a watch for `who` after revision `from` and returns its stream.
pub fn stream(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    who: String,
    from: u64,
) -> WatchStream {
    let sub = hub.subscribe(from);
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let hub = hub.clone();
    let metrics = metrics.clone();
    let agents = agents.clone();
    let id = agents.connected(&who, from);
    metrics.watchers.inc();
    info!(node = %who, from_revision = from, reset = sub.initial.as_ref().is_some_and(|i| i.reset), "watcher connected");
    tokio::spawn(async move {
        let mut feed = sub.feed;
        let mut pending = sub.initial;
        loop {
            if let Some(msg) = pending.take() {
                let revision = msg.revision;
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
                metrics.events_sent.inc();
                agents.sent(id, revision);
            }
            let next = tokio::select! {
                r = feed.recv() => r,
                () = tx.closed() => break,
            };
            pending = match next {
                Ok(batch) => Some((*batch).clone()),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(node = %who, missed_batches = n, "watcher fell behind; sending a reset snapshot");
                    metrics.watcher_resets.inc();
                    let (snapshot, fresh) = hub.resubscribe();
                    feed = fresh;
                    Some(snapshot)
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
        }
        metrics.watchers.dec();
        agents.disconnected(id);
        info!(node = %who, "watcher disconnected");
    });
    Box::pin(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use twill_proto::{lease_event::Type as EventType, Lease, LeaseEvent};

    use super::*;

    fn put(rev: u64) -> LeaseEvent {
        LeaseEvent {
            r#type: EventType::Put as i32,
            revision: rev,
            lease: Some(Lease {
                node_name: format!("n{rev}"),
                revision: rev,
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn a_stalled_watcher_gets_a_reset_and_does_not_hold_up_others() {
        let hub = Arc::new(Hub::with_capacity(vec![], vec![], 0, 8));
        let metrics = Arc::new(Metrics::default());
        let agents = Arc::new(Agents::default());
        let mut slow = stream(&hub, &metrics, &agents, "slow".into(), 0);
        let mut fast = stream(&hub, &metrics, &agents, "fast".into(), 0);
        assert!(fast.next().await.unwrap().unwrap().reset, "initial snapshot");
        let mut fast_seen = 0;
        for rev in 1..=200 {
            hub.commit(vec![put(rev)]);
            // The fast watcher keeps up; the slow one is never read meanwhile.
            let msg = fast.next().await.unwrap().unwrap();
            assert!(!msg.reset);
            fast_seen += msg.events.len();
            tokio::task::yield_now().await;
        }
        assert_eq!(fast_seen, 200, "the fast watcher got every event in order");

        let mut got_reset = false;
        let mut last = 0;
        while last < 200 {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(5), slow.next())
                .await
                .expect("slow watcher still served")
                .unwrap()
                .unwrap();
            got_reset |= msg.reset && msg.revision > 0;
            last = msg.revision;
        }
        assert!(got_reset, "the stalled watcher was sent a reset snapshot");
        assert_eq!(metrics.watcher_resets.get(), 1);
        assert_eq!(agents.watchers().len(), 2);
    }
}
