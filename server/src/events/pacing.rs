//! When committed batches are published to the watchers: by the lease writer (its
//! durable batches) and by a replica's mirror (what it reads from etcd's watch, which
//! would otherwise publish every transaction of the leader's to this replica's share
//! of the agents).
//!
//! A publication wakes every watch stream and writes to every connection, which costs
//! the same for one event as for hundreds: with 5,000 watchers a join storm's hundreds
//! of small batches a second took all the CPU. So the next publication waits until
//! the last one has reached nearly every watcher (see `Hub::fan_out`): the batches
//! that arrive meanwhile go out together, and a watcher that is behind gets one merged
//! update instead of every publication it missed. A change after a quiet spell, or
//! one that finds the last publication out, goes out at once.
//!
//! In a burst ([`BURST_EVENTS`] or more published within the last [`BURST_WINDOW`]: a
//! join storm, a cold start) publications are spaced further: the next one waits
//! until [`BURST_SPACING`] times as long as the last fan-out took has passed since it
//! was made, so fan-outs take at most a third of the machine and the requests still
//! coming in get the rest. A 5,000-node storm then sends a third of the watch
//! messages and costs the controller 40 % less CPU. Steady churn is not a burst (50
//! nodes leaving and rejoining a second are 100 events a second) and is not held:
//! spacing it too made its delivery p99 a third longer (spacing every busy
//! publication, twice as long). The burst is told by the rate, not by the size of
//! the last publication: spacing makes publications larger, and churn held once by a
//! size rule stayed held.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use twill_proto::LeaseEvent;

use super::{FanOut, Hub};

/// The least spacing of publications per open watch stream, up to
/// `MAX_PUBLISH_INTERVAL` (reached at 100 watchers). With a handful of watchers it is
/// next to nothing, so a lone client issuing one request after another is not held
/// back (a flat 20 ms capped it at 47 leases/s).
const PUBLISH_INTERVAL_PER_WATCHER: Duration = Duration::from_micros(200);
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_millis(20);
/// How often the writer looks again whether a publication has reached the watchers.
const POLL: Duration = Duration::from_millis(2);
/// The longest a publication waits for the last one to reach the watchers.
const MAX_WAIT: Duration = Duration::from_millis(1000);
/// Events published within [`BURST_WINDOW`] that make a burst.
const BURST_EVENTS: usize = 150;
const BURST_WINDOW: Duration = Duration::from_secs(1);
/// In a burst, publications are this many times their fan-out apart.
const BURST_SPACING: u32 = 3;

/// When the next publication may go out.
struct Pacing {
    last: Instant,
    /// The publications of the last [`BURST_WINDOW`]: when, and how many events.
    recent: VecDeque<(Instant, usize)>,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            last: Instant::now(),
            recent: VecDeque::new(),
        }
    }
}

impl Pacing {
    fn interval(watchers: usize) -> Duration {
        PUBLISH_INTERVAL_PER_WATCHER
            .saturating_mul(u32::try_from(watchers).unwrap_or(u32::MAX))
            .min(MAX_PUBLISH_INTERVAL)
    }

    /// The earliest moment of the next publication at `now`, with `watchers` open
    /// streams and the last publication's `fan_out`.
    fn due(&self, now: Instant, watchers: usize, fan_out: FanOut) -> Instant {
        let least = self.last + Self::interval(watchers);
        let due = match fan_out {
            FanOut::Done(took) if self.in_burst(now) => {
                least.max(self.last + took.saturating_mul(BURST_SPACING))
            }
            FanOut::Done(_) => least,
            FanOut::Going => least.max(now + POLL),
        };
        due.min(self.last + MAX_WAIT)
    }

    /// Whether [`BURST_EVENTS`] were published within the [`BURST_WINDOW`] before `now`.
    fn in_burst(&self, now: Instant) -> bool {
        let recent = self
            .recent
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < BURST_WINDOW);
        recent.map(|(_, events)| events).sum::<usize>() >= BURST_EVENTS
    }

    /// Records a publication of `events` made at `now`.
    fn published(&mut self, now: Instant, events: usize) {
        self.last = now;
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= BURST_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, events));
    }
}

/// Events stored but not yet committed to the hub, and when they may go out.
#[derive(Default)]
pub(crate) struct Unpublished {
    events: Vec<LeaseEvent>,
    pacing: Pacing,
}

impl Unpublished {
    /// Adds stored events (consecutive revisions, after those already held).
    pub(crate) fn extend(&mut self, events: impl IntoIterator<Item = LeaseEvent>) {
        self.events.extend(events);
    }

    /// Whether none is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether they may go out on `hub` now.
    pub(crate) fn is_due(&self, hub: &Hub) -> bool {
        self.due(hub) <= Instant::now()
    }

    /// Waits until they may go out on `hub` as far as it is known now: when it ends,
    /// the last publication may still be going out (ask [`Self::is_due`] again).
    pub(crate) async fn until_due(&self, hub: &Hub) {
        tokio::time::sleep_until(self.due(hub).into()).await;
    }

