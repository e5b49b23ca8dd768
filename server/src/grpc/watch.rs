//! One watch stream: the initial snapshot or replay, then the live feed.
//!
//! The stream reads the shared broadcast directly: a batch exists once, encoded, however
//! many watchers there are. A watcher too slow to keep up falls behind the broadcast's
//! bounded ring and is sent a reset snapshot instead of growing memory.
//!
//! Agents' watches are served pre-encoded and without copies (`Encoded`, `body`): the
//! response body hands the shared bytes to the connection, so what thousands of slow
//! watchers have not been sent yet is the same few batches, referenced, not a copy each
//! (a copy each was over a gigabyte in a 5,000-node join storm). The generated service
//! methods (used by the admin API) decode them into a `WatchResponse`.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};
use tonic::Status;
use tracing::{info, warn};
use twill_proto::WatchResponse;

use crate::events::{self, Hub, WatchMessage};
use crate::metrics::{Agents, Metrics};

/// The response stream of a Watch call as the generated service traits want it.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// `WatchResponse`s, already encoded as gRPC messages (`events::decode` reads them).
#[derive(Debug, Clone)]
pub struct Encoded(pub Bytes);

/// A stream of encoded watch messages.
pub type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

struct Watcher {
    id: u64,
    who: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    agents: Arc<Agents>,
    feed: broadcast::Receiver<WatchMessage>,
    initial: Option<WatchMessage>,
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
    fn reset(&mut self, missed: u64) -> (Bytes, u64) {
        warn!(node = %self.who, missed_batches = missed, "watcher fell behind; sending a reset snapshot");
        self.metrics.watcher_resets.inc();
        let (snapshot, fresh) = self.hub.resubscribe();
        self.feed = fresh;
        (snapshot.encoded, snapshot.revision)
    }

    /// The next message and its revision: the initial one, else the next committed
    /// batch, as shared. `None` when the stream should end.
    async fn next_message(&mut self) -> Option<(Bytes, u64)> {
        if let Some(initial) = self.initial.take() {
            return Some((initial.encoded, initial.revision));
        }
        let next = tokio::select! {
            r = self.feed.recv() => r,
            _ = self.closing.wait_for(|closed| *closed) => return None,
        };
        match next {
            Ok(batch) => Some((batch.encoded, batch.revision)),
            Err(RecvError::Lagged(n)) => Some(self.reset(n)),
            Err(RecvError::Closed) => None,
        }
    }
}

/// Starts a watch for `who` after revision `from` of store `epoch`: its messages,
/// encoded.
pub fn encoded(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    who: String,
    from: u64,
    epoch: &str,
) -> EncodedStream {
    let sub = hub.subscribe(from, epoch);
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
        let (msg, revision) = w.next_message().await?;
        w.metrics.events_sent.inc();
        w.agents.sent(w.id, revision);
        Some((Ok(Encoded(msg)), w))
    }))
}

/// `stream`, ended with PERMISSION_DENIED as soon as the certificates of `node` valid
/// from `not_before_unix` are revoked.
pub fn until_revoked(
    stream: EncodedStream,
    identity: Arc<crate::identity::Identity>,
    node: String,
    not_before_unix: i64,
) -> EncodedStream {
    let mut changes = identity.revocations();
    let revoked: Pin<Box<dyn std::future::Future<Output = Status> + Send>> = Box::pin(async move {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(why) = identity.revoked(&node, not_before_unix) {
                info!(node = %node, "closing the watch of a revoked certificate");
                return Status::permission_denied(why);
            }
        }
    });
    Box::pin(futures::stream::unfold(
        (stream, revoked, false),
        |(mut stream, mut revoked, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                item = stream.next() => item.map(|i| (i, (stream, revoked, false))),
                status = &mut revoked => Some((Err(status), (stream, revoked, true))),
            }
        },
    ))
}

