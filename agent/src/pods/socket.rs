//! Reports from `twill-cni` to the agent: one JSON line per connection on a Unix
//! socket (default [`DEFAULT_SOCKET`]), answered `ok` once the report is applied and
//! saved; and, for when the agent is down, a queue of report files in
//! [`queue_dir`] that the plugin writes and the agent drains.
//!
//! Who may send: root, or the agent's own user (the socket's directory is mode 0700
//! and the socket 0600; the peer's uid is checked as well, so a looser directory left
//! by an operator does not open it). A pod's ADD never waits on the agent for more
//! than [`SEND_TIMEOUT`]: after that the report is queued instead.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::{Attachments, Report};
use crate::identity::ensure_dir;

/// Where the agent listens and `twill-cni` reports, unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/twill/agent.sock";
/// How long the plugin waits for the agent before it queues the report instead.
pub const SEND_TIMEOUT: Duration = Duration::from_millis(200);
/// Largest report line accepted (a report is a few hundred bytes).
const MAX_LINE: u64 = 64 << 10;
/// How long a connection may take to send its line.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The queue of reports the agent could not take at once: `reports/` beside the
/// socket (under /run: a reboot empties it together with every pod it spoke of).
pub fn queue_dir(socket: &Path) -> PathBuf {
    socket.with_file_name("reports")
}

/// Reports journaled before the journal is folded into the saved set.
const COMPACT_EVERY: usize = 1000;

/// The node's attachments, shared by the socket and the agent's loop. Saved as a
/// snapshot (`file`) and a journal beside it (`<file>.journal`, one report per line,
/// appended before a report is answered: a pod's ADD pays a small append, not a
/// rewrite of the whole set), folded into the snapshot every [`COMPACT_EVERY`]
/// reports and at start. Neither is synced: a machine that crashes takes its pods
/// with it.
pub struct Pods {
    state: Mutex<State>,
    file: PathBuf,
}

struct State {
    set: Attachments,
    /// `None` when the files cannot be written: reports are refused (twill-cni
    /// queues them) until the agent restarts with a writable directory.
    journal: Option<std::fs::File>,
    journaled: usize,
}

impl Pods {
    /// The set saved in `file` and its journal. A snapshot that cannot be read or
    /// parsed is set aside (renamed `.damaged`), the set starts from the journal alone
    /// and the reason is logged: a damaged file must not keep the agent, and every
    /// pod's networking, from starting. A journal line that does not parse (the end of
    /// a write cut short) is skipped. Files that cannot be written are logged, and
    /// reports refused.
    pub fn open(file: &Path) -> Pods {
        let mut set = match Attachments::load(file) {
            Ok(set) => set,
            Err(e) => {
                let aside = file.with_extension("damaged");
                let _ = std::fs::rename(file, &aside);
                warn!(file = %file.display(), moved_to = %aside.display(), error = %e, "the saved pod attachments cannot be read; starting with none");
                Attachments::default()
            }
        };
        let journal = journal_of(file);
        if let Ok(text) = std::fs::read(&journal) {
            for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                if let Ok(r) = Report::parse(line) {
                    set.apply(r);
                }
            }
        }
        // Appending (O_APPEND): after the journal is emptied, writes start again at
        // its beginning, not at the old offset.
        let opened = set.save(file).and_then(|()| {
            let j = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&journal)?;
            j.set_len(0)?;
            Ok(j)
        });
        let journal = match opened {
            Ok(j) => Some(j),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot write the pod attachments (--attachments-file); pod reports are refused and wait in twill-cni's queue");
                None
            }
        };
        Pods {
            state: Mutex::new(State {
                set,
                journal,
                journaled: 0,
            }),
            file: file.to_path_buf(),
        }
    }

    /// Applies `r` and journals it when it changed the set.
    pub fn apply(&self, r: Report) -> std::io::Result<bool> {
        let mut line = serde_json::to_vec(&r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let Some(journal) = st.journal.as_mut() else {
            return Err(std::io::Error::other(format!(
                "{} cannot be written",
                self.file.display()
            )));
        };
        if !st.set.apply(r) {
            return Ok(false);
        }
        journal.write_all(&line)?;
        st.journaled += 1;
        if st.journaled >= COMPACT_EVERY {
            st.set.save(&self.file)?;
            journal.set_len(0)?;
            st.journaled = 0;
        }
        Ok(true)
    }

    /// A copy of the set.
    pub fn snapshot(&self) -> Attachments {
        self.state.lock().set.clone()
    }

    /// Applies every report queued in `dir` (oldest first) and removes each file once
    /// applied; how many were applied. A file that is not a valid report, or that
    /// neither root nor the agent's user wrote, is removed with a warning.
    pub fn drain(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        let me = nix::unistd::geteuid().as_raw();
        let mut applied = 0;
        for path in files {
            // The same rule as the socket's: what another user wrote is not a report.
            let owner = std::fs::symlink_metadata(&path).map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.uid(), m.file_type().is_file())
            });
            match owner {
                Ok((uid, true)) if uid == 0 || uid == me => {}
                Ok((uid, _)) => {
                    warn!(file = %path.display(), uid, "dropping a queued report not written by root or the agent's user");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                Err(_) => continue,
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match Report::parse(&bytes) {
                Ok(r) => match self.apply(r) {
                    Ok(_) => applied += 1,
                    Err(e) => {
                        warn!(file = %self.file.display(), error = %e, "cannot save the pod attachments; the queued report stays");
                        return applied;
                    }
                },
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "dropping a queued report that is not valid")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        applied
    }
}

