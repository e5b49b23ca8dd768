//! twillctl: the operators' command line for Twill — inspects and steers the lease table
//! over the controller's admin API (mutual TLS) and makes the certificates every
//! component needs.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use twill_common::networks::NetworkName;
use twill_ctl::certs::{self, Ca, Role, Validity};
use twill_ctl::client::{Admin, ConnectOptions, PAGE_SIZE};
use twill_ctl::config::{self, Settings};
use twill_ctl::lookup;
use twill_ctl::output::{self, Format, WatchPrinter};

const AFTER_HELP: &str = "\
Examples:
  # Make a CA and the certificates (once)
  twillctl certs init --dir /etc/twill/pki
  twillctl certs issue controller --dir /etc/twill/pki --dns twill.example.com --ip 10.0.0.1
  # (several controllers on etcd: one certificate for all replicas, with --replica)
  twillctl certs issue controller --dir /etc/twill/pki --replica --dns twill.example.com \\
      --ip 10.0.0.1 --ip 10.0.0.2 --ip 10.0.0.3
  twillctl certs issue node worker-1 --dir /etc/twill/pki
  twillctl certs issue admin alice --dir /etc/twill/pki

  # Operate the overlay
  twillctl --controller https://10.0.0.1:8474 --tls-cert admin-alice.crt \\
      --tls-key admin-alice.key --tls-ca ca.crt leases -o wide
  twillctl status
  twillctl lease revoke worker-1
  twillctl reserve worker-2 10.244.7.0/24
  twillctl watch

  # Several networks (files NAME.json in the controller's --networks-dir)
  twillctl networks
  twillctl leases --network blue
  twillctl watch --network default --network blue

  # Let new nodes fetch their own certificates with a bootstrap token
  TOKEN=$(twillctl token create --ttl 2h --description \"rack 7\")
  # ... bound to names: at most 50 certificates, for nodes named worker-*
  TOKEN=$(twillctl token create --node-prefix worker- --uses 50)
  twillctl token list
  twillctl certs issued
  twillctl token delete abc123
  twillctl certs revoke worker-7      # a node that lost its key, before it rejoins

Connection settings come from flags, else TWILL_* environment variables (e.g.
TWILL_CONTROLLER), else the config file ~/.config/twill/config.toml
($XDG_CONFIG_HOME/twill/config.toml when XDG_CONFIG_HOME is set; --config to choose
another), which holds the keys controller, tls_cert, tls_key, tls_ca and optionally
tls_server_name; relative paths in it are relative to the file:

  controller = \"https://10.0.0.1:8474\"
  tls_cert = \"admin-alice.crt\"
  tls_key = \"admin-alice.key\"
  tls_ca = \"ca.crt\"

Exit status: 0 on success, 1 when the controller or the system reports an error
(printed as one line, e.g. `error: NOT_FOUND: ...`), 2 on a usage error.";

/// Twill's admin CLI: inspect and steer the lease table of a twill-controller, and make
/// the certificates (CA, controller, nodes, admins) that Twill's mutual TLS needs.
#[derive(Parser, Debug)]
#[command(name = "twillctl", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    conn: ConnFlags,
    #[command(subcommand)]
    command: Command,
}

