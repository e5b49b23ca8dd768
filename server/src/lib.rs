//! twill-controller: the single source of truth for who owns which pod subnet.
//!
//! - `store`: durable storage behind the `Store` trait (sled, or etcd for several
//!   replicas); `store::schema` is the one key space every backend and the replicas use.
//! - `alloc`: the free-subnet index; `subnets`: one family's allocation policy (holders,
//!   reservations), where a subnet is picked.
//! - `leases`: the single writer that decides, stores (group commit) and acknowledges.
//! - `events`: the committed table, its revision log and the fan-out to watchers
//!   (`events::wire`: the gRPC framing, encoded once for every watcher).
//! - `identity`: bootstrap tokens and the signing of node certificates; `refusal`: why
//!   a certificate was refused.
//! - `grpc`: the agent, identity and admin services and certificate-based authorization.
//! - `metrics`: Prometheus metrics; `agents`: the record of connected agents.
//! - `http`: health, readiness and metrics endpoints.
//! - `pods`: every node's pods as its agent last reported them (in memory).
//! - `replica`: several controllers on etcd: the election, the etcd watch every replica
//!   serves from, and the forwarding of writes to the leader.
//! - `tls`: the serving certificate and client CA, reloaded when their files change.
//!
//! The lease model (`twill_common::model`) is parsed from the wire in `grpc` and from
//! the store in `leases`; inside, leases are typed. The controller never touches a
//! node's kernel and never calls an agent: agents call it.

pub mod agents;
pub mod alloc;
pub mod events;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod leases;
pub mod metrics;
pub mod networks;
pub mod pods;
pub mod refusal;
pub mod replica;
pub mod store;
pub mod subnets;
pub mod tls;
