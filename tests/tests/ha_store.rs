//! High availability on etcd (issue 14), without network namespaces: controllers on
//! 127.0.0.1 (`tests/src/replicas.rs`), a real 3-member etcd on 127.0.0.1
//! (`tests/src/etcd.rs`), agents played by this test over gRPC with node
//! certificates of their own. What the controllers stored is read from etcd directly
//! and decoded (`twill.v1.Lease`, `twill.v1.LeaseEvent`).
//!
//! 1. `leader_kills_lose_no_acknowledged_lease`: 200 nodes acquire and keep renewing
//!    (and moving their public IP) through all three replicas while the leader is
//!    SIGKILLed 20 times: no subnet is held twice, every acknowledged lease is in etcd
//!    with the subnet acknowledged (a node is only ever acknowledged one subnet), the
//!    event log is gap-free, matches `meta/revision` and replays to the lease table,
//!    and every replica serves that table.
//! 2. `a_frozen_leader_is_fenced`: the leader is SIGSTOPped past its 3 s election lease;
//!    another replica leads and grants subnets; Acquires queued on the frozen leader's
//!    connections (and one sent right after SIGCONT) write nothing of their own: no
//!    subnet is handed out twice; the old leader steps down and is a follower.
//! 3. `etcd_quorum_loss_stops_writes_not_reads`: with one etcd member of three down,
//!    Acquires succeed; with two down, open watches stay open, admin reads answer,
//!    writes fail UNAVAILABLE naming etcd/leader/quorum; after the restarts writes
//!    resume, the open watches deliver them, and nothing acknowledged is lost.
//! 4. `sled_store_migrates_to_etcd`: a sled store of 1,000 leases made by a real
//!    controller is copied by `--migrate-from-sled` (same leases, same subnets); a
//!    rerun is a no-op; a prefix holding another store's leases is refused; three
//!    controllers on the copy give existing nodes their old subnets.
//!
//! Each test skips loudly without etcd or the binaries (fails with CI set). They run
//! one at a time (a lock): each one alone fills the two cores of a test machine.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ipnet::Ipv4Net;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::lease_event::Type as EventType;
use twill_proto::{
    AcquireRequest, GetNetworkConfigRequest, Lease, LeaseEvent, ListLeasesRequest, StatusRequest,
    WatchRequest,
};
use twill_tests::replicas::{
    base_args, channel, etcd_args, pick_addrs, replica_bins, run_kept, runtime, Controller, Pki,
    Ready, ReplicaSet, HA_NET_CONF,
};
use twill_tests::{hold_for, wait_until, Bins, Check, EtcdCluster};

/// One test at a time: three etcd members and three debug controllers per test.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long one gRPC call of the test may take (a follower forwarding a write waits for the
/// leader as long as the call's own deadline allows, and the leader 5 s for etcd).
const CALL_TIMEOUT: Duration = Duration::from_secs(12);
/// How long an election may take (the dead leader's 3 s lease, then the campaign, on a
/// busy machine).
const ELECTION: Duration = Duration::from_secs(30);
/// How long writes may take to resume after a disruption ends.
const RESUME: Duration = Duration::from_secs(30);
/// Replicas in each set.
const REPLICAS: usize = 3;

// ------------------------------------------------------------------ set-up

/// One scenario at a time (each runs three replicas and an etcd cluster), in a temp dir
/// of its own (see `run_kept`).
fn run(prefix: &str, scenario: impl FnOnce(&Path) -> Result<()>) {
    let _serial = serial();
    run_kept(prefix, scenario);
}

fn serial() -> parking_lot::MutexGuard<'static, ()> {
    SERIAL.lock()
}

/// A test node: a name, a unicast locally administered VTEP MAC and two public IPs (it
/// moves between them), all distinct from every other node's.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    mac: String,
    ips: [String; 2],
}

fn node(prefix: &str, i: usize) -> Node {
    // one prefix letter per test keeps MACs distinct across the nodes of one store
    let tag = prefix.as_bytes()[0];
    Node {
        name: format!("{prefix}{i:04}"),
        mac: format!("0a:58:{tag:02x}:00:{:02x}:{:02x}", i >> 8, i & 0xff),
        ips: [
            format!("100.64.{}.{}", i / 250, i % 250 + 1),
            format!("100.65.{}.{}", i / 250, i % 250 + 1),
        ],
    }
}

/// One node's channels to every replica.
fn node_channels(pki: &Pki, set: &ReplicaSet, name: &str) -> Result<Vec<Channel>> {
    let pem = pki.node(name)?;
    (0..set.len())
        .map(|i| channel(&set.url(i), pki.ca_pem(), &pem))
        .collect()
}

/// What became of one Acquire.
#[derive(Debug, Clone)]
enum Answer {
    Granted(Box<Lease>),
    Refused(Code, String),
    Unanswered,
}

impl Answer {
    fn describe(&self) -> String {
        match self {
            Answer::Granted(l) => format!(
                "granted {} (public_ip {}, revision {})",
                l.subnet, l.public_ip, l.revision
            ),
            Answer::Refused(c, m) => format!("refused {c:?}: {m}"),
            Answer::Unanswered => format!("no answer within {CALL_TIMEOUT:?}"),
        }
    }
}

async fn acquire(ch: &Channel, n: &Node, ip: &str, requested: &str) -> Answer {
    let req = AcquireRequest {
        node_name: n.name.clone(),
        requested_subnet: requested.to_string(),
        public_ip: ip.to_string(),
        backend_type: "vxlan".into(),
        vtep_mac: n.mac.clone(),
        ..Default::default()
    };
    match tokio::time::timeout(
        CALL_TIMEOUT,
        AgentServiceClient::new(ch.clone()).acquire(req),
    )
    .await
    {
        Ok(Ok(r)) => match r.into_inner().lease {
            Some(l) => Answer::Granted(Box::new(l)),
            None => Answer::Refused(Code::Internal, "an answer without a lease".into()),
        },
        Ok(Err(s)) => Answer::Refused(s.code(), s.message().to_string()),
        Err(_) => Answer::Unanswered,
    }
}

/// Whether a refusal is one an agent retries: the cluster is between leaders, a
/// replica or etcd is down, or the node's rate limit applies.
fn retriable(a: &Answer) -> bool {
    matches!(
        a,
        Answer::Unanswered
            | Answer::Refused(
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Internal,
                _
            )
    )
}

fn answer_kind(a: &Answer) -> String {
    match a {
        Answer::Granted(_) => "OK".into(),
        Answer::Refused(c, _) => format!("{c:?}"),
        Answer::Unanswered => "no answer".into(),
    }
}