/// Flags for reaching the controller (every command but `certs init` and `certs issue`).
#[derive(Args, Debug)]
#[command(
    next_help_heading = "Controller connection and output (all commands but `certs init|issue`)"
)]
struct ConnFlags {
    /// URL of the controller's gRPC endpoint, e.g. https://10.0.0.1:8474 (an IP address works
    /// when the controller's certificate lists it as an IP subjectAltName).
    #[arg(long, global = true, env = "TWILL_CONTROLLER", value_name = "URL")]
    controller: Option<String>,
    /// Client certificate (PEM); the admin API needs an admin certificate (O=twill:admins).
    #[arg(long, global = true, env = "TWILL_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM).
    #[arg(long, global = true, env = "TWILL_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that the controller's certificate must chain to.
    #[arg(long, global = true, env = "TWILL_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Name to verify the controller's certificate against, when it differs from the
    /// host in --controller (e.g. dialing through a tunnel).
    #[arg(
        long,
        global = true,
        env = "TWILL_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    tls_server_name: Option<String>,
    /// Config file with defaults for the settings above (keys controller, tls_cert,
    /// tls_key, tls_ca, tls_server_name) [default: $XDG_CONFIG_HOME/twill/config.toml or
    /// ~/.config/twill/config.toml; a missing default file is fine].
    #[arg(long, global = true, env = "TWILL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Time limit for connecting and for each call (e.g. 5s, 1m); `watch` streams
    /// without a limit once started.
    #[arg(long, global = true, env = "TWILL_TIMEOUT", default_value = "10s",
          value_parser = twill_common::parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, global = true, env = "TWILL_OUTPUT", value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the controller's state: capacity, revision, store size, version, and the
    /// agents watching the lease table.
    ///
    /// Prints the subnets the network holds (total, leased, free, reserved), the lease
    /// table's revision, the size of the store on disk and the controller's version,
    /// then a table of open watch streams: NAME (from the client certificate),
    /// CONNECTED (how long ago the stream opened), LAST-SEEN (how long ago the node last
    /// called), REVISION (the last one sent to it), LAG (revisions it is behind) and
    /// CERT-EXPIRES (time left on its client certificate). With the controllers on
    /// etcd it also names the replicas and the leader, prints a table of replicas (URL,
    /// ROLE, AGENTS; ERROR when one did not answer) and adds a REPLICA column: the
    /// replica each agent watches. `-o wide` adds the timestamps; `-o json|yaml` print
    /// the same as a document.
    /// The subnet counts are of one network (`--network`, default `default`; `twillctl
    /// networks` has every network's).
    #[command(
        after_help = "Examples:\n  twillctl status\n  twillctl status -o json\n  twillctl status --network blue"
    )]
    Status {
        #[command(flatten)]
        network: NetworkFlag,
    },
    /// List the networks the controller serves: pod networks, VNI, backend, who may join,
    /// leases and free subnets.
    ///
    /// The network `default` is the controller's --net-conf; every other one is a file
    /// NAME.json in its --networks-dir (flannel's net-conf.json plus an optional
    /// "Nodes": ["exact-name", "prefix*"] saying which nodes may join). Columns: NAME,
    /// IPV4 and IPV6 (the pod networks), VNI (its devices are flannel.<VNI>; — for
    /// host-gw, which has none), BACKEND, NODES (the "Nodes" rule; * when every node may
    /// join), LEASES (nodes that joined), FREE (subnets of its first family not leased),
    /// STATUS (active, or retired: its file was removed, so it gives no new leases and
    /// the ones it holds run out). `-o wide` shows every NODES entry and adds TOTAL
    /// (subnets in all); `-o json|yaml` add the file as the controller loaded it. Every
    /// command that reads or changes leases takes --network NAME.
    #[command(
        after_help = "Examples:\n  twillctl networks\n  twillctl networks -o wide\n  \
        twillctl networks -o json | jq -r '.networks[] | select(.retired) | .name'"
    )]
    Networks,
    /// List the pods on every node, as each node's agent reports them (REFERENCE 2.11).
    ///
    /// twill-cni tells its node's agent of every pod it attaches and detaches; the agent
    /// reports its node's pods to the controller. Columns: NAMESPACE, POD (from the
    /// runtime's K8S_POD_NAMESPACE / K8S_POD_NAME), NODE, NETWORK, IP, IPV6, CONTAINER
    /// (the sandbox ID's first 12 characters), AGE (since it was attached); `-o wide`
    /// shows the whole container ID and adds IFNAME; `-o json|yaml` print the same as a
    /// document. A node's pods leave with its lease; a controller that restarted lists
    /// a node's pods again once its agent reports (at its next watch). An empty result
    /// prints nothing on stdout and says so on stderr.
    #[command(
        after_help = "Examples:\n  twillctl pods\n  twillctl pods --node worker-3 -o wide\n  \
        twillctl pods --network blue -o json | jq -r '.pods[].ips[]'"
    )]
    Pods {
        /// Only this node's pods.
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
        /// Only this network's pods (default: every network's).
        #[arg(long, value_name = "NAME")]
        network: Option<NetworkName>,
    },
    /// Show how full each node's pod subnets are, the fullest first.
    ///
    /// Per node, network and family: SUBNET, USED (addresses its IPAM holds, as its
    /// agent last reported: host-local's files, pods no report named included; 0 until
    /// it reported), TOTAL (addresses the subnet can give pods: all but the network
    /// address, the gateway and the IPv4 broadcast address) and USE%. A node at 90 %
    /// also says so in its agent's log. `-o json|yaml` print the same as a document.
    #[command(
        after_help = "Examples:\n  twillctl ipam\n  twillctl ipam --network blue\n  twillctl ipam --node worker-3 -o json\n  twillctl ipam check"
    )]
    Ipam {
        #[command(subcommand)]
        check: Option<IpamCommand>,
        /// Only this node's subnets.
        #[arg(long, global = true, value_name = "NODE")]
        node: Option<String>,
        /// Only this network's (default: every network's).
        #[arg(long, global = true, value_name = "NAME")]
        network: Option<NetworkName>,
    },
    /// Say who holds a pod address: the pod (namespace, name, node, container), or the
    /// node whose subnet it is in when no reported pod holds it.
    ///
    /// Answers from the pods the agents reported (`twillctl pods`) and the leases of
    /// every network: "held by pod NS/NAME on NODE", "free, NODE's subnet ...", "in
    /// network N but in no node's subnet", or "in no network Twill serves". `-o
    /// json|yaml` print the answer as a document (status held, free, unassigned or
    /// outside).
    #[command(
        after_help = "Examples:\n  twillctl ip 10.244.3.17\n  twillctl ip fd00:10:244:3::5 -o json"
    )]
    Ip {
        /// The address (IPv4 or IPv6).
        address: std::net::IpAddr,
    },
    /// List leases (node, subnet, public IP, VTEP MAC, time left, reserved) of one
    /// network, ordered by node name.
    ///
    /// Fetches the whole table a page at a time. Columns: NODE, SUBNET, PUBLIC-IP,
    /// VTEP-MAC, EXPIRES-IN (until the lease runs out unless renewed), RESERVED (yes when
    /// the subnet is reserved for that node); `-o wide` adds VNI, REVISION and NETWORK.
    /// An empty result prints nothing on stdout and says so on stderr.
    #[command(
        after_help = "Examples:\n  twillctl leases\n  twillctl leases -o wide\n  \
        twillctl leases --prefix worker- --subnet 10.244.0.0/20\n  twillctl leases -o json\n  \
        twillctl leases --network blue"
    )]
    Leases {
        #[command(flatten)]
        network: NetworkFlag,
        /// Only leases whose node name starts with this prefix.
        #[arg(long, env = "TWILL_PREFIX", default_value = "")]
        prefix: String,
        /// Only leases whose subnet lies inside this CIDR, e.g. 10.244.0.0/20 (or, for
        /// the IPv6 subnets, fd00:10:244::/60).
        #[arg(long, env = "TWILL_SUBNET", value_name = "CIDR", value_parser = cidr_text)]
        subnet: Option<String>,
        /// Leases asked for per call.
        #[arg(long, env = "TWILL_PAGE_SIZE", default_value_t = PAGE_SIZE, hide = true,
              value_parser = clap::value_parser!(u32).range(1..))]
        page_size: u32,
    },
    /// Show or revoke one node's lease.
    #[command(
        subcommand,
        after_help = "Examples:\n  twillctl lease get worker-1 -o yaml\n  twillctl lease revoke worker-1\n  \
        twillctl lease revoke worker-1 --network blue"
    )]
    Lease(LeaseCommand),
    /// Reserve a subnet for a node: no other node is ever given it, and the node gets it
    /// when it next acquires.
    ///
    /// Give one subnet per family: an IPv4 one, an IPv6 one (dual-stack or IPv6-only
    /// networks), or one of each; the reservation replaces the node's previous one. Each
    /// must be an allocatable subnet of the network (between SubnetMin and SubnetMax, of
    /// SubnetLen, or the IPv6 equivalents), else INVALID_ARGUMENT. The controller refuses it
    /// (FAILED_PRECONDITION) when another node holds or has reserved it, and when the
    /// node itself holds a lease on a different subnet: revoke that lease first, or
    /// reserve the subnet it holds. A node holds one reservation per network: give
    /// --network for a subnet of another network than `default`.
    #[command(
        after_help = "Examples:\n  twillctl reserve worker-4 10.244.7.0/24\n  \
        twillctl reserve worker-4 10.244.7.0/24 fd00:10:244:7::/64\n  \
        twillctl reserve worker-1 \"$(twillctl lease get worker-1 -o json | jq -r .subnet)\"\n  \
        twillctl reserve worker-4 10.10.7.0/24 --network blue"
    )]
    Reserve {
        #[command(flatten)]
        network: NetworkFlag,
        /// Node name the subnet is kept for.
        node: String,
        /// The subnets, CIDR, at most one per family: e.g. 10.244.7.0/24, or
        /// 10.244.7.0/24 fd00:10:244:7::/64.
        #[arg(value_parser = cidr, num_args = 1..=2, required = true)]
        subnets: Vec<Cidr>,
    },
    /// Drop a node's reservation; its lease, if any, is left alone.
    #[command(
        after_help = "Examples:\n  twillctl unreserve worker-2\n  twillctl unreserve worker-2 --network blue"
    )]
    Unreserve {
        #[command(flatten)]
        network: NetworkFlag,
        /// Node name whose reservation to drop.
        node: String,
    },
    /// List reservations (node, subnet) of one network, ordered by node name.
    ///
    /// `-o wide` adds IN-USE (whether the node holds a lease on its reserved subnet now)
    /// and NETWORK.
    #[command(
        after_help = "Examples:\n  twillctl reservations\n  twillctl reservations -o wide\n  \
        twillctl reservations --network blue"
    )]
    Reservations {
        #[command(flatten)]
        network: NetworkFlag,
    },
    /// Show a network's effective configuration (net-conf.json with defaults filled in)
    /// and the lease TTL.
    ///
    /// The table names the fields as net-conf.json does; `-o wide` adds the document as
    /// the controller loaded it (for a network of --networks-dir, with its "Nodes");
    /// `-o json|yaml` print snake_case keys.
    #[command(
        after_help = "Examples:\n  twillctl config\n  twillctl config -o yaml\n  twillctl config --network blue -o wide"
    )]
    Config {
        #[command(flatten)]
        network: NetworkFlag,
    },
    /// Print lease events as they happen, until interrupted.
    ///
    /// Streams the lease table the way agents see it: first the complete table (a RESET
    /// line, then one PUT per lease) or, with --from-revision, the events missed since
    /// that revision; then every change. One line per event: REVISION, TYPE (PUT, DELETE,
    /// RESET), NODE, SUBNET, PUBLIC-IP, VTEP-MAC; `-o json` prints one JSON object per
    /// line (NDJSON), `-o yaml` one document per event. A RESET means the events that
    /// follow are the complete table: forget every lease not listed. Exits 0 on Ctrl-C,
    /// SIGTERM or when the controller ends the stream.
    ///
    /// One stream carries every network asked for with --network (repeatable), in one
    /// revision sequence, as an agent's does; the table adds NETWORK with `-o wide` or
    /// when more than one network is watched.
    #[command(
        after_help = "Examples:\n  twillctl watch\n  twillctl watch --from-revision 42\n  \
        twillctl watch -o json | jq -c 'select(.type == \"DELETE\")'\n  \
        twillctl watch --network default --network blue"
    )]
    Watch {
        /// The networks whose leases to stream (repeatable; comma-separated in the env):
        /// `default` is the controller's --net-conf, every other one a file NAME.json in
        /// its --networks-dir; see `twillctl networks`.
        #[arg(
            long = "network",
            env = "TWILL_NETWORK",
            value_delimiter = ',',
            default_value = "default",
            value_name = "NAME"
        )]
        networks: Vec<NetworkName>,
        /// Resume after this revision: only later events are sent (0: the full table first).
        /// When those events are no longer kept, the controller sends a reset.
        #[arg(
            long,
            env = "TWILL_FROM_REVISION",
            default_value_t = 0,
            value_name = "N"
        )]
        from_revision: u64,
    },
    /// Bootstrap tokens: create, list and delete the tokens with which new nodes get
    /// their node certificates from the controller.
    #[command(
        subcommand,
        after_help = "Examples:\n  TOKEN=$(twillctl token create --ttl 2h --description \"rack 7\")\n  \
        TOKEN=$(twillctl token create --node-prefix worker- --uses 50)\n  \
        twillctl token list\n  twillctl token delete abc123"
    )]
    Token(TokenCommand),
    /// Make certificates locally: a CA, the controller's server certificate, node and
    /// admin client certificates (the layout in docs/compatibility.md, Certificates and
    /// roles); list the node certificates the controller has issued (`certs issued`);
    /// revoke a node's or an admin's certificates (`certs revoke`).
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a bootstrap token and print it: only the token and a newline on stdout.
    ///
    /// The token (`<id>.<secret>`, kubelet's format [a-z0-9]{6}.[a-z0-9]{16}) lets an
    /// agent without a certificate exchange a CSR for a node certificate (the agent's
    /// --bootstrap-token-file). The controller keeps only a hash of the secret: this is
    /// the one time it is shown, and `token list` shows the id alone. The output is the
    /// bare token whatever -o says, so that `TOKEN=$(twillctl token create)` works; use
    /// `twillctl token list -o json` for its record.
    ///
    /// Without --node or --node-prefix, anyone holding the token can get a node
    /// certificate for any node name that is not alive (no live lease, no valid
    /// certificate) until the token expires or is deleted; bind it to the names it is
    /// for and to a number of uses, keep the TTL short and the token secret.
    #[command(after_help = "Examples:\n  twillctl token create\n  \
        TOKEN=$(twillctl token create --ttl 2h --description \"rack 7 install\")\n  \
        twillctl token create --node-prefix worker- --uses 50\n  \
        twillctl token create --node db-1 --node db-2 --uses 2 --ttl 1h\n  \
        twillctl token create --ttl 7d > /run/secrets/twill-bootstrap-token")]
    Create {
        /// How long the token is accepted (humantime: 30m, 2h, 7d; at least 1s, at most 1y).
        #[arg(long, env = "TWILL_TOKEN_TTL", default_value = "24h",
              value_parser = twill_ctl::client::parse_token_ttl, value_name = "DURATION")]
        ttl: Duration,
        /// What the token is for, shown by `token list`.
        #[arg(long, env = "TWILL_TOKEN_DESCRIPTION", value_name = "TEXT")]
        description: Option<String>,
        /// A node name the token may bootstrap, exactly (repeatable; comma-separated in
        /// the env). With --node-prefix too, a name may match either. Neither: any name.
        #[arg(long = "node", env = "TWILL_TOKEN_NODE", value_delimiter = ',',
              value_name = "NAME", value_parser = twill_ctl::client::parse_token_node)]
        nodes: Vec<String>,
        /// The token may bootstrap the node names that start with PREFIX (e.g. worker-).
        #[arg(long, env = "TWILL_TOKEN_NODE_PREFIX", value_name = "PREFIX",
              value_parser = twill_ctl::client::parse_token_node_prefix)]
        node_prefix: Option<String>,
        /// How many node certificates the token may be exchanged for (1 or more); once
        /// used up it is refused [default: no limit].
        #[arg(long, env = "TWILL_TOKEN_USES", value_name = "N",
              value_parser = twill_ctl::client::parse_token_uses)]
        uses: Option<u32>,
    },
    /// List the bootstrap tokens that have not expired, ordered by id (never their
    /// secrets).
    ///
    /// Columns: ID (the part of the token before the dot), DESCRIPTION, NODES (the names
    /// it may bootstrap: exact names and `prefix*`, comma-separated, or `*` for any
    /// name), EXPIRES-IN, USES (node certificates issued with it, out of the most it was
    /// made for: `3/50`; just `3` without a limit), LAST-USED (how long ago, or never);
    /// `-o wide` lists every name (the table shortens long lists) and adds USES-LEFT,
    /// CREATED and EXPIRES-AT; `-o json|yaml` print the same as a document (`nodes`,
    /// `node_prefix`, `max_uses` (0: no limit), `uses_left` (null: no limit)). An
    /// empty result prints nothing on stdout and says so on stderr.
    #[command(
        after_help = "Examples:\n  twillctl token list\n  twillctl token list -o wide\n  \
        twillctl token list -o json | jq -r '.tokens[] | select(.uses == 0) | .id'"
    )]
    List,
    /// Delete a bootstrap token: the controller refuses it from then on (NOT_FOUND when
    /// it knows no such token). Certificates already issued with it stay valid.
    #[command(
        after_help = "Examples:\n  twillctl token delete abc123\n  twillctl token delete \"$TOKEN\""
    )]
    Delete {
        /// The token's id (the part before the dot); a whole `<id>.<secret>` token is
        /// accepted too, and its secret is not printed.
        id: String,
    },
}

