//! Polling with a deadline instead of sleeping blindly.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often [`wait_until`] and [`hold_for`] look.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One observation of a condition: what a polled closure returns.
///
/// Implemented for `bool`, `Option<T>`, `Result<T, E: Display>` and [`Check<T>`] (the
/// only one that can give up early).
pub trait Outcome {
    /// What a successful wait returns.
    type Value;
    /// Whether the condition holds, does not hold yet, or never will.
    fn observe(self) -> Observed<Self::Value>;
}

/// The verdict of one observation.
pub enum Observed<T> {
    /// The condition holds.
    Ready(T),
    /// Not yet; the text describes what was seen.
    NotYet(String),
    /// It never will (e.g. the process it waits for exited): stop waiting.
    Fatal(String),
}

/// An observation that can also end the wait at once.
pub enum Check<T> {
    Ready(T),
    NotYet(String),
    Fatal(String),
}

impl<T> Outcome for Check<T> {
    type Value = T;
    fn observe(self) -> Observed<T> {
        match self {
            Check::Ready(v) => Observed::Ready(v),
            Check::NotYet(s) => Observed::NotYet(s),
            Check::Fatal(s) => Observed::Fatal(s),
        }
    }
}

impl Outcome for bool {
    type Value = ();
    fn observe(self) -> Observed<()> {
        if self {
            Observed::Ready(())
        } else {
            Observed::NotYet("condition was false".into())
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn observe(self) -> Observed<T> {
        match self {
            Some(v) => Observed::Ready(v),
            None => Observed::NotYet("nothing yet (None)".into()),
        }
    }
}

impl<T, E: fmt::Display> Outcome for Result<T, E> {
    type Value = T;
    fn observe(self) -> Observed<T> {
        match self {
            Ok(v) => Observed::Ready(v),
            Err(e) => Observed::NotYet(format!("{e:#}")),
        }
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it reports success and returns its value;
/// fails after `timeout` with a message naming `what` was awaited and the last
/// observation.
pub fn wait_until<O: Outcome>(
    timeout: Duration,
    what: &str,
    f: impl FnMut() -> O,
) -> Result<O::Value> {
    poll_until(timeout, POLL_INTERVAL, what, f)
}

/// [`wait_until`], polling every `every` instead of [`POLL_INTERVAL`]: for waits whose
/// duration is measured, finer than the default interval.
pub fn poll_until<O: Outcome>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> O,
) -> Result<O::Value> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut polls = 0u32;
    loop {
        polls += 1;
        let last = match f().observe() {
            Observed::Ready(v) => return Ok(v),
            Observed::NotYet(s) => s,
            Observed::Fatal(s) => bail!(
                "gave up waiting for {what} after {:.1?}: {s}",
                start.elapsed()
            ),
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {:.1?} ({polls} polls) waiting for {what}; last observation: {last}",
                start.elapsed()
            );
        }
        std::thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// Checks that a condition keeps holding for the whole of `period` (polling every
/// [`POLL_INTERVAL`]); fails at the first observation where it does not.
pub fn hold_for<O: Outcome>(period: Duration, what: &str, mut f: impl FnMut() -> O) -> Result<()> {
    let start = Instant::now();
    loop {
        match f().observe() {
            Observed::Ready(_) => {}
            Observed::NotYet(s) | Observed::Fatal(s) => bail!(
                "expected {what} to hold for {period:?}, but after {:.1?}: {s}",
                start.elapsed()
            ),
        }
        if start.elapsed() >= period {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_ready() {
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("n is {n}"))
            }
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn timeout_names_what_and_last_observation() {
        let err = wait_until(Duration::from_millis(300), "the moon", || {
            Err::<(), _>("still the sun")
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("the moon"), "{err}");
        assert!(err.contains("still the sun"), "{err}");
    }

    #[test]
    fn fatal_gives_up_at_once() {
        let start = Instant::now();
        let err = wait_until(Duration::from_secs(30), "x", || {
            Check::<()>::Fatal("dead".into())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("dead"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn hold_for_fails_when_condition_breaks() {
        let mut n = 0;
        let r = hold_for(Duration::from_secs(5), "n < 2", || {
            n += 1;
            n < 2
        });
        assert!(r.is_err());
        assert!(hold_for(Duration::from_millis(300), "true", || true).is_ok());
    }
}
