//! The lease watch as a session: the stream open (with the connection it was opened
//! on, which must live as long as the stream), whether it is to move to the current
//! certificate's connection, the parts of a reset being put together, where to resume
//! from (revision and store epoch), which networks it streams (one stream, one
//! revision sequence for all of them: a change of networks starts over from revision
//! 0), and when to try again. The daemon opens streams and reads them; it tells the session what happened
//! (opened, a message, a break, new credentials) and the session says what follows.
//! Generic over the stream and the connection so that it is tested without a
//! controller.

use std::time::Duration;

use tokio::time::Instant;
use twill_proto::{WatchRequest, WatchResponse};

use crate::client::Assembler;
use crate::schedule::Retry;

/// One agent's lease watch.
pub struct WatchSession<S, C> {
    open: Option<(S, C)>,
    /// The open stream is on an older certificate's connection: a new one is opened
    /// first and replaces it, so no event is missed.
    moving: bool,
    assembler: Assembler,
    retry: Retry,
    /// The revision applied: a new stream resumes after it.
    revision: u64,
    /// The store epoch `revision` belongs to (another epoch: the controller resets).
    epoch: String,
    /// The networks to stream, as the request names them (empty: `default` only).
    networks: Vec<String>,
    /// The networks changed since the open stream was asked for: the next one starts
    /// from revision 0, a reset of every network.
    restart: bool,
    /// The networks the last request named.
    requested: Vec<String>,
    /// The networks the open stream carries, as its request named them.
    streaming: Vec<String>,
}

/// What an opened stream was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The watch (there was none open).
    First,
    /// The replacement of one on an older connection.
    Moved,
}

impl<S, C> WatchSession<S, C> {
    /// No stream yet; the first open is due now, failures back off up to `cap`.
    pub fn new(cap: Duration) -> Self {
        WatchSession {
            open: None,
            moving: false,
            assembler: Assembler::default(),
            retry: Retry::now(cap),
            revision: 0,
            epoch: String::new(),
            networks: Vec::new(),
            restart: false,
            requested: Vec::new(),
            streaming: Vec::new(),
        }
    }

    /// The networks the open stream carries, as its request named them (empty:
    /// `default` only): what a reset from it covers.
    pub fn streaming(&self) -> &[String] {
        &self.streaming
    }

    /// What to open the next stream with: resume after the revision applied, or from
    /// scratch when the networks changed.
    pub fn request(&mut self) -> WatchRequest {
        self.requested.clone_from(&self.networks);
        WatchRequest {
            from_revision: if self.restart { 0 } else { self.revision },
            epoch: self.epoch.clone(),
            networks: self.networks.clone(),
        }
    }

    /// The networks to stream, as the request names them. A change reopens the watch
    /// from revision 0 (the open stream serves until the new one is open).
    pub fn watch_networks(&mut self, networks: Vec<String>) {
        if networks == self.networks {
            return;
        }
        self.networks = networks;
        self.restart = true;
        self.move_to_current();
    }

    /// The revision applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The stream to read, if one is open (while a move is pending, the old one).
    pub fn stream(&mut self) -> Option<&mut S> {
        self.open.as_mut().map(|(s, _)| s)
    }

    /// Whether a stream is to be opened: none is open, or one is to move.
    pub fn wants_open(&self) -> bool {
        self.open.is_none() || self.moving
    }

    /// When the next open is due.
    pub fn due(&self) -> Instant {
        self.retry.due()
    }

    /// A stream was opened on `conn`; it replaces the one open, if any.
    pub fn opened(&mut self, stream: S, conn: C) -> Opened {
        let kind = if self.open.is_some() {
            Opened::Moved
        } else {
            Opened::First
        };
        // A stream asked for before the networks last changed is a stop-gap: another
        // replaces it at once.
        let current = self.requested == self.networks;
        self.restart &= !current;
        self.moving = !current;
        self.assembler.clear();
        self.open = Some((stream, conn));
        self.streaming.clone_from(&self.requested);
        // An open watch is a success: on a quiet table no message follows that would
        // reset the wait, and the next break would wait longer and longer.
        self.retry.settled();
        if !current {
            self.retry.set(Instant::now());
        }
        kind
    }

