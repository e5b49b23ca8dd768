//! End to end, real binaries in network namespaces: a lease is only ever what its
//! own node can rightfully claim, and an agent keeps its node's data plane right even
//! when the controller stops answering.
//!
//! * a node with a valid certificate of its own ("mallory") cannot take another
//!   node's VTEP MAC (`ALREADY_EXISTS`), nor claim a zero or multicast MAC or a
//!   loopback public IP (`INVALID_ARGUMENT`); no lease is made, the victim's FDB entry
//!   on its peers stays, and a continuous ping to the victim loses nothing;
//! * an agent whose controller accepts connections (TLS and HTTP/2 complete) but never
//!   answers a call keeps reconciling (a hand-deleted route comes back), reports
//!   itself unhealthy once its lease has run out, and exits promptly and cleanly on
//!   SIGTERM.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Code, Request, Response, Status};
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::agent_service_server::{AgentService, AgentServiceServer};
use twill_proto::{
    AcquireRequest, AcquireResponse, GetNetworkConfigRequest, NetworkConfig, ReleaseRequest,
    ReleaseResponse, WatchRequest, WatchResponse,
};
use twill_tests::overlay::{CONTROLLER_PROC, GRPC_PORT};
use twill_tests::wait::POLL_INTERVAL;
use twill_tests::{
    hold_for, require_lab, wait_until, Check, ContinuousPing, Overlay, OverlayConfig, SubnetEnv,
    CONTROLLER_HOST,
};

/// Deadline for an overlay to converge (generous: the machine may be busy).
const CONVERGE: Duration = Duration::from_secs(90);
/// Deadline for a single state change the test waits for.
const SETTLE: Duration = Duration::from_secs(60);
/// How long the test's own gRPC calls may take before it calls them unanswered.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How many log lines of a process a failure message quotes.
const LOG_LINES: usize = 40;

