//! Crash-safe file replacement, for every file a Twill binary writes whole
//! (subnet.env, the CNI plugin's saved delegate configurations, certificates and keys).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Tells apart the temporary files of concurrent writes from one process.
static WRITES: AtomicU32 = AtomicU32::new(0);

/// Replaces `path` with `data` so that a reader sees the old file or the new one, never
/// half of either, and the new one survives a crash once this returns: a temporary file
/// beside it, created with exactly `mode` (whatever the umask; a key is never readable
/// by others, not even briefly, and an old file's looser permissions never carry over),
/// fsync, rename over `path`, fsync of the directory. On failure the temporary file is
/// removed and `path` is as it was.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    replace(path, data, mode, true)
}

/// [`write_atomic`] without the fsyncs: readers still see the old file or the new one,
/// and a crash of the writing process loses nothing, but a crash of the machine may
/// keep the old one. For state that a reboot makes moot anyway (the node's pods), where
/// the fsync would sit on a pod's ADD.
pub fn write_whole(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    replace(path, data, mode, false)
}

fn replace(path: &Path, data: &[u8], mode: u32, durable: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A leading dot keeps the temporary file out of listings and away from the names
    // the callers use (container IDs, PEM files, subnet.env).
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_with_the_new_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("subnet.env");
        assert!(write_atomic(&path, b"x", 0o644).is_err());
        assert!(!path.exists());
    }
}
