//! flannel's etcd mode, the anchor: every simulated node holds its own TLS connection
//! to etcd, lists the subnet prefix and watches it from there, and writes its lease as
//! a key under an etcd lease with a TTL — the data path of flanneld's etcd subnet
//! manager. Failed writes are retried every second, as flanneld does.
//!
//! flanneld also lists every lease before it picks a subnet and creates its key in a
//! create-only transaction, retrying on collisions; here each node writes a
//! pre-assigned subnet with a plain put, so these figures are a lower bound on what
//! flannel costs etcd.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_proto::etcd::etcdserverpb::{
    self as pb, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
};
use twill_proto::etcd::mvccpb::event::EventType;

use crate::pki::Pki;
use crate::sim::{self, Seen, Tracker, TrackerRx, Who};

/// flannel's key prefix.
pub const PREFIX: &str = "/coreos.com/network/subnets/";
/// flannel's lease TTL.
const TTL_S: i64 = 24 * 3600;
const CONNECT_PARALLEL: usize = 64;

/// The subnet key of storm node `i` (10.(1+i/256).(i%256).0/24) or joiner `r`
/// (10.250.r.0/24), as flannel writes it.
pub fn key(who: Who) -> String {
    match who {
        Who::Node(i) => format!("{PREFIX}10.{}.{}.0-24", 1 + i / 256, i % 256),
        Who::Joiner(r) => format!("{PREFIX}10.250.{r}.0-24"),
        Who::Other => format!("{PREFIX}10.255.255.0-24"),
    }
}

/// Whose key this is.
fn key_who(key: &[u8]) -> Who {
    let Some(rest) = key.strip_prefix(PREFIX.as_bytes()) else {
        return Who::Other;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return Who::Other;
    };
    let mut it = s.split('.');
    let (_, a, b) = (it.next(), it.next(), it.next());
    let (Some(Ok(a)), Some(Ok(b))) = (a.map(str::parse::<usize>), b.map(str::parse::<usize>))
    else {
        return Who::Other;
    };
    match a {
        250 => Who::Joiner(b as u32),
        1..=249 => Who::Node((a - 1) * 256 + b),
        _ => Who::Other,
    }
}

/// The lease as flanneld writes it (`subnet.LeaseAttrs`, JSON).
fn value(i: usize, joiner: bool) -> String {
    format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        sim::public_ip(i),
        sim::vtep_mac(i, joiner)
    )
}

fn prefix_end() -> Vec<u8> {
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("prefix") += 1;
    end
}

/// One etcd client connection per name.
pub async fn connect_all(url: &str, pki: &Pki, names: &[String]) -> Result<Vec<Channel>> {
    let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut set = JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let cert = pki.node(name);
        let ca = pki.ca_pem.clone();
        let url = url.to_string();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert.cert_pem, cert.key_pem))
                .domain_name("localhost");
            let mut last = None;
            for _ in 0..5 {
                match Endpoint::from_shared(url.clone())?
                    .tls_config(tls.clone())?
                    .connect_timeout(Duration::from_secs(20))
                    .connect()
                    .await
                {
                    Ok(ch) => return Ok::<_, anyhow::Error>((i, ch)),
                    Err(e) => {
                        last = Some(e);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            Err(anyhow::anyhow!("connect to etcd: {:?}", last))
        });
    }
    let mut out: Vec<Option<Channel>> = (0..names.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r??;
        out[i] = Some(c);
    }
    Ok(out.into_iter().map(|c| c.expect("connected")).collect())
}

