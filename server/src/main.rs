//! twill-controller: loads net-conf.json, opens the lease store and serves the agent and
//! admin gRPC services over mutual TLS, plus health and metrics over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tonic::transport::Server;
use tracing::{info, warn};
use twill_common::networks::Network;
use twill_common::{tls::read_pem, NetConf};
use twill_proto::admin_service_server::AdminServiceServer;
use twill_proto::identity_service_server::IdentityServiceServer;
use twill_server::agents::Agents;
use twill_server::events::{Hub, HISTORY_LEN};
use twill_server::grpc::auth::{AuthLayer, Gate};
use twill_server::grpc::identity::{IdentityApi, MAX_REQUEST_BYTES as IDENTITY_MAX_REQUEST_BYTES};
use twill_server::grpc::{
    admin::AdminApi, agent::AgentApi, agent::AgentRouter, limit::NodeLimiter,
};
use twill_server::http::{self, HttpState};
use twill_server::identity::{Identity as NodeIdentity, Signer};
use twill_server::leases::{Leases, MAX_LEASE_TTL};
use twill_server::metrics::Metrics;
use twill_server::networks::Registry;
use twill_server::replica::{forward::ForwardLayer, Replica, Settings as ReplicaSettings};
use twill_server::store::etcd::{Etcd, EtcdConfig};
use twill_server::store::{EtcdStore, Layout, SledStore, Snapshot, Store};
use twill_server::tls::{ReloadingTls, TlsFiles};

/// Largest admin request: a reservation or a token's names are a few hundred bytes.
const ADMIN_MAX_REQUEST_BYTES: usize = 64 << 10;
/// The first and the longest wait between tries while etcd does not answer at start.
const ETCD_WAIT_FIRST: Duration = Duration::from_millis(500);
const ETCD_WAIT_CAP: Duration = Duration::from_secs(10);

