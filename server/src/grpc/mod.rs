//! The gRPC services: `agent` (lease acquire/renew/release and the watch stream) and
//! `admin` (operators), with `auth` deciding who the caller is from its certificate,
//! `limit` bounding how often one node may write, and `watch` running each watch
//! stream.

pub mod admin;
pub mod agent;
pub mod auth;
pub mod identity;
pub mod limit;
pub mod watch;

use tonic::Status;

use crate::leases::LeaseOpError;

impl From<LeaseOpError> for Status {
    fn from(e: LeaseOpError) -> Self {
        match e {
            LeaseOpError::Invalid(m) => Status::invalid_argument(m),
            LeaseOpError::AlreadyExists(m) => Status::already_exists(m),
            LeaseOpError::Forbidden(m) => Status::permission_denied(m),
            LeaseOpError::Exhausted(m) => Status::resource_exhausted(m),
            LeaseOpError::Conflict(m) | LeaseOpError::Retired(m) => Status::failed_precondition(m),
            LeaseOpError::UnknownNetwork(m) => Status::not_found(m),
            LeaseOpError::Store(e) => Status::unavailable(e.to_string()),
            e @ (LeaseOpError::Stopped | LeaseOpError::NotLeader) => {
                Status::unavailable(e.to_string())
            }
        }
    }
}