/// The journal beside the snapshot `file`.
fn journal_of(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// Listens on `socket`: its directory made (0700) if missing, a stale socket file
/// replaced, the socket itself 0600.
pub fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        ensure_dir(dir, 0o700)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves reports on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, pods: Arc<Pods>) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot accept a twill-cni connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let pods = pods.clone();
        tokio::spawn(async move {
            if let Err(why) = one(stream, &pods, me).await {
                warn!(error = %why, "twill-cni report refused");
            }
        });
    }
}

/// Reads one report from `stream`, applies it when its sender may report, and
/// answers either way (the line is read first: closing on unread data would reset the
/// connection before the sender could read why).
async fn one(stream: UnixStream, pods: &Pods, me: u32) -> Result<(), String> {
    let uid = stream.peer_cred().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| "no report within 2 s".to_string())?
        .map_err(|e| e.to_string())?;
    let answer = match uid {
        Err(e) => format!("error: cannot read the peer's credentials: {e}\n"),
        Ok(uid) if uid != 0 && uid != me => format!(
            "error: uid {uid} is neither root nor the agent's user; only twill-cni run by the runtime may report\n"
        ),
        Ok(_) => match Report::parse(&line) {
            Ok(r) => {
                let (op, key) = (r.op, r.attachment.key.clone());
                match pods.apply(r) {
                    Ok(_) => {
                        info!(network = %key.network, container = %key.container_id, ifname = %key.ifname, op = ?op, "pod attachment reported");
                        "ok\n".to_string()
                    }
                    Err(e) => format!("error: cannot save the attachments: {e}\n"),
                }
            }
            Err(e) => format!("error: {e}\n"),
        },
    };
    let _ = write.write_all(answer.as_bytes()).await;
    match answer.strip_prefix("error: ") {
        Some(why) => Err(why.trim_end().to_string()),
        None => Ok(()),
    }
}

/// `twill-cni`'s side: sends `report` to the agent on `socket`, or queues it in
/// [`queue_dir`] when the agent does not take it within [`SEND_TIMEOUT`]. Errors are
/// returned for the plugin to print; they never fail the ADD or DEL.
pub fn deliver(socket: &Path, report: &Report) -> Result<(), String> {
    let line = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    match send(socket, &line) {
        Ok(()) => Ok(()),
        Err(why) => queue(&queue_dir(socket), report, &line).map_err(|e| {
            format!("the agent did not take the report ({why}) and it cannot be queued: {e}")
        }),
    }
}

