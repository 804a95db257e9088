//! Several pods' assignments and releases on one node in one transaction.
//!
//! The pods of a node allocate from the same block, so their writes are serialised (the CNI
//! plugin's node lock; the block's revision guard in any case), and each costs a disk-synced
//! commit. When pods start and stop together, the client holding the lock does the plain
//! operations of all of them at once: one transaction that compares every block and handle
//! it read, as each operation alone would. Anything out of the ordinary (a new block to
//! claim, a block to borrow, a handle that already exists, a workload's previous addresses)
//! is left to the operation's own client, as is everything when the transaction's guards
//! fail: batching only ever saves commits, it decides nothing of its own.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::{check_handle, family_of, reuse_delay_ms, Ipam, Versioned};
use crate::block::{BlockError, BlockFormat, IpamBlock};
use crate::block_store;
use crate::codec::{encode, now_ms, with_retry};
use crate::error::{Family, IpamError};
use crate::handoff::Known;
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::{HandleAddress, IpamHandle};
use crate::{AssignRequest, Assignment};

/// Operations per transaction at most: etcd's default limit is 128 operations, and an
/// assignment is up to three puts.
pub const MAX_BATCH: usize = 32;

/// One pod's IPAM operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BatchedOp {
    Assign {
        request: AssignRequest,
        /// The workload's previous addresses as the asking client read them ahead
        /// ([`Ipam::previous_addresses`]): the client doing the batch has not read them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous: Option<Vec<IpAddr>>,
    },
    Release {
        handle: String,
        /// The handle as the asking client read it ([`Ipam::known_handle`]): the client
        /// doing the batch has not read it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_read: Option<Known<IpamHandle>>,
        /// Keys deleted, unguarded, in the same transaction when the release is done here
        /// (a CNI DEL's endpoint record): one commit for both. Left to the client with the
        /// rest when the release is [`BatchedOutcome::Alone`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        also_delete: Vec<String>,
    },
}

/// What became of one [`BatchedOp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BatchedOutcome {
    Assigned {
        assignments: Vec<Assignment>,
        /// The handle's revision after the transaction (what a CNI ADD guards its
        /// endpoint write with).
        handle_revision: i64,
    },
    Released {
        addresses: Vec<IpAddr>,
    },
    /// Not done here: its client does it the ordinary way.
    Alone,
}

/// The writes planned for a batch: each key with the revision it was read at.
#[derive(Default)]
struct Plan {
    blocks: BTreeMap<IpNetwork, Versioned<IpamBlock>>,
    block_revs: BTreeMap<IpNetwork, i64>,
    handles: BTreeMap<String, (i64, IpamHandle)>,
    last_addresses: Vec<(String, Vec<IpAddr>)>,
    deletes: Vec<String>,
    /// Each block as read, before the batch changed it (what its writes are relative to).
    read: BTreeMap<IpNetwork, Arc<IpamBlock>>,
}

/// The most writes a batch's transaction carries: in block format V6 each address assigned
/// or released is a write of its own besides its block and handle.
use crate::kv::MAX_TXN_WRITES;

/// What [`Plan::undo`] restores.
struct UndoPoint {
    blocks: BTreeMap<IpNetwork, Versioned<IpamBlock>>,
    block_revs: BTreeMap<IpNetwork, i64>,
    handles: BTreeMap<String, (i64, IpamHandle)>,
    last_addresses: usize,
    deletes: usize,
}

impl Plan {
    fn undo_point(&self) -> UndoPoint {
        UndoPoint {
            blocks: self.blocks.clone(),
            block_revs: self.block_revs.clone(),
            handles: self.handles.clone(),
            last_addresses: self.last_addresses.len(),
            deletes: self.deletes.len(),
        }
    }

    fn undo(&mut self, to: UndoPoint) {
        self.blocks = to.blocks;
        self.block_revs = to.block_revs;
        self.handles = to.handles;
        self.last_addresses.truncate(to.last_addresses);
        self.deletes.truncate(to.deletes);
    }

