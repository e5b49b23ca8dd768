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

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

use crate::leases::LeaseOpError;

/// A service behind a `Middleware`: the gRPC services, as tonic routes them.
pub trait Inner:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A middleware's answer to one call.
pub type Answer = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

/// What runs in front of every service (`auth::Gate`, `replica::forward`); `Wrap` makes
/// it a layer.
pub trait Middleware: Clone + Send + 'static {
    /// Serves `req`: passes it on to `inner`, which is ready, or answers it itself.
    fn call<S: Inner>(&self, inner: &mut S, req: http::Request<Body>) -> Answer;
}

/// A `Middleware` as a tower layer (`Wrap::new`), and in front of the service `S`.
#[derive(Clone)]
pub struct Wrap<M, S = ()> {
    middleware: M,
    inner: S,
}

impl<M> Wrap<M> {
    /// The layer that puts `middleware` in front of every service.
    pub fn new(middleware: M) -> Self {
        Wrap {
            middleware,
            inner: (),
        }
    }
}

impl<M: Clone, S> Layer<S> for Wrap<M> {
    type Service = Wrap<M, S>;
    fn layer(&self, inner: S) -> Wrap<M, S> {
        Wrap {
            middleware: self.middleware.clone(),
            inner,
        }
    }
}

impl<M: Middleware, S: Inner> Service<http::Request<Body>> for Wrap<M, S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Answer {
        self.middleware.call(&mut self.inner, req)
    }
}

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
