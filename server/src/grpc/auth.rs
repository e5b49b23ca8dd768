//! Who is calling: the identity in the client certificate that mutual TLS verified.
//! The TLS layer has already refused clients without a certificate from our CA; here
//! the subject decides the role (docs/compatibility.md, Certificates and roles), and the
//! certificate's expiry is
//! checked at every call, because a connection outlives the handshake that checked it.

use std::time::{Duration, UNIX_EPOCH};

use tonic::{Request, Status};
use twill_common::lease::validate_node_name;
use twill_common::now_unix;
use twill_common::tls::{Identity, ADMINS_GROUP, NODES_GROUP};

use crate::replica::forward;

/// The verified identity of the caller, refused once its certificate has expired.
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let id = presented(req)?
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    unexpired(&id)?;
    Ok(id)
}

/// The identity in the client certificate the caller presented, if it presented one.
/// A call that another controller replica forwarded (its certificate says
/// `O=twill:controllers`) is the original caller's: the certificate that replica
/// verified, or none.
pub fn presented<T>(req: &Request<T>) -> Result<Option<Identity>, Status> {
    let Some(leaf) = req.peer_certs().and_then(|certs| certs.first().cloned()) else {
        return Ok(None);
    };
    let id = Identity::from_der(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if !id.is_controller() || req.metadata().get(forward::FORWARDED_BY).is_none() {
        return Ok(Some(id));
    }
    let Some(der) = req.metadata().get(forward::FORWARDED_CERT) else {
        return Ok(None);
    };
    let der = der
        .to_str()
        .ok()
        .and_then(forward::unhex)
        .ok_or_else(|| Status::invalid_argument("x-twill-forwarded-cert is not hex DER"))?;
    Identity::from_der(&der)
        .map(Some)
        .map_err(|e| Status::unauthenticated(format!("forwarded client certificate: {e}")))
}

/// The caller's IP address: the original caller's for a call a replica forwarded.
pub fn client_ip<T>(req: &Request<T>) -> String {
    let forwarded = presented_by_controller(req)
        .then(|| req.metadata().get(forward::FORWARDED_FOR))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    forwarded.unwrap_or_else(|| {
        req.remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string())
    })
}

fn presented_by_controller<T>(req: &Request<T>) -> bool {
    req.peer_certs()
        .and_then(|certs| certs.first().cloned())
        .and_then(|leaf| Identity::from_der(leaf.as_ref()).ok())
        .is_some_and(|id| id.is_controller())
}

/// Refuses a certificate that has expired since its connection's handshake, the only
/// time TLS checks it.
pub fn unexpired(id: &Identity) -> Result<(), Status> {
    if id.expired(now_unix()) {
        return Err(expired(id));
    }
    Ok(())
}

/// The refusal of a certificate whose validity has ended: UNAUTHENTICATED, saying when
/// and what to do.
pub fn expired(id: &Identity) -> Status {
    let whose = if id.is_node() {
        format!("node {}", id.name)
    } else if id.is_admin() {
        format!("admin {}", id.name)
    } else {
        format!("{:?}", id.name)
    };
    let at = UNIX_EPOCH + Duration::from_secs(id.not_after_unix.max(0) as u64);
    Status::unauthenticated(format!(
        "client certificate of {whose} expired at {}; reconnect with a current certificate",
        humantime::format_rfc3339_seconds(at)
    ))
}

/// The node an agent acts for: its certificate's CN. A request that names another
/// node is refused, whatever its body says.
pub fn node_caller<T>(req: &Request<T>, claimed: &str) -> Result<String, Status> {
    validate_node_name(claimed).map_err(|e| Status::invalid_argument(format!("node_name: {e}")))?;
    let id = caller(req)?;
    if !id.is_node() {
        return Err(Status::permission_denied(format!(
            "certificate {:?} is not a node certificate (needs O={NODES_GROUP})",
            id.name
        )));
    }
    if claimed != id.name {
        return Err(Status::permission_denied(format!(
            "certificate of node {:?} cannot act for node {claimed:?}",
            id.name
        )));
    }
    Ok(id.name)
}

/// Requires an admin certificate; returns the admin's name.
pub fn admin_caller<T>(req: &Request<T>) -> Result<String, Status> {
    admin(req).map(|id| id.name)
}

/// Requires an admin certificate; returns its identity.
pub fn admin<T>(req: &Request<T>) -> Result<Identity, Status> {
    let id = caller(req)?;
    if !id.is_admin() {
        return Err(Status::permission_denied(format!(
            "certificate {:?} may not use the admin API (needs O={ADMINS_GROUP})",
            id.name
        )));
    }
    Ok(id)
}

/// Requires a node or an admin certificate (read-only lease stream).
pub fn watcher<T>(req: &Request<T>) -> Result<Identity, Status> {
    let id = caller(req)?;
    if !(id.is_node() || id.is_admin()) {
        return Err(Status::permission_denied(format!(
            "certificate {:?} has neither O={NODES_GROUP} nor O={ADMINS_GROUP}",
            id.name
        )));
    }
    Ok(id)
}

/// Refuses a node certificate that was revoked (`twillctl certs revoke`).
pub fn not_revoked(id: &Identity, identity: &crate::identity::Identity) -> Result<(), Status> {
    match id
        .is_node()
        .then(|| identity.revoked(&id.name, id.not_before_unix))
    {
        Some(Some(why)) => Err(Status::permission_denied(why)),
        _ => Ok(()),
    }
}
