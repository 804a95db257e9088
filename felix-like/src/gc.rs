//! Garbage collection, one agent at a time: the leader holds `/tessera/v1/gc/leader` on an
//! etcd lease. Each pass reclaims dead nodes (lease lapsed), repairs what crashes left
//! (the datastore's `gc`), and releases allocations whose workload endpoint is gone after a
//! grace period and a re-check. Every repair is its own guarded transaction: pods keep
//! starting while it runs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_datastore::gc::{gc, reclaim_dead_node, GcOptions};
use tessera_datastore::kv::{Kv, Op, Txn};
use tessera_datastore::resources::list_all_workload_endpoints;
use tessera_datastore::snapshot::Snapshot;
use tessera_datastore::{keys, EtcdKv, Ipam};

use crate::config::GcSettings;
use crate::health::{KindLabel, Shared};

pub const LEADER_KEY: &str = "/tessera/v1/gc/leader";

pub async fn run(kv: EtcdKv, me: String, settings: GcSettings, shared: Arc<Shared>) {
    let mut lease: Option<i64> = None;
    let mut orphans_seen: HashMap<String, Instant> = HashMap::new();
    let period = Duration::from_secs(settings.interval_seconds.max(1));
    loop {
        tokio::time::sleep(period).await;
        lease = match lease {
            Some(id) => match kv.lease_keep_alive(id).await {
                Ok(ttl) if ttl > 0 => Some(id),
                _ => {
                    tracing::warn!("lost GC leadership");
                    None
                }
            },
            None => try_lead(&kv, &me, settings.leader_lease_seconds).await,
        };
        if lease.is_none() {
            orphans_seen.clear();
            continue;
        }
        if let Err(e) = pass(&kv, &settings, &shared, &mut orphans_seen).await {
            tracing::warn!(error = %e, "GC pass failed; next pass retries");
        }
    }
}

async fn try_lead(kv: &EtcdKv, me: &str, ttl: u64) -> Option<i64> {
    let id = kv.lease_grant(ttl.max(2) as i64).await.ok()?;
    let txn = Txn::new().expect(LEADER_KEY, 0).then(Op::Put {
        key: LEADER_KEY.into(),
        value: me.as_bytes().to_vec(),
        lease: Some(id),
    });
    match kv.txn(txn).await {
        Ok(o) if o.succeeded => {
            tracing::info!(node = me, "GC leader");
            Some(id)
        }
        _ => {
            let _ = kv.lease_revoke(id).await;
            None
        }
    }
}

fn count(shared: &Shared, kind: &str, n: usize) {
    if n > 0 {
        shared
            .metrics
            .gc_reclaims
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(n as u64);
    }
}

async fn pass(
    kv: &EtcdKv,
    settings: &GcSettings,
    shared: &Shared,
    orphans_seen: &mut HashMap<String, Instant>,
) -> anyhow::Result<()> {
    // Dead nodes: affinities of nodes whose liveness key is gone.
    let snap = Snapshot::read(kv).await?;
    let (live, _) = kv.get_prefix(keys::LIVENESS).await?;
    let live: HashSet<String> = live
        .iter()
        .filter_map(|k| k.key.strip_prefix(keys::LIVENESS).map(String::from))
        .collect();
    let nodes: HashSet<String> = kv
        .list_keys(keys::NODES)
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(keys::NODES).map(String::from))
        .collect();
    let holders: BTreeSet<String> = snap
        .affinities
        .keys()
        .map(|(n, _)| n.clone())
        .chain(snap.blocks.values().flat_map(|b| {
            b.value
                .allocated()
                .filter_map(|(_, a)| a.attrs.get("node").cloned())
                .collect::<Vec<_>>()
        }))
        .collect();
    for node in holders
        .iter()
        .filter(|n| nodes.contains(*n) && !live.contains(*n))
    {
        match reclaim_dead_node(kv, node).await {
            Ok(r) => {
                count(shared, "dead_node_addresses", r.addresses_released);
                count(shared, "dead_node_blocks", r.affinities_released);
            }
            Err(e) => tracing::info!(node, error = %e, "not reclaimed"),
        }
    }
    // What crashes left, and affinities of deleted nodes.
    let r = gc(kv, &GcOptions::default()).await?;
    count(
        shared,
        "pending_claims",
        r.pending_confirmed + r.pending_removed,
    );
    count(shared, "deleted_node_affinities", r.affinities_removed);
    count(
        shared,
        "leaked_addresses",
        r.allocations_freed + r.handles_removed,
    );
    // Workloads that are gone (no endpoint names the handle) after a grace period.
    let snap = Snapshot::read(kv).await?;
    let owned: HashSet<String> = list_all_workload_endpoints(kv)
        .await?
        .into_iter()
        .map(|w| w.handle)
        .collect();
    let candidates: HashSet<String> = snap
        .blocks
        .values()
        .flat_map(|b| {
            b.value
                .allocated()
                .filter(|(_, a)| a.attrs.contains_key("containerID"))
                .map(|(_, a)| a.handle.clone())
                .collect::<Vec<_>>()
        })
        .filter(|h| !owned.contains(h))
        .collect();
    orphans_seen.retain(|h, _| candidates.contains(h));
    let grace = Duration::from_secs(settings.workload_grace_seconds);
    let now = Instant::now();
    let due: Vec<String> = candidates
        .into_iter()
        .filter(|h| now.duration_since(*orphans_seen.entry(h.clone()).or_insert(now)) >= grace)
        .collect();
    if !due.is_empty() {
        // Re-check just before releasing: an endpoint written since keeps its addresses.
        let owned: HashSet<String> = list_all_workload_endpoints(kv)
            .await?
            .into_iter()
            .map(|w| w.handle)
            .collect();
        let ipam = Ipam::new(kv.clone(), "");
        for h in due.iter().filter(|h| !owned.contains(*h)) {
            let freed = ipam.release_by_handle(h).await?;
            tracing::info!(handle = %h, ?freed, "released the addresses of a workload that is gone");
            count(shared, "orphan_workload_addresses", freed.len());
            orphans_seen.remove(h);
        }
    }
    Ok(())
}
