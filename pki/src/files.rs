//! Writing certificates and keys with the right modes, and reading the CA's files.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::ca::Issued;
use crate::error::CertError;

/// File name of the CA certificate inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside the certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub const CERT_MODE: u32 = 0o644;

/// The two files a certificate is written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The certificate file (mode 0644).
    pub cert: PathBuf,
    /// The key file (mode 0600).
    pub key: PathBuf,
}

/// Writes `issued` as `DIR/STEM.crt` (0644) and `DIR/STEM.key` (0600), creating `dir`
/// when missing. Without `force`, refuses when either file exists (before writing any).
pub fn write_pair(
    dir: &Path,
    stem: &str,
    issued: &Issued,
    force: bool,
) -> Result<Written, CertError> {
    let written = Written {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    if !force {
        for p in [&written.key, &written.cert] {
            if p.symlink_metadata().is_ok() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&written.key, issued.key_pem.as_bytes(), KEY_MODE, force)?;
    write_file(&written.cert, issued.cert_pem.as_bytes(), CERT_MODE, force)?;
    Ok(written)
}

/// Writes `data` to `path`, creating it with `mode` (subject to the umask).
/// Without `force` the file must not exist (checked atomically with `O_EXCL`); with
/// `force` a temporary file is created with `mode` beside it and renamed over `path`,
/// so an old file's looser permissions never carry over to a new key.
pub fn write_file(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<(), CertError> {
    let io = |action: &'static str| {
        move |source| CertError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    if !force {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    CertError::Exists(path.to_path_buf())
                } else {
                    io("create")(e)
                }
            })?;
        f.write_all(data).map_err(io("write"))?;
        f.sync_all().map_err(io("write"))?;
        return Ok(());
    }
    twill_common::fs::write_atomic(path, data, mode).map_err(io("write"))
}

/// Reads a CA file.
pub(crate) fn read_to_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::ca::{new_ca, Validity};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pairs_are_written_with_their_modes_and_not_overwritten_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(Validity::days(1).unwrap()).unwrap();
        let sub = dir.path().join("pki");
        let w = write_pair(&sub, "ca", &ca, false).unwrap();
        assert_eq!(w.cert, sub.join("ca.crt"));
        assert_eq!(mode(&w.key), KEY_MODE);
        assert_eq!(mode(&w.cert) & !0o022, CERT_MODE & !0o022);
        let again = write_pair(&sub, "ca", &ca, false).unwrap_err();
        assert!(matches!(again, CertError::Exists(_)), "{again}");
        assert!(again.to_string().contains("--force"), "{again}");
        std::fs::set_permissions(&w.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_pair(&sub, "ca", &ca, true).unwrap();
        assert_eq!(
            mode(&w.key),
            KEY_MODE,
            "a forced key never keeps looser modes"
        );
        assert_eq!(std::fs::read_to_string(&w.key).unwrap(), ca.key_pem);
    }
}
