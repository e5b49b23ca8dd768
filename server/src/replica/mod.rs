//! Several controllers on one etcd (`--store etcd`): who leads, and how the others
//! follow.
//!
//! - `election`: each replica campaigns through etcd's election API under an etcd lease
//!   with keep-alive; the winner arms the store's fence, rebuilds its table from etcd
//!   and attaches a lease writer; it lets the writer go the moment its lease may have
//!   lapsed.
//! - `mirror`: every replica (the leader too) follows the prefix with its own etcd
//!   watch and applies what it sees to its hub, so every replica serves watches with
//!   the same revisions.
//! - `forward`: a write that reaches a follower is passed to the leader over mutual
//!   TLS, with the caller's verified certificate beside it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::agents::Agents;
use crate::events::Hub;
use crate::identity::Identity as NodeIdentity;
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::networks::Registry;
use crate::store::schema::Range;
use crate::store::EtcdStore;
use crate::tls::TlsFiles;

pub mod election;
pub mod forward;
pub mod mirror;
pub mod rebalance;

/// What the replica tasks share with the gRPC services and the HTTP endpoint.
pub struct Replica {
    /// This replica's own flags.
    pub settings: Settings,
    /// The agents watching this replica.
    pub agents: Arc<Agents>,
    /// The store, with the fence the election arms.
    pub store: Arc<EtcdStore>,
    /// The table this replica serves.
    pub hub: Arc<Hub>,
    /// The writer handle, attached while this replica leads.
    pub leases: Leases,
    /// Revocations seen in etcd are put in force here.
    pub identity: Arc<NodeIdentity>,
    /// The networks served.
    pub networks: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The certificate this replica presents to the leader when it forwards a write
    /// (its serving certificate, which carries clientAuth and O=twill:controllers), and
    /// the CA that signs every replica's.
    pub peer_tls: TlsFiles,
    leader: RwLock<Option<String>>,
    /// True while this replica's writer is attached.
    leading: AtomicBool,
    /// True while the mirror's watch is open and has caught up.
    caught_up: AtomicBool,
    /// The etcd revision the mirror has applied.
    applied: tokio::sync::watch::Sender<i64>,
    /// Set by a replica that has just won the election: the mirror publishes what it
    /// holds for the rest of the last leader's batch (see `mirror`), which that leader
    /// may never write.
    elected: tokio::sync::Notify,
    peers: Mutex<HashMap<String, Channel>>,
    /// The registered replicas as last read, and when (see `is_registered`).
    registered: Mutex<(Vec<String>, Option<std::time::Instant>)>,
}

/// A replica's own flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How other replicas and agents reach this one (`--advertise-url`).
    pub advertise_url: String,
    /// The TTL asked of etcd for its lease (`--leader-ttl`).
    pub leader_ttl: Duration,
    /// How often it spreads the agents over the replicas (`--rebalance-interval`;
    /// `None`: never).
    pub rebalance_every: Option<Duration>,
}

impl Replica {
    /// The shared state; `applied` is the etcd revision the hub was loaded at.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        agents: Arc<Agents>,
        store: Arc<EtcdStore>,
        hub: Arc<Hub>,
        leases: Leases,
        identity: Arc<NodeIdentity>,
        networks: Arc<Registry>,
        metrics: Arc<Metrics>,
        peer_tls: TlsFiles,
        applied: i64,
    ) -> Arc<Self> {
        Arc::new(Replica {
            settings,
            agents,
            store,
            hub,
            leases,
            identity,
            networks,
            metrics,
            peer_tls,
            leader: RwLock::new(None),
            leading: AtomicBool::new(false),
            caught_up: AtomicBool::new(false),
            applied: tokio::sync::watch::Sender::new(applied),
            elected: tokio::sync::Notify::new(),
            peers: Mutex::new(HashMap::new()),
            registered: Mutex::default(),
        })
    }

    /// Starts the election, the leader observer and the mirror. `shutdown` turns true
    /// at SIGTERM: a leader then resigns, so another takes over at once.
    /// Returns the campaign task, which ends once a leader has resigned at shutdown.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(mirror::run(self.clone()));
        tokio::spawn(election::observe(self.clone()));
        if let Some(every) = self.settings.rebalance_every {
            tokio::spawn(rebalance::run(self.clone(), every));
        }
        tokio::spawn(election::campaign(self.clone(), shutdown))
    }

    /// The leader's advertised URL, when one is known.
    pub fn leader(&self) -> Option<String> {
        self.leader.read().clone()
    }

    fn set_leader(&self, url: Option<String>) {
        let mut leader = self.leader.write();
        if *leader != url {
            if url.is_some() {
                self.metrics.leader_changes.inc();
                // The pods live in the leader's memory: a new one has none until the
                // agents report again, those watching here included.
                self.hub.ask_pods();
            }
            tracing::info!(leader = url.as_deref().unwrap_or("none"), "leader changed");
            *leader = url;
        }
    }

    /// True while this replica leads and its writer runs.
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// True while the mirror follows etcd (the replica serves current data).
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// A channel to another replica, made once per URL, with mutual TLS.
    pub fn peer(&self, url: &str) -> Result<Channel, String> {
        if let Some(ch) = self.peers.lock().get(url) {
            return Ok(ch.clone());
        }
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.peer_tls.client_ca)?))
            .identity(Identity::from_pem(
                read(&self.peer_tls.cert)?,
                read(&self.peer_tls.key)?,
            ));
        let ch = Endpoint::from_shared(url.to_string())
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| format!("replica URL {url}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .connect_lazy();
        self.peers.lock().insert(url.to_string(), ch.clone());
        Ok(ch)
    }

    /// Forgets a replica's channel (after it failed, so the next call dials again,
    /// with the certificate files as they are now).
    pub fn forget_peer(&self, url: &str) {
        self.peers.lock().remove(url);
    }

    /// The replicas registered in etcd (their advertised URLs), sorted; kept for
    /// [`Replica::is_registered`].
    pub async fn replicas(&self) -> Result<Vec<String>, crate::store::StoreError> {
        let urls = self.read_replicas().await?;
        *self.registered.lock() = (urls.clone(), Some(std::time::Instant::now()));
        Ok(urls)
    }

    /// The replicas registered in etcd, sorted, without touching what
    /// [`Replica::is_registered`] goes by: a read from before a replica registered
    /// must not make it refuse that replica's forwarded calls for a second.
    pub async fn read_replicas(&self) -> Result<Vec<String>, crate::store::StoreError> {
        let (kvs, _) = self.store.etcd().range(Range::Replicas).await?;
        let mut urls: Vec<String> = kvs
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .collect();
        urls.sort();
        urls.dedup();
        Ok(urls)
    }

    /// Whether `url` is a registered replica's: from the list last read when it names
    /// `url` and is under 30 s old (a replica that left stops being believed soon), else
    /// read again (at most once a second, so that a stream of calls naming an unknown
    /// URL does not become a stream of etcd reads).
    pub async fn is_registered(&self, url: &str) -> bool {
        let fresh_enough = {
            let r = self.registered.lock();
            let age = r.1.map(|at| at.elapsed());
            if r.0.iter().any(|u| u == url) && age.is_some_and(|a| a < Duration::from_secs(30)) {
                return true;
            }
            age.is_some_and(|a| a < Duration::from_secs(1))
        };
        if fresh_enough {
            return false;
        }
        self.replicas()
            .await
            .is_ok_and(|urls| urls.iter().any(|u| u == url))
    }
}
