//! Generated gRPC types and stubs for Twill's public contract, package `twill.v1`.
//! The `.proto` files beside this crate are the documentation of record.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("twill.v1");
}

pub use v1::*;

/// etcd's v3 API (client stubs), for the controller's etcd store.
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    /// Keys and events (`mvccpb`).
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// KV, Watch, Lease and Maintenance (`etcdserverpb`).
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// Leader election (`v3electionpb`).
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

/// One RPC of Twill's services, as the .proto files declare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The gRPC path, `/twill.v1.Service/Method`.
    pub path: &'static str,
    /// The number of the request's `node_name` field; 0 when it has none.
    pub node_name_field: i32,
    /// The answer is a stream.
    pub server_streaming: bool,
}

/// Every RPC of every Twill service, from the compiled descriptors.
pub const METHODS: &[Method] = include!(concat!(env!("OUT_DIR"), "/methods.rs"));
