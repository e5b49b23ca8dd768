//! When the agent next makes each kind of controller call (renew the lease, open the
//! watch, rotate the certificate): a due time, a capped and jittered backoff after
//! failures, and quick moves through the other controller URLs while the one in use
//! does not answer. The daemon's loop keeps one [`Retry`] per kind of call; the lease's
//! is a [`LeaseKeeping`], which also knows when a granted lease is renewed.

use std::ops::Range;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::Backoff;

/// How long a call that moved to another controller waits before it is made there: a
/// moment, spread so that agents do not arrive together.
const MOVE_WAIT_MS: Range<u64> = 100..300;

/// One kind of call's schedule.
pub struct Retry {
    at: Instant,
    backoff: Backoff,
    /// Moves to another controller since the last success.
    moves: usize,
}

impl Retry {
    /// Due now, backing off up to `cap` after failures.
    pub fn now(cap: Duration) -> Self {
        Retry::at(Instant::now(), cap)
    }

    /// Due at `at`, backing off up to `cap` after failures.
    pub fn at(at: Instant, cap: Duration) -> Self {
        Retry {
            at,
            backoff: Backoff::new(cap),
            moves: 0,
        }
    }

    /// When the call is due.
    pub fn due(&self) -> Instant {
        self.at
    }

    /// Makes the call due at `at`.
    pub fn set(&mut self, at: Instant) {
        self.at = at;
    }

    /// The call succeeded: the next one is due at `next`, after the shortest wait
    /// should it fail.
    pub fn succeeded(&mut self, next: Instant) {
        self.settled();
        self.at = next;
    }

    /// The call succeeded; when the next is due is unchanged.
    pub fn settled(&mut self) {
        self.backoff.reset();
        self.moves = 0;
    }

    /// Something the call waits on came through (a watch message): the next failure
    /// waits the shortest time again.
    pub fn heard(&mut self) {
        self.backoff.reset();
    }

    /// The call failed; `moved`: the controller did not answer and new calls moved to
    /// the next of `replicas` URLs. While there are controllers not yet tried since the
    /// last success (a failover: one replica died, another already leads), the call
    /// follows almost at once; the backoff grows once per round over all of them, so a
    /// controller that is down everywhere is not hammered. Returns the wait, after
    /// which the call is due.
    pub fn failed(&mut self, moved: bool, replicas: usize) -> Duration {
        self.moves += 1;
        let wait = if moved && self.moves < replicas {
            Duration::from_millis(rand::Rng::random_range(&mut rand::rng(), MOVE_WAIT_MS))
        } else {
            self.moves = 0;
            self.backoff.next_delay()
        };
        self.at = Instant::now() + wait;
        wait
    }
}

/// `now + d`, or far in the future when that does not fit (a TTL from a controller
/// configured with an absurd one must not panic the agent).
pub fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// When the lease is next acquired or renewed: at once at start, once less than the
/// renew margin of its TTL remains, sooner after a failure (backoff, failover), and at
/// once when it must be acquired again (lost, or a device was re-created).
pub struct LeaseKeeping {
    retry: Retry,
    /// `--renew-margin`; a third of the TTL when not given.
    margin: Option<Duration>,
}

impl LeaseKeeping {
    /// Due now; failures back off up to `cap`.
    pub fn new(cap: Duration, margin: Option<Duration>) -> Self {
        LeaseKeeping {
            retry: Retry::now(cap),
            margin,
        }
    }

    /// When the next call is due.
    pub fn due(&self) -> Instant {
        self.retry.due()
    }

    /// The lease was granted or renewed for `ttl`: the next renewal comes when the
    /// margin remains, and never sooner than a second from now. Returns the margin:
    /// how long the controller may be away before the lease cannot be renewed in time.
    pub fn granted(&mut self, ttl: Duration) -> Duration {
        let margin = self.margin.unwrap_or(ttl / 3).min(ttl);
        self.retry
            .succeeded(later((ttl - margin).max(Duration::from_secs(1))));
        margin
    }

