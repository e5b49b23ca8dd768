//! Replacing the node's key and certificate so that no failure costs the pair in use.
//!
//! A new key is *staged*: written beside `--tls-key` as `.<name>.next` (mode 0600, in a
//! directory [`check_key_dir`] found private to the agent's user), and the certificate
//! request is made from it. Nothing else changes until the controller's certificate
//! has been received and checked ([`check_issued`]: for this node, for this key): a
//! refusal, an answer for another key or node, a failed or abandoned attempt remove the
//! staged key and leave the old key and certificate byte for byte as they were. So a
//! certificate that only looked unusable (a node clock off by hours: "not yet valid",
//! "expired") still works once the clock is right, even when no new one could be had.
//!
//! Once the certificate is checked it is staged too, beside `--tls-cert`
//! (`.<name>.next`, mode 0644), and [`Staged::install`] moves the certificate, then
//! the key, into place: why in that order, and why that is safe at every instant, is
//! documented on the private `Staged::commit`. [`finish_install`] completes or
//! discards what a crash left, at every start and before every new attempt.
//!
//! The staged files' names start with a dot, like [`write_atomic`]'s temporary files,
//! and are not `<name>.new`, which operators' scripts use for their own two-step
//! installs (deploy/kubernetes/cert-manager/node-certificates.sh): an agent starting
//! while such a script runs must not take its files for its own. `.<key>.next` is also
//! where earlier agents staged their key, so what they left is recovered the same way.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::KeyPair;
use tracing::{info, warn};
use twill_common::now_unix;

use super::{
    check_issued, check_key_dir, check_private, describe, effective_uid, ensure_dir,
    first_certificate, generate_key, parent_dir, rfc3339, write_atomic, CertInfo, Private,
    CERT_DIR_MODE, CERT_MODE, KEY_MODE,
};

/// The files of one installation.
#[derive(Debug, Clone)]
struct Paths {
    /// `--tls-cert`.
    cert: PathBuf,
    /// `--tls-key`.
    key: PathBuf,
    /// The new certificate, staged beside `cert`.
    next_cert: PathBuf,
    /// The new key, staged beside `key`.
    next_key: PathBuf,
    /// A hard link to the old certificate while the new one replaces it, to put it
    /// back should the key fail to follow.
    prev_cert: PathBuf,
}

impl Paths {
    fn new(cert: &Path, key: &Path) -> Paths {
        Paths {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            next_cert: beside(cert, "next"),
            next_key: beside(key, "next"),
            prev_cert: beside(cert, "prev"),
        }
    }

    /// The leftovers of an installation, present or not.
    fn leftovers(&self) -> [&Path; 3] {
        [&self.next_key, &self.next_cert, &self.prev_cert]
    }
}

/// `.<name>.<suffix>` beside `path`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(path).join(format!(".{name}.{suffix}"))
}

/// Whether anything (a file, a dangling symlink) is at `path`.
fn present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Makes the renames and removals done in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// What became of the old certificate while the new one replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OldCert {
    /// There was none.
    None,
    /// Kept aside as [`Paths::prev_cert`].
    Kept,
    /// It could not be kept aside (a file system without hard links).
    Lost,
}

/// A new key staged beside `--tls-key`, waiting for its certificate.
///
/// Dropped before [`Staged::install`] succeeded (an error, a refusal, a cancelled
/// bootstrap), it removes what it staged, and the old pair is as it was. The one
/// exception is an installation that failed after the new certificate was moved into
/// place and the old one could not be put back: the staged key then completes the
/// pair on disk and stays for [`finish_install`].
pub struct Staged {
    paths: Paths,
    pair: KeyPair,
    /// Set once the new certificate is in place and until the old one is back.
    keep: bool,
}

