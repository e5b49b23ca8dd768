//! CNI 1.1 `STATUS`: whether pods can be attached on this node now. Not while
//! subnet.env is missing or unusable (the agent holds no lease yet), and not while the
//! node's agent says it is unhealthy (`/healthz`: no live lease, or the controller
//! silent past the renew margin). The runtime then keeps pods off the node instead of
//! failing their ADDs.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::config::{self, NetConf};
use super::error::{code, CniError};

/// How long the agent has to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Ok when the plugin is available; code 50 saying why when it is not.
pub fn check(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |msg: String| CniError::new(code::PLUGIN_NOT_AVAILABLE, msg);
    config::load_subnet_env(&conf.subnet_file).map_err(|e| unavailable(e.msg))?;
    let Some(url) = &conf.agent_url else {
        return Ok(());
    };
    let healthz = format!("{url}/healthz");
    match get(url, "/healthz") {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(unavailable(format!(
            "twill-agent is not healthy ({healthz} answered {status}): {}",
            body.trim()
        ))),
        Err(e) => Err(unavailable(format!(
            "twill-agent does not answer at {healthz}: {e} (set agentURL in the CNI \
             configuration if it listens elsewhere, or \"\" to check subnet.env alone)"
        ))),
    }
}

/// `GET path` from `http://host:port`: the status and the body (HTTP/1.0, so the body
/// is never chunked).
fn get(url: &str, path: &str) -> std::io::Result<(u16, String)> {
    let authority = url
        .strip_prefix("http://")
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{authority} resolves to no address")))?;
    let mut s = TcpStream::connect_timeout(&addr, AGENT_TIMEOUT)?;
    s.set_read_timeout(Some(AGENT_TIMEOUT))?;
    s.set_write_timeout(Some(AGENT_TIMEOUT))?;
    // One write: a server may answer (and close) as soon as it has the request.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.take(64 << 10).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("the answer is not HTTP"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}
