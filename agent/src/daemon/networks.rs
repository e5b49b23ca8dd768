//! The network dimension of the agent (REFERENCE 2.10): which networks `--networks`
//! asks for, each joined network's lease keeping ([`Membership`]), and how one watch
//! stream's messages, which carry every watched network under one revision sequence,
//! are cut into one message per network. The daemon keeps a map of memberships keyed
//! by network name beside the kernel's map of overlays, as a dual-stack network keeps
//! a `PerFamily` of planes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Result};
use tonic::{Code, Status};
use tracing::warn;
use twill_agent::schedule::LeaseKeeping;
use twill_common::model::Lease;
use twill_common::networks::NetworkName;
use twill_common::NetConf;
use twill_proto::WatchResponse;

use crate::NetworkChoice;

/// What `--networks` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Wanted {
    /// These networks: one the controller does not serve, or that does not admit this
    /// node, is an error the operator must fix.
    Listed(Vec<NetworkName>),
    /// `*`: every network that admits this node, as they come and go.
    Every,
}

impl Wanted {
    /// The flag's entries: `*` alone, or names (each once).
    pub(super) fn new(choices: &[NetworkChoice]) -> Result<Wanted> {
        let mut names: Vec<NetworkName> = Vec::new();
        for choice in choices {
            match choice {
                NetworkChoice::Every if choices.len() == 1 => return Ok(Wanted::Every),
                NetworkChoice::Every => {
                    bail!("'*' joins every network that admits this node: list no names with it")
                }
                NetworkChoice::Named(n) if names.contains(n) => {
                    bail!("network {n} is listed twice")
                }
                NetworkChoice::Named(n) => names.push(n.clone()),
            }
        }
        if names.is_empty() {
            bail!("no network named: give network names, or '*'");
        }
        Ok(Wanted::Listed(names))
    }

    /// Whether the controller refusing `network` with `s` ends the agent: the
    /// operator must act. A listed network that is unknown or does not admit the node
    /// is a configuration error; with `*` a network the controller stops offering is
    /// simply left (its next ListNetworks omits it), except `default`, which admits
    /// every node.
    pub(super) fn fatal(&self, network: &NetworkName, s: &Status) -> bool {
        let listed = matches!(self, Wanted::Listed(_)) || network.is_default();
        match s.code() {
            Code::InvalidArgument | Code::Unauthenticated => true,
            Code::PermissionDenied | Code::NotFound => listed,
            _ => false,
        }
    }
}

/// One joined network's lease and what the loop knows about it.
pub(super) struct Membership {
    /// Its configuration, as the controller loaded it.
    pub conf: NetConf,
    /// The pod MTU written to its env file.
    pub mtu: u32,
    /// The lease held in it.
    pub lease: Option<Lease>,
    /// When its lease is next acquired or renewed.
    pub renew: LeaseKeeping,
    /// An Acquire for it is in flight.
    pub acquiring: bool,
    /// Its first Acquire was answered (granted or refused): the watch waits for
    /// every network's first answer, so that it opens with all of them at once.
    pub answered: bool,
    /// It was granted a lease since it was joined: the watch streams it.
    pub watched: bool,
    /// It is no longer offered (`*`): not renewed, and left once its lease ends.
    pub leaving: bool,
}

impl Membership {
    pub(super) fn new(conf: NetConf, mtu: u32, cap: Duration, margin: Option<Duration>) -> Self {
        Membership {
            conf,
            mtu,
            lease: None,
            renew: LeaseKeeping::new(cap, margin),
            acquiring: false,
            answered: false,
            watched: false,
            leaving: false,
        }
    }

    /// Whether a leaving network's lease is over at `now` (expired, or gone).
    pub(super) fn ended(&self, now: i64) -> bool {
        self.leaving && self.lease.as_ref().is_none_or(|l| l.expires_at_unix <= now)
    }
}

/// The networks a watch request names: none when `default` is the only one, so a
/// controller that predates several networks gets the request it always got.
pub(super) fn watch_list<'a>(watched: impl IntoIterator<Item = &'a NetworkName>) -> Vec<String> {
    let names: Vec<String> = watched.into_iter().map(|n| n.to_string()).collect();
    if names.len() == 1 && names[0] == twill_common::networks::DEFAULT_NETWORK {
        return Vec::new();
    }
    names
}

/// The networks a watch request's list means (empty: `default`).
pub(super) fn streamed(list: &[String]) -> BTreeSet<NetworkName> {
    if list.is_empty() {
        return BTreeSet::from([NetworkName::default_network()]);
    }
    list.iter()
        .filter_map(|n| NetworkName::from_wire(n).ok())
        .collect()
}

