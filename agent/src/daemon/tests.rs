//! The daemon's loop against a fake controller (an in-process gRPC server over an
//! in-memory connection) and an in-memory data plane: no root, no network. The fake
//! answers as each test scripts it and records what the agent asked.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};
use twill_agent::client::Dial;
use twill_agent::dataplane::{
    DataPlane, DataPlaneError, Device, Family, KernelState, Route, Underlay, VxlanSpec,
};
use twill_agent::identity::rotation::Credentials;
use twill_agent::identity::CertCheck;
use twill_common::model::Mac;
use twill_proto::agent_service_server::{AgentService, AgentServiceServer};
use twill_proto::identity_service_server::{IdentityService, IdentityServiceServer};
use twill_proto::lease_event::Type as EventType;
use twill_proto::{
    AcquireRequest, AcquireResponse, BootstrapRequest, BootstrapResponse, GetNetworkConfigRequest,
    Lease, LeaseEvent, ListNetworksRequest, ListNetworksResponse, NetworkConfig, ReleaseRequest,
    ReleaseResponse, RenewRequest, ReportAttachmentsRequest, ReportAttachmentsResponse,
    WatchRequest, WatchResponse,
};

use super::*;

const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;
/// How long a test waits for what it expects (a slow machine only makes it wait).
const PATIENCE: Duration = Duration::from_secs(20);

/// What the fake controller answers an Acquire with.
enum Answer {
    Grant {
        ttl_seconds: u64,
    },
    Refuse(Status),
    /// Never answers (a controller that hangs).
    Hang,
}

#[derive(Default)]
struct Script {
    /// Answers to the next Acquires; a grant of 60 s once they are used up.
    acquires: VecDeque<Answer>,
    /// Each watch stream opened: the messages it carries, then its end. Once they are
    /// used up, a stream stays open and silent.
    watches: VecDeque<Vec<WatchResponse>>,
    /// The networks served besides `default` (which is always served, with
    /// `NET_CONF`), by name.
    networks: BTreeMap<String, Served>,
}

/// A network the fake serves besides `default`.
#[derive(Clone)]
struct Served {
    /// Its net-conf.json.
    json: String,
    /// The first two octets of its pod network (`10.10`: 10.10.0.0/16).
    prefix: &'static str,
    /// Whether its "Nodes" admit node-a.
    admits: bool,
}

/// A VXLAN network of VNI `vni` on `<prefix>.0.0/16` that admits node-a.
fn served(prefix: &'static str, vni: u32) -> Served {
    Served {
        json: format!(
            r#"{{"Network": "{prefix}.0.0/16", "Backend": {{"Type": "vxlan", "VNI": {vni}}}}}"#
        ),
        prefix,
        admits: true,
    }
}

#[derive(Default)]
struct Seen {
    acquires: Vec<AcquireRequest>,
    watches: Vec<WatchRequest>,
    configs: Vec<GetNetworkConfigRequest>,
    releases: Vec<ReleaseRequest>,
    /// ListNetworks calls answered.
    lists: usize,
    /// Renewals of the node certificate answered.
    renewals: usize,
    /// The client certificate (PEM) of each channel the agent made to this controller.
    dialled: Vec<Vec<u8>>,
    /// Pod reports taken.
    reports: Vec<ReportAttachmentsRequest>,
}

/// The sending end of a watch stream.
type Stream = mpsc::Sender<Result<WatchResponse, Status>>;

#[derive(Clone, Default)]
struct FakeController {
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Seen>>,
    /// Open silent streams, kept so that they stay open.
    parked: Arc<Mutex<Vec<Stream>>>,
    /// Whether it is down: every call fails as an unreachable controller's would.
    down: Arc<Mutex<bool>>,
    /// The CA that signs renewed node certificates (the one `pki` made).
    ca: Arc<Mutex<Option<Arc<twill_pki::Ca>>>>,
}

fn lease(node: &str, n: u8, revision: u64) -> Lease {
    Lease {
        node_name: node.into(),
        subnet: format!("10.244.{n}.0/24"),
        public_ip: format!("192.0.2.{n}"),
        backend_type: "vxlan".into(),
        vtep_mac: format!("0a:58:0a:f4:{n:02x}:00"),
        revision,
        vni: 1,
        expires_at_unix: now_unix() + 3600,
        ..Default::default()
    }
}

/// `lease(node, n, revision)` in network `network` (the wire name) on `<prefix>.0.0/16`
/// with VNI `vni`; its VTEP MAC differs from the same node's in other networks.
fn lease_in(network: &str, prefix: &str, vni: u32, node: &str, n: u8, revision: u64) -> Lease {
    Lease {
        network: network.into(),
        subnet: format!("{prefix}.{n}.0/24"),
        vtep_mac: format!("0a:58:0a:{vni:02x}:{n:02x}:00"),
        vni,
        ..lease(node, n, revision)
    }
}

impl FakeController {
    /// The network `wire` names as served, or how the controller refuses it: unknown
    /// (NOT_FOUND) or, when `joining`, not admitting node-a (PERMISSION_DENIED).
    /// `None` is `default`.
    fn network(&self, wire: &str, joining: bool) -> Result<Option<Served>, Status> {
        if wire.is_empty() || wire == "default" {
            return Ok(None);
        }
        match self.script.lock().networks.get(wire) {
            None => Err(Status::not_found(format!("network {wire} is not served"))),
            Some(n) if joining && !n.admits => Err(Status::permission_denied(format!(
                "network {wire} does not admit node node-a (its \"Nodes\": [\"gpu-*\"])"
            ))),
            Some(n) => Ok(Some(n.clone())),
        }
    }

    /// Takes the controller down: its open watches end and every call fails as if
    /// nothing answered.
    fn go_down(&self) {
        *self.down.lock() = true;
        self.parked.lock().clear();
    }

