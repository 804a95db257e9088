//! Blocks as keys: the writes that store a block, and the reads that put it back together.
//!
//! Up to format `V5` a block is one key, [`keys::block`]. A `V6` block is its own key (which
//! ordinals are allocated, the free queue) and a key per allocation beside it,
//! [`keys::block_record`], so that assigning or releasing one address writes that address's
//! record and a small block value whatever the block's fill (see
//! [`crate::block_format`]). Every writer goes through [`write_ops`] and [`delete_ops`],
//! every reader through [`blocks_from`] (a prefix read's keys) or [`read_block`] and its
//! kin (one block); the block key's revision guards both, as before.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnetwork::IpNetwork;

use crate::block::{Allocation, BlockFormat, IpamBlock};
use crate::block_format::{attach_v6_records, decode_v6_core, encode_v6_record, BINARY_MAGIC};
use crate::codec::{encode_block, with_retry};
use crate::error::IpamError;
use crate::keys;
use crate::kv::{KeyValue, Kv, Op};

/// What a key under [`keys::BLOCKS`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKey<'k> {
    /// A block's own key; its segment (`10.244.1.0-26`).
    Block(&'k str),
    /// A `V6` block's allocation: the block's segment and the ordinal.
    Record(&'k str, u32),
}

impl<'k> BlockKey<'k> {
    /// `None` for a key outside [`keys::BLOCKS`] or a record key whose ordinal is no number.
    pub fn parse(key: &'k str) -> Option<Self> {
        let rest = key.strip_prefix(keys::BLOCKS)?;
        match rest.split_once('/') {
            None => Some(BlockKey::Block(rest)),
            Some((segment, ordinal)) => Some(BlockKey::Record(segment, ordinal.parse().ok()?)),
        }
    }

    /// The segment of the block the key belongs to.
    pub fn segment(self) -> &'k str {
        match self {
            BlockKey::Block(s) | BlockKey::Record(s, _) => s,
        }
    }
}

/// Whether a block's own value is a `V6` one (whose allocations are stored beside it).
pub fn is_v6_value(value: &[u8]) -> bool {
    value.strip_prefix(&BINARY_MAGIC).and_then(|v| v.first()) == Some(&6)
}

/// A block from its own value and, for `V6`, its records (ordinal and value); a block of an
/// older format has no records.
pub fn block_from_parts<'r>(
    value: &[u8],
    records: impl IntoIterator<Item = (u32, &'r [u8])>,
) -> Result<IpamBlock, String> {
    let mut records = records.into_iter().peekable();
    if !is_v6_value(value) {
        if let Some((ordinal, _)) = records.peek() {
            return Err(format!(
                "a record of ordinal {ordinal} beside a block of a format that has none"
            ));
        }
        return crate::from_stored(value).map_err(|e| e.to_string());
    }
    let (mut block, allocated) = decode_v6_core(value)?;
    attach_v6_records(&mut block, &allocated, records)?;
    Ok(block)
}

/// The blocks among `kvs` (keys outside [`keys::BLOCKS`] are skipped), each with its own
/// key's revision, which guards every write to it. `kvs` must be one read at one
/// revision (a prefix read), so that every `V6` block comes with its records.
pub fn blocks_from(kvs: &[KeyValue]) -> Result<Vec<(IpamBlock, i64)>, IpamError> {
    each_block(kvs).collect()
}

