//! A returning node re-asserts what its running workloads hold.
//!
//! A node that lost its liveness lease (cut off from etcd) may have been reclaimed meanwhile:
//! GC released its addresses and blocks, and other workloads may now hold some of them. When
//! its agent regains etcd it takes a new lease (which stops any reclaim still in progress:
//! every reclaim transaction requires the liveness key absent), then looks at each local
//! workload's addresses in one pass over a fresh snapshot ([`plan`], pure):
//!
//! - still allocated to the workload's handle: nothing to do, except that an orphaned block
//!   it sits in is adopted (GC orphans the blocks of a node it has no Node record of: a node
//!   whose pods the CNI plugin wired before its agent ever registered);
//! - free: taken back with a guarded assignment (an orphaned block it sits in, one whose
//!   affinity GC released and nobody claimed, is adopted first);
//! - allocated to another handle, reserved since, or outside every pool: lost. The caller
//!   fences it (no host route, no announcement), so the address answers only at its owner.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::block::Attributes;
use crate::block_store;
use crate::codec::{encode, now_ms, with_retry};
use crate::error::IpamError;
use crate::ipam::{Ipam, Owner};
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::{AffinityState, BlockAffinity};
use crate::snapshot::Snapshot;

/// A workload running on this node, as its node remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWorkload {
    /// The IPAM handle that held `addresses`.
    pub handle: String,
    pub addresses: Vec<IpAddr>,
    /// Recorded on an allocation taken back (namespace, pod, containerID, ...); the node's
    /// name is added.
    pub attrs: Attributes,
}

/// Why an address cannot be taken back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Another workload holds it now.
    TakenBy { handle: String },
    /// A reservation covers it now.
    Reserved,
    /// No pool contains it any more.
    NotInPool,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::TakenBy { handle } => write!(f, "now held by {handle}"),
            Lost::Reserved => write!(f, "reserved since"),
            Lost::NotInPool => write!(f, "in no pool any more"),
        }
    }
}

/// What a fresh snapshot says about one of our addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Still ours; `orphaned_block` is its block when that block has no affinity (to adopt,
    /// so that the node announces the block rather than an address per pod).
    Held {
        orphaned_block: Option<IpNetwork>,
    },
    /// Free; `orphaned_block` is its block when that block has no affinity (to adopt).
    Free {
        orphaned_block: Option<IpNetwork>,
    },
    Lost(Lost),
}

/// The fate of every (workload, address), in order. Pure.
pub fn plan(snap: &Snapshot, workloads: &[LocalWorkload]) -> Vec<(usize, IpAddr, Fate)> {
    let reserved = |a: IpAddr| {
        snap.reservations
            .iter()
            .any(|r| r.spec.reserved_cidrs.iter().any(|c| c.contains(a)))
    };
    let mut out = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        for &addr in &w.addresses {
            let block = snap.blocks.values().find(|b| b.value.cidr.contains(addr));
            let orphaned_block = block
                .filter(|b| b.value.affinity.is_none())
                .map(|b| b.value.cidr);
            let fate = match block.and_then(|b| b.value.allocation(addr)) {
                Some(a) if a.handle == w.handle => Fate::Held { orphaned_block },
                Some(a) => Fate::Lost(Lost::TakenBy {
                    handle: a.handle.clone(),
                }),
                None if !snap.pools.iter().any(|p| p.spec.cidr.contains(addr)) => {
                    Fate::Lost(Lost::NotInPool)
                }
                None if reserved(addr) => Fate::Lost(Lost::Reserved),
                None => Fate::Free { orphaned_block },
            };
            out.push((i, addr, fate));
        }
    }
    out
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReassertReport {
    pub held: usize,
    pub retaken: Vec<IpAddr>,
    /// Orphaned blocks this node took back.
    pub blocks_adopted: Vec<IpNetwork>,
    /// (workload index, address, why): the caller fences these.
    pub lost: Vec<(usize, IpAddr, Lost)>,
}