    /// A call to a controller that is down fails.
    fn answering(&self) -> Result<(), Status> {
        if *self.down.lock() {
            return Err(Status::unavailable("connection refused"));
        }
        Ok(())
    }

    /// Sends `msg` on the watch stream opened last (and left open).
    fn send(&self, msg: WatchResponse) {
        let parked = self.parked.lock();
        parked
            .last()
            .expect("an open watch")
            .try_send(Ok(msg))
            .expect("room on the stream");
    }

    /// Ends the open watch with `status`, the controller staying up.
    fn end_watch(&self, status: Status) {
        let stream = self.parked.lock().pop().expect("an open watch");
        stream.try_send(Err(status)).expect("room on the stream");
    }
}

#[tonic::async_trait]
impl AgentService for FakeController {
    async fn get_network_config(
        &self,
        req: Request<GetNetworkConfigRequest>,
    ) -> Result<Response<NetworkConfig>, Status> {
        self.answering()?;
        let req = req.into_inner();
        self.seen.lock().configs.push(req.clone());
        // A network's configuration is the same for every node: only joining it
        // (Acquire) asks whether it admits the node.
        let (name, json) = match self.network(&req.network, false)? {
            None => ("default".to_string(), NET_CONF.to_string()),
            Some(n) => (req.network, n.json),
        };
        Ok(Response::new(NetworkConfig {
            net_conf_json: json,
            name,
        }))
    }

