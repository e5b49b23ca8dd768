//! The daemon's loop against a fake controller (an in-process gRPC server over an
//! in-memory connection) and an in-memory data plane: no root, no network. The fake
//! answers as each test scripts it and records what the agent asked.

use std::collections::VecDeque;
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
use twill_agent::dataplane::{
    DataPlane, DataPlaneError, Device, Family, KernelState, Route, Underlay, VxlanSpec,
};
use twill_agent::identity::rotation::Credentials;
use twill_agent::peers::PeerTable;
use twill_agent::plane::Plane;
use twill_common::model::{Mac, PerFamily};
use twill_proto::agent_service_server::{AgentService, AgentServiceServer};
use twill_proto::{
    AcquireRequest, AcquireResponse, GetNetworkConfigRequest, Lease, LeaseEvent, NetworkConfig,
    ReleaseRequest, ReleaseResponse, WatchRequest, WatchResponse,
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
}

#[derive(Default)]
struct Seen {
    acquires: Vec<AcquireRequest>,
    watches: Vec<WatchRequest>,
}

/// The sending end of a watch stream.
type Stream = mpsc::Sender<Result<WatchResponse, Status>>;

#[derive(Clone, Default)]
struct FakeController {
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Seen>>,
    /// Open silent streams, kept so that they stay open.
    parked: Arc<Mutex<Vec<Stream>>>,
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

#[tonic::async_trait]
impl AgentService for FakeController {
    async fn get_network_config(
        &self,
        _: Request<GetNetworkConfigRequest>,
    ) -> Result<Response<NetworkConfig>, Status> {
        Ok(Response::new(NetworkConfig {
            net_conf_json: NET_CONF.into(),
        }))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let req = req.into_inner();
        self.seen.lock().acquires.push(req.clone());
        let answer = self.script.lock().acquires.pop_front();
        match answer.unwrap_or(Answer::Grant { ttl_seconds: 60 }) {
            Answer::Grant { ttl_seconds } => Ok(Response::new(AcquireResponse {
                lease: Some(Lease {
                    public_ip: req.public_ip,
                    vtep_mac: req.vtep_mac,
                    ..lease(&req.node_name, 1, 1)
                }),
                ttl_seconds,
            })),
            Answer::Refuse(s) => Err(s),
            Answer::Hang => std::future::pending().await,
        }
    }

    async fn release(
        &self,
        _: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(ReleaseResponse::default()))
    }

    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
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

/// A channel to `fake` over in-memory connections (a new one each time the channel
/// connects).
async fn connect(fake: FakeController) -> Channel {
    let (conns_tx, conns_rx) = mpsc::unbounded_channel();
    tokio::spawn(
        Server::builder()
            .add_service(AgentServiceServer::new(fake))
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

/// The kernel as the agent would leave it, in memory; a clone shares it (the agent
/// holds one, the test reads another).
#[derive(Clone, Default)]
struct MemoryKernel {
    state: Arc<Mutex<KernelState>>,
}

#[async_trait::async_trait]
impl DataPlane for MemoryKernel {
    async fn ensure_device(&self, _: &VxlanSpec) -> Result<Device, DataPlaneError> {
        Ok(Device {
            index: 7,
            mac: "0a:58:0a:f4:01:00".parse().expect("a MAC"),
        })
    }
    async fn set_tx_checksum_offload(&self, _: &str, _: bool) -> Result<(), DataPlaneError> {
        Ok(())
    }
    async fn delete_device(&self, _: &str) -> Result<(), DataPlaneError> {
        *self.state.lock() = KernelState::default();
        Ok(())
    }
    async fn ensure_address(&self, _: &Device, _: IpAddr) -> Result<(), DataPlaneError> {
        Ok(())
    }
    async fn read_state(
        &self,
        _: Option<&Device>,
        _: Family,
    ) -> Result<KernelState, DataPlaneError> {
        Ok(self.state.lock().clone())
    }
    async fn add_neighbour(&self, _: &Device, ip: IpAddr, mac: Mac) -> Result<(), DataPlaneError> {
        self.state.lock().neighbours.insert(ip, mac);
        Ok(())
    }
    async fn del_neighbour(&self, _: &Device, ip: IpAddr) -> Result<(), DataPlaneError> {
        self.state.lock().neighbours.remove(&ip);
        Ok(())
    }
    async fn add_fdb(&self, _: &Device, mac: Mac, dst: IpAddr) -> Result<(), DataPlaneError> {
        self.state.lock().fdb.insert(mac, dst);
        Ok(())
    }
    async fn del_fdb(&self, _: &Device, mac: Mac, _: IpAddr) -> Result<(), DataPlaneError> {
        self.state.lock().fdb.remove(&mac);
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
}

/// A node certificate, its key and the CA in `dir`.
fn pki(dir: &std::path::Path) -> [PathBuf; 3] {
    let validity = twill_pki::Validity::lasting(Duration::from_secs(3600));
    let ca = twill_pki::new_ca(validity).expect("a CA");
    let node = twill_pki::Ca::from_pem(&ca.cert_pem, &ca.key_pem)
        .expect("the CA")
        .issue(&twill_pki::Role::Node("node-a".into()), validity)
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
    files
}

/// An agent for node-a on `fake`, its files in `dir`, its kernel in memory.
async fn node_a(fake: &FakeController, dir: &std::path::Path) -> (Agent, MemoryKernel) {
    let [cert, key, ca] = pki(dir);
    let subnet_file = dir.join("subnet.env");
    let subnet_dir = dir.join("networks");
    let args = Args::try_parse_from([
        "twill-agent",
        "--controller",
        "https://127.0.0.1:9",
        "--node-name",
        "node-a",
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
        "--tls-ca",
        ca.to_str().expect("utf-8"),
        "--subnet-file",
        subnet_file.to_str().expect("utf-8"),
        "--subnet-dir",
        subnet_dir.to_str().expect("utf-8"),
        "--reconcile-interval",
        "1s",
    ])
    .expect("flags");
    let files = TlsFiles {
        cert: &args.tls_cert,
        key: &args.tls_key,
        ca: &args.tls_ca,
    };
    let (creds, _) = Credentials::load(&args.controller, "node-a", &files).expect("credentials");
    let channel = connect(fake.clone()).await;
    let conf = NetConf::parse(NET_CONF).expect("net-conf");
    let memory = MemoryKernel::default();
    let underlay = Underlay {
        index: 2,
        name: "eth0".into(),
        addr: "192.0.2.1/24".parse().expect("a CIDR"),
        mtu: 1500,
    };
    let ip: IpAddr = "192.0.2.1".parse().expect("an address");
    let plane = Plane::start(&memory, &conf.backend, underlay, ip, 1450)
        .await
        .expect("plane");
    let stats = Arc::new(Stats::default());
    let kernel = Kernel::new(
        Box::new(memory.clone()),
        PerFamily::new(Some(plane), None),
        PeerTable::new("node-a", conf.networks()),
        stats.clone(),
    );
    let agent = Agent {
        node: "node-a".into(),
        args,
        conf,
        api: client::agent_client(channel.clone()),
        channel,
        creds,
        stats,
        mtu: 1450,
        kernel,
        lease: None,
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
