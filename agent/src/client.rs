//! The connection to the controller: a mutual-TLS gRPC channel, and the jittered
//! exponential backoff every retry loop of the agent uses.

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_common::tls::{read_pem, TlsError};

/// The channel could not be set up (nothing was sent yet).
#[derive(Debug, Error)]
pub enum ClientError {
    /// A certificate or key file is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The controller URL or TLS settings are invalid.
    #[error("--controller {url}: {msg}")]
    Endpoint {
        /// The URL given.
        url: String,
        /// What is wrong.
        msg: String,
    },
}

/// Certificate files for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    /// Client certificate (`--tls-cert`).
    pub cert: &'a Path,
    /// Its key (`--tls-key`).
    pub key: &'a Path,
    /// CA that signed the controller's certificate (`--tls-ca`).
    pub ca: &'a Path,
}

/// A lazily connecting channel: it (re)connects on use, so callers only retry calls.
pub fn channel(url: &str, tls: &TlsFiles<'_>) -> Result<Channel, ClientError> {
    let cert = read_pem(tls.cert, "--tls-cert", "CERTIFICATE")?;
    let key = read_pem(tls.key, "--tls-key", "PRIVATE KEY")?;
    let ca = read_pem(tls.ca, "--tls-ca", "CERTIFICATE")?;
    let bad = |msg: String| ClientError::Endpoint {
        url: url.to_string(),
        msg,
    };
    if !url.starts_with("https://") {
        return Err(bad(
            "must start with https:// (the controller only speaks TLS)".into(),
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        )
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Jittered exponential backoff: 0.5 s doubling up to a cap, each wait drawn
/// between half and all of the current step so that agents don't retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    cap: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(500);

    /// A backoff capped at `cap`.
    pub fn new(cap: Duration) -> Self {
        Backoff {
            step: Self::START,
            cap,
        }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the shortest wait, after a success.
    pub fn reset(&mut self) {
        self.step = Self::START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let waits: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(waits[0] >= Duration::from_millis(250) && waits[0] <= Duration::from_millis(500));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(4)));
        assert!(waits[7] >= Duration::from_secs(2));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }
}
