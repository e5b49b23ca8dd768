//! Generated gRPC types and stubs for Twill's public contract, package `twill.v1`.
//! The `.proto` files beside this crate are the documentation of record.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("twill.v1");
}

pub use v1::*;
