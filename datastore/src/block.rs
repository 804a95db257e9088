//! The IPAM block and its pure allocator: no I/O, no clock (time is passed in), deterministic.
//!
//! A block is a power-of-two run of addresses. Each ordinal is either allocated (to a handle,
//! with a sequence number) or in the free queue. Released ordinals go to the back of the queue
//! with their release time, so an address is reused as late as possible and never before the
//! pool's minimum reuse delay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::model::{addr_to_u128, max_prefix, u128_to_addr};

/// What an allocation records besides its handle (node, namespace, pod, ...).
pub type Attributes = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub handle: String,
    /// Unique within the block for its lifetime; a release naming an older sequence is stale.
    pub seq: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: Attributes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeSlot {
    pub ordinal: u32,
    /// When the ordinal was last released (ms since the epoch); `None` if never used, or
    /// released longer ago than its pool's reuse delay (see
    /// [`IpamBlock::forget_expired_releases`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_ms: Option<u64>,
}

/// A block as stored: [`crate::block_format`] says how (five formats, the version in the
/// value; a block is written back in the format it was read in or a newer one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "crate::block_format::StoredBlock")]
pub struct IpamBlock {
    pub cidr: IpNetwork,
    /// The node whose block this is; `None` once that node is gone.
    pub affinity: Option<String>,
    /// Indexed by ordinal. Shared records: a block is copied before every write (the cached
    /// one stays valid until the transaction succeeds), and the copy must not duplicate
    /// every handle and attribute map of a full block.
    pub allocations: Vec<Option<Arc<Allocation>>>,
    pub free: VecDeque<FreeSlot>,
    pub next_seq: u64,
    /// How it is written to etcd.
    pub format: BlockFormat,
}

/// The stored formats of a block. `V1` is the first (an entry per ordinal, objects with
/// named fields); `V2` lists only allocated ordinals, compresses the free queue, and does
/// not repeat in the attributes what the handle already says; `V3` does not repeat the
/// block's own node either; `V4` is `V3` compressed; `V5` is `V3` in a compact binary form,
/// compressed as `V4` when large; `V6` stores each allocation under its own key beside the
/// block, so a write carries only what changed. Readers take all six; a cluster writes new blocks in a newer
/// format once its `IPAMConfiguration` says every node reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BlockFormat {
    #[default]
    V1,
    V2,
    V3,
    V4,
    V5,
    V6,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("{addr} is not in block {block}")]
    NotInBlock { addr: IpAddr, block: IpNetwork },
    #[error("{addr} is already allocated to handle {handle}")]
    InUse { addr: IpAddr, handle: String },
    #[error("{addr} is reserved")]
    Reserved { addr: IpAddr },
    #[error(
        "stale release of {addr}: it was re-allocated (sequence {current}, release named {given})"
    )]
    StaleRelease {
        addr: IpAddr,
        given: u64,
        current: u64,
    },
}

/// The nodes that hold blocks or addresses (a block's affinity, an allocation's `node`
/// attribute): a node that still holds something may still be forwarding for it.
pub fn holders<'a>(blocks: impl IntoIterator<Item = &'a IpamBlock>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in blocks {
        out.extend(b.affinity.iter().cloned());
        out.extend(
            b.allocated()
                .filter_map(|(_, a)| a.attrs.get("node").cloned()),
        );
    }
    out
}

/// The most allocations a block moving to `V6` may hold: each becomes a key written in the
/// move's one transaction, and etcd allows 128 operations in one (`--max-txn-ops`), some of
/// which the assignment itself needs. A fuller block moves once it has fewer.
pub const MAX_RECORDS_MOVED: usize = 100;

/// An address handed out by [`IpamBlock::assign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    pub addr: IpAddr,
    pub seq: u64,
}

impl IpamBlock {
    /// A fresh block with every address free, lowest first.
    pub fn new(cidr: IpNetwork, affinity: Option<String>) -> Self {
        let size = block_len(cidr);
        IpamBlock {
            cidr,
            affinity,
            allocations: vec![None; size as usize],
            free: (0..size)
                .map(|ordinal| FreeSlot {
                    ordinal,
                    released_ms: None,
                })
                .collect(),
            next_seq: 0,
            format: BlockFormat::default(),
        }
    }

