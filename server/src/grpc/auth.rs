//! Who is calling: the identity in the client certificate that mutual TLS verified.
//! The TLS layer has already refused clients without a certificate from our CA; here
//! the subject decides the role (REFERENCE.md 2.3).

use tonic::{Request, Status};
use twill_common::lease::validate_node_name;
use twill_common::tls::{Identity, ADMINS_GROUP, NODES_GROUP};

/// The verified identity of the caller.
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    Identity::from_der(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))
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
    let id = caller(req)?;
    if !id.is_admin() {
        return Err(Status::permission_denied(format!(
            "certificate {:?} may not use the admin API (needs O={ADMINS_GROUP})",
            id.name
        )));
    }
    Ok(id.name)
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
