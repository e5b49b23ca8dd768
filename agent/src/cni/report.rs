//! Telling the node's agent of each attachment added or deleted (REFERENCE 2.11), so
//! it knows which pod holds which address. Best effort by design: a report that
//! cannot be sent is queued on disk for the agent ([`crate::pods::socket::deliver`]),
//! and one that cannot even be queued is printed on stderr; neither fails or slows
//! the pod's ADD or DEL beyond the send timeout.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::config::NetConf;
use super::Args;
use crate::pods::{socket, Attachment, Key, Op, Report};

/// Where host-local keeps its files unless `ipam.dataDir` says otherwise.
const HOST_LOCAL_DATA_DIR: &str = "/var/lib/cni/networks";

/// Reports a successful ADD whose delegate (configured as `delegate`) answered
/// `result`.
pub fn added(args: &Args, conf: &NetConf, delegate: &Map<String, Value>, result: &Value) {
    let pod_arg = |k: &str| {
        args.cni_args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    let attachment = Attachment {
        key: key(conf, &args.container_id, &args.ifname),
        netns: args.netns.clone(),
        namespace: pod_arg("K8S_POD_NAMESPACE"),
        pod: pod_arg("K8S_POD_NAME"),
        ipam_dir: ipam_dir(conf, delegate),
        ips: addresses(result),
        added_at_ns: 0,
    };
    send(conf, Op::Add, attachment);
}

/// Reports that `container_id`'s interface `ifname` was deleted.
pub fn deleted(conf: &NetConf, container_id: &str, ifname: &str) {
    let attachment = Attachment {
        key: key(conf, container_id, ifname),
        ..Attachment::default()
    };
    send(conf, Op::Del, attachment);
}

fn key(conf: &NetConf, container_id: &str, ifname: &str) -> Key {
    Key {
        network: conf.network.clone(),
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    }
}

fn send(conf: &NetConf, op: Op, attachment: Attachment) {
    let Some(socket) = &conf.agent_socket else {
        return;
    };
    if let Err(why) = socket::deliver(socket, &Report::now(op, attachment)) {
        eprintln!("twill-cni: the attachment is not reported to the agent: {why}");
    }
}

/// host-local's directory for this network, when the delegate's IPAM is host-local.
fn ipam_dir(conf: &NetConf, delegate: &Map<String, Value>) -> Option<PathBuf> {
    let ipam = delegate.get("ipam")?.as_object()?;
    if ipam.get("type").and_then(Value::as_str) != Some("host-local") {
        return None;
    }
    let base = ipam
        .get("dataDir")
        .and_then(Value::as_str)
        .unwrap_or(HOST_LOCAL_DATA_DIR);
    Some(PathBuf::from(base).join(&conf.name))
}

/// The addresses of a CNI result (`ips[].address`, CIDR notation).
fn addresses(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_report_names_the_pod_its_addresses_and_host_locals_directory() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let conf = NetConf::parse(
            json!({"cniVersion": "1.0.0", "name": "cbr0", "type": "twill-cni",
                   "agentSocket": socket, "ipam": {"dataDir": "/tmp/ipam"}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let args = Args {
            command: super::super::Command::Add,
            container_id: "abc".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            cni_path: "/opt/cni/bin".into(),
            cni_args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=front-1".into(),
        };
        let delegate =
            json!({"type": "bridge", "ipam": {"type": "host-local", "dataDir": "/tmp/ipam"}});
        let result = json!({"ips": [{"address": "10.244.1.5/24"}, {"address": "fd00::5/64"}]});
        // The agent is not there: the report is queued.
        added(&args, &conf, delegate.as_object().unwrap(), &result);
        let queued: Vec<_> = std::fs::read_dir(socket::queue_dir(&socket))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert_eq!(queued.len(), 1);
        let r = Report::parse(&queued[0]).unwrap();
        assert_eq!(r.op, Op::Add);
        let a = r.attachment;
        assert_eq!((a.namespace.as_str(), a.pod.as_str()), ("web", "front-1"));
        assert_eq!(a.key.network, "default");
        assert_eq!(a.ipam_dir, Some(PathBuf::from("/tmp/ipam/cbr0")));
        assert_eq!(
            a.ips,
            [
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(
            ipam_dir(
                &conf,
                json!({"ipam": {"type": "dhcp"}}).as_object().unwrap()
            ),
            None
        );
    }
}