    async fn list_networks(
        &self,
        _: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        self.answering()?;
        let mut networks = vec![NetworkConfig {
            net_conf_json: NET_CONF.into(),
            name: "default".into(),
        }];
        for (name, n) in &self.script.lock().networks {
            if n.admits {
                networks.push(NetworkConfig {
                    net_conf_json: n.json.clone(),
                    name: name.clone(),
                });
            }
        }
        self.seen.lock().lists += 1;
        Ok(Response::new(ListNetworksResponse { networks }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        self.answering()?;
        let req = req.into_inner();
        self.seen.lock().acquires.push(req.clone());
        let network = self
            .network(&req.network, true)
            .map_err(|s| match s.code() {
                // A network whose file was removed: its leases run out.
                tonic::Code::NotFound => Status::failed_precondition(format!(
                    "network {} is retired: no new leases or renewals",
                    req.network
                )),
                _ => s,
            })?;
        let granted = match &network {
            None => lease(&req.node_name, 1, 1),
            Some(n) => lease_in(
                &req.network,
                n.prefix,
                vni_of(&n.json),
                &req.node_name,
                1,
                1,
            ),
        };
        let answer = self.script.lock().acquires.pop_front();
        match answer.unwrap_or(Answer::Grant { ttl_seconds: 60 }) {
            Answer::Grant { ttl_seconds } => Ok(Response::new(AcquireResponse {
                lease: Some(Lease {
                    public_ip: req.public_ip,
                    vtep_mac: req.vtep_mac,
                    ..granted
                }),
                ttl_seconds,
            })),
            Answer::Refuse(s) => Err(s),
            Answer::Hang => std::future::pending().await,
        }
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        self.answering()?;
        self.seen.lock().releases.push(req.into_inner());
        Ok(Response::new(ReleaseResponse::default()))
    }

    async fn report_attachments(
        &self,
        req: Request<ReportAttachmentsRequest>,
    ) -> Result<Response<ReportAttachmentsResponse>, Status> {
        self.answering()?;
        self.seen.lock().reports.push(req.into_inner());
        Ok(Response::new(ReportAttachmentsResponse::default()))
    }

    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.answering()?;
        self.seen.lock().watches.push(req.into_inner());
        let (tx, rx) = mpsc::channel(16);
        match self.script.lock().watches.pop_front() {
            Some(messages) => {
                for m in messages {
                    tx.try_send(Ok(m)).expect("room for the script");
                }
            }
            None => self.parked.lock().push(tx),
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl IdentityService for FakeController {
    async fn bootstrap(
        &self,
        _: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        Err(Status::unimplemented("the fake renews only"))
    }

    /// Signs the request's key for an hour, as the controller does for a node that
    /// presents its current certificate.
    async fn renew(
        &self,
        req: Request<RenewRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        self.answering()?;
        let csr = twill_pki::parse_node_csr(&req.into_inner().csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let validity = twill_pki::Validity::lasting(Duration::from_secs(3600));
        let ca = self.ca.lock().clone().expect("a CA");
        let signed = ca
            .sign_node(&csr, validity)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.seen.lock().renewals += 1;
        Ok(Response::new(BootstrapResponse {
            certificate_chain_pem: signed.cert_pem,
            not_after_unix: 0,
        }))
    }
}

/// A channel to `fake` over in-memory connections (a new one each time the channel
/// connects).
fn connect(fake: FakeController) -> Channel {
    let (conns_tx, conns_rx) = mpsc::unbounded_channel();
    tokio::spawn(
        Server::builder()
            .add_service(AgentServiceServer::new(fake.clone()))
            .add_service(IdentityServiceServer::new(fake))
            .serve_with_incoming(
                UnboundedReceiverStream::new(conns_rx).map(Ok::<_, std::io::Error>),
            ),
    );
    Endpoint::from_static("http://fake-controller").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let (client, server) = tokio::io::duplex(64 << 10);
            let sent = conns_tx.send(server);
            async move {
                sent.map_err(|_| std::io::Error::other("the fake controller is gone"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        },
    ))
}

fn vni_of(json: &str) -> u32 {
    NetConf::parse(json).expect("net-conf").backend.vni
}

/// The kernel as the agent would leave it, in memory; a clone shares it (the agent
/// holds one, the test reads another).
#[derive(Clone, Default)]
struct MemoryKernel {
    /// Every entry, as `ip neigh`, `bridge fdb` and `ip route` list them.
    state: Arc<Mutex<KernelState>>,
    /// The VXLAN devices by name: `flannel.<VNI>` is index 6 + VNI.
    devices: Arc<Mutex<BTreeMap<String, Device>>>,
    /// Each device's neighbours and FDB entries, by device index.
    on_device: Arc<Mutex<BTreeMap<u32, KernelState>>>,
    /// The pod networks kept apart, as last told (`DataPlane::isolate`).
    isolated: Arc<Mutex<Vec<PerFamily<IpNet>>>>,
}

impl MemoryKernel {
    /// The device named `name`.
    fn device(&self, name: &str) -> Option<Device> {
        self.devices.lock().get(name).copied()
    }

    /// The neighbours and FDB entries on device `name`.
    fn on(&self, name: &str) -> KernelState {
        let Some(dev) = self.device(name) else {
            return KernelState::default();
        };
        self.on_device
            .lock()
            .get(&dev.index)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl DataPlane for MemoryKernel {
    async fn ensure_device(&self, spec: &VxlanSpec) -> Result<Device, DataPlaneError> {
        let mut devices = self.devices.lock();
        let dev = devices.entry(spec.name.clone()).or_insert_with(|| Device {
            index: 6 + spec.vni,
            mac: format!("0a:58:0a:f4:{:02x}:00", spec.vni)
                .parse()
                .expect("a MAC"),
        });
        Ok(*dev)
    }
    async fn set_tx_checksum_offload(&self, _: &str, _: bool) -> Result<(), DataPlaneError> {
        Ok(())
    }
    async fn delete_device(&self, name: &str) -> Result<(), DataPlaneError> {
        let Some(dev) = self.devices.lock().remove(name) else {
            return Ok(());
        };
        let gone = self.on_device.lock().remove(&dev.index).unwrap_or_default();
        let mut k = self.state.lock();
        k.neighbours
            .retain(|ip, _| !gone.neighbours.contains_key(ip));
        k.fdb.retain(|mac, _| !gone.fdb.contains_key(mac));
        k.routes.retain(|_, r| r.oif != dev.index);
        Ok(())
    }
    async fn ensure_address(&self, _: &Device, _: IpAddr) -> Result<(), DataPlaneError> {
        Ok(())
    }
    async fn read_state(
        &self,
        dev: Option<&Device>,
        family: Family,
    ) -> Result<KernelState, DataPlaneError> {
        let mut have = dev
            .and_then(|d| self.on_device.lock().get(&d.index).cloned())
            .unwrap_or_default();
        have.neighbours.retain(|ip, _| Family::of(*ip) == family);
        have.fdb.retain(|_, dst| Family::of(*dst) == family);
        have.routes = self.state.lock().routes.clone();
        have.routes.retain(|dst, _| Family::of_net(*dst) == family);
        Ok(have)
    }
    async fn add_neighbour(
        &self,
        dev: &Device,
        ip: IpAddr,
        mac: Mac,
    ) -> Result<(), DataPlaneError> {
        self.state.lock().neighbours.insert(ip, mac);
        let mut on = self.on_device.lock();
        on.entry(dev.index).or_default().neighbours.insert(ip, mac);
        Ok(())
    }
    async fn del_neighbour(&self, dev: &Device, ip: IpAddr) -> Result<(), DataPlaneError> {
        self.state.lock().neighbours.remove(&ip);
        let mut on = self.on_device.lock();
        on.entry(dev.index).or_default().neighbours.remove(&ip);
        Ok(())
    }
    async fn add_fdb(&self, dev: &Device, mac: Mac, dst: IpAddr) -> Result<(), DataPlaneError> {
        self.state.lock().fdb.insert(mac, dst);
        let mut on = self.on_device.lock();
        on.entry(dev.index).or_default().fdb.insert(mac, dst);
        Ok(())
    }
    async fn del_fdb(&self, dev: &Device, mac: Mac, _: IpAddr) -> Result<(), DataPlaneError> {
        self.state.lock().fdb.remove(&mac);
        let mut on = self.on_device.lock();
        on.entry(dev.index).or_default().fdb.remove(&mac);
        Ok(())
    }
    async fn add_route(&self, route: &Route) -> Result<(), DataPlaneError> {
        self.state.lock().routes.insert(route.dst, *route);
        Ok(())
    }
    async fn del_route(&self, route: &Route) -> Result<(), DataPlaneError> {
        self.state.lock().routes.remove(&route.dst);
        Ok(())
    }
    async fn isolate(&self, networks: &[PerFamily<IpNet>]) -> Result<(), DataPlaneError> {
        *self.isolated.lock() = networks.to_vec();
        Ok(())
    }
}

/// A node certificate lasting `lifetime`, its key and the CA in `dir`; the CA.
fn pki(dir: &std::path::Path, lifetime: Duration) -> ([PathBuf; 3], twill_pki::Ca) {
    let ca =
        twill_pki::new_ca(twill_pki::Validity::lasting(Duration::from_secs(3600))).expect("a CA");
    let signer = twill_pki::Ca::from_pem(&ca.cert_pem, &ca.key_pem).expect("the CA");
    let node = signer
        .issue(
            &twill_pki::Role::Node("node-a".into()),
            twill_pki::Validity::lasting(lifetime),
        )
        .expect("a node certificate");
    let files = [
        dir.join("node.crt"),
        dir.join("node.key"),
        dir.join("ca.crt"),
    ];
    for (f, pem) in files
        .iter()
        .zip([&node.cert_pem, &node.key_pem, &ca.cert_pem])
    {
        std::fs::write(f, pem).expect("write");
    }
    // The key is the agent's alone, as a rotation demands.
    std::fs::set_permissions(
        &files[1],
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    (files, signer)
}

/// An agent for node-a on `fake`, its files in `dir`, its kernel in memory.
async fn node_a(fake: &FakeController, dir: &std::path::Path) -> (Agent, MemoryKernel) {
    node_a_with(fake, dir, &[]).await
}

/// `node_a` with more flags.
async fn node_a_with(
    fake: &FakeController,
    dir: &std::path::Path,
    flags: &[&str],
) -> (Agent, MemoryKernel) {
    node_a_on(&[fake], dir, flags, Duration::from_secs(3600)).await
}

/// `node_a_with` on replicas `fakes` (at `https://127.0.0.<i + 1>:9`), its node
/// certificate lasting `lifetime` (the fakes renew it with the same CA).
async fn node_a_on(
    fakes: &[&FakeController],
    dir: &std::path::Path,
    flags: &[&str],
    lifetime: Duration,
) -> (Agent, MemoryKernel) {
    let ([cert, key, ca], signer) = pki(dir, lifetime);
    let urls: Vec<String> = (1..=fakes.len())
        .map(|i| format!("https://127.0.0.{i}:9"))
        .collect();
    let signer = Arc::new(signer);
    for fake in fakes {
        *fake.ca.lock() = Some(signer.clone());
    }
    let by_url: BTreeMap<String, FakeController> = urls
        .iter()
        .cloned()
        .zip(fakes.iter().map(|f| (*f).clone()))
        .collect();
    let dial = Dial::with(move |url, pem| {
        let fake = by_url[url].clone();
        fake.seen.lock().dialled.push(pem.cert.clone());
        Ok(connect(fake))
    });
    let subnet_file = dir.join("subnet.env");
    let subnet_dir = dir.join("networks");
    let mut argv = vec![
        "twill-agent".to_string(),
        "--controller".into(),
        urls.join(","),
        "--node-name".into(),
        "node-a".into(),
        "--tls-cert".into(),
        cert.to_str().expect("utf-8").into(),
        "--tls-key".into(),
        key.to_str().expect("utf-8").into(),
        "--tls-ca".into(),
        ca.to_str().expect("utf-8").into(),
        "--subnet-file".into(),
        subnet_file.to_str().expect("utf-8").into(),
        "--subnet-dir".into(),
        subnet_dir.to_str().expect("utf-8").into(),
        "--reconcile-interval".into(),
        "1s".into(),
    ];
    argv.extend(flags.iter().map(|f| f.to_string()));
    let args = Args::try_parse_from(argv).expect("flags");
    let files = TlsFiles {
        cert: &args.tls_cert,
        key: &args.tls_key,
        ca: &args.tls_ca,
    };
    let (creds, channel) =
        Credentials::load(&args.controller, "node-a", &files, dial).expect("credentials");
    let memory = MemoryKernel::default();
    let underlay = Underlay {
        index: 2,
        name: "eth0".into(),
        addr: "192.0.2.1/24".parse().expect("a CIDR"),
        mtu: 1500,
    };
    let ip: IpAddr = "192.0.2.1".parse().expect("an address");
    let underlays = Underlays {
        found: PerFamily::new(Some((underlay, ip)), None),
        missing: PerFamily::new(None, Some("no IPv6 address on eth0".into())),
    };
    let stats = Arc::new(Stats::default());
    let kernel = Kernel::new(Box::new(memory.clone()), stats.clone());
    let agent = Agent {
        node: "node-a".into(),
        wanted: Wanted::new(&args.networks).expect("--networks"),
        args,
        underlays,
        api: client::agent_client(channel.clone()),
        channel,
        creds,
        stats,
        kernel,
        networks: BTreeMap::new(),
        shut_out: Default::default(),
        pods: PodView::new(Arc::new(Pods::open(&dir.join("attachments.json"))), None),
    };
    (agent, memory)
}

/// Runs the agent's loop until `stop` fires; its result.
fn run_loop(mut agent: Agent) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Result<()>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        tokio::pin!(shutdown);
        agent.main_loop(&mut shutdown).await
    });
    (stop, task)
}

/// Waits until `f` holds, polling.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what} after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peers_reset(revision: u64) -> Vec<WatchResponse> {
    let event = |n: u8| LeaseEvent {
        lease: Some(lease(&format!("node-{n}"), n, revision)),
        revision,
        ..Default::default()
    };
    vec![
        WatchResponse {
            reset: true,
            more: true,
            revision,
            events: vec![event(2)],
            ..Default::default()
        },
        WatchResponse {
            reset: false,
            more: false,
            revision,
            events: vec![event(3)],
            ..Default::default()
        },
    ]
}

#[tokio::test]
async fn the_lease_is_acquired_written_and_renewed_before_it_expires() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().acquires = VecDeque::from([
        Answer::Grant { ttl_seconds: 3 },
        Answer::Grant { ttl_seconds: 3 },
    ]);
    let (agent, _) = node_a(&fake, dir.path()).await;
    let (stop, task) = run_loop(agent);
    until("a renewal (the second Acquire)", || {
        fake.seen.lock().acquires.len() >= 2
    })
    .await;
    let env = std::fs::read_to_string(dir.path().join("subnet.env")).expect("subnet.env");
    assert!(env.contains("FLANNEL_SUBNET=10.244.1.1/24"), "{env}");
    let named = dir.path().join("networks").join("default.env");
    assert_eq!(std::fs::read_to_string(named).expect("default.env"), env);
    let renewed = fake.seen.lock().acquires[1].requested_subnet.clone();
    assert_eq!(renewed, "10.244.1.0/24", "the held subnet");
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}

#[tokio::test]
async fn a_refusal_is_retried_and_a_fatal_one_ends_the_loop_with_its_reason() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().acquires = VecDeque::from([
        Answer::Refuse(Status::unavailable("starting")),
        Answer::Refuse(Status::resource_exhausted("too fast")),
        Answer::Grant { ttl_seconds: 60 },
    ]);
    let (agent, _) = node_a(&fake, dir.path()).await;
    let (stop, task) = run_loop(agent);
    until("subnet.env after two refusals", || {
        dir.path().join("subnet.env").exists()
    })
    .await;
    assert_eq!(fake.seen.lock().acquires.len(), 3);
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");

    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().acquires =
        VecDeque::from([Answer::Refuse(Status::permission_denied("not yours"))]);
    let (agent, _) = node_a(&fake, dir.path()).await;
    let (_stop, task) = run_loop(agent);
    let e = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the loop ends by itself")
        .expect("joined")
        .expect_err("refused");
    assert!(e.to_string().contains("not yours"), "{e:#}");
}

#[tokio::test]
async fn a_reset_in_parts_programs_the_peers_and_a_broken_watch_resumes_from_its_revision() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().watches = VecDeque::from([peers_reset(5)]);
    let (agent, memory) = node_a(&fake, dir.path()).await;
    let (stop, task) = run_loop(agent);
    until("both peers' routes", || {
        memory.state.lock().routes.len() == 2
    })
    .await;
    {
        let k = memory.state.lock();
        assert_eq!(k.neighbours.len(), 2, "{k:?}");
        assert_eq!(k.fdb.len(), 2, "{k:?}");
    }
    // The scripted stream ended after its messages: the agent opens another, from
    // the revision it applied, and keeps the peers meanwhile.
    until("a second watch", || fake.seen.lock().watches.len() >= 2).await;
    let from: Vec<u64> = fake
        .seen
        .lock()
        .watches
        .iter()
        .map(|w| w.from_revision)
        .collect();
    assert_eq!(from[..2], [0, 5]);
    assert_eq!(memory.state.lock().routes.len(), 2, "no flap");
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
    assert_eq!(memory.state.lock().routes.len(), 2, "left in place at exit");
}

#[tokio::test]
async fn sigterm_during_a_call_the_controller_never_answers_ends_the_loop() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().acquires = VecDeque::from([Answer::Hang]);
    let (agent, _) = node_a(&fake, dir.path()).await;
    let (stop, task) = run_loop(agent);
    until("the Acquire in flight", || {
        !fake.seen.lock().acquires.is_empty()
    })
    .await;
    stop.send(()).expect("the loop runs");
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the loop ends while the call hangs")
        .expect("joined")
        .expect("a clean exit");
    assert!(!dir.path().join("subnet.env").exists());
}

