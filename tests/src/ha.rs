//! A highly available Twill overlay in a lab (issue 14): three controller hosts
//! (`ctl-0`, `ctl-1`, `ctl-2`), each running one etcd member and one `twill-controller
//! --store etcd`, and node hosts whose agents are given all three controller URLs.
//!
//! Everything stays inside the lab's namespaces: etcd members listen on their hosts'
//! underlay addresses ([`EtcdCluster::start_in_lab`]), `etcdctl` and the test's own
//! gRPC calls run inside lab hosts.
//!
//! * who leads: [`HaOverlay::role`] (`/readyz`: `ready (leader)` / `ready
//!   (follower)`), [`HaOverlay::wait_leader`], [`HaOverlay::wait_leader_among`] (polls
//!   every [`FAILOVER_POLL`], for failover timings), `twill_is_leader`
//!   ([`HaOverlay::is_leader_metric`]);
//! * replicas by their own pid: [`HaOverlay::kill_replica`] (SIGKILL, reaped, gone
//!   from `/proc`), [`HaOverlay::restart_replica`], [`HaOverlay::wait_ready`];
//! * which replica each agent watches: [`HaOverlay::watchers`] (AdminService.Status
//!   with `this_replica_only`, asked of each replica), [`HaOverlay::wait_watching`],
//!   and how often an agent's log says it opened its watch ([`HaOverlay::watch_opens`]);
//! * the lease table: from etcd ([`HaOverlay::etcd_leases`]) and from any replica
//!   ([`HaOverlay::list_leases`]).
//!
//! The node-side helpers (convergence, kernel state, agents) are the [`Overlay`]'s:
//! [`HaOverlay::overlay`]. Its single-controller helpers (`controller_url`,
//! `twillctl`, `kill_controller`, ...) do not apply: there is no `controller` host.
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use twill_tests::ha::HaOverlay;
//! use twill_tests::{require_etcd, require_lab, OverlayConfig};
//!
//! if !require_etcd("example") {
//!     return;
//! }
//! let Some(ha) = require_lab("example", HaOverlay::start(OverlayConfig::three_nodes())) else {
//!     return;
//! };
//! ha.overlay().wait_converged(Duration::from_secs(60)).unwrap();
//! let leader = ha.wait_leader(Duration::from_secs(30)).unwrap();
//! let t0 = Instant::now();
//! ha.kill_replica(leader).unwrap(); // SIGKILL to the controller's own pid
//! let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
//! let new = ha.wait_leader_among(&others, Duration::from_secs(10)).unwrap();
//! println!("replica {new} leads {:?} after the kill", t0.elapsed());
//! ha.restart_replica(leader).unwrap();
//! ha.wait_ready(leader, Duration::from_secs(30)).unwrap(); // a follower now
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::{
    Lease, ListLeasesRequest, ListPodsRequest, PodAttachment, StatusRequest, StatusResponse,
};

use crate::bins::Bins;
use crate::etcd::EtcdCluster;
use crate::kit::HttpResponse;
use crate::lab::{Lab, LabConfig, LabError};
use crate::overlay::{Overlay, OverlayConfig, ADMIN_USER, CONTROLLER_METRICS_PORT, GRPC_PORT};
use crate::wait::{poll_until, wait_until, Check};

/// How many controller replicas (and etcd members) an [`HaOverlay`] runs.
pub const REPLICAS: usize = 3;
/// The controllers' `--etcd-prefix`.
pub const ETCD_PREFIX: &str = "/twill/";
/// How often [`HaOverlay::wait_leader_among`] looks: the resolution of a failover
/// timing.
pub const FAILOVER_POLL: Duration = Duration::from_millis(25);
/// How long a replica may take to be ready after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The test's own gRPC calls: connecting, and the whole call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// What the agent logs each time it has opened its lease watch.
const WATCH_OPENED: &str = "watching leases";

/// The lab host of replica `i` (`ctl-<i>`).
pub fn replica_host(i: usize) -> String {
    format!("ctl-{i}")
}

/// The lab process name of replica `i`'s controller (`controller-<i>`).
pub fn replica_proc(i: usize) -> String {
    format!("controller-{i}")
}

/// What a ready replica says it is on `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `ready (leader)`: the one replica whose lease writer runs.
    Leader,
    /// `ready (follower)`.
    Follower,
}