/// A block's own key and its records (ordinal, value), as a prefix read gives them.
type Parts<'a> = (Option<&'a KeyValue>, Vec<(u32, &'a [u8])>);

/// [`blocks_from`], block by block: a reader that skips what does not decode (as the
/// agent does a corrupt record) keeps the others. Records whose block is not among `kvs`
/// ([`orphaned_records`]) are passed over: the block is absent.
pub fn each_block(
    kvs: &[KeyValue],
) -> impl Iterator<Item = Result<(IpamBlock, i64), IpamError>> + '_ {
    let mut parts: BTreeMap<&str, Parts> = BTreeMap::new();
    let mut stray = Vec::new();
    for kv in kvs {
        match BlockKey::parse(&kv.key) {
            Some(BlockKey::Block(segment)) => parts.entry(segment).or_default().0 = Some(kv),
            Some(BlockKey::Record(segment, ordinal)) => parts
                .entry(segment)
                .or_default()
                .1
                .push((ordinal, kv.value.as_slice())),
            None if kv.key.starts_with(keys::BLOCKS) => stray.push(Err(IpamError::Corrupt {
                key: kv.key.clone(),
                reason: "neither a block nor an allocation's record".into(),
            })),
            None => {}
        }
    }
    let blocks = parts.into_values().filter_map(|(own, records)| {
        let own = own?;
        let block = block_from_parts(&own.value, records).map_err(|reason| IpamError::Corrupt {
            key: own.key.clone(),
            reason,
        });
        Some(block.map(|b| (b, own.mod_revision)))
    });
    stray.into_iter().chain(blocks)
}

/// Records among `kvs` (one prefix read) whose block's own key is not there: left by a
/// block key deleted by hand (Tessera deletes a block with every key under it), read as
/// absent and removed by GC. By block: its own key (absent), and how many records it left.
pub fn orphaned_records(kvs: &[KeyValue]) -> BTreeMap<String, usize> {
    let mut own = std::collections::BTreeSet::new();
    let mut records: BTreeMap<&str, usize> = BTreeMap::new();
    for kv in kvs {
        match BlockKey::parse(&kv.key) {
            Some(BlockKey::Block(segment)) => {
                own.insert(segment);
            }
            Some(BlockKey::Record(segment, _)) => *records.entry(segment).or_default() += 1,
            None => {}
        }
    }
    records
        .into_iter()
        .filter(|(segment, _)| !own.contains(segment))
        .map(|(segment, n)| (format!("{}{segment}", keys::BLOCKS), n))
        .collect()
}

/// The block `cidr` and its key's revision: its key read, and a `V6` block with
/// allocations read again with its records ([`from_own_value`]).
pub async fn read_block<K: Kv>(
    kv: &K,
    cidr: IpNetwork,
) -> Result<Option<(IpamBlock, i64)>, IpamError> {
    let key = keys::block(cidr);
    let Some(own) = with_retry(|| kv.get(&key)).await? else {
        return Ok(None);
    };
    from_own_value(kv, cidr, &own).await
}

/// The block `cidr` from its own key as read (by a `get`, or a failed transaction's
/// `or_get`): a `V6` block with allocations is read again with its records.
pub async fn from_own_value<K: Kv>(
    kv: &K,
    cidr: IpNetwork,
    own: &KeyValue,
) -> Result<Option<(IpamBlock, i64)>, IpamError> {
    // Whole as read: a block of an older format, or a V6 block without allocations.
    let whole = !is_v6_value(&own.value)
        || decode_v6_core(&own.value).is_ok_and(|(_, allocated)| allocated.is_empty());
    if whole {
        let block = block_from_parts(&own.value, []).map_err(|reason| IpamError::Corrupt {
            key: own.key.clone(),
            reason,
        })?;
        return Ok(Some((block, own.mod_revision)));
    }
    read_with_records(kv, cidr).await
}

/// The block `cidr` with its records, in one prefix read (one revision). The prefix also
/// holds any block key that merely begins with this one (none does among pools' blocks,
/// /20 or longer, but nothing else is taken for ours).
pub async fn read_with_records<K: Kv>(
    kv: &K,
    cidr: IpNetwork,
) -> Result<Option<(IpamBlock, i64)>, IpamError> {
    let key = keys::block(cidr);
    let (kvs, _) = with_retry(|| kv.get_prefix(&key)).await?;
    let ours: Vec<KeyValue> = kvs
        .into_iter()
        .filter(|k| k.key == key || k.key.strip_prefix(&key).is_some_and(|r| r.starts_with('/')))
        .collect();
    Ok(blocks_from(&ours)?.pop())
}

