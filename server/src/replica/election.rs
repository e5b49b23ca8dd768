//! The election: campaign under an etcd lease, lead while the lease is surely alive,
//! and follow who leads.
//!
//! A replica treats its leadership as lost as soon as it cannot prove its lease alive:
//! when no keep-alive sent within the last TTL was answered (a freeze, a partition, an
//! etcd without quorum) it detaches its writer before etcd could have handed the
//! election to another replica. Its store fence catches whatever it still tries to
//! write before it notices.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};
use twill_proto::etcd::etcdserverpb::{
    lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
};
use twill_proto::etcd::v3electionpb::{
    election_client::ElectionClient, CampaignRequest, LeaderKey, LeaderRequest, ResignRequest,
};

use super::Replica;
use crate::store::etcd::{put_leased, Fence};
use crate::store::schema::Key;
use crate::store::StoreError;

const RETRY: Duration = Duration::from_millis(500);

fn election_name(r: &Replica) -> Vec<u8> {
    r.store.etcd().key(&Key::Election)
}

/// Campaigns, leads, steps down and campaigns again, until shutdown.
pub async fn campaign(r: Arc<Replica>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        match term(&r, &mut shutdown).await {
            Ok(()) => {}
            Err(e) => {
                warn!(error = %e, "election round failed; campaigning again");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// One etcd lease: campaign with it, lead while it lives.
async fn term(r: &Arc<Replica>, shutdown: &mut watch::Receiver<bool>) -> Result<(), StoreError> {
    let etcd = r.store.etcd().clone();
    let asked = r.settings.leader_ttl.as_secs().max(1);
    let grant = etcd
        .timed(
            "granting the replica's lease",
            LeaseClient::new(etcd.channel()).lease_grant(LeaseGrantRequest {
                ttl: asked as i64,
                id: 0,
            }),
        )
        .await?;
    let lease = grant.id;
    // etcd may grant more than asked (its floor is 1.5 election timeouts); the
    // deadlines below follow what it granted, or a live leader would step down early.
    let ttl = Duration::from_secs(u64::try_from(grant.ttl).unwrap_or(0).max(asked));
    if ttl.as_secs() > asked {
        info!(
            asked_secs = asked,
            granted_secs = ttl.as_secs(),
            "etcd granted a longer lease than --leader-ttl (its floor is 1.5 election timeouts)"
        );
    }
    let (lost_tx, mut lost) = watch::channel(false);
    let keeper = tokio::spawn(keep_alive(r.clone(), lease, ttl, lost_tx));
    let result = async {
        // Registered under the lease, so a replica that dies leaves the list with it.
        etcd.txn(
            "registering the replica",
            Vec::new(),
            vec![put_leased(
                etcd.key(&Key::Replica(lease)),
                r.settings.advertise_url.clone().into_bytes(),
                lease,
            )],
        )
        .await?;
        let mut election = ElectionClient::new(etcd.channel());
        let won = tokio::select! {
            won = election.campaign(CampaignRequest {
                name: election_name(r),
                lease,
                value: r.settings.advertise_url.clone().into_bytes(),
            }) => won.map_err(|e| StoreError::Etcd("the campaign".into(), e))?,
            _ = lost.wait_for(|l| *l) => return Ok(()),
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let Some(key) = won.into_inner().leader else {
            return Err(StoreError::Backend(
                "etcd elected us without a leader key".into(),
            ));
        };
        lead(r, &key, ttl, &mut lost, shutdown).await;
        // Give the election up at once rather than at the lease's expiry, so the next
        // leader starts now (a rolling update, a writer that stopped).
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            election.resign(ResignRequest { leader: Some(key) }),
        )
        .await;
        Ok(())
    }
    .await;
    keeper.abort();
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        LeaseClient::new(etcd.channel()).lease_revoke(LeaseRevokeRequest { id: lease }),
    )
    .await;
    result
}

/// Leads from winning until the lease may have lapsed, the writer stops, or shutdown.
async fn lead(
    r: &Arc<Replica>,
    key: &LeaderKey,
    ttl: Duration,
    lost: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let started = Instant::now();
    r.store.set_fence(Some(Fence {
        key: key.key.clone(),
        revision: key.rev,
    }));
    let attached = async {
        // Build from etcd, not from what this replica remembers: the last leader's final
        // writes may not have reached our mirror yet.
        let (snap, _) = r.store.load_at().await?;
        r.elected.notify_one();
        let deadline = Instant::now() + ttl;
        while r.hub.leases().1 < snap.revision {
            if Instant::now() >= deadline {
                return Err(StoreError::Backend(format!(
                    "the watch did not reach revision {} within {}s",
                    snap.revision,
                    ttl.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Expiries as etcd holds them: a renewal the mirror has not applied yet must
        // not look like an expired lease to this writer's sweeper.
        r.hub.renew(&snap.leases);
        // Revocations and issued certificates as etcd holds them: the leader decides
        // bootstraps and renewals, and must not miss one the mirror has not applied.
        r.identity
            .reload()
            .await
            .map_err(|e| StoreError::Revocations(Box::new(e)))?;
        r.leases
            .attach(
                &r.networks.current(),
                r.store.clone(),
                r.hub.clone(),
                snap.reservations,
                r.metrics.clone(),
            )
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok::<_, StoreError>(snap.revision)
    }
    .await;
    match attached {
        Ok(revision) => {
            r.leading.store(true, Ordering::Relaxed);
            r.metrics.is_leader.set(1);
            r.set_leader(Some(r.settings.advertise_url.clone()));
            info!(
                revision,
                took_ms = started.elapsed().as_millis() as u64,
                "elected leader; the lease writer runs here"
            );
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = lost.wait_for(|l| *l) => {
                        warn!("cannot prove this replica's etcd lease alive; stepping down");
                        break;
                    }
                    _ = shutdown.wait_for(|s| *s) => {
                        info!("shutting down; resigning the leadership");
                        break;
                    }
                    _ = tick.tick() => {
                        if !r.leases.is_writing() {
                            warn!("the lease writer stopped; stepping down");
                            break;
                        }
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "elected, but could not load the table; stepping down"),
    }
    r.leading.store(false, Ordering::Relaxed);
    r.metrics.is_leader.set(0);
    r.leases.detach();
    r.store.set_fence(None);
}

/// Keeps the lease alive; sets `lost` once no keep-alive sent within the last TTL has
/// been answered, or etcd says the lease is gone.
async fn keep_alive(r: Arc<Replica>, lease: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let etcd = r.store.etcd().clone();
    // Measured from when the last answered keep-alive was sent: etcd counts the TTL
    // from when it received it, which is no earlier.
    let mut alive_since = Instant::now();
    let mut tick = tokio::time::interval(ttl / 3);
    'streams: loop {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut sent: VecDeque<Instant> = VecDeque::new();
        // etcd answers the call (its response headers) only once a request has come
        // in: queue the first one before opening it.
        if tx.send(LeaseKeepAliveRequest { id: lease }).await.is_ok() {
            sent.push_back(Instant::now());
        }
        let stream = tokio::time::timeout(
            ttl / 3,
            LeaseClient::new(etcd.channel()).lease_keep_alive(ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                if alive_since.elapsed() >= ttl {
                    lost.send_replace(true);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if alive_since.elapsed() >= ttl {
                        lost.send_replace(true);
                        return;
                    }
                    if tx.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                        continue 'streams;
                    }
                    sent.push_back(Instant::now());
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) if resp.ttl > 0 => {
                        if let Some(at) = sent.pop_front() {
                            alive_since = at;
                        }
                    }
                    Ok(Some(_)) => {
                        warn!(lease = format!("{lease:016x}"), "etcd says this replica's lease expired");
                        lost.send_replace(true);
                        return;
                    }
                    _ => continue 'streams,
                },
            }
        }
    }
}

/// Follows who leads (etcd's Observe), for forwarding and for `twillctl status`.
pub async fn observe(r: Arc<Replica>) {
    loop {
        let mut election = ElectionClient::new(r.store.etcd().channel());
        match election
            .observe(LeaderRequest {
                name: election_name(&r),
            })
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Ok(Some(resp)) = stream.message().await {
                    if let Some(kv) = resp.kv {
                        r.set_leader(Some(String::from_utf8_lossy(&kv.value).into_owned()));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e.message(), "cannot observe the election"),
        }
        if !r.is_leading() {
            // The leader we knew may be gone with the stream; say so rather than
            // forward to it until the next one is seen.
            r.set_leader(None);
        }
        tokio::time::sleep(RETRY).await;
    }
}
