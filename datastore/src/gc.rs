//! Repair: what a crash, a dead node or a deleted node left behind.
//!
//! GC works from a [`Snapshot`] and repairs one item per transaction, each guarded by the
//! revisions it saw, so it never takes a lock and never overrides a concurrent writer: an item
//! that changed since the snapshot is skipped and looked at again on the next run.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::block::IpamBlock;
use crate::block_store;
use crate::codec::{decode, encode, now_ms, with_retry};
use crate::error::IpamError;
use crate::ipam::Ipam;
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::{AffinityState, BlockAffinity, Decommission, IpamHandle, Suspect};
use crate::snapshot::Snapshot;

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// A pending affinity younger than this may be a claim in progress: leave it.
    pub pending_grace: Duration,
    /// Release the affinities and blocks of nodes that have no Node record and no lease.
    pub remove_deleted_nodes: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            pending_grace: Duration::from_secs(60),
            remove_deleted_nodes: true,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub pending_confirmed: usize,
    pub pending_removed: usize,
    pub affinities_removed: usize,
    pub affinities_restored: usize,
    pub allocations_freed: usize,
    pub handle_entries_removed: usize,
    pub handles_removed: usize,
    pub blocks_orphaned: usize,
    pub blocks_released: usize,
    /// `V6` records whose block's own key was gone.
    pub orphaned_records_removed: usize,
    /// Items that changed while GC looked at them; the next run sees them again.
    pub skipped: usize,
}

impl GcReport {
    pub fn repairs(&self) -> usize {
        self.pending_confirmed
            + self.pending_removed
            + self.affinities_removed
            + self.affinities_restored
            + self.allocations_freed
            + self.handle_entries_removed
            + self.handles_removed
            + self.blocks_orphaned
            + self.blocks_released
            + self.orphaned_records_removed
    }
}

/// The most stale allocations of one block GC frees in one transaction: each adds a compare
/// (its handle).
const FREES_PER_TXN: usize = crate::kv::MAX_TXN_WRITES;

async fn apply<K: Kv>(
    kv: &K,
    txn: Txn,
    counter: &mut usize,
    skipped: &mut usize,
) -> Result<(), IpamError> {
    if with_retry(|| kv.txn(txn.clone())).await?.succeeded {
        *counter += 1;
    } else {
        *skipped += 1;
    }
    Ok(())
}

/// One pass of IPAM garbage collection.
pub async fn gc<K: Kv>(kv: &K, opts: &GcOptions) -> Result<GcReport, IpamError> {
    gc_snapshot(kv, &Snapshot::read(kv).await?, opts).await
}