/// A running HA overlay. Dropping it stops the controllers and agents (SIGTERM, so a
/// leader resigns), then kills the etcd members with the lab's namespaces; when a test
/// panicked, every host's state and every log's tail (etcd's too) are printed first.
pub struct HaOverlay {
    // first: the lab stops the controllers while etcd still runs
    ov: Overlay,
    etcd: EtcdCluster,
    urls: Vec<String>,
}

impl HaOverlay {
    /// Builds a lab of [`REPLICAS`] controller hosts plus one host per node, makes the
    /// certificates (one controller certificate naming every replica's address),
    /// starts etcd (one member per controller host), starts every controller and waits
    /// until each is ready and one leads, then starts the agents (unless told not to),
    /// each with every replica's URL. Does not wait for the agents.
    ///
    /// Of `cfg` it uses the nodes, net-conf.json, extra controller and agent flags,
    /// `start_agents`, the MTU and `verbose`; bootstrap tokens are not supported.
    pub fn start(cfg: OverlayConfig) -> Result<HaOverlay, LabError> {
        let ctl_hosts: Vec<String> = (0..REPLICAS).map(replica_host).collect();
        if let Some(n) = cfg.nodes.iter().find(|n| ctl_hosts.contains(n)) {
            return Err(anyhow::anyhow!("a node may not be named {n} (a controller host)").into());
        }
        if cfg.bootstrap {
            return Err(anyhow::anyhow!("HaOverlay does not support bootstrap tokens").into());
        }
        let mut hosts = ctl_hosts.clone();
        hosts.extend(cfg.nodes.iter().cloned());
        let lab = Lab::new(LabConfig::new(hosts).mtu(cfg.mtu).verbose(cfg.verbose))?;
        let bins = Bins::locate()?;
        let ips: Vec<IpAddr> = ctl_hosts.iter().map(|h| lab.host(h).addr()).collect();
        let urls: Vec<String> = ips
            .iter()
            .map(|ip| format!("https://{ip}:{GRPC_PORT}"))
            .collect();
        let ov = Overlay::on_lab(lab, bins, &cfg, urls.clone());
        let failed = |ov: &Overlay, e: anyhow::Error| {
            eprintln!("twill lab: starting the HA overlay failed: {e:#}");
            ov.lab().dump();
            LabError::Failed(e)
        };
        if let Err(e) = ov.make_certs(&ips, true) {
            return Err(failed(&ov, e));
        }
        let refs: Vec<&str> = ctl_hosts.iter().map(String::as_str).collect();
        let election = cfg
            .etcd_election_timeout
            .unwrap_or(crate::etcd::DEFAULT_ELECTION_TIMEOUT);
        let etcd = match EtcdCluster::start_in_lab(ov.lab(), &refs, election) {
            Ok(etcd) => etcd,
            Err(e) => return Err(failed(&ov, e.context("starting etcd in the lab"))),
        };
        let ha = HaOverlay { ov, etcd, urls };
        match ha.bring_up(&cfg) {
            Ok(()) => Ok(ha),
            Err(e) => {
                let e = failed(&ha.ov, e);
                eprintln!("{}", ha.etcd.log_tails());
                Err(e)
            }
        }
    }

    fn bring_up(&self, cfg: &OverlayConfig) -> Result<()> {
        for i in 0..REPLICAS {
            let host = self.lab().host(&replica_host(i));
            let net_conf = host.dir.join("net-conf.json");
            std::fs::write(&net_conf, &cfg.net_conf)
                .with_context(|| format!("cannot write {}", net_conf.display()))?;
            let certs = self.ov.certs_dir();
            let c = |f: &str| certs.join(f).display().to_string();
            let p = |f: &Path| f.display().to_string();
            let mut args: Vec<String> = [
                "--store",
                "etcd",
                "--etcd-endpoints",
                &self.etcd.endpoints_csv(),
                "--etcd-cert",
                &p(self.etcd.client_cert()),
                "--etcd-key",
                &p(self.etcd.client_key()),
                "--etcd-ca",
                &p(self.etcd.ca()),
                "--etcd-prefix",
                ETCD_PREFIX,
                "--advertise-url",
                &self.urls[i],
                "--listen",
                &format!("{}:{GRPC_PORT}", host.ip),
                "--metrics-addr",
                &self.metrics_addr(i).to_string(),
                "--data-dir",
                &p(&host.dir.join("data")),
                "--net-conf",
                &p(&net_conf),
                "--networks-dir",
                &p(&host.dir.join("networks")),
                "--tls-cert",
                &c("controller.crt"),
                "--tls-key",
                &c("controller.key"),
                "--tls-client-ca",
                &c("ca.crt"),
            ]
            .map(String::from)
            .into();
            args.extend(cfg.controller_args.iter().cloned());
            self.lab().spawn(
                &replica_host(i),
                &replica_proc(i),
                &self.ov.bins().controller(),
                args,
            )?;
        }
        for i in 0..REPLICAS {
            self.wait_ready(i, READY_TIMEOUT)?;
        }
        self.wait_leader(READY_TIMEOUT)?;
        if cfg.start_agents {
            for n in self.ov.nodes() {
                self.ov.start_agent(n)?;
            }
        }
        Ok(())
    }