/// The Twill controller: hands every node a pod subnet (a lease), stores leases
/// durably and streams them to every agent over gRPC with mutual TLS.
#[derive(Parser, Debug, Clone)]
#[command(name = "twill-controller", version)]
struct Args {
    /// Address for the gRPC services (agents and twillctl connect here).
    #[arg(long, env = "TWILL_LISTEN", default_value = "0.0.0.0:8474")]
    listen: SocketAddr,
    /// Directory of the lease store (created if missing).
    #[arg(long, env = "TWILL_DATA_DIR", default_value = "/var/lib/twill")]
    data_dir: PathBuf,
    /// flannel's network configuration (net-conf.json).
    #[arg(
        long,
        env = "TWILL_NET_CONF",
        default_value = "/etc/twill/net-conf.json"
    )]
    net_conf: PathBuf,
    /// More networks, one flannel net-conf.json per `<name>.json` (plus an optional
    /// "Nodes": ["exact-name", "prefix*"] saying who may join; absent: every node).
    /// `--net-conf` is the network named `default`. Read again every few seconds: a new
    /// file adds a network, a removed one stops new leases in it. A file that does not
    /// parse, overlaps another network or shares its VNI is refused and logged, and the
    /// networks in force are kept. A missing directory holds no networks.
    #[arg(
        long,
        env = "TWILL_NETWORKS_DIR",
        default_value = "/etc/twill/networks"
    )]
    networks_dir: PathBuf,
    /// Server certificate (PEM), with the DNS names / IPs agents dial.
    #[arg(long, env = "TWILL_TLS_CERT")]
    tls_cert: PathBuf,
    /// Private key of the server certificate (PEM).
    #[arg(long, env = "TWILL_TLS_KEY")]
    tls_key: PathBuf,
    /// CA certificate (PEM) that client certificates must chain to.
    #[arg(long, env = "TWILL_TLS_CLIENT_CA")]
    tls_client_ca: PathBuf,
    /// Address for HTTP /healthz, /readyz and /metrics.
    #[arg(long, env = "TWILL_METRICS_ADDR", default_value = "0.0.0.0:8475")]
    metrics_addr: SocketAddr,
    /// CA certificate (PEM) that signs node certificates for agents that bootstrap with
    /// a token: the client CA itself, or an intermediate that chains to it. Without it
    /// (and --signing-key) the controller issues no certificates.
    #[arg(long, env = "TWILL_SIGNING_CERT", requires = "signing_key")]
    signing_cert: Option<PathBuf>,
    /// Private key (PEM, PKCS#8) of --signing-cert.
    #[arg(long, env = "TWILL_SIGNING_KEY", requires = "signing_cert")]
    signing_key: Option<PathBuf>,
    /// Connections without a client certificate (nodes bootstrapping with a token) open
    /// at once, at most; more are closed right after their handshake. Each is closed
    /// after 10 s with no call under way.
    #[arg(long, env = "TWILL_MAX_ANONYMOUS_CONNECTIONS", default_value_t = twill_server::tls::MAX_ANONYMOUS)]
    max_anonymous_connections: usize,
    /// Lifetime of the node certificates the controller issues.
    #[arg(long, env = "TWILL_NODE_CERT_TTL", default_value = "168h", value_parser = twill_common::parse_nonzero_duration)]
    node_cert_ttl: Duration,
    /// How long a lease lives unless its agent renews it (e.g. 30m, 24h).
    #[arg(long, env = "TWILL_LEASE_TTL", default_value = "24h", value_parser = twill_common::parse_duration)]
    lease_ttl: Duration,
    /// Where leases live: `sled` (embedded in --data-dir, one replica) or `etcd` (under
    /// --etcd-prefix, several replicas: one elected leader writes, every replica serves
    /// agents and forwards writes to the leader).
    #[arg(long, env = "TWILL_STORE", value_enum, default_value_t = StoreKind::Sled)]
    store: StoreKind,
    /// etcd client URLs, comma-separated (https://10.0.0.1:2379,...).
    #[arg(
        long,
        env = "TWILL_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    etcd_endpoints: Vec<String>,
    /// Client certificate (PEM) presented to etcd.
    #[arg(long, env = "TWILL_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, env = "TWILL_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// CA certificate (PEM) that signs the etcd members' certificates.
    #[arg(long, env = "TWILL_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Key prefix in etcd under which every Twill record lives; ends with `/`.
    #[arg(long, env = "TWILL_ETCD_PREFIX", default_value = "/twill/")]
    etcd_prefix: String,
    /// How other replicas and agents reach this replica (https://10.0.0.11:8474): its
    /// identity among the replicas, and where they forward writes when it leads. Its
    /// host must be in the serving certificate's subjectAltNames.
    #[arg(long, env = "TWILL_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// With --store etcd: the TTL of this replica's etcd lease, whole seconds. A leader
    /// that dies or freezes is replaced about this long after (a SIGTERMed one at once:
    /// it resigns). Shorter fails over sooner; a leader whose keep-alives go unanswered
    /// this long (an overloaded machine, a slow etcd) steps down. etcd grants no less
    /// than 1.5 of its election timeouts (2s with etcd's defaults).
    #[arg(long, env = "TWILL_LEADER_TTL", default_value = "2s", value_parser = twill_common::parse_duration)]
    leader_ttl: Duration,
    /// With --store etcd: how often this replica compares the agents watching it with
    /// its share (nodes over replicas) and asks those beyond it to resume on another
    /// replica, so one that comes back or is added gets its share. `0s` turns it off.
    #[arg(long, env = "TWILL_REBALANCE_INTERVAL", default_value = "10s", value_parser = twill_common::parse_duration)]
    rebalance_interval: Duration,
    /// Copies the sled store in DIR (a stopped single controller's --data-dir) into
    /// etcd under --etcd-prefix, then exits. Refuses a prefix that already holds leases
    /// (a rerun after a complete copy of the same store changes nothing).
    #[arg(
        long,
        env = "TWILL_MIGRATE_FROM_SLED",
        value_name = "DIR",
        requires = "etcd_endpoints"
    )]
    migrate_from_sled: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    /// Embedded, in --data-dir: one replica.
    Sled,
    /// etcd, under --etcd-prefix: several replicas.
    Etcd,
}

