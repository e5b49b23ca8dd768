//! The store's one key space: every key sled and etcd hold, how each is spelled in
//! bytes, the network layout stored beside the leases, and a `Batch` as the key
//! writes that make it. Nothing outside this module spells a key, so the two backends,
//! the mirror and the election cannot drift apart.
//!
//! The bytes are those Twill has always written (existing data directories and etcd
//! prefixes load unchanged). The two backends differ only where etcd has to be read as
//! text: its event keys are zero-padded decimal (so they sort) and its revision is
//! decimal text, where sled uses big-endian bytes for both. etcd keys are relative
//! here; `Etcd::key` puts `--etcd-prefix` in front.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use prost::Message;
use twill_common::networks::NetworkName;
use twill_common::{netconf::BackendType, NetConf};
use twill_proto::lease_event::Type as EventType;

use super::{Batch, LeaseKey};

const LEASE: &str = "lease/";
const EVENT: &str = "event/";
const RESERVATION: &str = "reservation/";
const RECORD: &str = "record/";
const REVISION: &str = "meta/revision";
const LAYOUT: &str = "meta/layout";
const EPOCH: &str = "meta/epoch";
const BATCH_END: &str = "meta/batch-end";
const ELECTION: &str = "election";
const REPLICA: &str = "replicas/";

/// Which backend a key or value is spelled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Events under their revision as 8 big-endian bytes; the revision likewise.
    Sled,
    /// Events under their revision as 20 decimal digits; the revision as decimal text.
    Etcd,
}

impl Dialect {
    /// The stored value of `meta/revision`.
    pub fn revision(self, revision: u64) -> Vec<u8> {
        match self {
            Dialect::Sled => revision.to_be_bytes().to_vec(),
            Dialect::Etcd => revision.to_string().into_bytes(),
        }
    }

    /// Reads a stored `meta/revision`; the error says what is wrong with it.
    pub fn parse_revision(self, value: &[u8]) -> Result<u64, String> {
        match self {
            Dialect::Sled => value
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| format!("{} bytes, expected 8", value.len())),
            Dialect::Etcd => std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| "not a decimal revision".into()),
        }
    }
}

/// What a record beside the leases is (`Store::put_record`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordKind {
    /// A bootstrap token, by token id.
    Token,
    /// An issued certificate, by `<issued at, 24 digits>-<serial>`.
    Issued,
    /// A revocation (Unix seconds as text), by node name or `admin:<name>`.
    Revoked,
}

impl RecordKind {
    const ALL: [RecordKind; 3] = [RecordKind::Token, RecordKind::Issued, RecordKind::Revoked];

    /// The kind as spelled in its keys.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Token => "token",
            RecordKind::Issued => "issued",
            RecordKind::Revoked => "revoked",
        }
    }

    fn parse(s: &str) -> Option<RecordKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `lease/<node>` in the `default` network, `lease/<network>/<node>` in another:
    /// the node's `Lease` (protobuf). Node names hold no '/', so both read back.
    Lease(NetworkName, String),
    /// `event/<revision>`: a `LeaseEvent` (protobuf), the last `retention` of them.
    Event(u64),
    /// `reservation/<node>`, `reservation/<network>/<node>` (as leases): the node's
    /// `Reservation` as text.
    Reservation(NetworkName, String),
    /// `record/<kind>/<id>`: a record beside the leases.
    Record(RecordKind, String),
    /// `meta/revision`: the revision of the last applied batch.
    Revision,
    /// `meta/layout`: the `Layout` the leases were allocated in.
    Layout,
    /// `meta/epoch`: the store's identity, made when it was created.
    Epoch,
    /// `meta/batch-end` (etcd only): the revision a batch written in several
    /// transactions ends at, put by its first. A follower's mirror publishes the
    /// batch's events once it has read them all, as the leader publishes them once it
    /// has written them all, not a part at a time.
    BatchEnd,
    /// `election` (etcd only): the election's name; etcd's election API keeps each
    /// candidate's key under it (`election/<etcd lease id>`).
    Election,
    /// `replicas/<etcd lease id, 16 hex digits>` (etcd only): a replica's advertised
    /// URL, under that replica's etcd lease.
    Replica(i64),
}