    /// The overlay: nodes, agents, convergence and kernel-state helpers.
    pub fn overlay(&self) -> &Overlay {
        &self.ov
    }

    pub fn lab(&self) -> &Lab {
        self.ov.lab()
    }

    /// The etcd cluster (one member per controller host, member `i` on `ctl-<i>`).
    pub fn etcd(&self) -> &EtcdCluster {
        &self.etcd
    }

    /// Every replica's URL (`https://<ctl-i address>:8474`), in replica order: what
    /// the agents get as `--controller`.
    pub fn replica_urls(&self) -> &[String] {
        &self.urls
    }

    /// The index of the replica advertising `url`.
    pub fn replica_of_url(&self, url: &str) -> Option<usize> {
        self.urls.iter().position(|u| u == url)
    }

    /// Replica `i`'s HTTP address (`/healthz`, `/readyz`, `/metrics`).
    pub fn metrics_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(
            self.lab().host(&replica_host(i)).ip.into(),
            CONTROLLER_METRICS_PORT,
        )
    }

    /// Whether replica `i`'s controller process runs.
    pub fn replica_running(&self, i: usize) -> bool {
        self.lab().is_running(&replica_proc(i))
    }

    /// Replica `i`'s controller pid, while it runs.
    pub fn replica_pid(&self, i: usize) -> Option<u32> {
        self.lab().pid(&replica_proc(i))
    }

    /// `GET /readyz` of replica `i`, from its own host.
    pub fn readyz(&self, i: usize) -> Result<HttpResponse> {
        self.lab()
            .http_get(&replica_host(i), self.metrics_addr(i), "/readyz")
    }

    /// What replica `i` says it is on `/readyz`; `Err` when it is not ready or does
    /// not answer.
    pub fn role(&self, i: usize) -> Result<Role> {
        let r = self.readyz(i)?;
        let body = r.body.trim();
        match (r.status, body) {
            (200, "ready (leader)") => Ok(Role::Leader),
            (200, "ready (follower)") => Ok(Role::Follower),
            _ => bail!("replica {i}: /readyz says HTTP {}: {body}", r.status),
        }
    }

    /// Whether replica `i`'s `twill_is_leader` gauge is 1.
    pub fn is_leader_metric(&self, i: usize) -> Result<bool> {
        let r = self
            .lab()
            .http_get(&replica_host(i), self.metrics_addr(i), "/metrics")?;
        ensure!(
            r.status == 200,
            "replica {i}: /metrics says HTTP {}",
            r.status
        );
        let line = r
            .body
            .lines()
            .find(|l| l.starts_with("twill_is_leader "))
            .with_context(|| format!("replica {i}: no twill_is_leader in /metrics"))?;
        match line.split_whitespace().nth(1) {
            Some("1") => Ok(true),
            Some("0") => Ok(false),
            _ => bail!("replica {i}: cannot read {line:?}"),
        }
    }

    fn gone(&self, i: usize) -> Option<String> {
        self.ov.process_gone(&replica_proc(i))
    }

    /// Waits until replica `i` is ready; its role. Gives up at once if it exits.
    pub fn wait_ready(&self, i: usize, timeout: Duration) -> Result<Role> {
        wait_until(timeout, &format!("replica {i} to be ready"), || {
            if let Some(why) = self.gone(i) {
                return Check::Fatal(why);
            }
            match self.role(i) {
                Ok(r) => Check::Ready(r),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        })
    }

    /// One look: the replica that leads when every running one is ready and exactly
    /// one of them leads. Two leaders at once is fatal (split brain).
    pub fn leader_check(&self) -> Check<usize> {
        let mut leaders = Vec::new();
        let mut unready = Vec::new();
        for i in 0..REPLICAS {
            if !self.replica_running(i) {
                continue;
            }
            match self.role(i) {
                Ok(Role::Leader) => leaders.push(i),
                Ok(Role::Follower) => {}
                Err(e) => unready.push(format!("{e:#}")),
            }
        }
        match (leaders.as_slice(), unready.is_empty()) {
            ([l], true) => Check::Ready(*l),
            ([_, _, ..], _) => Check::Fatal(format!(
                "replicas {leaders:?} all report ready (leader) at once"
            )),
            ([], _) => Check::NotYet(format!("no replica leads; {}", unready.join("; "))),
            (_, false) => Check::NotYet(unready.join("; ")),
        }
    }

    /// Waits until every running replica is ready and exactly one leads; its index.
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        wait_until(
            timeout,
            "every running replica to be ready and one to lead",
            || self.leader_check(),
        )
    }

    /// Polls `candidates` every [`FAILOVER_POLL`] until one reports `ready (leader)`;
    /// its index. For timing a failover: call it right after the kill.
    pub fn wait_leader_among(&self, candidates: &[usize], timeout: Duration) -> Result<usize> {
        poll_until(
            timeout,
            FAILOVER_POLL,
            &format!("one of replicas {candidates:?} to report ready (leader)"),
            || {
                let mut seen = Vec::new();
                for &i in candidates {
                    match self.role(i) {
                        Ok(Role::Leader) => return Check::Ready(i),
                        Ok(Role::Follower) => seen.push(format!("{i}: follower")),
                        Err(e) => seen.push(format!("{i}: {e:#}")),
                    }
                }
                Check::NotYet(seen.join("; "))
            },
        )
    }

    /// SIGKILLs replica `i`'s controller by its own pid (checked to be the
    /// controller's, not a wrapper's), reaps it and checks it is gone from `/proc`;
    /// the pid it had.
    pub fn kill_replica(&self, i: usize) -> Result<u32> {
        let name = replica_proc(i);
        let pid = self
            .replica_pid(i)
            .with_context(|| format!("replica {i} is not running"))?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .with_context(|| format!("replica {i}: pid {pid} is gone already"))?;
        // the kernel keeps 15 characters of the name: "twill-controlle"
        ensure!(
            "twill-controller".starts_with(comm.trim()),
            "replica {i}: pid {pid} is {:?}, not twill-controller",
            comm.trim()
        );
        let st = self.lab().kill(&name)?;
        ensure!(
            st.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32),
            "replica {i} (pid {pid}) ended with {st}, not by SIGKILL"
        );
        ensure!(!self.replica_running(i), "replica {i} still runs");
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "replica {i}: pid {pid} is still in /proc after SIGKILL and reaping"
        );
        Ok(pid)
    }

    /// Starts killed replica `i` again with the same flags (does not wait: see
    /// [`HaOverlay::wait_ready`]).
    pub fn restart_replica(&self, i: usize) -> Result<()> {
        self.lab().restart(&replica_proc(i))
    }

    // ------------------------------------------------------------- admin gRPC

    /// Runs the future `make` builds on a current-thread runtime on a thread inside
    /// replica `i`'s host (its sockets live there).
    fn block_on_at<T: Send, F: Future<Output = Result<T>>>(
        &self,
        i: usize,
        make: impl FnOnce() -> F + Send,
    ) -> Result<T> {
        self.lab().in_netns(&replica_host(i), || -> Result<T> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build a tokio runtime")?;
            rt.block_on(make())
        })?
    }

    /// An admin client (the lab's admin certificate) of replica `i`.
    async fn admin(url: String, pems: [Vec<u8>; 3]) -> Result<AdminServiceClient<Channel>> {
        let [ca, cert, key] = pems;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad URL {url}"))?
            .tls_config(tls)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        Ok(AdminServiceClient::new(channel))
    }

    fn admin_pems(&self) -> Result<[Vec<u8>; 3]> {
        let read = |f: String| {
            let p = self.ov.certs_dir().join(f);
            std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok([
            read("ca.crt".into())?,
            read(format!("admin-{ADMIN_USER}.crt"))?,
            read(format!("admin-{ADMIN_USER}.key"))?,
        ])
    }

    /// AdminService.Status of replica `i`: with `this_replica_only`, only the watch
    /// streams open on it (and no replica list).
    pub fn status(&self, i: usize, this_replica_only: bool) -> Result<StatusResponse> {
        let req = StatusRequest {
            this_replica_only,
            ..Default::default()
        };
        self.ask(i, "Status", |mut c| async move { c.status(req).await })
    }

    /// The lease table as replica `i` serves it (AdminService.ListLeases).
    pub fn list_leases(&self, i: usize) -> Result<Vec<Lease>> {
        let req = ListLeasesRequest::default();
        Ok(self
            .ask(
                i,
                "ListLeases",
                |mut c| async move { c.list_leases(req).await },
            )?
            .leases)
    }

    /// Every node's pods as replica `i` serves them (AdminService.ListPods, answered by
    /// the leader).
    pub fn list_pods(&self, i: usize) -> Result<Vec<PodAttachment>> {
        let req = ListPodsRequest::default();
        Ok(self
            .ask(i, "ListPods", |mut c| async move { c.list_pods(req).await })?
            .pods)
    }

    /// One admin call `what` to replica `i`, made by `call` with the lab's admin
    /// certificate.
    fn ask<T: Send, F>(
        &self,
        i: usize,
        what: &str,
        call: impl FnOnce(AdminServiceClient<Channel>) -> F + Send,
    ) -> Result<T>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (url, pems) = (self.urls[i].clone(), self.admin_pems()?);
        self.block_on_at(i, || async move {
            let c = Self::admin(url.clone(), pems).await?;
            Ok(call(c)
                .await
                .with_context(|| format!("{what} of {url}"))?
                .into_inner())
        })
        .with_context(|| format!("asking replica {i}"))
    }

    /// The names of the agents whose watch is open on replica `i`.
    pub fn watchers(&self, i: usize) -> Result<Vec<String>> {
        let st = self.status(i, true)?;
        Ok(st.agents.into_iter().map(|a| a.name).collect())
    }

    /// One look: `nodes` each watching exactly one of `replicas` (asked each in turn);
    /// which.
    pub fn watching_check(
        &self,
        nodes: &[&str],
        replicas: &[usize],
    ) -> Check<BTreeMap<String, usize>> {
        let mut on: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in replicas {
            match self.watchers(i) {
                Ok(names) => {
                    for n in names {
                        on.entry(n).or_default().push(i);
                    }
                }
                Err(e) => return Check::NotYet(format!("{e:#}")),
            }
        }
        let mut placed = BTreeMap::new();
        let mut wrong = Vec::new();
        for n in nodes {
            if let Some(why) = self.ov.process_gone(&Overlay::agent_proc(n)) {
                return Check::Fatal(why);
            }
            match on.get(*n).map(Vec::as_slice) {
                Some([i]) => {
                    placed.insert(n.to_string(), *i);
                }
                Some(several) => wrong.push(format!("{n} watches on replicas {several:?}")),
                None => wrong.push(format!("{n} watches on none of replicas {replicas:?}")),
            }
        }
        if wrong.is_empty() {
            Check::Ready(placed)
        } else {
            Check::NotYet(wrong.join("; "))
        }
    }

    /// Waits until each of `nodes` has its watch open on exactly one of `replicas`
    /// (as those replicas report it); node → replica.
    pub fn wait_watching(
        &self,
        nodes: &[&str],
        replicas: &[usize],
        timeout: Duration,
    ) -> Result<BTreeMap<String, usize>> {
        wait_until(
            timeout,
            &format!("{nodes:?} to watch on replicas {replicas:?}"),
            || self.watching_check(nodes, replicas),
        )
    }

    /// How many times `node`'s agent has logged that it opened its lease watch (once
    /// at start, once more each time it resumed it after the watch broke).
    pub fn watch_opens(&self, node: &str) -> usize {
        self.lab()
            .log(&Overlay::agent_proc(node))
            .matches(WATCH_OPENED)
            .count()
    }

    /// The leases stored in etcd (`etcdctl get --prefix /twill/lease/`, decoded), by
    /// node name.
    pub fn etcd_leases(&self) -> Result<BTreeMap<String, Lease>> {
        let prefix = format!("{ETCD_PREFIX}lease/");
        self.etcd
            .get_prefix(&prefix)?
            .into_iter()
            .map(|(k, v)| {
                let lease = Lease::decode(v.as_slice())
                    .with_context(|| format!("etcd key {k} does not hold a Lease"))?;
                let node = k.strip_prefix(&prefix).unwrap_or(&k).to_string();
                ensure!(
                    node == lease.node_name,
                    "etcd key {k} holds the lease of {:?}",
                    lease.node_name
                );
                Ok((node, lease))
            })
            .collect()
    }
}
