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
use twill_server::events::{Hub, HISTORY_LEN};
use twill_server::grpc::identity::IdentityApi;
use twill_server::grpc::{
    admin::AdminApi, agent::AgentApi, agent::AgentRouter, limit::NodeLimiter,
};
use twill_server::http::{self, HttpState};
use twill_server::identity::{Identity as NodeIdentity, Signer};
use twill_server::leases::{Leases, MAX_LEASE_TTL};
use twill_server::metrics::{Agents, Metrics};
use twill_server::store::{SledStore, Store};
use twill_server::tls::{ReloadingTls, TlsFiles};

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
    /// Lifetime of the node certificates the controller issues.
    #[arg(long, env = "TWILL_NODE_CERT_TTL", default_value = "168h", value_parser = twill_common::parse_nonzero_duration)]
    node_cert_ttl: Duration,
    /// How long a lease lives unless its agent renews it (e.g. 30m, 24h).
    #[arg(long, env = "TWILL_LEASE_TTL", default_value = "24h", value_parser = twill_common::parse_duration)]
    lease_ttl: Duration,
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

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
    let store = SledStore::open(&args.data_dir, HISTORY_LEN as u64)?;
    let snapshot = store.load()?;
    let layout = format!("Network={} SubnetLen={}", conf.network, conf.subnet_len);
    match &snapshot.layout {
        Some(stored) if *stored != layout && !snapshot.leases.is_empty() => bail!(
            "the store in {} holds {} lease(s) allocated with {stored}, but {} says {layout}; \
             restore the previous net-conf.json, or move the data directory aside to start a new network",
            args.data_dir.display(),
            snapshot.leases.len(),
            args.net_conf.display()
        ),
        Some(stored) if *stored == layout => {}
        _ => {
            store.set_layout(&layout)?;
            store.flush().await?;
        }
    }
    info!(
        network = %conf.network,
        subnet_len = conf.subnet_len,
        leases = snapshot.leases.len(),
        revision = snapshot.revision,
        data_dir = %args.data_dir.display(),
        "store opened"
    );

    let store: Arc<dyn Store> = Arc::new(store);
    let store_for_admin = store.clone();
    let hub = Arc::new(
        Hub::new(snapshot.leases, snapshot.history, snapshot.revision).with_epoch(snapshot.epoch),
    );
    let closing_hub = hub.clone();
    let metrics = Arc::new(Metrics::default());
    let agents = Arc::new(Agents::default());
    let identity = Arc::new(NodeIdentity::new(
        store.clone(),
        signer,
        args.node_cert_ttl,
        metrics.clone(),
    ));
    if let (Some(cert), Some(key)) = (&args.signing_cert, &args.signing_key) {
        identity.watch_signer(cert.clone(), key.clone(), args.tls_client_ca.clone());
    }
    let leases = Leases::start(
        &conf,
        store,
        hub.clone(),
        snapshot.reservations,
        args.lease_ttl,
        metrics.clone(),
    )?;

    let http_state = Arc::new(HttpState {
        ready: false.into(),
        metrics: metrics.clone(),
        leases: leases.clone(),
    });
    let http_listener = http::bind(args.metrics_addr)
        .await
        .map_err(anyhow::Error::msg)?;
    tokio::spawn(http::serve(http_listener, http_state.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    // Our own TLS acceptor (not tonic's): the serving certificate and the client CA
    // are re-read when their files change, and a client certificate is optional at the
    // handshake (a new node may only call IdentityService.Bootstrap without one).
    tls.watch();
    let incoming = tls.incoming(listener);
    let conf = Arc::new(conf);
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentRouter::new(AgentApi {
            conf: conf.clone(),
            leases: leases.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            agents: agents.clone(),
            limiter: NodeLimiter::default(),
            identity: identity.clone(),
        }))
        .add_service(IdentityServiceServer::new(IdentityApi::new(
            identity.clone(),
            metrics.clone(),
        )))
        .add_service(AdminServiceServer::new(AdminApi {
            conf,
            leases,
            hub,
            store: store_for_admin,
            metrics,
            agents,
            identity,
        }));
    info!(listen = %args.listen, metrics = %args.metrics_addr, "serving");
    http_state.ready.store(true, Ordering::Relaxed);
    server
        .serve_with_incoming_shutdown(incoming, async {
            shutdown_signal().await;
            // Watch streams never end on their own; end them so the shutdown completes.
            closing_hub.close();
        })
        .await
        .context("gRPC server")?;
    info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("interrupt received"),
    }
}