    /// Opening failed; `moved`: the controller did not answer and new calls moved to
    /// the next of `replicas` URLs. The wait before the next try.
    pub fn open_failed(&mut self, moved: bool, replicas: usize) -> Duration {
        self.retry.failed(moved, replicas)
    }

    /// A message arrived: a complete response to apply, once every part of a reset is
    /// in, without the events applied already (a stream moved to a new connection
    /// resumes from the revision applied when it was opened, so it may repeat what the
    /// old one delivered since). The session then counts it as applied.
    pub fn message(&mut self, msg: WatchResponse) -> Option<WatchResponse> {
        self.retry.heard();
        let mut whole = self.assembler.push(msg)?;
        if whole.reset {
            self.revision = whole.revision;
        } else {
            whole.events.retain(|e| e.revision > self.revision);
            self.revision = self.revision.max(whole.revision);
        }
        if !whole.epoch.is_empty() {
            self.epoch.clone_from(&whole.epoch);
        }
        Some(whole)
    }

    /// The stream ended or broke (see [`WatchSession::open_failed`] for `moved`): it is
    /// dropped with its connection, a reset in parts is forgotten. The wait before the
    /// next open.
    pub fn broke(&mut self, moved: bool, replicas: usize) -> Duration {
        self.open = None;
        self.moving = false;
        self.assembler.clear();
        self.retry.failed(moved, replicas)
    }

