//! Garbage collection, one agent at a time: the leader holds [`keys::GC_LEADER`] on an etcd
//! lease. Each pass judges every node (below), repairs what crashes left (the datastore's
//! `gc`), and releases allocations whose workload endpoint is gone after a grace period and a
//! re-check. Every repair is its own guarded transaction: pods keep starting while it runs.
//!
//! A node is reclaimed only on evidence that it is gone ([`judge`]): the operator
//! decommissioned it, or its lease lapsed (it is *suspect*) more than `reclaimAfterSeconds`
//! ago **and** the witness finds no agent at its address. A lapsed lease alone only says the
//! node cannot reach etcd. Every reclaim transaction compares the leader key, the verdict
//! record and the node's liveness key, so a deposed leader or a returning node stops it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_datastore::gc::{
    gc_snapshot, mark_suspect, reclaim_node, GcOptions, ReclaimGuard, Verdict,
};
use tessera_datastore::kv::Kv;
use tessera_datastore::leader;
use tessera_datastore::model::Suspect;
use tessera_datastore::resources::list_all_workload_endpoints;
use tessera_datastore::snapshot::Snapshot;
use tessera_datastore::{keys, now_ms, EtcdKv, Ipam, IpamError};

use crate::config::GcSettings;
use crate::health::{KindLabel, NodeStateLabel, Shared};
use crate::witness::{self, Finding};

/// What GC does about one node in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// It holds its lease.
    Nothing,
    /// Its lease is gone and GC has not noticed before: it is suspect from now.
    MarkSuspect,
    /// Suspect for less than `reclaimAfterSeconds`.
    Wait { remaining_ms: u64 },
    /// Suspect for long enough: reclaim if the witness finds no agent.
    AskWitness { suspect_rev: i64 },
    /// The operator decommissioned it: reclaim now.
    Reclaim(Verdict),
}

/// The decision for one node, from what the datastore says of it. Pure.
pub fn judge(
    live: bool,
    suspect: Option<(u64, i64)>,
    decommission_rev: Option<i64>,
    now_ms: u64,
    reclaim_after_ms: u64,
) -> NodeAction {
    if let Some(record_rev) = decommission_rev {
        return NodeAction::Reclaim(Verdict::Decommissioned { record_rev });
    }
    if live {
        return NodeAction::Nothing;
    }
    match suspect {
        None => NodeAction::MarkSuspect,
        Some((since, _)) if now_ms.saturating_sub(since) < reclaim_after_ms => NodeAction::Wait {
            remaining_ms: reclaim_after_ms - now_ms.saturating_sub(since),
        },
        Some((_, suspect_rev)) => NodeAction::AskWitness { suspect_rev },
    }
}

/// Where a suspect node stands, for logs and the `tessera_node_suspect` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspectState {
    /// Suspect for less than `reclaimAfterSeconds`.
    Waiting,
    /// Suspect for long enough, but its agent answers the witness: not reclaimed.
    WitnessAnswered,
    /// Its Node record gives no witness address or identity: never reclaimed without a
    /// decommission.
    NoWitness,
    /// Reclaimed (nothing of it is held any more).
    Reclaimed,
    Decommissioned,
}

impl SuspectState {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspectState::Waiting => "waiting",
            SuspectState::WitnessAnswered => "witness_answered",
            SuspectState::NoWitness => "no_witness",
            SuspectState::Reclaimed => "reclaimed",
            SuspectState::Decommissioned => "decommissioned",
        }
    }
}

