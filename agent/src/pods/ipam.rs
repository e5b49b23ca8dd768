//! What the delegated IPAM holds, read back from host-local's directory, and the
//! attachment set checked against it.
//!
//! host-local keeps one file per held address in `<dataDir>/<network name>/`, named
//! by the address and holding `<containerID>\r\n<ifname>` (older versions: the
//! container ID alone), beside its `lock` and `last_reserved_ip.<range>` files.
//!
//! The check never calls an address leaked on a guess: only an address held for an
//! attachment whose network namespace is gone (a runtime that crashed before DEL) is a
//! leak. An address held for a container no report named is `unknown` (a pod from
//! before twill-cni, or a report lost with a damaged state file): counted and shown,
//! never released by the agent, since releasing a live pod's address would hand it to
//! a second pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::{Attachments, Key};

/// An address host-local holds, and for whom.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    /// The address (the file's name).
    pub ip: IpAddr,
    /// The container it is held for.
    pub container_id: String,
    /// Empty when host-local recorded none (older versions).
    pub ifname: String,
}

/// The addresses held in host-local's directory `dir`; none when it does not exist.
pub fn held(dir: &Path) -> std::io::Result<Vec<Held>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(ip) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let text = match std::fs::read_to_string(entry.path()) {
            Ok(t) => t,
            // Released between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut lines = text.lines().map(str::trim);
        out.push(Held {
            ip,
            container_id: lines.next().unwrap_or_default().to_string(),
            ifname: lines.next().unwrap_or_default().to_string(),
        });
    }
    out.sort();
    Ok(out)
}

/// What the check found on this node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    /// Addresses held for an attachment whose network namespace is gone.
    pub leaked: Vec<(Key, IpAddr)>,
    /// Addresses an attachment reports that its IPAM does not hold.
    pub conflicts: Vec<(Key, IpAddr)>,
    /// Addresses held for containers no report named.
    pub unknown: Vec<(PathBuf, Held)>,
}

/// Checks `set` against the addresses held in each IPAM directory (`held`, by
/// directory) and the network namespaces that exist (`netns_exists`).
pub fn check(
    set: &Attachments,
    held: &BTreeMap<PathBuf, Vec<Held>>,
    netns_exists: &dyn Fn(&str) -> bool,
) -> Findings {
    let mut f = Findings::default();
    let mut claimed: BTreeSet<(&Path, &str)> = BTreeSet::new();
    for a in set.iter() {
        let Some(dir) = a.ipam_dir.as_deref() else {
            continue;
        };
        claimed.insert((dir, a.key.container_id.as_str()));
        let in_dir = held.get(dir).map(Vec::as_slice).unwrap_or_default();
        let gone = !a.netns.is_empty() && !netns_exists(&a.netns);
        for ip in &a.ips {
            let holds = in_dir
                .iter()
                .any(|h| h.ip == *ip && h.container_id == a.key.container_id);
            match (holds, gone) {
                (true, true) => f.leaked.push((a.key.clone(), *ip)),
                (false, _) => f.conflicts.push((a.key.clone(), *ip)),
                (true, false) => {}
            }
        }
    }
    for (dir, hs) in held {
        for h in hs {
            if !claimed.contains(&(dir.as_path(), h.container_id.as_str())) {
                f.unknown.push((dir.clone(), h.clone()));
            }
        }
    }
    f
}

/// Releases `ip` from host-local's directory `dir` where it is held for
/// `container_id`, as host-local's own DEL does: under its lock (`<dir>/lock`), and
/// only while the file still names that container (a new pod may hold the address
/// by now). Whether it was released.
pub fn release(dir: &Path, ip: IpAddr, container_id: &str) -> std::io::Result<bool> {
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    let path = dir.join(ip.to_string());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if text.lines().next().map(str::trim) != Some(container_id) {
        return Ok(false);
    }
    std::fs::remove_file(&path)?;
    Ok(true)
}

/// How many of `held` fall in `subnet`.
pub fn used(held: &[Held], subnet: IpNet) -> u64 {
    held.iter().filter(|h| subnet.contains(&h.ip)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::super::tests::report;
    use super::super::Op;
    use super::*;

    fn write_held(dir: &Path, ip: &str, content: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(ip), content).unwrap();
    }

    #[test]
    fn host_locals_files_are_read_back_and_its_own_files_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cbr0");
        assert!(held(&d).unwrap().is_empty(), "no directory yet");
        write_held(&d, "10.244.1.2", "aaa\r\neth0");
        write_held(&d, "10.244.1.3", "bbb");
        write_held(&d, "fd00:10:244:1::2", "aaa\r\neth0\r\n");
        write_held(&d, "last_reserved_ip.0", "10.244.1.3");
        write_held(&d, "lock", "");
        let h = held(&d).unwrap();
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[0].container_id, "aaa");
        assert_eq!(h[0].ifname, "eth0");
        assert_eq!(h[1].container_id, "bbb");
        assert_eq!(h[1].ifname, "");
        assert_eq!(h[2].ip, "fd00:10:244:1::2".parse::<IpAddr>().unwrap());
        assert_eq!(used(&h, "10.244.1.0/24".parse().unwrap()), 2);
        assert_eq!(used(&h, "fd00:10:244:1::/64".parse().unwrap()), 1);
    }

    #[test]
    fn leaks_are_only_addresses_of_attachments_whose_namespace_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cbr0");
        write_held(&d, "10.244.1.2", "a\r\neth0");
        write_held(&d, "10.244.1.3", "b\r\neth0");
        write_held(&d, "10.244.1.4", "stranger\r\neth0");
        let mut set = Attachments::default();
        for (id, ip) in [
            ("a", "10.244.1.2"),
            ("b", "10.244.1.3"),
            ("c", "10.244.1.5"),
        ] {
            let mut r = report(Op::Add, 1, id, ip);
            r.attachment.ipam_dir = Some(d.clone());
            set.apply(r);
        }
        let held = BTreeMap::from([(d.clone(), held(&d).unwrap())]);
        let alive = |netns: &str| !netns.ends_with("/b");
        let f = check(&set, &held, &alive);
        let ids = |v: &[(Key, IpAddr)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, ip)| (k.container_id.clone(), ip.to_string()))
                .collect()
        };
        assert_eq!(
            ids(&f.leaked),
            [("b".to_string(), "10.244.1.3".to_string())]
        );
        assert_eq!(
            ids(&f.conflicts),
            [("c".to_string(), "10.244.1.5".to_string())],
            "reported but not held"
        );
        assert_eq!(f.unknown.len(), 1);
        assert_eq!(f.unknown[0].1.container_id, "stranger");
    }

    #[test]
    fn a_release_takes_only_the_address_still_held_for_that_container() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cbr0");
        write_held(&d, "10.244.1.2", "gone\r\neth0");
        write_held(&d, "10.244.1.3", "someone-else\r\neth0");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(release(&d, ip("10.244.1.2"), "gone").unwrap());
        assert!(!d.join("10.244.1.2").exists());
        assert!(
            !release(&d, ip("10.244.1.3"), "gone").unwrap(),
            "another pod's now"
        );
        assert!(d.join("10.244.1.3").exists());
        assert!(!release(&d, ip("10.244.1.9"), "gone").unwrap(), "not held");
    }
}
