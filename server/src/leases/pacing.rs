//! When the lease writer publishes its durable batches to the watchers.

use std::time::{Duration, Instant};

/// The lease writer publishes durable batches to the watchers at most once per this much time per
/// open watch stream, up to `MAX_PUBLISH_INTERVAL` (reached at 100 watchers). A
/// publication wakes every watch stream, which costs the same for one event as for
/// hundreds: with 5,000 watchers a join storm's hundreds of small batches a second took
/// all the CPU, so the batches of one interval go out together. With a handful of
/// watchers the interval is next to nothing, so a lone client issuing one request after
/// another is not held back (a flat 20 ms capped it at 47 leases/s); a change after a
/// quiet spell goes out at once.
const PUBLISH_INTERVAL_PER_WATCHER: Duration = Duration::from_micros(200);
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_millis(20);

/// When the lease writer may publish next (see `PUBLISH_INTERVAL_PER_WATCHER`).
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

    /// The earliest moment of the next publication with `watchers` open streams.
    pub(super) fn due(&self, watchers: usize) -> Instant {
        self.last + Self::interval(watchers)
    }

    /// True when a publication may go out now.
    pub(super) fn is_due(&self, watchers: usize) -> bool {
        self.last.elapsed() >= Self::interval(watchers)
    }

    /// Records a publication.
    pub(super) fn published(&mut self) {
        self.last = Instant::now();
    }
}
