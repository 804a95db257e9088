//! IPAM operations on the datastore: assignment, release, block claims.
//!
//! Every mutation is one transaction guarded by the mod_revision of each key it read
//! (block, handle, and the config epoch so pools and reservations are current). An
//! assignment writes the block and the handle together, so a crash can never leave an
//! address allocated without its handle or the reverse. A block claim is two-phase
//! (affinity pending -> block created -> affinity confirmed); a crash between the phases
//! leaves a pending affinity or an unconfirmed block that the next claim or [`crate::gc`]
//! completes or removes.
//!
//! An [`Ipam`] keeps the last version it saw of each block and handle. The cache is only a
//! guess: every write compares revisions, and a failed compare returns the current values in
//! the same round trip, so the uncontended path costs one transaction per operation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;

use crate::block::{Assigned, Attributes, BlockError, BlockFormat, IpamBlock};
use crate::block_store;
use crate::codec::{conflict_pause, decode, encode, fnv1a, now_ms, with_retry};
use crate::error::{Family, IpamError};
use crate::handoff::{Affinities, Handoff, Known, HANDLES_CARRIED};
use crate::keys;
use crate::kv::{KeyValue, Kv, Op, Txn, MAX_TXN_WRITES};
use crate::model::{AffinityState, BlockAffinity, HandleAddress, IpPool, IpamHandle, WorkloadId};
use crate::resources::{get_node, load_config, Config};

mod batch;
pub use batch::{BatchedOp, BatchedOutcome, MAX_BATCH};

/// Conflicting concurrent updates tolerated per operation before giving up.
pub const MAX_CONFLICTS: u32 = 100;

/// Who asks for addresses.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// The IPAM handle, e.g. `<network>.<container id>`.
    pub handle: String,
    /// The workload, for stable addresses and owner-selected pools.
    pub workload: Option<WorkloadId>,
    /// Extra attributes recorded on each allocation.
    pub attrs: Attributes,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AssignRequest {
    pub owner: Owner,
    pub num_v4: usize,
    pub num_v6: usize,
    /// Restrict to these pools (by name); empty means every pool that may serve the request.
    pub pools: Vec<String>,
}

/// One address handed out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    pub addr: IpAddr,
    pub block: IpNetwork,
    pub pool: String,
    /// Pass back to [`Ipam::release_addresses`] to make the release safe against reuse.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released {
        addr: IpAddr,
        handle: String,
    },
    AlreadyFree {
        addr: IpAddr,
    },
    /// The address was re-allocated since the caller's allocation; nothing was freed.
    Stale {
        addr: IpAddr,
    },
}

#[derive(Debug, Clone)]
struct Versioned<T> {
    rev: i64,
    value: T,
}

#[derive(Default)]
struct Cache {
    config: Option<Arc<Config>>,
    labels: Option<BTreeMap<String, String>>,
    /// Shared, so that reading a block from the cache does not copy its allocations.
    blocks: HashMap<IpNetwork, Versioned<Arc<IpamBlock>>>,
    handles: HashMap<String, Versioned<IpamHandle>>,
    /// Confirmed affinities of this node.
    affine: Option<BTreeSet<IpNetwork>>,
    /// Which datastore this is ([`crate::handoff::store_id`]), once known.
    store: Option<u64>,
    /// The revision `affine` is known at and when it was last read from etcd (see
    /// [`Handoff`]).
    affine_as_of: i64,
    affine_read_ms: u64,
    /// Blocks and handles this client deleted, with the deletion's revision: what a
    /// [`Handoff`] tells the next client that read them before.
    deleted_blocks: HashMap<IpNetwork, i64>,
    deleted_handles: HashMap<String, i64>,
    /// A workload's last addresses read ahead by [`Ipam::prefetch_for`], by key; taken (not
    /// kept) by the assignment that asks for them.
    last_addresses: HashMap<String, Vec<IpAddr>>,
}

impl Cache {
    fn put_block(&mut self, cidr: IpNetwork, rev: i64, value: IpamBlock) {
        let value = Arc::new(value);
        self.blocks.insert(cidr, Versioned { rev, value });
    }

    /// Takes `known` for block `cidr` if it is newer than what is cached.
    fn take_block_if_newer(&mut self, cidr: IpNetwork, known: Known<IpamBlock>) {
        let cached_rev = self
            .blocks
            .get(&cidr)
            .map(|b| b.rev)
            .or_else(|| self.deleted_blocks.get(&cidr).copied())
            .unwrap_or(0);
        if known.rev <= cached_rev {
            return;
        }
        match known.value {
            Some(value) => {
                self.deleted_blocks.remove(&cidr);
                self.put_block(cidr, known.rev, value);
            }
            None => {
                self.blocks.remove(&cidr);
                self.deleted_blocks.insert(cidr, known.rev);
            }
        }
    }

    /// Takes `known` for handle `id` if it is newer than what is cached.
    fn take_handle_if_newer(&mut self, id: String, known: Known<IpamHandle>) {
        let cached_rev = self
            .handles
            .get(&id)
            .map(|h| h.rev)
            .filter(|&rev| rev > 0)
            .or_else(|| self.deleted_handles.get(&id).copied())
            .unwrap_or(0);
        if known.rev <= cached_rev {
            return;
        }
        match known.value {
            Some(value) => {
                self.deleted_handles.remove(&id);
                let rev = known.rev;
                self.handles.insert(id, Versioned { rev, value });
            }
            None => self.forget_handle(&id, Some(known.rev)),
        }
    }

    fn affinities_changed(&mut self, rev: i64) {
        self.affine_as_of = self.affine_as_of.max(rev);
    }

    /// Remembers that a handle is absent (revision 0), which is what a pod's next ADD with
    /// the same handle would otherwise have to read again; `deleted_at`: this client
    /// deleted it, in that revision. Bounded: absent handles are cheap to re-read, so the
    /// cache of them is simply cleared when it grows.
    fn forget_handle(&mut self, id: &str, deleted_at: Option<i64>) {
        if self.handles.len() > 10_000 {
            self.handles.retain(|_, h| h.rev != 0);
            self.deleted_handles.clear();
        }
        if let Some(rev) = deleted_at {
            self.deleted_handles.insert(id.to_string(), rev);
        }
        self.handles.insert(
            id.to_string(),
            Versioned {
                rev: 0,
                value: IpamHandle {
                    id: id.to_string(),
                    addresses: Vec::new(),
                },
            },
        );
    }
}

/// Another node's block we may borrow from: its CIDR, the key that must stay absent while
/// we do, and how many addresses it has free at (time, reuse delay).
type ForeignBlock = (
    IpNetwork,
    Option<String>,
    Box<dyn Fn(u64, u64) -> usize + Send>,
);

/// The IPAM client of one node.
pub struct Ipam<K: Kv> {
    kv: K,
    node: String,
    cache: Mutex<Cache>,
}

