//! Twill's network-namespace lab, shared by the end-to-end tests, the demo
//! (`twill-demo`) and benchmarks.
//!
//! * [`Lab`]: an underlay (a namespace holding bridge `br0` with gateway
//!   `198.18.k.254/24`) and hosts (namespaces `tw-<id>-<n>` joined to it by a veth
//!   whose host side is `eth0`, address `198.18.k.<n+1>`, default route via the
//!   gateway); commands and processes inside hosts; kernel-state readers; cleanup on
//!   drop (also on panic, after printing every host's state and every log's tail).
//! * [`Overlay`]: a lab running Twill: certificates from `twillctl certs`, a
//!   `controller` host running `twill-controller`, one `twill-agent` per node.
//! * [`kit`]: what every suite of the workspace shares: [`in_ci`], a loud skip that is
//!   a failure in CI, free ports, a plain HTTP GET.
//! * [`wait_until`]/[`hold_for`]: polling with deadlines instead of sleeps.
//! * [`ContinuousPing`]: a ping in the background that tells, once stopped, which
//!   echo requests were lost while a test disturbed the overlay.
//! * [`require_lab`]: a loud skip when the machine cannot run a lab (not root, no
//!   network namespaces), a failure instead when `CI` is set.
//! * [`EtcdCluster`]: real etcd members on loopback with client-certificate TLS, for
//!   the controller's etcd backend: kill, restart, SIGSTOP/SIGCONT a member; read and
//!   write keys with `etcdctl`. [`require_etcd`] skips (or fails, in CI) without etcd.
//!   [`EtcdCluster::start_in_lab`] runs the members inside lab hosts instead.
//! * [`HaOverlay`]: a lab running Twill highly available: three controller hosts,
//!   each with an etcd member and a `twill-controller --store etcd`, and agents given
//!   every replica's URL; who leads, kill and restart a replica, which replica each
//!   agent watches.
//!
//! Everything the lab makes lives inside namespaces it creates and deletes; traffic
//! never leaves them. (An [`EtcdCluster`] started with [`EtcdCluster::start`] is no
//! lab: it listens on the host's loopback, on ports the kernel picked free.)
//!
//! ```no_run
//! use std::time::Duration;
//! use twill_tests::{require_lab, Overlay, OverlayConfig};
//!
//! let Some(ov) = require_lab("example", Overlay::start(OverlayConfig::three_nodes())) else {
//!     return; // printed a loud SKIPPED (or panicked, with CI=true)
//! };
//! let envs = ov.wait_converged(Duration::from_secs(60)).unwrap();
//! let b = &envs["node-b"];
//! ov.lab().ping("node-a", b.flannel_addr()).unwrap();
//! println!("{:?}", ov.lab().routes("node-a").unwrap()); // ip -j route show proto 74
//! ov.stop_agent("node-b").unwrap(); // SIGTERM, waits for the exit
//! ov.restart_agent("node-b").unwrap(); // same arguments
//! // dropping `ov` kills every process and deletes every namespace
//! ```

#![allow(missing_docs, clippy::unwrap_used)] // test code: a panic is the failure report

pub mod bins;
pub mod certs;
pub mod cmd;
pub mod etcd;
pub mod ha;
pub mod kernel;
pub mod kit;
pub mod lab;
pub mod overlay;
pub mod ping;
pub mod pods;
mod process;
pub mod raw_grpc;
pub mod replicas;
pub mod subnet_env;
pub mod wait;

pub use bins::Bins;
pub use cmd::CmdOutput;
pub use etcd::{require_etcd, EtcdCluster};
pub use ha::HaOverlay;
pub use kernel::{FdbEntry, Link, Neighbour, Route, FLANNEL_DEV, TWILL_ROUTE_PROTO};
pub use kit::{in_ci, HttpResponse};
pub use lab::{
    cleanup_all_labs, cleanup_stale_namespaces, require_lab, Host, Lab, LabConfig, LabError,
};
pub use overlay::{LeaseRow, Overlay, OverlayConfig, CONTROLLER_HOST, DEFAULT_NET_CONF};
pub use ping::{ContinuousPing, PingReport};
pub use subnet_env::SubnetEnv;
pub use wait::{hold_for, wait_until, Check, Outcome};