/// `twillctl ipam` subcommands.
#[derive(Subcommand, Debug)]
enum IpamCommand {
    /// List what is wrong with pod addresses: LEAKED (the node's IPAM holds it for a
    /// pod whose network namespace is gone: a runtime that crashed before DEL; CNI GC
    /// releases it), CONFLICT (a pod reports it and its node's IPAM does not hold it)
    /// and DUPLICATE (two pods report it).
    ///
    /// From what the agents last reported. Columns: NODE, NETWORK, IP, KIND, CONTAINER.
    /// Nothing found prints nothing on stdout and says so on stderr.
    #[command(
        after_help = "Examples:\n  twillctl ipam check\n  twillctl ipam check --node worker-3 -o json"
    )]
    Check,
    /// Have the agents release the addresses they reported leaked.
    ///
    /// Each agent (of --node, or every node) releases (in --network, or every network), within a reconcile interval or
    /// two, every address it still finds leaked: held by host-local for a pod whose
    /// network namespace is gone. It removes host-local's entry under host-local's
    /// lock, as its DEL does. An address a live pod holds is never touched. Prints what
    /// was asked, as `ipam check` does; `twillctl ipam check` shows when it is done.
    #[command(
        after_help = "Examples:\n  twillctl ipam release --leaked\n  twillctl ipam release --leaked --node worker-3\n  twillctl ipam release --leaked --network blue"
    )]
    Release {
        /// Release leaked addresses (the only kind there is to release).
        #[arg(long, required = true)]
        leaked: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Show one node's lease (NOT_FOUND when it holds none).
    #[command(
        after_help = "Examples:\n  twillctl lease get worker-1\n  twillctl lease get worker-1 -o yaml"
    )]
    Get {
        #[command(flatten)]
        network: NetworkFlag,
        /// Node name.
        node: String,
    },
    /// Remove a node's lease now: every agent drops its routes, and the node acquires a
    /// lease again on its next contact (NOT_FOUND when it holds none).
    #[command(
        after_help = "Examples:\n  twillctl lease revoke worker-1\n  twillctl lease revoke worker-1 --network blue"
    )]
    Revoke {
        #[command(flatten)]
        network: NetworkFlag,
        /// Node name.
        node: String,
    },
}