/// One pass on a snapshot the caller read (the agent's GC leader reads one per pass for all
/// its jobs). Every write compares the revisions the snapshot saw, so a stale one only makes
/// writes that fail and are retried on the next pass.
pub async fn gc_snapshot<K: Kv>(
    kv: &K,
    snap: &Snapshot,
    opts: &GcOptions,
) -> Result<GcReport, IpamError> {
    let mut r = GcReport::default();
    let now = now_ms();
    let grace = opts.pending_grace.as_millis() as u64;
    let node_gone = |node: &str| {
        opts.remove_deleted_nodes && !snap.nodes.contains_key(node) && !snap.live.contains(node)
    };

    // Affinities: finish or undo stuck claims, drop those whose block is not theirs.
    for ((node, cidr), aff) in &snap.affinities {
        let akey = keys::affinity(node, *cidr);
        let bkey = keys::block(*cidr);
        let block = snap.blocks.get(cidr);
        let block_is_theirs =
            block.is_some_and(|b| b.value.affinity.as_deref() == Some(node.as_str()));
        match aff.value.state {
            AffinityState::Pending if now.saturating_sub(aff.value.since_ms) < grace => {}
            AffinityState::Pending | AffinityState::PendingDeletion
                if block_is_theirs && !node_gone(node) =>
            {
                let confirmed = BlockAffinity {
                    state: AffinityState::Confirmed,
                    since_ms: now,
                    ..aff.value.clone()
                };
                let txn = Txn::new()
                    .expect(&akey, aff.rev)
                    .expect(&bkey, block.map(|b| b.rev).unwrap_or(0))
                    .then(Op::put(&akey, encode(&confirmed)));
                apply(kv, txn, &mut r.pending_confirmed, &mut r.skipped).await?;
            }
            AffinityState::Pending | AffinityState::PendingDeletion => {
                let txn = Txn::new()
                    .expect(&akey, aff.rev)
                    .expect(&bkey, block.map(|b| b.rev).unwrap_or(0))
                    .then(Op::delete(&akey));
                apply(kv, txn, &mut r.pending_removed, &mut r.skipped).await?;
            }
            AffinityState::Confirmed if !block_is_theirs => {
                let txn = Txn::new()
                    .expect(&akey, aff.rev)
                    .expect(&bkey, block.map(|b| b.rev).unwrap_or(0))
                    .then(Op::delete(&akey));
                apply(kv, txn, &mut r.affinities_removed, &mut r.skipped).await?;
            }
            AffinityState::Confirmed => {}
        }
    }

    // Blocks: of deleted nodes -> orphaned (or released when empty); of live nodes but
    // without any affinity record (a claim whose affinity GC removed) -> affinity restored.
    for (cidr, b) in &snap.blocks {
        let Some(node) = b.value.affinity.as_deref() else {
            continue;
        };
        let bkey = keys::block(*cidr);
        let akey = keys::affinity(node, *cidr);
        let aff_rev = snap
            .affinities
            .get(&(node.to_string(), *cidr))
            .map(|a| a.rev)
            .unwrap_or(0);
        if node_gone(node) {
            let txn = Txn::new().expect(&bkey, b.rev).expect(&akey, aff_rev);
            if b.value.is_empty() {
                let txn = txn
                    .then_all(block_store::delete_ops(&b.value))
                    .then(Op::delete(&akey));
                apply(kv, txn, &mut r.blocks_released, &mut r.skipped).await?;
            } else {
                let orphan = IpamBlock {
                    affinity: None,
                    ..b.value.clone()
                };
                let txn = txn
                    .then_all(block_store::write_ops(Some(&b.value), &orphan))
                    .then(Op::delete(&akey));
                apply(kv, txn, &mut r.blocks_orphaned, &mut r.skipped).await?;
            }
        } else if aff_rev == 0 {
            let aff = BlockAffinity {
                node: node.to_string(),
                cidr: *cidr,
                state: AffinityState::Confirmed,
                since_ms: now,
            };
            let txn = Txn::new()
                .expect(&bkey, b.rev)
                .expect(&akey, 0)
                .then(Op::put(&akey, encode(&aff)));
            apply(kv, txn, &mut r.affinities_restored, &mut r.skipped).await?;
        }
    }

    // Records of a block whose own key is gone (deleted by hand): removed while it stays
    // gone. Records are only written with their block key, so none can appear meanwhile.
    for (own, &count) in &snap.orphaned_records {
        let txn = Txn::new()
            .expect(own, 0)
            .then(Op::delete_prefix(format!("{own}/")));
        let mut done = 0;
        apply(kv, txn, &mut done, &mut r.skipped).await?;
        r.orphaned_records_removed += done * count;
    }

    // Allocations whose handle does not list them: freed at most FREES_PER_TXN at a time, each
    // transaction guarded by the block's revision (the one the last transaction left) and by
    // the handles seen not listing them.
    for (cidr, b) in &snap.blocks {
        let stale: Vec<(IpAddr, u64, &str)> = b
            .value
            .allocated()
            .filter(|(addr, alloc)| {
                !snap.handles.get(&alloc.handle).is_some_and(|h| {
                    h.value
                        .addresses
                        .iter()
                        .any(|e| e.addr == *addr && e.seq == alloc.seq && e.block == *cidr)
                })
            })
            .map(|(addr, alloc)| (addr, alloc.seq, alloc.handle.as_str()))
            .collect();
        let bkey = keys::block(*cidr);
        let (mut before, mut rev) = (b.value.clone(), b.rev);
        for chunk in stale.chunks(FREES_PER_TXN) {
            let mut after = before.clone();
            let mut guards = BTreeMap::new();
            for &(addr, seq, handle) in chunk {
                let _ = after.release(addr, Some(seq), now);
                let handle_rev = snap.handles.get(handle).map_or(0, |h| h.rev);
                guards.insert(keys::handle(handle), handle_rev);
            }
            let mut txn = Txn::new()
                .expect(&bkey, rev)
                .then_all(block_store::write_ops(Some(&before), &after));
            for (k, rev) in guards {
                txn = txn.expect(k, rev);
            }
            let out = with_retry(|| kv.txn(txn.clone())).await?;
            if !out.succeeded {
                r.skipped += 1;
                break;
            }
            r.allocations_freed += chunk.len();
            (before, rev) = (after, out.revision);
        }
    }

    // Handle entries whose block does not give them the address.
    for (id, h) in &snap.handles {
        let mut keep = Vec::new();
        let mut guards = Vec::new();
        for e in &h.value.addresses {
            let block = snap.blocks.get(&e.block);
            guards.push((keys::block(e.block), block.map(|b| b.rev).unwrap_or(0)));
            let given = block
                .and_then(|b| b.value.allocation(e.addr))
                .is_some_and(|a| a.handle == *id && a.seq == e.seq);
            if given {
                keep.push(e.clone());
            }
        }
        let dropped = h.value.addresses.len() - keep.len();
        if dropped == 0 && !keep.is_empty() {
            continue;
        }
        let hkey = keys::handle(id);
        let mut txn = Txn::new().expect(&hkey, h.rev);
        guards.sort();
        guards.dedup();
        for (k, rev) in guards {
            txn = txn.expect(k, rev);
        }
        if keep.is_empty() {
            let mut done = 0;
            apply(kv, txn.then(Op::delete(&hkey)), &mut done, &mut r.skipped).await?;
            r.handles_removed += done;
            r.handle_entries_removed += done * dropped;
        } else {
            let fixed = IpamHandle {
                id: id.clone(),
                addresses: keep,
            };
            let mut done = 0;
            apply(
                kv,
                txn.then(Op::put(&hkey, encode(&fixed))),
                &mut done,
                &mut r.skipped,
            )
            .await?;
            r.handle_entries_removed += done * dropped;
        }
    }
    if r.repairs() > 0 {
        tracing::info!(?r, "IPAM GC repaired state");
    }
    Ok(r)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    pub handles_released: usize,
    pub addresses_released: usize,
    pub affinities_released: usize,
    pub blocks_released: usize,
}

