//! twill-agent: the node daemon. In each network it joins (`default`, or several:
//! REFERENCE 2.10) it acquires and renews the node's lease, writes flannel's
//! subnet.env and keeps the kernel's VXLAN overlay state equal to the lease table the
//! controller streams.
//!
//! - `client`: the mTLS channel to the controller, call deadlines, watch parts and
//!   resume, and retry backoff.
//! - `peers`: the peer set from the watch, refusing leases that collide.
//! - `identity`: whether the node certificate is usable, getting one from the
//!   controller with a bootstrap token (`IdentityService.Bootstrap`) when it is not,
//!   and (`identity::rotation`) renewing it before it expires and picking up
//!   rewritten TLS files.
//! - `iface`: choosing the public interface and address.
//! - `plane`: one address family's overlay (device, topology, last applied state).
//! - `reconcile`: desired entries vs the kernel's, applying the difference.
//! - `schedule`: when each kind of controller call is next due (backoff, failover).
//! - `watch`: the lease watch session (open, move to new credentials, reset parts,
//!   breaks).
//! - `dataplane`: the only code that touches the kernel (rtnetlink).
//! - `cni`: the twill-cni plugin (flannel-compatible).
//! - `pods`: the node's pod attachments as twill-cni reports them, and their check
//!   against what the IPAM holds.
//!
//! The agent talks to the controller only (never to etcd, never to another node's
//! control plane), and to the kernel only through `dataplane`.

pub mod client;
pub mod cni;
pub mod dataplane;
pub mod identity;
pub mod iface;
pub mod peers;
pub mod plane;
pub mod pods;
pub mod reconcile;
pub mod schedule;
pub mod watch;