/// `--network` of the commands that read or change one network's leases.
#[derive(Args, Debug)]
struct NetworkFlag {
    /// The network: `default` is the controller's --net-conf, every other one a file
    /// NAME.json in its --networks-dir; see `twillctl networks`. A node holds one lease
    /// (and one reservation) per network it joined.
    #[arg(
        long,
        env = "TWILL_NETWORK",
        default_value = "default",
        value_name = "NAME"
    )]
    network: NetworkName,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a new CA: DIR/ca.crt and DIR/ca.key (CN=twill-ca, 10 years by default).
    Init {
        #[command(flatten)]
        out: OutFlags,
        /// Validity in days.
        #[arg(long, env = "TWILL_DAYS", default_value_t = certs::DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate signed by the CA in DIR (or --ca-cert/--ca-key).
    #[command(subcommand)]
    Issue(IssueCommand),
    /// List the node certificates the controller has issued (to bootstrapping agents and
    /// renewals), oldest first (asks the controller: needs the connection flags).
    ///
    /// The controller keeps a record until a while after the certificate expires; the
    /// list is fetched a page at a time. Columns: NODE (the certificate's CN), SERIAL
    /// (hex), ISSUED (how long ago), EXPIRES-IN, TOKEN (id of the bootstrap token it
    /// was issued with; <none> for a renewal), KEY-SHA256 (SHA-256 of its public key,
    /// the first 16 hex digits; the key a node's lease belongs to); `-o wide` shows the
    /// whole KEY-SHA256 and adds ISSUED-AT and NOT-AFTER; `-o json|yaml` print the same
    /// as a document. An empty result prints nothing on stdout and says so on stderr.
    #[command(
        after_help = "Examples:\n  twillctl certs issued\n  twillctl certs issued -o wide\n  \
        twillctl certs issued -o json | jq -r '.certificates[] | select(.token_id == \"abc123\") | .node_name'"
    )]
    Issued {
        /// Certificates asked for per call.
        #[arg(long, env = "TWILL_PAGE_SIZE", default_value_t = 1000, hide = true,
              value_parser = clap::value_parser!(u32).range(1..=10_000))]
        page_size: u32,
    },
    /// Revoke every certificate of NAME valid from before now, whoever issued it: a
    /// node's (the default) or, with --role admin, an admin's (asks the controller:
    /// needs the connection flags).
    ///
    /// Its calls are refused with PERMISSION_DENIED from then on and its open
    /// connections are closed. A node can come back only by bootstrapping with a token
    /// (the way back for a node that lost its key: a new key cannot take over the name
    /// of a node whose certificate is still valid), and its lease no longer belongs to
    /// the revoked key; the lease itself stays until it expires or `twillctl lease
    /// revoke`. An admin needs a new certificate (`twillctl certs issue admin`).
    #[command(after_help = "Examples:\n  twillctl certs revoke worker-7\n  \
        twillctl certs revoke alice --role admin")]
    Revoke {
        /// The node name, or with --role admin the admin's name (the certificates' CN).
        name: String,
        /// Whose certificates: a node's (O=twill:nodes) or an admin's (O=twill:admins).
        #[arg(long, env = "TWILL_REVOKE_ROLE", value_enum, default_value_t = RevokeRole::Node)]
        role: RevokeRole,
    },
}

