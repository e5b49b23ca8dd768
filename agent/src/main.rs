//! twill-agent: the node daemon (see the library docs for what each module owns).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use twill_common::networks::NetworkName;

mod daemon;
mod http;

/// The Twill node agent: acquires this node's pod subnet from twill-controller,
/// writes flannel's subnet.env, and programs the flannel.<VNI> VXLAN device with a
/// neighbour, FDB entry and route for every other node.
#[derive(Parser, Debug)]
#[command(name = "twill-agent", version)]
pub struct Args {
    /// Controller URL, e.g. https://10.0.0.1:8474. Several, comma-separated, for
    /// replicas of one controller (leases in etcd): the agent starts on one drawn at
    /// random, so agents spread over them, and moves to the next when the one in use
    /// does not answer; its watch resumes there from its last revision.
    #[arg(long, env = "TWILL_CONTROLLER", value_delimiter = ',', required = true)]
    pub controller: Vec<String>,
    /// This node's name; must equal the CN of --tls-cert. Default: the host name.
    #[arg(long, env = "TWILL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Node client certificate (PEM, CN=<node>, O=twill:nodes). With
    /// --bootstrap-token-file it is written here when missing or unusable.
    #[arg(long, env = "TWILL_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// Key of the node certificate (PEM). With --bootstrap-token-file a new key is
    /// made here (mode 0600) when the certificate must be replaced.
    #[arg(long, env = "TWILL_TLS_KEY")]
    pub tls_key: PathBuf,
    /// CA certificate (PEM) that signed the controller's certificate.
    #[arg(long, env = "TWILL_TLS_CA")]
    pub tls_ca: PathBuf,
    /// File holding a bootstrap token (from `twillctl token create`). When given and
    /// --tls-cert/--tls-key are missing, unreadable, expired, not yet valid, not this
    /// node's or not a pair, the agent first makes a new key, has the controller sign
    /// a certificate for it (verifying the controller with --tls-ca, without a client
    /// certificate) and writes both files, retrying until the controller issues one.
    /// The agent then rotates the certificate itself (new key, IdentityService.Renew)
    /// at a random 70-90 % of its lifetime, without a restart or a watch reset.
    /// Without it the certificate files must exist, and are only re-read when they
    /// change (as --tls-ca always is).
    #[arg(long, env = "TWILL_BOOTSTRAP_TOKEN_FILE", value_name = "FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Public interface: a name or an address (IPv4 or IPv6); repeat to give fallbacks
    /// (first match wins). On a dual-stack network each family takes the first entry
    /// that has an address of that family. Default: the interface of the default route
    /// (of each family).
    #[arg(long, env = "TWILL_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Public interface: first interface whose name or address matches this regex (each
    /// family: the first match with an address of that family).
    #[arg(long, env = "TWILL_IFACE_REGEX")]
    pub iface_regex: Option<String>,
    /// Public interface: the one the kernel routes this address (IPv4 or IPv6) through
    /// (like `ip route get ADDR`); both families use that interface.
    #[arg(long, env = "TWILL_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IPv4 address advertised to peers as this node's VXLAN endpoint
    /// (default: the public interface's address).
    #[arg(long, env = "TWILL_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address advertised to peers as this node's flannel-v6.<VNI> endpoint on a
    /// dual-stack network (default: the public interface's global IPv6 address).
    #[arg(long, env = "TWILL_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where to write flannel's subnet.env.
    #[arg(
        long,
        env = "TWILL_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// The networks this node joins, comma-separated (REFERENCE 2.10): each gets its
    /// own lease, device (`flannel.<VNI>`), routes, masquerade rules and env file.
    /// `*` joins every network that admits this node (the controller's ListNetworks),
    /// following them as they come and go (checked every --reconcile-interval).
    #[arg(long, env = "TWILL_NETWORKS", value_delimiter = ',', default_value = "default", value_parser = network_choice)]
    pub networks: Vec<NetworkChoice>,
    /// Where each network's env file is written, `<name>.env` in subnet.env's format,
    /// for CNI configurations that name their network (twill-cni's "network"); the
    /// `default` network's is also written to --subnet-file.
    #[arg(
        long,
        env = "TWILL_SUBNET_DIR",
        default_value = "/run/flannel/networks"
    )]
    pub subnet_dir: PathBuf,
    /// Unix socket twill-cni reports each pod attachment on (REFERENCE 2.11), root's
    /// alone; "" for none. Reports sent while the agent is down wait in `reports/`
    /// beside it and are taken in at the next reconcile.
    #[arg(
        long,
        env = "TWILL_CNI_SOCKET",
        default_value = "/run/twill/agent.sock"
    )]
    pub cni_socket: PathBuf,
    /// Where the node's pod attachments are kept across agent restarts.
    #[arg(
        long,
        env = "TWILL_ATTACHMENTS_FILE",
        default_value = "/var/lib/twill/attachments.json"
    )]
    pub attachments_file: PathBuf,
    /// Masquerade pod traffic leaving the overlay (recorded as FLANNEL_IPMASQ in subnet.env).
    #[arg(long, env = "TWILL_IP_MASQ", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub ip_masq: bool,
    /// Address for HTTP /healthz and /metrics.
    #[arg(long, env = "TWILL_METRICS_ADDR", default_value = "0.0.0.0:8476")]
    pub metrics_addr: SocketAddr,
    /// How often the kernel state is compared with the leases and repaired
    /// (more than zero, at most 24h).
    #[arg(long, env = "TWILL_RECONCILE_INTERVAL", default_value = "10s", value_parser = interval)]
    pub reconcile_interval: Duration,
    /// How long a call to the controller may take before it is abandoned and retried
    /// (more than zero, at most 10m). The watch stream itself has no deadline.
    #[arg(long, env = "TWILL_CALL_TIMEOUT", default_value = "10s", value_parser = call_timeout)]
    pub call_timeout: Duration,
    /// Renew the lease when this much of its TTL remains (default: a third of the TTL;
    /// like flanneld's --subnet-lease-renew-margin).
    #[arg(long, env = "TWILL_RENEW_MARGIN", value_parser = twill_common::parse_duration)]
    pub renew_margin: Option<Duration>,
    /// On SIGTERM, release the lease so peers drop this node's routes at once
    /// (for decommissioning; an upgrade should keep the lease, the default).
    #[arg(long, env = "TWILL_RELEASE_ON_EXIT", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub release_on_exit: bool,
    /// On SIGTERM, remove the VXLAN device, Twill's routes and the masquerade table
    /// (default: leave the data plane forwarding, so an upgrade or restart costs nothing).
    #[arg(long, env = "TWILL_TEARDOWN_ON_EXIT", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub teardown_on_exit: bool,
}

/// One entry of `--networks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkChoice {
    /// `*`: every network that admits this node.
    Every,
    /// One network, by name.
    Named(NetworkName),
}

fn network_choice(s: &str) -> Result<NetworkChoice, String> {
    match s.trim() {
        "*" => Ok(NetworkChoice::Every),
        name => NetworkName::new(name)
            .map(NetworkChoice::Named)
            .map_err(|e| e.to_string()),
    }
}

/// A positive duration of at most `max`.
fn bounded(s: &str, max: Duration) -> Result<Duration, String> {
    let d = twill_common::parse_nonzero_duration(s)?;
    if d > max {
        return Err(format!(
            "{s:?} is too long: at most {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn interval(s: &str) -> Result<Duration, String> {
    bounded(s, Duration::from_secs(24 * 3600))
}

fn call_timeout(s: &str) -> Result<Duration, String> {
    bounded(s, Duration::from_secs(600))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    twill_common::init_logging();
    if let Err(e) = daemon::run(args).await {
        eprintln!("twill-agent: error: {e:#}");
        std::process::exit(1);
    }
}
