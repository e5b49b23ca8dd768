//! The simulated nodes' Watch: the real gRPC call over the node's own mTLS channel,
//! read with a decoder that keeps only what the tracker needs.
//!
//! Every node must see every lease, so a join storm of N nodes decodes N² leases, all
//! on this machine's 2 cores, beside the controller. The generated decoder allocates
//! five strings per lease and made the load generator cost twice the controller's CPU
//! (perf, N = 5,000), which measured the load generator more than the controller; in
//! a real cluster that cost is spread over N machines. This decoder walks the same
//! wire format (`twill.v1.WatchResponse`) without allocating per lease.

use bytes::Buf;
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use tonic_prost::ProstEncoder;
use twill_proto::WatchRequest;

use crate::sim::{self, Who};

/// One `WatchResponse`, reduced.
#[derive(Debug, Default)]
pub struct Batch {
    pub reset: bool,
    pub revision: u64,
    /// (who, network index ([`sim::network_index`]), deleted) per event, in order; a
    /// lease of a network the run did not make is [`Who::Other`].
    pub events: Vec<(Who, usize, bool)>,
}

/// `LeaseEvent.type` of a deletion.
const TYPE_DELETE: u64 = twill_proto::lease_event::Type::Delete as u64;

fn malformed(what: &str) -> Status {
    Status::internal(format!("malformed WatchResponse: {what}"))
}

/// A length-delimited field's bytes.
fn sub<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], Status> {
    let len = decode_varint(buf).map_err(|_| malformed("length"))? as usize;
    if len > buf.len() {
        return Err(malformed("truncated field"));
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

/// Skips one field. The wire types a lease holds are skipped inline: prost's general
/// `skip_field` (groups, recursion limits) was a seventh of the load generator's CPU in
/// a 5,000-node storm, where every node skips the fields of 5,000 leases.
fn skip(wire: WireType, tag: u32, buf: &mut &[u8]) -> Result<(), Status> {
    let fixed = |buf: &mut &[u8], n: usize| match buf.get(n..) {
        Some(rest) => {
            *buf = rest;
            Ok(())
        }
        None => Err(malformed("truncated field")),
    };
    match wire {
        WireType::Varint => decode_varint(buf)
            .map(drop)
            .map_err(|_| malformed("varint")),
        WireType::LengthDelimited => sub(buf).map(drop),
        WireType::SixtyFourBit => fixed(buf, 8),
        WireType::ThirtyTwoBit => fixed(buf, 4),
        WireType::StartGroup | WireType::EndGroup => {
            skip_field(wire, tag, buf, DecodeContext::default()).map_err(|_| malformed("field"))
        }
    }
}

/// `Lease.node_name` (field 1) and `Lease.network` (field 15; absent: the default
/// network, index 0) of an encoded `Lease`.
fn lease_who(mut buf: &[u8]) -> Result<(Who, usize), Status> {
    let (mut who, mut network) = (Who::Other, Some(0));
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|_| malformed("key"))?;
        match (tag, wire) {
            (1, WireType::LengthDelimited) => who = sim::who(sub(&mut buf)?),
            (15, WireType::LengthDelimited) => network = sim::network_index(sub(&mut buf)?),
            _ => skip(wire, tag, &mut buf)?,
        }
    }
    Ok(match network {
        Some(k) => (who, k),
        None => (Who::Other, 0),
    })
}

/// `(who, network, deleted)` of an encoded `LeaseEvent` (type = 1, lease = 2).
fn event(mut buf: &[u8]) -> Result<(Who, usize, bool), Status> {
    let (mut who, mut network, mut deleted) = (Who::Other, 0, false);
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|_| malformed("key"))?;
        match (tag, wire) {
            (1, WireType::Varint) => {
                deleted = decode_varint(&mut buf).map_err(|_| malformed("type"))? == TYPE_DELETE
            }
            (2, WireType::LengthDelimited) => (who, network) = lease_who(sub(&mut buf)?)?,
            _ => skip(wire, tag, &mut buf)?,
        }
    }
    Ok((who, network, deleted))
}

/// An encoded `WatchResponse` (reset = 1, events = 2, revision = 3; merged messages
/// repeat fields, and the last scalar wins, as in any protobuf decoder).
fn batch(mut buf: &[u8]) -> Result<Batch, Status> {
    // An event takes more than 48 bytes: one allocation, never grown.
    let mut out = Batch {
        events: Vec::with_capacity(buf.len() / 48),
        ..Batch::default()
    };
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|_| malformed("key"))?;
        match (tag, wire) {
            (1, WireType::Varint) => {
                out.reset = decode_varint(&mut buf).map_err(|_| malformed("reset"))? != 0
            }
            (2, WireType::LengthDelimited) => out.events.push(event(sub(&mut buf)?)?),
            (3, WireType::Varint) => {
                out.revision = decode_varint(&mut buf).map_err(|_| malformed("revision"))?
            }
            _ => skip(wire, tag, &mut buf)?,
        }
    }
    Ok(out)
}