/// A whole message at `revision` with these events.
fn message(reset: bool, revision: u64, events: Vec<(EventType, Lease)>) -> WatchResponse {
    WatchResponse {
        reset,
        revision,
        events: events
            .into_iter()
            .map(|(t, lease)| LeaseEvent {
                r#type: t as i32,
                lease: Some(lease),
                revision,
            })
            .collect(),
        ..Default::default()
    }
}

/// The route to `dst`, if programmed.
fn route(memory: &MemoryKernel, dst: &str) -> Option<Route> {
    let dst: IpNet = dst.parse().expect("a CIDR");
    memory.state.lock().routes.get(&dst).copied()
}

#[tokio::test]
async fn two_networks_get_two_leases_env_files_devices_and_their_own_peers() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script
        .lock()
        .networks
        .insert("blue".into(), served("10.10", 2));
    let (agent, memory) = node_a_with(&fake, dir.path(), &["--networks", "default,blue"]).await;
    let (stop, task) = run_loop(agent);
    until("a watch naming both networks", || {
        !fake.seen.lock().watches.is_empty()
    })
    .await;
    {
        let seen = fake.seen.lock();
        let mut asked: Vec<&str> = seen.acquires.iter().map(|a| a.network.as_str()).collect();
        asked.sort_unstable();
        assert_eq!(
            asked,
            ["", "blue"],
            "one lease per network, default unnamed"
        );
        let blue = seen
            .acquires
            .iter()
            .find(|a| a.network == "blue")
            .expect("blue");
        assert_eq!(blue.vtep_mac, "0a:58:0a:f4:02:00", "flannel.2's MAC");
        assert_eq!(seen.watches[0].networks, ["blue", "default"]);
        assert_eq!(seen.watches[0].from_revision, 0);
    }
    let default_env = std::fs::read_to_string(dir.path().join("subnet.env")).expect("subnet.env");
    assert!(
        default_env.contains("FLANNEL_SUBNET=10.244.1.1/24"),
        "{default_env}"
    );
    let blue_env = std::fs::read_to_string(dir.path().join("networks/blue.env")).expect("blue.env");
    assert!(
        blue_env.contains("FLANNEL_NETWORK=10.10.0.0/16"),
        "{blue_env}"
    );
    assert!(
        blue_env.contains("FLANNEL_SUBNET=10.10.1.1/24"),
        "{blue_env}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("networks/default.env")).expect("default.env"),
        default_env
    );
    let flannel1 = memory.device("flannel.1").expect("flannel.1");
    let flannel2 = memory.device("flannel.2").expect("flannel.2");
    let mut apart: Vec<String> = memory
        .isolated
        .lock()
        .iter()
        .flat_map(|n| n.values().map(ToString::to_string).collect::<Vec<_>>())
        .collect();
    apart.sort();
    assert_eq!(
        apart,
        ["10.10.0.0/16", "10.244.0.0/16"],
        "the two networks' pods are kept apart"
    );

    // node-b is in both networks, node-c in blue only.
    fake.send(message(
        true,
        9,
        vec![
            (EventType::Put, lease("node-a", 1, 2)),
            (EventType::Put, lease_in("blue", "10.10", 2, "node-a", 1, 3)),
            (EventType::Put, lease("node-b", 2, 4)),
            (EventType::Put, lease_in("blue", "10.10", 2, "node-b", 2, 5)),
            (EventType::Put, lease_in("blue", "10.10", 2, "node-c", 3, 6)),
            // A network node-a did not join: not programmed anywhere.
            (EventType::Put, lease_in("red", "10.20", 3, "node-d", 4, 7)),
        ],
    ));
    until("three peer routes", || {
        memory.state.lock().routes.len() == 3
    })
    .await;
    assert_eq!(
        route(&memory, "10.244.2.0/24").expect("default").oif,
        flannel1.index
    );
    for blue in ["10.10.2.0/24", "10.10.3.0/24"] {
        assert_eq!(
            route(&memory, blue).expect(blue).oif,
            flannel2.index,
            "{blue}"
        );
    }
    assert_eq!(memory.on("flannel.1").neighbours.len(), 1);
    assert_eq!(memory.on("flannel.2").neighbours.len(), 2);
    assert_eq!(memory.on("flannel.2").fdb.len(), 2);
    // Full reconciles (every second) of one network leave the other's routes alone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        memory.state.lock().routes.len(),
        3,
        "no network removed another's"
    );

    // A peer leaving blue leaves default as it was.
    fake.send(message(
        false,
        10,
        vec![(
            EventType::Delete,
            lease_in("blue", "10.10", 2, "node-b", 2, 10),
        )],
    ));
    until("node-b's blue route gone", || {
        route(&memory, "10.10.2.0/24").is_none()
    })
    .await;
    assert!(route(&memory, "10.244.2.0/24").is_some());
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}