    /// The same block, written in `format` from now on (never an older format than it has).
    /// A block moves to `V6` only when its records fit in the transaction that moves it.
    pub fn in_format(mut self, format: BlockFormat) -> Self {
        let too_full = self.in_use() > MAX_RECORDS_MOVED;
        if format >= BlockFormat::V6 && self.format < BlockFormat::V6 && too_full {
            self.format = self.format.max(BlockFormat::V5);
        } else {
            self.format = self.format.max(format);
        }
        self
    }

    pub fn len(&self) -> u32 {
        block_len(self.cidr)
    }

    pub fn in_use(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    pub fn addr(&self, ordinal: u32) -> Option<IpAddr> {
        let base = addr_to_u128(self.cidr.network());
        u128_to_addr(base + u128::from(ordinal), self.cidr.is_ipv4())
    }

    pub fn ordinal(&self, addr: IpAddr) -> Option<u32> {
        if !self.cidr.contains(addr) || addr.is_ipv4() != self.cidr.is_ipv4() {
            return None;
        }
        u32::try_from(addr_to_u128(addr) - addr_to_u128(self.cidr.network())).ok()
    }

    pub fn allocation(&self, addr: IpAddr) -> Option<&Allocation> {
        self.ordinal(addr)
            .and_then(|o| self.allocations.get(o as usize))
            .and_then(|a| a.as_deref())
    }

    /// Every allocated address with its allocation.
    /// The ordinals allocated, lowest first.
    pub fn allocated_ordinals(&self) -> impl Iterator<Item = u32> + '_ {
        self.allocations
            .iter()
            .enumerate()
            .filter_map(|(o, a)| a.as_ref().map(|_| o as u32))
    }