/// Cuts a complete watch message into one message per network, by each lease's
/// `network`. A reset covers every network of `covered` (the stream's), so each gets
/// one, empty when the network has no lease left; a batch goes only to the networks
/// it has events of. Events of networks outside `covered` are dropped.
pub(super) fn split(
    resp: &WatchResponse,
    covered: &BTreeSet<NetworkName>,
) -> BTreeMap<NetworkName, WatchResponse> {
    let empty = || WatchResponse {
        reset: resp.reset,
        events: Vec::new(),
        revision: resp.revision,
        more: false,
        epoch: resp.epoch.clone(),
        // Handled by the loop before the split.
        report_pods: false,
    };
    let mut parts: BTreeMap<NetworkName, WatchResponse> = BTreeMap::new();
    if resp.reset {
        parts.extend(covered.iter().map(|n| (n.clone(), empty())));
    }
    for ev in &resp.events {
        let Some(lease) = &ev.lease else { continue };
        let network = match NetworkName::from_wire(&lease.network) {
            Ok(n) if covered.contains(&n) => n,
            Ok(_) => continue,
            Err(e) => {
                warn!(peer = %lease.node_name, revision = ev.revision, error = %e, "ignoring a lease event with an invalid network name");
                continue;
            }
        };
        parts
            .entry(network)
            .or_insert_with(empty)
            .events
            .push(ev.clone());
    }
    parts
}

#[cfg(test)]
mod tests {
    use twill_proto::{Lease, LeaseEvent};

    use super::*;

    fn name(n: &str) -> NetworkName {
        NetworkName::new(n).unwrap()
    }

    fn event(node: &str, network: &str) -> LeaseEvent {
        LeaseEvent {
            lease: Some(Lease {
                node_name: node.into(),
                network: network.into(),
                ..Default::default()
            }),
            revision: 4,
            ..Default::default()
        }
    }

    #[test]
    fn the_flag_is_star_alone_or_names_each_once() {
        let blue = NetworkChoice::Named(name("blue"));
        assert_eq!(Wanted::new(&[NetworkChoice::Every]).unwrap(), Wanted::Every);
        assert_eq!(
            Wanted::new(std::slice::from_ref(&blue)).unwrap(),
            Wanted::Listed(vec![name("blue")])
        );
        let e = Wanted::new(&[NetworkChoice::Every, blue.clone()]).unwrap_err();
        assert!(e.to_string().contains("'*'"), "{e}");
        let e = Wanted::new(&[blue.clone(), blue]).unwrap_err();
        assert!(e.to_string().contains("blue is listed twice"), "{e}");
    }

    #[test]
    fn refusals_end_the_agent_for_listed_networks_only() {
        let listed = Wanted::Listed(vec![name("blue")]);
        let denied = Status::permission_denied("not admitted");
        assert!(listed.fatal(&name("blue"), &denied));
        assert!(listed.fatal(&name("blue"), &Status::not_found("no such network")));
        assert!(!listed.fatal(&name("blue"), &Status::failed_precondition("retired")));
        assert!(!Wanted::Every.fatal(&name("blue"), &denied));
        assert!(Wanted::Every.fatal(&NetworkName::default_network(), &denied));
        assert!(!Wanted::Every.fatal(&name("blue"), &Status::unavailable("away")));
    }

    #[test]
    fn the_watch_names_no_network_when_only_default_is_joined() {
        let default = NetworkName::default_network();
        assert!(watch_list([&default]).is_empty());
        assert_eq!(watch_list([&name("blue"), &default]), ["blue", "default"]);
        assert_eq!(streamed(&[]), BTreeSet::from([default.clone()]));
        assert_eq!(
            streamed(&["blue".into(), "default".into()]),
            BTreeSet::from([name("blue"), default])
        );
    }

    #[test]
    fn a_reset_reaches_every_covered_network_and_a_batch_only_its_own() {
        let covered = BTreeSet::from([NetworkName::default_network(), name("blue")]);
        let reset = WatchResponse {
            reset: true,
            revision: 4,
            events: vec![event("b", ""), event("c", "blue"), event("d", "red")],
            ..Default::default()
        };
        let parts = split(&reset, &covered);
        assert_eq!(parts.len(), 2, "red is not streamed");
        assert!(parts.values().all(|p| p.reset && p.revision == 4));
        assert_eq!(parts[&name("blue")].events.len(), 1);
        assert_eq!(parts[&NetworkName::default_network()].events.len(), 1);

        let lone = WatchResponse {
            reset: true,
            events: vec![event("c", "blue")],
            ..Default::default()
        };
        let parts = split(&lone, &covered);
        assert!(
            parts[&NetworkName::default_network()].events.is_empty(),
            "emptied"
        );

        let batch = WatchResponse {
            events: vec![event("c", "blue"), event("x", "Not A Name")],
            ..Default::default()
        };
        let parts = split(&batch, &covered);
        assert_eq!(parts.keys().collect::<Vec<_>>(), [&name("blue")]);
    }
}