/// Re-asserts `workloads` for `node` (see the module docs). Call it after taking a new
/// liveness lease, so that no reclaim can still be running.
pub async fn reassert<K: Kv>(
    kv: &K,
    node: &str,
    workloads: &[LocalWorkload],
) -> Result<ReassertReport, IpamError> {
    let snap = Snapshot::read(kv).await?;
    let ipam = Ipam::new(kv.clone(), node);
    let mut report = ReassertReport::default();
    let mut tried: Vec<IpNetwork> = Vec::new();
    for (i, addr, fate) in plan(&snap, workloads) {
        let orphaned_block = match &fate {
            Fate::Held { orphaned_block } | Fate::Free { orphaned_block } => *orphaned_block,
            Fate::Lost(_) => None,
        };
        if let Some(cidr) = orphaned_block.filter(|c| !tried.contains(c)) {
            tried.push(cidr);
            let rev = snap.blocks.get(&cidr).map_or(0, |b| b.rev);
            if adopt_block(kv, node, cidr, rev).await? {
                report.blocks_adopted.push(cidr);
            }
        }
        match fate {
            Fate::Held { .. } => report.held += 1,
            Fate::Lost(why) => report.lost.push((i, addr, why)),
            Fate::Free { .. } => {
                let w = &workloads[i];
                let owner = Owner {
                    handle: w.handle.clone(),
                    workload: None,
                    attrs: w.attrs.clone(),
                };
                match ipam.retake(&owner, addr).await {
                    Ok(()) => report.retaken.push(addr),
                    Err(IpamError::AddressInUse { handle, .. }) => {
                        report.lost.push((i, addr, Lost::TakenBy { handle }))
                    }
                    Err(IpamError::AddressReserved { .. }) => {
                        report.lost.push((i, addr, Lost::Reserved))
                    }
                    Err(IpamError::AddressNotInPool { .. }) => {
                        report.lost.push((i, addr, Lost::NotInPool))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    tracing::info!(
        node,
        held = report.held,
        retaken = ?report.retaken,
        adopted = ?report.blocks_adopted,
        lost = ?report.lost,
        "re-asserted local workloads"
    );
    Ok(report)
}

/// Takes an orphaned block (no affinity: GC released its node's claim while allocations
/// remained) as this node's, in one transaction guarded by the block's revision and the
/// absence of our affinity record. False when someone changed it first.
async fn adopt_block<K: Kv>(
    kv: &K,
    node: &str,
    cidr: IpNetwork,
    block_rev: i64,
) -> Result<bool, IpamError> {
    let bkey = keys::block(cidr);
    let akey = keys::affinity(node, cidr);
    let Some((read, rev)) = block_store::read_block(kv, cidr).await? else {
        return Ok(false);
    };
    if rev != block_rev || read.affinity.is_some() {
        return Ok(false);
    }
    let mut block = read.clone();
    block.affinity = Some(node.to_string());
    let affinity = BlockAffinity {
        node: node.to_string(),
        cidr,
        state: AffinityState::Confirmed,
        since_ms: now_ms(),
    };
    let txn = Txn::new()
        .expect(&bkey, block_rev)
        .expect(&akey, 0)
        .then_all(block_store::write_ops(Some(&read), &block))
        .then(Op::put(&akey, encode(&affinity)));
    Ok(with_retry(|| kv.txn(txn.clone())).await?.succeeded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use crate::model::{IpPool, Node};
    use crate::resources::{apply_config, put_node};
    use crate::yaml::parse_resources;
    use crate::AssignRequest;

    const POOL: &str = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: p }\nspec: { cidr: 10.244.100.0/28, blockSize: 30 }\n";

    async fn store(nodes: &[&str]) -> MemKv {
        let kv = MemKv::default();
        let r = parse_resources(POOL).expect("yaml");
        apply_config(&kv, &r.pools, &r.reservations)
            .await
            .expect("pools");
        for n in nodes {
            put_node(
                &kv,
                &Node {
                    name: n.to_string(),
                    ..Default::default()
                },
            )
            .await
            .expect("node");
        }
        kv
    }

    async fn take(kv: &MemKv, node: &str, handle: &str) -> IpAddr {
        let req = AssignRequest {
            owner: Owner {
                handle: handle.into(),
                ..Default::default()
            },
            num_v4: 1,
            ..Default::default()
        };
        Ipam::new(kv.clone(), node)
            .auto_assign(&req)
            .await
            .expect("assign")[0]
            .addr
    }

    fn local(handle: &str, addr: IpAddr) -> LocalWorkload {
        LocalWorkload {
            handle: handle.into(),
            addresses: vec![addr],
            attrs: [("pod".to_string(), handle.to_string())].into(),
        }
    }

    #[tokio::test]
    async fn held_addresses_are_left_alone() {
        let kv = store(&["n3"]).await;
        let a = take(&kv, "n3", "w1").await;
        let r = reassert(&kv, "n3", &[local("w1", a)])
            .await
            .expect("reassert");
        assert_eq!((r.held, r.retaken.len(), r.lost.len()), (1, 0, 0));
    }

    #[tokio::test]
    async fn free_addresses_come_back_and_taken_ones_are_lost() {
        let kv = store(&["n1", "n3"]).await;
        let a = take(&kv, "n3", "w1").await;
        let b = take(&kv, "n3", "w2").await;
        // GC reclaims n3 (its lease lapsed, the witness found nothing)...
        let (_, rev) = crate::gc::mark_suspect(&kv, "n3", 1, None)
            .await
            .expect("suspect")
            .expect("no lease");
        let guard = crate::gc::ReclaimGuard {
            leader: None,
            verdict: crate::gc::Verdict::Dead { suspect_rev: rev },
        };
        crate::gc::reclaim_node(&kv, "n3", &guard)
            .await
            .expect("reclaim");
        // ...and n1's new workload gets one of its addresses (the freed block is n1's now).
        let mut taken = take(&kv, "n1", "w9").await;
        while taken != a && taken != b {
            taken = take(&kv, "n1", &format!("w9-{taken}")).await;
        }
        let (kept, lost) = if taken == a { (b, a) } else { (a, b) };
        let (kept_h, lost_h) = if taken == a {
            ("w2", "w1")
        } else {
            ("w1", "w2")
        };
        let r = reassert(&kv, "n3", &[local(lost_h, lost), local(kept_h, kept)])
            .await
            .expect("reassert");
        assert_eq!(r.retaken, vec![kept]);
        assert_eq!(r.lost.len(), 1);
        assert_eq!(r.lost[0].1, lost);
        assert!(matches!(&r.lost[0].2, Lost::TakenBy { handle } if handle.starts_with("w9")));
        // The retaken address is ours again, recorded with our node (announced by us).
        let snap = Snapshot::read(&kv).await.expect("snap");
        let alloc = snap
            .blocks
            .values()
            .find_map(|b| b.value.allocation(kept).cloned())
            .expect("allocated");
        assert_eq!(alloc.handle, kept_h);
        assert_eq!(alloc.attrs.get("node").map(String::as_str), Some("n3"));
        snap.check(true).expect("invariants");
    }

    #[tokio::test]
    async fn an_orphaned_block_is_adopted_back() {
        let kv = store(&["n3"]).await;
        let a = take(&kv, "n3", "w1").await;
        let b = take(&kv, "n3", "w2").await;
        // GC released n3's claim while w2's allocation stayed (it was re-created elsewhere
        // with the same handle, say): the block is orphaned, w1's address free.
        let snap = Snapshot::read(&kv).await.expect("snap");
        let (cidr, blk) = snap
            .blocks
            .iter()
            .find(|(_, blk)| blk.value.allocation(a).is_some())
            .expect("block");
        let mut orphan = blk.value.clone();
        orphan.affinity = None;
        orphan.release(a, None, 0).expect("release");
        let h1 = snap.handles.get("w1").expect("handle");
        let txn = Txn::new()
            .expect(keys::block(*cidr), blk.rev)
            .then_all(block_store::write_ops(Some(&blk.value), &orphan))
            .then(Op::delete(keys::affinity("n3", *cidr)))
            .then(Op::delete(keys::handle("w1")))
            .expect(keys::handle("w1"), h1.rev);
        assert!(kv.txn(txn).await.expect("txn").succeeded);
        let r = reassert(&kv, "n3", &[local("w1", a), local("w2", b)])
            .await
            .expect("reassert");
        assert_eq!(r.blocks_adopted, vec![*cidr]);
        assert_eq!(r.retaken, vec![a]);
        assert_eq!(r.held, 1);
        let snap = Snapshot::read(&kv).await.expect("snap");
        assert_eq!(snap.blocks[cidr].value.affinity.as_deref(), Some("n3"));
        snap.check(true).expect("invariants");
    }

    #[tokio::test]
    async fn a_block_orphaned_under_pods_that_still_hold_it_is_adopted() {
        // The CNI plugin wired n3's pods before its agent registered n3; GC, knowing no such
        // node, orphaned the block and kept the allocations. n3's agent adopts it.
        let kv = store(&[]).await;
        let a = take(&kv, "n3", "w1").await;
        let gc = crate::gc::gc(&kv, &crate::gc::GcOptions::default())
            .await
            .expect("gc");
        assert_eq!(gc.blocks_orphaned, 1, "{gc:?}");
        let r = reassert(&kv, "n3", &[local("w1", a)])
            .await
            .expect("reassert");
        assert_eq!((r.held, r.retaken.len(), r.lost.len()), (1, 0, 0));
        assert_eq!(r.blocks_adopted.len(), 1);
        let snap = Snapshot::read(&kv).await.expect("snap");
        let block = snap
            .blocks
            .values()
            .find(|b| b.value.cidr.contains(a))
            .expect("block");
        assert_eq!(block.value.affinity.as_deref(), Some("n3"));
        assert_eq!(
            block.value.allocation(a).map(|x| x.handle.as_str()),
            Some("w1")
        );
        snap.check(true).expect("invariants");
    }

    #[test]
    fn plan_names_reserved_and_unpooled_addresses_lost() {
        let mut snap = Snapshot::default();
        let pool: IpPool = serde_json::from_value(serde_json::json!({
            "name": "p", "spec": { "cidr": "10.244.100.0/28", "blockSize": 30 }
        }))
        .expect("pool");
        snap.pools.push(pool);
        snap.reservations.push(
            serde_json::from_value(serde_json::json!({
                "name": "r", "spec": { "reservedCidrs": ["10.244.100.4/30"] }
            }))
            .expect("reservation"),
        );
        let w = LocalWorkload {
            handle: "h".into(),
            addresses: vec![
                "10.244.100.5".parse().expect("ip"),
                "10.244.200.1".parse().expect("ip"),
                "10.244.100.1".parse().expect("ip"),
            ],
            attrs: Attributes::new(),
        };
        let fates: Vec<Fate> = plan(&snap, &[w]).into_iter().map(|(_, _, f)| f).collect();
        assert_eq!(
            fates,
            vec![
                Fate::Lost(Lost::Reserved),
                Fate::Lost(Lost::NotInPool),
                Fate::Free {
                    orphaned_block: None
                }
            ]
        );
    }
}
