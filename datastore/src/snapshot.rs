//! A consistent view of all IPAM state (read at one revision), and the invariant checker that
//! every test runs after it has done its worst.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::block::IpamBlock;
use crate::block_store;
use crate::codec::{decode, with_retry};
use crate::error::IpamError;
use crate::keys;
use crate::kv::Kv;
use crate::model::{
    AffinityState, BlockAffinity, IpPool, IpReservation, IpamHandle, Node, WorkloadEndpoint,
};

#[derive(Debug, Clone)]
pub struct Rev<T> {
    pub rev: i64,
    pub value: T,
}

/// Everything under [`keys::PREFIX`] at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub pools: Vec<IpPool>,
    pub reservations: Vec<IpReservation>,
    pub blocks: BTreeMap<IpNetwork, Rev<IpamBlock>>,
    /// (node, block) -> affinity
    pub affinities: BTreeMap<(String, IpNetwork), Rev<BlockAffinity>>,
    pub handles: BTreeMap<String, Rev<IpamHandle>>,
    pub nodes: BTreeMap<String, Node>,
    /// Nodes whose liveness key exists.
    pub live: HashSet<String>,
    /// Every pod's endpoint, at the same revision.
    pub workloads: Vec<WorkloadEndpoint>,
    /// `V6` records whose block's own key is gone (deleted by hand): that key, and how many
    /// records are under it ([`block_store::orphaned_records`]).
    pub orphaned_records: BTreeMap<String, usize>,
}

impl Snapshot {
    pub async fn read<K: Kv>(kv: &K) -> Result<Self, IpamError> {
        let (kvs, revision) = with_retry(|| kv.get_prefix(keys::PREFIX)).await?;
        Self::decode_all(&kvs, revision)
    }

    /// Only nodes, liveness, blocks and affinities (who holds what, who is alive): what
    /// judging nodes needs, without the handles and endpoints that are most of a large
    /// cluster's keys. Four reads, not one revision: every write made from it is guarded.
    pub async fn read_nodes_and_blocks<K: Kv>(kv: &K) -> Result<Self, IpamError> {
        let read = |prefix: &'static str| with_retry(move || kv.get_prefix(prefix));
        let (nodes, live, blocks, affinities) = tokio::try_join!(
            read(keys::NODES),
            read(keys::LIVENESS),
            read(keys::BLOCKS),
            read(keys::AFFINITIES)
        )?;
        let revision = blocks.1;
        let kvs: Vec<_> = [nodes.0, live.0, blocks.0, affinities.0]
            .into_iter()
            .flatten()
            .collect();
        Self::decode_all(&kvs, revision)
    }

    fn decode_all(kvs: &[crate::kv::KeyValue], revision: i64) -> Result<Self, IpamError> {
        let mut s = Snapshot {
            revision,
            ..Default::default()
        };
        for (value, rev) in block_store::blocks_from(kvs)? {
            s.blocks.insert(value.cidr, Rev { rev, value });
        }
        s.orphaned_records = block_store::orphaned_records(kvs);
        for item in kvs {
            let k = item.key.as_str();
            if k.starts_with(keys::POOLS) {
                s.pools.push(decode(item)?);
            } else if k.starts_with(keys::RESERVATIONS) {
                s.reservations.push(decode(item)?);
            } else if k.starts_with(keys::BLOCKS) {
                // Read together below: a block's records come with it.
            } else if k.starts_with(keys::AFFINITIES) {
                let a: BlockAffinity = decode(item)?;
                s.affinities.insert(
                    (a.node.clone(), a.cidr),
                    Rev {
                        rev: item.mod_revision,
                        value: a,
                    },
                );
            } else if k.starts_with(keys::HANDLES) {
                let h: IpamHandle = decode(item)?;
                s.handles.insert(
                    h.id.clone(),
                    Rev {
                        rev: item.mod_revision,
                        value: h,
                    },
                );
            } else if k.starts_with(keys::NODES) {
                let n: Node = decode(item)?;
                s.nodes.insert(n.name.clone(), n);
            } else if let Some(name) = k.strip_prefix(keys::LIVENESS) {
                s.live.insert(name.to_string());
            } else if k.starts_with(keys::WORKLOADS) {
                s.workloads.push(decode(item)?);
            }
        }
        Ok(s)
    }

    /// Every allocated address with its handle.
    pub fn allocations(&self) -> Vec<(IpAddr, String)> {
        self.blocks
            .values()
            .flat_map(|b| b.value.allocated().map(|(a, al)| (a, al.handle.clone())))
            .collect()
    }