/// Whose certificates `certs revoke` revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RevokeRole {
    /// A node's: `CN=NAME, O=twill:nodes`.
    Node,
    /// An admin's: `CN=NAME, O=twill:admins`.
    Admin,
}

impl RevokeRole {
    /// The role as RevokeNodeCertificatesRequest.role says it.
    fn wire(self) -> &'static str {
        match self {
            RevokeRole::Node => "node",
            RevokeRole::Admin => "admin",
        }
    }
}

#[derive(Subcommand, Debug)]
enum IssueCommand {
    /// The controller's certificate: DIR/controller.crt and DIR/controller.key
    /// (CN=twill-controller, O=twill:controllers, serverAuth; with --replica also
    /// clientAuth; subjectAltNames from --dns and --ip, localhost and 127.0.0.1 when
    /// neither is given).
    #[command(after_help = "Examples:\n  \
        twillctl certs issue controller --dir pki --dns twill.example.com --ip 10.0.0.1\n  \
        twillctl certs issue controller --dir pki --replica --dns twill.example.com \\\n      \
        --ip 10.0.0.1 --ip 10.0.0.2 --ip 10.0.0.3")]
    Controller {
        /// DNS name agents, twillctl and the other replicas dial (repeatable;
        /// comma-separated in the env).
        #[arg(long, env = "TWILL_DNS", value_delimiter = ',', value_name = "NAME")]
        dns: Vec<String>,
        /// IP address agents, twillctl and the other replicas dial (repeatable;
        /// comma-separated in the env).
        #[arg(long, env = "TWILL_IP", value_delimiter = ',', value_name = "IP")]
        ip: Vec<IpAddr>,
        /// For several controllers on etcd (`--store etcd`): add extended key usage
        /// clientAuth, so that a replica can present this certificate when it forwards a
        /// write to the leader (which accepts forwarded calls only from such a
        /// certificate). Give every replica's address with --dns/--ip. Without
        /// --replica the certificate is serverAuth only: it serves, and is refused as a
        /// client.
        #[arg(long, env = "TWILL_REPLICA")]
        replica: bool,
        #[command(flatten)]
        issue: IssueFlags,
    },
    /// An agent's client certificate: DIR/node-NAME.crt and DIR/node-NAME.key
    /// (CN=NAME, O=twill:nodes, clientAuth). NAME is the node name the agent acts for.
    Node {
        /// Node name (letters, digits, '-', '.', '_').
        name: String,
        #[command(flatten)]
        issue: IssueFlags,
    },
    /// An operator's client certificate: DIR/admin-NAME.crt and DIR/admin-NAME.key
    /// (CN=NAME, O=twill:admins, clientAuth).
    Admin {
        /// User name (letters, digits, '-', '.', '_').
        name: String,
        #[command(flatten)]
        issue: IssueFlags,
    },
}

#[derive(Args, Debug)]
struct OutFlags {
    /// Directory to write to (created if missing).
    #[arg(long, env = "TWILL_CERT_DIR", default_value = ".", value_name = "DIR")]
    dir: PathBuf,
    /// Overwrite existing files.
    #[arg(long, env = "TWILL_FORCE")]
    force: bool,
}