    pub fn allocated(&self) -> impl Iterator<Item = (IpAddr, &Allocation)> + '_ {
        self.allocations.iter().enumerate().filter_map(|(o, a)| {
            let a = a.as_deref()?;
            Some((self.addr(o as u32)?, a))
        })
    }

    /// Free addresses that could be assigned at `now_ms`, not counting reservations.
    pub fn available(&self, now_ms: u64, reuse_delay_ms: u64) -> usize {
        self.free
            .iter()
            .filter(|s| reusable(s, now_ms, reuse_delay_ms))
            .count()
    }

    /// Takes up to `count` addresses from the front of the free queue, skipping those still in
    /// their reuse delay and those `reserved` says are reserved (they keep their place).
    pub fn assign(
        &mut self,
        count: usize,
        handle: &str,
        attrs: &Attributes,
        now_ms: u64,
        reuse_delay_ms: u64,
        reserved: impl Fn(IpAddr) -> bool,
    ) -> Vec<Assigned> {
        let mut out = Vec::with_capacity(count);
        let mut i = 0;
        while out.len() < count && i < self.free.len() {
            let slot = self.free[i];
            let Some(addr) = self.addr(slot.ordinal) else {
                i += 1;
                continue;
            };
            if !reusable(&slot, now_ms, reuse_delay_ms) || reserved(addr) {
                i += 1;
                continue;
            }
            self.free.remove(i);
            out.push(self.take(slot.ordinal, addr, handle, attrs));
        }
        out
    }

    /// Allocates exactly `addr`. Reuse delay does not apply: the caller asked for this address.
    pub fn assign_exact(
        &mut self,
        addr: IpAddr,
        handle: &str,
        attrs: &Attributes,
        reserved: impl Fn(IpAddr) -> bool,
    ) -> Result<Assigned, BlockError> {
        let ordinal = self.ordinal(addr).ok_or(BlockError::NotInBlock {
            addr,
            block: self.cidr,
        })?;
        if let Some(a) = &self.allocations[ordinal as usize] {
            return Err(BlockError::InUse {
                addr,
                handle: a.handle.clone(),
            });
        }
        if reserved(addr) {
            return Err(BlockError::Reserved { addr });
        }
        self.free.retain(|s| s.ordinal != ordinal);
        Ok(self.take(ordinal, addr, handle, attrs))
    }

    fn take(&mut self, ordinal: u32, addr: IpAddr, handle: &str, attrs: &Attributes) -> Assigned {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.allocations[ordinal as usize] = Some(Arc::new(Allocation {
            handle: handle.to_string(),
            seq,
            attrs: attrs.clone(),
        }));
        Assigned { addr, seq }
    }

    /// Frees `addr`. Idempotent: releasing a free address returns `Ok(None)`. With
    /// `expected_seq`, a release that raced a re-allocation is refused.
    pub fn release(
        &mut self,
        addr: IpAddr,
        expected_seq: Option<u64>,
        now_ms: u64,
    ) -> Result<Option<Arc<Allocation>>, BlockError> {
        let ordinal = self.ordinal(addr).ok_or(BlockError::NotInBlock {
            addr,
            block: self.cidr,
        })?;
        let Some(current) = &self.allocations[ordinal as usize] else {
            return Ok(None);
        };
        if let Some(given) = expected_seq {
            if given != current.seq {
                return Err(BlockError::StaleRelease {
                    addr,
                    given,
                    current: current.seq,
                });
            }
        }
        let freed = self.allocations[ordinal as usize].take();
        self.free.push_back(FreeSlot {
            ordinal,
            released_ms: Some(now_ms),
        });
        Ok(freed)
    }

    /// Frees every address of `handle`; returns them.
    pub fn release_handle(&mut self, handle: &str, now_ms: u64) -> Vec<IpAddr> {
        let addrs: Vec<IpAddr> = self
            .allocated()
            .filter(|(_, a)| a.handle == handle)
            .map(|(addr, _)| addr)
            .collect();
        for addr in &addrs {
            // Cannot fail: the address is in this block and allocated.
            let _ = self.release(*addr, None, now_ms);
        }
        addrs
    }

    /// Forgets when free addresses were released once their reuse delay is over. Such a
    /// slot is as free as one never used, and its time is most of what an emptying block
    /// stores: about 17 bytes per used ordinal, a kilobyte for a /26 that has cycled
    /// through its addresses, written with every change. So a pool's delay applies to the
    /// addresses released while it is set.
    pub fn forget_expired_releases(&mut self, now_ms: u64, reuse_delay_ms: u64) {
        for slot in &mut self.free {
            if slot.released_ms.is_some() && reusable(slot, now_ms, reuse_delay_ms) {
                slot.released_ms = None;
            }
        }
    }

    /// True when no freed address is still inside its reuse delay, so dropping the block
    /// (and forgetting its history) cannot hand an address out too early.
    pub fn reuse_delay_expired(&self, now_ms: u64, reuse_delay_ms: u64) -> bool {
        self.free
            .iter()
            .all(|s| reusable(s, now_ms, reuse_delay_ms))
    }

    /// Internal consistency: every ordinal is exactly once either allocated or free, and
    /// sequence numbers are unique and below `next_seq`.
    pub fn check(&self) -> Result<(), String> {
        let n = self.len() as usize;
        if self.allocations.len() != n {
            return Err(format!(
                "{}: {} allocation slots for {} addresses",
                self.cidr,
                self.allocations.len(),
                n
            ));
        }
        let mut seen = vec![false; n];
        for s in &self.free {
            let o = s.ordinal as usize;
            if o >= n || seen[o] {
                return Err(format!(
                    "{}: ordinal {o} twice in free queue or out of range",
                    self.cidr
                ));
            }
            if self.allocations[o].is_some() {
                return Err(format!(
                    "{}: ordinal {o} both free and allocated",
                    self.cidr
                ));
            }
            seen[o] = true;
        }
        let mut seqs = std::collections::HashSet::new();
        for (o, a) in self.allocations.iter().enumerate() {
            match a {
                Some(a) if a.seq >= self.next_seq || !seqs.insert(a.seq) => {
                    return Err(format!(
                        "{}: ordinal {o} has bad sequence {}",
                        self.cidr, a.seq
                    ));
                }
                Some(_) => {}
                None if !seen[o] => {
                    return Err(format!(
                        "{}: ordinal {o} neither free nor allocated",
                        self.cidr
                    ))
                }
                None => {}
            }
        }
        Ok(())
    }
}

fn reusable(slot: &FreeSlot, now_ms: u64, reuse_delay_ms: u64) -> bool {
    match slot.released_ms {
        None => true,
        Some(t) => now_ms >= t.saturating_add(reuse_delay_ms),
    }
}