impl Key {
    /// The key's bytes (relative to the etcd prefix).
    pub fn encode(&self, dialect: Dialect) -> Vec<u8> {
        match self {
            Key::Event(revision) => match dialect {
                Dialect::Sled => [EVENT.as_bytes(), &revision.to_be_bytes()].concat(),
                Dialect::Etcd => format!("{EVENT}{revision:020}").into_bytes(),
            },
            Key::Lease(network, node) => in_network(LEASE, network, node),
            Key::Reservation(network, node) => in_network(RESERVATION, network, node),
            Key::Record(kind, id) => format!("{RECORD}{}/{id}", kind.as_str()).into_bytes(),
            Key::Revision => REVISION.into(),
            Key::Layout => LAYOUT.into(),
            Key::Epoch => EPOCH.into(),
            Key::BatchEnd => BATCH_END.into(),
            Key::Election => ELECTION.into(),
            Key::Replica(lease) => format!("{REPLICA}{lease:016x}").into_bytes(),
        }
    }

    /// The key these bytes spell, `None` for one Twill does not write (or not as text
    /// where text is expected).
    pub fn decode(dialect: Dialect, key: &[u8]) -> Option<Key> {
        if let (Some(revision), Dialect::Sled) = (key.strip_prefix(EVENT.as_bytes()), dialect) {
            return Some(Key::Event(u64::from_be_bytes(revision.try_into().ok()?)));
        }
        let key = std::str::from_utf8(key).ok()?;
        if let Some(revision) = key.strip_prefix(EVENT) {
            let digits = revision.len() == 20 && revision.bytes().all(|b| b.is_ascii_digit());
            return digits.then(|| revision.parse().ok().map(Key::Event))?;
        }
        if let Some(rest) = key.strip_prefix(LEASE) {
            return network_and_node(rest).map(|(network, node)| Key::Lease(network, node));
        }
        if let Some(rest) = key.strip_prefix(RESERVATION) {
            return network_and_node(rest).map(|(network, node)| Key::Reservation(network, node));
        }
        if let Some(record) = key.strip_prefix(RECORD) {
            let (kind, id) = record.split_once('/')?;
            return Some(Key::Record(RecordKind::parse(kind)?, id.into()));
        }
        if let Some(lease) = key.strip_prefix(REPLICA) {
            let hex = lease.len() == 16 && lease.bytes().all(|b| b.is_ascii_hexdigit());
            return hex.then(|| {
                u64::from_str_radix(lease, 16)
                    .ok()
                    .map(|l| Key::Replica(l as i64))
            })?;
        }
        match key {
            REVISION => Some(Key::Revision),
            LAYOUT => Some(Key::Layout),
            EPOCH => Some(Key::Epoch),
            BATCH_END => Some(Key::BatchEnd),
            ELECTION => Some(Key::Election),
            _ => None,
        }
    }
}

/// `<kind><node>` for the `default` network (the keys Twill wrote before several
/// networks existed), `<kind><network>/<node>` for another.
fn in_network(kind: &str, network: &NetworkName, node: &str) -> Vec<u8> {
    if network.is_default() {
        format!("{kind}{node}").into_bytes()
    } else {
        format!("{kind}{network}/{node}").into_bytes()
    }
}

/// Reads what `in_network` wrote after the kind; `None` for a network name that is
/// not one.
fn network_and_node(rest: &str) -> Option<(NetworkName, String)> {
    match rest.split_once('/') {
        Some((network, node)) => Some((NetworkName::new(network).ok()?, node.into())),
        None => Some((NetworkName::default_network(), rest.into())),
    }
}

/// A range of keys: every key that starts with its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Everything (under the etcd prefix).
    All,
    /// Every `Key::Lease`.
    Leases,
    /// Every `Key::Event`.
    Events,
    /// Every `Key::Reservation`.
    Reservations,
    /// Every `Key::Record`.
    Records,
    /// Every `Key::Record` of one kind.
    RecordsOf(RecordKind),
    /// Every `Key::Replica`.
    Replicas,
}

impl Range {
    /// The prefix (relative to the etcd prefix).
    pub fn prefix(self) -> Vec<u8> {
        match self {
            Range::All => Vec::new(),
            Range::Leases => LEASE.into(),
            Range::Events => EVENT.into(),
            Range::Reservations => RESERVATION.into(),
            Range::Records => RECORD.into(),
            Range::RecordsOf(kind) => format!("{RECORD}{}/", kind.as_str()).into_bytes(),
            Range::Replicas => REPLICA.into(),
        }
    }
}