#[tokio::test]
async fn every_network_is_followed_as_it_is_added_and_removed() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().networks.insert(
        "gpu".into(),
        Served {
            admits: false,
            ..served("10.30", 4)
        },
    );
    let (agent, memory) = node_a_with(&fake, dir.path(), &["--networks", "*"]).await;
    let (stop, task) = run_loop(agent);
    until("the watch", || !fake.seen.lock().watches.is_empty()).await;
    assert!(
        fake.seen.lock().watches[0].networks.is_empty(),
        "default only: no names"
    );
    assert!(
        memory.device("flannel.4").is_none(),
        "gpu does not admit node-a"
    );

    fake.script
        .lock()
        .networks
        .insert("blue".into(), served("10.10", 2));
    until("a watch reopened with blue", || {
        fake.seen.lock().watches.len() >= 2
    })
    .await;
    {
        let seen = fake.seen.lock();
        let w = seen.watches.last().expect("a watch");
        assert_eq!(
            (w.from_revision, w.networks.clone()),
            (0, vec!["blue".to_string(), "default".to_string()])
        );
    }
    assert!(dir.path().join("networks/blue.env").exists());
    fake.send(message(
        true,
        7,
        vec![
            (EventType::Put, lease("node-a", 1, 2)),
            (EventType::Put, lease_in("blue", "10.10", 2, "node-a", 1, 3)),
            (EventType::Put, lease_in("blue", "10.10", 2, "node-b", 2, 4)),
        ],
    ));
    let flannel2 = memory.device("flannel.2").expect("flannel.2");
    until("node-b's blue route", || {
        route(&memory, "10.10.2.0/24").is_some_and(|r| r.oif == flannel2.index)
    })
    .await;

    // blue's file is removed: it is no longer offered, and refuses renewals.
    fake.script.lock().networks.remove("blue");
    let lists = fake.seen.lock().lists;
    until("two more ListNetworks", || {
        fake.seen.lock().lists >= lists + 2
    })
    .await;
    assert!(
        memory.device("flannel.2").is_some(),
        "kept while the lease lasts"
    );
    let renewals = |fake: &FakeController| {
        let seen = fake.seen.lock();
        seen.acquires.iter().filter(|a| a.network == "blue").count()
    };
    let before = renewals(&fake);
    // The lease ends: its DELETE event takes the network down.
    fake.send(message(
        false,
        8,
        vec![(
            EventType::Delete,
            lease_in("blue", "10.10", 2, "node-a", 1, 8),
        )],
    ));
    until("blue left", || {
        memory.device("flannel.2").is_none() && memory.isolated.lock().len() < 2
    })
    .await;
    assert!(route(&memory, "10.10.2.0/24").is_none());
    assert!(!dir.path().join("networks/blue.env").exists());
    assert!(dir.path().join("networks/default.env").exists());
    assert!(dir.path().join("subnet.env").exists());
    assert!(memory.device("flannel.1").is_some());
    assert_eq!(
        renewals(&fake),
        before,
        "not renewed once no longer offered"
    );
    until("a watch reopened without blue", || {
        fake.seen
            .lock()
            .watches
            .last()
            .is_some_and(|w| w.networks.is_empty() && w.from_revision == 0)
    })
    .await;
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}