pub async fn run(kv: EtcdKv, me: String, settings: GcSettings, shared: Arc<Shared>) {
    let mut leading: Option<leader::Leadership> = None;
    let mut orphans_seen: HashMap<String, Instant> = HashMap::new();
    let mut reported: BTreeMap<String, SuspectState> = BTreeMap::new();
    let period = Duration::from_secs(settings.interval_seconds.max(1));
    let sweep_every = sweep_every(&settings);
    let mut passes: u64 = 0;
    loop {
        tokio::time::sleep(period).await;
        leading = match leading {
            Some(l) if leader::keep(&kv, &l).await => Some(l),
            Some(_) => {
                tracing::warn!("lost GC leadership");
                None
            }
            None => {
                let l = leader::try_lead(&kv, keys::GC_LEADER, &me, settings.leader_lease_seconds)
                    .await;
                if l.is_some() {
                    tracing::info!(node = me, "GC leader");
                }
                l
            }
        };
        let Some(l) = &leading else {
            orphans_seen.clear();
            reported.clear();
            shared.metrics.suspects.clear();
            passes = 0;
            continue;
        };
        let leader = (keys::GC_LEADER.to_string(), l.key_rev);
        let sweep = passes % sweep_every == 0;
        passes += 1;
        // The lease is kept alive while the pass runs: a pass longer than the lease (a
        // sweep or a reclaim at 5,000 pods with etcd busy) lost the leadership in the
        // middle, and the next leader's pass the same way (88 leaders in 20 minutes, a
        // decommissioned node reclaimed two minutes late). A pass cut short here leaves
        // what the next one finishes: every write is guarded.
        let l = *l;
        let keeper = async {
            let every = Duration::from_secs(settings.leader_lease_seconds.max(3) / 3);
            loop {
                tokio::time::sleep(every).await;
                if !leader::keep(&kv, &l).await {
                    return;
                }
            }
        };
        tokio::select! {
            done = pass(
                &kv,
                &settings,
                &shared,
                &leader,
                &mut orphans_seen,
                &mut reported,
                sweep,
            ) => {
                if let Err(e) = done {
                    tracing::warn!(error = %e, "GC pass failed; next pass retries");
                }
            }
            () = keeper => {
                tracing::warn!("lost GC leadership during a pass; the pass stopped");
                leading = None;
            }
        }
        // A sweep reads every block, endpoint and node: megabytes freed at once, on the one
        // node that leads. Without this its RSS climbed ~0.5 MiB a minute in the soak.
        tessera_routed::kernel::release_freed_memory();
    }
}

