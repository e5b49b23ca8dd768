//! twill-controller: the single source of truth for who owns which pod subnet.
//!
//! - `store`: durable storage behind the `Store` trait (sled, or etcd for several replicas).
//! - `alloc`: the free-subnet index; `subnets`: one family's allocation policy (holders,
//!   reservations), where a subnet is picked.
//! - `leases`: the single writer that decides, stores (group commit) and acknowledges.
//! - `events`: the committed table, its revision log and the fan-out to watchers.
//! - `identity`: bootstrap tokens and the signing of node certificates.
//! - `grpc`: the agent, identity and admin services and certificate-based authorization.
//! - `metrics`: Prometheus metrics and the record of connected agents.
//! - `http`: health, readiness and metrics endpoints.
//! - `replica`: several controllers on etcd: the election, the etcd watch every replica
//!   serves from, and the forwarding of writes to the leader.
//! - `tls`: the serving certificate and client CA, reloaded when their files change.

pub mod agents;
pub mod alloc;
pub mod events;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod leases;
pub mod metrics;
pub mod refusal;
pub mod replica;
pub mod store;
pub mod subnets;
pub mod tls;