    /// The puts and deletes the batch's transaction would carry.
    fn writes(&self) -> usize {
        let blocks: usize = self
            .block_revs
            .keys()
            .map(|cidr| {
                let read = self.read.get(cidr).map(|b| &**b);
                block_store::write_count(read, &self.blocks[cidr].value)
            })
            .sum();
        blocks + self.handles.len() + self.last_addresses.len() + self.deletes.len()
    }

    /// The block's new value; the transaction compares the revision it was first read at.
    fn write(&mut self, cidr: IpNetwork, read_rev: i64, value: IpamBlock) {
        self.block_revs.entry(cidr).or_insert(read_rev);
        let rev = read_rev;
        self.blocks.insert(cidr, Versioned { rev, value });
    }
}

impl<K: Kv> Ipam<K> {
    /// Does what it can of `ops` in one transaction, in order, and says for each what
    /// became of it. At most [`MAX_BATCH`] operations are considered; the rest are
    /// [`BatchedOutcome::Alone`].
    pub async fn apply_batch(&self, ops: &[BatchedOp]) -> Result<Vec<BatchedOutcome>, IpamError> {
        let cfg = self.config().await?;
        {
            let mut c = self.cache();
            for op in ops {
                match op {
                    BatchedOp::Release {
                        handle,
                        as_read: Some(known),
                        ..
                    } => c.take_handle_if_newer(handle.clone(), known.clone()),
                    BatchedOp::Assign {
                        request,
                        previous: Some(previous),
                    } => {
                        if let Some(w) = &request.owner.workload {
                            let key = keys::last_addresses(&w.namespace, &w.name);
                            c.last_addresses.entry(key).or_insert(previous.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut plan = Plan::default();
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut touched: HashSet<String> = HashSet::new();
        for (i, op) in ops.iter().enumerate() {
            let handle = match op {
                BatchedOp::Assign { request, .. } => &request.owner.handle,
                BatchedOp::Release { handle, .. } => handle,
            };
            if i >= MAX_BATCH || check_handle(handle).is_err() || !touched.insert(handle.clone()) {
                outcomes.push(BatchedOutcome::Alone);
                continue;
            }
            // All or nothing per operation: it plans on a copy of the plan.
            let before = plan.undo_point();
            let planned = match op {
                BatchedOp::Assign { request, .. } => {
                    self.plan_assign(&cfg, request, &mut plan).await?
                }
                BatchedOp::Release {
                    handle,
                    also_delete,
                    ..
                } => {
                    let planned = self.plan_release(handle, &mut plan).await?;
                    if planned != BatchedOutcome::Alone {
                        plan.deletes.extend(also_delete.iter().cloned());
                    }
                    planned
                }
            };
            // Also alone when its writes would take the transaction past etcd's limit.
            let planned = if planned != BatchedOutcome::Alone && plan.writes() > MAX_TXN_WRITES {
                BatchedOutcome::Alone
            } else {
                planned
            };
            if planned == BatchedOutcome::Alone {
                plan.undo(before);
            }
            outcomes.push(planned);
        }
        if plan.block_revs.is_empty() {
            return Ok(outcomes
                .into_iter()
                .map(|_| BatchedOutcome::Alone)
                .collect());
        }

        let mut txn = Txn::new().expect(keys::CONFIG_EPOCH, cfg.epoch_rev);
        for (cidr, rev) in &plan.block_revs {
            let key = keys::block(*cidr);
            let block = &plan.blocks[cidr].value;
            let read = plan.read.get(cidr).map(|b| &**b);
            txn = txn
                .expect(&key, *rev)
                .then_all(block_store::write_ops(read, block));
        }
        for (id, (rev, handle)) in &plan.handles {
            let key = keys::handle(id);
            txn = txn.expect(&key, *rev);
            txn = if handle.addresses.is_empty() {
                txn.then(Op::delete(&key))
            } else {
                txn.then(Op::put(&key, encode(handle)))
            };
        }
        for (key, addrs) in &plan.last_addresses {
            txn = txn.then(Op::put(key, encode(addrs)));
        }
        for key in &plan.deletes {
            txn = txn.then(Op::delete(key));
        }
        let outcome = with_retry(|| self.kv.txn(txn.clone())).await?;
        if !outcome.succeeded {
            // Someone else wrote meanwhile: each operation alone reads what changed.
            tracing::debug!(node = %self.node, ops = ops.len(), "batch conflicted");
            for cidr in plan.block_revs.keys() {
                self.cache().blocks.remove(cidr);
            }
            return Ok(outcomes
                .into_iter()
                .map(|_| BatchedOutcome::Alone)
                .collect());
        }
        let mut emptied = Vec::new();
        {
            let mut c = self.cache();
            for cidr in plan.block_revs.keys() {
                let block = plan.blocks[cidr].value.clone();
                if block.is_empty() {
                    emptied.push(*cidr);
                }
                c.put_block(*cidr, outcome.revision, block);
            }
            for (id, (_, handle)) in plan.handles {
                if handle.addresses.is_empty() {
                    c.forget_handle(&id, Some(outcome.revision));
                } else {
                    let rev = outcome.revision;
                    c.handles.insert(id, Versioned { rev, value: handle });
                }
            }
        }
        for o in &mut outcomes {
            if let BatchedOutcome::Assigned {
                handle_revision, ..
            } = o
            {
                *handle_revision = outcome.revision;
            }
        }
        for cidr in emptied {
            self.release_block_if_unneeded(cidr).await?;
        }
        Ok(outcomes)
    }

    /// Plans an assignment from this node's blocks, as [`Ipam::auto_assign`] would make it
    /// when the handle is new and the node's blocks have room.
    async fn plan_assign(
        &self,
        cfg: &crate::resources::Config,
        req: &AssignRequest,
        plan: &mut Plan,
    ) -> Result<BatchedOutcome, IpamError> {
        let handle = self.cached_handle_or_new(&req.owner.handle);
        if handle.rev != 0 {
            return Ok(BatchedOutcome::Alone);
        }
        let last_key = req
            .owner
            .workload
            .as_ref()
            .map(|w| keys::last_addresses(&w.namespace, &w.name));
        // A returning workload gets its previous addresses back when they are free.
        let previous = match &last_key {
            // Not read ahead: its own client sees to it.
            Some(key) => match self.cache().last_addresses.get(key) {
                Some(previous) => previous.clone(),
                None => return Ok(BatchedOutcome::Alone),
            },
            None => Vec::new(),
        };
        let attrs = self.attributes(&req.owner);
        let affine = self.affine_blocks().await?;
        let mut assignments = Vec::new();
        for (family, n) in [(Family::V4, req.num_v4), (Family::V6, req.num_v6)] {
            let mut need = n;
            if need == 0 {
                continue;
            }
            let pools = self.candidate_pools(cfg, family, req).await?;
            for &addr in previous.iter().filter(|a| family_of(**a) == family) {
                if need == 0 {
                    break;
                }
                let Some(pool) = pools.iter().find(|p| p.spec.cidr.contains(addr)) else {
                    continue;
                };
                let Some(cidr) = pool.block_of(addr).filter(|c| affine.contains(c)) else {
                    // In another node's block (the pod moved): the ordinary path's work.
                    return Ok(BatchedOutcome::Alone);
                };
                let Some(block) = self.planned_block(cidr, plan).await? else {
                    return Ok(BatchedOutcome::Alone);
                };
                let mut value = block.value.in_format(batch_format(cfg));
                match value.assign_exact(addr, &req.owner.handle, &attrs, |a| cfg.is_reserved(a)) {
                    Ok(a) => {
                        need -= 1;
                        assignments.push(Assignment {
                            addr: a.addr,
                            block: cidr,
                            pool: pool.name.clone(),
                            seq: a.seq,
                        });
                        plan.write(cidr, block.rev, value);
                    }
                    Err(BlockError::InUse { .. } | BlockError::Reserved { .. }) => {}
                    Err(_) => return Ok(BatchedOutcome::Alone),
                }
            }
            for pool in &pools {
                for &cidr in &affine {
                    if need == 0 || !pool.spec.cidr.contains(cidr.network()) {
                        continue;
                    }
                    let Some(block) = self.planned_block(cidr, plan).await? else {
                        continue;
                    };
                    if block.value.affinity.as_deref() != Some(self.node.as_str()) {
                        continue;
                    }
                    let delay = reuse_delay_ms(pool);
                    let mut value = block.value.in_format(batch_format(cfg));
                    let now = now_ms();
                    let got = value.assign(need, &req.owner.handle, &attrs, now, delay, |a| {
                        cfg.is_reserved(a)
                    });
                    if got.is_empty() {
                        continue;
                    }
                    value.forget_expired_releases(now, delay);
                    need -= got.len();
                    assignments.extend(got.iter().map(|a| Assignment {
                        addr: a.addr,
                        block: cidr,
                        pool: pool.name.clone(),
                        seq: a.seq,
                    }));
                    plan.write(cidr, block.rev, value);
                }
            }
            if need > 0 {
                // A block to claim or borrow: that is the ordinary path's work.
                return Ok(BatchedOutcome::Alone);
            }
        }
        let mut addresses: Vec<HandleAddress> = assignments
            .iter()
            .map(|a| HandleAddress {
                addr: a.addr,
                block: a.block,
                seq: a.seq,
            })
            .collect();
        addresses.sort();
        if let Some(key) = last_key {
            plan.last_addresses
                .push((key, addresses.iter().map(|a| a.addr).collect()));
        }
        let id = req.owner.handle.clone();
        plan.handles
            .insert(id.clone(), (0, IpamHandle { id, addresses }));
        Ok(BatchedOutcome::Assigned {
            assignments,
            handle_revision: 0,
        })
    }

    /// Plans the release of everything a handle this client has read holds.
    async fn plan_release(&self, id: &str, plan: &mut Plan) -> Result<BatchedOutcome, IpamError> {
        // "Absent" is not trusted for a release (see `release_handle_guarded`).
        let handle = self.cached_handle_or_new(id);
        if handle.rev == 0 {
            return Ok(BatchedOutcome::Alone);
        }
        let now = now_ms();
        let mut freed = Vec::new();
        for entry in &handle.value.addresses {
            let Some(mut block) = self.planned_block(entry.block, plan).await? else {
                return Ok(BatchedOutcome::Alone);
            };
            // A stale entry (address re-allocated since) is just dropped, as alone.
            if let Ok(Some(_)) = block.value.release(entry.addr, Some(entry.seq), now) {
                freed.push(entry.addr);
            }
            self.forget_expired_releases(&mut block.value, now);
            plan.write(entry.block, block.rev, block.value);
        }
        let emptied = IpamHandle {
            id: id.to_string(),
            addresses: Vec::new(),
        };
        plan.handles.insert(id.to_string(), (handle.rev, emptied));
        Ok(BatchedOutcome::Released { addresses: freed })
    }

    /// A block as the batch has it so far, else as this client last read it.
    async fn planned_block(
        &self,
        cidr: IpNetwork,
        plan: &mut Plan,
    ) -> Result<Option<Versioned<IpamBlock>>, IpamError> {
        if let Some(b) = plan.blocks.get(&cidr) {
            return Ok(Some(b.clone()));
        }
        Ok(self.block(cidr).await?.map(|b| {
            plan.read.insert(cidr, Arc::clone(&b.value));
            Versioned {
                rev: b.rev,
                value: IpamBlock::clone(&b.value),
            }
        }))
    }
}

/// The format a batch writes blocks in: the cluster's, but a batch does not move a block to
/// `V6` (all its records in the same transaction as several other blocks could pass etcd's
/// limit); the block moves on its next write alone.
fn batch_format(cfg: &crate::resources::Config) -> BlockFormat {
    cfg.block_format.min(BlockFormat::V5)
}