/// Why a node may be reclaimed: the record that says so, at the revision the decision was
/// made on. If the record changes (the node returned and deleted it, an operator withdrew it)
/// the reclaim stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Suspect for longer than `reclaimAfterSeconds`, and the witness found no agent.
    Dead { suspect_rev: i64 },
    /// Decommissioned by the operator: reclaimed at once, even while its lease is held.
    Decommissioned { record_rev: i64 },
}

/// What every transaction of a reclaim re-checks: the GC leader's key (a deposed or
/// partitioned leader's writes fail), the verdict record, and the node's liveness key absent
/// (a node that takes a lease again keeps what is left).
#[derive(Debug, Clone)]
pub struct ReclaimGuard {
    pub leader: Option<(String, i64)>,
    pub verdict: Verdict,
}

impl ReclaimGuard {
    fn compares(&self, node: &str) -> Vec<(String, i64)> {
        let mut c: Vec<(String, i64)> = self.leader.iter().cloned().collect();
        c.push(match self.verdict {
            Verdict::Dead { suspect_rev } => (keys::suspect(node), suspect_rev),
            Verdict::Decommissioned { record_rev } => (keys::decommission(node), record_rev),
        });
        c.push((keys::liveness(node), 0));
        c
    }
}

/// Releases every allocation and block affinity of `node`, one guarded transaction at a time
/// (see [`ReclaimGuard`]). A decommissioned node's liveness key is deleted first (in a
/// transaction guarded the same way), so that the node, if it is in fact running, notices,
/// takes a new lease and re-asserts what is still free. Otherwise a node whose liveness key
/// exists is not touched ([`IpamError::NodeAlive`]). When a guard changes mid-way the call
/// returns [`IpamError::GuardChanged`] and what is left stays with the node.
pub async fn reclaim_node<K: Kv>(
    kv: &K,
    node: &str,
    guard: &ReclaimGuard,
) -> Result<ReclaimReport, IpamError> {
    let live_key = keys::liveness(node);
    let compares = guard.compares(node);
    let guarded = |mut txn: Txn| {
        for (k, rev) in &compares {
            txn = txn.expect(k, *rev);
        }
        txn
    };
    if let Some(live) = with_retry(|| kv.get(&live_key)).await? {
        let Verdict::Decommissioned { .. } = guard.verdict else {
            return Err(IpamError::NodeAlive {
                node: node.to_string(),
            });
        };
        let mut txn = Txn::new().expect(&live_key, live.mod_revision);
        for (k, rev) in compares.iter().filter(|(k, _)| *k != live_key) {
            txn = txn.expect(k, *rev);
        }
        if !with_retry(|| kv.txn(txn.clone().then(Op::delete(&live_key))))
            .await?
            .succeeded
        {
            return Err(IpamError::GuardChanged { key: live_key });
        }
        tracing::warn!(
            node,
            "decommissioned while its lease was held: liveness key deleted"
        );
    }
    let snap = Snapshot::read(kv).await?;
    let mut report = ReclaimReport::default();
    let mut handles: Vec<String> = snap
        .blocks
        .values()
        .flat_map(|b| b.value.allocated())
        .filter(|(_, a)| a.attrs.get("node").map(String::as_str) == Some(node))
        .map(|(_, a)| a.handle.clone())
        .collect();
    handles.sort();
    handles.dedup();
    // A node-less client: it caches nothing of its own and claims nothing.
    let ipam = Ipam::new(kv.clone(), "");
    for h in &handles {
        let freed = ipam.release_handle_guarded(h, &compares).await?;
        report.handles_released += 1;
        report.addresses_released += freed.len();
    }
    let snap = Snapshot::read(kv).await?;
    for ((n, cidr), aff) in &snap.affinities {
        if n != node {
            continue;
        }
        let akey = keys::affinity(node, *cidr);
        let bkey = keys::block(*cidr);
        let mut txn = guarded(Txn::new())
            .expect(&akey, aff.rev)
            .then(Op::delete(&akey));
        let mut releases_block = false;
        if let Some(b) = snap.blocks.get(cidr) {
            txn = txn.expect(&bkey, b.rev);
            if b.value.affinity.as_deref() == Some(node) {
                txn = if b.value.is_empty() {
                    releases_block = true;
                    txn.then_all(block_store::delete_ops(&b.value))
                } else {
                    let orphan = IpamBlock {
                        affinity: None,
                        ..b.value.clone()
                    };
                    txn.then_all(block_store::write_ops(Some(&b.value), &orphan))
                };
            }
        }
        for (k, _) in &compares {
            txn = txn.or_get(k);
        }
        let out = with_retry(|| kv.txn(txn.clone())).await?;
        if !out.succeeded {
            for ((k, rev), now) in compares.iter().zip(out.gets) {
                if now.map_or(0, |v| v.mod_revision) != *rev {
                    return Err(IpamError::GuardChanged { key: k.clone() });
                }
            }
            // Changed under us (a borrower); the next reclaim pass finishes it.
            continue;
        }
        report.affinities_released += 1;
        report.blocks_released += usize::from(releases_block);
    }
    tracing::info!(node, ?report, verdict = ?guard.verdict, "reclaimed node");
    Ok(report)
}