impl Staged {
    /// Checks the key's directory ([`check_key_dir`]), finishes or discards what an
    /// interrupted installation left ([`finish_install`]), and stages a new ECDSA
    /// P-256 key beside `key` (mode 0600). `cert` and `key` are `--tls-cert` and
    /// `--tls-key`; neither is touched.
    pub fn new(cert: &Path, key: &Path) -> Result<Staged> {
        check_key_dir(key)?;
        finish_install(cert, key)?;
        let staged = Staged {
            paths: Paths::new(cert, key),
            pair: generate_key()?,
            keep: false,
        };
        write_atomic(
            &staged.paths.next_key,
            staged.pair.serialize_pem().as_bytes(),
            KEY_MODE,
        )
        .with_context(|| {
            format!(
                "cannot write the new key {}",
                staged.paths.next_key.display()
            )
        })?;
        Ok(staged)
    }

    /// The new key, to make the certificate request with.
    pub fn key(&self) -> &KeyPair {
        &self.pair
    }

    /// Checks that `chain_pem` (what the controller returned) certifies this key for
    /// `node` ([`check_issued`]), stages it and moves the new certificate and key into
    /// place (certificate first, then key). On any error the old key and certificate are left
    /// (or put back) as they were, except in the one case [`Staged`] describes.
    pub fn install(mut self, chain_pem: &str, node: &str) -> Result<CertInfo> {
        let info = check_issued(chain_pem, node, &self.pair)?;
        let dir = parent_dir(&self.paths.cert);
        ensure_dir(dir, CERT_DIR_MODE)
            .with_context(|| format!("cannot create the --tls-cert directory {}", dir.display()))?;
        write_atomic(&self.paths.next_cert, chain_pem.as_bytes(), CERT_MODE).with_context(
            || {
                format!(
                    "cannot write the new certificate {}",
                    self.paths.next_cert.display()
                )
            },
        )?;
        self.commit(|from, to| std::fs::rename(from, to))?;
        let now = now_unix();
        if now < info.not_before || now > info.not_after {
            warn!(node = %node, not_before = %rfc3339(info.not_before), not_after = %info.not_after_rfc3339(), "the issued certificate is not valid by this node's clock; is the clock right?");
        }
        Ok(info)
    }

