//! The connection to the controller: a mutual-TLS gRPC channel with explicit message
//! limits, a deadline on every call, the reassembly of a reset sent in parts, and the
//! jittered exponential backoff every retry loop of the agent uses.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use thiserror::Error;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use twill_common::tls::{ClientPem, TlsError};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::WatchResponse;

/// Largest message the agent accepts from the controller. The controller sends at most
/// 64 KiB of events per message (a larger table goes out in parts), so this leaves room
/// for a controller built with other limits without letting one message take all
/// memory.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The agent API over `channel`, with the agent's message limits.
pub fn agent_client(channel: Channel) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 << 10)
}

/// `msg` as a request the controller must answer within `deadline` (sent as the
/// gRPC timeout, so the controller gives up too).
pub fn request<T>(msg: T, deadline: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(deadline);
    req
}

/// Runs a controller call, failing with DEADLINE_EXCEEDED when no answer came within
/// `deadline`: a controller that accepts a call and never answers must not hold the
/// agent up.
pub async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "the controller did not answer within {}",
                humantime::format_duration(deadline)
            )))
        })
}

/// Puts a reset sent in parts back together: the parts after the first (`reset` set,
/// `more` set) are collected until the one with `more` false, and only then is the
/// whole reset handed on, so peers are never dropped and re-added part by part.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<WatchResponse>,
}

impl Assembler {
    /// Folds in one message from the stream; a complete response to apply, if any.
    pub fn push(&mut self, msg: WatchResponse) -> Option<WatchResponse> {
        if msg.reset {
            if msg.more {
                self.pending = Some(msg);
                return None;
            }
            self.pending = None;
            return Some(msg);
        }
        let Some(pending) = self.pending.as_mut() else {
            return Some(msg);
        };
        pending.events.extend(msg.events);
        pending.revision = msg.revision;
        if msg.more {
            return None;
        }
        pending.more = false;
        self.pending.take()
    }

    /// Forgets a partial reset (the stream broke: the next one starts over).
    pub fn clear(&mut self) {
        self.pending = None;
    }
}

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

impl TlsFiles<'_> {
    /// Reads the three files, checking that each holds the PEM block it should.
    pub fn read(&self) -> Result<ClientPem, ClientError> {
        Ok(ClientPem::read(self.cert, self.key, self.ca)?)
    }
}

/// A lazily connecting channel: it (re)connects on use, so callers only retry calls.
pub fn channel(url: &str, tls: &TlsFiles<'_>) -> Result<Channel, ClientError> {
    mtls_channel(url, &tls.read()?)
}

/// A lazily connecting channel presenting `pem`'s certificate.
pub fn mtls_channel(url: &str, pem: &ClientPem) -> Result<Channel, ClientError> {
    endpoint(url, pem.client_tls()).map(|e| e.connect_lazy())
}

/// How a channel to one of the controller's URLs is made from the TLS material in use:
/// [`Dial::mtls`] in the agent; the daemon's tests dial controllers in the same
/// process instead, so that failover and rotation run without a network.
#[derive(Clone)]
pub struct Dial(Arc<DialFn>);

type DialFn = dyn Fn(&str, &ClientPem) -> Result<Channel, ClientError> + Send + Sync;

impl Dial {
    /// A lazily connecting mutual-TLS channel ([`mtls_channel`]).
    pub fn mtls() -> Self {
        Dial(Arc::new(mtls_channel))
    }

    /// Channels made by `f`.
    pub fn with(
        f: impl Fn(&str, &ClientPem) -> Result<Channel, ClientError> + Send + Sync + 'static,
    ) -> Self {
        Dial(Arc::new(f))
    }

    /// A channel to `url` presenting `pem`'s certificate.
    pub fn dial(&self, url: &str, pem: &ClientPem) -> Result<Channel, ClientError> {
        (self.0)(url, pem)
    }
}

impl fmt::Debug for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dial")
    }
}