#[derive(Args, Debug)]
struct IssueFlags {
    #[command(flatten)]
    out: OutFlags,
    /// CA certificate to sign with [default: DIR/ca.crt].
    #[arg(long, env = "TWILL_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// CA private key to sign with (PKCS#8 PEM) [default: DIR/ca.key].
    #[arg(long, env = "TWILL_CA_KEY", value_name = "FILE")]
    ca_key: Option<PathBuf>,
    /// Validity in days.
    #[arg(long, env = "TWILL_DAYS", default_value_t = certs::DEFAULT_LEAF_DAYS)]
    days: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let conn = &cli.conn;
    match cli.command {
        Command::Certs(cmd) => certs(conn, cmd),
        Command::Token(cmd) => token(conn, cmd),
        Command::Status {
            network: NetworkFlag { network },
        } => {
            let (s, usage) = call_in(conn, "status", network, |mut a, net| async move {
                let s = a.status(&net).await?;
                // A controller from before the pod view has no usage to give.
                let usage = a
                    .list_address_usage("", net.wire())
                    .await
                    .unwrap_or_default();
                Ok((s, usage))
            })?;
            let mut out = output::render_status(&s, conn.output, SystemTime::now());
            out.push_str(&output::render_nearly_full(&usage, conn.output));
            emit(&out)
        }
        Command::Networks => {
            let ns = call(
                conn,
                "networks",
                |mut a| async move { a.list_networks().await },
            )?;
            emit_list(
                &output::render_networks(&ns, conn.output),
                "No networks found.",
            )
        }
        Command::Pods { node, network } => {
            let (node, network) = pod_filters(node, network);
            let pods = call(conn, "pods", |mut a| async move {
                a.list_pods(&node, &network).await
            })?;
            emit_list(
                &output::render_pods(&pods, conn.output, SystemTime::now()),
                "No pods found.",
            )
        }
        Command::Ipam {
            check,
            node,
            network,
        } => {
            let (node, network) = pod_filters(node, network);
            match check {
                Some(IpamCommand::Check) => {
                    let findings = call(conn, "ipam check", |mut a| async move {
                        a.check_addresses(&node, &network).await
                    })?;
                    emit_list(
                        &output::render_findings(&findings, conn.output),
                        "No leaked, conflicting or duplicate pod addresses found.",
                    )
                }
                Some(IpamCommand::Release { .. }) => {
                    let asked = call(conn, "ipam release", |mut a| async move {
                        a.release_leaked(&node, &network).await
                    })?;
                    emit_list(
                        &output::render_findings(&asked, conn.output),
                        "No leaked addresses to release.",
                    )
                }
                None => {
                    let usage = call(conn, "ipam", |mut a| async move {
                        a.list_address_usage(&node, &network).await
                    })?;
                    emit_list(
                        &output::render_ipam(&usage, conn.output),
                        "No subnets found.",
                    )
                }
            }
        }
        Command::Ip { address } => {
            let answer = call(conn, "ip", |mut a| async move {
                let networks = a.list_networks().await?;
                let mut leases = Vec::new();
                for n in &networks {
                    let name = NetworkName::new(&n.name).map_err(|e| {
                        twill_ctl::client::ClientError::Config(format!("network {:?}: {e}", n.name))
                    })?;
                    leases.push(a.list_all_leases(&name, "", "", 500).await?.leases);
                }
                let owner = lookup::locate(address, &networks, &leases, &[]);
                if owner.status != lookup::Status::Free {
                    return Ok(owner);
                }
                // Only the node whose subnet it is can hold it (a report of an address
                // outside the node's subnets is refused): its pods, not every node's.
                let pods = a.list_pods(&owner.node, &owner.network).await?;
                Ok(lookup::locate(address, &networks, &leases, &pods))
            })?;
            emit(&output::render_ip(&answer, conn.output))
        }
        Command::Leases {
            network: NetworkFlag { network },
            prefix,
            subnet,
            page_size,
        } => leases(conn, network, prefix, subnet.unwrap_or_default(), page_size),
        Command::Lease(cmd) => lease(conn, cmd),
        Command::Reserve {
            network: NetworkFlag { network },
            node,
            subnets,
        } => {
            let (v4, v6) = per_family(&subnets)?;
            let r = call_in(conn, "reserve", network, |mut a, net| async move {
                a.reserve(&net, &node, &v4, &v6).await
            })?;
            emit(&output::render_reservation_change(
                &r,
                "created",
                conn.output,
            ))
        }
        Command::Unreserve {
            network: NetworkFlag { network },
            node,
        } => {
            let r = call_in(conn, "unreserve", network, |mut a, net| async move {
                a.unreserve(&net, &node).await
            })?;
            emit(&output::render_reservation_change(
                &r,
                "deleted",
                conn.output,
            ))
        }
        Command::Reservations {
            network: NetworkFlag { network },
        } => reservations(conn, network),
        Command::Config {
            network: NetworkFlag { network },
        } => {
            let c = call_in(conn, "config", network, |mut a, net| async move {
                a.get_config(&net).await
            })?;
            emit(&output::render_config(&c, conn.output))
        }
        Command::Watch {
            networks,
            from_revision,
        } => watch(conn, &networks, from_revision),
    }
}

/// `twillctl certs ...`: local certificate work, or the controller's issued and
/// revoked certificates.
fn certs(conn: &ConnFlags, cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init { out, days } => certs_init(&out, days),
        CertsCommand::Issue(cmd) => certs_issue(cmd),
        CertsCommand::Issued { page_size } => {
            let cs = call(conn, "certs issued", |mut a| async move {
                a.list_issued_certificates(page_size).await
            })?;
            emit_list(
                &output::render_issued(&cs, conn.output, SystemTime::now()),
                "No issued certificates found.",
            )
        }
        CertsCommand::Revoke { name, role } => {
            let n = name.clone();
            call(conn, "certs revoke", |mut a| async move {
                a.revoke_node_certificates(&n, role.wire()).await
            })?;
            emit(&match role {
                RevokeRole::Node => format!("certificates/{name} revoked\n"),
                RevokeRole::Admin => format!("certificates/{name} (admin) revoked\n"),
            })
        }
    }
}

/// `twillctl token ...`: bootstrap tokens.
fn token(conn: &ConnFlags, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            ttl,
            description,
            nodes,
            node_prefix,
            uses,
        } => {
            let req = twill_proto::CreateTokenRequest {
                ttl_seconds: ttl.as_secs(),
                description: description.unwrap_or_default(),
                nodes,
                node_prefix: node_prefix.unwrap_or_default(),
                max_uses: uses.unwrap_or(0),
            };
            let resp = call(conn, "token create", |mut a| async move {
                a.create_token(req).await
            })?;
            let token = resp.token.trim();
            if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                anyhow::bail!(
                    "the controller returned no usable token (empty or not one word); \
                     see `twillctl token list`"
                );
            }
            emit(&format!("{token}\n"))
        }
        TokenCommand::List => {
            let ts = call(
                conn,
                "token list",
                |mut a| async move { a.list_tokens().await },
            )?;
            emit_list(
                &output::render_tokens(&ts, conn.output, SystemTime::now()),
                "No bootstrap tokens found.",
            )
        }
        TokenCommand::Delete { id } => {
            let arg = id.clone();
            call(conn, "token delete", |mut a| async move {
                a.delete_token(&arg).await
            })?;
            emit(&output::render_token_deleted(&id, conn.output))
        }
    }
}

