//! twill-agent: the node daemon. It acquires and renews the node's lease, writes
//! flannel's subnet.env and keeps the kernel's VXLAN overlay state equal to the
//! lease table the controller streams.
//!
//! - `client`: the mTLS channel to the controller and retry backoff.
//! - `iface`: choosing the public interface and address.
//! - `reconcile`: desired entries vs the kernel's, applying the difference.
//! - `dataplane`: the only code that touches the kernel (rtnetlink).
//! - `cni`: the twill-cni plugin (flannel-compatible).

pub mod client;
pub mod cni;
pub mod dataplane;
pub mod iface;
pub mod reconcile;