    /// New calls use a new connection (a rotated or rewritten certificate): an open
    /// stream moves to it now.
    pub fn move_to_current(&mut self) {
        if self.open.is_some() {
            self.moving = true;
            self.retry.set(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_proto::{Lease, LeaseEvent};

    const CAP: Duration = Duration::from_secs(30);

    type Session = WatchSession<&'static str, u32>;

    /// A part of a message whose one event is `node`'s at `revision`.
    fn part(reset: bool, more: bool, node: &str, revision: u64) -> WatchResponse {
        at(reset, more, &[(node, revision)], revision)
    }

    /// A message at `revision` with events `(node, revision)`.
    fn at(reset: bool, more: bool, events: &[(&str, u64)], revision: u64) -> WatchResponse {
        WatchResponse {
            reset,
            more,
            revision,
            events: events
                .iter()
                .map(|(node, revision)| LeaseEvent {
                    lease: Some(Lease {
                        node_name: node.to_string(),
                        ..Default::default()
                    }),
                    revision: *revision,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_open_is_due_at_once_and_then_no_other_is_wanted() {
        let mut w = Session::new(CAP);
        assert!(w.wants_open() && w.due() <= Instant::now());
        assert!(w.stream().is_none());
        assert_eq!(w.opened("s1", 1), Opened::First);
        assert!(!w.wants_open());
        assert_eq!(w.stream(), Some(&mut "s1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_in_parts_cut_by_a_break_is_dropped_and_the_next_stream_starts_clean() {
        let mut w = Session::new(CAP);
        w.opened("s1", 1);
        assert!(w.message(part(true, true, "a", 1)).is_none());
        assert!(w.message(part(false, true, "b", 2)).is_none());
        w.broke(false, 1);
        assert!(w.stream().is_none() && w.wants_open());
        w.opened("s2", 2);
        let whole = w.message(part(false, false, "c", 3)).expect("a batch");
        assert!(!whole.reset, "no half reset survives the break");
        assert_eq!(whole.events.len(), 1);
        assert!(w.message(part(true, true, "a", 1)).is_none());
        let whole = w
            .message(part(false, false, "b", 4))
            .expect("the reset, whole");
        assert!(whole.reset && !whole.more && whole.events.len() == 2);
    }

    #[tokio::test(start_paused = true)]
    async fn new_credentials_move_the_stream_and_the_old_one_serves_until_the_new_is_open() {
        let mut w = Session::new(CAP);
        w.move_to_current();
        assert!(
            w.wants_open(),
            "nothing open: nothing to move, an open is wanted anyway"
        );
        w.opened("old", 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        w.move_to_current();
        assert!(
            w.wants_open() && w.due() <= Instant::now(),
            "the move is due now"
        );
        assert_eq!(
            w.stream(),
            Some(&mut "old"),
            "events keep flowing meanwhile"
        );
        assert_eq!(w.opened("new", 2), Opened::Moved);
        assert!(!w.wants_open());
        assert_eq!(w.stream(), Some(&mut "new"));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_opens_back_off_and_an_open_starts_the_backoff_over() {
        let mut w = Session::new(CAP);
        let waits: Vec<Duration> = (0..6).map(|_| w.open_failed(false, 1)).collect();
        assert!(waits[5] >= Duration::from_secs(8), "doubling: {waits:?}");
        assert!(waits.iter().all(|d| *d <= CAP), "capped: {waits:?}");
        assert_eq!(w.due(), Instant::now() + waits[5]);
        w.opened("s", 1);
        assert!(w.broke(false, 1) <= Duration::from_millis(500), "settled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_controller_is_left_for_the_next_url_almost_at_once() {
        let mut w = Session::new(CAP);
        w.opened("s", 1);
        assert!(w.broke(true, 3) < Duration::from_millis(300));
        assert!(w.open_failed(true, 3) < Duration::from_millis(300));
        assert!(
            w.open_failed(true, 3) >= Duration::from_millis(250),
            "every URL tried: back off"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_stream_resumes_after_what_was_applied_and_repeats_nothing() {
        let mut w = Session::new(CAP);
        assert_eq!(w.request().from_revision, 0, "from scratch");
        w.opened("old", 1);
        let mut first = at(true, false, &[("a", 3), ("b", 5)], 5);
        first.epoch = "e1".into();
        w.message(first).expect("the reset");
        w.message(at(false, false, &[("c", 6), ("d", 7)], 7));
        assert_eq!(w.revision(), 7);
        w.move_to_current();
        let req = w.request();
        assert_eq!((req.from_revision, req.epoch.as_str()), (7, "e1"));
        w.opened("new", 2);
        // The new stream was opened at 6 on another replica: it repeats 7.
        let again = w
            .message(at(false, false, &[("d", 7), ("e", 8)], 8))
            .expect("a batch");
        let nodes: Vec<_> = again
            .events
            .iter()
            .map(|e| e.lease.as_ref().unwrap().node_name.as_str())
            .collect();
        assert_eq!(nodes, ["e"], "7 was applied already");
        assert_eq!(w.revision(), 8);
        let old = w.message(at(false, false, &[], 4)).expect("a batch");
        assert!(old.events.is_empty());
        assert_eq!(w.revision(), 8, "never goes back");
        w.message(at(true, false, &[("a", 2)], 2)).expect("a reset");
        assert_eq!(w.revision(), 2, "a reset is the new truth");
        assert_eq!(w.request().epoch, "e1", "kept while messages carry none");
    }

    #[tokio::test(start_paused = true)]
    async fn new_networks_reopen_the_watch_from_scratch_naming_them() {
        let mut w = Session::new(CAP);
        assert!(w.request().networks.is_empty(), "default only: as before");
        w.opened("s1", 1);
        w.message(at(true, false, &[("a", 3)], 3))
            .expect("the reset");
        w.watch_networks(vec![]);
        assert!(!w.wants_open(), "no change, no reopen");
        w.watch_networks(vec!["blue".into(), "default".into()]);
        assert!(w.wants_open() && w.due() <= Instant::now());
        let req = w.request();
        assert_eq!((req.from_revision, req.networks.len()), (0, 2));
        assert_eq!(
            w.stream(),
            Some(&mut "s1"),
            "the old stream serves meanwhile"
        );
        w.message(at(false, false, &[("b", 4)], 4));
        assert_eq!(w.opened("s2", 2), Opened::Moved);
        assert!(!w.wants_open());
        assert_eq!(w.streaming(), ["blue", "default"]);
        assert_eq!(w.request().from_revision, 4, "resumes again once reopened");

        // The networks change while a stream is being opened: that stream is replaced.
        let _ = w.request();
        w.watch_networks(vec!["default".into()]);
        w.opened("s3", 3);
        assert!(w.wants_open(), "asked for with the old networks");
        let req = w.request();
        assert_eq!((req.from_revision, req.networks.len()), (0, 1));
        w.opened("s4", 4);
        assert!(!w.wants_open());
    }
}