    /// Checks the IPAM invariants. `settled` adds those that hold only once GC has run
    /// with nothing in flight (no pending affinities, every affine block has its affinity).
    pub fn check(&self, settled: bool) -> Result<(), Vec<String>> {
        let mut v = Vec::new();
        // Tessera deletes a block with its records; orphans are a hand's work, for GC.
        for (own, n) in &self.orphaned_records {
            v.push(format!("{n} records under {own}/ without their block"));
        }
        // Blocks: internally consistent, inside a pool, disjoint.
        let mut owners: HashMap<IpAddr, &str> = HashMap::new();
        for (cidr, b) in &self.blocks {
            if let Err(e) = b.value.check() {
                v.push(e);
            }
            if !self
                .pools
                .iter()
                .any(|p| p.spec.cidr.contains(cidr.network()))
            {
                v.push(format!("block {cidr} is outside every pool"));
            }
            for (addr, alloc) in b.value.allocated() {
                if owners.insert(addr, &alloc.handle).is_some() {
                    v.push(format!("{addr} allocated twice"));
                }
                match self.handles.get(&alloc.handle) {
                    None => v.push(format!(
                        "{addr} allocated to handle {} which does not exist",
                        alloc.handle
                    )),
                    Some(h) => {
                        if !h
                            .value
                            .addresses
                            .iter()
                            .any(|e| e.addr == addr && e.seq == alloc.seq && e.block == *cidr)
                        {
                            v.push(format!(
                                "{addr} allocated to handle {} (seq {}) but the handle does not list it",
                                alloc.handle, alloc.seq
                            ));
                        }
                    }
                }
            }
        }
        let cidrs: Vec<&IpNetwork> = self.blocks.keys().collect();
        for w in cidrs.windows(2) {
            if w[0].contains(w[1].network()) || w[1].contains(w[0].network()) {
                v.push(format!("blocks {} and {} overlap", w[0], w[1]));
            }
        }
        // Handles list exactly what blocks give them.
        for (id, h) in &self.handles {
            if h.value.addresses.is_empty() {
                v.push(format!("handle {id} holds no address"));
            }
            let mut seen = HashSet::new();
            for e in &h.value.addresses {
                if !seen.insert(e.addr) {
                    v.push(format!("handle {id} lists {} twice", e.addr));
                }
                let ok = self
                    .blocks
                    .get(&e.block)
                    .and_then(|b| b.value.allocation(e.addr))
                    .is_some_and(|a| a.handle == *id && a.seq == e.seq);
                if !ok {
                    v.push(format!(
                        "handle {id} lists {} (seq {}) which its block does not give it",
                        e.addr, e.seq
                    ));
                }
            }
        }
        // Affinities: a confirmed one matches its block; one owner per block.
        let mut confirmed: HashMap<IpNetwork, &str> = HashMap::new();
        for ((node, cidr), a) in &self.affinities {
            match a.value.state {
                AffinityState::Confirmed => {
                    if confirmed.insert(*cidr, node).is_some() {
                        v.push(format!("block {cidr} has two confirmed affinities"));
                    }
                    let matches = self
                        .blocks
                        .get(cidr)
                        .is_some_and(|b| b.value.affinity.as_deref() == Some(node.as_str()));
                    if !matches {
                        v.push(format!(
                            "confirmed affinity {node} -> {cidr} but the block is not {node}'s"
                        ));
                    }
                }
                AffinityState::Pending | AffinityState::PendingDeletion if settled => v.push(
                    format!("affinity {node} -> {cidr} stuck {:?}", a.value.state),
                ),
                _ => {}
            }
        }
        if settled {
            for (cidr, b) in &self.blocks {
                if let Some(node) = &b.value.affinity {
                    if !self.affinities.contains_key(&(node.clone(), *cidr)) {
                        v.push(format!(
                            "block {cidr} is {node}'s but has no affinity record"
                        ));
                    }
                }
            }
        }
        // Reserved addresses are never handed out.
        for r in &self.reservations {
            for c in &r.spec.reserved_cidrs {
                for addr in owners.keys() {
                    if c.contains(*addr) {
                        v.push(format!("reserved {addr} ({}) is allocated", r.name));
                    }
                }
            }
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(v)
        }
    }
}

/// Reads a snapshot and checks it; panics with every violation listed. For tests.
pub async fn assert_invariants<K: Kv>(kv: &K, settled: bool) -> Snapshot {
    let snap = match Snapshot::read(kv).await {
        Ok(s) => s,
        Err(e) => panic!("cannot read IPAM state: {e}"),
    };
    if let Err(v) = snap.check(settled) {
        panic!(
            "IPAM invariants violated at revision {}:\n  {}",
            snap.revision,
            v.join("\n  ")
        );
    }
    snap
}
