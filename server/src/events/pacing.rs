//! When the lease writer publishes its durable batches to the watchers.
//!
//! A publication wakes every watch stream and writes to every connection, which costs
//! the same for one event as for hundreds: with 5,000 watchers a join storm's hundreds
//! of small batches a second took all the CPU. So the next publication waits until
//! the last one has reached nearly every watcher (see `Hub::fan_out`): the batches
//! that arrive meanwhile go out together, and a watcher that is behind gets one merged
//! update instead of every publication it missed. A change after a quiet spell, or
//! one that finds the last publication out, goes out at once.
//!
//! Waiting longer while changes keep coming (three times the last fan-out) made a
//! 5,000-node storm cheaper still but doubled delivery times under churn, so it is
//! not done.

use std::time::{Duration, Instant};

use crate::events::FanOut;

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

/// When the lease writer may publish next.
pub(super) struct Pacing {
    last: Instant,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            last: Instant::now(),
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
    pub(super) fn due(&self, now: Instant, watchers: usize, fan_out: FanOut) -> Instant {
        let least = self.last + Self::interval(watchers);
        let due = match fan_out {
            FanOut::Done => least,
            FanOut::Going => least.max(now + POLL),
        };
        due.min(self.last + MAX_WAIT)
    }

    /// Records a publication made at `now`.
    pub(super) fn published(&mut self, now: Instant) {
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(last: Instant) -> Pacing {
        Pacing { last }
    }

    #[test]
    fn a_change_after_a_quiet_spell_goes_out_at_once() {
        let t0 = Instant::now();
        let now = t0 + 5 * MAX_WAIT;
        for fan_out in [FanOut::Done, FanOut::Going] {
            assert!(at(t0).due(now, 5000, fan_out) <= now, "{fan_out:?}");
        }
    }

    #[test]
    fn a_few_watchers_are_hardly_held_back() {
        let t0 = Instant::now();
        assert_eq!(
            at(t0).due(t0, 3, FanOut::Done),
            t0 + Duration::from_micros(600)
        );
    }

    #[test]
    fn once_the_last_publication_is_out_the_next_waits_only_for_the_floor() {
        let t0 = Instant::now();
        let p = at(t0);
        assert_eq!(p.due(t0, 5000, FanOut::Done), t0 + 20 * MS);
        assert!(p.due(t0 + 30 * MS, 5000, FanOut::Done) < t0 + 30 * MS);
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