/// Encodes `WatchRequest` with prost, decodes responses into [`Batch`].
#[derive(Debug, Clone, Default)]
struct WatchCodec;

#[derive(Debug, Clone, Default)]
struct BatchDecoder;

impl Decoder for BatchDecoder {
    type Item = Batch;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Batch>, Status> {
        // Read in place when the message is in one piece (tonic's buffer is): a copy
        // of every snapshot part was a fresh megabyte, and page faults on fresh
        // megabytes were a third of the load generator's CPU in a 5,000-node storm.
        let len = buf.remaining();
        let out = if buf.chunk().len() == len {
            batch(buf.chunk())
        } else {
            batch(&buf.copy_to_bytes(len))
        };
        if buf.remaining() == len {
            buf.advance(len);
        }
        out.map(Some)
    }
}

impl Codec for WatchCodec {
    type Encode = WatchRequest;
    type Decode = Batch;
    type Encoder = ProstEncoder<WatchRequest>;
    type Decoder = BatchDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> BatchDecoder {
        BatchDecoder
    }
}

/// `AgentService.Watch` from `from_revision` on `channel`: one stream of the leases of
/// every network in `networks` (empty: the default network only, as before there were
/// several).
pub async fn watch(
    channel: Channel,
    from_revision: u64,
    networks: &[String],
) -> Result<Streaming<Batch>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = PathAndQuery::from_static("/twill.v1.AgentService/Watch");
    let req = tonic::Request::new(WatchRequest {
        from_revision,
        networks: networks.to_vec(),
        ..Default::default()
    });
    Ok(grpc
        .server_streaming(req, path, WatchCodec)
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use twill_proto::{lease_event::Type, Lease, LeaseEvent, WatchResponse};

    use super::*;

    fn ev(name: &str, t: Type, rev: u64) -> LeaseEvent {
        ev_in("", name, t, rev)
    }

    fn ev_in(network: &str, name: &str, t: Type, rev: u64) -> LeaseEvent {
        LeaseEvent {
            r#type: t as i32,
            revision: rev,
            lease: Some(Lease {
                node_name: name.into(),
                subnet: "10.244.3.0/24".into(),
                public_ip: "198.18.0.3".into(),
                backend_type: "vxlan".into(),
                vtep_mac: "0a:58:00:00:03:01".into(),
                expires_at_unix: 1_900_000_000,
                revision: rev,
                vni: 1,
                reserved: false,
                network: network.into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_what_the_generated_decoder_reads() {
        let a = WatchResponse {
            reset: true,
            events: vec![ev("n3", Type::Put, 5), ev("j7", Type::Put, 6)],
            revision: 6,
            ..Default::default()
        };
        let b = WatchResponse {
            reset: false,
            events: vec![ev("n3", Type::Delete, 7), ev("other", Type::Put, 8)],
            revision: 8,
            ..Default::default()
        };
        // Two messages concatenated: what the controller sends for merged batches.
        let mut wire = a.encode_to_vec();
        wire.extend(b.encode_to_vec());
        let got = batch(&wire).unwrap();
        assert!(got.reset, "a reset set by any merged part stays set");
        assert_eq!(got.revision, 8, "the last revision wins");
        assert_eq!(
            got.events,
            vec![
                (Who::Node(3), 0, false),
                (Who::Joiner(7), 0, false),
                (Who::Node(3), 0, true),
                (Who::Other, 0, false)
            ]
        );
    }

    #[test]
    fn reads_the_network_of_each_lease() {
        let m = WatchResponse {
            reset: false,
            events: vec![
                ev_in("net2", "n4", Type::Put, 9),
                ev_in("", "n4", Type::Put, 10),
                ev_in("net3", "j1", Type::Put, 11),
                ev_in("blue", "n4", Type::Put, 12),
            ],
            revision: 12,
            ..Default::default()
        };
        let got = batch(&m.encode_to_vec()).unwrap();
        assert_eq!(
            got.events,
            vec![
                (Who::Node(4), 1, false),
                (Who::Node(4), 0, false),
                (Who::Joiner(1), 2, false),
                (Who::Other, 0, false),
            ],
            "a network the bench did not make is no storm lease"
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let wire = WatchResponse {
            reset: false,
            events: vec![ev("n1", Type::Put, 1)],
            revision: 1,
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 1..wire.len() {
            let _ = batch(&wire[..cut]);
        }
        assert!(batch(&wire[..wire.len() - 1]).is_err());
    }
}
