//! Spreading the agents over the replicas. An agent moves to another replica only when
//! the one it uses stops answering, so a replica that comes back (or is added) would
//! otherwise stay empty while the others carry everything. Every `--rebalance-interval`
//! each replica compares the agents watching it with its share (the nodes holding a
//! lease over the registered replicas, plus a twentieth) and asks those beyond its share
//! to move: their watch
//! ends with UNAVAILABLE and each resumes, from the revision it has, on another
//! replica of its list picked at random (its data plane untouched). Moves that land on
//! a replica already at its share are shed again the next round, so the excess halves
//! each round.
//!
//! Nothing moves while the registered replicas change, nor for a TTL of the election
//! after: a replica that died is still registered until its etcd lease lapses, and its
//! agents are landing on the others meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::Replica;

/// How many agents a replica serving `mine` of them should ask to move, when `nodes`
/// nodes hold leases and `replicas` replicas are registered: none while it is within
/// [`slack`] of its share, and none when it serves more agents than there are nodes
/// (its table is behind).
pub fn excess(mine: usize, nodes: usize, replicas: usize) -> usize {
    if replicas < 2 || mine > nodes {
        return 0;
    }
    let share = nodes.div_ceil(replicas);
    let slack = slack(share);
    if mine > share + slack {
        mine - share
    } else {
        0
    }
}

/// Rebalances every `every` until the process ends.
pub async fn run(r: Arc<Replica>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<(Vec<String>, Instant)> = None;
    loop {
        tick.tick().await;
        let urls = match r.read_replicas().await {
            Ok(urls) => urls,
            Err(e) => {
                debug!(error = %e, "cannot read the registered replicas; not rebalancing this round");
                continue;
            }
        };
        let since = match &seen {
            Some((last, since)) if *last == urls => *since,
            _ => Instant::now(),
        };
        seen = Some((urls.clone(), since));
        if since.elapsed() < r.settings.leader_ttl + every {
            continue;
        }
        let mine = r.agents.node_watchers();
        let nodes = r.hub.nodes();
        let extra = excess(mine, nodes, urls.len());
        if extra > 0 {
            let asked = r.agents.ask_to_move(extra);
            r.metrics.agents_moved.inc_by(asked as u64);
            info!(
                agents = mine,
                nodes,
                replicas = urls.len(),
                moving = asked,
                "serving more than this replica's share of the agents; asking some to move to another replica"
            );
        }
    }
}

/// How far above its share a replica may be and ask nobody to move: a twentieth of it,
/// at least one agent. Only those above shed, so every replica ends within this of its
/// share on the high side, and within twice it (with three replicas) on the low side.
pub fn slack(share: usize) -> usize {
    (share / 20).max(1)
}

#[cfg(test)]
mod tests {
    use super::excess;

    #[test]
    fn only_the_agents_beyond_a_replicas_share_and_its_slack_move() {
        assert_eq!(excess(3000, 3000, 1), 0, "one replica: nowhere to go");
        // A replica came back: the two others hold 1,500 each, their share is 1,000.
        assert_eq!(excess(1500, 3000, 3), 500);
        assert_eq!(excess(0, 3000, 3), 0);
        // Within a twentieth of the share: left alone (no moves back and forth).
        assert_eq!(excess(1050, 3000, 3), 0);
        assert_eq!(excess(1051, 3000, 3), 51);
        // Small clusters: one agent of slack.
        assert_eq!(excess(2, 3, 3), 0);
        assert_eq!(excess(3, 3, 3), 2);
        // More agents than nodes: the table is behind; nothing moves.
        assert_eq!(excess(10, 0, 3), 0);
        assert_eq!(excess(3001, 3000, 3), 0);
    }
}