/// The tails of the logs of `procs`, for failure messages.
fn log_tails(ov: &Overlay, procs: &[&str]) -> String {
    procs
        .iter()
        .map(|p| {
            format!(
                "----- last {LOG_LINES} lines of {p}'s log -----\n{}",
                ov.lab().log_tail(p, LOG_LINES)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A named condition for [`watch_for`].
type NamedCheck<'a> = (&'a str, Box<dyn FnMut() -> Result<()> + 'a>);

/// Looks at every check every [`POLL_INTERVAL`] for the whole of `period`, whatever
/// they find, and returns the first failure of each (with when it was seen). Unlike
/// [`hold_for`], it does not stop at the first failure: what runs meanwhile (a ping)
/// covers the whole period either way.
fn watch_for(period: Duration, checks: &mut [NamedCheck<'_>]) -> Vec<String> {
    let start = Instant::now();
    let mut failed: Vec<Option<String>> = vec![None; checks.len()];
    loop {
        for ((what, check), seen) in checks.iter_mut().zip(failed.iter_mut()) {
            if seen.is_none() {
                if let Err(e) = check() {
                    *seen = Some(format!(
                        "expected {what} to hold for {period:?}, but after {:.1?}: {e:#}",
                        start.elapsed()
                    ));
                }
            }
        }
        if start.elapsed() >= period {
            return failed.into_iter().flatten().collect();
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ------------------------------------------------------------ gRPC helpers

/// PEM files for one side of a mutual-TLS connection.
struct Pems {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Pems {
    /// `ca.crt`, `<name>.crt` and `<name>.key` from the overlay's certificate dir.
    fn load(dir: &Path, name: &str) -> Result<Pems> {
        let read = |f: String| {
            let p = dir.join(&f);
            std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(Pems {
            ca: read("ca.crt".into())?,
            cert: read(format!("{name}.crt"))?,
            key: read(format!("{name}.key"))?,
        })
    }
}

/// Connects (TLS and HTTP/2 handshakes done) to the controller at `url` with a client
/// certificate, from the calling thread's network namespace.
async fn connect(url: &str, pems: &Pems) -> Result<AgentServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pems.ca))
        .identity(Identity::from_pem(&pems.cert, &pems.key))
        // the controller's certificate names DNS localhost and the controller's IP
        .domain_name("localhost");
    let channel = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL {url}"))?
        .tls_config(tls)
        .context("client TLS settings")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url} with mutual TLS"))?;
    Ok(AgentServiceClient::new(channel))
}

/// Runs the future `make` builds on a current-thread tokio runtime on a thread inside
/// `host`'s network namespace (sockets it opens live there).
fn block_on_in<T, F>(ov: &Overlay, host: &str, make: impl FnOnce() -> F + Send) -> Result<T>
where
    T: Send,
    F: Future<Output = Result<T>>,
{
    ov.lab().in_netns(host, || -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a tokio runtime")?;
        rt.block_on(make())
    })?
}

// ------------------------------------------- 1. a spoofed VTEP MAC is refused

/// A MAC that is unicast and locally administered, held by no node of the lab.
const FRESH_MAC: &str = "0a:58:de:ad:be:ef";

/// One Acquire that mallory tries, and how the controller must refuse it.
struct Attempt {
    what: &'static str,
    public_ip: String,
    vtep_mac: String,
    want: Code,
    /// The field the refusal's message must name.
    names: &'static str,
}

/// What became of an Acquire.
enum Answer {
    Granted(Box<AcquireResponse>),
    Refused(Status),
    Unanswered,
}

impl Answer {
    fn describe(&self) -> String {
        match self {
            Answer::Granted(r) => format!(
                "GRANTED: {:?} (ttl {} s)",
                r.lease.as_ref().map(|l| format!(
                    "subnet {} public_ip {} vtep_mac {}",
                    l.subnet, l.public_ip, l.vtep_mac
                )),
                r.ttl_seconds
            ),
            Answer::Refused(s) => format!("refused with {:?}: {:?}", s.code(), s.message()),
            Answer::Unanswered => format!("no answer within {CALL_TIMEOUT:?}"),
        }
    }
}

/// Calls Acquire for `node` once per attempt (one connection, from the controller's
/// host, with `pems`); prints each answer and returns the ones that are not the
/// refusal wanted.
fn acquire_as(ov: &Overlay, node: &str, pems: &Pems, attempts: &[Attempt]) -> Result<Vec<String>> {
    let url = ov.controller_url();
    let answers: Vec<Answer> = block_on_in(ov, CONTROLLER_HOST, || async {
        let mut client = connect(&url, pems).await?;
        let mut answers = Vec::new();
        for t in attempts {
            let req = AcquireRequest {
                node_name: node.into(),
                requested_subnet: String::new(),
                public_ip: t.public_ip.clone(),
                backend_type: "vxlan".into(),
                vtep_mac: t.vtep_mac.clone(),
                ..Default::default()
            };
            answers.push(
                match tokio::time::timeout(CALL_TIMEOUT, client.acquire(req)).await {
                    Ok(Ok(r)) => Answer::Granted(Box::new(r.into_inner())),
                    Ok(Err(s)) => Answer::Refused(s),
                    Err(_) => Answer::Unanswered,
                },
            );
        }
        Ok(answers)
    })?;
    let mut problems = Vec::new();
    for (t, ans) in attempts.iter().zip(&answers) {
        println!(
            "{node}: Acquire with {} (vtep_mac {}, public_ip {}): {}",
            t.what,
            t.vtep_mac,
            t.public_ip,
            ans.describe()
        );
        let ok = matches!(ans, Answer::Refused(s) if s.code() == t.want && s.message().contains(t.names));
        if !ok {
            problems.push(format!(
                "{node}'s Acquire with {} (vtep_mac {}, public_ip {}): want {:?} naming `{}`, got {}",
                t.what,
                t.vtep_mac,
                t.public_ip,
                t.want,
                t.names,
                ans.describe()
            ));
        }
    }
    Ok(problems)
}

/// What must not have changed after an intruder's refused Acquire.
struct NothingChanged<'a> {
    /// The host whose kernel state is looked at.
    on: &'a str,
    /// The victim, and its subnet, VTEP MAC and underlay address.
    peer: &'a str,
    env: &'a SubnetEnv,
    mac: &'a str,
    public: Ipv4Addr,
    /// The node that must hold no lease.
    intruder: &'a str,
    /// A ping from `on` to `peer` that must keep running.
    ping: &'a mut ContinuousPing,
}

impl NothingChanged<'_> {
    /// For the whole of `period`: no lease for the intruder, `on`'s route, neighbour
    /// and FDB entry for the victim as they were, the victim's MAC sent nowhere but to
    /// the victim, the ping running. The first failure of each, if any; `when` is for
    /// messages.
    fn watch(&mut self, ov: &Overlay, when: &str, period: Duration) -> Vec<String> {
        let NothingChanged {
            on,
            peer,
            env,
            mac,
            public,
            intruder,
            ref mut ping,
        } = *self;
        let public_s = public.to_string();
        let no_lease = || -> Result<()> {
            let leases = ov.leases()?;
            if let Some(l) = leases.iter().find(|l| l.node_name == intruder) {
                bail!("twillctl leases lists a lease for {intruder}: {l:?}");
            }
            Ok(())
        };
        let entries = || ov.vxlan_entries(on, env, mac, public);
        let mac_only_to_peer = || -> Result<()> {
            let fdb = ov.lab().fdb(on)?;
            let wrong: Vec<_> = fdb
                .iter()
                .filter(|f| f.mac.eq_ignore_ascii_case(mac))
                .filter(|f| f.dst.as_deref() != Some(&*public_s))
                .collect();
            ensure!(
                wrong.is_empty(),
                "{on}'s FDB sends {peer}'s MAC {mac} elsewhere than {public}: {wrong:?}"
            );
            Ok(())
        };
        let no_lease_what = format!("no lease for {intruder} ({when})");
        let entries_what = format!("{on}'s route, neighbour and FDB entry for {peer} ({when})");
        let fdb_what = format!("{on}'s FDB sending {peer}'s MAC only to {public} ({when})");
        let ping_what = format!("the ping from {on} to {peer} running ({when})");
        let mut checks: Vec<NamedCheck<'_>> = vec![
            (&no_lease_what, Box::new(no_lease)),
            (&entries_what, Box::new(entries)),
            (&fdb_what, Box::new(mac_only_to_peer)),
            (&ping_what, Box::new(|| ping.still_running(when))),
        ];
        watch_for(period, &mut checks)
    }
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn a_spoofed_vtep_mac_cannot_take_another_nodes_traffic() {
    let Some(ov) = require_lab(
        "lease_integrity::spoofed_vtep_mac",
        Overlay::start(OverlayConfig::new(["node-a", "node-b"])),
    ) else {
        return;
    };
    ov.run_scenario(spoof_scenario);
}

fn spoof_scenario(ov: &Overlay) -> Result<()> {
    let (a, b, mallory) = ("node-a", "node-b", "mallory");
    let lab = ov.lab();
    let envs = ov.wait_converged(CONVERGE)?;
    let env_b = &envs[b];
    let mac_b = ov.wait_vxlan_entries(a, b, env_b, SETTLE)?;
    let pub_b = ov.public_ip(b);

    // A certificate of mallory's own: a real node, as far as the CA is concerned.
    ov.issue_node_cert(mallory)
        .context("issuing mallory's node certificate")?;
    let pems = Pems::load(ov.certs_dir(), &format!("node-{mallory}"))
        .context("twillctl certs issue node mallory did not write node-mallory.crt/.key")?;

    // Traffic to node-b's flannel.1 address, watched for the whole attempt.
    let dst = env_b.flannel_addr();
    wait_until(SETTLE, &format!("node-a to ping {dst}"), || {
        lab.ping(a, dst)
    })?;
    let mut ping = ContinuousPing::start(lab, a, dst)?;
    let started = Instant::now();
    hold_for(Duration::from_secs(2), "ping to run", || {
        ping.still_running("warm-up")
    })?;

    // mallory's tries, from the controller's host (a real lab address that is not
    // node-b's, and the address the requests come from). After each step, for a few
    // reconcile intervals: no lease for mallory, node-a's entries for node-b as they
    // were, the ping running. Every finding is collected, so that one run tells the
    // whole story.
    let ctl_ip = ov.controller_host().ip.to_string();
    let mut problems = Vec::new();

    // (1) node-b's VTEP MAC, with mallory's own (valid) public IP.
    let spoof = [Attempt {
        what: "node-b's VTEP MAC",
        public_ip: ctl_ip.clone(),
        vtep_mac: mac_b.clone(),
        want: Code::AlreadyExists,
        names: "vtep_mac",
    }];
    problems.extend(acquire_as(ov, mallory, &pems, &spoof)?);
    let mut unchanged = NothingChanged {
        on: a,
        peer: b,
        env: env_b,
        mac: &mac_b,
        public: pub_b,
        intruder: mallory,
        ping: &mut ping,
    };
    problems.extend(unchanged.watch(ov, "after the spoofed Acquire", Duration::from_secs(5)));

    // (2) addresses no VXLAN endpoint can have.
    let malformed = [
        Attempt {
            what: "the all-zero MAC",
            public_ip: ctl_ip.clone(),
            vtep_mac: "00:00:00:00:00:00".into(),
            want: Code::InvalidArgument,
            names: "vtep_mac",
        },
        Attempt {
            what: "a multicast MAC",
            public_ip: ctl_ip.clone(),
            vtep_mac: "01:00:5e:00:00:01".into(),
            want: Code::InvalidArgument,
            names: "vtep_mac",
        },
        Attempt {
            what: "a loopback public IP",
            public_ip: "127.0.0.1".into(),
            vtep_mac: FRESH_MAC.into(),
            want: Code::InvalidArgument,
            names: "public_ip",
        },
    ];
    problems.extend(acquire_as(ov, mallory, &pems, &malformed)?);
    problems.extend(unchanged.watch(ov, "after the malformed Acquires", Duration::from_secs(3)));

    match ov.leases() {
        Ok(leases) => println!(
            "leases afterwards: {:?}",
            leases
                .iter()
                .map(|l| format!(
                    "{} {} {} {}",
                    l.node_name, l.subnet, l.public_ip, l.vtep_mac
                ))
                .collect::<Vec<_>>()
        ),
        Err(e) => problems.push(format!("twillctl leases: {e:#}")),
    }

    match ping.finish() {
        Ok(report) => {
            println!(
                "continuous ping node-a -> {dst} (node-b's flannel.1, every 50 ms, {:.1?}) \
                 across mallory's tries: {report}",
                started.elapsed()
            );
            problems.extend(
                report
                    .problems(100, "mallory's tries")
                    .into_iter()
                    .map(|p| format!("the ping from node-a to node-b: {p}")),
            );
        }
        Err(e) => problems.push(format!("the background ping: {e:#}")),
    }

    if !problems.is_empty() {
        bail!(
            "a node with its own valid certificate could disturb node-b's lease:\n  - {}\n{}",
            problems.join("\n  - "),
            log_tails(ov, &[CONTROLLER_PROC, &Overlay::agent_proc(a)])
        );
    }
    Ok(())
}

// ------------------------------- 2. a controller that never answers

/// One call the hung controller took.
struct Call {
    peer: Option<SocketAddr>,
    method: &'static str,
    at: Instant,
}

/// Calls the hung controller took, in order.
#[derive(Clone, Default)]
struct CallLog(Arc<Mutex<Vec<Call>>>);

impl CallLog {
    fn record<T>(&self, req: &Request<T>, method: &'static str) {
        let mut v = self.0.lock();
        v.push(Call {
            peer: req.remote_addr(),
            method,
            at: Instant::now(),
        });
    }

    /// Methods called from `ip`, in order, with when.
    fn from(&self, ip: Ipv4Addr) -> Vec<(&'static str, Instant)> {
        let v = self.0.lock();
        v.iter()
            .filter(|c| c.peer.map(|p| p.ip()) == Some(ip.into()))
            .map(|c| (c.method, c.at))
            .collect()
    }
}

/// An AgentService that takes every call and never answers it.
struct Hung {
    calls: CallLog,
}

#[tonic::async_trait]
impl AgentService for Hung {
    async fn get_network_config(
        &self,
        req: Request<GetNetworkConfigRequest>,
    ) -> Result<Response<NetworkConfig>, Status> {
        self.calls.record(&req, "GetNetworkConfig");
        std::future::pending().await
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        self.calls.record(&req, "Acquire");
        std::future::pending().await
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        self.calls.record(&req, "Release");
        std::future::pending().await
    }

    type WatchStream = tokio_stream::Pending<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.calls.record(&req, "Watch");
        std::future::pending().await
    }

    async fn list_networks(
        &self,
        req: Request<twill_proto::ListNetworksRequest>,
    ) -> Result<Response<twill_proto::ListNetworksResponse>, Status> {
        self.calls.record(&req, "ListNetworks");
        std::future::pending().await
    }

    async fn report_attachments(
        &self,
        req: Request<twill_proto::ReportAttachmentsRequest>,
    ) -> Result<Response<twill_proto::ReportAttachmentsResponse>, Status> {
        self.calls.record(&req, "ReportAttachments");
        std::future::pending().await
    }
}

/// A "controller" on the real controller's address, with its certificate: it
/// completes TLS (checking client certificates) and HTTP/2, and never answers a call.
/// Dropping it stops it (its runtime, with every connection, goes away).
struct HungController {
    rt: Option<tokio::runtime::Runtime>,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    calls: CallLog,
    addr: SocketAddr,
}

impl HungController {
    fn start(ov: &Overlay) -> Result<HungController> {
        let pems = Pems::load(ov.certs_dir(), "controller")?;
        let addr = SocketAddr::new(ov.controller_host().ip.into(), GRPC_PORT);
        // The socket is made in the controller's namespace and stays there; the
        // runtime serving it runs anywhere.
        let listener = ov
            .lab()
            .in_netns(
                CONTROLLER_HOST,
                || -> std::io::Result<std::net::TcpListener> {
                    let l = std::net::TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                },
            )?
            .with_context(|| format!("cannot listen on {addr} in the controller's namespace"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hung-controller")
            .enable_all()
            .build()
            .context("cannot build a tokio runtime")?;
        let listener = {
            let _in_rt = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let calls = CallLog::default();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(pems.cert, pems.key))
            .client_ca_root(Certificate::from_pem(pems.ca));
        let router = Server::builder()
            .tls_config(tls)
            .context("the hung controller's TLS settings")?
            .add_service(AgentServiceServer::new(Hung {
                calls: calls.clone(),
            }));
        let server = rt.spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
        Ok(HungController {
            rt: Some(rt),
            server: Some(server),
            calls,
            addr,
        })
    }

    /// `Err` (with why) when the server is no longer serving.
    fn serving(&mut self) -> Result<()> {
        let (Some(rt), Some(server)) = (self.rt.as_ref(), self.server.as_mut()) else {
            bail!("the hung controller was stopped");
        };
        if server.is_finished() {
            let how = match rt.block_on(server) {
                Ok(Ok(())) => "it returned".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("{e}"),
            };
            self.server = None;
            bail!(
                "the hung controller on {} stopped serving: {how}",
                self.addr
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for HungController {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn an_agent_keeps_reconciling_and_exits_on_sigterm_when_the_controller_never_answers() {
    let agent_args = ["--reconcile-interval", "1s", "--renew-margin", "8s"];
    let cfg = OverlayConfig::new(["node-a", "node-b"])
        .controller_args(["--lease-ttl", "10s"])
        .agent_args("node-a", agent_args)
        .agent_args("node-b", agent_args);
    let Some(ov) = require_lab("lease_integrity::hung_controller", Overlay::start(cfg)) else {
        return;
    };
    ov.run_scenario(hung_controller_scenario);
}

fn hung_controller_scenario(ov: &Overlay) -> Result<()> {
    let (a, b) = ("node-a", "node-b");
    let lab = ov.lab();
    let agent_a = Overlay::agent_proc(a);
    let tails = || log_tails(ov, &[&agent_a]);
    let envs = ov.wait_converged(CONVERGE)?;
    ov.wait_agent_healthy(a, SETTLE)?;
    let env_b = &envs[b];
    let subnet = env_b.subnet_net();
    let subnet_s = subnet.to_string();
    ov.wait_vxlan_entries(a, b, env_b, SETTLE)?;

    // The controller goes away (SIGKILL to its own pid)...
    let st = ov.kill_controller()?;
    ensure!(
        !lab.is_running(CONTROLLER_PROC) && lab.pid(CONTROLLER_PROC).is_none(),
        "the controller is still running after SIGKILL ({st})"
    );
    let killed = Instant::now();
    println!("controller killed: {st}");

    // ...and something takes its address that accepts connections and never answers.
    let mut hung = HungController::start(ov)?;
    println!("hung controller serving on {}", hung.addr);

    // Check the stand-in first, so that a failure below is the agent's: a client with
    // a node certificate gets through TLS and HTTP/2, and its call is taken and
    // never answered.
    let pems = Pems::load(ov.certs_dir(), &format!("node-{a}"))?;
    let url = ov.controller_url();
    let self_check = block_on_in(ov, CONTROLLER_HOST, || async {
        let mut client = connect(&url, &pems)
            .await
            .context("the test's own client connecting to the hung controller")?;
        let req = GetNetworkConfigRequest {
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(2), client.get_network_config(req)).await {
            Err(_) => Ok(()),
            Ok(r) => bail!("the hung controller answered: {r:?}"),
        }
    });
    hung.serving()?;
    self_check.context("the hung controller is not what this test needs (a test bug)")?;
    let ctl_ip = ov.controller_host().ip;
    ensure!(
        !hung.calls.from(ctl_ip).is_empty(),
        "the hung controller did not see the test's own call"
    );

    // node-a's agent reaches it: it has a call hanging there from now on.
    let ip_a = ov.public_ip(a);
    // What a failure message adds: node-a's calls to the stand-in, and its log.
    let report = |hung: &HungController| {
        let calls: Vec<String> = hung
            .calls
            .from(ip_a)
            .iter()
            .map(|(m, at)| format!("{m} at +{:.1?}", at.duration_since(killed)))
            .collect();
        format!(
            "calls node-a's agent made to the hung controller (time since the real one was killed): {calls:?}\n{}",
            tails()
        )
    };
    let first = wait_until(
        Duration::from_secs(30),
        "node-a's agent to call the hung controller",
        || -> Check<(&'static str, Instant)> {
            if let Err(e) = hung.serving() {
                return Check::Fatal(format!("{e:#}"));
            }
            if !ov.agent_running(a) {
                return Check::Fatal(format!("node-a's agent exited:\n{}", tails()));
            }
            match hung.calls.from(ip_a).first() {
                Some(c) => Check::Ready(*c),
                None => Check::NotYet("no call from node-a yet".into()),
            }
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}", report(&hung)))?;
    println!(
        "node-a's agent called {} on the hung controller {:.1?} after the real one was killed",
        first.0,
        first.1.duration_since(killed)
    );

    // (1) It keeps reconciling: a hand-deleted route comes back. The deletion fails
    // unless the route was there, so its success proves something was removed.
    ov.delete_peer_route(a, env_b)?;
    let deleted = Instant::now();
    wait_until(
        Duration::from_secs(20),
        &format!(
            "node-a's agent to put back its route to {subnet_s} while its calls to the \
             controller hang (--reconcile-interval 1s)"
        ),
        || -> Check<()> {
            if !ov.agent_running(a) {
                return Check::Fatal(format!("node-a's agent exited:\n{}", tails()));
            }
            match ov.has_route(a, subnet) {
                Ok(true) => Check::Ready(()),
                Ok(false) => Check::NotYet("no route yet".into()),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}", report(&hung)))?;
    println!(
        "node-a's hand-deleted route to {subnet_s} was back after {:.1?}",
        deleted.elapsed()
    );

    // (2) It says it is unhealthy once its lease ran out without a renewal (TTL 10 s,
    // renew margin 8 s).
    let addr = ov.agent_metrics_addr(a);
    wait_until(
        Duration::from_secs(40),
        "node-a's agent to answer GET /healthz with 503 (lease expired, no answer from the controller)",
        || -> Check<()> {
            if !ov.agent_running(a) {
                return Check::Fatal(format!("node-a's agent exited:\n{}", tails()));
            }
            match lab.http_get(a, addr, "/healthz") {
                Ok(r) if r.status == 503 => Check::Ready(()),
                Ok(r) => Check::NotYet(format!("HTTP {}: {}", r.status, r.body.trim())),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        },
    )
    .map_err(|e| anyhow!("{e:#}\n{}", report(&hung)))?;
    println!(
        "node-a's agent reported 503 on /healthz {:.1?} after the controller was killed",
        killed.elapsed()
    );
    hung.serving()?;

    // (3) SIGTERM (to its own pid) ends it promptly and cleanly, hanging calls or not.
    let sent = Instant::now();
    let st = lab
        .stop_within(&agent_a, Duration::from_secs(10))
        .map_err(|e| anyhow!("SIGTERM to node-a's agent: {e:#}\n{}", report(&hung)))?;
    let took = sent.elapsed();
    println!("node-a's agent exited {took:.1?} after SIGTERM: {st}");
    ensure!(
        st.success(),
        "node-a's agent exited with {st} after SIGTERM\n{}",
        report(&hung)
    );
    ensure!(
        !ov.agent_running(a) && lab.pid(&agent_a).is_none(),
        "node-a's agent is still running after it exited"
    );

    hung.stop();
    Ok(())
}
