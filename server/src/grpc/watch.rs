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
//!
//! Every watch ends when the client certificate it was opened with expires or is
//! revoked: the connection's handshake checked it once, and a watch may outlive it. An
//! agent's also ends (UNAVAILABLE) when `replica::rebalance` asks it to move to another
//! replica.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;
use tracing::{info, warn};
use twill_common::tls::Identity as CertIdentity;
use twill_proto::WatchResponse;

use super::auth;
use crate::agents::Agents;
use crate::events::{self, Hub, Networks, Subscription};
use crate::identity::Identity;
use crate::metrics::Metrics;

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
    /// What is still to send first, and the live feed.
    sub: Subscription,
    closing: tokio::sync::watch::Receiver<bool>,
    /// The networks it follows.
    networks: Networks,
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
    fn reset(&mut self, missed: u64) {
        warn!(node = %self.who, missed_batches = missed, "watcher fell behind; sending a reset snapshot");
        self.metrics.watcher_resets.inc();
        self.sub = self.hub.resubscribe(&self.networks);
    }

    /// The next message and its revision: the initial one (and its catch-up), else the
    /// next committed batch with events of the watcher's networks, as shared. `None`
    /// when the stream should end.
    async fn next_message(&mut self) -> Option<(Bytes, u64)> {
        loop {
            let sub = &mut self.sub;
            if let Some(first) = sub.initial.take().or_else(|| sub.catch_up.take()) {
                return Some((first.encoded, first.revision));
            }
            let next = tokio::select! {
                r = self.sub.feed.recv() => r,
                _ = self.closing.wait_for(|closed| *closed) => return None,
            };
            match next {
                Ok(batch) => {
                    batch.taken();
                    if let Some(msg) = batch.for_networks(&self.networks) {
                        return Some((msg, batch.revision));
                    }
                }
                Err(RecvError::Lagged(n)) => self.reset(n),
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// What a watch touches: the hub it follows, the metrics and agent records it keeps,
/// and the identity whose revocations end it. The agent and admin services share one.
#[derive(Clone)]
pub struct Sources {
    /// The committed table and its fan-out.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Connected agents.
    pub agents: Arc<Agents>,
    /// Revoked node certificates (and, for the admin API, tokens and issued certificates).
    pub identity: Arc<Identity>,
    /// Every node's pods, as reported.
    pub pods: Arc<crate::pods::PodTable>,
}

impl Sources {
    /// [`encoded`] over these sources.
    pub fn encoded(&self, who: &CertIdentity, start: Start, networks: Networks) -> EncodedStream {
        encoded(
            &self.hub,
            &self.metrics,
            &self.agents,
            &self.identity,
            who,
            start,
            networks,
        )
    }
}

/// Where a watch starts: after revision `from` (0: from scratch) of store `epoch`
/// (empty: not checked).
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    /// The revision the watcher has seen.
    pub from: u64,
    /// The store epoch that revision is of.
    pub epoch: &'a str,
}

/// Starts a watch of `networks` for the holder of certificate `who` at `start`: its
/// messages, encoded, until the certificate stops being valid.
pub fn encoded(
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    agents: &Arc<Agents>,
    identity: &Arc<Identity>,
    who: &CertIdentity,
    start: Start<'_>,
    networks: Networks,
) -> EncodedStream {
    let from = start.from;
    let sub = hub.subscribe(from, start.epoch, &networks);
    info!(node = %who.name, from_revision = from, networks = %networks, reset = sub.initial.as_ref().is_some_and(|i| i.reset), "watcher connected");
    metrics.watchers.inc();
    let node = who.role() == Some(twill_common::tls::Role::Node);
    let id = agents.connected(&who.name, from, who.not_after_unix, node);
    let watcher = Watcher {
        id,
        who: who.name.clone(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        agents: agents.clone(),
        sub,
        closing: hub.closing(),
        networks,
    };
    let messages = Box::pin(futures::stream::unfold(watcher, |mut w| async move {
        let (msg, revision) = w.next_message().await?;
        w.metrics.events_sent.inc();
        w.agents.sent(w.id, revision);
        Some((Ok(Encoded(msg)), w))
    }));
    let agents = agents.clone();
    let who_name = who.name.clone();
    let moved = async move {
        agents.move_asked(id).await;
        info!(node = %who_name, "asking the agent to move its watch to another replica");
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert(
            twill_common::MOVE_TRAILER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        Status::with_metadata(tonic::Code::Unavailable, MOVE_MESSAGE, meta)
    };
    while_valid(messages, identity.clone(), who.clone(), moved)
}

/// The message of the status that ends a watch asked to move to another replica.
pub const MOVE_MESSAGE: &str =
    "this controller replica serves more than its share of the agents: resume on another";

/// `stream`, ended as soon as certificate `who` stops being valid, whichever comes
/// first: UNAUTHENTICATED when it expires, PERMISSION_DENIED when it is revoked (node
/// certificates). TLS checked the certificate only when the connection opened, and a
/// watch lasts as long as the connection. Also ended with `moved`'s status, when it
/// resolves.
fn while_valid(
    stream: EncodedStream,
    identity: Arc<Identity>,
    who: CertIdentity,
    moved: impl Future<Output = Status> + Send + 'static,
) -> EncodedStream {
    let invalid: Pin<Box<dyn Future<Output = Status> + Send>> = Box::pin(async move {
        tokio::select! {
            status = expiry(&who) => status,
            status = revocation(&identity, &who) => status,
            status = moved => status,
        }
    });
    // Once the certificate is invalid the watch itself is dropped at once (its place
    // in the broadcast with it), not when the caller gets round to dropping the stream.
    Box::pin(futures::stream::unfold(
        Some((stream, invalid)),
        |state| async move {
            let (mut stream, mut invalid) = state?;
            tokio::select! {
                item = stream.next() => item.map(|i| (i, Some((stream, invalid)))),
                status = &mut invalid => Some((Err(status), None)),
            }
        },
    ))
}

/// Resolves once certificate `who` has expired, with the status that says so. One timer
/// per watch, not a poll: an agent that rotates moves its watch to a new connection
/// before this fires, and the old stream's timer goes with it.
async fn expiry(who: &CertIdentity) -> Status {
    // A certificate is valid through its not-after second; one whose end the clock
    // cannot even hold never expires here.
    let after = Duration::from_secs(who.not_after_unix.saturating_add(1).max(0) as u64);
    let Some(end) = UNIX_EPOCH.checked_add(after) else {
        return std::future::pending().await;
    };
    // The timer runs on the monotonic clock, the certificate on the wall clock: woken,
    // check the wall clock again in case the two drifted apart meanwhile.
    while let Ok(left) = end.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    info!(node = %who.name, not_after_unix = who.not_after_unix, "closing the watch of an expired certificate");
    auth::expired(who)
}

/// Resolves once certificate `who` is revoked (nodes and admins can be), with the
/// status that says so.
async fn revocation(identity: &Identity, who: &CertIdentity) -> Status {
    let mut changes = identity.revocations();
    loop {
        // Checked before the first wait too: a revocation between the call's own check
        // and the subscription above would otherwise go unseen.
        if let Some(why) = identity.refused(who) {
            info!(node = %who.name, "closing the watch of a revoked certificate");
            return Status::permission_denied(why);
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// An encoded watch stream decoded again, for a service trait that wants messages
/// (the admin API's Watch).
pub fn decoded(encoded: EncodedStream) -> WatchStream {
    Box::pin(encoded.flat_map(|r| {
        let msgs: Vec<Result<WatchResponse, Status>> = match r {
            Ok(Encoded(b)) => match events::decode(&b) {
                Ok(msgs) => msgs.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(Status::internal(format!("watch message: {e}")))],
            },
            Err(s) => vec![Err(s)],
        };
        futures::stream::iter(msgs)
    }))
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
        /// A body streaming `messages`, already framed.
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

    /// Revocations and tokens on a throwaway store; the directory lives as long as it.
    async fn identity() -> (tempfile::TempDir, Arc<Identity>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::SledStore::open(dir.path(), 16).unwrap());
        let metrics = Arc::new(Metrics::default());
        let identity = Identity::new(store, None, Duration::from_secs(3600), metrics)
            .await
            .unwrap();
        (dir, Arc::new(identity))
    }

    fn scratch() -> Start<'static> {
        Start { from: 0, epoch: "" }
    }

    /// A node certificate for `name` valid until `not_after_unix`.
    fn node(name: &str, not_after_unix: i64) -> CertIdentity {
        CertIdentity {
            name: name.into(),
            groups: vec![twill_common::tls::NODES_GROUP.into()],
            not_before_unix: 0,
            not_after_unix,
            key_sha256: [0; 32],
        }
    }

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
        let (_dir, identity) = identity().await;
        let who = node("w", i64::MAX);
        let mut s = encoded(
            &hub,
            &metrics,
            &agents,
            &identity,
            &who,
            scratch(),
            Networks::default_only(),
        );
        let first = events::decode(&s.next().await.unwrap().unwrap().0).unwrap();
        assert!(first[0].reset);
        let mut feed = hub.subscribe(0, "", &Networks::default_only()).feed;
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
        let (_dir, identity) = identity().await;
        let (slow_cert, fast_cert) = (node("slow", i64::MAX), node("fast", i64::MAX));
        let mut slow = decoded(encoded(
            &hub,
            &metrics,
            &agents,
            &identity,
            &slow_cert,
            scratch(),
            Networks::default_only(),
        ));
        let mut fast = decoded(encoded(
            &hub,
            &metrics,
            &agents,
            &identity,
            &fast_cert,
            scratch(),
            Networks::default_only(),
        ));
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

    #[tokio::test]
    async fn a_watch_ends_when_its_certificate_expires_and_not_before() {
        let hub = Arc::new(Hub::new(vec![], vec![], 0));
        let metrics = Arc::new(Metrics::default());
        let agents = Arc::new(Agents::default());
        let (_dir, identity) = identity().await;
        // Valid through the next second; a certificate of the same node valid for a day
        // (the one an agent rotated to) watches beside it.
        let not_after = twill_common::now_unix() + 1;
        let old = node("node-1", not_after);
        let rotated = node("node-1", not_after + 86_400);
        let mut expiring = encoded(
            &hub,
            &metrics,
            &agents,
            &identity,
            &old,
            scratch(),
            Networks::default_only(),
        );
        let mut current = encoded(
            &hub,
            &metrics,
            &agents,
            &identity,
            &rotated,
            scratch(),
            Networks::default_only(),
        );
        expiring.next().await.unwrap().expect("snapshot");
        current.next().await.unwrap().expect("snapshot");
        let mut seen: Vec<i64> = agents.watchers().iter().map(|w| w.cert_not_after).collect();
        seen.sort_unstable();
        assert_eq!(seen, [not_after, not_after + 86_400]);

        let ended = tokio::time::timeout(Duration::from_secs(5), expiring.next())
            .await
            .expect("ended within 5s of the expiry")
            .unwrap()
            .unwrap_err();
        assert!(
            twill_common::now_unix() > not_after,
            "not before the certificate's last second was over"
        );
        assert_eq!(ended.code(), tonic::Code::Unauthenticated);
        assert!(
            ended
                .message()
                .starts_with("client certificate of node node-1 expired at ")
                && ended
                    .message()
                    .ends_with("; reconnect with a current certificate"),
            "{}",
            ended.message()
        );
        assert_eq!(agents.watchers().len(), 1, "the expired watcher is gone");
        assert!(expiring.next().await.is_none(), "nothing after the status");

        hub.commit(vec![put(1)]);
        let msg = tokio::time::timeout(Duration::from_secs(5), current.next())
            .await
            .expect("the current certificate's watch goes on")
            .unwrap()
            .unwrap();
        assert_eq!(events::decode(&msg.0).unwrap()[0].revision, 1);
    }

    #[tokio::test]
    async fn agents_asked_to_move_end_with_the_move_trailer_and_admins_are_never_asked() {
        let hub = Arc::new(Hub::new(vec![], vec![], 0));
        let metrics = Arc::new(Metrics::default());
        let agents = Arc::new(Agents::default());
        let (_dir, identity) = identity().await;
        let day = twill_common::now_unix() + 86_400;
        let admin = CertIdentity {
            groups: vec![twill_common::tls::ADMINS_GROUP.into()],
            ..node("alice", day)
        };
        let open = |who: &CertIdentity| {
            encoded(
                &hub,
                &metrics,
                &agents,
                &identity,
                who,
                scratch(),
                Networks::default_only(),
            )
        };
        let mut nodes: Vec<EncodedStream> =
            (0..3).map(|i| open(&node(&format!("n{i}"), day))).collect();
        let mut admin_watch = open(&admin);
        for w in nodes.iter_mut().chain([&mut admin_watch]) {
            w.next().await.unwrap().expect("snapshot");
        }
        assert_eq!(agents.node_watchers(), 3);

        assert_eq!(agents.ask_to_move(2), 2);
        assert_eq!(agents.ask_to_move(5), 1, "only the agents not asked yet");
        assert_eq!(agents.ask_to_move(5), 0, "the admin's watch is never asked");
        for w in &mut nodes {
            let end = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("ended")
                .unwrap()
                .unwrap_err();
            assert_eq!(end.code(), tonic::Code::Unavailable);
            assert!(
                end.metadata().contains_key(twill_common::MOVE_TRAILER),
                "{end:?}"
            );
            assert!(w.next().await.is_none(), "nothing after the status");
        }
        assert_eq!(agents.node_watchers(), 0);
        hub.commit(vec![put(1)]);
        let msg = tokio::time::timeout(Duration::from_secs(5), admin_watch.next())
            .await
            .expect("the admin's watch goes on")
            .unwrap()
            .unwrap();
        assert_eq!(events::decode(&msg.0).unwrap()[0].revision, 1);
    }
}
