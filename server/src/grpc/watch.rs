//! One watch stream: the initial snapshot or replay, then the live feed.
//!
//! The stream reads the shared broadcast directly: a batch exists once, encoded, however
//! many watchers there are, and each watcher only holds the message being sent.
//! Batches that queued up while a watcher was busy go out as one message (encoded
//! batches merge by concatenation). A watcher too slow to keep up falls behind the
//! broadcast's bounded ring and is sent a reset snapshot instead of growing memory.
//!
//! Agents' watches are served pre-encoded (`Encoded` and `codec`): the bytes go to
//! the connection as they are. The generated service methods (used by the admin API)
//! decode them into a `WatchResponse`.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tonic::Status;
use tracing::{info, warn};
use twill_proto::WatchResponse;

use crate::events::Hub;
use crate::metrics::{Agents, Metrics};

/// The response stream of a Watch call as the generated service traits want it.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// A `WatchResponse`, already encoded.
#[derive(Debug, Clone)]
pub struct Encoded(pub Bytes);

/// A stream of encoded watch messages.
pub type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

/// Bytes merged into one message at most, so one message (held per watcher while it
/// is sent) stays small.
const MAX_MERGED_BYTES: usize = 64 * 1024;

struct Watcher {
    id: u64,
    who: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    agents: Arc<Agents>,
    feed: broadcast::Receiver<Bytes>,
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
    fn reset(&mut self, missed: u64) -> (Bytes, u64) {
        warn!(node = %self.who, missed_batches = missed, "watcher fell behind; sending a reset snapshot");
        self.metrics.watcher_resets.inc();
        let (snapshot, fresh) = self.hub.resubscribe();
        self.feed = fresh;
        (snapshot.encode_to_vec().into(), snapshot.revision)
    }

    /// The next message and its revision: the initial one, else the next batch merged
    /// with whatever else is already queued. `None` when the stream should end.
    async fn next_message(&mut self) -> Option<(Bytes, u64)> {
        if let Some(initial) = self.initial.take() {
            return Some((initial.encode_to_vec().into(), initial.revision));
        }
        let first = tokio::select! {
            r = self.feed.recv() => r,
            _ = self.closing.wait_for(|closed| *closed) => return None,
        };
        let first = match first {
            Ok(batch) => batch,
            Err(RecvError::Lagged(n)) => return Some(self.reset(n)),
            Err(RecvError::Closed) => return None,
        };
        let mut merged: Option<BytesMut> = None;
        while merged.as_ref().map_or(first.len(), BytesMut::len) < MAX_MERGED_BYTES {
            match self.feed.try_recv() {
                Ok(batch) => merged
                    .get_or_insert_with(|| BytesMut::from(&first[..]))
                    .extend_from_slice(&batch),
                Err(TryRecvError::Lagged(n)) => return Some(self.reset(n)),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let msg = merged.map_or(first, BytesMut::freeze);
        // Only the revision is needed here; decoding a large batch for it would undo the
        // point of sharing it, so read the last revision field (it wins on the wire).
        let revision = last_revision(&msg).unwrap_or_else(|| self.hub.revision());
        Some((msg, revision))
    }
}

/// The value of the last `revision` (field 3, varint) in an encoded `WatchResponse`.
fn last_revision(mut buf: &[u8]) -> Option<u64> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut revision = None;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        if tag == 3 && wire == WireType::Varint {
            revision = Some(decode_varint(&mut buf).ok()?);
        } else {
            skip_field(wire, tag, &mut buf, DecodeContext::default()).ok()?;
        }
    }
    revision
}

/// Starts a watch for `who` after revision `from`: its messages, encoded.
pub fn encoded(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    who: String,
    from: u64,
) -> EncodedStream {
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
        let (msg, revision) = w.next_message().await?;
        w.metrics.events_sent.inc();
        w.agents.sent(w.id, revision);
        Some((Ok(Encoded(msg)), w))
    }))
}

/// The same stream, decoded, for the generated service traits.
pub fn stream(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    who: String,
    from: u64,
) -> WatchStream {
    Box::pin(encoded(hub, metrics, agents, who, from).map(|r| {
        r.and_then(|Encoded(b)| {
            WatchResponse::decode(b).map_err(|e| Status::internal(format!("watch message: {e}")))
        })
    }))
}

/// The gRPC codec of the agents' Watch: requests decoded by prost, responses written
/// as the pre-encoded bytes they already are.
pub mod codec {
    use bytes::BufMut;
    use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
    use tonic::Status;
    use tonic_prost::ProstDecoder;
    use twill_proto::WatchRequest;

    use super::Encoded;

    /// Encodes `Encoded`, decodes `WatchRequest`.
    #[derive(Debug, Clone, Default)]
    pub struct WatchCodec;

    /// Copies the pre-encoded bytes into the frame.
    #[derive(Debug, Clone, Default)]
    pub struct BytesEncoder;

    impl Encoder for BytesEncoder {
        type Item = Encoded;
        type Error = Status;

        fn encode(&mut self, item: Encoded, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item.0);
            Ok(())
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::default()
        }
    }

    impl Codec for WatchCodec {
        type Encode = Encoded;
        type Decode = WatchRequest;
        type Encoder = BytesEncoder;
        type Decoder = ProstDecoder<WatchRequest>;

        fn encoder(&mut self) -> BytesEncoder {
            BytesEncoder
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::default()
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
    async fn queued_batches_go_out_as_one_message_in_order() {
        let hub = Arc::new(Hub::new(vec![], vec![], 0));
        let metrics = Arc::new(Metrics::default());
        let agents = Arc::new(Agents::default());
        let mut s = stream(&hub, &metrics, &agents, "w".into(), 0);
        assert!(s.next().await.unwrap().unwrap().reset);
        for rev in 1..=3 {
            hub.commit(vec![put(rev)]);
        }
        let msg = s.next().await.unwrap().unwrap();
        assert!(!msg.reset);
        assert_eq!(msg.revision, 3, "the last batch's revision wins");
        assert_eq!(
            msg.events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            agents.watchers()[0].revision,
            3,
            "the sent revision is read off the encoding"
        );
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
