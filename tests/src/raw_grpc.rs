//! Calling any RPC of a controller whatever its message types: requests and answers as
//! bytes ([`Raw`]), a body that sets only the request's `node_name` ([`body`]), and
//! [`call`], which tells whether the controller's authorization layer let a call
//! through to its handler ([`Verdict`]). For authorization matrices over
//! `twill_proto::METHODS` (as server/tests/trust.rs does against one controller).
//!
//! ```no_run
//! # async fn f(channel: tonic::transport::Channel) {
//! use std::time::Duration;
//! use twill_tests::raw_grpc::{call, Verdict};
//!
//! for m in twill_proto::METHODS {
//!     match call(&channel, m, "self-node", &[], Duration::from_secs(10)).await {
//!         Verdict::Admitted(answer) => println!("{}: admitted ({answer})", m.path),
//!         Verdict::Refused(code, why) => println!("{}: refused {code:?}: {why}", m.path),
//!         Verdict::Trouble(why) => println!("{}: no verdict: {why}", m.path),
//!     }
//! }
//! # }
//! ```

use std::time::Duration;

use anyhow::{bail, Result};
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::{Code, Status};
use twill_proto::Method;

/// Requests and answers as bytes: any RPC, whatever its message types.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// Metadata a caller adds to its calls.
pub type Headers = Vec<(&'static str, String)>;

/// A request naming `node` in field `field` (0: an empty request), protobuf-encoded.
pub fn body(field: i32, node: &str) -> Vec<u8> {
    if field == 0 {
        return Vec::new();
    }
    let tag = u8::try_from(field << 3 | 2).expect("a field number below 16");
    let len = u8::try_from(node.len()).expect("a node name shorter than 128 bytes");
    let mut b = vec![tag, len];
    b.extend_from_slice(node.as_bytes());
    b
}

/// What became of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The authorization layer let it through: the handler answered (what it answered:
    /// `OK`, or its refusal of the body, e.g. `InvalidArgument: ...`).
    Admitted(String),
    /// Refused before (or, for a node acting for another, by) the handler:
    /// UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED, or a forwarding header that
    /// does not decode (INVALID_ARGUMENT naming `x-twill-forwarded-cert`).
    Refused(Code, String),
    /// No verdict: the connection failed, the call timed out, or the cluster answered
    /// UNAVAILABLE / UNKNOWN / CANCELLED / INTERNAL / DEADLINE_EXCEEDED for a reason
    /// other than a follower's store refusing a write (no leader, a leader change...).
    /// Worth retrying.
    Trouble(String),
}

impl Verdict {
    /// Whether the call reached its handler.
    pub fn admitted(&self) -> bool {
        matches!(self, Verdict::Admitted(_))
    }

    /// Short form for reports: `admitted (...)`, `refused Code: ...`, `trouble: ...`.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Admitted(a) => format!("admitted ({a})"),
            Verdict::Refused(c, m) => format!("refused {c:?}: {m}"),
            Verdict::Trouble(t) => format!("trouble: {t}"),
        }
    }
}

/// What a follower's handler answers for a write its fenced store refuses (a call
/// another replica forwarded is not forwarded again, so it is served where it lands):
/// the handler ran, so the authorization layer admitted it.
fn store_not_leader(message: &str) -> bool {
    message.contains("is not the elected leader") || message.contains("is not the leader right now")
}

/// Classifies a refusal.
pub fn classify(s: &Status) -> Verdict {
    let what = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        // A handler's answer about the body (a malformed bootstrap token).
        Code::Unauthenticated | Code::PermissionDenied
            if s.message().contains("bootstrap token") =>
        {
            Verdict::Admitted(what)
        }
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented => {
            Verdict::Refused(s.code(), s.message().to_string())
        }
        Code::InvalidArgument if s.message().contains("x-twill-forwarded-cert") => {
            Verdict::Refused(s.code(), s.message().to_string())
        }
        Code::Unavailable if store_not_leader(s.message()) => Verdict::Admitted(what),
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Internal
        | Code::DeadlineExceeded => Verdict::Trouble(what),
        _ => Verdict::Admitted(what),
    }
}

/// Calls `m` on `channel` with a body naming `node` (in the request's `node_name`
/// field, when it has one) and `headers`; at most `timeout`. A streaming RPC counts
/// once its answer's headers arrive (the stream is dropped).
pub async fn call(
    channel: &Channel,
    m: &Method,
    node: &str,
    headers: &[(&'static str, String)],
    timeout: Duration,
) -> Verdict {
    let attempt = async {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready()
            .await
            .map_err(|e| Verdict::Trouble(format!("not ready: {e}")))?;
        let mut req = tonic::Request::new(body(m.node_name_field, node));
        for (k, v) in headers {
            let v = v
                .parse()
                .map_err(|e| Verdict::Trouble(format!("header {k}: {e}")))?;
            req.metadata_mut().insert(*k, v);
        }
        let path = http::uri::PathAndQuery::from_static(m.path);
        if m.server_streaming {
            grpc.server_streaming(req, path, Raw).await.map(drop)
        } else {
            grpc.unary(req, path, Raw).await.map(drop)
        }
        .map_err(|s| classify(&s))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Verdict::Admitted("OK".into()),
        Ok(Err(v)) => v,
        Err(_) => Verdict::Trouble(format!("no answer within {timeout:?}")),
    }
}

/// The DER of every `CERTIFICATE` block of `pem`, in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>> {
    let out = twill_ctl::certs::pem_blocks(pem.as_bytes(), "CERTIFICATE")?;
    if out.is_empty() {
        bail!("no CERTIFICATE block in the PEM");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_pem() {
        assert_eq!(body(0, "x"), Vec::<u8>::new());
        assert_eq!(body(1, "ab"), vec![0x0a, 2, b'a', b'b']);
        let pem = "-----BEGIN CERTIFICATE-----\nAAEC/w==\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\naGk=\n-----END CERTIFICATE-----\n";
        assert_eq!(
            pem_certificates(pem).unwrap(),
            vec![vec![0, 1, 2, 0xff], b"hi".to_vec()]
        );
    }
}