fn send(socket: &Path, line: &[u8]) -> Result<(), String> {
    let mut s = StdStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(SEND_TIMEOUT))
        .and_then(|()| s.set_read_timeout(Some(SEND_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    s.write_all(line)
        .and_then(|()| s.write_all(b"\n"))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.take(4096)
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    match answer.trim_end() {
        "ok" => Ok(()),
        other => Err(other.to_string()),
    }
}

/// Writes `line` as a file of `dir` named so that a listing sorts it by time. The
/// directory and the file are given to the owner of the socket's directory: an agent
/// that runs as its own user (the systemd unit's `twill`) must be able to read and
/// remove what the plugin, run as root, queued.
fn queue(dir: &Path, report: &Report, line: &[u8]) -> std::io::Result<()> {
    ensure_dir(dir, 0o700)?;
    let k = &report.attachment.key;
    let name = format!(
        "{:020}-{}-{}-{}.json",
        report.at_ns, k.network, k.container_id, k.ifname
    );
    let file = dir.join(name);
    // Under /run: not synced, a reboot empties it with the pods it speaks of.
    twill_common::fs::write_whole(&file, line, 0o600)?;
    let owner = dir.parent().and_then(|p| std::fs::metadata(p).ok());
    if let Some(m) = owner {
        use std::os::unix::fs::MetadataExt;
        for path in [dir, file.as_path()] {
            std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::report;
    use super::super::Op;
    use super::*;

    #[tokio::test]
    async fn a_report_reaches_the_agent_and_one_sent_while_it_is_down_is_queued_then_drained() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        let pods = Arc::new(Pods::open(&dir.path().join("state/attachments.json")));

        // The agent is down: the report waits in the queue.
        let add = report(Op::Add, 10, "a", "10.244.1.2");
        deliver(&socket, &add).unwrap();
        assert_eq!(std::fs::read_dir(queue_dir(&socket)).unwrap().count(), 1);
        assert!(pods.snapshot().is_empty());

        let listener = bind(&socket).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let server = tokio::spawn(serve(listener, pods.clone()));
        assert_eq!(pods.drain(&queue_dir(&socket)), 1);
        assert_eq!(std::fs::read_dir(queue_dir(&socket)).unwrap().count(), 0);
        assert_eq!(pods.snapshot().len(), 1);

        // Up: straight in, and saved.
        let socket2 = socket.clone();
        tokio::task::spawn_blocking(move || {
            deliver(&socket2, &report(Op::Add, 11, "b", "10.244.1.3"))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(pods.snapshot().len(), 2);
        let reopened = Pods::open(&dir.path().join("state/attachments.json"));
        assert_eq!(reopened.snapshot(), pods.snapshot(), "survives a restart");

        // A bad report is refused with the reason and changes nothing.
        let mut bad = report(Op::Add, 12, "c", "10.244.1.4");
        bad.attachment.key.ifname = "no/slash".into();
        let line = serde_json::to_vec(&bad).unwrap();
        let socket3 = socket.clone();
        let why = tokio::task::spawn_blocking(move || send(&socket3, &line))
            .await
            .unwrap()
            .unwrap_err();
        assert!(why.contains("ifname"), "{why}");
        assert_eq!(pods.snapshot().len(), 2);
        server.abort();
    }

    #[test]
    #[cfg_attr(
        not(twill_lab),
        ignore = "needs root (a file owned by another user); CI runs it"
    )]
    fn a_queued_report_written_by_another_user_is_dropped() {
        if !nix::unistd::geteuid().is_root() {
            return twill_tests::kit::skip(
                "a_queued_report_written_by_another_user_is_dropped",
                "needs root to own a file as another user",
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("reports");
        let r = report(Op::Add, 10, "a", "10.244.1.2");
        queue_for_test(&queue, &r);
        let file = std::fs::read_dir(&queue)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        let pods = Pods::open(&dir.path().join("attachments.json"));
        assert_eq!(pods.drain(&queue), 0);
        assert!(pods.snapshot().is_empty());
        assert!(!file.exists(), "dropped");
    }

    fn queue_for_test(dir: &Path, r: &Report) {
        let line = serde_json::to_vec(r).unwrap();
        queue(dir, r, &line).unwrap();
    }

    #[test]
    fn reports_are_journaled_and_a_write_cut_short_is_skipped_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("attachments.json");
        let pods = Pods::open(&file);
        for i in 0..(COMPACT_EVERY + 5) {
            let ip = format!("10.244.{}.{}", i / 250, i % 250 + 2);
            pods.apply(report(Op::Add, i as u64 + 1, &format!("c{i}"), &ip))
                .unwrap();
        }
        pods.apply(report(Op::Del, 5000, "c0", "10.244.0.2"))
            .unwrap();
        let want = pods.snapshot();
        drop(pods);
        let journal = journal_of(&file);
        let lines = std::fs::read_to_string(&journal).unwrap().lines().count();
        assert_eq!(lines, 6, "folded into the snapshot every {COMPACT_EVERY}");
        // The agent died in the middle of an append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap();
        f.write_all(b"{\"op\":\"add\",\"at_").unwrap();
        let reopened = Pods::open(&file);
        let got = reopened.snapshot();
        assert!(
            got == want,
            "{} attachments, want {}",
            got.len(),
            want.len()
        );
        assert_eq!(
            std::fs::metadata(&journal).unwrap().len(),
            0,
            "folded at start"
        );
    }

    #[test]
    fn a_damaged_state_file_is_set_aside_and_the_agent_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("attachments.json");
        std::fs::write(&file, b"garbage").unwrap();
        let pods = Pods::open(&file);
        assert!(pods.snapshot().is_empty());
        assert!(file.with_extension("damaged").exists());
    }
}
