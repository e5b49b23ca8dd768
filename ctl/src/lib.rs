//! `twillctl`'s library: the certificate tool ([`certs`]), the admin API client
//! ([`client`]) and the lease table printers ([`output`]). The `twillctl` binary is a
//! thin command-line layer over these, and tests or other crates may call them directly.

pub mod certs;
pub mod client;
pub mod output;