/// Every how many passes the leader sweeps for leaks (a full read of the datastore): about
/// twice per workload grace period, since an orphan is released only after it anyway, and
/// never less often than every pass. Judging nodes (reclaim) runs on every pass.
fn sweep_every(settings: &GcSettings) -> u64 {
    let interval = settings.interval_seconds.max(1);
    (settings.workload_grace_seconds / (2 * interval)).max(1)
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
    leader: &(String, i64),
    orphans_seen: &mut HashMap<String, Instant>,
    reported: &mut BTreeMap<String, SuspectState>,
    sweep: bool,
) -> anyhow::Result<()> {
    // Every pass judges the nodes, from nodes, leases, blocks and affinities only.
    let holders = Snapshot::read_nodes_and_blocks(kv).await?;
    judge_nodes(kv, settings, shared, leader, reported, &holders).await?;
    if !sweep {
        return Ok(());
    }
    // The sweep reads everything, once, for all its jobs (at 5,000 pods with a pass a
    // second, three full reads per pass kept etcd at 130 % CPU).
    let snap = Snapshot::read(kv).await?;
    // What crashes left, and affinities of deleted nodes.
    let r = gc_snapshot(kv, &snap, &GcOptions::default()).await?;
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
    let owned: HashSet<&String> = snap.workloads.iter().map(|w| &w.handle).collect();
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

/// The suspect and decommission records, by node, with their revisions.
async fn node_records(
    kv: &EtcdKv,
) -> Result<(BTreeMap<String, (Suspect, i64)>, BTreeMap<String, i64>), IpamError> {
    let (suspects, _) = kv.get_prefix(keys::SUSPECTS).await?;
    let (decommissions, _) = kv.get_prefix(keys::DECOMMISSIONS).await?;
    let suspects = suspects
        .into_iter()
        .filter_map(|k| {
            let s: Suspect = serde_json::from_slice(&k.value).ok()?;
            Some((s.node.clone(), (s, k.mod_revision)))
        })
        .collect();
    let decommissions = decommissions
        .into_iter()
        .filter_map(|k| {
            let node = k.key.strip_prefix(keys::DECOMMISSIONS)?.to_string();
            Some((node, k.mod_revision))
        })
        .collect();
    Ok((suspects, decommissions))
}

/// Judges every node and acts: marks suspects, asks the witness, reclaims.
async fn judge_nodes(
    kv: &EtcdKv,
    settings: &GcSettings,
    shared: &Shared,
    leader: &(String, i64),
    reported: &mut BTreeMap<String, SuspectState>,
    snap: &Snapshot,
) -> anyhow::Result<()> {
    let (suspects, decommissions) = node_records(kv).await?;
    // Pending claims count too: an affinity record without its block yet.
    let mut holders = tessera_datastore::block::holders(snap.blocks.values().map(|b| &b.value));
    holders.extend(snap.affinities.keys().map(|(n, _)| n.clone()));
    let names: BTreeSet<&String> = snap.nodes.keys().chain(decommissions.keys()).collect();
    let now = now_ms();
    let after_ms = settings.reclaim_after_seconds.saturating_mul(1000);
    let mut states: BTreeMap<String, (SuspectState, u64)> = BTreeMap::new();
    let judged: Vec<(&String, NodeAction, u64)> = names
        .iter()
        .map(|node| {
            let suspect = suspects.get(*node).map(|(s, rev)| (s.since_ms, *rev));
            let suspect_for = suspect.map_or(0, |(since, _)| now.saturating_sub(since));
            let decommissioned = decommissions.get(*node).copied();
            let live = snap.live.contains(*node);
            let action = judge(live, suspect, decommissioned, now, after_ms);
            (*node, action, suspect_for)
        })
        .collect();
    // The witness is asked about every suspect that is due at once (each probe may take its
    // full timeout when the node is dead).
    let due: Vec<&String> = judged
        .iter()
        .filter(|(n, a, _)| matches!(a, NodeAction::AskWitness { .. }) && holders.contains(*n))
        .map(|(n, _, _)| *n)
        .collect();
    let findings: BTreeMap<&String, Option<Finding>> = due
        .iter()
        .copied()
        .zip(futures::future::join_all(due.iter().map(|n| ask_witness(snap, n))).await)
        .collect();
    for (node, action, suspect_for) in judged {
        let live = snap.live.contains(node);
        let state = match action {
            NodeAction::Nothing => continue,
            NodeAction::MarkSuspect => {
                if mark_suspect(kv, node, now, Some(leader)).await?.is_some() {
                    tracing::warn!(
                        node,
                        reclaim_after_s = settings.reclaim_after_seconds,
                        "node lost its liveness lease: suspect (cannot reach etcd, or dead); reclaimed only after reclaimAfterSeconds and if its agent does not answer the witness"
                    );
                }
                SuspectState::Waiting
            }
            NodeAction::Wait { .. } => SuspectState::Waiting,
            NodeAction::AskWitness { suspect_rev } => {
                if !holders.contains(node) {
                    SuspectState::Reclaimed
                } else {
                    match findings.get(node).cloned().flatten() {
                        None => SuspectState::NoWitness,
                        Some(Finding::Answered) => SuspectState::WitnessAnswered,
                        Some(Finding::NoAgent(why)) => {
                            tracing::warn!(node, suspect_for_s = suspect_for / 1000, %why, "the witness finds no agent: reclaiming");
                            let guard = ReclaimGuard {
                                leader: Some(leader.clone()),
                                verdict: Verdict::Dead { suspect_rev },
                            };
                            reclaim(kv, shared, node, &guard).await;
                            SuspectState::Reclaimed
                        }
                    }
                }
            }
            NodeAction::Reclaim(verdict) => {
                if holders.contains(node) || live {
                    let guard = ReclaimGuard {
                        leader: Some(leader.clone()),
                        verdict,
                    };
                    reclaim(kv, shared, node, &guard).await;
                }
                SuspectState::Decommissioned
            }
        };
        states.insert(node.clone(), (state, suspect_for));
    }
    // Logs say when a node's standing changes; the metric says it all the time.
    for (node, (state, suspect_for)) in &states {
        if reported.get(node) != Some(state) {
            match state {
                SuspectState::Waiting => {}
                SuspectState::WitnessAnswered => tracing::warn!(
                    node,
                    suspect_for_s = suspect_for / 1000,
                    "suspect, but its agent answers the witness over the underlay: not reclaimed (cut off from etcd, not dead)"
                ),
                SuspectState::NoWitness => tracing::warn!(
                    node,
                    "suspect, but its Node record names no witness address or identity: not reclaimed without a decommission"
                ),
                SuspectState::Reclaimed | SuspectState::Decommissioned => {}
            }
        }
    }
    *reported = states.iter().map(|(n, (s, _))| (n.clone(), *s)).collect();
    let m = &shared.metrics.suspects;
    m.clear();
    for (node, (state, suspect_for)) in states {
        m.get_or_create(&NodeStateLabel {
            node,
            state: state.as_str().into(),
        })
        .set((suspect_for / 1000) as i64);
    }
    Ok(())
}

/// Asks the witness at the node's registered address; `None` when the Node record does not
/// say where or who (an agent that never registered a witness).
async fn ask_witness(snap: &Snapshot, node: &str) -> Option<Finding> {
    let n = snap.nodes.get(node)?;
    let addr = SocketAddr::new(n.ipv4_address?.ip(), n.witness_port?);
    let identity = n.agent_identity.as_deref()?;
    Some(witness::probe(addr, node, identity, Duration::from_secs(2)).await)
}

async fn reclaim(kv: &EtcdKv, shared: &Shared, node: &str, guard: &ReclaimGuard) {
    match reclaim_node(kv, node, guard).await {
        Ok(r) => {
            count(shared, "dead_node_addresses", r.addresses_released);
            count(shared, "dead_node_blocks", r.affinities_released);
        }
        Err(e) => tracing::info!(node, error = %e, "not reclaimed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: u64 = 300_000;

    #[test]
    fn the_leak_sweep_runs_about_twice_per_grace_period() {
        let every = |interval_seconds, workload_grace_seconds| {
            sweep_every(&GcSettings {
                interval_seconds,
                workload_grace_seconds,
                ..Default::default()
            })
        };
        assert_eq!(every(5, 60), 6, "the defaults: every 30 s");
        assert_eq!(every(1, 60), 30);
        assert_eq!(every(1, 3), 1, "a short grace: every pass");
        assert_eq!(every(10, 5), 1);
        assert_eq!(every(0, 0), 1);
    }

    #[test]
    fn a_node_holding_its_lease_is_left_alone() {
        assert_eq!(
            judge(true, None, None, 1_000_000, AFTER),
            NodeAction::Nothing
        );
        assert_eq!(
            judge(true, Some((0, 7)), None, 1_000_000, AFTER),
            NodeAction::Nothing
        );
    }

    #[test]
    fn a_lapsed_lease_makes_a_suspect_that_waits_then_asks_the_witness() {
        assert_eq!(
            judge(false, None, None, 1_000, AFTER),
            NodeAction::MarkSuspect
        );
        assert_eq!(
            judge(false, Some((1_000, 7)), None, 1_000 + AFTER - 1, AFTER),
            NodeAction::Wait { remaining_ms: 1 }
        );
        assert_eq!(
            judge(false, Some((1_000, 7)), None, 1_000 + AFTER, AFTER),
            NodeAction::AskWitness { suspect_rev: 7 }
        );
    }

    #[test]
    fn a_decommission_is_reclaimed_at_once_lease_or_not() {
        for live in [true, false] {
            assert_eq!(
                judge(live, None, Some(9), 0, AFTER),
                NodeAction::Reclaim(Verdict::Decommissioned { record_rev: 9 })
            );
        }
    }
}