    /// The call failed (see [`Retry::failed`]); the wait before the next.
    pub fn failed(&mut self, moved: bool, replicas: usize) -> Duration {
        self.retry.failed(moved, replicas)
    }

    /// Acquire again at once.
    pub fn now(&mut self) {
        self.retry.set(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(MOVE_WAIT_MS.end);

    #[tokio::test(start_paused = true)]
    async fn a_silent_controller_is_left_at_once_until_every_url_was_tried() {
        let mut r = Retry::now(CAP);
        assert!(r.failed(true, 3) < SHORT, "first move");
        assert!(r.failed(true, 3) < SHORT, "second move");
        let backoff = r.failed(true, 3);
        assert!(
            backoff >= Duration::from_millis(250),
            "all tried: {backoff:?}"
        );
        assert!(r.failed(true, 3) < SHORT, "a new round of moves");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_to_the_cap_and_a_success_starts_over() {
        let mut r = Retry::now(CAP);
        let waits: Vec<Duration> = (0..10).map(|_| r.failed(false, 3)).collect();
        assert!(waits[0] <= Duration::from_millis(500), "{waits:?}");
        assert!(waits[4] >= Duration::from_secs(4), "doubling: {waits:?}");
        assert!(waits.iter().all(|w| *w <= CAP), "capped: {waits:?}");
        assert_eq!(
            r.due(),
            Instant::now() + waits[9],
            "due after the last wait"
        );
        let next = Instant::now() + Duration::from_secs(600);
        r.succeeded(next);
        assert_eq!(r.due(), next);
        assert!(
            r.failed(false, 1) <= Duration::from_millis(500),
            "backoff reset"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_resets_the_backoff_but_not_the_moves() {
        let mut r = Retry::now(CAP);
        assert!(r.failed(true, 2) < SHORT);
        for _ in 0..5 {
            r.failed(false, 2);
        }
        r.heard();
        assert!(r.failed(false, 2) <= Duration::from_millis(500));
        r.settled();
        assert!(
            r.failed(true, 2) < SHORT,
            "moves start over after a success"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_renewed_when_its_margin_remains() {
        let mut k = LeaseKeeping::new(CAP, None);
        assert!(k.due() <= Instant::now(), "acquired at once");
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(k.granted(day), day / 3, "a third of the TTL by default");
        assert_eq!(k.due(), Instant::now() + day * 2 / 3);
        let mut flagged = LeaseKeeping::new(CAP, Some(Duration::from_secs(3600)));
        assert_eq!(flagged.granted(day), Duration::from_secs(3600));
        assert_eq!(
            flagged.due(),
            Instant::now() + day - Duration::from_secs(3600)
        );
        assert_eq!(
            flagged.granted(Duration::from_secs(60)),
            Duration::from_secs(60),
            "never more than the TTL"
        );
        assert_eq!(
            flagged.due(),
            Instant::now() + Duration::from_secs(1),
            "at least a second apart"
        );
        k.granted(Duration::MAX);
        assert!(
            k.due() > Instant::now() + day,
            "an absurd TTL does not panic"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_backs_off_and_a_lost_lease_is_acquired_at_once() {
        let mut k = LeaseKeeping::new(CAP, None);
        k.granted(Duration::from_secs(600));
        let first = k.failed(false, 1);
        assert!(first <= Duration::from_millis(500), "{first:?}");
        assert_eq!(k.due(), Instant::now() + first);
        for _ in 0..8 {
            k.failed(false, 1);
        }
        assert!(k.failed(false, 1) >= CAP / 2, "backed off to the cap");
        k.now();
        assert_eq!(k.due(), Instant::now());
        k.granted(Duration::from_secs(600));
        assert!(
            k.failed(false, 1) <= Duration::from_millis(500),
            "a grant starts over"
        );
    }
}
