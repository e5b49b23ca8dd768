//! `twillctl`'s library: the certificate tool ([`certs`]), the admin API client
//! ([`client`]), connection settings from the config file ([`config`]) and the
//! printers of the admin API's answers ([`output`]). The `twillctl` binary is a
//! thin command-line layer over these, and tests or other crates may call them directly.

pub mod certs;
pub mod client;
pub mod config;
pub mod output;
