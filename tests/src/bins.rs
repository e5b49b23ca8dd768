//! Finding the binaries the lab starts: `twill-controller`, `twill-agent`, `twillctl`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The binaries the lab needs.
pub const REQUIRED: [&str; 3] = ["twill-controller", "twill-agent", "twillctl"];

/// The directory holding the workspace's built binaries (e.g. `target/debug`).
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    /// Finds the target directory holding all [`REQUIRED`] binaries.
    ///
    /// Looks, in order: in `$TWILL_BIN_DIR`; in the directory of the running executable
    /// (`target/debug` for the demo; `target/debug/deps/<test>` gives `target/debug`); in
    /// `$CARGO_TARGET_DIR/<profile>`; in the workspace's `target/<profile>`. Fails with
    /// "run `cargo build --workspace --bins` first" when none has them all.
    pub fn locate() -> Result<Bins> {
        let candidates = candidate_dirs();
        for dir in &candidates {
            if REQUIRED.iter().all(|b| dir.join(b).is_file()) {
                return Ok(Bins { dir: dir.clone() });
            }
        }
        let looked = candidates
            .iter()
            .map(|d| {
                let missing: Vec<_> = REQUIRED.iter().filter(|b| !d.join(b).is_file()).collect();
                format!("{} (missing {missing:?})", d.display())
            })
            .collect::<Vec<_>>()
            .join(", ");
        bail!(
            "the Twill binaries {REQUIRED:?} were not found: run `cargo build --workspace --bins` first \
             (looked in: {looked})"
        )
    }

    /// The path of binary `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn controller(&self) -> PathBuf {
        self.path("twill-controller")
    }

    pub fn agent(&self) -> PathBuf {
        self.path("twill-agent")
    }

    pub fn twillctl(&self) -> PathBuf {
        self.path("twillctl")
    }
}

/// `target/<profile>` for an executable at `target/<profile>/deps/x` or `target/<profile>/x`.
fn profile_dir_of(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("TWILL_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| profile_dir_of(&e));
    let profile = exe_dir
        .as_ref()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n == "debug" || n == "release")
        .unwrap_or_else(|| "debug".into());
    if let Some(d) = exe_dir {
        dirs.push(d);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t).join(&profile));
    }
    // tests/ is one level below the workspace root
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target");
    dirs.push(ws.join(&profile));
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_from_test_and_bin_paths() {
        assert_eq!(
            profile_dir_of(Path::new("/w/target/debug/deps/e2e-123")).unwrap(),
            PathBuf::from("/w/target/debug")
        );
        assert_eq!(
            profile_dir_of(Path::new("/w/target/release/twill-demo")).unwrap(),
            PathBuf::from("/w/target/release")
        );
    }
}