#[tokio::test]
async fn a_listed_network_that_is_unknown_or_refuses_the_node_ends_the_loop_naming_it() {
    for (flags, network, why) in [
        ("default,green", "green", "not served"),
        ("red", "red", "does not admit node node-a"),
    ] {
        let dir = tempfile::tempdir().expect("a temp dir");
        let fake = FakeController::default();
        fake.script.lock().networks.insert(
            "red".into(),
            Served {
                admits: false,
                ..served("10.20", 3)
            },
        );
        let (agent, memory) = node_a_with(&fake, dir.path(), &["--networks", flags]).await;
        let (_stop, task) = run_loop(agent);
        let e = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the loop ends by itself")
            .expect("joined")
            .expect_err("refused");
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("network {network}")) && e.contains(why),
            "{e}"
        );
        assert!(
            memory.device("flannel.3").is_none(),
            "{flags}: no device for red"
        );
    }
}

#[tokio::test]
async fn a_listed_network_that_stops_admitting_the_node_is_left_and_the_others_go_on() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script
        .lock()
        .networks
        .insert("blue".into(), served("10.10", 2));
    let flags = ["--networks", "default,blue", "--renew-margin", "59s"];
    let (agent, memory) = node_a_with(&fake, dir.path(), &flags).await;
    let (stop, task) = run_loop(agent);
    let blue_env = dir.path().join("networks/blue.env");
    until("blue joined and watched", || {
        memory.device("flannel.2").is_some()
            && blue_env.exists()
            && !fake.seen.lock().watches.is_empty()
    })
    .await;
    let asked = |network: &str| {
        let seen = fake.seen.lock();
        seen.acquires
            .iter()
            .filter(|a| a.network == network)
            .count()
    };

    // blue's "Nodes" change: node-a is refused from its next renewal on.
    fake.script
        .lock()
        .networks
        .get_mut("blue")
        .expect("blue")
        .admits = false;
    let before = asked("blue");
    until("blue's renewal refused", || asked("blue") > before).await;
    let refused = asked("blue");
    let defaults = asked("");
    until("default renewed after it", || asked("") > defaults + 1).await;
    assert!(!task.is_finished(), "the agent goes on");
    assert_eq!(asked("blue"), refused, "blue is not asked again");
    assert!(
        memory.device("flannel.2").is_some(),
        "kept while its lease lasts"
    );

    // The lease ends: blue is left, default stays.
    fake.send(message(
        false,
        8,
        vec![(
            EventType::Delete,
            lease_in("blue", "10.10", 2, "node-a", 1, 8),
        )],
    ));
    until("blue left", || {
        memory.device("flannel.2").is_none() && !blue_env.exists()
    })
    .await;
    assert!(memory.device("flannel.1").is_some());
    assert!(dir.path().join("subnet.env").exists());
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}

