//! The node certificate's rotation as one part of the loop: when the next one is due
//! (a jittered 70–90 % of the lifetime, only when the agent manages the certificate),
//! the rotation under way, and its retries. What a finished rotation means for the
//! channel and the watch is the loop's (`Agent::on_rotated`).

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{info, warn};
use twill_agent::identity::rotation::{self, Credentials, RotateError};
use twill_agent::identity::{self, CertCheck, CertInfo};
use twill_agent::schedule::{later, Retry};
use twill_common::now_unix;

use super::{finished, Call, BACKOFF_CAP};
use crate::Args;

/// The certificate's rotation: scheduled, under way, or retried.
pub(super) struct Rotation {
    node: String,
    /// What a rotation needs; `None` when the certificate is the operator's (no
    /// `--bootstrap-token-file`): it is never rotated here, only picked up once
    /// rewritten (`Credentials::reload`).
    managed: Option<Managed>,
    retry: Retry,
    call: Call<CertInfo, RotateError>,
}

/// The files and controllers a bootstrap or rotation of a managed certificate uses.
#[derive(Clone)]
pub(super) struct Managed {
    controller: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    token_file: PathBuf,
    deadline: Duration,
}

impl Managed {
    /// What `args` give, when the agent manages its certificate (with
    /// `--bootstrap-token-file`).
    pub(super) fn of(args: &Args) -> Option<Managed> {
        let token_file = args.bootstrap_token_file.as_ref()?;
        Some(Managed {
            controller: args.controller.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            ca: args.tls_ca.clone(),
            token_file: token_file.clone(),
            deadline: args.call_timeout,
        })
    }

    /// How to bootstrap `node`'s certificate with these files.
    pub(super) fn bootstrap<'a>(&'a self, node: &'a str) -> identity::Bootstrap<'a> {
        identity::Bootstrap {
            controller: &self.controller,
            node,
            cert: &self.cert,
            key: &self.key,
            ca: &self.ca,
            token_file: &self.token_file,
            call_timeout: self.deadline,
            backoff_cap: BACKOFF_CAP,
        }
    }
}

impl Rotation {
    /// The rotation of `node`'s certificate, due as `creds`' certificate says.
    pub(super) fn new(args: &Args, node: &str, creds: &Credentials) -> Self {
        let mut r = Rotation {
            node: node.to_string(),
            managed: Managed::of(args),
            retry: Retry::at(later(Duration::MAX), BACKOFF_CAP),
            call: None,
        };
        r.schedule(creds);
        r
    }

    /// Whether no rotation is under way (so the TLS files are not half-written by it).
    pub(super) fn idle(&self) -> bool {
        self.call.is_none()
    }

    /// When the next rotation starts.
    pub(super) fn due(&self) -> Instant {
        self.retry.due()
    }

    /// The certificate in use changed (rotated here, or rewritten by someone else):
    /// the next rotation is counted from it, and a failure waits the shortest time
    /// again.
    pub(super) fn schedule(&mut self, creds: &Credentials) {
        self.retry.settled();
        self.retry.set(self.next(creds));
    }

    /// The rotation failed, or its certificate could not be put in use: the next try
    /// after a backoff (never a tight loop on a certificate that is due). The wait.
    pub(super) fn retry_later(&mut self) -> Duration {
        self.retry.failed(false, 0)
    }

    /// At a jittered 70–90 % of the lifetime of `creds`' certificate when the agent
    /// manages it, else never.
    fn next(&self, creds: &Credentials) -> Instant {
        let never = later(Duration::MAX);
        let (Some(_), Some(info)) = (&self.managed, &creds.info) else {
            return never;
        };
        let delay =
            rotation::rotation_delay(info, creds.received_at, now_unix(), rotation::jitter());
        info!(node = %self.node, serial = %info.serial, not_after = %info.not_after_rfc3339(), rotate_in = ?delay, "node certificate rotation scheduled");
        later(delay)
    }

    /// Starts getting a new node certificate: renewed over `channel` (which presents
    /// the current one) while that is valid; once it is not (the controller was away
    /// past its expiry, or the files were damaged), only the bootstrap token can get
    /// one.
    pub(super) fn start(&mut self, channel: Channel) {
        let Some(m) = &self.managed else {
            // Never due: nothing to do.
            self.retry.set(later(Duration::MAX));
            return;
        };
        let (node, m) = (self.node.clone(), m.clone());
        let check = identity::check_certificate(&m.cert, &m.key, &node, now_unix());
        if let CertCheck::Needed(why) = check {
            warn!(node = %node, reason = %why, "the node certificate cannot be renewed; bootstrapping again with the token");
            self.call = Some(tokio::spawn(async move {
                match identity::bootstrap(&m.bootstrap(&node)).await? {
                    identity::Outcome::Issued(info) | identity::Outcome::Present(info) => Ok(info),
                }
            }));
            return;
        }
        self.call = Some(tokio::spawn(async move {
            rotation::renew(channel, &node, &m.cert, &m.key, m.deadline).await
        }));
    }

    /// The end of the rotation under way; never resolves while there is none.
    pub(super) async fn finished(&mut self) -> Result<CertInfo, RotateError> {
        finished(&mut self.call).await
    }

    /// Stops the rotation under way (the agent is exiting). A rotation cut short leaves
    /// the old pair or one the next start completes (`rotation::finish_install`).
    pub(super) fn abort(&self) {
        if let Some(call) = &self.call {
            call.abort();
        }
    }
}