/// Marks `node` suspect as of `now_ms` if its liveness key is absent, in one transaction
/// (also guarded by the GC leader's key, when given). Returns the suspect record and its
/// revision (the one already there if GC marked it before), or `None` while the node holds
/// its lease.
pub async fn mark_suspect<K: Kv>(
    kv: &K,
    node: &str,
    now_ms: u64,
    leader: Option<&(String, i64)>,
) -> Result<Option<(Suspect, i64)>, IpamError> {
    let skey = keys::suspect(node);
    let lkey = keys::liveness(node);
    let record = Suspect {
        node: node.to_string(),
        since_ms: now_ms,
    };
    let mut txn = Txn::new()
        .expect(&lkey, 0)
        .expect(&skey, 0)
        .then(Op::put(&skey, encode(&record)))
        .or_get(&skey)
        .or_get(&lkey);
    if let Some((k, rev)) = leader {
        txn = txn.expect(k, *rev);
    }
    let out = with_retry(|| kv.txn(txn.clone())).await?;
    if out.succeeded {
        return Ok(Some((record, out.revision)));
    }
    let mut gets = out.gets.into_iter();
    let (suspect, live) = (gets.next().flatten(), gets.next().flatten());
    match (suspect, live) {
        (_, Some(_)) => Ok(None),
        (Some(s), None) => Ok(Some((decode(&s)?, s.mod_revision))),
        // Only the leader guard can have failed.
        (None, None) => Err(IpamError::GuardChanged {
            key: leader.map(|(k, _)| k.clone()).unwrap_or_default(),
        }),
    }
}