impl Args {
    fn etcd_config(&self) -> Result<EtcdConfig> {
        let need = |v: &Option<PathBuf>, flag: &str| {
            v.clone().with_context(|| {
                format!("--store etcd needs {flag} (etcd is reached over mutual TLS)")
            })
        };
        if self.etcd_endpoints.is_empty() {
            bail!("--store etcd needs --etcd-endpoints (the etcd client URLs, comma-separated)");
        }
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            bail!(
                "--etcd-prefix {:?} must start and end with '/' (e.g. /twill/), so that no other prefix runs into it",
                self.etcd_prefix
            );
        }
        Ok(EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            cert: need(&self.etcd_cert, "--etcd-cert")?,
            key: need(&self.etcd_key, "--etcd-key")?,
            ca: need(&self.etcd_ca, "--etcd-ca")?,
            prefix: self.etcd_prefix.clone(),
        })
    }
}

/// What the controller does with its flags: serve, or copy a sled store into etcd.
enum Command {
    Serve(Box<Config>),
    Migrate { from: PathBuf, etcd: EtcdConfig },
}

/// Where leases live.
enum Mode {
    /// sled in `data_dir`: one replica.
    Single { data_dir: PathBuf },
    /// etcd: several replicas, this one reached at `advertise_url`.
    Replicated {
        etcd: EtcdConfig,
        settings: ReplicaSettings,
    },
}

/// The controller's settings, checked before anything is opened or bound: every
/// refusal names its flag.
struct Config {
    args: Args,
    conf: NetConf,
    tls: TlsFiles,
    /// `--signing-cert` and `--signing-key`, given together or not at all.
    signing: Option<(PathBuf, PathBuf)>,
    mode: Mode,
}

impl TryFrom<&Args> for Command {
    type Error = anyhow::Error;
    fn try_from(args: &Args) -> Result<Self> {
        if args.lease_ttl < Duration::from_secs(10) {
            bail!(
                "--lease-ttl {} is too short: use at least 10s",
                humantime::format_duration(args.lease_ttl)
            );
        }
        if args.lease_ttl > MAX_LEASE_TTL {
            bail!(
                "--lease-ttl {} is too long: use at most {} (flannel's is 24h)",
                humantime::format_duration(args.lease_ttl),
                humantime::format_duration(MAX_LEASE_TTL)
            );
        }
        if let Some(from) = &args.migrate_from_sled {
            return Ok(Command::Migrate {
                from: from.clone(),
                etcd: args.etcd_config()?,
            });
        }
        let mode = match args.store {
            StoreKind::Sled => Mode::Single {
                data_dir: args.data_dir.clone(),
            },
            StoreKind::Etcd => {
                let etcd = args.etcd_config()?;
                let advertise_url = args.advertise_url.clone().context(
                    "--store etcd needs --advertise-url: how the other replicas and the agents reach this one (https://<address>:8474)",
                )?;
                if !advertise_url.starts_with("https://") {
                    bail!("--advertise-url {advertise_url}: replicas are reached over mutual TLS, so it starts with https://");
                }
                let ttl = args.leader_ttl;
                if ttl.subsec_nanos() != 0 || !(1..=60).contains(&ttl.as_secs()) {
                    bail!(
                        "--leader-ttl {}: give whole seconds from 1s to 60s (etcd leases count whole seconds)",
                        humantime::format_duration(ttl)
                    );
                }
                let every = args.rebalance_interval;
                if !every.is_zero() && every < Duration::from_secs(1) {
                    bail!(
                        "--rebalance-interval {}: give at least 1s, or 0s to turn it off",
                        humantime::format_duration(every)
                    );
                }
                Mode::Replicated {
                    etcd,
                    settings: ReplicaSettings {
                        advertise_url,
                        leader_ttl: ttl,
                        rebalance_every: (!every.is_zero()).then_some(every),
                    },
                }
            }
        };
        let conf = NetConf::from_file(&args.net_conf)
            .with_context(|| format!("--net-conf {}", args.net_conf.display()))?;
        Ok(Command::Serve(Box::new(Config {
            args: args.clone(),
            conf,
            tls: TlsFiles {
                cert: args.tls_cert.clone(),
                key: args.tls_key.clone(),
                client_ca: args.tls_client_ca.clone(),
            },
            signing: args.signing_cert.clone().zip(args.signing_key.clone()),
            mode,
        })))
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    twill_common::init_logging();
    let result = match Command::try_from(&args) {
        Ok(Command::Serve(config)) => serve(*config).await,
        Ok(Command::Migrate { from, etcd }) => migrate(&from, &etcd).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("twill-controller: error: {e:#}");
        std::process::exit(1);
    }
}

/// The store a controller opened, and what it held.
struct Opened {
    store: Arc<dyn Store>,
    /// The same store when it is etcd (replicas elect a leader through it).
    etcd: Option<Arc<EtcdStore>>,
    snapshot: Snapshot,
    /// The etcd revision `snapshot` was read at (0 for sled).
    etcd_revision: i64,
    /// Where the store is, for messages.
    whence: String,
}

/// Opens the store `mode` names and reads what it holds; `None` when SIGTERM came while
/// waiting for etcd.
async fn open_store(mode: &Mode, metrics: &Arc<Metrics>) -> Result<Option<Opened>> {
    match mode {
        Mode::Single { data_dir } => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create --data-dir {}", data_dir.display()))?;
            let store = SledStore::open(data_dir, HISTORY_LEN as u64)?;
            let snapshot = store.load().await?;
            Ok(Some(Opened {
                store: Arc::new(store),
                etcd: None,
                snapshot,
                etcd_revision: 0,
                whence: format!("the store in {}", data_dir.display()),
            }))
        }
        Mode::Replicated { etcd, .. } => {
            let client = Etcd::connect(etcd, metrics.clone())?;
            let Some(store) = open_etcd(etcd, client).await? else {
                return Ok(None);
            };
            let store = Arc::new(store);
            let (snapshot, etcd_revision) = store.load_at().await?;
            Ok(Some(Opened {
                store: store.clone(),
                etcd: Some(store),
                snapshot,
                etcd_revision,
                whence: format!("etcd prefix {}", etcd.prefix),
            }))
        }
    }
}