/// The controller at `url` (which must be `https://`) with `tls` and the agent's
/// connect timeout and keep-alives; not connected yet.
pub fn endpoint(url: &str, tls: ClientTlsConfig) -> Result<Endpoint, ClientError> {
    let bad = |msg: String| ClientError::Endpoint {
        url: url.to_string(),
        msg,
    };
    if !url.starts_with("https://") {
        return Err(bad(
            "must start with https:// (the controller only speaks TLS)".into(),
        ));
    }
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Whether an error means the controller could not be reached or did not answer (as
/// opposed to an answer that refused the request).
pub fn no_answer(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// Whether `s` ends a watch that the controller asked to resume on another replica
/// (UNAVAILABLE, so older agents fail over too).
pub fn asked_to_move(s: &Status) -> bool {
    s.code() == Code::Unavailable && s.metadata().contains_key(twill_common::MOVE_TRAILER)
}

/// Which of `n` controller URLs to try first: one at random, so that agents spread
/// over the replicas instead of piling onto the first.
pub fn first_pick(n: usize) -> usize {
    if n < 2 {
        0
    } else {
        rand::rng().random_range(0..n)
    }
}

/// The controller's URLs (one per replica) and the one new calls go to.
#[derive(Debug, Clone)]
pub struct Controllers {
    urls: Vec<String>,
    current: usize,
}

impl Controllers {
    /// Checks every URL and picks the first at random ([`first_pick`]).
    pub fn new(urls: &[String]) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::Endpoint {
                url: String::new(),
                msg: "no controller URL given".into(),
            });
        }
        for url in urls {
            endpoint(url, ClientTlsConfig::new())?;
        }
        Ok(Controllers {
            urls: urls.to_vec(),
            current: first_pick(urls.len()),
        })
    }

    /// The URL in use.
    pub fn url(&self) -> &str {
        &self.urls[self.current]
    }

    /// How many URLs (replicas) there are: at least one.
    pub fn replicas(&self) -> usize {
        self.urls.len()
    }

    /// Moves to another URL, when there is more than one; whether it moved. At
    /// random, not the next in the list: agents that all left the same dead replica
    /// would otherwise all land on the same survivor and stay piled there.
    pub fn fail_over(&mut self) -> bool {
        if self.urls.len() < 2 {
            return false;
        }
        let step = rand::rng().random_range(1..self.urls.len());
        self.current = (self.current + step) % self.urls.len();
        true
    }
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
    use twill_proto::{Lease, LeaseEvent};

    fn part(reset: bool, more: bool, nodes: &[&str]) -> WatchResponse {
        WatchResponse {
            reset,
            more,
            revision: 7,
            events: nodes
                .iter()
                .map(|n| LeaseEvent {
                    lease: Some(Lease {
                        node_name: n.to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_reset_in_parts_is_applied_whole() {
        let mut a = Assembler::default();
        assert!(a.push(part(true, true, &["a", "b"])).is_none());
        assert!(a.push(part(false, true, &["c"])).is_none());
        let whole = a.push(part(false, false, &["d"])).unwrap();
        assert!(whole.reset && !whole.more);
        assert_eq!(whole.events.len(), 4);
        assert_eq!(
            a.push(part(false, false, &["e"])).unwrap().events.len(),
            1,
            "then batches as they come"
        );
        assert!(a.push(part(true, true, &["a"])).is_none());
        a.clear();
        assert!(
            !a.push(part(false, false, &["x"])).unwrap().reset,
            "a broken reset is dropped"
        );
    }

    #[test]
    fn controllers_are_checked_and_a_failover_always_lands_elsewhere() {
        let urls = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Controllers::new(&[]).is_err(), "no URL");
        let e = Controllers::new(&urls(&["https://a:8474", "http://b:8474"])).unwrap_err();
        assert!(e.to_string().contains("http://b:8474"), "{e}");
        let mut one = Controllers::new(&urls(&["https://a:8474"])).unwrap();
        assert!(!one.fail_over());
        assert_eq!(one.url(), "https://a:8474");
        let mut three = Controllers::new(&urls(&[
            "https://a:8474",
            "https://b:8474",
            "https://c:8474",
        ]))
        .unwrap();
        assert_eq!(three.replicas(), 3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let before = three.url().to_string();
            assert!(three.fail_over());
            assert_ne!(three.url(), before, "a move never stays");
            seen.insert(three.url().to_string());
        }
        assert_eq!(seen.len(), 3, "every replica is reached");
    }

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
