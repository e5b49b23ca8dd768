//! The lease model both sides carry inside, parsed once at the wire edge: node names,
//! MACs, per-family lease parts and leases, and the address-family dimension
//! ([`PerFamily`]) that every "for each family" walk goes through. Only the edges
//! (the gRPC services, the store encoding, the agent's client) speak the proto types.

mod family;
mod fields;
mod lease;

pub use family::{Family, PerFamily};
pub use fields::{
    check_public_ip, parse_public_ip, parse_subnet, validate_node_name, LeaseError, Mac, NodeName,
    WireNames, MAX_NODE_NAME_LEN,
};
pub use lease::{Lease, Peer};
