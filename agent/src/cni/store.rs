//! The saved delegate configurations: `<dataDir>/<containerID>`, written atomically
//! (temp file, fsync, rename, fsync of the directory) with mode 0600 in a 0700 directory,
//! so DEL works after subnet.env changed or vanished.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::error::{code, CniError};

fn io_error(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        format!("failed to {what} {}: {e}", path.display()),
    )
}

/// The file holding `container_id`'s delegate configuration. The ID must already be
/// validated ([`super::config::valid_cni_name`]): no `/`, no leading `.`.
pub fn path_for(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Saves `bytes` as `container_id`'s delegate configuration.
pub fn save(data_dir: &Path, container_id: &str, bytes: &[u8]) -> Result<(), CniError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| io_error("create data directory", data_dir, e))?;
    let path = path_for(data_dir, container_id);
    // Container IDs never start with '.', so the temporary name cannot be another's file.
    twill_common::fs::write_atomic(&path, bytes, 0o600)
        .map_err(|e| io_error("save delegate config", &path, e))?;
    Ok(())
}

/// Loads `container_id`'s delegate configuration; `None` when there is none.
pub fn load(data_dir: &Path, container_id: &str) -> Result<Option<Vec<u8>>, CniError> {
    let path = path_for(data_dir, container_id);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read saved delegate config", &path, e)),
    }
}

/// Removes `container_id`'s delegate configuration; a missing file is fine.
pub fn remove(data_dir: &Path, container_id: &str) -> Result<(), CniError> {
    let path = path_for(data_dir, container_id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove saved delegate config", &path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_load_remove() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        assert_eq!(load(&dir, "c1").unwrap(), None);
        save(&dir, "c1", b"one").unwrap();
        save(&dir, "c1", b"two").unwrap();
        assert_eq!(load(&dir, "c1").unwrap().as_deref(), Some(&b"two"[..]));
        let mode = std::fs::metadata(dir.join("c1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        remove(&dir, "c1").unwrap();
        remove(&dir, "c1").unwrap();
        assert_eq!(load(&dir, "c1").unwrap(), None);
    }
}