/// Records the operator's word that `node` is gone (what `tesseractl node decommission` and
/// the Kubernetes Node deletion will write). Returns the record's revision; an existing
/// record is kept.
pub async fn decommission<K: Kv>(kv: &K, node: &str, reason: &str) -> Result<i64, IpamError> {
    let key = keys::decommission(node);
    let record = Decommission {
        node: node.to_string(),
        since_ms: now_ms(),
        reason: reason.to_string(),
    };
    let txn = Txn::new()
        .expect(&key, 0)
        .then(Op::put(&key, encode(&record)))
        .or_get(&key);
    let out = with_retry(|| kv.txn(txn.clone())).await?;
    if out.succeeded {
        return Ok(out.revision);
    }
    Ok(out
        .gets
        .into_iter()
        .next()
        .flatten()
        .map_or(0, |k| k.mod_revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use crate::model::Node;
    use crate::resources::{apply_config, put_node};
    use crate::yaml::parse_resources;
    use crate::{AssignRequest, Owner};

    const POOL: &str = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: p }\nspec: { cidr: 10.244.100.0/28, blockSize: 30 }\n";

    async fn store() -> MemKv {
        let kv = MemKv::default();
        let r = parse_resources(POOL).expect("yaml");
        apply_config(&kv, &r.pools, &r.reservations)
            .await
            .expect("pools");
        for n in ["n1", "n2", "n3"] {
            let node = Node {
                name: n.into(),
                ..Default::default()
            };
            put_node(&kv, &node).await.expect("node");
        }
        kv
    }

    fn req(handle: &str, n: usize) -> AssignRequest {
        AssignRequest {
            owner: Owner {
                handle: handle.into(),
                ..Default::default()
            },
            num_v4: n,
            ..Default::default()
        }
    }

    async fn held_by(kv: &MemKv, node: &str) -> usize {
        Snapshot::read(kv)
            .await
            .expect("snap")
            .blocks
            .values()
            .flat_map(|b| {
                b.value
                    .allocated()
                    .map(|(_, a)| a.attrs.clone())
                    .collect::<Vec<_>>()
            })
            .filter(|a| a.get("node").map(String::as_str) == Some(node))
            .count()
    }

    async fn lead(kv: &MemKv) -> (String, i64) {
        let t = Txn::new().then(Op::put(keys::GC_LEADER, b"n1".to_vec()));
        let rev = kv.txn(t).await.expect("txn").revision;
        (keys::GC_LEADER.to_string(), rev)
    }

    #[tokio::test]
    async fn a_suspect_is_reclaimed_only_under_its_verdict_and_a_current_leader() {
        let kv = store().await;
        Ipam::new(kv.clone(), "n3")
            .auto_assign(&req("w", 3))
            .await
            .expect("assign");
        let leader = lead(&kv).await;
        let (_, rev) = mark_suspect(&kv, "n3", 5, Some(&leader))
            .await
            .expect("mark")
            .expect("suspect");
        // Marking again keeps the first record (its time is when suspicion began).
        let (again, rev2) = mark_suspect(&kv, "n3", 99, Some(&leader))
            .await
            .expect("mark")
            .expect("suspect");
        assert_eq!((again.since_ms, rev2), (5, rev));
        // A deposed leader (its key changed: another agent leads now) writes nothing.
        let stale = ReclaimGuard {
            leader: Some(leader.clone()),
            verdict: Verdict::Dead { suspect_rev: rev },
        };
        let now_leader = lead(&kv).await;
        let e = reclaim_node(&kv, "n3", &stale).await.unwrap_err();
        assert!(
            matches!(&e, IpamError::GuardChanged { key } if key == keys::GC_LEADER),
            "{e}"
        );
        assert_eq!(held_by(&kv, "n3").await, 3);
        // The current leader reclaims.
        let guard = ReclaimGuard {
            leader: Some(now_leader),
            verdict: Verdict::Dead { suspect_rev: rev },
        };
        let r = reclaim_node(&kv, "n3", &guard).await.expect("reclaim");
        assert_eq!(r.addresses_released, 3);
        assert_eq!(held_by(&kv, "n3").await, 0);
        Snapshot::read(&kv)
            .await
            .expect("snap")
            .check(true)
            .expect("invariants");
    }

    #[tokio::test]
    async fn a_node_that_takes_a_lease_again_stops_the_reclaim() {
        let kv = store().await;
        Ipam::new(kv.clone(), "n3")
            .auto_assign(&req("w", 2))
            .await
            .expect("assign");
        let (_, rev) = mark_suspect(&kv, "n3", 1, None)
            .await
            .expect("mark")
            .expect("suspect");
        // The node returns: its liveness key is back before GC acts.
        let t = Txn::new().then(Op::put(keys::liveness("n3"), b"{}".to_vec()));
        kv.txn(t).await.expect("txn");
        let guard = ReclaimGuard {
            leader: None,
            verdict: Verdict::Dead { suspect_rev: rev },
        };
        assert!(matches!(
            reclaim_node(&kv, "n3", &guard).await,
            Err(IpamError::NodeAlive { .. })
        ));
        assert_eq!(held_by(&kv, "n3").await, 2);
        // And a node holding its lease is not marked suspect.
        assert_eq!(mark_suspect(&kv, "n3", 1, None).await.expect("mark"), None);
    }

    #[tokio::test]
    async fn a_decommission_reclaims_at_once_even_under_a_held_lease() {
        let kv = store().await;
        Ipam::new(kv.clone(), "n3")
            .auto_assign(&req("w", 2))
            .await
            .expect("assign");
        let t = Txn::new().then(Op::put(keys::liveness("n3"), b"{}".to_vec()));
        kv.txn(t).await.expect("txn");
        let record_rev = decommission(&kv, "n3", "node deleted")
            .await
            .expect("decommission");
        let guard = ReclaimGuard {
            leader: None,
            verdict: Verdict::Decommissioned { record_rev },
        };
        let r = reclaim_node(&kv, "n3", &guard).await.expect("reclaim");
        assert_eq!(r.addresses_released, 2);
        assert!(kv.get(&keys::liveness("n3")).await.expect("get").is_none());
    }

    #[tokio::test]
    async fn nobody_borrows_from_a_suspect_nodes_block() {
        let kv = store().await;
        // n3 takes one block (4 addresses; the pool has four blocks), uses one.
        Ipam::new(kv.clone(), "n3")
            .auto_assign(&req("w3", 1))
            .await
            .expect("assign");
        mark_suspect(&kv, "n3", 1, None)
            .await
            .expect("mark")
            .expect("suspect");
        // n1 fills the three other blocks, then finds none to borrow from.
        Ipam::new(kv.clone(), "n1")
            .auto_assign(&req("w1", 12))
            .await
            .expect("assign");
        let e = Ipam::new(kv.clone(), "n1")
            .auto_assign(&req("w1b", 1))
            .await
            .unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
        // Once n3 is back (no longer suspect), its free addresses may be borrowed.
        kv.txn(Txn::new().then(Op::delete(keys::suspect("n3"))))
            .await
            .expect("txn");
        Ipam::new(kv.clone(), "n1")
            .auto_assign(&req("w1c", 1))
            .await
            .expect("borrow");
    }

    /// More stale allocations in one block than etcd takes in one transaction (a handle
    /// compare each): GC frees them all, in several.
    #[tokio::test]
    async fn gc_frees_more_stale_allocations_than_one_transaction_takes() {
        let stale = FREES_PER_TXN + 30;
        for format in ["V5", "V6"] {
            let kv = MemKv::default();
            let yaml = format!(
                "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: big }}\n\
                 spec: {{ cidr: 10.244.0.0/24, blockSize: 24 }}\n---\n\
                 apiVersion: tessera.dev/v1\nkind: IPAMConfiguration\n\
                 metadata: {{ name: default }}\nspec: {{ blockFormat: {format} }}\n"
            );
            let r = parse_resources(&yaml).expect("yaml");
            crate::admin::write(&kv, &r, crate::admin::WriteMode::Apply, false)
                .await
                .expect("apply");
            let n1 = Node {
                name: "n1".into(),
                ..Default::default()
            };
            put_node(&kv, &n1).await.expect("node");
            let ipam = Ipam::new(kv.clone(), "n1");
            for i in 0..=stale {
                ipam.auto_assign(&req(&format!("pod-{i}"), 1))
                    .await
                    .expect("assign");
            }
            // Every handle but pod-0's lost (as a crash between a handle's delete and its
            // block's write would leave them, one by one).
            for i in 1..=stale {
                let t = Txn::new().then(Op::delete(keys::handle(&format!("pod-{i}"))));
                kv.txn(t).await.expect("txn");
            }
            let r = gc(&kv, &GcOptions::default()).await.expect(format);
            assert_eq!((r.allocations_freed, r.skipped), (stale, 0), "{format}");
            let snap = Snapshot::read(&kv).await.expect("snapshot");
            let held: Vec<_> = snap.allocations().into_iter().map(|(_, h)| h).collect();
            assert_eq!(held, ["pod-0"], "{format}");
            let again = gc(&kv, &GcOptions::default()).await.expect("again");
            assert_eq!(again.repairs(), 0, "{format}: {again:?}");
        }
    }

    /// A V6 block's own key deleted by hand leaves its records: every reader takes the
    /// block as absent, the invariant check names them, and GC removes them, unless the
    /// block is claimed again first (its new owner's free ordinals pass over them).
    #[tokio::test]
    async fn gc_removes_the_records_of_a_block_deleted_by_hand() {
        for claimed_again in [false, true] {
            let kv = store().await;
            let v6 = parse_resources(
                "apiVersion: tessera.dev/v1\nkind: IPAMConfiguration\n\
                 metadata: { name: default }\nspec: { blockFormat: V6 }\n",
            )
            .expect("yaml");
            crate::admin::write(&kv, &v6, crate::admin::WriteMode::Apply, false)
                .await
                .expect("apply");
            let got = Ipam::new(kv.clone(), "n1")
                .auto_assign(&req("w", 3))
                .await
                .expect("assign");
            let own = keys::block(got[0].block);
            let t = Txn::new().then(Op::delete(&own));
            kv.txn(t).await.expect("hand delete");
            let snap = Snapshot::read(&kv).await.expect("read as absent");
            assert!(snap.blocks.is_empty());
            let problems = snap.check(true).expect_err("orphans are named");
            assert!(problems[0].contains("3 records under"), "{problems:?}");
            if claimed_again {
                let n2 = Ipam::new(kv.clone(), "n2");
                let cfg = n2.config().await.expect("config");
                let pool = cfg.pool_of(got[0].addr).expect("pool");
                let claimed = n2.claim_block(pool, got[0].block).await.expect("claim");
                assert!(claimed, "a new claim of the same block");
                n2.auto_assign(&req("v", 1)).await.expect("assign");
            }
            // GC works from the snapshot read before the claim.
            let r = gc_snapshot(&kv, &snap, &GcOptions::default())
                .await
                .expect("gc");
            let (left, _) = kv.get_prefix(&format!("{own}/")).await.expect("read");
            if claimed_again {
                // The block is someone's again: its records are its own business now.
                assert_eq!(r.orphaned_records_removed, 0, "{r:?}");
                assert!(r.skipped > 0, "{r:?}");
                assert_eq!(left.len(), 3);
                let snap = Snapshot::read(&kv).await.expect("read");
                assert_eq!(snap.blocks[&got[0].block].value.in_use(), 1);
            } else {
                assert_eq!(r.orphaned_records_removed, 3, "{r:?}");
                assert!(left.is_empty(), "{left:?}");
            }
        }
    }
}
