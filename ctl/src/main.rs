//! twillctl: the operators' command line for Twill — lists leases over the controller's
//! admin API (mutual TLS) and makes the certificates every component needs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use twill_ctl::certs::{self, Ca, Role, Validity};
use twill_ctl::client::{self, ConnectOptions};
use twill_ctl::output::{self, Format};

const AFTER_HELP: &str = "\
Examples:
  twillctl certs init --dir /etc/twill/pki
  twillctl certs issue controller --dir /etc/twill/pki --dns twill.example.com --ip 10.0.0.1
  twillctl certs issue node worker-1 --dir /etc/twill/pki
  twillctl certs issue admin alice --dir /etc/twill/pki
  twillctl --controller https://10.0.0.1:8474 --tls-cert admin-alice.crt \\
      --tls-key admin-alice.key --tls-ca ca.crt leases -o wide

Every flag can also be set in the environment as TWILL_<FLAG>, e.g. TWILL_CONTROLLER.";

/// Twill's admin CLI: inspect the lease table of a twill-controller and make the
/// certificates (CA, controller, nodes, admins) that Twill's mutual TLS needs.
#[derive(Parser, Debug)]
#[command(name = "twillctl", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    conn: ConnFlags,
    #[command(subcommand)]
    command: Command,
}

/// Flags for reaching the controller (used by `leases`).
#[derive(Args, Debug)]
#[command(next_help_heading = "Controller connection and output (used by `leases`)")]
struct ConnFlags {
    /// URL of the controller's gRPC endpoint, e.g. https://10.0.0.1:8474 (an IP address works
    /// when the controller's certificate lists it as an IP subjectAltName).
    #[arg(long, global = true, env = "TWILL_CONTROLLER", value_name = "URL")]
    controller: Option<String>,
    /// Client certificate (PEM); `leases` needs an admin certificate (O=twill:admins).
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
    /// Time limit for connecting and for each call (e.g. 5s, 1m).
    #[arg(long, global = true, env = "TWILL_TIMEOUT", default_value = "10s",
          value_parser = twill_common::parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, env = "TWILL_OUTPUT", value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List leases (node, subnet, public IP, VTEP MAC, time left), ordered by node name.
    ///
    /// Calls twill.v1.AdminService/ListLeases; needs --controller, --tls-cert, --tls-key
    /// and --tls-ca, with an admin certificate (O=twill:admins).
    Leases {
        /// Only leases whose node name starts with this prefix.
        #[arg(long, env = "TWILL_PREFIX", default_value = "")]
        prefix: String,
    },
    /// Make certificates: a CA, the controller's server certificate, node and admin
    /// client certificates (the layout of REFERENCE.md 2.3).
    #[command(subcommand)]
    Certs(CertsCommand),
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
}

#[derive(Subcommand, Debug)]
enum IssueCommand {
    /// The controller's server certificate: DIR/controller.crt and DIR/controller.key
    /// (CN=twill-controller, serverAuth, subjectAltNames from --dns and --ip;
    /// localhost and 127.0.0.1 when neither is given).
    Controller {
        /// DNS name agents and twillctl dial (repeatable; comma-separated in the env).
        #[arg(long, env = "TWILL_DNS", value_delimiter = ',', value_name = "NAME")]
        dns: Vec<String>,
        /// IP address agents and twillctl dial (repeatable; comma-separated in the env).
        #[arg(long, env = "TWILL_IP", value_delimiter = ',', value_name = "IP")]
        ip: Vec<IpAddr>,
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
    match cli.command {
        Command::Leases { prefix } => leases(&cli.conn, &prefix),
        Command::Certs(CertsCommand::Init { out, days }) => certs_init(&out, days),
        Command::Certs(CertsCommand::Issue(cmd)) => certs_issue(cmd),
    }
}

/// Exits with clap's usage error (code 2) naming the missing flag and its variable.
fn missing(flag: &str, env: &str, what: &str) -> ! {
    Cli::command()
        .error(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!("`leases` needs --{flag} (or {env}): {what}"),
        )
        .exit()
}

fn leases(conn: &ConnFlags, prefix: &str) -> Result<()> {
    let controller = conn.controller.clone().unwrap_or_else(|| {
        missing(
            "controller",
            "TWILL_CONTROLLER",
            "the controller's URL, e.g. https://10.0.0.1:8474",
        )
    });
    let tls_cert = conn.tls_cert.clone().unwrap_or_else(|| {
        missing(
            "tls-cert",
            "TWILL_TLS_CERT",
            "an admin client certificate (PEM)",
        )
    });
    let tls_key = conn.tls_key.clone().unwrap_or_else(|| {
        missing(
            "tls-key",
            "TWILL_TLS_KEY",
            "the client certificate's key (PEM)",
        )
    });
    let tls_ca = conn.tls_ca.clone().unwrap_or_else(|| {
        missing(
            "tls-ca",
            "TWILL_TLS_CA",
            "the CA certificate (PEM) that signed the controller's certificate",
        )
    });
    let opts = ConnectOptions {
        controller,
        tls_cert,
        tls_key,
        tls_ca,
        tls_server_name: conn.tls_server_name.clone(),
        timeout: conn.timeout,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let resp = rt.block_on(client::fetch_leases(&opts, prefix))?;
    let text = output::render_leases(&resp, conn.output, SystemTime::now());
    if text.is_empty() {
        if prefix.is_empty() {
            eprintln!("No leases found.");
        } else {
            eprintln!("No leases found with prefix {prefix:?}.");
        }
    }
    print!("{text}");
    Ok(())
}

fn certs_init(out: &OutFlags, days: u32) -> Result<()> {
    let validity = Validity::days(days)?;
    let ca = certs::new_ca(validity)?;
    let written = certs::write_pair(&out.dir, "ca", &ca, out.force)?;
    report(
        &written,
        &format!("CN={}, CA", certs::CA_COMMON_NAME),
        validity.not_after,
    );
    Ok(())
}

fn certs_issue(cmd: IssueCommand) -> Result<()> {
    let (role, flags) = match cmd {
        IssueCommand::Controller { mut dns, ip, issue } => {
            if dns.is_empty() && ip.is_empty() {
                dns.push("localhost".to_string());
                eprintln!("note: no --dns or --ip given: using DNS:localhost and IP:127.0.0.1");
                (
                    Role::Controller {
                        dns,
                        ips: vec![IpAddr::from([127, 0, 0, 1])],
                    },
                    issue,
                )
            } else {
                (Role::Controller { dns, ips: ip }, issue)
            }
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
    let written = certs::write_pair(dir, &role.file_stem(), &issued, flags.out.force)?;
    report(&written, &role.describe(), validity.not_after);
    Ok(())
}

fn report(w: &certs::Written, what: &str, not_after: SystemTime) {
    println!(
        "wrote {} (certificate: {what}; valid until {})",
        shown(&w.cert),
        certs::rfc3339(not_after)
    );
    println!("wrote {} (private key, mode 0600)", shown(&w.key));
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}
