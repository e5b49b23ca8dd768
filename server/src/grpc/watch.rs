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