pub(crate) fn block_len(cidr: IpNetwork) -> u32 {
    1u32 << (max_prefix(cidr) - cidr.prefix()).min(31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn block() -> IpamBlock {
        IpamBlock::new("10.244.1.0/26".parse().expect("cidr"), Some("n1".into()))
    }

    fn none(_: IpAddr) -> bool {
        false
    }

    #[test]
    fn fresh_block_hands_out_lowest_first() {
        let mut b = block();
        let a = b.assign(2, "h", &Attributes::new(), 0, 0, none);
        assert_eq!(a[0].addr.to_string(), "10.244.1.0");
        assert_eq!(a[1].addr.to_string(), "10.244.1.1");
        assert_eq!(b.in_use(), 2);
    }

    #[test]
    fn released_address_is_reused_last() {
        let mut b = block();
        let first = b.assign(1, "h1", &Attributes::new(), 0, 0, none)[0];
        b.release(first.addr, Some(first.seq), 10).expect("release");
        // 63 never-used addresses come before the released one.
        let next = b.assign(63, "h2", &Attributes::new(), 20, 0, none);
        assert!(next.iter().all(|a| a.addr != first.addr));
        let last = b.assign(1, "h3", &Attributes::new(), 30, 0, none);
        assert_eq!(last[0].addr, first.addr);
        assert_ne!(last[0].seq, first.seq);
    }

    #[test]
    fn reuse_delay_holds_an_address_back() {
        let mut b = IpamBlock::new("10.244.1.0/31".parse().expect("cidr"), None);
        let a = b.assign(2, "h", &Attributes::new(), 0, 0, none);
        b.release(a[0].addr, None, 1_000).expect("release");
        assert!(b
            .assign(1, "h2", &Attributes::new(), 5_000, 10_000, none)
            .is_empty());
        assert_eq!(b.available(5_000, 10_000), 0);
        let again = b.assign(1, "h2", &Attributes::new(), 11_000, 10_000, none);
        assert_eq!(again[0].addr, a[0].addr);
    }

    #[test]
    fn release_times_are_forgotten_once_the_delay_is_over_and_only_then() {
        let mut b = IpamBlock::new("10.244.1.0/30".parse().expect("cidr"), None);
        let a = b.assign(4, "h", &Attributes::new(), 0, 0, none);
        b.release(a[0].addr, None, 1_000).expect("release");
        b.release(a[1].addr, None, 9_000).expect("release");
        b.forget_expired_releases(11_000, 10_000);
        let times: Vec<Option<u64>> = b.free.iter().map(|s| s.released_ms).collect();
        assert_eq!(
            times,
            [None, Some(9_000)],
            "only the first is past its delay"
        );
        // Still held back, and handed out in the same order as before.
        assert!(b
            .assign(2, "h2", &Attributes::new(), 11_000, 10_000, none)
            .iter()
            .all(|g| g.addr == a[0].addr));
        let later = b.assign(1, "h3", &Attributes::new(), 19_000, 10_000, none);
        assert_eq!(later[0].addr, a[1].addr);
        // A /30 whose addresses all cycled, with no delay: nothing of the history is stored.
        let mut c =
            IpamBlock::new("10.244.2.0/30".parse().expect("cidr"), None).in_format(BlockFormat::V3);
        for t in 0..8 {
            let got = c.assign(1, "h", &Attributes::new(), t, 0, none);
            c.release(got[0].addr, None, t).expect("release");
        }
        let with_times = serde_json::to_string(&c).expect("encode");
        c.forget_expired_releases(8, 0);
        let without = serde_json::to_string(&c).expect("encode");
        assert!(
            with_times.contains("\"f\":[0,4,1,5,2,6,3,7]"),
            "{with_times}"
        );
        assert!(without.contains("\"f\":[0,-4]"), "{without}");
    }

    #[test]
    fn stale_release_is_refused() {
        let mut b = block();
        let a = b.assign(1, "h1", &Attributes::new(), 0, 0, none)[0];
        b.release(a.addr, Some(a.seq), 0).expect("release");
        let again = b
            .assign_exact(a.addr, "h2", &Attributes::new(), none)
            .expect("exact");
        let err = b.release(a.addr, Some(a.seq), 0).unwrap_err();
        assert!(matches!(err, BlockError::StaleRelease { .. }));
        assert_eq!(b.allocation(a.addr).map(|x| x.handle.as_str()), Some("h2"));
        b.release(again.addr, Some(again.seq), 0).expect("release");
        assert_eq!(b.release(again.addr, None, 0), Ok(None), "idempotent");
    }

    #[test]
    fn reserved_addresses_are_skipped_and_refused() {
        let mut b = block();
        let reserved = |a: IpAddr| a.to_string() == "10.244.1.0";
        let a = b.assign(1, "h", &Attributes::new(), 0, 0, reserved);
        assert_eq!(a[0].addr.to_string(), "10.244.1.1");
        let addr = "10.244.1.0".parse().expect("addr");
        assert!(matches!(
            b.assign_exact(addr, "h", &Attributes::new(), reserved),
            Err(BlockError::Reserved { .. })
        ));
        b.check().expect("consistent");
    }

    #[test]
    fn ipv6_block() {
        let mut b = IpamBlock::new("fd10:244::40/122".parse().expect("cidr"), None);
        assert_eq!(b.len(), 64);
        let a = b.assign(1, "h", &Attributes::new(), 0, 0, none);
        assert_eq!(a[0].addr.to_string(), "fd10:244::40");
        assert_eq!(b.ordinal("fd10:244::7f".parse().expect("addr")), Some(63));
        assert_eq!(b.ordinal("fd10:244::80".parse().expect("addr")), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign { count: usize, handle: u8 },
        Exact { ordinal: u32, handle: u8 },
        Release { ordinal: u32, stale: bool },
        ReleaseHandle { handle: u8 },
        Tick { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..6, 0u8..5).prop_map(|(count, handle)| Op::Assign { count, handle }),
            (0u32..16, 0u8..5).prop_map(|(ordinal, handle)| Op::Exact { ordinal, handle }),
            (0u32..16, any::<bool>()).prop_map(|(ordinal, stale)| Op::Release { ordinal, stale }),
            (0u8..5).prop_map(|handle| Op::ReleaseHandle { handle }),
            (0u64..500).prop_map(|ms| Op::Tick { ms }),
        ]
    }

    proptest! {
        /// Against a model (address -> (handle, seq)): nothing is handed out twice, a release
        /// returns exactly what was allocated, and the block stays consistent.
        #[test]
        fn allocator_matches_model(ops in proptest::collection::vec(op(), 1..200), delay in 0u64..1000) {
            let mut b = IpamBlock::new("10.244.0.16/28".parse().expect("cidr"), None);
            let mut model: HashMap<IpAddr, (String, u64)> = HashMap::new();
            let mut now = 0u64;
            let reserved = |a: IpAddr| a.to_string() == "10.244.0.20";
            for op in ops {
                match op {
                    Op::Assign { count, handle } => {
                        let h = format!("h{handle}");
                        let got = b.assign(count, &h, &Attributes::new(), now, delay, reserved);
                        prop_assert!(got.len() <= count);
                        for a in got {
                            prop_assert!(!reserved(a.addr));
                            prop_assert!(model.insert(a.addr, (h.clone(), a.seq)).is_none(), "{} handed out twice", a.addr);
                        }
                    }
                    Op::Exact { ordinal, handle } => {
                        let h = format!("h{handle}");
                        let addr = b.addr(ordinal).expect("addr");
                        match b.assign_exact(addr, &h, &Attributes::new(), reserved) {
                            Ok(a) => prop_assert!(model.insert(a.addr, (h, a.seq)).is_none()),
                            Err(BlockError::InUse { .. }) => prop_assert!(model.contains_key(&addr)),
                            Err(BlockError::Reserved { .. }) => prop_assert!(reserved(addr)),
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Release { ordinal, stale } => {
                        let addr = b.addr(ordinal).expect("addr");
                        let want = model.get(&addr).cloned();
                        let seq = want.as_ref().map(|(_, s)| if stale { s + 1000 } else { *s });
                        match (b.release(addr, seq, now), want) {
                            (Ok(Some(freed)), Some((h, s))) => {
                                prop_assert!(!stale);
                                prop_assert_eq!((freed.handle.clone(), freed.seq), (h, s));
                                model.remove(&addr);
                            }
                            (Ok(None), None) => {}
                            (Err(BlockError::StaleRelease { .. }), Some(_)) => prop_assert!(stale),
                            (got, want) => prop_assert!(false, "release {addr}: got {got:?}, model {want:?}"),
                        }
                    }
                    Op::ReleaseHandle { handle } => {
                        let h = format!("h{handle}");
                        let mut freed = b.release_handle(&h, now);
                        freed.sort();
                        let mut want: Vec<IpAddr> = model.iter().filter(|(_, (mh, _))| *mh == h).map(|(a, _)| *a).collect();
                        want.sort();
                        prop_assert_eq!(&freed, &want);
                        model.retain(|_, (mh, _)| *mh != h);
                    }
                    Op::Tick { ms } => now += ms,
                }
                b.check().map_err(TestCaseError::fail)?;
                prop_assert_eq!(b.in_use(), model.len());
                for (addr, (h, s)) in &model {
                    let a = b.allocation(*addr).expect("allocated");
                    prop_assert_eq!((&a.handle, a.seq), (h, *s));
                }
            }
        }
    }
}