    fn due(&self, hub: &Hub) -> Instant {
        self.pacing
            .due(Instant::now(), hub.watchers(), hub.fan_out())
    }

    /// Commits them to `hub` (which fans them out), if there are any.
    pub(crate) fn publish(&mut self, hub: &Hub) {
        if !self.events.is_empty() {
            let events = self.events.len();
            hub.commit(std::mem::take(&mut self.events));
            self.pacing.published(Instant::now(), events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(last: Instant) -> Pacing {
        Pacing {
            last,
            recent: VecDeque::new(),
        }
    }

    /// After a publication of `events` at `last`.
    fn after(last: Instant, events: usize) -> Pacing {
        let mut p = at(last);
        p.published(last, events);
        p
    }

    #[test]
    fn a_change_after_a_quiet_spell_goes_out_at_once() {
        let t0 = Instant::now();
        let now = t0 + 5 * MAX_WAIT;
        for fan_out in [FanOut::Done(300 * MS), FanOut::Going] {
            for events in [1, 5000] {
                assert!(
                    after(t0, events).due(now, 5000, fan_out) <= now,
                    "{fan_out:?} after {events} events"
                );
            }
        }
    }

    #[test]
    fn a_burst_is_spaced_by_three_times_its_fan_out_and_churn_is_not() {
        let t0 = Instant::now();
        let done = FanOut::Done(100 * MS);
        let now = t0 + 100 * MS;
        assert_eq!(
            after(t0, BURST_EVENTS).due(now, 5000, done),
            t0 + 300 * MS,
            "a storm: the next publication leaves requests two thirds of the time"
        );
        assert_eq!(
            after(t0, BURST_EVENTS - 1).due(now, 5000, done),
            t0 + 20 * MS,
            "fewer: the next publication goes as soon as this one is out"
        );
        assert_eq!(
            after(t0, 5000).due(now, 5000, FanOut::Done(900 * MS)),
            t0 + MAX_WAIT,
            "never longer than MAX_WAIT"
        );
    }

    #[test]
    fn a_burst_is_told_by_the_events_of_the_last_second_not_by_one_publication() {
        let t0 = Instant::now();
        let done = FanOut::Done(100 * MS);
        // Churn: 100 events a second, in publications of whatever size.
        let mut p = at(t0);
        for (k, events) in [5, 20, 2, 15, 8].into_iter().cycle().take(30).enumerate() {
            let at = t0 + 100 * MS * u32::try_from(k).unwrap();
            p.published(at, events);
            assert_eq!(p.due(at, 5000, done), at + 20 * MS, "churn held at {k}");
        }
        // A storm in small publications: held once they add up within the window.
        let mut p = at(t0);
        for k in 0..5 {
            p.published(t0 + 100 * MS * k, BURST_EVENTS / 4);
        }
        let last = t0 + 400 * MS;
        assert_eq!(p.due(last, 5000, done), last + 300 * MS);
        // And not once the window has passed: a change after the burst goes at once.
        let later = last + BURST_WINDOW + MS;
        assert!(p.due(later, 5000, done) <= later);
    }

    #[test]
    fn held_events_reach_the_hub_only_when_published_and_then_once() {
        let hub = Hub::new(vec![], vec![], 0);
        let put = super::super::tests::put;
        let mut held = Unpublished::default();
        held.extend([put("a", 1), put("b", 2)]);
        held.extend([put("c", 3)]);
        assert_eq!(hub.leases().1, 0, "held, not committed");
        held.publish(&hub);
        assert!(held.is_empty());
        let (leases, revision) = hub.leases();
        assert_eq!((leases.len(), revision), (3, 3));
        held.publish(&hub);
        assert_eq!(hub.leases().1, 3, "nothing more to publish");
    }

    #[test]
    fn a_few_watchers_are_hardly_held_back() {
        let t0 = Instant::now();
        assert_eq!(
            at(t0).due(t0, 3, FanOut::Done(Duration::ZERO)),
            t0 + Duration::from_micros(600)
        );
    }

    #[test]
    fn once_the_last_publication_is_out_the_next_waits_only_for_the_floor() {
        let t0 = Instant::now();
        let p = at(t0);
        assert_eq!(p.due(t0, 5000, FanOut::Done(Duration::ZERO)), t0 + 20 * MS);
        assert!(p.due(t0 + 30 * MS, 5000, FanOut::Done(Duration::ZERO)) < t0 + 30 * MS);
    }

    #[test]
    fn while_the_last_publication_is_still_going_out_the_writer_looks_again() {
        let t0 = Instant::now();
        let p = at(t0);
        let now = t0 + 30 * MS;
        assert_eq!(p.due(now, 5000, FanOut::Going), now + POLL);
        let late = t0 + MAX_WAIT - MS;
        assert_eq!(
            p.due(late, 5000, FanOut::Going),
            t0 + MAX_WAIT,
            "never longer than MAX_WAIT: a publication held up by many stuck agents"
        );
    }
}
