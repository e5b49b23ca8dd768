//! One CA for everything (as in a real cluster): the controller's and etcd's server
//! certificates, one client certificate per simulated node and one for the admin that
//! makes bootstrap tokens, made with twillctl's certificate library. The CA's key is
//! written too: the cold start's controller signs node certificates with it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use twill_ctl::certs::{new_ca, Ca, Issued, Role, Validity};

/// A client certificate and its key, PEM.
#[derive(Clone)]
pub struct ClientCert {
    /// Certificate.
    pub cert_pem: String,
    /// Key.
    pub key_pem: String,
}

/// The CA, its files in a temp dir, and node certificates made so far.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// An admin's client certificate (`O=twill:admins`).
    pub admin: ClientCert,
    nodes: std::collections::HashMap<String, ClientCert>,
}

impl Pki {
    /// A new CA with a server certificate for 127.0.0.1 / localhost, written as
    /// `ca.crt`, `ca.key`, `server.crt`, `server.key`, and an admin certificate.
    pub fn new() -> Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("twill-bench-pki")
            .tempdir()?;
        let validity = Validity::days(2)?;
        let root = new_ca(validity)?;
        let ca = Ca::from_pem(&root.cert_pem, &root.key_pem)?;
        let server = ca.issue(
            &Role::Controller {
                dns: vec!["localhost".into()],
                ips: vec!["127.0.0.1".parse()?],
                // The same certificate serves the HA scenario's replicas, which call
                // each other with it (clientAuth).
                replica: true,
            },
            validity,
        )?;
        let admin = ca.issue(&Role::Admin("twill-bench".into()), validity)?;
        std::fs::write(dir.path().join("ca.crt"), &root.cert_pem)?;
        std::fs::write(dir.path().join("ca.key"), &root.key_pem)?;
        std::fs::write(dir.path().join("server.crt"), &server.cert_pem)?;
        std::fs::write(dir.path().join("server.key"), &server.key_pem)?;
        Ok(Pki {
            dir,
            ca,
            ca_pem: root.cert_pem,
            admin: ClientCert {
                cert_pem: admin.cert_pem,
                key_pem: admin.key_pem,
            },
            nodes: Default::default(),
        })
    }

    /// A file in the PKI dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes sure every name has a node certificate (`CN=name, O=twill:nodes`); new
    /// ones are issued on all cores.
    pub fn ensure_nodes(&mut self, names: &[String]) -> Result<()> {
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !self.nodes.contains_key(*n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = missing.len().div_ceil(threads);
        let ca = &self.ca;
        let issued: Vec<(String, Issued)> = std::thread::scope(|s| {
            let handles: Vec<_> = missing
                .chunks(chunk)
                .map(|names| {
                    s.spawn(move || -> Result<Vec<(String, Issued)>> {
                        let validity = Validity::days(2)?;
                        names
                            .iter()
                            .map(|n| {
                                let c = ca
                                    .issue(&Role::Node((*n).clone()), validity)
                                    .with_context(|| format!("certificate for {n}"))?;
                                Ok(((*n).clone(), c))
                            })
                            .collect()
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in handles {
                all.extend(h.join().expect("certificate thread")?);
            }
            Ok::<_, anyhow::Error>(all)
        })?;
        for (name, c) in issued {
            self.nodes.insert(
                name,
                ClientCert {
                    cert_pem: c.cert_pem,
                    key_pem: c.key_pem,
                },
            );
        }
        Ok(())
    }

    /// The certificate of a node made by [`Pki::ensure_nodes`].
    pub fn node(&self, name: &str) -> ClientCert {
        self.nodes[name].clone()
    }
}