/// Opens the etcd store, waiting as long as etcd does not answer: a controller started
/// before etcd, or beside it, becomes ready when etcd does instead of exiting. An answer
/// that refuses (a certificate etcd does not accept, a permission) ends the wait with
/// the error. `None`: SIGTERM came first.
async fn open_etcd(config: &EtcdConfig, etcd: Etcd) -> Result<Option<EtcdStore>> {
    let shutdown = twill_runtime::shutdown_signal();
    tokio::pin!(shutdown);
    let mut wait = ETCD_WAIT_FIRST;
    loop {
        match EtcdStore::open(etcd.clone(), HISTORY_LEN as u64).await {
            Ok(store) => return Ok(Some(store)),
            Err(e) if e.is_unreachable() => {
                warn!(endpoints = %config.endpoints.join(","), error = %e, retry_in = ?wait, "waiting for etcd: it does not answer yet");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut shutdown => {
                        info!("exiting before etcd answered");
                        return Ok(None);
                    }
                }
                wait = (wait * 2).min(ETCD_WAIT_CAP);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot open the etcd store at {}",
                        config.endpoints.join(",")
                    )
                })
            }
        }
    }
}

/// Records the network layout in a store that has none (or no leases), and refuses a
/// store whose leases were allocated in another.
async fn adopt_layout(config: &Config, opened: &Opened) -> Result<()> {
    let layout = Layout::from(&config.conf);
    let snapshot = &opened.snapshot;
    match &snapshot.layout {
        Some(stored) if *stored != layout && !snapshot.leases.is_empty() => bail!(
            "{} holds {} lease(s) allocated with {stored}, but {} says {layout}; \
             restore the previous net-conf.json, or move the data aside to start a new network",
            opened.whence,
            snapshot.leases.len(),
            config.args.net_conf.display()
        ),
        Some(stored) if *stored == layout => {}
        _ => {
            opened.store.set_layout(&layout).await?;
            opened.store.flush().await?;
        }
    }
    info!(
        layout = %layout,
        leases = snapshot.leases.len(),
        revision = snapshot.revision,
        store = %opened.whence,
        "store opened"
    );
    Ok(())
}

