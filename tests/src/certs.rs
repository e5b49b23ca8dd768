//! Reading certificates the way an operator would: with `openssl`.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd;

/// Runs `openssl ARGS...`; its stdout.
pub fn openssl(args: &[&str]) -> Result<String> {
    let mut all = vec!["openssl"];
    all.extend_from_slice(args);
    cmd::run(&all)
}

/// What `openssl x509 -noout <flag>` prints of the (first) certificate in `cert`.
fn x509(cert: &Path, flag: &str) -> Result<String> {
    openssl(&["x509", "-noout", flag, "-in", &cert.display().to_string()])
}

/// The serial number of the (first) certificate in `cert`, as openssl prints it.
pub fn cert_serial(cert: &Path) -> Result<String> {
    let out = x509(cert, "-serial")?;
    Ok(out
        .trim()
        .strip_prefix("serial=")
        .with_context(|| format!("openssl -serial printed {out:?}"))?
        .to_string())
}

/// Whether the private key in `key` belongs to the certificate in `cert`.
pub fn key_belongs(cert: &Path, key: &Path) -> Result<bool> {
    let key_pub = openssl(&["pkey", "-pubout", "-in", &key.display().to_string()])?;
    Ok(x509(cert, "-pubkey")? == key_pub)
}
