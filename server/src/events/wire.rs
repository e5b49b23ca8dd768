//! Watch messages as they travel: `WatchResponse`s framed as gRPC messages (the 5-byte
//! prefix, then the protobuf encoding), written once by the hub and shared by every
//! watcher, and read back (`decode`) by tests and the watch service's fallback.

use bytes::Bytes;
use prost::Message;
use twill_proto::WatchResponse;

use super::MAX_MESSAGE_BYTES;

/// Bytes before the protobuf encoding in a gRPC message: a compressed flag (0) and the
/// length (big-endian u32).
pub(super) const GRPC_PREFIX: usize = 5;

/// `msg` as one gRPC message.
pub(super) fn frame(msg: &WatchResponse) -> Bytes {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(GRPC_PREFIX + len);
    out.push(0);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    msg.encode_raw(&mut out);
    Bytes::from(out)
}

/// Builds the gRPC messages of one `WatchResponse` from encoded events, starting a new
/// part whenever the current one would pass [`MAX_MESSAGE_BYTES`]. Everything is
/// written once, straight into the output (the 5-byte prefix is patched when a part
/// ends), in field order as prost writes it, so a single part is byte for byte what
/// prost makes of the same response.
pub(super) struct Framer<'a> {
    out: Vec<u8>,
    /// Where the current part's prefix starts, and how many events it holds.
    part_start: usize,
    part_events: usize,
    part_revision: u64,
    reset: bool,
    revision: u64,
    epoch: &'a str,
    first: bool,
}

impl<'a> Framer<'a> {
    pub(super) fn new(reset: bool, revision: u64, epoch: &'a str, capacity: usize) -> Self {
        let mut f = Framer {
            out: Vec::with_capacity(capacity),
            part_start: 0,
            part_events: 0,
            part_revision: revision,
            reset,
            revision,
            epoch,
            first: true,
        };
        f.begin_part();
        f
    }

    fn begin_part(&mut self) {
        self.part_start = self.out.len();
        self.part_events = 0;
        self.out.extend_from_slice(&[0; GRPC_PREFIX]);
        if self.reset && self.first {
            prost::encoding::bool::encode(1, &true, &mut self.out);
        }
    }

    /// Adds one `LeaseEvent` of revision `revision` whose encoding is `len` bytes,
    /// written by `write`.
    pub(super) fn push_with(
        &mut self,
        revision: u64,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
        let entry = key_len(2) + encoded_len_varint(len as u64) + len;
        let used = self.out.len() - self.part_start - GRPC_PREFIX;
        if self.part_events > 0 && used + entry > MAX_MESSAGE_BYTES {
            self.end_part(true);
            self.begin_part();
        }
        encode_key(2, WireType::LengthDelimited, &mut self.out);
        encode_varint(len as u64, &mut self.out);
        write(&mut self.out);
        self.part_events += 1;
        self.part_revision = revision;
    }

    /// Adds one encoded `LeaseEvent`.
    pub(super) fn push(&mut self, revision: u64, event: &[u8]) {
        self.push_with(revision, event.len(), |out| out.extend_from_slice(event));
    }

    /// Ends the current part; `more` when events follow it.
    fn end_part(&mut self, more: bool) {
        use prost::encoding::{bool as pbool, string, uint64};
        // A reset's parts all carry the snapshot's revision and only the first resets;
        // the parts of anything else are complete batches, each up to its last event.
        let revision = if self.reset || !more {
            self.revision
        } else {
            self.part_revision
        };
        if revision != 0 {
            uint64::encode(3, &revision, &mut self.out);
        }
        if more && self.reset {
            pbool::encode(4, &true, &mut self.out);
        }
        if !self.epoch.is_empty() {
            string::encode(5, &self.epoch.to_string(), &mut self.out);
        }
        let len = (self.out.len() - self.part_start - GRPC_PREFIX) as u32;
        self.out[self.part_start + 1..self.part_start + GRPC_PREFIX]
            .copy_from_slice(&len.to_be_bytes());
        self.first = false;
    }

    /// The messages, back to back (at least one, even without events).
    pub(super) fn finish(mut self) -> Bytes {
        self.end_part(false);
        self.out.into()
    }
}

/// Encoded watch messages that do not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a gRPC message.
    #[error("truncated gRPC message")]
    Truncated,
    /// A message is not a `WatchResponse`.
    #[error(transparent)]
    Proto(#[from] prost::DecodeError),
}

/// Every `WatchResponse` in `msgs`, gRPC messages back to back as the hub makes them.
pub fn decode(mut msgs: &[u8]) -> Result<Vec<WatchResponse>, DecodeError> {
    let mut out = Vec::new();
    while !msgs.is_empty() {
        let len = msgs
            .get(1..GRPC_PREFIX)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(DecodeError::Truncated)?;
        let body = msgs
            .get(GRPC_PREFIX..GRPC_PREFIX + len)
            .ok_or(DecodeError::Truncated)?;
        out.push(WatchResponse::decode(body)?);
        msgs = &msgs[GRPC_PREFIX + len..];
    }
    Ok(out)
}