#[tokio::test]
async fn with_only_default_joined_no_request_names_a_network() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fake = FakeController::default();
    fake.script.lock().acquires = VecDeque::from([
        Answer::Grant { ttl_seconds: 3 },
        Answer::Grant { ttl_seconds: 3 },
    ]);
    let (agent, _) = node_a_with(&fake, dir.path(), &["--release-on-exit"]).await;
    let (stop, task) = run_loop(agent);
    until("a renewal and a watch", || {
        let seen = fake.seen.lock();
        seen.acquires.len() >= 2 && !seen.watches.is_empty()
    })
    .await;
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
    let seen = fake.seen.lock();
    assert!(
        seen.configs.iter().all(|c| c.network.is_empty()),
        "GetNetworkConfig"
    );
    assert!(
        seen.acquires.iter().all(|a| a.network.is_empty()),
        "Acquire"
    );
    assert!(seen.watches.iter().all(|w| w.networks.is_empty()), "Watch");
    assert_eq!(seen.releases.len(), 1);
    assert!(seen.releases[0].network.is_empty(), "Release");
    assert_eq!(seen.lists, 0, "ListNetworks is for '*' only");
}

/// Sends a reset of node-2's and node-3's leases at `revision`, in two parts, on the
/// watch `fake` has open, and waits until the agent programmed both.
async fn two_peers(fake: &FakeController, memory: &MemoryKernel, revision: u64) {
    until("a watch", || !fake.seen.lock().watches.is_empty()).await;
    for part in peers_reset(revision) {
        fake.send(part);
    }
    until("both peers' routes", || {
        memory.state.lock().routes.len() == 2
    })
    .await;
}

/// A grant of `ttl_seconds` for each of the next `n` Acquires.
fn grants(n: usize, ttl_seconds: u64) -> VecDeque<Answer> {
    (0..n).map(|_| Answer::Grant { ttl_seconds }).collect()
}

/// node-a running on two fake controllers that grant `ttl_seconds` leases: the one it
/// took its lease from (both peers programmed through its watch, at revision 5) and
/// the other.
struct OnTwo {
    first: FakeController,
    other: FakeController,
    memory: MemoryKernel,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

async fn on_one_of_two(dir: &std::path::Path, ttl_seconds: u64) -> OnTwo {
    let (a, b) = (FakeController::default(), FakeController::default());
    for fake in [&a, &b] {
        fake.script.lock().acquires = grants(50, ttl_seconds);
    }
    let (agent, memory) = node_a_on(&[&a, &b], dir, &[], Duration::from_secs(3600)).await;
    let (stop, task) = run_loop(agent);
    until("the lease from one of them", || {
        !a.seen.lock().acquires.is_empty() || !b.seen.lock().acquires.is_empty()
    })
    .await;
    let (first, other) = if a.seen.lock().acquires.is_empty() {
        (b, a)
    } else {
        (a, b)
    };
    two_peers(&first, &memory, 5).await;
    OnTwo {
        first,
        other,
        memory,
        stop,
        task,
    }
}

#[tokio::test]
async fn a_controller_that_dies_is_left_for_the_other_and_the_lease_and_routes_stay() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let OnTwo {
        first,
        other,
        memory,
        stop,
        task,
    } = on_one_of_two(dir.path(), 3).await;
    let (first, other) = (&first, &other);
    let env = std::fs::read_to_string(dir.path().join("subnet.env")).expect("subnet.env");
    let kernel = memory.state.lock().clone();
    assert!(
        other.seen.lock().acquires.is_empty(),
        "one controller at a time"
    );