/// The writes that take block `after.cidr` from `before` (as read; `None` when it is new) to
/// `after`: its own key, and in `V6` the records of the allocations made or changed. A
/// released address's record stays until the address is assigned again or the block is
/// deleted ([`delete_ops`]): the block's own value says the ordinal is free, and readers pass
/// over such a record, so a release writes one key less.
pub fn write_ops(before: Option<&IpamBlock>, after: &IpamBlock) -> Vec<Op> {
    let own = Op::put(keys::block(after.cidr), encode_block(after));
    let records = records_to_write(before, after).map(|(ordinal, allocation)| {
        Op::put(
            keys::block_record(after.cidr, ordinal),
            encode_v6_record(allocation),
        )
    });
    std::iter::once(own).chain(records).collect()
}

/// How many writes [`write_ops`] makes, without encoding them.
pub(crate) fn write_count(before: Option<&IpamBlock>, after: &IpamBlock) -> usize {
    1 + records_to_write(before, after).count()
}

/// The `V6` records `after` needs written: each allocated ordinal whose allocation differs
/// from `before`'s. Nothing for an older format.
fn records_to_write<'a>(
    before: Option<&'a IpamBlock>,
    after: &'a IpamBlock,
) -> impl Iterator<Item = (u32, &'a Arc<Allocation>)> + 'a {
    let v6 = after.format >= BlockFormat::V6;
    // A block read in an older format has no records yet: all of them are written.
    let before = before.filter(|b| b.format >= BlockFormat::V6 && b.cidr == after.cidr);
    let was = move |ordinal: usize| {
        before
            .and_then(|b| b.allocations.get(ordinal))
            .and_then(Option::as_ref)
    };
    after
        .allocations
        .iter()
        .enumerate()
        .filter(move |_| v6)
        .filter_map(move |(ordinal, now)| {
            let now = now.as_ref()?;
            let same = was(ordinal).is_some_and(|w| Arc::ptr_eq(w, now) || w == now);
            (!same).then_some((ordinal as u32, now))
        })
}

/// The writes that delete `block` (as read): its own key and, in `V6`, every record beside
/// it (those of free ordinals too).
pub fn delete_ops(block: &IpamBlock) -> Vec<Op> {
    let own = keys::block(block.cidr);
    let mut ops = vec![Op::delete(&own)];
    if block.format >= BlockFormat::V6 {
        ops.push(Op::delete_prefix(format!("{own}/")));
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::Attributes;
    use proptest::prelude::*;

    /// The keys under [`keys::BLOCKS`] as a store holds them after `ops`.
    fn apply(store: &mut BTreeMap<String, Vec<u8>>, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    store.insert(key, value);
                }
                Op::Delete { key } => {
                    store.remove(&key);
                }
                Op::DeletePrefix { prefix } => store.retain(|k, _| !k.starts_with(&prefix)),
                Op::Get { .. } => unreachable!("writes only"),
            }
        }
    }

    fn read_back(store: &BTreeMap<String, Vec<u8>>) -> Vec<IpamBlock> {
        let kvs: Vec<KeyValue> = store
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
                mod_revision: 1,
                lease: 0,
            })
            .collect();
        blocks_from(&kvs)
            .expect("blocks")
            .into_iter()
            .map(|(b, _)| b)
            .collect()
    }

    proptest! {
        /// Any assignments, releases, handle moves (a StatefulSet pod's sticky addresses)
        /// and affinity changes, in `V5` then moved to `V6` part way: the keys the writes
        /// leave read back as the block, every allocated ordinal has its record, and once in
        /// `V6` a write changes the block's own key and only the records of the allocations
        /// made or changed; deleting the block leaves no key behind.
        #[test]
        fn the_keys_written_read_back_as_the_block(
            ops in proptest::collection::vec((0u8..4, 0u32..16), 0..60),
            move_at in 0usize..60,
        ) {
            let cidr: IpNetwork = "10.244.7.0/28".parse().expect("cidr");
            let mut block = IpamBlock::new(cidr, Some("n".into())).in_format(BlockFormat::V5);
            let mut store = BTreeMap::new();
            apply(&mut store, write_ops(None, &block));
            let mut now = 1_000;
            for (i, (kind, ordinal)) in ops.into_iter().enumerate() {
                now += 7;
                let read = block.clone();
                let mut next = read.clone();
                if i == move_at {
                    next = next.in_format(BlockFormat::V6);
                }
                let addr = next.addr(ordinal).expect("in the block");
                match kind {
                    0 => {
                        let attrs = Attributes::from([
                            ("node".to_string(), "n".to_string()),
                            ("pod".to_string(), format!("p{now}")),
                        ]);
                        next.assign(1, &format!("net.{now:x}"), &attrs, now, 0, |_| false);
                    }
                    1 => {
                        let _ = next.release(addr, None, now);
                    }
                    2 => {
                        if let Some(Some(a)) = next.allocations.get_mut(ordinal as usize) {
                            Arc::make_mut(a).handle = format!("moved-{now}");
                        }
                    }
                    _ => next.affinity = next.affinity.take().xor(Some("n".into())),
                }
                let ops = write_ops(Some(&read), &next);
                prop_assert_eq!(write_count(Some(&read), &next), ops.len());
                if read.format == BlockFormat::V6 {
                    let changed = (0..next.len() as usize)
                        .filter(|&o| {
                            next.allocations[o].is_some()
                                && read.allocations[o] != next.allocations[o]
                        })
                        .count();
                    prop_assert_eq!(ops.len(), 1 + changed);
                }
                apply(&mut store, ops);
                block = next;
                prop_assert_eq!(read_back(&store), vec![block.clone()]);
                let record_of = |o: u32| store.contains_key(&keys::block_record(cidr, o));
                if block.format == BlockFormat::V6 {
                    prop_assert!(block.allocated_ordinals().all(record_of));
                } else {
                    prop_assert!(!store.keys().any(|k| k.contains("-28/")));
                }
            }
            apply(&mut store, delete_ops(&block));
            prop_assert!(store.is_empty(), "{:?}", store.keys().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_full_block_moves_to_v6_only_when_its_records_fit_one_transaction() {
        let mut b = IpamBlock::new("10.244.0.0/24".parse().expect("cidr"), Some("n".into()));
        b.assign(
            crate::block::MAX_RECORDS_MOVED + 1,
            "h",
            &Attributes::new(),
            1,
            0,
            |_| false,
        );
        assert_eq!(b.clone().in_format(BlockFormat::V6).format, BlockFormat::V5);
        let addr = b.addr(0).expect("addr");
        b.release(addr, None, 2).expect("release");
        assert_eq!(b.clone().in_format(BlockFormat::V6).format, BlockFormat::V6);
        assert_eq!(write_ops(None, &b.in_format(BlockFormat::V6)).len(), 101);
    }

    #[test]
    fn keys_under_blocks_are_a_block_or_a_record() {
        assert_eq!(
            BlockKey::parse("/tessera/v1/ipam/blocks/10.244.1.0-26"),
            Some(BlockKey::Block("10.244.1.0-26"))
        );
        assert_eq!(
            BlockKey::parse("/tessera/v1/ipam/blocks/10.244.1.0-26/17"),
            Some(BlockKey::Record("10.244.1.0-26", 17))
        );
        assert_eq!(
            BlockKey::parse("/tessera/v1/ipam/blocks/10.244.1.0-26/x"),
            None
        );
        assert_eq!(BlockKey::parse("/tessera/v1/ipam/handles/h"), None);
        let kvs = [KeyValue {
            key: "/tessera/v1/ipam/blocks/10.244.1.0-26/3".into(),
            value: vec![],
            mod_revision: 1,
            lease: 0,
        }];
        assert!(blocks_from(&kvs).expect("a record alone").is_empty());
        assert_eq!(
            orphaned_records(&kvs),
            BTreeMap::from([("/tessera/v1/ipam/blocks/10.244.1.0-26".to_string(), 1)])
        );
    }
}
