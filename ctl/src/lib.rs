//! `twillctl`'s library: the certificate tool ([`certs`], which is the `twill-pki`
//! crate), the admin API client ([`client`]), connection settings from the config file
//! ([`config`]), the printers of the admin API's answers ([`output`]) and who holds a
//! pod address ([`lookup`]). The
//! `twillctl` binary is a thin command-line layer over these, and tests or other crates
//! may call them directly. Nothing here reads the controller's store: every answer
//! comes through the admin API, with an admin certificate.

/// The certificate tool behind `twillctl certs`: the `twill-pki` crate, under the name
/// it had when it lived here (`twill_ctl::certs::Ca` is `twill_pki::Ca`).
pub use twill_pki as certs;
pub mod client;
pub mod config;
pub mod lookup;
pub mod output;