    first.go_down();
    until("the watch resumed on the other controller", || {
        !other.seen.lock().watches.is_empty()
    })
    .await;
    assert_eq!(
        other.seen.lock().watches[0].from_revision,
        5,
        "from the revision applied"
    );
    until("a renewal on the other controller", || {
        !other.seen.lock().acquires.is_empty()
    })
    .await;
    assert_eq!(
        other.seen.lock().acquires[0].requested_subnet,
        "10.244.1.0/24",
        "the held subnet"
    );
    assert_eq!(*memory.state.lock(), kernel, "no flap");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("subnet.env")).expect("subnet.env"),
        env
    );
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}

#[tokio::test]
async fn a_replica_that_asks_the_agent_to_move_sees_its_watch_resume_on_the_other_without_a_flap() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let OnTwo {
        first,
        other,
        memory,
        stop,
        task,
    } = on_one_of_two(dir.path(), 3600).await;
    let (first, other) = (&first, &other);
    let kernel = memory.state.lock().clone();

    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert(twill_common::MOVE_TRAILER, "1".parse().expect("a value"));
    first.end_watch(Status::with_metadata(
        tonic::Code::Unavailable,
        "serving more than its share",
        meta,
    ));
    until("the watch resumed on the other replica", || {
        !other.seen.lock().watches.is_empty()
    })
    .await;
    assert_eq!(
        other.seen.lock().watches[0].from_revision,
        5,
        "from the revision applied"
    );
    assert_eq!(
        first.seen.lock().watches.len(),
        1,
        "not reopened where it was asked to leave"
    );
    assert_eq!(*memory.state.lock(), kernel, "no flap");
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}

#[tokio::test]
async fn the_certificate_is_rotated_before_it_expires_and_the_watch_moves_to_it_without_a_flap() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // The key's directory must be the agent's alone.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let token = dir.path().join("token");
    std::fs::write(&token, "abcdef.0123456789abcdef").expect("the token");
    let fake = FakeController::default();
    // Due at 70-90 % of five seconds.
    let (agent, memory) = node_a_on(
        &[&fake],
        dir.path(),
        &["--bootstrap-token-file", token.to_str().expect("utf-8")],
        Duration::from_secs(5),
    )
    .await;
    let stats = agent.stats.clone();
    let cert = dir.path().join("node.crt");
    let old = std::fs::read(&cert).expect("the certificate");
    let (stop, task) = run_loop(agent);
    two_peers(&fake, &memory, 5).await;
    let kernel = memory.state.lock().clone();

    until("a renewal", || fake.seen.lock().renewals == 1).await;
    until("the watch on the new certificate", || {
        fake.seen.lock().watches.len() >= 2
    })
    .await;
    let new = std::fs::read(&cert).expect("the certificate");
    assert_ne!(new, old, "a new certificate in place");
    assert_eq!(
        fake.seen.lock().dialled.last(),
        Some(&new),
        "new calls present it"
    );
    match identity::check_certificate(&cert, &dir.path().join("node.key"), "node-a", now_unix()) {
        CertCheck::Usable(info) => assert!(info.not_after > now_unix() + 3000, "{info:?}"),
        CertCheck::Needed(why) => panic!("the rotated pair is unusable: {why}"),
    }
    assert_eq!(fake.seen.lock().watches[1].from_revision, 5, "resumed");
    assert_eq!(stats.cert_rotations.get(), 1);
    assert_eq!(stats.cert_rotation_failures.get(), 0);
    assert_eq!(*memory.state.lock(), kernel, "no flap");
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
    assert_eq!(
        fake.seen.lock().renewals,
        1,
        "the next one is due in ~45 minutes"
    );
}

#[tokio::test]
async fn the_nodes_pods_go_to_the_controller_in_the_networks_it_holds_leases_in() {
    use twill_agent::pods::{Attachment, Attachments, Key, Op, Report};

    let dir = tempfile::tempdir().expect("a temp dir");
    // What twill-cni reported before this start: a pod in default, one in a network
    // this node did not join.
    let mut set = Attachments::default();
    for (network, id, ip) in [("default", "c1", "10.244.1.5"), ("blue", "c2", "10.10.1.5")] {
        set.apply(Report {
            op: Op::Add,
            at_ns: 1,
            attachment: Attachment {
                key: Key {
                    network: network.into(),
                    container_id: id.into(),
                    ifname: "eth0".into(),
                },
                netns: String::new(),
                namespace: "web".into(),
                pod: format!("pod-{id}"),
                ipam_dir: None,
                ips: vec![ip.parse().expect("an address")],
                added_at_ns: 0,
            },
        });
    }
    set.save(&dir.path().join("attachments.json"))
        .expect("saved");
    let fake = FakeController::default();
    let (agent, _) = node_a(&fake, dir.path()).await;
    let (stop, task) = run_loop(agent);
    until("a pod report", || !fake.seen.lock().reports.is_empty()).await;
    {
        let seen = fake.seen.lock();
        let r = &seen.reports[0];
        assert_eq!(r.node_name, "node-a");
        let sent: Vec<(&str, &str, &[String])> = r
            .attachments
            .iter()
            .map(|a| {
                (
                    a.network.as_str(),
                    a.container_id.as_str(),
                    a.ips.as_slice(),
                )
            })
            .collect();
        assert_eq!(sent, [("", "c1", &["10.244.1.5".to_string()][..])]);
    }
    // Nothing changed: not sent again at the next ticks.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fake.seen.lock().reports.len(), 1, "sent once");
    // A new leader asks on the open watch: the same set goes again.
    until("a watch", || !fake.seen.lock().watches.is_empty()).await;
    fake.send(WatchResponse {
        report_pods: true,
        ..Default::default()
    });
    until("the pods sent again", || {
        fake.seen.lock().reports.len() == 2
    })
    .await;
    {
        let seen = fake.seen.lock();
        assert_eq!(seen.reports[1].attachments, seen.reports[0].attachments);
    }
    stop.send(()).expect("the loop runs");
    task.await.expect("joined").expect("a clean exit");
}