impl<K: Kv> Ipam<K> {
    pub fn new(kv: K, node: impl Into<String>) -> Self {
        Ipam {
            kv,
            node: node.into(),
            cache: Mutex::new(Cache::default()),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn kv(&self) -> &K {
        &self.kv
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The cache is a hint; a poisoned one is as good as any.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets everything cached (pools, labels, blocks, handles, affinities).
    pub fn forget(&self) {
        *self.cache() = Cache::default();
    }

    /// Says which datastore this client works in ([`crate::handoff::store_id`]): handoffs
    /// are only exchanged within one.
    pub fn set_store(&self, id: u64) {
        self.cache().store = Some(id);
    }

    /// The datastore this client works in, if [`Ipam::set_store`] said.
    pub fn store(&self) -> Option<u64> {
        self.cache().store
    }

    /// What this client knows of the node's affinities, blocks and recently written
    /// handles, for the next short-lived client of the same node (see [`Handoff`]).
    pub fn handoff(&self) -> Handoff {
        let c = self.cache();
        let mut blocks: BTreeMap<IpNetwork, Known<IpamBlock>> = c
            .blocks
            .iter()
            .filter(|(_, b)| b.value.affinity.as_deref() == Some(self.node.as_str()))
            .map(|(cidr, b)| {
                let known = Known {
                    rev: b.rev,
                    value: Some(IpamBlock::clone(&b.value)),
                };
                (*cidr, known)
            })
            .collect();
        for (cidr, &rev) in &c.deleted_blocks {
            if blocks.get(cidr).is_none_or(|b| b.rev < rev) {
                blocks.insert(*cidr, Known { rev, value: None });
            }
        }
        let mut handles: Vec<(String, Known<IpamHandle>)> = c
            .handles
            .iter()
            .filter(|(_, h)| h.rev > 0)
            .map(|(id, h)| {
                let known = Known {
                    rev: h.rev,
                    value: Some(h.value.clone()),
                };
                (id.clone(), known)
            })
            .collect();
        for (id, &rev) in &c.deleted_handles {
            if c.handles.get(id).is_none_or(|h| h.rev < rev) {
                handles.push((id.clone(), Known { rev, value: None }));
            }
        }
        handles.sort_by_key(|(_, h)| std::cmp::Reverse(h.rev));
        handles.truncate(HANDLES_CARRIED);
        Handoff {
            node: self.node.clone(),
            store: c.store,
            affinities: c.affine.clone().map(|blocks| Affinities {
                as_of: c.affine_as_of,
                read_ms: c.affine_read_ms,
                blocks,
            }),
            blocks,
            handles: handles.into_iter().collect(),
            config: c.config.as_deref().cloned(),
        }
    }

    /// Takes what the previous client of this node handed over, key by key where it is
    /// newer than what this one read. A handoff of another node, or of another store or
    /// before this client knows its own ([`Ipam::set_store`]), is ignored: revisions of two
    /// stores do not compare.
    pub fn adopt(&self, handed: Handoff) {
        let mut c = self.cache();
        if handed.node != self.node || c.store.is_none() || handed.store != c.store {
            return;
        }
        if let Some(a) = handed.affinities {
            if c.affine.is_none() || a.as_of > c.affine_as_of {
                c.affine = Some(a.blocks);
                c.affine_as_of = a.as_of;
            }
            c.affine_read_ms = c.affine_read_ms.max(a.read_ms);
        }
        if let Some(config) = handed.config {
            if c.config
                .as_ref()
                .is_none_or(|ours| config.epoch_rev > ours.epoch_rev)
            {
                c.config = Some(Arc::new(config));
            }
        }
        for (cidr, known) in handed.blocks {
            c.take_block_if_newer(cidr, known);
        }
        for (id, known) in handed.handles {
            c.take_handle_if_newer(id, known);
        }
    }

    /// The handle as this client knows it: its value at a revision, or its deletion by this
    /// client; `None` when only "absent" or nothing is known.
    pub fn known_handle(&self, id: &str) -> Option<Known<IpamHandle>> {
        let c = self.cache();
        match c.handles.get(id) {
            Some(h) if h.rev > 0 => Some(Known {
                rev: h.rev,
                value: Some(h.value.clone()),
            }),
            _ => c
                .deleted_handles
                .get(id)
                .map(|&rev| Known { rev, value: None }),
        }
    }

    // ---- assignment -------------------------------------------------------------------------

    /// Assigns `num_v4` IPv4 and `num_v6` IPv6 addresses to the owner's handle: first a
    /// workload's previous addresses if free, then this node's blocks, then a newly claimed
    /// block, then (unless the pool has strict affinity) a block borrowed from another node.
    /// All or nothing: on error, what was assigned is released again.
    pub async fn auto_assign(&self, req: &AssignRequest) -> Result<Vec<Assignment>, IpamError> {
        check_handle(&req.owner.handle)?;
        let attrs = self.attributes(&req.owner);
        let mut out = Vec::new();
        for (family, n) in [(Family::V4, req.num_v4), (Family::V6, req.num_v6)] {
            if n == 0 {
                continue;
            }
            if let Err(e) = self.assign_family(req, &attrs, family, n, &mut out).await {
                self.roll_back(&out).await;
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Assigns exactly `addr` (the CNI `ips` capability, `IP=`, pod annotations). The address
    /// must be in a pool, free and not reserved; its block is claimed for this node if nobody
    /// has it yet.
    pub async fn assign_exact(&self, owner: &Owner, addr: IpAddr) -> Result<Assignment, IpamError> {
        check_handle(&owner.handle)?;
        let cfg = self.config().await?;
        let pool = cfg
            .pool_of(addr)
            .ok_or(IpamError::AddressNotInPool { addr })?
            .clone();
        if let Some(sel) = &pool.spec.owner_selector {
            let labels = owner.workload.as_ref().map(|w| w.labels.clone());
            if !sel.matches(&labels.unwrap_or_default()) {
                return Err(IpamError::NoPool {
                    family: family_of(addr),
                    node: self.node.clone(),
                    workload: owner.workload.as_ref().map(workload_name),
                });
            }
        }
        let attrs = self.attributes(owner);
        self.assign_exact_in(&pool, addr, owner, &attrs).await
    }

    /// Takes `addr` back for `owner`, whose address it was before this node was reclaimed
    /// (see [`crate::reassert`]): like [`Ipam::assign_exact`] but without the pool's owner
    /// selector (the workload already had the address) and without the reuse delay.
    pub(crate) async fn retake(&self, owner: &Owner, addr: IpAddr) -> Result<(), IpamError> {
        check_handle(&owner.handle)?;
        let cfg = self.config().await?;
        let pool = cfg
            .pool_of(addr)
            .ok_or(IpamError::AddressNotInPool { addr })?
            .clone();
        let attrs = self.attributes(owner);
        self.assign_exact_in(&pool, addr, owner, &attrs).await?;
        Ok(())
    }

    fn attributes(&self, owner: &Owner) -> Attributes {
        let mut attrs = owner.attrs.clone();
        attrs.insert("node".into(), self.node.clone());
        if let Some(w) = &owner.workload {
            attrs.insert("namespace".into(), w.namespace.clone());
            attrs.insert("pod".into(), w.name.clone());
        }
        attrs
    }

    async fn assign_family(
        &self,
        req: &AssignRequest,
        attrs: &Attributes,
        family: Family,
        n: usize,
        out: &mut Vec<Assignment>,
    ) -> Result<(), IpamError> {
        let cfg = self.config().await?;
        let pools = self.candidate_pools(&cfg, family, req).await?;
        let mut need = n;

        // A returning workload gets its previous addresses back when they are free.
        if let Some(w) = &req.owner.workload {
            for addr in self.last_addresses(w).await? {
                if need == 0 {
                    break;
                }
                if family_of(addr) != family {
                    continue;
                }
                let Some(pool) = pools.iter().find(|p| p.spec.cidr.contains(addr)) else {
                    continue;
                };
                match self.assign_exact_in(pool, addr, &req.owner, attrs).await {
                    Ok(a) => {
                        need -= 1;
                        out.push(a);
                    }
                    Err(IpamError::AddressInUse { .. } | IpamError::AddressReserved { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }

        need -= self
            .assign_in_affine_blocks(&pools, need, &req.owner, attrs, out)
            .await?;
        for pool in &pools {
            while need > 0 {
                let Some(cidr) = self.claim_next_block(pool).await? else {
                    break;
                };
                let got = self
                    .assign_in_block(pool, cidr, need, &req.owner, attrs, None)
                    .await?;
                need -= got.len();
                out.extend(got);
            }
        }
        if need > 0 {
            // Another process of this node (a CNI plugin running beside us) may have claimed
            // blocks since we read our affinities: those come before other nodes' blocks.
            self.cache().affine = None;
            need -= self
                .assign_in_affine_blocks(&pools, need, &req.owner, attrs, out)
                .await?;
        }
        for pool in pools.iter().filter(|p| !p.spec.strict_affinity) {
            if need == 0 {
                break;
            }
            let delay = reuse_delay_ms(pool);
            for (cidr, guard, available) in self.foreign_blocks(pool).await? {
                if need == 0 {
                    break;
                }
                if available(now_ms(), delay) == 0 {
                    continue;
                }
                tracing::debug!(node = %self.node, block = %cidr, "borrowing from another node's block");
                let got = self
                    .assign_in_block_with(
                        pool,
                        cidr,
                        need,
                        &req.owner,
                        attrs,
                        None,
                        guard.as_deref(),
                    )
                    .await?;
                need -= got.len();
                out.extend(got);
            }
        }
        if need > 0 {
            return Err(IpamError::Exhausted {
                family,
                pools: pools.iter().map(|p| p.name.clone()).collect(),
                node: self.node.clone(),
            });
        }
        Ok(())
    }

    /// Assigns up to `need` addresses from this node's blocks of `pools`, pool by pool;
    /// returns how many it assigned.
    async fn assign_in_affine_blocks(
        &self,
        pools: &[IpPool],
        need: usize,
        owner: &Owner,
        attrs: &Attributes,
        out: &mut Vec<Assignment>,
    ) -> Result<usize, IpamError> {
        let mut assigned = 0;
        for pool in pools {
            for cidr in self.affine_blocks().await? {
                if assigned == need {
                    return Ok(assigned);
                }
                if pool.spec.cidr.contains(cidr.network()) {
                    let got = self
                        .assign_in_block(pool, cidr, need - assigned, owner, attrs, None)
                        .await?;
                    assigned += got.len();
                    out.extend(got);
                }
            }
        }
        Ok(assigned)
    }

    /// The pools that may serve `req` on this node, in order. A workload that matches an
    /// owner-selected pool uses only such pools; everyone else uses only unowned pools.
    async fn candidate_pools(
        &self,
        cfg: &Config,
        family: Family,
        req: &AssignRequest,
    ) -> Result<Vec<IpPool>, IpamError> {
        let labels = self.node_labels().await?;
        let no_labels = BTreeMap::new();
        let workload_labels = req
            .owner
            .workload
            .as_ref()
            .map(|w| &w.labels)
            .unwrap_or(&no_labels);
        let usable: Vec<&IpPool> = cfg
            .pools
            .iter()
            .filter(|p| (family == Family::V4) == p.is_ipv4())
            .filter(|p| !p.spec.disabled && p.spec.node_selector.matches(&labels))
            .filter(|p| req.pools.is_empty() || req.pools.contains(&p.name))
            .collect();
        let owned: Vec<IpPool> = usable
            .iter()
            .filter(|p| {
                p.spec
                    .owner_selector
                    .as_ref()
                    .is_some_and(|s| s.matches(workload_labels))
            })
            .map(|p| (*p).clone())
            .collect();
        let chosen = if owned.is_empty() {
            usable
                .into_iter()
                .filter(|p| p.spec.owner_selector.is_none())
                .cloned()
                .collect()
        } else {
            owned
        };
        if chosen.is_empty() {
            return Err(IpamError::NoPool {
                family,
                node: self.node.clone(),
                workload: req.owner.workload.as_ref().map(workload_name),
            });
        }
        Ok(chosen)
    }

    async fn assign_exact_in(
        &self,
        pool: &IpPool,
        addr: IpAddr,
        owner: &Owner,
        attrs: &Attributes,
    ) -> Result<Assignment, IpamError> {
        let cidr = pool
            .block_of(addr)
            .ok_or(IpamError::AddressNotInPool { addr })?;
        for _ in 0..3 {
            if self.block(cidr).await?.is_none() {
                // Lost races are fine: then the block exists and belongs to someone else.
                self.claim_block(pool, cidr).await?;
            }
            if let Some(a) = self
                .assign_in_block(pool, cidr, 1, owner, attrs, Some(addr))
                .await?
                .pop()
            {
                return Ok(a);
            }
        }
        Err(IpamError::BlockGone {
            block: cidr,
            what: "exact assignment",
        })
    }

    /// Assigns up to `count` addresses (or exactly `exact`) from one block in one transaction
    /// that also updates the handle. Returns fewer (or none) when the block has no room.
    async fn assign_in_block(
        &self,
        pool: &IpPool,
        cidr: IpNetwork,
        count: usize,
        owner: &Owner,
        attrs: &Attributes,
        exact: Option<IpAddr>,
    ) -> Result<Vec<Assignment>, IpamError> {
        self.assign_in_block_with(pool, cidr, count, owner, attrs, exact, None)
            .await
    }

    /// [`Ipam::assign_in_block`], also requiring `absent` to stay absent (a borrow: the
    /// block owner's suspect record). In block format V6 a transaction carries at most
    /// [`MAX_TXN_WRITES`] records, so a large request takes several; if a later one fails,
    /// what the earlier ones assigned is released again.
    #[allow(clippy::too_many_arguments)]
    async fn assign_in_block_with(
        &self,
        pool: &IpPool,
        cidr: IpNetwork,
        count: usize,
        owner: &Owner,
        attrs: &Attributes,
        exact: Option<IpAddr>,
        absent: Option<&str>,
    ) -> Result<Vec<Assignment>, IpamError> {
        let mut out = Vec::new();
        while out.len() < count {
            let left = count - out.len();
            let got = match self
                .assign_in_block_txn(pool, cidr, left, owner, attrs, exact, absent)
                .await
            {
                Ok(got) => got,
                Err(e) => {
                    self.roll_back(&out).await;
                    return Err(e);
                }
            };
            if got.is_empty() {
                break;
            }
            out.extend(got);
            if exact.is_some() {
                break;
            }
        }
        Ok(out)
    }

    /// One transaction of [`Ipam::assign_in_block_with`]: up to `count` addresses.
    #[allow(clippy::too_many_arguments)]
    async fn assign_in_block_txn(
        &self,
        pool: &IpPool,
        cidr: IpNetwork,
        count: usize,
        owner: &Owner,
        attrs: &Attributes,
        exact: Option<IpAddr>,
        absent: Option<&str>,
    ) -> Result<Vec<Assignment>, IpamError> {
        let bkey = keys::block(cidr);
        let hkey = keys::handle(&owner.handle);
        let delay = reuse_delay_ms(pool);
        for attempt in 0..MAX_CONFLICTS {
            conflict_pause(attempt, fnv1a(&owner.handle)).await;
            let cfg = self.config().await?;
            let Some(blk) = self.block(cidr).await? else {
                return Ok(Vec::new());
            };
            let someone_elses = blk
                .value
                .affinity
                .as_deref()
                .is_some_and(|n| n != self.node);
            if someone_elses && exact.is_none() && absent.is_none() {
                // Not a borrow (that comes with its guard): a block we thought ours, from
                // a stale cache or handoff, that was released and claimed by another node.
                if let Some(a) = self.cache().affine.as_mut() {
                    a.remove(&cidr);
                }
                return Ok(Vec::new());
            }
            // A handle we have not seen is taken to be new (a pod's first assignment): the
            // transaction requires it absent, and if it is not, the failure branch brings
            // it back for the next attempt. One round trip less per pod start.
            let handle = self.cached_handle_or_new(&owner.handle);
            // Written back in the cluster's format: blocks move to a newer one as they change.
            let mut block = IpamBlock::clone(&blk.value).in_format(cfg.block_format);
            let now = now_ms();
            let count = if block.format >= BlockFormat::V6 {
                // Less the records a move to V6 writes in this same transaction.
                let moved = block_store::write_count(Some(&blk.value), &block) - 1;
                count.min(MAX_TXN_WRITES.saturating_sub(moved).max(1))
            } else {
                count
            };
            let got: Vec<Assigned> = match exact {
                Some(addr) => vec![block
                    .assign_exact(addr, &owner.handle, attrs, |a| cfg.is_reserved(a))
                    .map_err(|e| block_error(e, addr))?],
                None => block.assign(count, &owner.handle, attrs, now, delay, |a| {
                    cfg.is_reserved(a)
                }),
            };
            if got.is_empty() {
                return Ok(Vec::new());
            }
            block.forget_expired_releases(now, delay);
            let mut new_handle = handle.value.clone();
            new_handle.id = owner.handle.clone();
            new_handle
                .addresses
                .extend(got.iter().map(|a| HandleAddress {
                    addr: a.addr,
                    block: cidr,
                    seq: a.seq,
                }));
            new_handle.addresses.sort();
            let mut txn = Txn::new()
                .expect(&bkey, blk.rev)
                .expect(&hkey, handle.rev)
                .expect(keys::CONFIG_EPOCH, cfg.epoch_rev)
                .then_all(block_store::write_ops(Some(&blk.value), &block))
                .then(Op::put(&hkey, encode(&new_handle)))
                .or_get(&bkey)
                .or_get(&hkey)
                .or_get(keys::CONFIG_EPOCH);
            if let Some(k) = absent {
                txn = txn.expect(k, 0);
            }
            if let Some(w) = &owner.workload {
                let addrs: Vec<IpAddr> = new_handle.addresses.iter().map(|a| a.addr).collect();
                txn = txn.then(Op::put(
                    keys::last_addresses(&w.namespace, &w.name),
                    encode(&addrs),
                ));
            }
            let outcome = with_retry(|| self.kv.txn(txn.clone())).await?;
            let assignments = got
                .iter()
                .map(|a| Assignment {
                    addr: a.addr,
                    block: cidr,
                    pool: pool.name.clone(),
                    seq: a.seq,
                })
                .collect();
            if outcome.succeeded {
                let mut c = self.cache();
                c.put_block(cidr, outcome.revision, block);
                c.handles.insert(
                    owner.handle.clone(),
                    Versioned {
                        rev: outcome.revision,
                        value: new_handle,
                    },
                );
                return Ok(assignments);
            }
            let [fresh_block, fresh_handle, epoch] = take3(outcome.gets);
            if let Some(k) = absent {
                // The owner became suspect since we looked: borrow elsewhere.
                if with_retry(|| self.kv.get(k)).await?.is_some() {
                    return Ok(Vec::new());
                }
            }
            tracing::debug!(
                block = %cidr,
                attempt,
                block_rev = blk.rev,
                block_now = ?fresh_block.as_ref().map(|k| k.mod_revision),
                handle_rev = handle.rev,
                handle_now = ?fresh_handle.as_ref().map(|k| k.mod_revision),
                epoch_rev = cfg.epoch_rev,
                epoch_now = ?epoch.as_ref().map(|k| k.mod_revision),
                "assignment conflicted"
            );
            self.remember_block(cidr, fresh_block.as_ref()).await?;
            let fresh_handle = self.remember_handle(&owner.handle, fresh_handle.as_ref())?;
            if epoch.map(|e| e.mod_revision).unwrap_or(0) != cfg.epoch_rev {
                self.cache().config = None;
            }
            // A transaction that timed out may still have committed: then the handle
            // already holds exactly what we tried to assign.
            if let Some(h) = fresh_handle {
                let ours = got.iter().all(|a| {
                    h.addresses
                        .iter()
                        .any(|e| e.addr == a.addr && e.seq == a.seq && e.block == cidr)
                });
                if ours {
                    return Ok(assignments);
                }
            }
        }
        Err(IpamError::TooMuchContention {
            what: format!("assignment in block {cidr}"),
            attempts: MAX_CONFLICTS,
        })
    }

    async fn roll_back(&self, assigned: &[Assignment]) {
        if assigned.is_empty() {
            return;
        }
        let reqs: Vec<(IpAddr, Option<u64>)> =
            assigned.iter().map(|a| (a.addr, Some(a.seq))).collect();
        if let Err(e) = self.release_addresses(&reqs).await {
            // GC repairs nothing here (the handle is consistent); the CNI DEL or the
            // workload GC will release the handle.
            tracing::warn!(error = %e, "rolling back a partial assignment failed");
        }
    }

    // ---- block claims -----------------------------------------------------------------------

    /// Claims the first unclaimed block of `pool`, searching from a place derived from the
    /// node name so that nodes rarely race for the same block. Returns `None` only when the
    /// pool has no unclaimed block left: a node borrows from others' blocks only then.
    async fn claim_next_block(&self, pool: &IpPool) -> Result<Option<IpNetwork>, IpamError> {
        let count = pool.block_count();
        let start = fnv1a(&self.node) % count;
        let mut blocks_seen: Option<usize> = None;
        loop {
            // Blocks' own keys only: a V6 block's records are keys under it.
            let existing: HashSet<String> = with_retry(|| self.kv.list_keys(keys::BLOCKS))
                .await?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| {
                    matches!(
                        block_store::BlockKey::parse(k),
                        Some(block_store::BlockKey::Block(_))
                    )
                })
                .collect();
            if blocks_seen.is_some_and(|n| existing.len() <= n) {
                // Every block we tried was lost, yet no block appeared: the losses were
                // not races with other claims (an affinity of ours being deleted, say).
                return Ok(None);
            }
            blocks_seen = Some(existing.len());
            // Among existing+1 consecutive candidates at least one is free, if any is: this
            // bounds the search in huge IPv6 pools.
            let tries = count.min(existing.len() as u64 + 1);
            let mut saw_unclaimed = false;
            for i in 0..tries {
                let index = (u128::from(start) + u128::from(i)) % u128::from(count);
                let Some(cidr) = pool.nth_block(index as u64) else {
                    continue;
                };
                if existing.contains(&keys::block(cidr)) {
                    continue;
                }
                saw_unclaimed = true;
                if self.claim_block(pool, cidr).await? {
                    return Ok(Some(cidr));
                }
            }
            if !saw_unclaimed {
                return Ok(None);
            }
            // Other nodes claimed every unclaimed block we saw before we could (early on,
            // with few blocks existing, the search window is small): look again.
            tracing::debug!(node = %self.node, pool = %pool.name, "lost every block claim in the window; listing again");
        }
    }

    /// Claims `cidr` for this node in three steps: pending affinity, block, confirmed
    /// affinity. Returns false when another node owns the block. Resumes a claim that a
    /// crash interrupted.
    pub async fn claim_block(&self, pool: &IpPool, cidr: IpNetwork) -> Result<bool, IpamError> {
        let akey = keys::affinity(&self.node, cidr);
        let bkey = keys::block(cidr);
        for attempt in 0..MAX_CONFLICTS {
            conflict_pause(attempt, fnv1a(&self.node)).await;
            // Phase 1: pending affinity (or find the one a previous run left).
            let pending = BlockAffinity {
                node: self.node.clone(),
                cidr,
                state: AffinityState::Pending,
                since_ms: now_ms(),
            };
            let txn = Txn::new()
                .expect(&akey, 0)
                .then(Op::put(&akey, encode(&pending)))
                .or_get(&akey);
            let out = with_retry(|| self.kv.txn(txn.clone())).await?;
            let aff_rev = if out.succeeded {
                out.revision
            } else {
                let Some(existing) = out.gets.into_iter().next().flatten() else {
                    continue;
                };
                let aff: BlockAffinity = decode(&existing)?;
                match aff.state {
                    AffinityState::Confirmed => {
                        let mut c = self.cache();
                        c.affine.get_or_insert_with(BTreeSet::new).insert(cidr);
                        c.affinities_changed(existing.mod_revision);
                        return Ok(true);
                    }
                    AffinityState::Pending => existing.mod_revision,
                    AffinityState::PendingDeletion => return Ok(false),
                }
            };

            // Phase 2: the block, if nobody has it.
            let format = self.config().await?.block_format;
            let block = IpamBlock::new(cidr, Some(self.node.clone())).in_format(format);
            let txn = Txn::new()
                .expect(&bkey, 0)
                .expect(&akey, aff_rev)
                .then_all(block_store::write_ops(None, &block))
                .or_get(&bkey)
                .or_get(&akey);
            let out = with_retry(|| self.kv.txn(txn.clone())).await?;
            let block_rev = if out.succeeded {
                self.cache().put_block(cidr, out.revision, block);
                out.revision
            } else {
                let [existing, aff_now, _] = take3(out.gets);
                let Some(existing) = existing else {
                    // Our pending affinity changed under us (GC); start over.
                    continue;
                };
                let theirs = self.remember_block(cidr, Some(&existing)).await?;
                let theirs_affinity = theirs.as_ref().and_then(|b| b.value.affinity.as_deref());
                if theirs_affinity != Some(self.node.as_str()) {
                    // Lost the race: withdraw our pending claim.
                    if let Some(a) = aff_now {
                        let txn = Txn::new()
                            .expect(&akey, a.mod_revision)
                            .then(Op::delete(&akey));
                        with_retry(|| self.kv.txn(txn.clone())).await?;
                    }
                    return Ok(false);
                }
                if aff_now.map(|a| a.mod_revision) != Some(aff_rev) {
                    continue;
                }
                match theirs {
                    Some(b) => b.rev,
                    None => continue,
                }
            };

            // Phase 3: confirm.
            let confirmed = BlockAffinity {
                state: AffinityState::Confirmed,
                since_ms: now_ms(),
                ..pending
            };
            let txn = Txn::new()
                .expect(&akey, aff_rev)
                .expect(&bkey, block_rev)
                .then(Op::put(&akey, encode(&confirmed)));
            let out = with_retry(|| self.kv.txn(txn.clone())).await?;
            if out.succeeded {
                tracing::debug!(node = %self.node, block = %cidr, pool = %pool.name, "claimed block");
                let mut c = self.cache();
                c.affine.get_or_insert_with(BTreeSet::new).insert(cidr);
                c.affinities_changed(out.revision);
                c.deleted_blocks.remove(&cidr);
                return Ok(true);
            }
        }
        Err(IpamError::TooMuchContention {
            what: format!("claim of block {cidr}"),
            attempts: MAX_CONFLICTS,
        })
    }

    // ---- release ----------------------------------------------------------------------------

    /// Releases everything `handle` holds and deletes the handle. Idempotent.
    pub async fn release_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        check_handle(handle)?;
        self.release_handle_guarded(handle, &[]).await
    }

    /// Frees `handle` block by block (one transaction each; the last deletes the handle).
    /// Every transaction also compares each `guards` key with its revision (0: absent); when
    /// one changed, nothing more is written and [`IpamError::GuardChanged`] names it (a
    /// reclaim stops when the node returns or the GC leader is deposed).
    pub(crate) async fn release_handle_guarded(
        &self,
        handle: &str,
        guards: &[(String, i64)],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let hkey = keys::handle(handle);
        let mut released = Vec::new();
        let mut emptied = Vec::new();
        let mut conflicts = 0;
        // "Absent" from the cache is not trusted here: another process may have created
        // the handle since, and a release that believed a stale "absent" would leak.
        {
            let mut c = self.cache();
            if c.handles.get(handle).is_some_and(|h| h.rev == 0) {
                c.handles.remove(handle);
            }
        }
        loop {
            let h = self.handle(handle).await?;
            if h.rev == 0 {
                break;
            }
            let cidr = h.value.addresses.first().map(|a| a.block);
            let mut new_handle = h.value.clone();
            let mut txn = Txn::new().expect(&hkey, h.rev);
            let mut freed = Vec::new();
            let mut new_block = None;
            if let Some(cidr) = cidr {
                new_handle.addresses.retain(|a| a.block != cidr);
                let bkey = keys::block(cidr);
                match self.block(cidr).await? {
                    Some(blk) => {
                        let mut block = IpamBlock::clone(&blk.value);
                        let now = now_ms();
                        for e in h.value.addresses.iter().filter(|a| a.block == cidr) {
                            // A stale entry (address re-allocated since) is just dropped.
                            if let Ok(Some(_)) = block.release(e.addr, Some(e.seq), now) {
                                freed.push(e.addr);
                            }
                        }
                        self.forget_expired_releases(&mut block, now);
                        txn = txn
                            .expect(&bkey, blk.rev)
                            .then_all(block_store::write_ops(Some(&blk.value), &block));
                        new_block = Some(block);
                    }
                    None => txn = txn.expect(&bkey, 0),
                }
                txn = txn.or_get(&hkey).or_get(&bkey);
            } else {
                txn = txn.or_get(&hkey).or_get(&hkey);
            }
            txn = if new_handle.addresses.is_empty() {
                txn.then(Op::delete(&hkey))
            } else {
                txn.then(Op::put(&hkey, encode(&new_handle)))
            };
            for (key, rev) in guards {
                txn = txn.expect(key, *rev).or_get(key);
            }
            let outcome = with_retry(|| self.kv.txn(txn.clone())).await?;
            if outcome.succeeded {
                let mut c = self.cache();
                if new_handle.addresses.is_empty() {
                    c.forget_handle(handle, Some(outcome.revision));
                } else {
                    c.handles.insert(
                        handle.to_string(),
                        Versioned {
                            rev: outcome.revision,
                            value: new_handle,
                        },
                    );
                }
                if let (Some(cidr), Some(block)) = (cidr, new_block) {
                    if block.is_empty() {
                        emptied.push(cidr);
                    }
                    c.put_block(cidr, outcome.revision, block);
                }
                released.extend(freed);
                continue;
            }
            let mut gets = outcome.gets.into_iter();
            let fresh_handle = gets.next().flatten();
            let fresh_block = gets.next().flatten();
            for (key, rev) in guards {
                if gets.next().flatten().map_or(0, |k| k.mod_revision) != *rev {
                    return Err(IpamError::GuardChanged { key: key.clone() });
                }
            }
            self.remember_handle(handle, fresh_handle.as_ref())?;
            if let Some(cidr) = cidr {
                self.remember_block(cidr, fresh_block.as_ref()).await?;
            }
            conflicts += 1;
            if conflicts >= MAX_CONFLICTS {
                return Err(IpamError::TooMuchContention {
                    what: format!("release of handle {handle}"),
                    attempts: conflicts,
                });
            }
            conflict_pause(conflicts, fnv1a(handle)).await;
        }
        for cidr in emptied {
            self.release_block_if_unneeded(cidr).await?;
        }
        Ok(released)
    }

    /// Releases single addresses, each with the sequence number of its allocation when the
    /// caller knows it (a stale release then frees nothing).
    pub async fn release_addresses(
        &self,
        addrs: &[(IpAddr, Option<u64>)],
    ) -> Result<Vec<ReleaseOutcome>, IpamError> {
        let mut outcomes = Vec::with_capacity(addrs.len());
        for &(addr, seq) in addrs {
            outcomes.push(self.release_address(addr, seq).await?);
        }
        Ok(outcomes)
    }

    async fn release_address(
        &self,
        addr: IpAddr,
        seq: Option<u64>,
    ) -> Result<ReleaseOutcome, IpamError> {
        let cfg = self.config().await?;
        let cidr = cfg
            .pool_of(addr)
            .and_then(|p| p.block_of(addr))
            .ok_or(IpamError::AddressNotInPool { addr })?;
        let bkey = keys::block(cidr);
        for attempt in 0..MAX_CONFLICTS {
            conflict_pause(attempt, fnv1a(&addr.to_string())).await;
            let Some(blk) = self.block(cidr).await? else {
                return Ok(ReleaseOutcome::AlreadyFree { addr });
            };
            let Some(alloc) = blk.value.allocation(addr).cloned() else {
                return Ok(ReleaseOutcome::AlreadyFree { addr });
            };
            if seq.is_some_and(|s| s != alloc.seq) {
                return Ok(ReleaseOutcome::Stale { addr });
            }
            let hkey = keys::handle(&alloc.handle);
            let h = self.handle(&alloc.handle).await?;
            let mut block = IpamBlock::clone(&blk.value);
            let now = now_ms();
            // Cannot fail: the address is allocated in this block with this sequence.
            let _ = block.release(addr, Some(alloc.seq), now);
            self.forget_expired_releases(&mut block, now);
            let mut new_handle = h.value.clone();
            new_handle.addresses.retain(|e| e.addr != addr);
            let mut txn = Txn::new()
                .expect(&bkey, blk.rev)
                .expect(&hkey, h.rev)
                .then_all(block_store::write_ops(Some(&blk.value), &block))
                .or_get(&bkey)
                .or_get(&hkey);
            txn = if new_handle.addresses.is_empty() {
                txn.then(Op::delete(&hkey))
            } else {
                txn.then(Op::put(&hkey, encode(&new_handle)))
            };
            let outcome = with_retry(|| self.kv.txn(txn.clone())).await?;
            if outcome.succeeded {
                let empty = block.is_empty();
                {
                    let mut c = self.cache();
                    c.put_block(cidr, outcome.revision, block);
                    if new_handle.addresses.is_empty() {
                        c.forget_handle(&alloc.handle, Some(outcome.revision));
                    } else {
                        c.handles.insert(
                            alloc.handle.clone(),
                            Versioned {
                                rev: outcome.revision,
                                value: new_handle,
                            },
                        );
                    }
                }
                if empty {
                    self.release_block_if_unneeded(cidr).await?;
                }
                return Ok(ReleaseOutcome::Released {
                    addr,
                    handle: alloc.handle,
                });
            }
            let [fresh_block, fresh_handle, _] = take3(outcome.gets);
            self.remember_block(cidr, fresh_block.as_ref()).await?;
            self.remember_handle(&alloc.handle, fresh_handle.as_ref())?;
        }
        Err(IpamError::TooMuchContention {
            what: format!("release of {addr}"),
            attempts: MAX_CONFLICTS,
        })
    }

    /// Gives an empty block of this node back to the pool, when the node has another block
    /// in the same pool (so a node does not thrash claiming and releasing its only block)
    /// and no freed address in it is still inside the pool's reuse delay.
    async fn release_block_if_unneeded(&self, cidr: IpNetwork) -> Result<(), IpamError> {
        let cfg = self.config().await?;
        let Some(pool) = cfg.pool_of(cidr.network()) else {
            return Ok(());
        };
        let Some(blk) = self.block(cidr).await? else {
            return Ok(());
        };
        if !blk.value.is_empty()
            || blk.value.affinity.as_deref() != Some(self.node.as_str())
            || !blk
                .value
                .reuse_delay_expired(now_ms(), reuse_delay_ms(pool))
        {
            return Ok(());
        }
        let siblings = self
            .affine_blocks()
            .await?
            .into_iter()
            .filter(|b| *b != cidr && pool.spec.cidr.contains(b.network()))
            .count();
        if siblings == 0 {
            return Ok(());
        }
        let akey = keys::affinity(&self.node, cidr);
        let aff_rev = with_retry(|| self.kv.get(&akey))
            .await?
            .map(|a| a.mod_revision)
            .unwrap_or(0);
        let bkey = keys::block(cidr);
        let txn = Txn::new()
            .expect(&bkey, blk.rev)
            .expect(&akey, aff_rev)
            .then_all(block_store::delete_ops(&blk.value))
            .then(Op::delete(&akey));
        let out = with_retry(|| self.kv.txn(txn.clone())).await?;
        if out.succeeded {
            tracing::debug!(node = %self.node, block = %cidr, "released empty block");
            let mut c = self.cache();
            c.blocks.remove(&cidr);
            c.deleted_blocks.insert(cidr, out.revision);
            if let Some(a) = c.affine.as_mut() {
                a.remove(&cidr);
            }
            c.affinities_changed(out.revision);
        } else {
            // Someone allocated from it meanwhile: it is not empty any more.
            self.cache().blocks.remove(&cidr);
        }
        Ok(())
    }

    // ---- reads, through the cache -----------------------------------------------------------

    /// Loads pools, node labels and this node's affinities concurrently (one round trip
    /// instead of three), so that a short-lived client (a CNI invocation) starts warm.
    pub async fn prefetch(&self) -> Result<(), IpamError> {
        self.prefetch_for(None).await
    }

    /// [`Ipam::prefetch`], also reading this node's blocks (after its affinities) and, for a
    /// named workload (`namespace`, `name`), the addresses it had last: everything an
    /// assignment reads, in one round of concurrent requests, so that the assignment
    /// itself is one transaction. What is read ahead is only a starting point: every write
    /// is still guarded by the revisions it was read at.
    pub async fn prefetch_for(&self, workload: Option<(&str, &str)>) -> Result<(), IpamError> {
        let blocks = async {
            // Usually one block per node and pool: one read after the affinities.
            for cidr in self.affine_blocks().await? {
                self.block(cidr).await?;
            }
            Ok::<(), IpamError>(())
        };
        let (config, blocks, node_and_workload) = tokio::join!(
            self.config(),
            blocks,
            self.prefetch_node_and_workload(workload)
        );
        config?;
        blocks?;
        node_and_workload
    }

    /// The part of [`Ipam::prefetch_for`] that no handoff carries: the node's labels and the
    /// workload's last addresses. Read once; later calls find them cached.
    pub async fn prefetch_node_and_workload(
        &self,
        workload: Option<(&str, &str)>,
    ) -> Result<(), IpamError> {
        let last = async {
            let Some((namespace, name)) = workload else {
                return Ok(());
            };
            let key = keys::last_addresses(namespace, name);
            if self.cache().last_addresses.contains_key(&key) {
                return Ok(());
            }
            let addrs = self.read_last_addresses(&key).await?;
            self.cache().last_addresses.insert(key, addrs);
            Ok::<(), IpamError>(())
        };
        let (labels, last) = tokio::join!(self.node_labels(), last);
        labels?;
        last
    }

    /// Pools and reservations; cached until a write finds the config epoch moved.
    pub async fn config(&self) -> Result<Arc<Config>, IpamError> {
        if let Some(c) = self.cache().config.clone() {
            return Ok(c);
        }
        let cfg = Arc::new(load_config(&self.kv).await?);
        self.cache().config = Some(cfg.clone());
        Ok(cfg)
    }

    /// [`IpamBlock::forget_expired_releases`] with the delay of the block's pool, when this
    /// client has the pools at hand: a release does not read them only for this (a pod's
    /// DEL would pay a round trip), and the block's next assignment does it instead.
    pub(crate) fn forget_expired_releases(&self, block: &mut IpamBlock, now: u64) {
        let Some(cfg) = self.cache().config.clone() else {
            return;
        };
        if let Some(pool) = cfg.pool_of(block.cidr.network()) {
            block.forget_expired_releases(now, reuse_delay_ms(pool));
        }
    }

    async fn node_labels(&self) -> Result<BTreeMap<String, String>, IpamError> {
        if let Some(l) = self.cache().labels.clone() {
            return Ok(l);
        }
        let labels = get_node(&self.kv, &self.node)
            .await?
            .map(|n| n.labels)
            .unwrap_or_default();
        self.cache().labels = Some(labels.clone());
        Ok(labels)
    }

    async fn affine_blocks(&self) -> Result<BTreeSet<IpNetwork>, IpamError> {
        if let Some(a) = self.cache().affine.clone() {
            return Ok(a);
        }
        let prefix = keys::node_affinities(&self.node);
        let (kvs, read_at) = with_retry(|| self.kv.get_prefix(&prefix)).await?;
        let mut set = BTreeSet::new();
        for kv in &kvs {
            let aff: BlockAffinity = decode(kv)?;
            if aff.state == AffinityState::Confirmed {
                set.insert(aff.cidr);
            }
        }
        let mut c = self.cache();
        c.affine = Some(set.clone());
        c.affine_as_of = read_at;
        c.affine_read_ms = now_ms();
        Ok(set)
    }

    /// Blocks of `pool` affine to other nodes (or to none), freshly read, with a function
    /// telling how many addresses each could give at a time with a reuse delay.
    #[allow(clippy::type_complexity)]
    /// Other nodes' blocks of `pool` that we may borrow from, each with the key that must
    /// stay absent while we do (its owner's suspect record) and its free count by time and
    /// reuse delay. A suspect node's blocks are left alone: it may be alive and cut off, and
    /// its addresses must be there when it returns.
    async fn foreign_blocks(&self, pool: &IpPool) -> Result<Vec<ForeignBlock>, IpamError> {
        let (kvs, _) = with_retry(|| self.kv.get_prefix(keys::BLOCKS)).await?;
        let suspects: HashSet<String> = with_retry(|| self.kv.list_keys(keys::SUSPECTS))
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(keys::SUSPECTS).map(str::to_string))
            .collect();
        let mut out: Vec<ForeignBlock> = Vec::new();
        for (block, rev) in block_store::blocks_from(&kvs)? {
            if !pool.spec.cidr.contains(block.cidr.network())
                || block.affinity.as_deref() == Some(self.node.as_str())
                || block
                    .affinity
                    .as_ref()
                    .is_some_and(|n| suspects.contains(n))
            {
                continue;
            }
            let guard = block.affinity.as_deref().map(keys::suspect);
            let cidr = block.cidr;
            let snapshot = block.clone();
            self.cache().put_block(cidr, rev, block);
            out.push((
                cidr,
                guard,
                Box::new(move |now, d| snapshot.available(now, d)),
            ));
        }
        Ok(out)
    }

    async fn block(&self, cidr: IpNetwork) -> Result<Option<Versioned<Arc<IpamBlock>>>, IpamError> {
        if let Some(b) = self.cache().blocks.get(&cidr) {
            return Ok(Some(b.clone()));
        }
        // In a V6 cluster most blocks have records: one prefix read, not a read of the
        // block's key and then another of its records.
        let v6 = self
            .cache()
            .config
            .as_ref()
            .is_some_and(|c| c.block_format >= BlockFormat::V6);
        if v6 {
            let read = block_store::read_with_records(&self.kv, cidr).await?;
            return Ok(self.cache_block(cidr, read));
        }
        let key = keys::block(cidr);
        let kv = with_retry(|| self.kv.get(&key)).await?;
        self.remember_block(cidr, kv.as_ref()).await
    }

    /// Caches block `cidr` as read from its own key (`None`: absent); a `V6` block with
    /// allocations is read again with its records.
    async fn remember_block(
        &self,
        cidr: IpNetwork,
        kv: Option<&KeyValue>,
    ) -> Result<Option<Versioned<Arc<IpamBlock>>>, IpamError> {
        let read = match kv {
            Some(kv) => block_store::from_own_value(&self.kv, cidr, kv).await?,
            None => None,
        };
        Ok(self.cache_block(cidr, read))
    }

    /// Caches block `cidr` as read, with its revision (`None`: absent).
    fn cache_block(
        &self,
        cidr: IpNetwork,
        read: Option<(IpamBlock, i64)>,
    ) -> Option<Versioned<Arc<IpamBlock>>> {
        let mut c = self.cache();
        match read {
            Some((block, rev)) => {
                let v = Versioned {
                    rev,
                    value: Arc::new(block),
                };
                c.blocks.insert(cidr, v.clone());
                Some(v)
            }
            None => {
                c.blocks.remove(&cidr);
                if let Some(a) = c.affine.as_mut() {
                    a.remove(&cidr);
                }
                None
            }
        }
    }

    fn cached_handle_or_new(&self, id: &str) -> Versioned<IpamHandle> {
        self.cache()
            .handles
            .get(id)
            .cloned()
            .unwrap_or_else(|| Versioned {
                rev: 0,
                value: IpamHandle {
                    id: id.to_string(),
                    addresses: Vec::new(),
                },
            })
    }

    async fn handle(&self, id: &str) -> Result<Versioned<IpamHandle>, IpamError> {
        if let Some(h) = self.cache().handles.get(id) {
            return Ok(h.clone());
        }
        let key = keys::handle(id);
        let kv = with_retry(|| self.kv.get(&key)).await?;
        Ok(self.remember_handle(id, kv.as_ref())?.map_or_else(
            || Versioned {
                rev: 0,
                value: IpamHandle {
                    id: id.to_string(),
                    addresses: Vec::new(),
                },
            },
            |value| Versioned {
                rev: kv.map(|k| k.mod_revision).unwrap_or(0),
                value,
            },
        ))
    }

    fn remember_handle(
        &self,
        id: &str,
        kv: Option<&KeyValue>,
    ) -> Result<Option<IpamHandle>, IpamError> {
        let mut c = self.cache();
        match kv {
            Some(kv) => {
                let h: IpamHandle = decode(kv)?;
                c.handles.insert(
                    id.to_string(),
                    Versioned {
                        rev: kv.mod_revision,
                        value: h.clone(),
                    },
                );
                Ok(Some(h))
            }
            None => {
                c.forget_handle(id, None);
                Ok(None)
            }
        }
    }

    /// A workload's previous addresses if [`Ipam::prefetch_for`] read them ahead.
    pub fn previous_addresses(&self, w: &WorkloadId) -> Option<Vec<IpAddr>> {
        let key = keys::last_addresses(&w.namespace, &w.name);
        self.cache().last_addresses.get(&key).cloned()
    }

    async fn last_addresses(&self, w: &WorkloadId) -> Result<Vec<IpAddr>, IpamError> {
        let key = keys::last_addresses(&w.namespace, &w.name);
        if let Some(read_ahead) = self.cache().last_addresses.remove(&key) {
            return Ok(read_ahead);
        }
        self.read_last_addresses(&key).await
    }

    async fn read_last_addresses(&self, key: &str) -> Result<Vec<IpAddr>, IpamError> {
        match with_retry(|| self.kv.get(key)).await? {
            Some(kv) => decode(&kv),
            None => Ok(Vec::new()),
        }
    }

    /// The revision of `handle` as this process last wrote or read it (0: absent): what a
    /// CNI ADD guards its endpoint write with, so that a leak release in between fails it.
    pub async fn handle_revision(&self, handle: &str) -> Result<i64, IpamError> {
        Ok(self.handle(handle).await?.rev)
    }

    /// The addresses a handle holds and its revision (0: absent), as this client knows
    /// them: read once, then as written or handed over (see [`Ipam::adopt`]).
    pub async fn held(&self, handle: &str) -> Result<(Vec<IpAddr>, i64), IpamError> {
        let h = self.handle(handle).await?;
        Ok((h.value.addresses.iter().map(|a| a.addr).collect(), h.rev))
    }

    /// The addresses a handle holds, read from the datastore.
    pub async fn handle_addresses(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        let key = keys::handle(handle);
        match with_retry(|| self.kv.get(&key)).await? {
            Some(kv) => Ok(decode::<IpamHandle>(&kv)?
                .addresses
                .into_iter()
                .map(|a| a.addr)
                .collect()),
            None => Ok(Vec::new()),
        }
    }
}

fn take3(gets: Vec<Option<KeyValue>>) -> [Option<KeyValue>; 3] {
    let mut it = gets.into_iter();
    [
        it.next().flatten(),
        it.next().flatten(),
        it.next().flatten(),
    ]
}

fn reuse_delay_ms(pool: &IpPool) -> u64 {
    pool.spec.min_reuse_delay_seconds.saturating_mul(1000)
}

fn family_of(addr: IpAddr) -> Family {
    if addr.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

fn workload_name(w: &WorkloadId) -> String {
    format!("{}/{}", w.namespace, w.name)
}

fn check_handle(id: &str) -> Result<(), IpamError> {
    if keys::valid_segment(id) {
        Ok(())
    } else {
        Err(IpamError::InvalidHandle(id.to_string()))
    }
}

fn block_error(e: BlockError, addr: IpAddr) -> IpamError {
    match e {
        BlockError::InUse { addr, handle } => IpamError::AddressInUse { addr, handle },
        BlockError::Reserved { addr } => IpamError::AddressReserved { addr },
        BlockError::NotInBlock { .. } | BlockError::StaleRelease { .. } => {
            IpamError::AddressNotInPool { addr }
        }
    }
}