/// Acquires through the replicas in turn (starting at `first`) until one grants it
/// or `deadline` passes; the lease and how many attempts failed.
async fn acquire_retrying(
    chans: &[Channel],
    first: usize,
    n: &Node,
    ip: &str,
    deadline: Duration,
    tally: &Tally,
) -> Result<(Lease, u32)> {
    let start = Instant::now();
    let mut failed = 0u32;
    loop {
        let via = (first + failed as usize) % chans.len();
        let a = acquire(&chans[via], n, ip, "").await;
        match a {
            Answer::Granted(l) => return Ok((*l, failed)),
            ref a if retriable(a) => {
                tally.refused(a);
                failed += 1;
                if start.elapsed() > deadline {
                    bail!(
                        "{}: no grant within {deadline:?} ({failed} attempts failed; last: {})",
                        n.name,
                        a.describe()
                    );
                }
                let backoff = if matches!(a, Answer::Refused(Code::ResourceExhausted, _)) {
                    1000
                } else {
                    100 + 50 * u64::from(failed.min(8))
                };
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
            a => bail!("{}: Acquire via replica {via}: {}", n.name, a.describe()),
        }
    }
}

/// Failed attempts by kind, with a sample message of each.
#[derive(Default)]
struct Tally {
    by_kind: Mutex<BTreeMap<String, (u64, String)>>,
}

impl Tally {
    fn refused(&self, a: &Answer) {
        let mut m = self.by_kind.lock();
        let e = m.entry(answer_kind(a)).or_insert((0, a.describe()));
        e.0 += 1;
    }

    fn report(&self) -> String {
        let m = self.by_kind.lock();
        if m.is_empty() {
            return "none".into();
        }
        m.iter()
            .map(|(k, (n, sample))| format!("{n} × {k} (e.g. {sample:?})"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn total(&self) -> u64 {
        let m = self.by_kind.lock();
        m.values().map(|(n, _)| n).sum()
    }
}

/// One acknowledged lease.
#[derive(Debug, Clone)]
struct Ack {
    subnet: String,
    public_ip: String,
    revision: u64,
}

/// Every acknowledged lease, by node, in the order acknowledged.
#[derive(Default)]
struct Acks {
    by_node: Mutex<BTreeMap<String, Vec<Ack>>>,
    count: AtomicU64,
}

impl Acks {
    fn record(&self, l: &Lease) {
        self.by_node
            .lock()
            .entry(l.node_name.clone())
            .or_default()
            .push(Ack {
                subnet: l.subnet.clone(),
                public_ip: l.public_ip.clone(),
                revision: l.revision,
            });
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn snapshot(&self) -> BTreeMap<String, Vec<Ack>> {
        self.by_node.lock().clone()
    }
}

/// A cheap deterministic pseudo-random number (splitmix64), for jitter.
fn jitter(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ------------------------------------------------------------------ etcd, read directly

/// What the controllers stored under a prefix, decoded.
#[derive(Debug, Default)]
struct Stored {
    leases: BTreeMap<String, Lease>,
    events: BTreeMap<u64, LeaseEvent>,
    /// `meta/revision`, when present.
    revision: Option<u64>,
    /// Every key with its raw value (for before/after comparisons).
    raw: Vec<(String, Vec<u8>)>,
    problems: Vec<String>,
}

fn read_store(etcd: &EtcdCluster, prefix: &str) -> Result<Stored> {
    let raw = etcd.get_prefix(prefix)?;
    let mut s = Stored::default();
    for (key, value) in &raw {
        let rest = key.strip_prefix(prefix).unwrap_or(key);
        if let Some(node) = rest.strip_prefix("lease/") {
            match Lease::decode(value.as_slice()) {
                Ok(l) => {
                    if l.node_name != node {
                        s.problems
                            .push(format!("{key} holds the lease of {:?}", l.node_name));
                    }
                    s.leases.insert(node.to_string(), l);
                }
                Err(e) => s.problems.push(format!("{key} is not a Lease: {e}")),
            }
        } else if let Some(rev) = rest.strip_prefix("event/") {
            let Ok(r) = rev.parse::<u64>() else {
                s.problems
                    .push(format!("event key {key} is not a revision"));
                continue;
            };
            if rev.len() != 20 {
                s.problems
                    .push(format!("event key {key} is not 20 digits long"));
            }
            match LeaseEvent::decode(value.as_slice()) {
                Ok(e) => {
                    s.events.insert(r, e);
                }
                Err(e) => s.problems.push(format!("{key} is not a LeaseEvent: {e}")),
            }
        } else if rest == "meta/revision" {
            match String::from_utf8_lossy(value).parse() {
                Ok(r) => s.revision = Some(r),
                Err(_) => s.problems.push(format!(
                    "meta/revision is {:?}",
                    String::from_utf8_lossy(value)
                )),
            }
        }
    }
    s.raw = raw;
    Ok(s)
}

fn net(subnet: &str) -> Result<Ipv4Net> {
    subnet
        .parse()
        .with_context(|| format!("{subnet:?} is not a subnet"))
}

/// Pairs of leases (node, subnet) whose subnets overlap.
fn overlaps<'a>(leases: impl Iterator<Item = (&'a str, &'a str)>) -> Result<Vec<String>> {
    let mut by_start: Vec<(Ipv4Addr, Ipv4Addr, &str, &str)> = Vec::new();
    for (node, subnet) in leases {
        let n = net(subnet)?;
        by_start.push((n.network(), n.broadcast(), node, subnet));
    }
    by_start.sort();
    Ok(by_start
        .windows(2)
        .filter(|w| w[1].0 <= w[0].1)
        .map(|w| format!("{} ({}) overlaps {} ({})", w[0].2, w[0].3, w[1].2, w[1].3))
        .collect())
}

/// The store's own consistency, whatever was acknowledged: no two leases overlap or
/// share a VTEP MAC; the event keys are gap-free, each holds its own revision, the
/// highest equals `meta/revision`; each lease's last event is it; and when the whole
/// history is kept, replaying it never gives one subnet to two nodes and ends in
/// exactly the stored lease table. Returns a summary line.
fn check_store(s: &Stored) -> Result<String> {
    let mut problems = s.problems.clone();
    problems.extend(overlaps(
        s.leases
            .values()
            .map(|l| (l.node_name.as_str(), l.subnet.as_str())),
    )?);
    let mut macs: HashMap<&str, &str> = HashMap::new();
    for l in s.leases.values() {
        if let Some(other) = macs.insert(&l.vtep_mac, &l.node_name) {
            problems.push(format!(
                "{} and {other} share the VTEP MAC {}",
                l.node_name, l.vtep_mac
            ));
        }
    }
    let (first, last) = match (s.events.keys().next(), s.events.keys().next_back()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => (0, 0),
    };
    if !s.events.is_empty() && s.events.len() as u64 != last - first + 1 {
        let missing: Vec<u64> = (first..=last)
            .filter(|r| !s.events.contains_key(r))
            .take(10)
            .collect();
        // Not a fault: after a write that etcd did not confirm (a timeout without
        // quorum), the writer never reuses that batch's revisions, so that no revision
        // can name two different events; the log skips them.
        eprintln!(
            "note: the event log {first}..={last} skips revisions (holds {} events; first skipped: {missing:?})",
            s.events.len()
        );
    }
    for (r, e) in &s.events {
        if e.revision != *r {
            problems.push(format!("event/{r:020} holds revision {}", e.revision));
        }
    }
    match s.revision {
        Some(m) if !s.events.is_empty() && m != last => problems.push(format!(
            "meta/revision is {m} but the highest event is {last}"
        )),
        None if !s.events.is_empty() => {
            problems.push(format!("no meta/revision, but events up to {last}"))
        }
        _ => {}
    }
    let meta = s.revision.unwrap_or(0);
    for l in s.leases.values() {
        if l.revision > meta {
            problems.push(format!(
                "{}'s lease has revision {} beyond meta/revision {meta}",
                l.node_name, l.revision
            ));
        }
        if let Some(e) = s.events.get(&l.revision) {
            let same = e.r#type == EventType::Put as i32
                && e.lease.as_ref().is_some_and(|el| {
                    el.node_name == l.node_name
                        && el.subnet == l.subnet
                        && el.public_ip == l.public_ip
                        && el.vtep_mac == l.vtep_mac
                });
            if !same {
                problems.push(format!(
                    "{}'s lease (revision {}, {}) is not what event/{:020} holds: {:?}",
                    l.node_name, l.revision, l.subnet, l.revision, e
                ));
            }
        }
    }
    let mut replayed = "history not complete: not replayed".to_string();
    if first == 1 {
        let mut table: BTreeMap<String, Lease> = BTreeMap::new();
        let mut holder: HashMap<Ipv4Net, String> = HashMap::new();
        let prefix_len = match s.leases.values().next() {
            Some(l) => net(&l.subnet)?.prefix_len(),
            None => 24,
        };
        for (r, e) in &s.events {
            let Some(l) = &e.lease else {
                problems.push(format!("event {r} has no lease"));
                continue;
            };
            if e.r#type == EventType::Delete as i32 {
                if let Some(gone) = table.remove(&l.node_name) {
                    holder.remove(&net(&gone.subnet)?);
                }
                continue;
            }
            let mine = net(&l.subnet)?;
            if mine.prefix_len() != prefix_len {
                problems.push(format!("event {r} gives {} of another length", l.subnet));
            }
            if let Some(other) = holder.get(&mine).filter(|h| **h != l.node_name) {
                problems.push(format!(
                    "event {r} gives {} to {} while {other} holds it",
                    l.subnet, l.node_name
                ));
            }
            if let Some(prev) = table.get(&l.node_name) {
                if prev.subnet != l.subnet {
                    // not wrong in itself (a lease may expire and come back), but
                    // these tests never let one expire: a node's subnet moved.
                    problems.push(format!(
                        "event {r} moves {} from {} to {}",
                        l.node_name, prev.subnet, l.subnet
                    ));
                }
            }
            if let Some(prev) = table.insert(l.node_name.clone(), l.clone()) {
                holder.remove(&net(&prev.subnet)?);
            }
            holder.insert(mine, l.node_name.clone());
        }
        let stored: BTreeMap<&String, (&str, &str, &str, u64)> = s
            .leases
            .iter()
            .map(|(k, l)| {
                (
                    k,
                    (
                        l.subnet.as_str(),
                        l.public_ip.as_str(),
                        l.vtep_mac.as_str(),
                        l.revision,
                    ),
                )
            })
            .collect();
        let replay: BTreeMap<&String, (&str, &str, &str, u64)> = table
            .iter()
            .map(|(k, l)| {
                (
                    k,
                    (
                        l.subnet.as_str(),
                        l.public_ip.as_str(),
                        l.vtep_mac.as_str(),
                        l.revision,
                    ),
                )
            })
            .collect();
        if stored != replay {
            let diff: Vec<String> = stored
                .keys()
                .chain(replay.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| stored.get(*k) != replay.get(*k))
                .take(10)
                .map(|k| {
                    format!(
                        "{k}: stored {:?}, replayed {:?}",
                        stored.get(k),
                        replay.get(k)
                    )
                })
                .collect();
            problems.push(format!(
                "replaying the event log does not give the stored leases: {diff:?}"
            ));
        }
        replayed = format!("replayed {} events to the same table", s.events.len());
    }
    ensure!(
        problems.is_empty(),
        "the store is inconsistent:\n  {}",
        problems.join("\n  ")
    );
    Ok(format!(
        "{} leases, events {first}..={last}, meta/revision {meta}, {replayed}",
        s.leases.len()
    ))
}

/// Every acknowledged lease is in the store with the subnet acknowledged, and a node
/// was never acknowledged two subnets; `last` says whether the stored lease must also
/// have the last acknowledged public IP (its final acknowledged request was its last).
fn check_acks(s: &Stored, acks: &BTreeMap<String, Vec<Ack>>, last: bool) -> Result<()> {
    let mut problems = Vec::new();
    for (node, list) in acks {
        let subnets: BTreeSet<&str> = list.iter().map(|a| a.subnet.as_str()).collect();
        if subnets.len() > 1 {
            problems.push(format!(
                "{node} was acknowledged {} different subnets: {subnets:?}",
                subnets.len()
            ));
        }
        let revs: Vec<u64> = list.iter().map(|a| a.revision).collect();
        if revs.windows(2).any(|w| w[1] < w[0]) {
            problems.push(format!(
                "{node}'s acknowledged lease revisions went backwards: {revs:?}"
            ));
        }
        let Some(final_ack) = list.last() else {
            continue;
        };
        match s.leases.get(node) {
            None => problems.push(format!(
                "{node} was acknowledged {} ({} times) but has no lease in etcd",
                final_ack.subnet,
                list.len()
            )),
            Some(l) if l.subnet != final_ack.subnet => problems.push(format!(
                "{node} was acknowledged {} but etcd holds {}",
                final_ack.subnet, l.subnet
            )),
            Some(l) if last && l.public_ip != final_ack.public_ip => problems.push(format!(
                "{node}'s last acknowledged public IP is {} but etcd holds {}",
                final_ack.public_ip, l.public_ip
            )),
            Some(l) if l.revision < final_ack.revision => problems.push(format!(
                "{node} was acknowledged revision {} but etcd holds revision {}",
                final_ack.revision, l.revision
            )),
            Some(_) => {}
        }
    }
    ensure!(
        problems.is_empty(),
        "acknowledged leases were lost or changed:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

// ------------------------------------------------------------------ admin reads

fn admin_channel(pki: &Pki, set: &ReplicaSet, i: usize) -> Result<Channel> {
    channel(&set.url(i), pki.ca_pem(), pki.admin())
}

/// The lease table replica `i` serves (AdminService.ListLeases, answered locally).
async fn served_table(ch: &Channel) -> Result<(BTreeMap<String, Lease>, u64)> {
    let r = tokio::time::timeout(
        CALL_TIMEOUT,
        AdminServiceClient::new(ch.clone()).list_leases(ListLeasesRequest::default()),
    )
    .await
    .context("ListLeases did not answer")??
    .into_inner();
    ensure!(
        r.next_page_token.is_empty(),
        "ListLeases paged without a page size"
    );
    Ok((
        r.leases
            .into_iter()
            .map(|l| (l.node_name.clone(), l))
            .collect(),
        r.revision,
    ))
}

/// Waits until every replica serves exactly the stored lease table at the stored
/// revision (their etcd watches caught up).
fn wait_replicas_serve(
    rt: &tokio::runtime::Runtime,
    pki: &Pki,
    set: &ReplicaSet,
    s: &Stored,
) -> Result<()> {
    let want: BTreeMap<&String, (&str, &str, u64)> = s
        .leases
        .iter()
        .map(|(k, l)| (k, (l.subnet.as_str(), l.public_ip.as_str(), l.revision)))
        .collect();
    let rev = s.revision.unwrap_or(0);
    for i in 0..set.len() {
        let ch = admin_channel(pki, set, i)?;
        wait_until(
            Duration::from_secs(20),
            &format!("replica {i} to serve etcd's table (revision {rev})"),
            || -> Result<()> {
                let (table, at) = rt.block_on(served_table(&ch))?;
                let got: BTreeMap<&String, (&str, &str, u64)> = table
                    .iter()
                    .map(|(k, l)| (k, (l.subnet.as_str(), l.public_ip.as_str(), l.revision)))
                    .collect();
                if got != want || at != rev {
                    let diff = want
                        .keys()
                        .chain(got.keys())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .filter(|k| want.get(*k) != got.get(*k))
                        .take(5)
                        .map(|k| format!("{k}: etcd {:?}, served {:?}", want.get(k), got.get(k)))
                        .collect::<Vec<_>>();
                    bail!(
                        "serves {} leases at revision {at} (etcd: {} at {rev}); differences: {diff:?}",
                        got.len(),
                        want.len()
                    );
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}

// ------------------------------------------------------------------ 1. leader kills

/// Nodes in the crash test.
const CRASH_NODES: usize = 200;
/// Nodes that start at once; the others join a few at a time just before each kill.
const CRASH_FIRST_WAVE: usize = 120;
/// Leader kills.
const KILLS: usize = 20;

#[derive(Debug)]
struct Kill {
    victim: usize,
    pid: u32,
    acks_before: u64,
    /// From SIGKILL until another replica says it leads.
    elected: Duration,
    /// From SIGKILL until the next acknowledged Acquire.
    resumed: Duration,
}

#[test]
fn leader_kills_lose_no_acknowledged_lease() {
    let Some(bins) = replica_bins("ha_store::leader_kills_lose_no_acknowledged_lease") else {
        return;
    };
    run("twill-ha-crash", |dir| crash_scenario(&bins, dir));
}

fn crash_scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    // tonic's lazy channels need the runtime's context
    let rt = runtime();
    let _rt = rt.enter();
    let pki = Arc::new(Pki::create(bins, &dir.join("certs"))?);
    let etcd = EtcdCluster::start(3)?;
    let set = Arc::new(ReplicaSet::start(
        bins,
        &etcd,
        &pki,
        dir,
        REPLICAS,
        "/twill/",
        HA_NET_CONF,
    )?);
    set.wait_leader(ELECTION, None)?;
    let nodes: Vec<Node> = (0..CRASH_NODES).map(|i| node("c", i)).collect();
    let certs_started = Instant::now();
    let chans: Vec<Arc<Vec<Channel>>> = nodes
        .iter()
        .map(|n| node_channels(&pki, &set, &n.name).map(Arc::new))
        .collect::<Result<_>>()?;
    let certs_took = certs_started.elapsed();
    let acks = Arc::new(Acks::default());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let acquisitions = Arc::new(AtomicU64::new(0));
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(0usize);
    let per_kill = (CRASH_NODES - CRASH_FIRST_WAVE).div_ceil(KILLS);
    let load_started = Instant::now();
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (n, chans, acks, tally, stop, retried, acquisitions) = (
            n.clone(),
            chans[i].clone(),
            acks.clone(),
            tally.clone(),
            stop.clone(),
            retried.clone(),
            acquisitions.clone(),
        );
        let cohort = if i < CRASH_FIRST_WAVE {
            0
        } else {
            1 + (i - CRASH_FIRST_WAVE) / per_kill
        };
        let mut gate = gate_rx.clone();
        tasks.push(rt.spawn(async move {
            gate.wait_for(|g| *g >= cohort)
                .await
                .map_err(|_| anyhow!("gate closed"))?;
            let mut k = 0u64;
            loop {
                let last = stop.load(Ordering::SeqCst);
                // the public IP moves every third request: an event, not a renewal
                let ip = &n.ips[((k / 3) % 2) as usize];
                let (lease, failed) =
                    acquire_retrying(&chans, i + k as usize, &n, ip, RESUME * 2, &tally).await?;
                acks.record(&lease);
                acquisitions.fetch_add(1, Ordering::SeqCst);
                if failed > 0 {
                    retried.fetch_add(1, Ordering::SeqCst);
                }
                if last {
                    return Ok::<_, anyhow::Error>(k + 1);
                }
                k += 1;
                let pause = 1500 + jitter((i as u64) << 32 | k) % 1000;
                let until = Instant::now() + Duration::from_millis(pause);
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    let mut kills: Vec<Kill> = Vec::new();
    let mut gate = 0;
    let mut want_acks = 20;
    let result = (|| -> Result<()> {
        for k in 0..KILLS {
            let leader = set.wait_leader(ELECTION, None)?;
            // The leader serves: some grants since the last kill (the first kill comes
            // in the middle of the first wave of 120 concurrent Acquires).
            wait_until(
                RESUME,
                &format!("{want_acks} acknowledged Acquires before kill {}", k + 1),
                || acks.count() >= want_acks,
            )?;
            // A few nodes join right now: their first Acquire races the kill.
            gate += 1;
            gate_tx.send_replace(gate);
            let acks_before = acks.count();
            let killed_at = Instant::now();
            let pid = set.kill(leader)?;
            set.restart(leader)?;
            let new = set.wait_leader(ELECTION, None)?;
            let elected = killed_at.elapsed();
            wait_until(
                RESUME,
                &format!("an Acquire to be acknowledged after kill {}", k + 1),
                || acks.count() > acks_before + 5,
            )?;
            let resumed = killed_at.elapsed();
            set.wait_ready(leader, ELECTION)?;
            println!(
                "kill {:2}: SIGKILL replica {leader} (pid {pid}); replica {new} leads after {elected:.1?}; \
                 Acquires acknowledged again after {resumed:.1?}; {} acknowledged so far",
                k + 1,
                acks.count()
            );
            kills.push(Kill {
                victim: leader,
                pid,
                acks_before,
                elected,
                resumed,
            });
            want_acks = acks.count() + 20;
        }
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    let mut finals = 0u64;
    let mut task_errors = Vec::new();
    for t in tasks {
        match rt.block_on(t) {
            Ok(Ok(n)) => finals += n,
            Ok(Err(e)) => task_errors.push(format!("{e:#}")),
            Err(e) => task_errors.push(format!("a node task panicked: {e}")),
        }
    }
    let load_took = load_started.elapsed();
    result.map_err(|e| anyhow!("{e:#}{}", set.log_tails()))?;
    ensure!(
        task_errors.is_empty(),
        "{} node(s) failed:\n  {}",
        task_errors.len(),
        task_errors.join("\n  ")
    );
    ensure!(finals == acquisitions.load(Ordering::SeqCst));

    let stored = read_store(&etcd, "/twill/")?;
    let summary = check_store(&stored)?;
    let acked = acks.snapshot();
    ensure!(
        acked.len() == CRASH_NODES,
        "only {} nodes were acknowledged",
        acked.len()
    );
    check_acks(&stored, &acked, true)?;
    ensure!(
        stored.leases.len() == CRASH_NODES,
        "etcd holds {} leases, not {CRASH_NODES}: {:?}",
        stored.leases.len(),
        stored
            .leases
            .keys()
            .filter(|k| !acked.contains_key(*k))
            .collect::<Vec<_>>()
    );
    wait_replicas_serve(&rt, &pki, &set, &stored)?;

    let mut per_victim = [0usize; REPLICAS];
    for k in &kills {
        per_victim[k.victim] += 1;
        ensure!(k.pid > 0 && k.acks_before > 0);
    }
    let max = |f: fn(&Kill) -> Duration| kills.iter().map(f).max().unwrap_or_default();
    let mean = |f: fn(&Kill) -> Duration| {
        kills.iter().map(f).sum::<Duration>() / kills.len().max(1) as u32
    };
    let leader_changes: Vec<String> = (0..REPLICAS)
        .map(|i| {
            set.metrics(i)
                .ok()
                .and_then(|m| twill_tests::replicas::metric_value(&m, "twill_leader_changes_total"))
                .map_or("?".into(), |v| v.to_string())
        })
        .collect();
    println!(
        "crash test: {} leader kills (per replica {per_victim:?}); new leader after {:.1?} on average \
         (at most {:.1?}); Acquires acknowledged again after {:.1?} on average (at most {:.1?})\n\
         crash test: {} acknowledged Acquires of {CRASH_NODES} nodes ({} needed retries; failed attempts: \
         {} = {}); load ran {load_took:.1?}; node certificates made in {certs_took:.1?}\n\
         crash test: etcd: {summary}; leader changes seen by the (restarted) replicas: {leader_changes:?}; \
         all in {:.1?}",
        kills.len(),
        mean(|k| k.elected),
        max(|k| k.elected),
        mean(|k| k.resumed),
        max(|k| k.resumed),
        acquisitions.load(Ordering::SeqCst),
        retried.load(Ordering::SeqCst),
        tally.total(),
        tally.report(),
        t0.elapsed()
    );
    Ok(())
}

// ------------------------------------------------------------------ 2. fencing

#[test]
fn a_frozen_leader_is_fenced() {
    let Some(bins) = replica_bins("ha_store::a_frozen_leader_is_fenced") else {
        return;
    };
    run("twill-ha-fence", |dir| fencing_scenario(&bins, dir));
}

/// Freeze rounds: each freezes the leader of the moment.
const FREEZES: usize = 2;
/// The replicas' `--leader-ttl` (the default).
const LEADER_TTL: Duration = Duration::from_secs(2);
/// Acquires queued on a frozen leader's connections in each round (many, so that on
/// SIGCONT some may reach its lease writer before it notices it was deposed).
const QUEUED: usize = 40;

fn fencing_scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    // tonic's lazy channels need the runtime's context
    let rt = runtime();
    let _rt = rt.enter();
    let pki = Pki::create(bins, &dir.join("certs"))?;
    let etcd = EtcdCluster::start(3)?;
    let set = ReplicaSet::start(bins, &etcd, &pki, dir, REPLICAS, "/twill/", HA_NET_CONF)?;
    let tally = Tally::default();
    let acks = Acks::default();
    set.wait_leader(ELECTION, None)?;

    // Ten nodes hold leases before the first freeze.
    let mut next = 0usize;
    let mut take = |n: usize| -> Vec<Node> {
        let v = (next..next + n).map(|i| node("f", i)).collect();
        next += n;
        v
    };
    for (i, n) in take(10).iter().enumerate() {
        let chans = node_channels(&pki, &set, &n.name)?;
        let (l, _) = rt.block_on(acquire_retrying(&chans, i, n, &n.ips[0], RESUME, &tally))?;
        acks.record(&l);
    }
    let mut rounds = Vec::new();
    let mut fenced_writes = 0usize;
    for round in 1..=FREEZES {
        let old = set.wait_leader(ELECTION, None)?;
        // Nodes that will ask the frozen leader: connected to it (TLS done) beforehand.
        let stale = take(QUEUED + 1);
        let stale_chans: Vec<Channel> = stale
            .iter()
            .map(|n| channel(&set.url(old), pki.ca_pem(), &*pki.node(&n.name)?))
            .collect::<Result<_>>()?;
        for (n, ch) in stale.iter().zip(&stale_chans) {
            rt.block_on(AgentServiceClient::new(ch.clone()).get_network_config(
                GetNetworkConfigRequest {
                    ..Default::default()
                },
            ))
            .with_context(|| format!("{} cannot reach the leader", n.name))?;
        }
        let log_before = set.log(old).len();

        let frozen_at = Instant::now();
        let pid = set.freeze(old)?;
        // Queued on the frozen leader's connections: they wait in its socket buffers.
        let queued: Vec<_> = stale[..QUEUED]
            .iter()
            .zip(&stale_chans)
            .map(|(n, ch)| {
                let (n, ch) = (n.clone(), ch.clone());
                rt.spawn(async move { acquire(&ch, &n, &n.ips[0], "").await })
            })
            .collect();
        let new = set.wait_leader(ELECTION, Some(old))?;
        let elected = frozen_at.elapsed();
        // etcd counts the TTL from the last keep-alive it got, and the leader sends one
        // every third of it: the lease lapses 2/3 to 3/3 of the TTL after the freeze,
        // never sooner.
        ensure!(
            elected >= LEADER_TTL * 2 / 3 - Duration::from_millis(100),
            "replica {new} led {elected:.1?} after the freeze, before the frozen leader's lease could lapse"
        );
        // The new leader grants the subnets the frozen one would pick next.
        let third = (0..REPLICAS)
            .find(|i| *i != old && *i != new)
            .expect("3 replicas");
        for (k, n) in take(5).iter().enumerate() {
            let chans = node_channels(&pki, &set, &n.name)?;
            let via = if k % 2 == 0 { new } else { third };
            let (l, _) =
                rt.block_on(acquire_retrying(&chans, via, n, &n.ips[0], RESUME, &tally))?;
            acks.record(&l);
        }
        // Frozen well past the TTL, whatever the grants took.
        let past_ttl = frozen_at + Duration::from_secs(4);
        std::thread::sleep(past_ttl.saturating_duration_since(Instant::now()));
        let frozen_for = frozen_at.elapsed();
        set.thaw(old)?;
        let thawed_at = Instant::now();
        // And one more, sent to the old leader the moment it runs again.
        let last = stale[QUEUED].clone();
        let after_thaw = rt.block_on(acquire(&stale_chans[QUEUED], &last, &last.ips[0], ""));
        let mut answers: Vec<(Node, Answer)> = Vec::new();
        for (n, t) in stale[..QUEUED].iter().zip(queued) {
            answers.push((n.clone(), rt.block_on(t)?));
        }
        answers.push((last, after_thaw));
        let follower = wait_until(
            Duration::from_secs(10),
            &format!("the thawed replica {old} to be a follower"),
            || match set.readyz(old) {
                Ready::Follower => Check::Ready(()),
                r => Check::NotYet(format!("{r:?}")),
            },
        );
        let follower_after = thawed_at.elapsed();
        follower.map_err(|e| anyhow!("{e:#}{}", set.log_tails()))?;
        ensure!(
            set.leaders() == vec![new],
            "after the thaw, /readyz leaders are {:?} (expected only {new})",
            set.leaders()
        );
        let is_leader = twill_tests::replicas::metric_value(&set.metrics(old)?, "twill_is_leader");
        ensure!(
            is_leader == Some(0.0),
            "the old leader's twill_is_leader is {is_leader:?}"
        );
        let log = set.log(old);
        let step_lines: Vec<String> = log[log_before..]
            .lines()
            .filter(|l| {
                l.contains("stepping down")
                    || l.contains("lost the leadership while writing")
                    || l.contains("leadership ended")
            })
            .map(str::to_string)
            .collect();
        ensure!(
            !step_lines.is_empty(),
            "replica {old}'s log shows no step-down after the thaw:\n{}",
            set.log_tails()
        );
        let fenced = step_lines
            .iter()
            .any(|l| l.contains("lost the leadership while writing"));
        fenced_writes += usize::from(fenced);

        // What the frozen leader was asked: granted only through the new leader; a
        // refusal wrote nothing.
        let mut refused = Vec::new();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for (n, a) in &answers {
            *kinds.entry(answer_kind(a)).or_default() += 1;
            match a {
                Answer::Granted(l) => acks.record(l),
                Answer::Refused(Code::Unavailable, _) => refused.push(n.clone()),
                a => bail!(
                    "{}'s Acquire on the old leader: {} (want a grant through the new leader, or UNAVAILABLE)",
                    n.name,
                    a.describe()
                ),
            }
        }
        let samples: BTreeSet<String> = answers
            .iter()
            .filter(|(_, a)| !matches!(a, Answer::Granted(_)))
            .map(|(_, a)| a.describe())
            .collect();
        let stored = read_store(&etcd, "/twill/")?;
        for n in &refused {
            ensure!(
                !stored.leases.contains_key(&n.name),
                "{} was refused by the old leader, yet etcd holds a lease for it: {:?}",
                n.name,
                stored.leases[&n.name]
            );
        }
        check_store(&stored)?;
        check_acks(&stored, &acks.snapshot(), true)?;
        // The refused ones retry, as agents do, and get subnets of their own.
        for (k, n) in refused.iter().enumerate() {
            let chans = node_channels(&pki, &set, &n.name)?;
            let (l, _) = rt.block_on(acquire_retrying(&chans, k, n, &n.ips[0], RESUME, &tally))?;
            acks.record(&l);
        }
        rounds.push(format!(
            "round {round}: froze leader replica {old} (pid {pid}) for {frozen_for:.1?}; replica {new} \
             led {elected:.1?} after the freeze; the thawed one was a follower {follower_after:.1?} after \
             SIGCONT; its {} Acquires: {kinds:?}; refusals: {samples:?}\n  its log after the thaw: {}",
            QUEUED + 1,
            step_lines
                .iter()
                .map(|l| l.split_once("  ").map_or(l.as_str(), |(_, m)| m.trim()))
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    let stored = read_store(&etcd, "/twill/")?;
    let summary = check_store(&stored)?;
    check_acks(&stored, &acks.snapshot(), true)?;
    ensure!(
        stored.leases.len() == next,
        "{} leases in etcd, {next} nodes acknowledged",
        stored.leases.len()
    );
    wait_replicas_serve(&rt, &pki, &set, &stored)?;
    println!(
        "fencing: {}\nfencing: a write of a deposed leader reached etcd and was fenced in {fenced_writes} \
         of {FREEZES} rounds (in the others it stepped down first)\n\
         fencing: etcd: {summary}; retried attempts: {}; all in {:.1?}",
        rounds.join("\nfencing: "),
        tally.report(),
        t0.elapsed()
    );
    Ok(())
}

// ------------------------------------------------------------------ 3. quorum

/// An open watch stream and what it delivered.
struct Watcher {
    /// Nodes seen in PUT events.
    seen: Arc<Mutex<BTreeSet<String>>>,
    messages: Arc<AtomicU64>,
    /// Why the stream ended, once it did.
    ended: Arc<Mutex<Option<String>>>,
}

impl Watcher {
    fn open(rt: &tokio::runtime::Runtime, ch: Channel) -> Result<Watcher> {
        let mut stream = rt
            .block_on(AgentServiceClient::new(ch).watch(WatchRequest {
                from_revision: 0,
                epoch: String::new(),
                ..Default::default()
            }))
            .context("cannot open a watch")?
            .into_inner();
        let w = Watcher {
            seen: Arc::default(),
            messages: Arc::default(),
            ended: Arc::default(),
        };
        let (seen, messages, ended) = (w.seen.clone(), w.messages.clone(), w.ended.clone());
        rt.spawn(async move {
            let why = loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        messages.fetch_add(1, Ordering::SeqCst);
                        let mut seen = seen.lock();
                        for e in resp.events {
                            if e.r#type == EventType::Put as i32 {
                                if let Some(l) = e.lease {
                                    seen.insert(l.node_name);
                                }
                            }
                        }
                    }
                    Ok(None) => break "the server ended the stream".to_string(),
                    Err(s) => break format!("{:?}: {}", s.code(), s.message()),
                }
            };
            *ended.lock() = Some(why);
        });
        Ok(w)
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().clone()
    }

    fn has_seen(&self, node: &str) -> bool {
        self.seen.lock().contains(node)
    }
}

#[test]
fn etcd_quorum_loss_stops_writes_not_reads() {
    let Some(bins) = replica_bins("ha_store::etcd_quorum_loss_stops_writes_not_reads") else {
        return;
    };
    run("twill-ha-quorum", |dir| quorum_scenario(&bins, dir));
}

fn quorum_scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    // tonic's lazy channels need the runtime's context
    let rt = runtime();
    let _rt = rt.enter();
    let pki = Pki::create(bins, &dir.join("certs"))?;
    let etcd = EtcdCluster::start(3)?;
    let set = ReplicaSet::start(bins, &etcd, &pki, dir, REPLICAS, "/twill/", HA_NET_CONF)?;
    let tally = Tally::default();
    let acks = Acks::default();
    set.wait_leader(ELECTION, None)?;
    let mut next = 0usize;
    let mut grant = |rt: &tokio::runtime::Runtime, via: usize, tally: &Tally| -> Result<Node> {
        let n = node("q", next);
        next += 1;
        let chans = node_channels(&pki, &set, &n.name)?;
        let (l, _) = rt.block_on(acquire_retrying(&chans, via, &n, &n.ips[0], RESUME, tally))?;
        acks.record(&l);
        Ok(n)
    };
    for i in 0..9 {
        grant(&rt, i % REPLICAS, &tally)?;
    }
    // A watch on every replica, as agents keep them.
    let watchers: Vec<Watcher> = (0..REPLICAS)
        .map(|i| {
            let pem = pki.node(&format!("qwatch{i}"))?;
            Watcher::open(&rt, channel(&set.url(i), pki.ca_pem(), &pem)?)
        })
        .collect::<Result<_>>()?;
    wait_until(
        Duration::from_secs(10),
        "every watch's first message",
        || {
            watchers
                .iter()
                .all(|w| w.messages.load(Ordering::SeqCst) > 0)
        },
    )?;

    // One member of three down: a quorum still.
    etcd.kill(0)?;
    let one_down = Tally::default();
    let started = Instant::now();
    for i in 0..REPLICAS {
        grant(&rt, i, &one_down)?;
    }
    println!(
        "quorum: etcd member 0 killed: 3 Acquires (one per replica) granted in {:.1?}; failed attempts: {}",
        started.elapsed(),
        one_down.report()
    );

    // Every replica has caught up with what was acknowledged while it still can: a
    // replica whose etcd member was the one killed re-opens its watch on another
    // member, and once quorum is gone no replica can learn anything new.
    for i in 0..REPLICAS {
        let ch = admin_channel(&pki, &set, i)?;
        wait_until(
            Duration::from_secs(20),
            &format!("replica {i} to list every acknowledged lease with one etcd member down"),
            || -> Result<()> {
                let (table, _) = rt.block_on(served_table(&ch))?;
                let missing: Vec<String> = acks
                    .snapshot()
                    .into_keys()
                    .filter(|n| !table.contains_key(n))
                    .collect();
                ensure!(missing.is_empty(), "missing {missing:?}");
                Ok(())
            },
        )?;
    }

    // Two down: no quorum.
    etcd.kill(1)?;
    let lost_at = Instant::now();
    let mut refusals = Vec::new();
    let mut landed_maybe = Vec::new();
    for i in 0..REPLICAS {
        let n = node("q", 500 + i);
        let ch = channel(&set.url(i), pki.ca_pem(), &*pki.node(&n.name)?)?;
        let asked = Instant::now();
        let a = rt.block_on(acquire(&ch, &n, &n.ips[0], ""));
        refusals.push(format!(
            "replica {i} after {:.1?}: {} ({:.1?} to answer)",
            lost_at.elapsed(),
            a.describe(),
            asked.elapsed()
        ));
        match &a {
            Answer::Refused(Code::Unavailable, m) => {
                let m = m.to_lowercase();
                ensure!(
                    m.contains("etcd") || m.contains("leader") || m.contains("quorum"),
                    "replica {i}'s refusal without quorum does not say why: {}",
                    a.describe()
                );
            }
            a => bail!(
                "replica {i} answered an Acquire without etcd quorum with {} (want UNAVAILABLE){}",
                a.describe(),
                set.log_tails()
            ),
        }
        landed_maybe.push(n);
    }
    // Within the election lease the leader gives up; from then on every replica
    // refuses at once, saying no replica leads.
    let no_leader = wait_until(
        Duration::from_secs(15),
        "no replica to claim the leadership",
        || {
            let l = set.leaders();
            if l.is_empty() {
                Ok(())
            } else {
                Err(format!("leaders: {l:?}"))
            }
        },
    );
    let stepped_down = lost_at.elapsed();
    no_leader.map_err(|e| anyhow!("{e:#}{}", set.log_tails()))?;
    for i in 0..REPLICAS {
        let n = node("q", 510 + i);
        let ch = channel(&set.url(i), pki.ca_pem(), &*pki.node(&n.name)?)?;
        let asked = Instant::now();
        let a = rt.block_on(acquire(&ch, &n, &n.ips[0], ""));
        let took = asked.elapsed();
        refusals.push(format!(
            "replica {i} after {:.1?}: {} ({took:.1?} to answer)",
            lost_at.elapsed(),
            a.describe()
        ));
        ensure!(
            matches!(&a, Answer::Refused(Code::Unavailable, m) if m.contains("leader") || m.contains("etcd") || m.contains("quorum")),
            "replica {i}, with no leader, answered {}",
            a.describe()
        );
        ensure!(
            took < Duration::from_secs(7),
            "replica {i} took {took:.1?} to refuse a write with no leader"
        );
        landed_maybe.push(n);
    }
    // Reads keep being served where they arrive; watches stay open.
    let mut reads = Vec::new();
    for i in 0..REPLICAS {
        let ch = admin_channel(&pki, &set, i)?;
        let asked = Instant::now();
        let (table, rev) = rt.block_on(served_table(&ch))?;
        let list_took = asked.elapsed();
        for node in acks.snapshot().keys() {
            ensure!(
                table.contains_key(node),
                "replica {i} does not list {node} without quorum"
            );
        }
        let asked = Instant::now();
        let status = rt
            .block_on(tokio::time::timeout(
                CALL_TIMEOUT,
                AdminServiceClient::new(ch.clone()).status(StatusRequest {
                    this_replica_only: false,
                    ..Default::default()
                }),
            ))
            .context("Status did not answer without quorum")??
            .into_inner();
        reads.push(format!(
            "replica {i}: ListLeases {} leases at revision {rev} in {list_took:.1?}, Status (revision {}, \
             {} replicas listed) in {:.1?}",
            table.len(),
            status.revision,
            status.replicas.len(),
            asked.elapsed()
        ));
    }
    hold_for(
        Duration::from_secs(3),
        "every watch to stay open without quorum",
        || match watchers
            .iter()
            .enumerate()
            .find_map(|(i, w)| w.ended().map(|e| (i, e)))
        {
            Some((i, e)) => Err(format!("the watch on replica {i} ended: {e}")),
            None => Ok(()),
        },
    )?;
    let quorum_lost_for = lost_at.elapsed();

    // Quorum back.
    etcd.restart(0)?;
    etcd.restart(1)?;
    let back_at = Instant::now();
    let mut post = Vec::new();
    let after = Tally::default();
    for i in 0..REPLICAS {
        post.push(grant(&rt, i, &after)?);
    }
    let resumed = back_at.elapsed();
    for (i, w) in watchers.iter().enumerate() {
        wait_until(
            Duration::from_secs(15),
            &format!("the watch on replica {i} to deliver the grants after the outage"),
            || match w.ended() {
                Some(e) => Check::Fatal(format!("it ended: {e}")),
                None if post.iter().all(|n| w.has_seen(&n.name)) => Check::Ready(()),
                None => Check::NotYet("not all seen".into()),
            },
        )?;
    }
    // Requests refused without quorum may still have been committed once it was back
    // (etcd kept them in its log): allowed, if they hold subnets of their own. An
    // agent retrying gets the same one.
    let stored = read_store(&etcd, "/twill/")?;
    let landed: Vec<String> = landed_maybe
        .iter()
        .filter(|n| stored.leases.contains_key(&n.name))
        .map(|n| format!("{} ({})", n.name, stored.leases[&n.name].subnet))
        .collect();
    for (k, n) in landed_maybe.iter().enumerate() {
        let before = stored.leases.get(&n.name).map(|l| l.subnet.clone());
        let chans = node_channels(&pki, &set, &n.name)?;
        let (l, _) = rt.block_on(acquire_retrying(&chans, k, n, &n.ips[0], RESUME, &after))?;
        if let Some(b) = before {
            ensure!(
                b == l.subnet,
                "{} held {b} in etcd but its retry was granted {}",
                n.name,
                l.subnet
            );
        }
        acks.record(&l);
    }
    let stored = read_store(&etcd, "/twill/")?;
    let summary = check_store(&stored)?;
    check_acks(&stored, &acks.snapshot(), true)?;
    wait_replicas_serve(&rt, &pki, &set, &stored)?;
    println!(
        "quorum: two etcd members down for {quorum_lost_for:.1?}; the leader stepped down within \
         {stepped_down:.1?}; refusals:\n  {}\nquorum: reads without quorum:\n  {}\n\
         quorum: after the restarts, 3 Acquires granted in {resumed:.1?} (failed attempts: {}); every \
         watch stayed open and delivered them; refused-but-committed: {landed:?}\n\
         quorum: etcd: {summary}; all in {:.1?}",
        refusals.join("\n  "),
        reads.join("\n  "),
        after.report(),
        t0.elapsed()
    );
    Ok(())
}

// ------------------------------------------------------------------ 4. migration

/// Nodes in the sled store.
const MIGRATED: usize = 1000;

/// Runs `program ARGS` to its exit (at most `timeout`): exit status, stdout, stderr.
fn run_once(program: &Path, args: &[String], timeout: Duration) -> Result<(bool, String, String)> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TWILL_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{} {args:?} did not exit within {timeout:?}; stderr: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn sled_store_migrates_to_etcd() {
    let Some(bins) = replica_bins("ha_store::sled_store_migrates_to_etcd") else {
        return;
    };
    run("twill-ha-migrate", |dir| migration_scenario(&bins, dir));
}

fn migration_scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let t0 = Instant::now();
    // tonic's lazy channels need the runtime's context
    let rt = runtime();
    let _rt = rt.enter();
    let d = dir;
    let pki = Arc::new(Pki::create(bins, &d.join("certs"))?);
    let conf = d.join("net-conf.json");
    std::fs::write(&conf, HA_NET_CONF)?;
    let sled_dir = d.join("sled");

    // A single controller on sled, and 1,000 nodes through it.
    let addrs = pick_addrs(1)?[0];
    let mut args = base_args(&pki, addrs, &conf, &sled_dir);
    args.extend(["--store".into(), "sled".into()]);
    let mut single = Controller::new(
        "sled-controller",
        &bins.controller(),
        args,
        d.join("sled.log"),
    );
    single.start()?;
    wait_until(
        Duration::from_secs(30),
        "the sled controller to be ready",
        || match twill_tests::kit::http_get(addrs.http, "/readyz") {
            Ok(r) if r.status == 200 => Check::Ready(()),
            Ok(r) => Check::NotYet(format!("{} {}", r.status, r.body)),
            Err(e) if single.is_running() => Check::NotYet(format!("{e:#}")),
            Err(_) => Check::Fatal(single.log_tail(40)),
        },
    )?;
    let url = format!("https://{}", addrs.grpc);
    let nodes: Arc<Vec<Node>> = Arc::new((0..MIGRATED).map(|i| node("m", i)).collect());
    let granted_started = Instant::now();
    let acks = Arc::new(Acks::default());
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (nodes, acks, tally, next, pki, url) = (
                nodes.clone(),
                acks.clone(),
                tally.clone(),
                next.clone(),
                pki.clone(),
                url.clone(),
            );
            rt.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let Some(n) = nodes.get(i) else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    let ch = channel(&url, pki.ca_pem(), &*pki.node(&n.name)?)?;
                    let (l, _) = acquire_retrying(&[ch], 0, n, &n.ips[0], RESUME, &tally).await?;
                    acks.record(&l);
                }
            })
        })
        .collect();
    for w in workers {
        rt.block_on(w)??;
    }
    let granted_in = granted_started.elapsed();
    let admin = channel(&url, pki.ca_pem(), pki.admin())?;
    let (sled_table, sled_rev) = rt.block_on(served_table(&admin))?;
    ensure!(sled_table.len() == MIGRATED, "{} leases", sled_table.len());
    let st = single.terminate()?;
    ensure!(
        st.success(),
        "the sled controller exited with {st} at SIGTERM"
    );
    drop(single);

    // Copy it.
    let etcd = EtcdCluster::start(3)?;
    let migrate = |prefix: &str| -> Result<(bool, String, String)> {
        let mut args = vec![
            "--migrate-from-sled".to_string(),
            sled_dir.display().to_string(),
        ];
        args.extend(etcd_args(&etcd, prefix));
        args.extend(base_args(&pki, addrs, &conf, &sled_dir));
        run_once(&bins.controller(), &args, Duration::from_secs(60))
    };
    let started = Instant::now();
    let (ok, out, err) = migrate("/mig/")?;
    let migrated_in = started.elapsed();
    ensure!(ok, "the migration failed:\nstdout: {out}\nstderr: {err}");
    println!("migration: {}", out.trim());
    let stored = read_store(&etcd, "/mig/")?;
    let summary = check_store(&stored)?;
    ensure!(
        stored.leases.len() == MIGRATED,
        "etcd holds {} leases after the copy",
        stored.leases.len()
    );
    ensure!(
        stored.revision == Some(sled_rev),
        "meta/revision {:?}, the sled store was at {sled_rev}",
        stored.revision
    );
    let mut differ = Vec::new();
    for (node, l) in &sled_table {
        let mut want = l.clone();
        want.reserved = false;
        // The admin API does not show whose key holds a lease; the copy must keep it.
        let got = stored.leases.get(node).map(|g| {
            let mut g = g.clone();
            (std::mem::take(&mut g.holder_key), g)
        });
        if !matches!(&got, Some((key, g)) if *g == want && key.len() == 32) {
            differ.push(format!(
                "{node}: sled {want:?}, etcd {:?}",
                stored.leases.get(node)
            ));
        }
    }
    ensure!(
        differ.is_empty(),
        "{} leases differ after the copy, e.g. {:?}",
        differ.len(),
        &differ[..differ.len().min(3)]
    );
    check_acks(&stored, &acks.snapshot(), true)?;

    // Again: nothing to do, nothing changed.
    let (ok, out2, err2) = migrate("/mig/")?;
    ensure!(
        ok,
        "the second migration failed:\nstdout: {out2}\nstderr: {err2}"
    );
    ensure!(
        out2.contains("nothing to do"),
        "the second migration printed {out2:?}"
    );
    let again = read_store(&etcd, "/mig/")?;
    ensure!(again.raw == stored.raw, "the second migration changed etcd");

    // A prefix holding another store's leases is refused.
    std::fs::create_dir_all(d.join("other"))?;
    let other = ReplicaSet::start(
        bins,
        &etcd,
        &pki,
        &d.join("other"),
        1,
        "/other/",
        HA_NET_CONF,
    )?;
    other.wait_leader(ELECTION, None)?;
    let o = node("o", 0);
    let (l, _) = rt.block_on(acquire_retrying(
        &node_channels(&pki, &other, &o.name)?,
        0,
        &o,
        &o.ips[0],
        RESUME,
        &tally,
    ))?;
    other.terminate(0)?;
    drop(other);
    let before = read_store(&etcd, "/other/")?;
    let (ok, out3, err3) = migrate("/other/")?;
    ensure!(
        !ok,
        "migrating into a prefix holding another store's lease succeeded:\n{out3}{err3}"
    );
    ensure!(
        err3.contains("refusing to overwrite") && err3.contains("/other/"),
        "the refusal does not say why: {err3}"
    );
    let after = read_store(&etcd, "/other/")?;
    ensure!(
        after.leases.len() == 1 && after.leases.get(&o.name).map(|x| &x.subnet) == Some(&l.subnet),
        "the refused migration changed /other/: {:?}",
        after.leases.keys().take(5).collect::<Vec<_>>()
    );
    ensure!(
        before.leases == after.leases && before.events == after.events,
        "the refused migration changed /other/"
    );

    // Three controllers on the copy: old nodes keep their subnets.
    std::fs::create_dir_all(d.join("ha"))?;
    let set = ReplicaSet::start(
        bins,
        &etcd,
        &pki,
        &d.join("ha"),
        REPLICAS,
        "/mig/",
        HA_NET_CONF,
    )?;
    let leader = set.wait_leader(ELECTION, None)?;
    let follower = (leader + 1) % REPLICAS;
    let mut sticky = Vec::new();
    for (k, i) in [0usize, MIGRATED / 2, MIGRATED - 1].into_iter().enumerate() {
        let n = &nodes[i];
        let old = &sled_table[&n.name];
        let chans = node_channels(&pki, &set, &n.name)?;
        // agent-style: the subnet from its subnet.env, its own addresses; then without
        // the subnet; then from a new public IP (a change: a new revision)
        for (what, ip, requested) in [
            ("agent-style", &n.ips[0], old.subnet.as_str()),
            ("no requested subnet", &n.ips[0], ""),
            ("new public IP", &n.ips[1], ""),
        ] {
            let via = (follower + k) % REPLICAS;
            let a = rt.block_on(acquire(&chans[via], n, ip, requested));
            let Answer::Granted(l) = &a else {
                bail!("{} ({what}) via replica {via}: {}", n.name, a.describe());
            };
            ensure!(
                l.subnet == old.subnet,
                "{} ({what}) was granted {} but held {} in the sled store",
                n.name,
                l.subnet,
                old.subnet
            );
            acks.record(l);
            sticky.push(format!("{} {what}: {}", n.name, l.subnet));
        }
    }
    let newcomer = node("m", MIGRATED);
    let (l, _) = rt.block_on(acquire_retrying(
        &node_channels(&pki, &set, &newcomer.name)?,
        follower,
        &newcomer,
        &newcomer.ips[0],
        RESUME,
        &tally,
    ))?;
    acks.record(&l);
    let stored = read_store(&etcd, "/mig/")?;
    let summary_after = check_store(&stored)?;
    check_acks(&stored, &acks.snapshot(), true)?;
    ensure!(stored.leases.len() == MIGRATED + 1);
    wait_replicas_serve(&rt, &pki, &set, &stored)?;
    println!(
        "migration: {MIGRATED} leases granted by the sled controller in {granted_in:.1?} (failed attempts: \
         {}); copied in {migrated_in:.1?}; etcd: {summary}\n\
         migration: rerun: {}\nmigration: into /other/: {}\n\
         migration: on 3 etcd replicas: {}; newcomer {} got {}; etcd: {summary_after}; all in {:.1?}",
        tally.report(),
        out2.trim(),
        err3.trim(),
        sticky.join(", "),
        newcomer.name,
        l.subnet,
        t0.elapsed()
    );
    Ok(())
}
