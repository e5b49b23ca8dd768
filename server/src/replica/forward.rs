//! Passing writes to the leader: a layer in front of every gRPC service.
//!
//! A write (an RPC whose `grpc::auth::POLICIES` row says so) that reaches a replica
//! which does not lead is sent on, unchanged, to the leader over mutual TLS with this
//! replica's certificate (`O=twill:controllers`, clientAuth). The caller's certificate
//! chain travels beside it in `x-twill-forwarded-cert` and its address in
//! `x-twill-forwarded-for`; the leader believes those headers only from a registered
//! replica and verifies the chain against the client CA (`grpc::auth`), so what the
//! leader checks (the node a certificate may act for, revocations, rate limits) is the
//! original caller's. Reads and watches are always served where they arrive.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use rustls::pki_types::CertificateDer;
use tonic::body::Body;
use tonic::Status;
use tower::{Service, ServiceExt};

use super::Replica;
use crate::grpc::auth::{self, Authorized};
use crate::grpc::{Answer, Inner, Middleware, Wrap};

/// The header that carries the caller's certificate (DER, hex).
pub const FORWARDED_CERT: &str = "x-twill-forwarded-cert";
/// The header that carries the caller's IP address.
pub const FORWARDED_FOR: &str = "x-twill-forwarded-for";
/// The header naming the replica that forwarded the call.
pub const FORWARDED_BY: &str = "x-twill-forwarded-by";

/// How long the leader may take to start answering a forwarded write whose caller
/// set no deadline. A leader that died or froze is noticed sooner, by the peer
/// channel's HTTP/2 keep-alive; this bounds one that is alive and never answers.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a caller's own deadline (`grpc-timeout`) may hold a forwarded write.
const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Wraps the services; without a replica (sled store) it passes everything through.
pub type ForwardLayer = Wrap<Option<Arc<Replica>>>;

impl Middleware for Option<Arc<Replica>> {
    fn call<S: Inner>(&self, inner: &mut S, req: http::Request<Body>) -> Answer {
        // A call another replica forwarded is never passed on again: two replicas that
        // each still believe the other leads would bounce it between them.
        // `AuthLayer` has removed the header from every caller but a replica.
        let replica = match self {
            Some(r)
                if auth::policy(req.uri().path()).is_some_and(|p| p.write)
                    && !r.is_leading()
                    && !req.headers().contains_key(FORWARDED_BY) =>
            {
                r.clone()
            }
            _ => return Box::pin(inner.call(req)),
        };
        Box::pin(async move {
            Ok(forward(&replica, req)
                .await
                .unwrap_or_else(|s| s.into_http()))
        })
    }
}

/// Removes the forwarding headers a call came with (only a replica may send them, and a
/// replica forwarding a call sets its own).
pub fn remove_headers(headers: &mut http::HeaderMap) {
    for h in [FORWARDED_CERT, FORWARDED_FOR, FORWARDED_BY] {
        headers.remove(h);
    }
}

/// A certificate chain as `FORWARDED_CERT` carries it: each certificate's DER in hex,
/// leaf first, comma-separated.
pub fn encode_chain(chain: &[CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|c| twill_common::hex(c.as_ref()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes `FORWARDED_CERT`; `None` when it is not a chain of hex DER.
pub fn decode_chain(s: &str) -> Option<Vec<CertificateDer<'static>>> {
    s.split(',')
        .map(|c| {
            twill_common::unhex(c.trim())
                .filter(|der| !der.is_empty())
                .map(CertificateDer::from)
        })
        .collect::<Option<Vec<_>>>()
        .filter(|c| !c.is_empty())
}

async fn forward(
    r: &Replica,
    mut req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    let Some(leader) = r.leader().filter(|l| *l != r.settings.advertise_url) else {
        return Err(Status::unavailable(
            "no controller replica leads right now (an election is under way, or etcd is \
             unreachable or without quorum): writes are refused until one does; watches keep \
             being served; retry in a few seconds",
        ));
    };
    let caller = req.extensions().get::<Authorized>().cloned();
    // The caller's deadline, not a shorter one of ours: in a join storm the leader's
    // queue holds a write for seconds, and a forwarded call given up before the caller
    // would have given up comes back as a retry, a second write (2,526 of 5,000 nodes
    // with 5 s, against the agents' 10 s).
    let timeout = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout)
        .map_or(FORWARD_TIMEOUT, |t| t.min(MAX_FORWARD_TIMEOUT));
    let headers = req.headers_mut();
    remove_headers(headers);
    if let Some(caller) = &caller {
        if !caller.chain.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&encode_chain(&caller.chain)) {
                headers.insert(FORWARDED_CERT, v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&caller.ip.to_string()) {
            headers.insert(FORWARDED_FOR, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&r.settings.advertise_url) {
        headers.insert(FORWARDED_BY, v);
    }
    let channel = r.peer(&leader).map_err(Status::unavailable)?;
    r.metrics.forwarded_writes.inc();
    let sent = tokio::time::timeout(timeout, async {
        let mut ch = channel;
        ch.ready().await?.call(req).await
    })
    .await;
    match sent {
        Ok(Ok(resp)) => Ok(resp.map(Body::new)),
        Ok(Err(e)) => {
            r.forget_peer(&leader);
            Err(Status::unavailable(format!(
                "the leader {leader} did not take the write this replica forwarded ({e}); \
                 retry: a new leader is elected within seconds when one is down"
            )))
        }
        Err(_) => {
            r.forget_peer(&leader);
            Err(Status::unavailable(format!(
                "the leader {leader} did not answer the write this replica forwarded within {}; retry",
                humantime::format_duration(timeout)
            )))
        }
    }
}

/// A `grpc-timeout` header's value (gRPC over HTTP/2: at most 8 digits and a unit,
/// `H`, `M`, `S`, `m`, `u` or `n`); `None` when it is not one.
fn grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() {
        return None;
    }
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_grpc_timeout_is_read_and_a_bad_one_ignored() {
        assert_eq!(grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(
            grpc_timeout("9999999m"),
            Some(Duration::from_millis(9_999_999))
        );
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S", "é"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn chains_travel_as_hex_and_bad_hex_is_refused() {
        let chain = [
            CertificateDer::from(vec![0u8, 1, 0x7f]),
            CertificateDer::from(vec![0x80u8, 0xff]),
        ];
        assert_eq!(
            decode_chain(&encode_chain(&chain)).as_deref(),
            Some(&chain[..])
        );
        assert_eq!(decode_chain("abc"), None, "odd length");
        assert_eq!(decode_chain("zz"), None, "not hex");
        assert_eq!(decode_chain("00,"), None, "an empty certificate");
    }
}
