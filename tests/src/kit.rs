//! What every test suite of the workspace needs, kept once: the lab and the harnesses
//! here use it, and so do the server's, ctl's, agent's and bench's own tests (through a
//! dev-dependency on this crate). Whether we run in CI and what a test that cannot run
//! does then, free loopback ports, a plain HTTP GET, the VTEP MAC of a test node. Polling with a deadline is
//! [`crate::wait`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

/// How long [`http_get`] waits for the connection.
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long [`http_get`] waits for each read and write.
const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether we run in CI: `CI` set to anything but empty, `0`, `false` or `no` (any
/// case, blanks ignored). CI provides everything the tests need (root, network
/// namespaces, etcd, the tools), so there a test that cannot run fails instead of
/// skipping, and a missing tool cannot hide a test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        )
    })
}

/// Prints `msg` between bars straight to the stderr handle: the test harness captures
/// `eprintln!` of passing tests, and a skip must be seen in a normal run.
pub fn loud(msg: &str) {
    let bar = "!".repeat(78);
    let _ = writeln!(std::io::stderr().lock(), "\n{bar}\n!!! {msg}\n{bar}\n");
}

/// A test (or a part of one) that cannot run on this machine: a loud
/// `SKIPPED: <test>: <why>`, or a failure (a panic) when [`in_ci`].
pub fn skip(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: {why}, and CI is set, so this is a failure, not a skip");
    }
    loud(&format!("SKIPPED: {test}: {why}"));
}

/// How many times [`on_taken_port`] starts a daemon whose port was taken.
const PORT_TRIES: usize = 5;

/// `start` (which picks its own free ports), started again while it fails because a
/// port was taken between being picked and bound (another process's outgoing
/// connection can be given the same ephemeral port), at most [`PORT_TRIES`] times in
/// all. Its error must carry the daemon's log, which tells whether a port was taken.
pub fn on_taken_port<T>(what: &str, mut start: impl FnMut() -> Result<T>) -> Result<T> {
    for attempt in 1.. {
        match start() {
            Err(e) if attempt < PORT_TRIES && port_taken(&format!("{e:#}")) => {
                loud(&format!(
                    "{what}: a port was taken before it was bound; trying others"
                ));
            }
            done => return done,
        }
    }
    unreachable!("the loop returns")
}

/// A daemon started by `start` on `n` free ports, started again on new ones when a
/// port was taken ([`on_taken_port`]). `start` returns the daemon, or why it did not
/// come up with its log.
pub fn on_free_ports<T>(n: usize, mut start: impl FnMut(&[u16]) -> Result<T, String>) -> T {
    on_taken_port("a daemon", || {
        let ports = free_ports(n)?;
        start(&ports).map_err(anyhow::Error::msg)
    })
    .unwrap_or_else(|why| panic!("{why:#}"))
}

/// Whether a daemon's log says it could not bind its port.
pub fn port_taken(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// `n` distinct free ports on 127.0.0.1: every listener is held until all are picked,
/// so the kernel cannot hand out one twice.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot bind a free port on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// A minimal HTTP/1.1 GET (`Connection: close`) from the current thread's network
/// namespace; the status and the body (de-chunked).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_CONNECT_TIMEOUT)
        .with_context(|| format!("cannot connect to http://{addr}"))?;
    s.set_read_timeout(Some(HTTP_IO_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_IO_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: twill-tests\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("no answer from http://{addr}{path}"))?;
    parse_http_response(&buf).with_context(|| format!("GET http://{addr}{path}"))
}

fn parse_http_response(buf: &[u8]) -> Result<HttpResponse> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response: {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk header")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// The VTEP MAC test node `node` announces (a hash of its name): its own, as every
/// node's must be, and the same in every run.
pub fn mac(node: &str) -> String {
    let h = node
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        .to_be_bytes();
    format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_responses() {
        let r = parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = parse_http_response(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
    }
}