/// `twillctl leases`: every lease of `network` whose node name starts with `prefix`
/// and whose subnet lies in `subnet` (empty: any), fetched `page_size` at a time.
fn leases(
    conn: &ConnFlags,
    network: NetworkName,
    prefix: String,
    subnet: String,
    page_size: u32,
) -> Result<()> {
    let (p, sn) = (prefix.clone(), subnet.clone());
    let resp = call_in(conn, "leases", network.clone(), |mut a, net| async move {
        a.list_all_leases(&net, &p, &sn, page_size).await
    })?;
    let filters: String = [
        (!network.is_default()).then(|| format!(" in network {network}")),
        (!prefix.is_empty()).then(|| format!(" with prefix {prefix:?}")),
        (!subnet.is_empty()).then(|| format!(" in {subnet}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    emit_list(
        &output::render_leases(&resp, conn.output, SystemTime::now()),
        &format!("No leases found{filters}."),
    )
}

/// `--node` and `--network` of the pod commands as the admin API takes them (empty:
/// every node, every network).
fn pod_filters(node: Option<String>, network: Option<NetworkName>) -> (String, String) {
    (
        node.unwrap_or_default(),
        network.map(|n| n.wire().to_string()).unwrap_or_default(),
    )
}

/// `twillctl lease get|revoke`: one node's lease.
fn lease(conn: &ConnFlags, cmd: LeaseCommand) -> Result<()> {
    match cmd {
        LeaseCommand::Get {
            network: NetworkFlag { network },
            node,
        } => {
            let l = call_in(conn, "lease get", network, |mut a, net| async move {
                a.get_lease(&net, &node).await
            })?;
            emit(&output::render_lease(&l, conn.output, SystemTime::now()))
        }
        LeaseCommand::Revoke {
            network: NetworkFlag { network },
            node,
        } => {
            let l = call_in(conn, "lease revoke", network, |mut a, net| async move {
                a.revoke_lease(&net, &node).await
            })?;
            emit(&output::render_revoked(&l, conn.output))
        }
    }
}

/// `twillctl reservations`: the reservations of `network`; the wide formats show the
/// lease each one's node holds beside it.
fn reservations(conn: &ConnFlags, network: NetworkName) -> Result<()> {
    let format = conn.output;
    let wide = format != Format::Table;
    let (rs, leases) = call_in(conn, "reservations", network, |mut a, net| async move {
        let rs = a.list_reservations(&net).await?;
        let leases = if wide && !rs.is_empty() {
            Some(a.list_all_leases(&net, "", "", PAGE_SIZE).await?.leases)
        } else {
            wide.then(Vec::new)
        };
        Ok((rs, leases))
    })?;
    emit_list(
        &output::render_reservations(&rs, leases.as_deref(), format),
        "No reservations found.",
    )
}

/// A subnet argument, as typed, with its family.
#[derive(Debug, Clone)]
struct Cidr {
    text: String,
    v6: bool,
}

fn cidr(s: &str) -> Result<Cidr, String> {
    let bad = || format!("{s:?} is not a CIDR such as 10.244.7.0/24 or fd00:10:244:7::/64");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let (v6, max) = match addr.parse::<std::net::IpAddr>().map_err(|_| bad())? {
        std::net::IpAddr::V4(_) => (false, 32),
        std::net::IpAddr::V6(_) => (true, 128),
    };
    match len.parse::<u8>() {
        Ok(n) if n <= max && !len.starts_with('+') => Ok(Cidr {
            text: s.to_string(),
            v6,
        }),
        _ => Err(bad()),
    }
}

fn cidr_text(s: &str) -> Result<String, String> {
    cidr(s).map(|c| c.text)
}

/// The IPv4 and the IPv6 subnet of a `reserve` (empty when not given).
fn per_family(subnets: &[Cidr]) -> Result<(String, String)> {
    let (mut v4, mut v6) = (String::new(), String::new());
    for c in subnets {
        let slot = if c.v6 { &mut v6 } else { &mut v4 };
        if !slot.is_empty() {
            anyhow::bail!(
                "two {} subnets given ({slot} and {}): a reservation holds at most one subnet per family",
                if c.v6 { "IPv6" } else { "IPv4" },
                c.text
            );
        }
        *slot = c.text.clone();
    }
    Ok((v4, v6))
}

/// Prints a list; an empty one says so on stderr (as kubectl does), so that stdout
/// stays parseable.
fn emit_list(text: &str, none: &str) -> Result<()> {
    if text.is_empty() {
        eprintln!("{none}");
    }
    emit(text)
}

fn emit(text: &str) -> Result<()> {
    write_stdout(text).map(drop)
}

/// Writes to stdout; false when the reader is gone (`twillctl ... | head`), which is not
/// an error.
fn write_stdout(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write to stdout"),
    }
}

/// Exits with clap's usage error (code 2) naming the missing flag, its variable and the
/// config file key.
fn missing(cmd: &str, flag: &str, what: &str, file: &str) -> ! {
    let key = flag.replace('-', "_");
    let env = format!("TWILL_{}", key.to_uppercase());
    Cli::command()
        .error(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!("`{cmd}` needs --{flag} (or {env}, or `{key}` in {file}): {what}"),
        )
        .exit()
}

/// The connection settings: flags, else environment, else the config file.
fn connect_options(conn: &ConnFlags, cmd: &str) -> Result<ConnectOptions> {
    let (file, path) = config::load(conn.config.as_deref())?;
    let file_name = match (&path, &conn.config) {
        (Some(p), _) | (None, Some(p)) => p.display().to_string(),
        (None, None) => config::default_path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the config file".to_string()),
    };
    let flags = Settings {
        controller: conn.controller.clone(),
        tls_cert: conn.tls_cert.clone(),
        tls_key: conn.tls_key.clone(),
        tls_ca: conn.tls_ca.clone(),
        tls_server_name: conn.tls_server_name.clone(),
    };
    let s = flags.or(file);
    let need = |flag: &str, what: &str| -> ! { missing(cmd, flag, what, &file_name) };
    Ok(ConnectOptions {
        controller: s.controller.unwrap_or_else(|| {
            need(
                "controller",
                "the controller's URL, e.g. https://10.0.0.1:8474",
            )
        }),
        tls_cert: s
            .tls_cert
            .unwrap_or_else(|| need("tls-cert", "an admin client certificate (PEM)")),
        tls_key: s
            .tls_key
            .unwrap_or_else(|| need("tls-key", "the client certificate's key (PEM)")),
        tls_ca: s.tls_ca.unwrap_or_else(|| {
            need(
                "tls-ca",
                "the CA certificate (PEM) that signed the controller's certificate",
            )
        }),
        tls_server_name: s.tls_server_name,
        timeout: conn.timeout,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Connects and runs `f` with the admin client.
fn call<T, F, Fut>(conn: &ConnFlags, cmd: &str, f: F) -> Result<T>
where
    F: FnOnce(Admin) -> Fut,
    Fut: std::future::Future<Output = Result<T, twill_ctl::client::ClientError>>,
{
    let opts = connect_options(conn, cmd)?;
    runtime()?.block_on(async {
        let admin = Admin::connect(&opts).await?;
        Ok(f(admin).await?)
    })
}

/// Like [`call`] for a command about `network`, which `f` is given: first makes sure
/// the controller serves it (see [`Admin::ensure_networks`]).
fn call_in<T, F, Fut>(conn: &ConnFlags, cmd: &str, network: NetworkName, f: F) -> Result<T>
where
    F: FnOnce(Admin, NetworkName) -> Fut,
    Fut: std::future::Future<Output = Result<T, twill_ctl::client::ClientError>>,
{
    call(conn, cmd, |mut a| async move {
        a.ensure_networks(std::slice::from_ref(&network)).await?;
        f(a, network).await
    })
}

/// `twillctl watch`: prints each response as it arrives until Ctrl-C, SIGTERM or the
/// end of the stream (all exit 0).
fn watch(conn: &ConnFlags, networks: &[NetworkName], from_revision: u64) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let opts = connect_options(conn, "watch")?;
    let mut printer = WatchPrinter::new(conn.output);
    if twill_ctl::client::watch_networks(networks).len() > 1 {
        printer = printer.with_network_column();
    }
    runtime()?.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
        let start = async {
            let mut admin = Admin::connect(&opts).await?;
            admin.ensure_networks(networks).await?;
            let stream = admin.watch(networks, from_revision).await?;
            Ok::<_, twill_ctl::client::ClientError>((admin, stream))
        };
        let (admin, mut stream) = tokio::select! {
            r = start => r?,
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
            };
            match msg {
                Ok(Some(resp)) => {
                    if !write_stdout(&printer.render(&resp, SystemTime::now()))? {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(admin.fail(status).into()),
            }
        }
    })
}

fn certs_init(out: &OutFlags, days: u32) -> Result<()> {
    let ca = certs::new_ca(Validity::days(days)?)?;
    write(out, "ca", &ca, &format!("CN={}, CA", certs::CA_COMMON_NAME))
}

fn certs_issue(cmd: IssueCommand) -> Result<()> {
    let (role, flags) = match cmd {
        IssueCommand::Controller {
            mut dns,
            ip: mut ips,
            replica,
            issue,
        } => {
            if dns.is_empty() && ips.is_empty() {
                dns.push("localhost".to_string());
                ips.push(IpAddr::from([127, 0, 0, 1]));
                eprintln!("note: no --dns or --ip given: using DNS:localhost and IP:127.0.0.1");
            }
            (Role::Controller { dns, ips, replica }, issue)
        }
        IssueCommand::Node { name, issue } => (Role::Node(name), issue),
        IssueCommand::Admin { name, issue } => (Role::Admin(name), issue),
    };
    let dir = &flags.out.dir;
    let ca_cert = flags
        .ca_cert
        .unwrap_or_else(|| dir.join(certs::CA_CERT_FILE));
    let ca_key = flags.ca_key.unwrap_or_else(|| dir.join(certs::CA_KEY_FILE));
    if !ca_cert.exists() && !ca_key.exists() {
        anyhow::bail!(
            "no CA at {} / {}: run `twillctl certs init --dir {}` first, or pass --ca-cert and --ca-key",
            ca_cert.display(),
            ca_key.display(),
            dir.display()
        );
    }
    let validity = Validity::days(flags.days)?;
    let ca = Ca::load(&ca_cert, &ca_key)?;
    let issued = ca.issue(&role, validity)?;
    write(&flags.out, &role.file_stem(), &issued, &role.describe())
}

/// Writes `issued` as DIR/STEM.crt and DIR/STEM.key and says so (`what`: its subject).
fn write(out: &OutFlags, stem: &str, issued: &certs::Issued, what: &str) -> Result<()> {
    let w = certs::write_pair(&out.dir, stem, issued, out.force)?;
    println!(
        "wrote {} (certificate: {what}; valid until {})",
        w.cert.display(),
        certs::rfc3339(issued.not_after)
    );
    println!("wrote {} (private key, mode 0600)", w.key.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("twillctl").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn network_defaults_to_default_and_is_checked_before_any_call() {
        match parse(&["leases"]).unwrap() {
            Command::Leases { network, .. } => assert!(network.network.is_default()),
            c => panic!("{c:?}"),
        }
        match parse(&["lease", "revoke", "gpu-1", "--network", "blue"]).unwrap() {
            Command::Lease(LeaseCommand::Revoke { network, node }) => {
                assert_eq!((network.network.as_str(), node.as_str()), ("blue", "gpu-1"));
            }
            c => panic!("{c:?}"),
        }
        let e = parse(&["reserve", "gpu-1", "10.10.3.0/24", "--network", "Blue"]).unwrap_err();
        assert!(e.to_string().contains("lower-case letters"), "{e}");
        assert!(parse(&["token", "list", "--network", "blue"]).is_err());
        assert!(matches!(parse(&["networks"]).unwrap(), Command::Networks));
    }

    #[test]
    fn watch_takes_several_networks() {
        match parse(&["watch", "--network", "default", "--network", "blue"]).unwrap() {
            Command::Watch { networks, .. } => {
                let names: Vec<&str> = networks.iter().map(|n| n.as_str()).collect();
                assert_eq!(names, ["default", "blue"]);
            }
            c => panic!("{c:?}"),
        }
        match parse(&["watch"]).unwrap() {
            Command::Watch { networks, .. } => {
                assert!(twill_ctl::client::watch_networks(&networks).is_empty());
            }
            c => panic!("{c:?}"),
        }
    }
}
