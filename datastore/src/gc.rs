//! Repair: what a crash, a dead node or a deleted node left behind.
//!
//! GC works from a [`Snapshot`] and repairs one item per transaction, each guarded by the
//! revisions it saw, so it never takes a lock and never overrides a concurrent writer: an item
//! that changed since the snapshot is skipped and looked at again on the next run.

use std::time::Duration;

use crate::block::IpamBlock;
use crate::codec::{encode, now_ms, with_retry};
use crate::error::IpamError;
use crate::ipam::Ipam;
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::{AffinityState, BlockAffinity, IpamHandle};
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
    }
}

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
    let snap = Snapshot::read(kv).await?;
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
                let txn = txn.then(Op::delete(&bkey)).then(Op::delete(&akey));
                apply(kv, txn, &mut r.blocks_released, &mut r.skipped).await?;
            } else {
                let orphan = IpamBlock {
                    affinity: None,
                    ..b.value.clone()
                };
                let txn = txn
                    .then(Op::put(&bkey, encode(&orphan)))
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

    // Allocations whose handle does not list them.
    for (cidr, b) in &snap.blocks {
        let mut block = b.value.clone();
        let mut freed = 0;
        let mut guards = Vec::new();
        for (addr, alloc) in b.value.allocated() {
            let handle = snap.handles.get(&alloc.handle);
            let listed = handle.is_some_and(|h| {
                h.value
                    .addresses
                    .iter()
                    .any(|e| e.addr == addr && e.seq == alloc.seq && e.block == *cidr)
            });
            if !listed {
                guards.push((
                    keys::handle(&alloc.handle),
                    handle.map(|h| h.rev).unwrap_or(0),
                ));
                let _ = block.release(addr, Some(alloc.seq), now);
                freed += 1;
            }
        }
        if freed > 0 {
            let bkey = keys::block(*cidr);
            let mut txn = Txn::new()
                .expect(&bkey, b.rev)
                .then(Op::put(&bkey, encode(&block)));
            for (k, rev) in guards {
                txn = txn.expect(k, rev);
            }
            let mut done = 0;
            apply(kv, txn, &mut done, &mut r.skipped).await?;
            r.allocations_freed += done * freed;
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

/// Releases every allocation and block affinity of `node`, whose liveness lease must have
/// lapsed. Each transaction re-checks that the node is still dead, so a node that comes back
/// mid-reclaim keeps what is left (and the call returns [`IpamError::NodeAlive`]).
pub async fn reclaim_dead_node<K: Kv>(kv: &K, node: &str) -> Result<ReclaimReport, IpamError> {
    let live_key = keys::liveness(node);
    if with_retry(|| kv.get(&live_key)).await?.is_some() {
        return Err(IpamError::NodeAlive {
            node: node.to_string(),
        });
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
        let freed = ipam.release_handle_guarded(h, Some(&live_key)).await?;
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
        let mut txn = Txn::new()
            .expect(&live_key, 0)
            .expect(&akey, aff.rev)
            .then(Op::delete(&akey));
        if let Some(b) = snap.blocks.get(cidr) {
            txn = txn.expect(&bkey, b.rev);
            if b.value.affinity.as_deref() == Some(node) {
                txn = if b.value.is_empty() {
                    report.blocks_released += 1;
                    txn.then(Op::delete(&bkey))
                } else {
                    let orphan = IpamBlock {
                        affinity: None,
                        ..b.value.clone()
                    };
                    txn.then(Op::put(&bkey, encode(&orphan)))
                };
            }
        }
        if !with_retry(|| kv.txn(txn.clone())).await?.succeeded {
            if with_retry(|| kv.get(&live_key)).await?.is_some() {
                return Err(IpamError::NodeAlive {
                    node: node.to_string(),
                });
            }
            // Changed under us (a borrower); the next reclaim pass finishes it.
            continue;
        }
        report.affinities_released += 1;
    }
    tracing::info!(node, ?report, "reclaimed dead node");
    Ok(report)
}
