//! The saved delegate configurations: `<dataDir>/<containerID>`, written atomically
//! (temp file, fsync, rename, fsync of the directory) with mode 0600 in a 0700 directory,
//! so DEL works after subnet.env changed or vanished. The file is the delegate
//! configuration alone, as flannel saves it (a node moving from flannel keeps working);
//! the interface name GC needs is kept beside it in `<dataDir>/.ifname/<containerID>`
//! (container IDs never start with '.', so no container's file is in the way).

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
    crate::identity::ensure_dir(data_dir, 0o700)
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

/// Removes `container_id`'s delegate configuration and interface name; missing files
/// are fine.
pub fn remove(data_dir: &Path, container_id: &str) -> Result<(), CniError> {
    for path in [
        path_for(data_dir, container_id),
        data_dir.join(IFNAMES).join(container_id),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove saved delegate config", &path, e)),
        }
    }
    Ok(())
}

/// The directory of the interface names, under the data directory.
const IFNAMES: &str = ".ifname";

/// Keeps the interface `container_id` was attached with, for GC.
pub fn save_ifname(data_dir: &Path, container_id: &str, ifname: &str) -> Result<(), CniError> {
    save(&data_dir.join(IFNAMES), container_id, ifname.as_bytes())
}

/// The interface `container_id` was attached with, when it was kept (configurations
/// saved by flannel, or by an older twill-cni, have none).
pub fn load_ifname(data_dir: &Path, container_id: &str) -> Result<Option<String>, CniError> {
    Ok(load(&data_dir.join(IFNAMES), container_id)?
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|s| !s.is_empty()))
}

/// Every container with a saved delegate configuration (a data directory that does not
/// exist has none).
pub fn containers(data_dir: &Path) -> Result<Vec<String>, CniError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list data directory", data_dir, e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error("list data directory", data_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Temporary files and the interface names start with '.'; container IDs never do.
        if super::config::valid_cni_name(&name) && entry.path().is_file() {
            ids.push(name);
        }
    }
    ids.sort();
    Ok(ids)
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

    #[test]
    fn interface_names_live_beside_and_go_with_the_config() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        assert!(containers(&dir).unwrap().is_empty(), "no directory yet");
        save(&dir, "b", b"{}").unwrap();
        save(&dir, "a", b"{}").unwrap();
        save_ifname(&dir, "a", "eth0").unwrap();
        assert_eq!(containers(&dir).unwrap(), ["a", "b"], "not .ifname");
        assert_eq!(load_ifname(&dir, "a").unwrap().as_deref(), Some("eth0"));
        assert_eq!(load_ifname(&dir, "b").unwrap(), None, "saved by flannel");
        remove(&dir, "a").unwrap();
        assert_eq!(load_ifname(&dir, "a").unwrap(), None);
        assert_eq!(containers(&dir).unwrap(), ["b"]);
    }
}