/// Opens the store, starts the lease writer (or the replica's campaign for it) and
/// serves the gRPC services and the HTTP endpoint until SIGTERM.
async fn serve(config: Config) -> Result<()> {
    let tls = ReloadingTls::load(config.tls.clone())?;
    let ca = read_pem(&config.tls.client_ca, "--tls-client-ca", "CERTIFICATE")?;
    let signer = match &config.signing {
        Some((cert, key)) => Some(
            Signer::load(cert, key, &String::from_utf8_lossy(&ca)).map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };

    let metrics = Arc::new(Metrics::default());
    let Some(opened) = open_store(&config.mode, &metrics).await? else {
        return Ok(());
    };
    adopt_layout(&config, &opened).await?;
    let Opened {
        store,
        etcd,
        snapshot,
        etcd_revision,
        ..
    } = opened;

    let store_for_admin = store.clone();
    let hub = Arc::new(
        Hub::new(snapshot.leases, snapshot.history, snapshot.revision).with_epoch(snapshot.epoch),
    );
    let closing_hub = hub.clone();
    let networks = Arc::new(Registry::load(
        Network::default_from(config.conf.clone()),
        Some(config.args.networks_dir.clone()),
        &hub,
        metrics.clone(),
    ));
    let agents = Arc::new(Agents::default());
    let identity = Arc::new(
        NodeIdentity::new(
            store.clone(),
            signer,
            config.args.node_cert_ttl,
            metrics.clone(),
        )
        .await
        .context("cannot read the revocations and issued certificates from the store")?,
    );
    if let Some((cert, key)) = &config.signing {
        identity.watch_signer(cert.clone(), key.clone(), config.tls.client_ca.clone());
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (leases, replica) = match (&config.mode, etcd) {
        (Mode::Replicated { settings, .. }, Some(etcd_store)) => {
            hub.set_reservations(snapshot.reservations, Default::default());
            let leases = Leases::standby(config.args.lease_ttl);
            let replica = Replica::new(
                settings.clone(),
                agents.clone(),
                etcd_store,
                hub.clone(),
                leases.clone(),
                identity.clone(),
                networks.clone(),
                metrics.clone(),
                config.tls.clone(),
                etcd_revision,
            );
            (leases, Some(replica))
        }
        _ => (
            Leases::start(
                &networks.current(),
                store,
                hub.clone(),
                snapshot.reservations,
                config.args.lease_ttl,
                metrics.clone(),
            )?,
            None,
        ),
    };
    let campaign = replica.as_ref().map(|r| r.spawn(shutdown_rx));
    networks.clone().spawn_watch(hub.clone(), leases.clone());

    let http_state = Arc::new(HttpState {
        ready: false.into(),
        metrics: metrics.clone(),
        leases: leases.clone(),
        replica: replica.clone(),
    });
    let http_listener = twill_runtime::bind(config.args.metrics_addr).await?;
    tokio::spawn(twill_runtime::serve(
        http_listener,
        http::routes(http_state.clone()),
    ));

    let listener = tokio::net::TcpListener::bind(config.args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", config.args.listen))?;
    // Our own TLS acceptor (not tonic's): the serving certificate and the client CA
    // are re-read when their files change, and a client certificate is optional at the
    // handshake (a new node may only call IdentityService.Bootstrap without one).
    tls.set_max_anonymous(config.args.max_anonymous_connections);
    tls.watch();
    {
        let (revocations, identity) = (identity.revocations(), identity.clone());
        tls.enforce(move |id| identity.refused(id), revocations);
    }
    let incoming = tls.incoming(listener);
    let gate = Gate {
        identity: identity.clone(),
        tls: tls.clone(),
        replica: replica.clone(),
        metrics: metrics.clone(),
    };
    let sources = twill_server::grpc::watch::Sources {
        hub: hub.clone(),
        metrics: metrics.clone(),
        agents,
        identity: identity.clone(),
        pods: Default::default(),
    };
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost first: every call is authorized before it is forwarded or served.
        .layer(AuthLayer::new(gate))
        .layer(ForwardLayer::new(replica.clone()))
        .add_service(AgentRouter::new(AgentApi {
            networks: networks.clone(),
            leases: leases.clone(),
            watch: sources.clone(),
            limiter: NodeLimiter::default(),
            // A whole report a second, bursts of five (a restart, a watch moving).
            reports: NodeLimiter::new(1.0, 5.0),
        }))
        .add_service(
            IdentityServiceServer::new(IdentityApi::new(
                identity.clone(),
                metrics.clone(),
                hub,
                leases.clone(),
            ))
            .max_decoding_message_size(IDENTITY_MAX_REQUEST_BYTES),
        )
        .add_service(
            AdminServiceServer::new(AdminApi {
                networks: networks.clone(),
                leases,
                watch: sources,
                store: store_for_admin,
                replica,
            })
            .max_decoding_message_size(ADMIN_MAX_REQUEST_BYTES),
        );
    info!(listen = %config.args.listen, metrics = %config.args.metrics_addr, "serving");
    http_state.ready.store(true, Ordering::Relaxed);
    server
        .serve_with_incoming_shutdown(incoming, async {
            twill_runtime::shutdown_signal().await;
            // A leader resigns now, so another replica leads while this one drains.
            shutdown_tx.send_replace(true);
            // Watch streams never end on their own; end them so the shutdown completes.
            closing_hub.close();
        })
        .await
        .context("gRPC server")?;
    if let Some(campaign) = campaign {
        let _ = tokio::time::timeout(Duration::from_secs(2), campaign).await;
    }
    info!("shut down");
    Ok(())
}

/// `--migrate-from-sled DIR`: copies a sled store into etcd, once.
async fn migrate(dir: &std::path::Path, config: &EtcdConfig) -> Result<()> {
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        bail!(
            "--migrate-from-sled {}: no sled store there (expected the --data-dir of a stopped single controller)",
            dir.display()
        );
    }
    let sled = SledStore::open(dir, HISTORY_LEN as u64).with_context(|| {
        format!(
            "--migrate-from-sled {}: stop the controller that uses it first",
            dir.display()
        )
    })?;
    let snap = sled.load().await?;
    let records = sled.all_records()?;
    let etcd = Etcd::connect(config, Arc::new(Metrics::default()))?;
    let target = EtcdStore::open(etcd, HISTORY_LEN as u64).await?;
    let (existing, _) = target.load_at().await?;
    let prefix = &config.prefix;
    if existing.revision > 0 || (!existing.leases.is_empty() && existing.epoch != snap.epoch) {
        if existing.epoch == snap.epoch
            && existing.revision == snap.revision
            && existing.leases.len() == snap.leases.len()
        {
            println!(
                "etcd prefix {prefix} already holds this store ({} leases at revision {}): nothing to do",
                existing.leases.len(),
                existing.revision
            );
            return Ok(());
        }
        bail!(
            "etcd prefix {prefix} already holds {} lease(s) at revision {}: refusing to overwrite them \
             (use another --etcd-prefix, or delete that prefix first if it is really unused)",
            existing.leases.len(),
            existing.revision
        );
    }
    target.import(&snap, &records).await?;
    println!(
        "copied {} leases, {} events, {} reservations and {} records (revision {}, epoch {}) from {} into etcd prefix {prefix}",
        snap.leases.len(),
        snap.history.len(),
        snap.reservations.len(),
        records.len(),
        snap.revision,
        snap.epoch,
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let base = [
            "twill-controller",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
            "--tls-client-ca",
            "ca.pem",
        ];
        Args::try_parse_from(base.iter().chain(extra)).expect("flags parse")
    }

    fn refusal(extra: &[&str]) -> String {
        match Command::try_from(&args(extra)) {
            Err(e) => format!("{e:#}"),
            Ok(_) => panic!("{extra:?} was accepted"),
        }
    }

    fn net_conf() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net-conf.json");
        std::fs::write(
            &path,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        (dir, path.display().to_string())
    }

    const ETCD: [&str; 9] = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        "https://127.0.0.1:2379",
        "--etcd-cert",
        "e.pem",
        "--etcd-key",
        "e.key",
        "--etcd-ca=e-ca.pem",
    ];

    #[test]
    fn lease_ttls_out_of_bounds_name_the_flag() {
        assert!(refusal(&["--lease-ttl", "5s"]).contains("--lease-ttl 5s is too short"));
        assert!(refusal(&["--lease-ttl", "20years"]).contains("is too long"));
    }

    #[test]
    fn an_unreadable_net_conf_names_the_flag() {
        let e = refusal(&["--net-conf", "/nonexistent/net-conf.json"]);
        assert!(
            e.starts_with("--net-conf /nonexistent/net-conf.json"),
            "{e}"
        );
    }

    #[test]
    fn etcd_needs_its_flags_and_an_https_advertise_url() {
        let e = refusal(&["--store", "etcd"]);
        assert!(e.contains("--etcd-endpoints"), "{e}");
        let e = refusal(&ETCD[..8]);
        assert!(e.contains("--etcd-ca"), "{e}");
        let e = refusal(&ETCD);
        assert!(e.contains("--advertise-url"), "{e}");
        let plain = [&ETCD[..], &["--advertise-url", "http://10.0.0.1:8474"]].concat();
        assert!(refusal(&plain).contains("starts with https://"));
        let prefix = [&ETCD[..], &["--etcd-prefix", "twill"]].concat();
        assert!(refusal(&prefix).contains("--etcd-prefix"));
        let url = ["--advertise-url", "https://10.0.0.1:8474"];
        for ttl in ["1500ms", "0s", "61s"] {
            let e = refusal(&[&ETCD[..], &url, &["--leader-ttl", ttl]].concat());
            assert!(
                e.contains("--leader-ttl") && e.contains("whole seconds"),
                "{ttl}: {e}"
            );
        }
        let e = refusal(&[&ETCD[..], &url, &["--rebalance-interval", "100ms"]].concat());
        assert!(e.contains("--rebalance-interval"), "{e}");
    }

    #[test]
    fn a_valid_configuration_serves_in_the_mode_it_names() {
        let (_dir, conf) = net_conf();
        let single = args(&["--net-conf", &conf, "--data-dir", "/srv/twill"]);
        let Ok(Command::Serve(config)) = Command::try_from(&single) else {
            panic!("refused");
        };
        assert!(config.signing.is_none());
        match config.mode {
            Mode::Single { data_dir } => assert_eq!(data_dir, PathBuf::from("/srv/twill")),
            Mode::Replicated { .. } => panic!("not a single controller"),
        }
        let url = [
            "--net-conf",
            &conf,
            "--advertise-url",
            "https://10.0.0.1:8474",
        ];
        let Ok(Command::Serve(config)) = Command::try_from(&args(&[&ETCD[..], &url].concat()))
        else {
            panic!("refused");
        };
        match config.mode {
            Mode::Replicated { etcd, settings } => {
                assert_eq!(settings.advertise_url, "https://10.0.0.1:8474");
                assert_eq!(etcd.prefix, "/twill/");
                assert_eq!(settings.leader_ttl, Duration::from_secs(2));
                assert_eq!(settings.rebalance_every, Some(Duration::from_secs(10)));
            }
            Mode::Single { .. } => panic!("not a replica"),
        }
    }

    #[test]
    fn migration_needs_etcd_and_reads_no_net_conf() {
        let without_etcd = ["twill-controller", "--migrate-from-sled", "/var/lib/twill"];
        assert!(
            Args::try_parse_from(without_etcd).is_err(),
            "clap requires --etcd-endpoints"
        );
        let m = args(&[&ETCD[..], &["--migrate-from-sled", "/var/lib/twill"]].concat());
        match Command::try_from(&m) {
            Ok(Command::Migrate { from, .. }) => assert_eq!(from, PathBuf::from("/var/lib/twill")),
            _ => panic!("not a migration"),
        }
    }
}