/// What the stored leases depend on: a store allocated under another layout is
/// refused at start. Stored as text (`Network=10.244.0.0/16 SubnetLen=24`); the IPv6
/// pool and the backend join it only when set (not VXLAN), so stores written before
/// dual-stack and host-gw existed keep matching. Turning IPv6 on or off under existing
/// leases is a network change like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The IPv4 pod network and its subnet length, if any.
    pub ipv4: Option<(Ipv4Net, u8)>,
    /// The IPv6 pod network and its subnet length, if any.
    pub ipv6: Option<(Ipv6Net, u8)>,
    /// The backend.
    pub backend: BackendType,
}

impl From<&NetConf> for Layout {
    fn from(conf: &NetConf) -> Self {
        Layout {
            ipv4: conf.ipv4.as_ref().map(|p| (p.network, p.subnet_len)),
            ipv6: conf.ipv6.as_ref().map(|p| (p.network, p.subnet_len)),
            backend: conf.backend.kind,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some((network, len)) = self.ipv4 {
            parts.push(format!("Network={network} SubnetLen={len}"));
        }
        if let Some((network, len)) = self.ipv6 {
            parts.push(format!("IPv6Network={network} IPv6SubnetLen={len}"));
        }
        if self.backend != BackendType::Vxlan {
            parts.push(format!("Backend={}", self.backend));
        }
        f.write_str(&parts.join(" "))
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut v4, mut v4_len, mut v6, mut v6_len) = (None, None, None, None);
        let mut backend = BackendType::Vxlan;
        for part in s.split_whitespace() {
            let bad = || format!("{part:?} is not a layout setting");
            let (name, value) = part.split_once('=').ok_or_else(bad)?;
            match name {
                "Network" => v4 = Some(value.parse::<Ipv4Net>().map_err(|_| bad())?),
                "SubnetLen" => v4_len = Some(value.parse::<u8>().map_err(|_| bad())?),
                "IPv6Network" => v6 = Some(value.parse::<Ipv6Net>().map_err(|_| bad())?),
                "IPv6SubnetLen" => v6_len = Some(value.parse::<u8>().map_err(|_| bad())?),
                "Backend" => {
                    backend = [BackendType::Vxlan, BackendType::HostGw]
                        .into_iter()
                        .find(|b| b.as_str() == value)
                        .ok_or_else(bad)?
                }
                _ => return Err(bad()),
            }
        }
        fn pair<N>(
            net: Option<N>,
            len: Option<u8>,
            which: &str,
        ) -> Result<Option<(N, u8)>, String> {
            match (net, len) {
                (Some(n), Some(l)) => Ok(Some((n, l))),
                (None, None) => Ok(None),
                _ => Err(format!("{which} network and subnet length come together")),
            }
        }
        Ok(Layout {
            ipv4: pair(v4, v4_len, "the IPv4")?,
            ipv6: pair(v6, v6_len, "the IPv6")?,
            backend,
        })
    }
}

/// The network a stored or sent lease names (empty, or one that is not a name: the
/// `default` network, which is all a lease could name before several networks).
pub fn network_of(lease: &twill_proto::Lease) -> NetworkName {
    NetworkName::from_wire(&lease.network).unwrap_or_default()
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Stores the value under the key.
    Put(Key, Vec<u8>),
    /// Deletes the key.
    Delete(Key),
}