    /// Moves the staged certificate, then the staged key, into place with `rename`
    /// (`std::fs::rename` but in tests), each made durable before the next step.
    ///
    /// Why this is safe: before the first rename both staged files are whole and
    /// durable ([`write_atomic`] syncs them and their directories), the certificate
    /// was checked for this node and this key, a `rename` within a directory is atomic,
    /// and from the first rename on a staged file goes away only by its own rename.
    /// So at every instant `--tls-cert` and `--tls-key` hold one of:
    ///
    /// 1. the old pair, the new pair staged beside it. A crash here: [`finish_install`]
    ///    finds a staged certificate and key that belong together and moves both.
    /// 2. the new certificate and the old key, the new key staged beside them and
    ///    belonging to the certificate in place. A crash here: [`finish_install`]
    ///    moves the key. A reader meanwhile ([`super::check_certificate`],
    ///    [`super::rotation::Credentials::reload`]) sees a key that does not belong to
    ///    the certificate and keeps what it had, or asks again.
    /// 3. the new pair.
    ///
    /// There is no instant at which the pair on disk does not belong together and the
    /// file that completes it is gone, nor at which the old pair is gone while the new
    /// one is not complete somewhere on disk.
    ///
    /// Why the certificate first: the key is the pair's secret and the one file no one
    /// can give back, so the old key stays until the very last step, and the key's
    /// rename is the single point at which the installation happens. Should that last
    /// rename fail (the key is a mount point, an I/O error), the old certificate is put
    /// back from a hard link made before it was replaced: a failed installation leaves
    /// the old pair too. What that takes is a second name for the old *certificate*,
    /// which is public; the reverse order would need one for the old key, a second copy
    /// of a secret to keep track of. ([`finish_install`] also completes the reverse
    /// order's intermediate state, which an earlier agent's leftovers may be in.)
    fn commit(&mut self, rename: impl Fn(&Path, &Path) -> std::io::Result<()>) -> Result<()> {
        let p = self.paths.clone();
        let _ = std::fs::remove_file(&p.prev_cert);
        // A hard link keeps the old certificate's contents and modification time,
        // from which the rotation is scheduled, as they were.
        let old_cert = match std::fs::hard_link(&p.cert, &p.prev_cert) {
            Ok(()) => OldCert::Kept,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OldCert::None,
            Err(_) => OldCert::Lost,
        };
        if let Err(e) = rename(&p.next_cert, &p.cert) {
            let _ = std::fs::remove_file(&p.prev_cert);
            return Err(e).with_context(|| {
                format!(
                    "cannot move the new certificate into --tls-cert {}; the old key and certificate were left in place",
                    p.cert.display()
                )
            });
        }
        sync_dir(parent_dir(&p.cert));
        self.keep = true;
        let Err(e) = rename(&p.next_key, &p.key) else {
            sync_dir(parent_dir(&p.key));
            let _ = std::fs::remove_file(&p.prev_cert);
            return Ok(());
        };
        let failed = format!(
            "cannot move the new key {} into --tls-key {}: {e}",
            p.next_key.display(),
            p.key.display()
        );
        let undone = match old_cert {
            OldCert::Kept => rename(&p.prev_cert, &p.cert),
            OldCert::None => std::fs::remove_file(&p.cert),
            OldCert::Lost => Err(std::io::Error::other(
                "it could not be kept aside (no hard links here)",
            )),
        };
        match undone {
            Ok(()) => {
                sync_dir(parent_dir(&p.cert));
                self.keep = false;
                bail!("{failed}; the old key and certificate were put back")
            }
            Err(u) => bail!(
                "{failed}; the new certificate is in place and the old one cannot be put back ({u}): the next start completes the installation from {}",
                p.next_key.display()
            ),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for f in [&self.paths.next_key, &self.paths.next_cert] {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The raw public key the first certificate of the PEM file `path` certifies.
fn certified_key(path: &Path) -> Option<Vec<u8>> {
    let der = first_certificate(&std::fs::read(path).ok()?).ok()?;
    describe(&der).ok().map(|(_, spki)| spki)
}

/// The raw public key of the PKCS#8 PEM private key in `path`.
fn public_key(path: &Path) -> Option<Vec<u8>> {
    let pair = KeyPair::from_pem(&std::fs::read_to_string(path).ok()?).ok()?;
    Some(pair.public_key_raw().to_vec())
}

/// Whether both are known and the same.
fn same(a: Option<&Vec<u8>>, b: Option<&Vec<u8>>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a == b)
}

/// Moves `from` into `to` (`what` names it in the error), durably.
fn move_into(from: &Path, to: &Path, what: &str) -> Result<()> {
    std::fs::rename(from, to).with_context(|| {
        format!(
            "cannot move {} into {what} {}",
            from.display(),
            to.display()
        )
    })?;
    sync_dir(parent_dir(to));
    Ok(())
}

/// Completes or discards what an interrupted installation ([`Staged`]) left beside
/// `cert` (`--tls-cert`) and `key` (`--tls-key`); nothing happens when it left
/// nothing, whatever the key's directory. Otherwise the directory is checked
/// ([`check_key_dir`]), and then:
///
/// - a staged certificate and a staged key that belong together (the crash came after
///   both were staged, before either was moved) are moved into place, certificate
///   first: the certificate was checked before it was staged;
/// - else a staged key that belongs to the certificate in place (the crash came
///   between the two renames), or a staged certificate that belongs to the key in
///   place (the same with the reverse order), is moved into place;
/// - whatever else is left (a key whose certificate never arrived, the old
///   certificate kept aside) is removed, and the pair in place is left as it is.
pub fn finish_install(cert: &Path, key: &Path) -> Result<()> {
    let p = Paths::new(cert, key);
    if !p.leftovers().iter().any(|f| present(f)) {
        return Ok(());
    }
    check_key_dir(key)?;
    if present(&p.next_key) {
        check_private(&p.next_key, Private::KeyFile, effective_uid())?;
    }
    let in_place = (certified_key(cert), public_key(key));
    let staged = (certified_key(&p.next_cert), public_key(&p.next_key));
    if same(staged.0.as_ref(), staged.1.as_ref()) {
        move_into(&p.next_cert, cert, "--tls-cert")?;
        move_into(&p.next_key, key, "--tls-key")?;
        info!(cert = %cert.display(), key = %key.display(), "installed the node key and certificate whose installation a restart interrupted");
    } else if same(staged.1.as_ref(), in_place.0.as_ref()) {
        move_into(&p.next_key, key, "--tls-key")?;
        info!(cert = %cert.display(), key = %key.display(), "moved into place the node key whose certificate was installed before a restart");
    } else if same(staged.0.as_ref(), in_place.1.as_ref()) {
        move_into(&p.next_cert, cert, "--tls-cert")?;
        info!(cert = %cert.display(), key = %key.display(), "moved into place the node certificate whose key was installed before a restart");
    }
    for f in p.leftovers() {
        if present(f) {
            std::fs::remove_file(f).with_context(|| format!("cannot remove {}", f.display()))?;
            sync_dir(parent_dir(f));
            info!(file = %f.display(), "removed what an interrupted node key installation left");
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{CertificateParams, DistinguishedName, DnType};
    use twill_common::tls::NODES_GROUP;

    use super::super::{check_certificate, check_mode, CertCheck};
    use super::*;

    /// A self-signed node certificate for `node` and `key`: [`check_issued`] and
    /// [`finish_install`] look at the subject and the key, not at the issuer.
    pub(in crate::identity) fn cert_for(node: &str, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        dn.push(DnType::OrganizationName, NODES_GROUP);
        params.distinguished_name = dn;
        params.self_signed(key).unwrap().pem()
    }

    /// A private directory holding a working pair for node-a, and what it holds.
    struct Old {
        _dir: tempfile::TempDir,
        pki: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        cert_bytes: Vec<u8>,
        key_bytes: Vec<u8>,
    }

    impl Old {
        fn new() -> Old {
            let dir = tempfile::tempdir().unwrap();
            let pki = dir.path().join("pki");
            let (cert, key) = (pki.join("node.crt"), pki.join("node.key"));
            check_key_dir(&key).unwrap();
            let pair = generate_key().unwrap();
            write_atomic(&cert, cert_for("node-a", &pair).as_bytes(), CERT_MODE).unwrap();
            write_atomic(&key, pair.serialize_pem().as_bytes(), KEY_MODE).unwrap();
            Old {
                cert_bytes: std::fs::read(&cert).unwrap(),
                key_bytes: std::fs::read(&key).unwrap(),
                _dir: dir,
                pki,
                cert,
                key,
            }
        }

        /// The old pair is in place, byte for byte, and nothing beside it.
        fn untouched(&self) {
            assert_eq!(std::fs::read(&self.key).unwrap(), self.key_bytes);
            assert_eq!(std::fs::read(&self.cert).unwrap(), self.cert_bytes);
            self.alone();
        }

        /// Nothing but node.crt and node.key in the directory.
        fn alone(&self) {
            let mut names: Vec<_> = std::fs::read_dir(&self.pki)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["node.crt", "node.key"]);
        }

        /// `pair` and its certificate are in place, usable, and nothing beside them.
        fn installed(&self, pair: &KeyPair) {
            assert_eq!(
                std::fs::read_to_string(&self.key).unwrap(),
                pair.serialize_pem()
            );
            match check_certificate(&self.cert, &self.key, "node-a", now_unix()) {
                CertCheck::Usable(_) => {}
                CertCheck::Needed(why) => panic!("{why}"),
            }
            check_mode(&self.key, KEY_MODE).unwrap();
            self.alone();
        }

        /// A staged installation whose certificate is staged too, as just before
        /// [`Staged::commit`], with the staged key.
        fn staged_both(&self) -> (Staged, KeyPair) {
            let staged = Staged::new(&self.cert, &self.key).unwrap();
            let chain = cert_for("node-a", staged.key());
            write_atomic(&staged.paths.next_cert, chain.as_bytes(), CERT_MODE).unwrap();
            let pair = KeyPair::from_pem(&staged.key().serialize_pem()).unwrap();
            (staged, pair)
        }
    }

    #[test]
    fn an_installation_replaces_the_pair_and_leaves_nothing_beside_it() {
        let old = Old::new();
        let staged = Staged::new(&old.cert, &old.key).unwrap();
        check_mode(&staged.paths.next_key, KEY_MODE).unwrap();
        old.cert_untouched_while_staged(&staged);
        let pair = KeyPair::from_pem(&staged.key().serialize_pem()).unwrap();
        let info = staged
            .install(&cert_for("node-a", &pair), "node-a")
            .unwrap();
        assert_eq!(info.node, "node-a");
        old.installed(&pair);
        check_mode(&old.cert, CERT_MODE).unwrap();
    }

    impl Old {
        /// While a key is staged, the pair in place is the old one.
        fn cert_untouched_while_staged(&self, staged: &Staged) {
            assert!(present(&staged.paths.next_key));
            assert_eq!(std::fs::read(&self.key).unwrap(), self.key_bytes);
            assert_eq!(std::fs::read(&self.cert).unwrap(), self.cert_bytes);
        }
    }

    #[test]
    fn a_wrong_answer_leaves_the_old_pair_and_removes_the_staged_key() {
        let old = Old::new();
        let answers = [
            cert_for("node-a", &generate_key().unwrap()),
            "garbage".to_string(),
            String::new(),
        ];
        for chain in answers {
            let staged = Staged::new(&old.cert, &old.key).unwrap();
            assert!(staged.install(&chain, "node-a").is_err());
            old.untouched();
        }
        let staged = Staged::new(&old.cert, &old.key).unwrap();
        let other_node = cert_for("node-b", staged.key());
        let why = staged.install(&other_node, "node-a").unwrap_err();
        assert!(why.to_string().contains("node-b"), "{why}");
        old.untouched();
        // Abandoned (a cancelled bootstrap, a refusal).
        drop(Staged::new(&old.cert, &old.key).unwrap());
        old.untouched();
    }

    #[test]
    fn a_crash_between_the_renames_is_recovered_at_the_next_start() {
        // Certificate moved, crash before the key's rename.
        let old = Old::new();
        let (staged, pair) = old.staged_both();
        std::fs::rename(&staged.paths.next_cert, &old.cert).unwrap();
        std::mem::forget(staged); // The crash: no clean-up.
        assert!(matches!(
            check_certificate(&old.cert, &old.key, "node-a", now_unix()),
            CertCheck::Needed(_)
        ));
        finish_install(&old.cert, &old.key).unwrap();
        old.installed(&pair);

        // Both staged, crash before either rename: the checked pair is installed.
        let old = Old::new();
        let (staged, pair) = old.staged_both();
        std::mem::forget(staged);
        finish_install(&old.cert, &old.key).unwrap();
        old.installed(&pair);

        // The reverse order's intermediate state (an earlier agent's, or renames
        // made durable out of order): the key moved, the certificate staged.
        let old = Old::new();
        let (staged, pair) = old.staged_both();
        std::fs::rename(&staged.paths.next_key, &old.key).unwrap();
        std::mem::forget(staged);
        finish_install(&old.cert, &old.key).unwrap();
        old.installed(&pair);

        // Crash in the middle of a rollback (the old certificate still kept aside):
        // forward, and the old certificate's second name removed.
        let old = Old::new();
        let (staged, pair) = old.staged_both();
        std::fs::hard_link(&old.cert, &staged.paths.prev_cert).unwrap();
        std::fs::rename(&staged.paths.next_cert, &old.cert).unwrap();
        std::mem::forget(staged);
        finish_install(&old.cert, &old.key).unwrap();
        old.installed(&pair);

        // The next attempt recovers too: Staged::new finishes first.
        let old = Old::new();
        let (staged, pair) = old.staged_both();
        std::fs::rename(&staged.paths.next_cert, &old.cert).unwrap();
        std::mem::forget(staged);
        let next = Staged::new(&old.cert, &old.key).unwrap();
        assert_eq!(
            std::fs::read_to_string(&old.key).unwrap(),
            pair.serialize_pem()
        );
        drop(next);
        old.installed(&pair);
    }

    #[test]
    fn a_crash_before_the_certificate_arrived_leaves_the_old_pair() {
        let old = Old::new();
        // Nothing left: nothing done, whatever the directory.
        finish_install(&old.cert, &old.key).unwrap();
        old.untouched();

        let staged = Staged::new(&old.cert, &old.key).unwrap();
        std::mem::forget(staged);
        finish_install(&old.cert, &old.key).unwrap();
        old.untouched();

        // A staged pair that does not belong together, a stray old certificate.
        let (staged, _) = old.staged_both();
        std::fs::write(
            &staged.paths.next_cert,
            cert_for("node-a", &generate_key().unwrap()),
        )
        .unwrap();
        std::fs::write(&staged.paths.prev_cert, "old").unwrap();
        std::mem::forget(staged);
        finish_install(&old.cert, &old.key).unwrap();
        old.untouched();
    }

    #[test]
    fn leftovers_in_an_open_directory_or_a_linked_staged_key_are_refused() {
        let old = Old::new();
        let staged = Staged::new(&old.cert, &old.key).unwrap();
        let next_key = staged.paths.next_key.clone();
        std::mem::forget(staged);
        std::fs::set_permissions(&old.pki, std::fs::Permissions::from_mode(0o770)).unwrap();
        let why = format!("{:#}", finish_install(&old.cert, &old.key).unwrap_err());
        assert!(why.contains("chmod 0700"), "{why}");
        assert!(present(&next_key));
        std::fs::set_permissions(&old.pki, std::fs::Permissions::from_mode(0o700)).unwrap();

        let elsewhere = old.pki.join("elsewhere");
        std::fs::rename(&next_key, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &next_key).unwrap();
        let why = format!("{:#}", finish_install(&old.cert, &old.key).unwrap_err());
        assert!(
            why.contains("symlink") && why.contains(&next_key.display().to_string()),
            "{why}"
        );
    }

    /// A `rename` that fails with `why` when moving into `target`.
    fn failing_at<'a>(
        target: &'a Path,
        why: &'static str,
    ) -> impl Fn(&Path, &Path) -> std::io::Result<()> + 'a {
        move |from, to| {
            if to == target {
                Err(std::io::Error::other(why))
            } else {
                std::fs::rename(from, to)
            }
        }
    }

    /// The key's rename fails: the old certificate is put back, the staged key
    /// removed. A failure of the certificate's rename changes nothing.
    #[test]
    fn a_failed_rename_leaves_the_old_pair() {
        let old = Old::new();
        let (mut staged, _) = old.staged_both();
        let why = staged
            .commit(failing_at(&old.key, "device or resource busy"))
            .unwrap_err();
        assert!(why.to_string().contains("put back"), "{why}");
        drop(staged);
        old.untouched();

        let (mut staged, _) = old.staged_both();
        staged
            .commit(failing_at(&old.cert, "read-only"))
            .unwrap_err();
        drop(staged);
        old.untouched();

        // No certificate before (a first bootstrap over a stray key): none after.
        std::fs::remove_file(&old.cert).unwrap();
        let (mut staged, _) = old.staged_both();
        staged.commit(failing_at(&old.key, "busy")).unwrap_err();
        drop(staged);
        assert!(!old.cert.exists());
        assert_eq!(std::fs::read(&old.key).unwrap(), old.key_bytes);
    }
}