/// Waits until etcd answers a range request over TLS.
pub async fn wait_ready(url: &str, pki: &mut Pki, limit: Duration) -> Result<()> {
    let probe = vec!["probe".to_string()];
    pki.ensure_nodes(&probe)?;
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(ch) = connect_all(url, pki, &probe).await {
            let mut kv = KvClient::new(ch[0].clone());
            if kv
                .range(pb::RangeRequest {
                    key: b"/".to_vec(),
                    ..Default::default()
                })
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("etcd not ready after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// flanneld's WatchLeases: list the prefix, watch from the list's revision on; on a
/// compacted or cancelled watch, list again (a reset).
async fn watcher(idx: usize, ch: Channel, t: Arc<Tracker>) {
    let mut kv = KvClient::new(ch.clone());
    let mut watch = WatchClient::new(ch);
    let mut seen = Seen::new(t.n);
    loop {
        if t.stopping.load(Ordering::Relaxed) {
            return;
        }
        let listed = kv
            .range(pb::RangeRequest {
                key: PREFIX.as_bytes().to_vec(),
                range_end: prefix_end(),
                ..Default::default()
            })
            .await;
        let listed = match listed {
            Ok(r) => r.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        seen.clear();
        for kv in &listed.kvs {
            if let Who::Node(i) = key_who(&kv.key) {
                seen.insert(i);
            }
        }
        t.update_seen(idx, seen.len(), Instant::now());
        let rev = listed.header.map_or(0, |h| h.revision);
        let (tx, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: PREFIX.as_bytes().to_vec(),
                    range_end: prefix_end(),
                    start_revision: rev + 1,
                    ..Default::default()
                },
            )),
        };
        if tx.send(create).await.is_err() {
            continue;
        }
        let mut stream = match watch.watch(ReceiverStream::new(rx)).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Ok(Some(resp)) = stream.message().await {
            let now = Instant::now();
            if resp.canceled || resp.compact_revision != 0 {
                t.resets.fetch_add(1, Ordering::Relaxed);
                break;
            }
            for ev in &resp.events {
                let Some(kv) = &ev.kv else { continue };
                let delete = ev.r#type == EventType::Delete as i32;
                match key_who(&kv.key) {
                    Who::Node(i) => {
                        if delete {
                            seen.remove(i);
                        } else {
                            seen.insert(i);
                        }
                    }
                    Who::Joiner(r) if !delete => {
                        let _ = t.fanout_tx.send((r, 0, now));
                    }
                    _ => {}
                }
            }
            t.update_seen(idx, seen.len(), now);
        }
        drop(tx);
        t.breaks.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Grants an etcd lease and writes the key under it; Ok when both succeeded.
async fn write_lease(ch: &Channel, who: Who, i: usize, joiner: bool) -> Result<()> {
    let mut lease = LeaseClient::new(ch.clone());
    let granted = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: TTL_S, id: 0 })
        .await
        .context("lease grant")?
        .into_inner();
    if !granted.error.is_empty() {
        bail!("lease grant: {}", granted.error);
    }
    let mut kv = KvClient::new(ch.clone());
    kv.put(pb::PutRequest {
        key: key(who).into_bytes(),
        value: value(i, joiner).into_bytes(),
        lease: granted.id,
        ..Default::default()
    })
    .await
    .context("put")?;
    Ok(())
}

/// N nodes connected to etcd, and their watchers.
pub struct EtcdFleet {
    clients: Vec<Channel>,
    joiners: Vec<Channel>,
    /// The tracker of this run.
    pub tracker: Arc<Tracker>,
    rx: TrackerRx,
    tasks: JoinSet<()>,
}

impl Drop for EtcdFleet {
    fn drop(&mut self) {
        self.tracker.stopping.store(true, Ordering::Relaxed);
        self.tasks.abort_all();
    }
}

/// Connects N nodes and the fan-out joiners to etcd.
pub async fn fleet(url: &str, pki: &Pki, n: usize, joiners: usize) -> Result<(EtcdFleet, f64)> {
    let names: Vec<String> = (0..n).map(sim::node_name).collect();
    let jnames: Vec<String> = (0..joiners).map(sim::joiner_name).collect();
    let started = Instant::now();
    let clients = connect_all(url, pki, &names).await?;
    let connect_s = started.elapsed().as_secs_f64();
    let joiners = connect_all(url, pki, &jnames).await?;
    let (tracker, rx) = Tracker::new(n);
    Ok((
        EtcdFleet {
            clients,
            joiners,
            tracker: Arc::new(tracker),
            rx,
            tasks: JoinSet::new(),
        },
        connect_s,
    ))
}

impl EtcdFleet {
    /// All N nodes list + watch the prefix and write their lease at once.
    pub async fn storm(&mut self, deadline: Duration) -> sim::StormOutcome {
        let t = self.tracker.clone();
        let start = Instant::now();
        let t0 = t.ns(start);
        for (i, ch) in self.clients.iter().enumerate() {
            self.tasks.spawn(watcher(i, ch.clone(), t.clone()));
            let ch = ch.clone();
            let t = t.clone();
            self.tasks.spawn(async move {
                if t.retry(&t.grant_errors, || write_lease(&ch, Who::Node(i), i, false))
                    .await
                    .is_some()
                {
                    t.granted_at[i].store(t.ns(Instant::now()) - t0 + 1, Ordering::Relaxed);
                }
            });
        }
        sim::wait_converged(&t, start, deadline, "etcd storm").await;
        let mut out = t.storm_outcome(deadline);
        if out.converged {
            out.converge_s -= (t0 as f64) / 1e9;
        }
        out
    }

    /// After the storm's quiet, one more node joins per round, as flanneld does (LeaseGrant, then Put); measures
    /// its first request being sent → the key's delivery at each watcher (and, kept for
    /// comparison, its put's reply → delivery). Gives up after `limit` in all.
    pub async fn fanout(&mut self, rounds: usize, limit: Duration) -> sim::FanoutOutcome {
        let n = self.clients.len();
        // The same quiet after the storm as Twill's fan-out.
        tokio::time::sleep(crate::twill::FANOUT_SETTLE).await;
        let started = Instant::now();
        let mut out = Vec::new();
        for r in 0..rounds.min(self.joiners.len()) {
            if started.elapsed() > limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            // The origin of the fan-out delay: the join's first request leaves now.
            let sent = Instant::now();
            if write_lease(&self.joiners[r], Who::Joiner(r as u32), r, true)
                .await
                .is_err()
            {
                continue;
            }
            let granted = Instant::now();
            let got =
                sim::collect_round(&mut self.rx.fanout, r as u32, n, Duration::from_secs(15)).await;
            out.push((sent, granted, got));
        }
        let mut o = sim::fanout_outcome(n, &out);
        o.expected = (rounds * n) as u64;
        o
    }
}