/// `b` as key writes, in steps: one per event (its lease, the event, the event that
/// leaves the last `retention`, the revision), one per renewal and one per reservation
/// write. The steps are in order, so a backend that cannot write the batch at once
/// (etcd limits a transaction's size) can write it in parts of whole steps, and
/// whatever parts landed leave the state after some prefix of the events.
///
/// Renewals come after the events, and a renewal of a node one of the batch's events
/// changed later (a higher revision than the renewed lease's: released, revoked or
/// moved after it was renewed) is dropped, since the event's lease is newer. `stored`
/// names the nodes whose reservations the store holds now: when the batch replaces
/// the reservation set, those it no longer has are deleted.
pub fn batch_steps(
    b: &Batch<'_>,
    retention: u64,
    dialect: Dialect,
    stored: &BTreeSet<LeaseKey>,
) -> Vec<Vec<Op>> {
    let mut steps = Vec::new();
    for event in b.events {
        let mut step = Vec::with_capacity(4);
        if let Some(lease) = &event.lease {
            let key = Key::Lease(network_of(lease), lease.node_name.clone());
            step.push(if event.r#type == EventType::Delete as i32 {
                Op::Delete(key)
            } else {
                Op::Put(key, lease.encode_to_vec())
            });
        }
        step.push(Op::Put(Key::Event(event.revision), event.encode_to_vec()));
        // Revisions are consecutive, so each new event pushes exactly one out.
        if let Some(old) = event.revision.checked_sub(retention) {
            step.push(Op::Delete(Key::Event(old)));
        }
        step.push(Op::Put(Key::Revision, dialect.revision(event.revision)));
        steps.push(step);
    }
    for lease in b.renewed {
        let superseded = b.events.iter().any(|e| {
            e.revision > lease.revision
                && e.lease
                    .as_ref()
                    .is_some_and(|l| l.node_name == lease.node_name && l.network == lease.network)
        });
        if !superseded {
            steps.push(vec![Op::Put(
                Key::Lease(network_of(lease), lease.node_name.clone()),
                lease.encode_to_vec(),
            )]);
        }
    }
    if let Some(reservations) = b.reservations {
        for (network, node) in stored.iter().filter(|n| !reservations.contains_key(*n)) {
            steps.push(vec![Op::Delete(Key::Reservation(
                network.clone(),
                node.clone(),
            ))]);
        }
        for ((network, node), subnet) in reservations {
            steps.push(vec![Op::Put(
                Key::Reservation(network.clone(), node.clone()),
                subnet.to_string().into_bytes(),
            )]);
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use twill_proto::{Lease, LeaseEvent};

    fn every_key() -> Vec<Key> {
        let mut keys = vec![
            Key::Lease(NetworkName::default_network(), "node-a".into()),
            Key::Lease(NetworkName::new("blue").unwrap(), "node-a".into()),
            Key::Reservation(NetworkName::new("blue").unwrap(), "node-b".into()),
            Key::Event(0),
            Key::Event(7),
            Key::Event(u64::MAX),
            Key::Reservation(NetworkName::default_network(), "node-b".into()),
            Key::Revision,
            Key::Layout,
            Key::Epoch,
            Key::BatchEnd,
            Key::Election,
            Key::Replica(0x694d_9a3c_11aa_0042),
            Key::Replica(-2),
        ];
        for kind in RecordKind::ALL {
            keys.push(Key::Record(kind, "admin:ops/x".into()));
        }
        keys
    }

    #[test]
    fn every_key_decodes_to_itself_in_both_dialects() {
        for dialect in [Dialect::Sled, Dialect::Etcd] {
            for key in every_key() {
                let bytes = key.encode(dialect);
                assert_eq!(
                    Key::decode(dialect, &bytes),
                    Some(key),
                    "{dialect:?} {bytes:?}"
                );
            }
        }
    }

    #[test]
    fn keys_are_the_bytes_twill_has_always_written() {
        let etcd = |k: Key| String::from_utf8(k.encode(Dialect::Etcd)).unwrap();
        let default = NetworkName::default_network;
        let blue = || NetworkName::new("blue").unwrap();
        assert_eq!(etcd(Key::Lease(default(), "n1".into())), "lease/n1");
        assert_eq!(etcd(Key::Lease(blue(), "n1".into())), "lease/blue/n1");
        assert_eq!(
            etcd(Key::Reservation(blue(), "n1".into())),
            "reservation/blue/n1"
        );
        assert_eq!(etcd(Key::Event(42)), "event/00000000000000000042");
        assert_eq!(
            etcd(Key::Reservation(default(), "n1".into())),
            "reservation/n1"
        );
        assert_eq!(
            etcd(Key::Record(RecordKind::Token, "t".into())),
            "record/token/t"
        );
        assert_eq!(
            etcd(Key::Record(RecordKind::Issued, "i".into())),
            "record/issued/i"
        );
        assert_eq!(
            etcd(Key::Record(RecordKind::Revoked, "n".into())),
            "record/revoked/n"
        );
        assert_eq!(etcd(Key::Revision), "meta/revision");
        assert_eq!(etcd(Key::Layout), "meta/layout");
        assert_eq!(etcd(Key::Epoch), "meta/epoch");
        assert_eq!(etcd(Key::BatchEnd), "meta/batch-end");
        assert_eq!(etcd(Key::Election), "election");
        assert_eq!(etcd(Key::Replica(0x2a)), "replicas/000000000000002a");
        assert_eq!(
            Key::Event(42).encode(Dialect::Sled),
            b"event/\0\0\0\0\0\0\0\x2a"
        );
        assert_eq!(
            Range::RecordsOf(RecordKind::Issued).prefix(),
            b"record/issued/"
        );
        assert_eq!(Dialect::Sled.revision(3), 3u64.to_be_bytes());
        assert_eq!(Dialect::Etcd.revision(3), b"3");
        for dialect in [Dialect::Sled, Dialect::Etcd] {
            assert_eq!(dialect.parse_revision(&dialect.revision(9)), Ok(9));
        }
    }

    #[test]
    fn keys_twill_does_not_write_decode_to_nothing() {
        for key in [
            &b"record/unknown/x"[..],
            b"record/token",
            b"event/12",
            b"election/694d9a3c11aa0042",
            b"replicas/xyz",
            b"meta/other",
            b"lease/\xff",
            b"lease/Not_A_Network/n1",
        ] {
            assert_eq!(Key::decode(Dialect::Etcd, key), None, "{key:?}");
        }
        assert_eq!(Key::decode(Dialect::Sled, b"event/\0\0\x01"), None);
    }

    #[test]
    fn a_layout_reads_back_as_the_text_it_was_stored_as() {
        for text in [
            "Network=10.244.0.0/16 SubnetLen=24",
            "Network=10.244.0.0/16 SubnetLen=24 Backend=host-gw",
            "Network=10.244.0.0/16 SubnetLen=24 IPv6Network=fd00:10:244::/56 IPv6SubnetLen=64",
            "IPv6Network=fd00:10:244::/56 IPv6SubnetLen=64 Backend=host-gw",
        ] {
            let layout: Layout = text.parse().unwrap();
            assert_eq!(layout.to_string(), text);
        }
        for bad in ["10.244.0.0/16 /24", "Network=10.244.0.0/16", "Backend=gre"] {
            assert!(bad.parse::<Layout>().is_err(), "{bad}");
        }
    }

    fn lease(node: &str, revision: u64) -> Lease {
        Lease {
            node_name: node.into(),
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_is_one_step_per_event_then_renewals_then_reservations() {
        let events = [
            LeaseEvent {
                r#type: EventType::Put as i32,
                lease: Some(lease("a", 5)),
                revision: 5,
            },
            LeaseEvent {
                r#type: EventType::Delete as i32,
                lease: Some(lease("b", 6)),
                revision: 6,
            },
        ];
        // `b` renewed before its deletion, `a` after its put, `c` alone.
        let renewed = [lease("b", 2), lease("a", 5), lease("c", 3)];
        let default = NetworkName::default_network;
        let reservations = [(
            (default(), "d".to_string()),
            "10.244.9.0/24".parse().unwrap(),
        )]
        .into();
        let b = Batch {
            events: &events,
            renewed: &renewed,
            reservations: Some(&reservations),
        };
        let stored = [(default(), "d".to_string()), (default(), "e".to_string())].into();
        let steps = batch_steps(&b, 2, Dialect::Etcd, &stored);
        let keys: Vec<Vec<(bool, Key)>> = steps
            .iter()
            .map(|s| {
                s.iter()
                    .map(|op| match op {
                        Op::Put(k, _) => (true, k.clone()),
                        Op::Delete(k) => (false, k.clone()),
                    })
                    .collect()
            })
            .collect();
        let lease_key = |n: &str| Key::Lease(default(), n.into());
        assert_eq!(
            keys,
            vec![
                vec![
                    (true, lease_key("a")),
                    (true, Key::Event(5)),
                    (false, Key::Event(3)),
                    (true, Key::Revision)
                ],
                vec![
                    (false, lease_key("b")),
                    (true, Key::Event(6)),
                    (false, Key::Event(4)),
                    (true, Key::Revision)
                ],
                vec![(true, lease_key("a"))],
                vec![(true, lease_key("c"))],
                vec![(false, Key::Reservation(default(), "e".into()))],
                vec![(true, Key::Reservation(default(), "d".into()))],
            ]
        );
        assert_eq!(steps[1][3], Op::Put(Key::Revision, b"6".to_vec()));
    }
}
