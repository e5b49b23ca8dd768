//! One watch stream: the initial snapshot or replay, then the live feed.
//!
//! The stream reads the shared broadcast directly: a batch exists once however many
//! watchers there are, and each watcher only holds the message being sent. Batches
//! that queued up while a watcher was busy go out as one message. A watcher too slow
//! to keep up falls behind the broadcast's bounded ring and is sent a reset snapshot
//! instead of growing memory.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tonic::Status;
use tracing::{info, warn};
use twill_proto::WatchResponse;

use crate::events::Hub;
use crate::metrics::{Agents, Metrics};

/// The response stream of a Watch call.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// Events merged into one message at most, so one message (held per watcher while it
/// is sent) stays small.
const MAX_MERGED_EVENTS: usize = 512;

struct Watcher {
    id: u64,
    who: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    agents: Arc<Agents>,
    feed: broadcast::Receiver<Arc<WatchResponse>>,
    initial: Option<WatchResponse>,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.metrics.watchers.dec();
        self.agents.disconnected(self.id);
        info!(node = %self.who, "watcher disconnected");
    }
}

impl Watcher {
    /// A reset snapshot and a fresh feed, for a watcher that fell behind.
    fn reset(&mut self, missed: u64) -> WatchResponse {
        warn!(node = %self.who, missed_batches = missed, "watcher fell behind; sending a reset snapshot");
        self.metrics.watcher_resets.inc();
        let (snapshot, fresh) = self.hub.resubscribe();
        self.feed = fresh;
        snapshot
    }

    /// The next message: the initial one, else the next batch merged with whatever
    /// else is already queued. `None` when the stream should end.
    async fn next_message(&mut self) -> Option<WatchResponse> {
        if let Some(initial) = self.initial.take() {
            return Some(initial);
        }
        let first = tokio::select! {
            r = self.feed.recv() => r,
            _ = self.closing.wait_for(|closed| *closed) => return None,
        };
        let mut msg = match first {
            Ok(batch) => (*batch).clone(),
            Err(RecvError::Lagged(n)) => return Some(self.reset(n)),
            Err(RecvError::Closed) => return None,
        };
        while msg.events.len() < MAX_MERGED_EVENTS {
            match self.feed.try_recv() {
                Ok(batch) => {
                    msg.events.extend(batch.events.iter().cloned());
                    msg.revision = batch.revision;
                }
                Err(TryRecvError::Lagged(n)) => return Some(self.reset(n)),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        Some(msg)
    }
}

/// Starts a watch for `who` after revision `from` and returns its stream.
pub fn stream(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    who: String,
    from: u64,
) -> WatchStream {
    let sub = hub.subscribe(from);
    info!(node = %who, from_revision = from, reset = sub.initial.as_ref().is_some_and(|i| i.reset), "watcher connected");
    metrics.watchers.inc();
    let watcher = Watcher {
        id: agents.connected(&who, from),
        who,
        hub: hub.clone(),
        metrics: metrics.clone(),
        agents: agents.clone(),
        feed: sub.feed,
        initial: sub.initial,
        closing: hub.closing(),
    };
    Box::pin(futures::stream::unfold(watcher, |mut w| async move {
        let msg = w.next_message().await?;
        w.metrics.events_sent.inc();
        w.agents.sent(w.id, msg.revision);
        Some((Ok(msg), w))
    }))
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
        assert!(
            fast.next().await.unwrap().unwrap().reset,
            "initial snapshot"
        );
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