/// The same stream, decoded, for the generated service traits.
pub fn stream(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    who: String,
    from: u64,
    epoch: &str,
) -> WatchStream {
    Box::pin(
        encoded(hub, metrics, agents, who, from, epoch).flat_map(|r| {
            let msgs: Vec<Result<WatchResponse, Status>> = match r {
                Ok(Encoded(b)) => match events::decode(&b) {
                    Ok(msgs) => msgs.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(Status::internal(format!("watch message: {e}")))],
                },
                Err(s) => vec![Err(s)],
            };
            futures::stream::iter(msgs)
        }),
    )
}

/// The HTTP body of an agent's Watch response: each message, already framed for gRPC,
/// passed on as the shared `Bytes` it is (one HTTP/2 frame, no copy); the call's status
/// in the trailers when the stream ends.
pub mod body {
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use futures::StreamExt;
    use http::HeaderMap;
    use http_body::Frame;
    use tonic::Status;

    use super::{Encoded, EncodedStream};

    /// The response body of one watch.
    pub struct WatchBody {
        messages: EncodedStream,
        ended: bool,
    }

    impl WatchBody {
        pub fn new(messages: EncodedStream) -> Self {
            WatchBody {
                messages,
                ended: false,
            }
        }
    }

    fn trailers(status: &Status) -> HeaderMap {
        let mut h = HeaderMap::new();
        if status.add_header(&mut h).is_err() {
            h.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        h
    }

    impl http_body::Body for WatchBody {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if self.ended {
                return Poll::Ready(None);
            }
            let end = |this: &mut Self, status: &Status| {
                this.ended = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(status)))))
            };
            match self.messages.poll_next_unpin(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(Encoded(msg)))) => Poll::Ready(Some(Ok(Frame::data(msg)))),
                Poll::Ready(Some(Err(status))) => end(&mut self, &status),
                Poll::Ready(None) => end(&mut self, &Status::ok("")),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.ended
        }
    }
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
    async fn queued_batches_go_out_in_order_as_shared() {
        let hub = Arc::new(Hub::new(vec![], vec![], 0));
        let metrics = Arc::new(Metrics::default());
        let agents = Arc::new(Agents::default());
        let mut s = encoded(&hub, &metrics, &agents, "w".into(), 0, "");
        let first = events::decode(&s.next().await.unwrap().unwrap().0).unwrap();
        assert!(first[0].reset);
        let mut feed = hub.subscribe(0, "").feed;
        for rev in 1..=3 {
            hub.commit(vec![put(rev)]);
        }
        for rev in 1..=3 {
            let Encoded(msg) = s.next().await.unwrap().unwrap();
            let committed = feed.recv().await.unwrap().encoded;
            assert_eq!(
                msg.as_ptr(),
                committed.as_ptr(),
                "the committed bytes themselves, not a copy"
            );
            let msg = &events::decode(&msg).unwrap()[0];
            assert_eq!((msg.reset, msg.revision), (false, rev));
        }
        assert_eq!(
            agents.watchers()[0].revision,
            3,
            "the sent revision is the batch's"
        );
    }

    #[tokio::test]
    async fn the_body_passes_messages_on_and_ends_with_the_status() {
        use http_body_util::BodyExt;
        let msg = Bytes::from(vec![0, 0, 0, 0, 3, 1, 2, 3]);
        let msgs: Vec<Result<Encoded, Status>> = vec![
            Ok(Encoded(msg.clone())),
            Err(Status::unavailable("controller shutting down")),
        ];
        let mut body = body::WatchBody::new(Box::pin(futures::stream::iter(msgs)));
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            data.as_ptr(),
            msg.as_ptr(),
            "the message itself, not a copy"
        );
        let t = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(t["grpc-status"], "14");
        assert!(body.frame().await.is_none());
        assert!(http_body::Body::is_end_stream(&body));
    }

    #[tokio::test]
    async fn a_stalled_watcher_gets_a_reset_and_does_not_hold_up_others() {
        let hub = Arc::new(Hub::with_capacity(vec![], vec![], 0, 8));
        let metrics = Arc::new(Metrics::default());
        let agents = Arc::new(Agents::default());
        let mut slow = stream(&hub, &metrics, &agents, "slow".into(), 0, "");
        let mut fast = stream(&hub, &metrics, &agents, "fast".into(), 0, "");
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
