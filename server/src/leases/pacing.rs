//! When the lease writer publishes its durable batches to the watchers.
//!
//! A publication wakes every watch stream and writes to every connection, which costs
//! the same for one event as for hundreds: with 5,000 watchers a join storm's hundreds
//! of small batches a second took all the CPU. So the batches that arrive while a
//! publication is still reaching the watchers go out together, as one merged update,
//! and the next publication waits until the last one has reached (nearly) every
//! watcher and then as long again as that took, [`FAN_OUT_SHARE`] times over: however
//! busy the cluster, fanning out takes at most about a third of the controller's time,
//! and a watcher that is behind gets one update instead of every publication it
//! missed. A change after a quiet spell still goes out at once.

use std::time::{Duration, Instant};

use crate::events::FanOut;

/// The least spacing of publications per open watch stream, up to
/// `MAX_PUBLISH_INTERVAL` (reached at 100 watchers). With a handful of watchers it is
/// next to nothing, so a lone client issuing one request after another is not held
/// back (a flat 20 ms capped it at 47 leases/s).
const PUBLISH_INTERVAL_PER_WATCHER: Duration = Duration::from_micros(200);
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_millis(20);
/// The spacing of publications as a multiple of the time the last one took to reach
/// the watchers.
const FAN_OUT_SHARE: u32 = 3;
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
            FanOut::Done(took) => least.max(self.last + took.saturating_mul(FAN_OUT_SHARE)),
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
        let p = at(t0);
        let now = t0 + 5 * MAX_WAIT;
        for fan_out in [FanOut::Done(40 * MS), FanOut::Going] {
            assert!(p.due(now, 5000, fan_out) <= now, "{fan_out:?}");
        }
    }

    #[test]
    fn a_few_watchers_are_hardly_held_back() {
        let t0 = Instant::now();
        let p = at(t0);
        let due = p.due(t0, 3, FanOut::Done(Duration::from_micros(50)));
        assert_eq!(due, t0 + Duration::from_micros(600));
    }

    #[test]
    fn publications_are_spaced_by_three_times_the_fan_out() {
        let t0 = Instant::now();
        let p = at(t0);
        assert_eq!(p.due(t0, 5000, FanOut::Done(MS)), t0 + 20 * MS, "the floor");
        assert_eq!(p.due(t0, 5000, FanOut::Done(50 * MS)), t0 + 150 * MS);
        assert_eq!(
            p.due(t0, 5000, FanOut::Done(2000 * MS)),
            t0 + MAX_WAIT,
            "never longer than MAX_WAIT"
        );
    }

    #[test]
    fn while_the_last_publication_is_still_going_out_the_writer_looks_again() {
        let t0 = Instant::now();
        let p = at(t0);
        let now = t0 + 30 * MS;
        assert_eq!(p.due(now, 5000, FanOut::Going), now + POLL);
        let late = t0 + MAX_WAIT - MS;
        assert_eq!(p.due(late, 5000, FanOut::Going), t0 + MAX_WAIT);
    }
}
