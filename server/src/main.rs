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
use tracing::info;
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
use twill_server::replica::{forward::ForwardLayer, PeerTls, Replica};
use twill_server::store::etcd::{Etcd, EtcdConfig};
use twill_server::store::{EtcdStore, Layout, SledStore, Snapshot, Store};
use twill_server::tls::{ReloadingTls, TlsFiles};

/// Largest admin request: a reservation or a token's names are a few hundred bytes.
const ADMIN_MAX_REQUEST_BYTES: usize = 64 << 10;

/// The Twill controller: hands every node a pod subnet (a lease), stores leases
/// durably and streams them to every agent over gRPC with mutual TLS.
#[derive(Parser, Debug)]
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    twill_common::init_logging();
    if let Err(e) = run(args).await {
        eprintln!("twill-controller: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
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
    if let Some(dir) = &args.migrate_from_sled {
        return migrate(&args, dir).await;
    }
    let conf = NetConf::from_file(&args.net_conf)
        .with_context(|| format!("--net-conf {}", args.net_conf.display()))?;
    let tls = ReloadingTls::load(TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        client_ca: args.tls_client_ca.clone(),
    })?;
    let ca = read_pem(&args.tls_client_ca, "--tls-client-ca", "CERTIFICATE")?;
    let signer = match (&args.signing_cert, &args.signing_key) {
        (Some(cert), Some(key)) => Some(
            Signer::load(cert, key, &String::from_utf8_lossy(&ca)).map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };

    let metrics = Arc::new(Metrics::default());
    let layout = Layout::from(&conf);
    let (store, etcd_store, snapshot, etcd_revision): (Arc<dyn Store>, _, Snapshot, i64) =
        match args.store {
            StoreKind::Sled => {
                std::fs::create_dir_all(&args.data_dir).with_context(|| {
                    format!("cannot create --data-dir {}", args.data_dir.display())
                })?;
                let store = SledStore::open(&args.data_dir, HISTORY_LEN as u64)?;
                let snapshot = store.load().await?;
                (Arc::new(store), None, snapshot, 0)
            }
            StoreKind::Etcd => {
                let config = args.etcd_config()?;
                let etcd = Etcd::connect(&config, metrics.clone())?;
                let store = Arc::new(
                    EtcdStore::open(etcd, HISTORY_LEN as u64)
                        .await
                        .with_context(|| {
                            format!(
                                "cannot open the etcd store at {}",
                                config.endpoints.join(",")
                            )
                        })?,
                );
                let (snapshot, at) = store.load_at().await?;
                (store.clone(), Some(store), snapshot, at)
            }
        };
    let whence = match args.store {
        StoreKind::Sled => format!("the store in {}", args.data_dir.display()),
        StoreKind::Etcd => format!("etcd prefix {}", args.etcd_prefix),
    };
    match &snapshot.layout {
        Some(stored) if *stored != layout && !snapshot.leases.is_empty() => bail!(
            "{whence} holds {} lease(s) allocated with {stored}, but {} says {layout}; \
             restore the previous net-conf.json, or move the data aside to start a new network",
            snapshot.leases.len(),
            args.net_conf.display()
        ),
        Some(stored) if *stored == layout => {}
        _ => {
            store.set_layout(&layout).await?;
            store.flush().await?;
        }
    }
    info!(
        layout = %layout,
        leases = snapshot.leases.len(),
        revision = snapshot.revision,
        store = %whence,
        "store opened"
    );

    let store_for_admin = store.clone();
    let hub = Arc::new(
        Hub::new(snapshot.leases, snapshot.history, snapshot.revision).with_epoch(snapshot.epoch),
    );
    let closing_hub = hub.clone();
    let agents = Arc::new(Agents::default());
    let identity = Arc::new(
        NodeIdentity::new(store.clone(), signer, args.node_cert_ttl, metrics.clone())
            .await
            .context("cannot read the revocations and issued certificates from the store")?,
    );
    if let (Some(cert), Some(key)) = (&args.signing_cert, &args.signing_key) {
        identity.watch_signer(cert.clone(), key.clone(), args.tls_client_ca.clone());
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (leases, replica) = match etcd_store {
        None => (
            Leases::start(
                &conf,
                store,
                hub.clone(),
                snapshot.reservations,
                args.lease_ttl,
                metrics.clone(),
            )?,
            None,
        ),
        Some(etcd_store) => {
            let url = args.advertise_url.clone().context(
                "--store etcd needs --advertise-url: how the other replicas and the agents reach this one (https://<address>:8474)",
            )?;
            if !url.starts_with("https://") {
                bail!("--advertise-url {url}: replicas are reached over mutual TLS, so it starts with https://");
            }
            hub.set_reservations(snapshot.reservations, Default::default());
            let leases = Leases::standby(args.lease_ttl);
            let replica = Replica::new(
                url,
                etcd_store,
                hub.clone(),
                leases.clone(),
                identity.clone(),
                conf.clone(),
                metrics.clone(),
                PeerTls {
                    cert: args.tls_cert.clone(),
                    key: args.tls_key.clone(),
                    ca: args.tls_client_ca.clone(),
                },
                etcd_revision,
            );
            (leases, Some(replica))
        }
    };
    let campaign = replica.as_ref().map(|r| r.spawn(shutdown_rx));

    let http_state = Arc::new(HttpState {
        ready: false.into(),
        metrics: metrics.clone(),
        leases: leases.clone(),
        replica: replica.clone(),
    });
    let http_listener = twill_runtime::bind(args.metrics_addr).await?;
    tokio::spawn(twill_runtime::serve(
        http_listener,
        http::routes(http_state.clone()),
    ));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    // Our own TLS acceptor (not tonic's): the serving certificate and the client CA
    // are re-read when their files change, and a client certificate is optional at the
    // handshake (a new node may only call IdentityService.Bootstrap without one).
    tls.set_max_anonymous(args.max_anonymous_connections);
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
    let conf = Arc::new(conf);
    let sources = twill_server::grpc::watch::Sources {
        hub: hub.clone(),
        metrics: metrics.clone(),
        agents,
        identity: identity.clone(),
    };
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost first: every call is authorized before it is forwarded or served.
        .layer(AuthLayer::new(gate))
        .layer(ForwardLayer::new(replica.clone()))
        .add_service(AgentRouter::new(AgentApi {
            conf: conf.clone(),
            leases: leases.clone(),
            watch: sources.clone(),
            limiter: NodeLimiter::default(),
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
                conf,
                leases,
                watch: sources,
                store: store_for_admin,
                replica,
            })
            .max_decoding_message_size(ADMIN_MAX_REQUEST_BYTES),
        );
    info!(listen = %args.listen, metrics = %args.metrics_addr, "serving");
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
async fn migrate(args: &Args, dir: &std::path::Path) -> Result<()> {
    let config = args.etcd_config()?;
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
    let etcd = Etcd::connect(&config, Arc::new(Metrics::default()))?;
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
