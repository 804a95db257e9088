//! How an IPAM block is stored in etcd, in any of its six formats.
//!
//! - `V1` (no `v` field): `allocations` has an entry per ordinal (`null` when free), the free
//!   queue an object per ordinal, and every allocation its attributes in full. A /26 holding
//!   60 pods is about 19 KB.
//! - `V2` (`"v": 2`): `a` lists only allocated ordinals as `[ordinal, seq, handle,
//!   derived, attributes]`, where `derived` says that the `network` and `containerID`
//!   attributes are the two halves of the handle (`<network>.<containerID>`, as the CNI
//!   plugin names handles) and were left out; `f` is the free queue as flat pairs of
//!   numbers, `ordinal, released-ms` for a released ordinal and `first, -count` for a run
//!   of never-used ones. The same /26 is about 8 KB; an empty one 120 bytes instead of 1.3 KB.
//! - `V3` (`"v": 3`): `V2` with `derived` a set of flags instead of a boolean: 1, the
//!   `network` and `containerID` attributes left out as in `V2`; 2, the `node` attribute left
//!   out because it names the block's affinity (every address a node assigns from its own
//!   block). A /26 of 60 pods is another ~1.2 KB smaller; the bytes per write are what a
//!   full block costs etcd over an empty one.
//! - `V4` (`"v": 4`): `V3` compressed with zstd (level 1) once its JSON is 1 KiB or more;
//!   a zstd frame's first bytes are no JSON's ([`crate::from_stored`] reads both). Container
//!   IDs are hex and pod names repeat: a /26 of 58 pods is about 2.5 KB instead of 9. Such
//!   values are binary to `etcdctl get`; `tesseractl ipam show --show-blocks` reads them.
//! - `V5`: what `V3` holds, in a compact binary form ([`BINARY_MAGIC`], the version byte 5,
//!   then [postcard](https://docs.rs/postcard)): handle prefixes and attribute names stored
//!   once and referred to by index, a value the entry before gave the same attribute
//!   (a namespace) not repeated, hex container IDs as their bytes. Compressed as `V4` is
//!   once 1 KiB or more. A /26 of 58 pods is about 4.1 KB before compression and 2.4 KB
//!   after (`V4` 2.5 KB), and a pair on it costs the client ~15 % less than in `V4` (no
//!   JSON to escape, less to compress); an empty block is 37 bytes. Its JSON form (what
//!   [`crate::from_stored`] gives a reader that asks for JSON) is `V3`'s with `"v": 5`.
//! - `V6`: each allocation under its own key beside the block (see [`crate::block_store`]).
//!   The block's own value ([`BINARY_MAGIC`], the version byte 6, postcard) holds the
//!   allocated ordinals with their sequence numbers and the free queue: 150 bytes for those
//!   58 pods. Each allocation's record ([`RECORD_MAGIC`], 6, postcard) holds its sequence
//!   number, handle and attributes (only `network` and `containerID` left out, as the handle
//!   says them; `node` is kept, so a record does not depend on its block's affinity). An
//!   assignment writes the block's own value and the new record, a release only the
//!   block's own value (the freed ordinal's record stays, passed over by readers, until
//!   the ordinal is assigned again), whatever the fill. Its JSON form (a handoff file's) is `V3`'s with `"v": 6`, whole.
//!
//! Every value says its format; a reader that meets a newer one refuses it (a decode error
//! naming the version) rather than misreading it, and a block is only ever rewritten in
//! the format it had or a newer one ([`IpamBlock::in_format`]).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::ser::{SerializeSeq, SerializeStruct, SerializeStructVariant};
use serde::{Deserialize, Serialize};

use crate::block::{Allocation, Attributes, BlockFormat, FreeSlot, IpamBlock};

/// One allocation in `V2` and `V3`: ordinal, sequence, handle, which attributes are
/// derived, the others.
type AllocationV2 = (u32, u64, String, Derived, Attributes);

/// Which attributes an allocation's entry leaves out: a boolean in `V2`, flags in `V3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum Derived {
    V2(bool),
    V3(u8),
}

/// `network` and `containerID`: the halves of the handle.
const FROM_HANDLE: u8 = 1;
/// `node`: the block's affinity.
const FROM_AFFINITY: u8 = 2;

/// A block as stored, as read (any format); [`IpamBlock`] serializes through a borrowed
/// view of the same fields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredBlock {
    #[serde(default)]
    v: Option<u32>,
    cidr: IpNetwork,
    affinity: Option<String>,
    #[serde(default)]
    allocations: Option<Vec<Option<Arc<Allocation>>>>,
    #[serde(default)]
    free: Option<VecDeque<FreeSlot>>,
    #[serde(default)]
    next_seq: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    a: Option<Vec<AllocationV2>>,
    #[serde(default)]
    f: Option<Vec<i64>>,
}

const NETWORK: &str = "network";
const CONTAINER_ID: &str = "containerID";
const NODE: &str = "node";

/// A block in its stored form, borrowed: how [`IpamBlock`] serializes (field for field what
/// [`StoredBlock`] reads back), without copying the block first.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StoredBlockRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<u32>,
    cidr: &'a IpNetwork,
    affinity: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocations: Option<&'a [Option<Arc<Allocation>>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    free: Option<&'a VecDeque<FreeSlot>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    a: Option<CompactAllocations<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    f: Option<Vec<i64>>,
}

impl Serialize for IpamBlock {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = StoredBlockRef {
            v: None,
            cidr: &self.cidr,
            affinity: &self.affinity,
            allocations: None,
            free: None,
            next_seq: None,
            seq: None,
            a: None,
            f: None,
        };
        match self.format {
            BlockFormat::V1 => {
                out.allocations = Some(&self.allocations);
                out.free = Some(&self.free);
                out.next_seq = Some(self.next_seq);
            }
            BlockFormat::V2
            | BlockFormat::V3
            | BlockFormat::V4
            | BlockFormat::V5
            | BlockFormat::V6 => {
                let v3 = self.format >= BlockFormat::V3;
                out.v = Some(self.format.version());
                out.seq = Some(self.next_seq);
                out.a = Some(CompactAllocations {
                    allocations: &self.allocations,
                    v3,
                    affinity: self.affinity.as_deref().filter(|_| v3),
                });
                out.f = Some(compact_free(&self.free));
            }
        }
        out.serialize(s)
    }
}

/// `a` of `V2` and `V3`: the allocated ordinals, each `[ordinal, seq, handle, derived,
/// attributes]` without the attributes `derived` says were left out.
struct CompactAllocations<'a> {
    allocations: &'a [Option<Arc<Allocation>>],
    v3: bool,
    /// The block's node, left out of the attributes that name it (`V3` only).
    affinity: Option<&'a str>,
}

impl Serialize for CompactAllocations<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.allocations
                .iter()
                .enumerate()
                .filter_map(|(ordinal, a)| Some((ordinal as u32, a.as_ref()?)))
                .map(|(ordinal, a)| {
                    let (derived, left_out) = derived(a, self.v3, self.affinity);
                    CompactAllocation {
                        ordinal,
                        a,
                        derived,
                        left_out,
                    }
                }),
        )
    }
}

/// One entry of `a`: the tuple `AllocationV2` reads back.
struct CompactAllocation<'a> {
    ordinal: u32,
    a: &'a Allocation,
    derived: Derived,
    /// The attributes `derived` says are left out.
    left_out: &'static [&'static str],
}

impl Serialize for CompactAllocation<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(5)?;
        t.serialize_element(&self.ordinal)?;
        t.serialize_element(&self.a.seq)?;
        t.serialize_element(&self.a.handle)?;
        t.serialize_element(&self.derived)?;
        t.serialize_element(&KeptAttributes {
            attrs: &self.a.attrs,
            left_out: self.left_out,
        })?;
        t.end()
    }
}

/// An allocation's attributes but those its entry leaves out, as a map.
struct KeptAttributes<'a> {
    attrs: &'a Attributes,
    left_out: &'static [&'static str],
}

impl<'a> KeptAttributes<'a> {
    fn iter(&self) -> impl Iterator<Item = (&'a String, &'a String)> + 'a {
        let left_out = self.left_out;
        self.attrs
            .iter()
            .filter(move |(k, _)| !left_out.contains(&k.as_str()))
    }
}

impl Serialize for KeptAttributes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// Which of `a`'s attributes its entry leaves out, and the `derived` value that says so.
/// `affinity`: the block's node, left out when the attributes name it (`V3`).
fn derived(a: &Allocation, v3: bool, affinity: Option<&str>) -> (Derived, &'static [&'static str]) {
    if !v3 {
        let from_handle = from_handle(a);
        let left_out: &[&str] = if from_handle {
            &[NETWORK, CONTAINER_ID]
        } else {
            &[]
        };
        return (Derived::V2(from_handle), left_out);
    }
    let (flags, left_out) = v3_flags(a, affinity);
    (Derived::V3(flags), left_out)
}

/// Whether `a`'s `network` and `containerID` attributes are the two halves of its handle
/// (`<network>.<containerID>`, as the CNI plugin names handles).
fn from_handle(a: &Allocation) -> bool {
    let handle = &a.handle;
    match (a.attrs.get(NETWORK), a.attrs.get(CONTAINER_ID)) {
        (Some(n), Some(c)) => {
            !c.contains('.') && handle.len() == n.len() + 1 + c.len() && {
                handle.starts_with(n.as_str())
                    && handle[n.len()..].starts_with('.')
                    && handle.ends_with(c.as_str())
            }
        }
        _ => false,
    }
}

/// `V3`'s flags (also `V4`'s and `V5`'s) for `a`, and the attributes they leave out.
fn v3_flags(a: &Allocation, affinity: Option<&str>) -> (u8, &'static [&'static str]) {
    let from_handle = from_handle(a);
    let from_affinity = affinity.is_some() && a.attrs.get(NODE).map(String::as_str) == affinity;
    match (from_handle, from_affinity) {
        (true, true) => (FROM_HANDLE | FROM_AFFINITY, &[NETWORK, CONTAINER_ID, NODE]),
        (true, false) => (FROM_HANDLE, &[NETWORK, CONTAINER_ID]),
        (false, true) => (FROM_AFFINITY, &[NODE]),
        (false, false) => (0, &[]),
    }
}

fn compact_free(free: &VecDeque<FreeSlot>) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::with_capacity(8);
    for slot in free {
        let ordinal = i64::from(slot.ordinal);
        match slot.released_ms {
            Some(ms) => out.extend([ordinal, ms as i64]),
            None => {
                // Extend the last pair when it is a never-used run ending just before.
                if let [.., first, count] = out.as_mut_slice() {
                    if *count < 0 && *first - *count == ordinal {
                        *count -= 1;
                        continue;
                    }
                }
                out.extend([ordinal, -1]);
            }
        }
    }
    out
}

impl TryFrom<StoredBlock> for IpamBlock {
    type Error = String;

    fn try_from(s: StoredBlock) -> Result<Self, String> {
        match s.v {
            None | Some(1) => Ok(IpamBlock {
                cidr: s.cidr,
                affinity: s.affinity,
                allocations: s.allocations.ok_or("missing field `allocations`")?,
                free: s.free.ok_or("missing field `free`")?,
                next_seq: s.next_seq.ok_or("missing field `nextSeq`")?,
                format: BlockFormat::V1,
            }),
            Some(version @ (2..=6)) => {
                let format = BlockFormat::of_version(version);
                let mut allocations = Allocations::new(s.cidr, s.affinity.as_deref())?;
                for (ordinal, seq, handle, derived, attrs) in s.a.unwrap_or_default() {
                    let flags = match (version, derived) {
                        (2, Derived::V2(from_handle)) => {
                            if from_handle {
                                FROM_HANDLE
                            } else {
                                0
                            }
                        }
                        (3.., Derived::V3(flags)) => flags,
                        _ => {
                            return Err(format!(
                                "allocation {ordinal}: {derived:?} is not a format {version} entry"
                            ))
                        }
                    };
                    allocations.place(ordinal, seq, handle, flags, attrs, version)?;
                }
                Ok(IpamBlock {
                    free: expand_free(&s.f.unwrap_or_default(), allocations.block_len)?,
                    allocations: allocations.by_ordinal,
                    cidr: s.cidr,
                    affinity: s.affinity,
                    next_seq: s.seq.unwrap_or(0),
                    format,
                })
            }
            Some(v) => Err(newer_version(v)),
        }
    }
}

fn newer_version(v: impl std::fmt::Display) -> String {
    format!("block format version {v} is newer than this Tessera reads: upgrade this node")
}

impl BlockFormat {
    /// The `v` a value in this format says (`V1` says none).
    fn version(self) -> u32 {
        match self {
            BlockFormat::V1 => 1,
            BlockFormat::V2 => 2,
            BlockFormat::V3 => 3,
            BlockFormat::V4 => 4,
            BlockFormat::V5 => 5,
            BlockFormat::V6 => 6,
        }
    }

    /// The format whose values say `v`, one of 2 to 6.
    fn of_version(v: u32) -> BlockFormat {
        match v {
            2 => BlockFormat::V2,
            3 => BlockFormat::V3,
            4 => BlockFormat::V4,
            5 => BlockFormat::V5,
            _ => BlockFormat::V6,
        }
    }
}

/// A block's allocations by ordinal as a decoder fills them from compact entries.
struct Allocations<'a> {
    by_ordinal: Vec<Option<Arc<Allocation>>>,
    block_len: u32,
    /// The block's node, for the entries whose flags left it out.
    affinity: Option<&'a str>,
}

/// The most addresses a block holds: pools' blocks are /20 to /32 (/116 to /128).
const MAX_BLOCK_LEN: u32 = 1 << 12;

impl<'a> Allocations<'a> {
    fn new(cidr: IpNetwork, affinity: Option<&'a str>) -> Result<Self, String> {
        let block_len = crate::block::block_len(cidr);
        if block_len > MAX_BLOCK_LEN {
            // Not a block any pool makes: refused before it takes the memory.
            return Err(format!(
                "a block of {block_len} addresses ({cidr}); pools' blocks hold at most {MAX_BLOCK_LEN}"
            ));
        }
        Ok(Allocations {
            by_ordinal: vec![None; block_len as usize],
            block_len,
            affinity,
        })
    }

    /// Puts one entry in its place, with the attributes its `flags` left out put back.
    fn place(
        &mut self,
        ordinal: u32,
        seq: u64,
        handle: String,
        flags: u8,
        mut attrs: Attributes,
        version: u32,
    ) -> Result<(), String> {
        let len = self.block_len;
        let slot = self
            .by_ordinal
            .get_mut(ordinal as usize)
            .ok_or_else(|| format!("ordinal {ordinal} outside a block of {len}"))?;
        if flags & !(FROM_HANDLE | FROM_AFFINITY) != 0 {
            return Err(format!(
                "allocation {ordinal}: V3({flags}) is not a format {version} entry"
            ));
        }
        if flags & FROM_AFFINITY != 0 {
            let node = self.affinity.ok_or_else(|| {
                format!("allocation {ordinal} names the affinity of a block without one")
            })?;
            attrs.insert(NODE.into(), node.into());
        }
        if flags & FROM_HANDLE != 0 {
            let (network, container) = handle
                .rsplit_once('.')
                .ok_or_else(|| format!("handle {handle} is not <network>.<id>"))?;
            attrs.insert(NETWORK.into(), network.into());
            attrs.insert(CONTAINER_ID.into(), container.into());
        }
        *slot = Some(Arc::new(Allocation { handle, seq, attrs }));
        Ok(())
    }
}

/// The free queue from its compact pairs (see [`compact_free`]).
fn expand_free(f: &[i64], len: u32) -> Result<VecDeque<FreeSlot>, String> {
    if f.len() % 2 != 0 {
        return Err("the free queue has an odd number of entries".into());
    }
    let mut free = VecDeque::with_capacity(len as usize);
    for pair in f.chunks_exact(2) {
        let (first, second) = (pair[0], pair[1]);
        let ordinals = if second < 0 {
            first..first.saturating_sub(second)
        } else {
            first..first.saturating_add(1)
        };
        for o in ordinals {
            let ordinal = u32::try_from(o)
                .ok()
                .filter(|o| *o < len)
                .ok_or_else(|| format!("free ordinal {o} outside a block of {len}"))?;
            free.push_back(FreeSlot {
                ordinal,
                released_ms: (second >= 0).then_some(second as u64),
            });
        }
    }
    Ok(free)
}

/// What a `V5` value begins with, before its version byte: no JSON value and no zstd frame
/// begins with a zero byte.
pub(crate) const BINARY_MAGIC: [u8; 3] = [0x00, b'T', b'B'];

/// `V5` after [`BINARY_MAGIC`] and the version byte, in postcard, as read. It is written
/// by [`BinaryBlockRef`] straight from the block, field for field in this order.
#[derive(Deserialize)]
struct BinaryBlock {
    cidr: IpNetwork,
    affinity: Option<String>,
    seq: u64,
    /// The free queue as `V2`-`V4`'s `f`.
    free: Vec<i64>,
    allocations: Vec<BinaryAllocation>,
    /// The handle prefixes and attribute names the allocations refer to by index, each
    /// once (written last: the writer collects them while it writes the allocations).
    strings: Vec<String>,
}

#[derive(Deserialize)]
struct BinaryAllocation {
    ordinal: u32,
    seq: u64,
    handle: BinaryHandle,
    /// `V3`'s flags: which attributes were left out.
    derived: u8,
    /// The other attributes: the name's index into `strings`, and the value.
    attrs: Vec<(u32, BinaryValue)>,
}

#[derive(Deserialize)]
enum BinaryHandle {
    Text(String),
    /// `<strings[prefix]>.<id in lower-case hex>`: how the CNI plugin names handles
    /// (network, container ID), 32 bytes where the hex was 64.
    HexId {
        prefix: u32,
        id: Vec<u8>,
    },
}

#[derive(Deserialize)]
enum BinaryValue {
    Text(String),
    /// What the last entry before this one with the same attribute gave it (a namespace,
    /// an interface name: pods in a block share them).
    Repeated,
}

/// Hex IDs up to this many bytes are stored as bytes (a container ID is 32).
const MAX_HEX_ID_BYTES: usize = 64;

/// The bytes `id` is the lower-case hex of, if it is: only what hex-encodes back to the
/// same text (even length, lower case, not empty) is stored as bytes.
fn lower_hex_bytes(id: &str, buf: &mut [u8; MAX_HEX_ID_BYTES]) -> Option<usize> {
    let len = id.len() / 2;
    // `hex` reads upper case too, which would come back lower case.
    if id.is_empty() || len > MAX_HEX_ID_BYTES || id.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(id, &mut buf[..len]).ok()?;
    Some(len)
}

/// The strings a `V5` value stores once, in the order first named.
#[derive(Default)]
struct StringTable<'a> {
    strings: Vec<&'a str>,
    index: std::collections::HashMap<&'a str, u32, foldhash::fast::FixedState>,
}

impl<'a> StringTable<'a> {
    fn index(&mut self, s: &'a str) -> u32 {
        *self.index.entry(s).or_insert_with(|| {
            self.strings.push(s);
            self.strings.len() as u32 - 1
        })
    }
}

/// What the writer of a `V5` value remembers from one entry to the next.
#[derive(Default)]
struct BinaryWriter<'a> {
    strings: StringTable<'a>,
    /// By name's index: the value the last entry with that attribute gave it.
    last_values: Vec<Option<&'a str>>,
}

/// A block as `V5` writes it: [`BinaryBlock`]'s fields, borrowed from the block, without
/// building a copy first (a write is on every assignment and release). The string table
/// fills while the entries are written, and is written after them.
struct BinaryBlockRef<'a> {
    block: &'a IpamBlock,
    writer: RefCell<BinaryWriter<'a>>,
}

impl Serialize for BinaryBlockRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let block = self.block;
        let mut out = s.serialize_struct("BinaryBlock", 6)?;
        out.serialize_field("cidr", &block.cidr)?;
        out.serialize_field("affinity", &block.affinity)?;
        out.serialize_field("seq", &block.next_seq)?;
        out.serialize_field("free", &compact_free(&block.free))?;
        out.serialize_field("allocations", &BinaryEntriesRef(self))?;
        out.serialize_field("strings", &self.writer.borrow().strings.strings)?;
        out.end()
    }
}

/// The allocated ordinals' entries (read as `Vec<BinaryAllocation>`).
struct BinaryEntriesRef<'b, 'a>(&'b BinaryBlockRef<'a>);

impl Serialize for BinaryEntriesRef<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let block = self.0.block;
        // postcard writes a sequence's length first: it must be known.
        let mut seq = s.serialize_seq(Some(block.in_use()))?;
        for (ordinal, a) in block.allocations.iter().enumerate() {
            if let Some(a) = a {
                seq.serialize_element(&BinaryEntryRef {
                    ordinal: ordinal as u32,
                    a,
                    affinity: block.affinity.as_deref(),
                    writer: &self.0.writer,
                })?;
            }
        }
        seq.end()
    }
}

/// One entry (read as [`BinaryAllocation`]).
struct BinaryEntryRef<'b, 'a> {
    ordinal: u32,
    a: &'a Allocation,
    affinity: Option<&'a str>,
    writer: &'b RefCell<BinaryWriter<'a>>,
}

impl Serialize for BinaryEntryRef<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.a;
        let (flags, left_out) = v3_flags(a, self.affinity);
        let mut out = s.serialize_struct("BinaryAllocation", 5)?;
        out.serialize_field("ordinal", &self.ordinal)?;
        out.serialize_field("seq", &a.seq)?;
        let mut id = [0u8; MAX_HEX_ID_BYTES];
        let hex_id = a
            .handle
            .rsplit_once('.')
            .and_then(|(prefix, hex)| Some((prefix, lower_hex_bytes(hex, &mut id)?)));
        match hex_id {
            Some((prefix, len)) => {
                let prefix = self.writer.borrow_mut().strings.index(prefix);
                let id = &id[..len];
                out.serialize_field("handle", &BinaryHexIdRef { prefix, id })?
            }
            None => out.serialize_field("handle", &Text("BinaryHandle", &a.handle))?,
        }
        out.serialize_field("derived", &flags)?;
        let kept = KeptAttributes {
            attrs: &a.attrs,
            left_out,
        };
        out.serialize_field(
            "attrs",
            &BinaryAttrsRef {
                kept,
                writer: self.writer,
            },
        )?;
        out.end()
    }
}

/// `BinaryHandle::HexId` (index 1), as written.
struct BinaryHexIdRef<'i> {
    prefix: u32,
    id: &'i [u8],
}

impl Serialize for BinaryHexIdRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = s.serialize_struct_variant("BinaryHandle", 1, "HexId", 2)?;
        v.serialize_field("prefix", &self.prefix)?;
        // postcard writes bytes as it writes a sequence of u8 (`Vec<u8>` reads it).
        v.serialize_field("id", &BytesRef(self.id))?;
        v.end()
    }
}

/// An entry's attributes but those its flags leave out (read as `Vec<(u32, BinaryValue)>`).
struct BinaryAttrsRef<'b, 'a> {
    kept: KeptAttributes<'a>,
    writer: &'b RefCell<BinaryWriter<'a>>,
}

impl Serialize for BinaryAttrsRef<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut writer = self.writer.borrow_mut();
        let mut seq = s.serialize_seq(Some(self.kept.iter().count()))?;
        for (name, value) in self.kept.iter() {
            let name = writer.strings.index(name);
            let i = name as usize;
            if writer.last_values.len() <= i {
                writer.last_values.resize(i + 1, None);
            }
            if writer.last_values[i] == Some(value.as_str()) {
                seq.serialize_element(&(name, Repeated))?;
            } else {
                writer.last_values[i] = Some(value);
                seq.serialize_element(&(name, Text("BinaryValue", value)))?;
            }
        }
        seq.end()
    }
}

/// The `Text` variant (index 0) of `BinaryHandle` or `BinaryValue`, as written.
struct Text<'a>(&'static str, &'a str);

impl Serialize for Text<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant(self.0, 0, "Text", self.1)
    }
}

/// `BinaryValue::Repeated` (index 1), as written.
struct Repeated;

impl Serialize for Repeated {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit_variant("BinaryValue", 1, "Repeated")
    }
}

/// Bytes serialized as bytes (serde's `[u8]` is a sequence of numbers).
struct BytesRef<'a>(&'a [u8]);

impl Serialize for BytesRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// A block in `V5`'s bytes.
pub(crate) fn encode_binary(block: &IpamBlock) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(64 + 80 * block.in_use());
    out.extend(BINARY_MAGIC);
    out.push(BlockFormat::V5.version() as u8);
    let stored = BinaryBlockRef {
        block,
        writer: Default::default(),
    };
    postcard::to_extend(&stored, out)
}

/// A `V5` value (see [`BINARY_MAGIC`]) as its block, or a `V6` block's own value when it
/// has no allocations (with allocations it is only whole with its records: see
/// [`decode_v6_core`]).
pub(crate) fn decode_binary(bytes: &[u8]) -> Result<IpamBlock, String> {
    let (version, body) = binary_version(bytes)?;
    if version == 6 {
        let (block, allocated) = decode_v6_core(bytes)?;
        if !allocated.is_empty() {
            return Err(format!(
                "a format 6 block of {} with {} allocations stored beside it: read it with them",
                block.cidr,
                allocated.len()
            ));
        }
        return Ok(block);
    }
    let stored: BinaryBlock = whole(body, "a format 5 block")?;
    let string = |i: u32| {
        stored
            .strings
            .get(i as usize)
            .ok_or_else(|| format!("string {i} named, of a table of {}", stored.strings.len()))
    };
    let mut allocations = Allocations::new(stored.cidr, stored.affinity.as_deref())?;
    let mut last_values: Vec<Option<&String>> = vec![None; stored.strings.len()];
    for a in &stored.allocations {
        let handle = match &a.handle {
            BinaryHandle::Text(h) => h.clone(),
            BinaryHandle::HexId { prefix, id } => {
                format!("{}.{}", string(*prefix)?, hex::encode(id))
            }
        };
        let mut attrs = Attributes::new();
        for (name, value) in &a.attrs {
            let name_text = string(*name)?;
            let last = &mut last_values[*name as usize];
            let value = match value {
                BinaryValue::Text(v) => *last.insert(v),
                BinaryValue::Repeated => last.ok_or_else(|| {
                    format!(
                        "allocation {}: {name_text} repeats a value never given",
                        a.ordinal
                    )
                })?,
            };
            attrs.insert(name_text.clone(), value.clone());
        }
        allocations.place(a.ordinal, a.seq, handle, a.derived, attrs, 5)?;
    }
    Ok(IpamBlock {
        free: expand_free(&stored.free, allocations.block_len)?,
        allocations: allocations.by_ordinal,
        cidr: stored.cidr,
        affinity: stored.affinity,
        next_seq: stored.seq,
        format: BlockFormat::V5,
    })
}

/// `body` as one postcard value of `T`, every byte of it; errors say `what` it was.
fn whole<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes::<T>(body)
        .map_err(|e| format!("{what} that does not decode: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{what} with {} bytes after its end", rest.len()));
    }
    Ok(value)
}

/// The version byte of a binary block value (5 or 6), and what follows it.
fn binary_version(bytes: &[u8]) -> Result<(u32, &[u8]), String> {
    let (&version, body) = bytes
        .strip_prefix(&BINARY_MAGIC)
        .and_then(<[u8]>::split_first)
        .ok_or("not a binary block")?;
    match u32::from(version) {
        v @ (5 | 6) => Ok((v, body)),
        v if v > 6 => Err(newer_version(v)),
        v => Err(format!(
            "a binary block that says format {v}: only 5 and 6 are binary"
        )),
    }
}

// ---- V6: each allocation under its own key ----------------------------------------------
//
// A `V6` block's own value ([`V6Core`]) says which ordinals are allocated, with their
// sequence numbers, and holds the free queue: tens of bytes for a full /26 where `V5`
// holds every pod's handle and attributes. Each allocation's record ([`V6Record`]: handle
// and attributes) is a key of its own beside the block, `<block key>/<ordinal>`, written in
// the same transaction as the block when it is assigned. A release writes only the block's
// own value: the record stays, and readers pass over a free ordinal's record; the next
// assignment of the ordinal overwrites it, with a new sequence number, and deleting the
// block deletes every key under `<block key>/`. A write then carries only what changed,
// whatever the block's fill. The block key's revision still guards every change: no record
// changes without its block.

/// A `V6` block's own value after [`BINARY_MAGIC`] and the version byte 6, in postcard.
#[derive(Serialize, Deserialize)]
struct V6Core<'a> {
    cidr: IpNetwork,
    #[serde(borrow)]
    affinity: Option<std::borrow::Cow<'a, str>>,
    seq: u64,
    /// The free queue as `V2`-`V5`'s `f`.
    free: Vec<i64>,
    /// The allocated ordinals and their sequence numbers, lowest ordinal first.
    allocated: Vec<(u32, u64)>,
}

/// What a `V6` record value begins with, before its version byte (a block's value begins
/// with [`BINARY_MAGIC`]).
pub const RECORD_MAGIC: [u8; 3] = [0x00, b'T', b'R'];

/// One allocation of a `V6` block, after [`RECORD_MAGIC`] and the version byte 6. It does
/// not depend on its block (the `node` attribute is kept when it names the block's
/// affinity), so a block's records stay valid when its affinity changes.
#[derive(Serialize, Deserialize)]
struct V6Record<'a> {
    seq: u64,
    #[serde(borrow)]
    handle: std::borrow::Cow<'a, str>,
    /// `V3`'s flags, only ever [`FROM_HANDLE`].
    derived: u8,
    attrs: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
}

/// A `V6` block's own value.
pub(crate) fn encode_v6_core(block: &IpamBlock) -> Vec<u8> {
    let core = V6Core {
        cidr: block.cidr,
        affinity: block.affinity.as_deref().map(Into::into),
        seq: block.next_seq,
        free: compact_free(&block.free),
        allocated: block
            .allocations
            .iter()
            .enumerate()
            .filter_map(|(ordinal, a)| Some((ordinal as u32, a.as_ref()?.seq)))
            .collect(),
    };
    let mut out = Vec::with_capacity(48 + 4 * core.allocated.len());
    out.extend(BINARY_MAGIC);
    out.push(BlockFormat::V6.version() as u8);
    postcard::to_extend(&core, out).expect("postcard writes numbers and strings into memory")
}

/// One allocation's record in a `V6` block.
pub(crate) fn encode_v6_record(a: &Allocation) -> Vec<u8> {
    let (flags, left_out) = v3_flags(a, None);
    let record = V6Record {
        seq: a.seq,
        handle: a.handle.as_str().into(),
        derived: flags,
        attrs: KeptAttributes {
            attrs: &a.attrs,
            left_out,
        }
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect(),
    };
    let mut out = Vec::with_capacity(32 + a.handle.len() + 48 * record.attrs.len());
    out.extend(RECORD_MAGIC);
    out.push(BlockFormat::V6.version() as u8);
    postcard::to_extend(&record, out).expect("postcard writes numbers and strings into memory")
}

/// A `V6` block's own value: the block without its allocations, and the allocated
/// ordinals with their sequence numbers (the records to find beside it).
pub(crate) fn decode_v6_core(bytes: &[u8]) -> Result<(IpamBlock, Vec<(u32, u64)>), String> {
    let (version, body) = binary_version(bytes)?;
    if version != 6 {
        return Err(format!("format {version}, not a format 6 block"));
    }
    let core: V6Core = whole(body, "a format 6 block")?;
    let allocations = Allocations::new(core.cidr, None)?;
    let len = allocations.block_len;
    let mut last = None;
    for &(ordinal, _) in &core.allocated {
        if ordinal >= len || last.is_some_and(|l| l >= ordinal) {
            return Err(format!(
                "allocated ordinal {ordinal} out of order or outside a block of {len}"
            ));
        }
        last = Some(ordinal);
    }
    let block = IpamBlock {
        free: expand_free(&core.free, allocations.block_len)?,
        allocations: allocations.by_ordinal,
        cidr: core.cidr,
        affinity: core.affinity.map(String::from),
        next_seq: core.seq,
        format: BlockFormat::V6,
    };
    Ok((block, core.allocated))
}

/// Puts the records of a `V6` block read by [`decode_v6_core`] in their places. Every
/// allocated ordinal needs its record with the same sequence number (an assignment writes
/// it in the transaction that allocates the ordinal): anything else is a torn read or
/// damage, never a block. A free ordinal's record is what a release left; it is passed over.
pub(crate) fn attach_v6_records<'r>(
    block: &mut IpamBlock,
    allocated: &[(u32, u64)],
    records: impl IntoIterator<Item = (u32, &'r [u8])>,
) -> Result<(), String> {
    let mut places = Allocations::new(block.cidr, None)?;
    for (ordinal, bytes) in records {
        let body = bytes
            .strip_prefix(&RECORD_MAGIC)
            .and_then(|b| b.strip_prefix(&[BlockFormat::V6.version() as u8]))
            .ok_or_else(|| format!("allocation {ordinal}: not a format 6 record"))?;
        let record: V6Record = whole(body, &format!("allocation {ordinal}'s record"))?;
        let Ok(i) = allocated.binary_search_by_key(&ordinal, |(o, _)| *o) else {
            if ordinal >= block.len() {
                return Err(format!(
                    "a record of ordinal {ordinal}, past the block's end"
                ));
            }
            // Left by a release: the block's own value says the ordinal is free.
            continue;
        };
        let seq = allocated[i].1;
        if seq != record.seq {
            return Err(format!(
                "allocation {ordinal}: the record says sequence {}, the block {seq}",
                record.seq
            ));
        }
        if record.derived & FROM_AFFINITY != 0 {
            return Err(format!(
                "allocation {ordinal}: flags {} in a record",
                record.derived
            ));
        }
        let attrs = record
            .attrs
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        places.place(
            ordinal,
            record.seq,
            record.handle.into_owned(),
            record.derived,
            attrs,
            6,
        )?;
    }
    if let Some((missing, _)) = allocated
        .iter()
        .find(|(o, _)| places.by_ordinal[*o as usize].is_none())
    {
        return Err(format!("allocation {missing} has no record"));
    }
    block.allocations = places.by_ordinal;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(container: &str, pod: &str) -> Attributes {
        Attributes::from([
            ("network".to_string(), "k8s-pod-network".to_string()),
            ("containerID".to_string(), container.to_string()),
            ("ifname".to_string(), "eth0".to_string()),
            ("namespace".to_string(), "default".to_string()),
            ("pod".to_string(), pod.to_string()),
        ])
    }

    /// A /26 with pods, released ordinals and an allocation whose handle is not
    /// `<network>.<containerID>` (tesseractl's, say).
    fn used_block() -> IpamBlock {
        let mut b = IpamBlock::new("10.244.1.0/26".parse().expect("cidr"), Some("node1".into()));
        for i in 0..40 {
            let c = format!("{i:064x}");
            let got = b.assign(
                1,
                &format!("k8s-pod-network.{c}"),
                &attrs(&c, &format!("pod-{i}")),
                1_000,
                0,
                |_| false,
            );
            assert_eq!(got.len(), 1);
        }
        b.assign(
            1,
            "ctl.reserved",
            &Attributes::from([("note".to_string(), "by hand".to_string())]),
            2_000,
            0,
            |_| false,
        );
        for i in (0..40).step_by(3) {
            let addr = b.addr(i).expect("addr");
            let seq = b.allocation(addr).expect("allocated").seq;
            b.release(addr, Some(seq), 5_000 + u64::from(i))
                .expect("release");
        }
        b
    }

    /// Through the bytes etcd would hold.
    fn round_trip(b: &IpamBlock) -> IpamBlock {
        crate::from_stored(&crate::codec::encode_block(b)).expect("decode")
    }

    #[test]
    fn a_v1_value_as_earlier_versions_wrote_it_still_reads() {
        // Written by Tessera before the format version existed (field for field).
        let v1 = r#"{"cidr":"10.244.1.0/30","affinity":"node1","allocations":[{"handle":"k8s-pod-network.abc","seq":0,"attrs":{"containerID":"abc","network":"k8s-pod-network","pod":"p"}},null,null,null],"free":[{"ordinal":2,"released_ms":1700000000000},{"ordinal":3},{"ordinal":1}],"nextSeq":2}"#;
        let b: IpamBlock = serde_json::from_str(v1).expect("v1 reads");
        assert_eq!(b.format, BlockFormat::V1);
        assert_eq!(b.in_use(), 1);
        assert_eq!(b.free[0].released_ms, Some(1_700_000_000_000));
        assert_eq!(b.free.len(), 3);
        // Rewritten in V1 it is byte for byte what was read.
        assert_eq!(serde_json::to_string(&b).expect("encode"), v1);
    }

    #[test]
    fn v2_and_v3_values_are_byte_for_byte_what_earlier_versions_wrote() {
        // Written by the encoder before it borrowed the block (it compacted a copy): a CNI
        // allocation on the block's own node, another's on a foreign node, a released
        // ordinal and a never-used run.
        let v2 = r#"{"v":2,"cidr":"10.244.1.0/29","affinity":"node1","seq":3,"a":[[0,0,"net.c1",true,{"node":"node1","pod":"p1"}],[1,1,"ctl.x",false,{"node":"node2","note":"by \"hand\""}]],"f":[3,-5,2,5000]}"#;
        let v3 = r#"{"v":3,"cidr":"10.244.1.0/29","affinity":"node1","seq":3,"a":[[0,0,"net.c1",3,{"pod":"p1"}],[1,1,"ctl.x",0,{"node":"node2","note":"by \"hand\""}]],"f":[3,-5,2,5000]}"#;
        let mut b = IpamBlock::new("10.244.1.0/29".parse().expect("cidr"), Some("node1".into()));
        let cni = Attributes::from([
            ("network".to_string(), "net".to_string()),
            ("containerID".to_string(), "c1".to_string()),
            ("node".to_string(), "node1".to_string()),
            ("pod".to_string(), "p1".to_string()),
        ]);
        let other = Attributes::from([
            ("node".to_string(), "node2".to_string()),
            ("note".to_string(), "by \"hand\"".to_string()),
        ]);
        b.assign(1, "net.c1", &cni, 1_000, 0, |_| false);
        b.assign(1, "ctl.x", &other, 1_001, 0, |_| false);
        b.assign(1, "plain", &Attributes::new(), 1_002, 0, |_| false);
        let plain = b.addr(2).expect("addr");
        let seq = b.allocation(plain).expect("allocated").seq;
        b.release(plain, Some(seq), 5_000).expect("release");
        for (format, text) in [(BlockFormat::V2, v2), (BlockFormat::V3, v3)] {
            let in_format = b.clone().in_format(format);
            assert_eq!(serde_json::to_string(&in_format).expect("encode"), text);
            let read: IpamBlock = serde_json::from_str(text).expect("decode");
            assert_eq!(
                IpamBlock {
                    format: BlockFormat::V1,
                    ..read
                },
                b
            );
        }
    }

    #[test]
    fn a_v1_block_migrated_to_v2_keeps_every_allocation_and_the_free_order() {
        let v1 = used_block();
        assert_eq!(v1.format, BlockFormat::V1);
        let v1_bytes = serde_json::to_vec(&v1).expect("encode").len();
        let v2 = v1.clone().in_format(BlockFormat::V2);
        let v2_bytes = serde_json::to_vec(&v2).expect("encode").len();
        let back = round_trip(&v2);
        assert_eq!(back.format, BlockFormat::V2);
        assert_eq!(
            IpamBlock {
                format: BlockFormat::V1,
                ..back
            },
            v1,
            "the same block in either format"
        );
        assert!(
            v2_bytes * 2 < v1_bytes,
            "V2 at most half of V1: {v2_bytes} vs {v1_bytes} bytes"
        );
        // Never back to an older format.
        assert_eq!(v2.in_format(BlockFormat::V1).format, BlockFormat::V2);
    }

    #[test]
    fn v3_leaves_out_the_blocks_own_node_and_keeps_another() {
        let mut v1 = used_block();
        for a in v1.allocations.iter_mut().flatten() {
            Arc::make_mut(a).attrs.insert("node".into(), "node1".into());
        }
        // A borrowed address: its node is not the block's.
        let last = v1.allocations.iter_mut().flatten().last().expect("one");
        Arc::make_mut(last)
            .attrs
            .insert("node".into(), "node2".into());
        let v2_bytes = serde_json::to_vec(&v1.clone().in_format(BlockFormat::V2))
            .expect("encode")
            .len();
        let v3 = v1.clone().in_format(BlockFormat::V3);
        let text = serde_json::to_string(&v3).expect("encode");
        assert_eq!(
            text.matches("node1").count(),
            1,
            "only as the affinity: {text}"
        );
        assert_eq!(text.matches("node2").count(), 1, "{text}");
        let back = round_trip(&v3);
        assert_eq!(back.format, BlockFormat::V3);
        assert_eq!(
            IpamBlock {
                format: BlockFormat::V1,
                ..back
            },
            v1
        );
        // `"node":"node1"` and its comma, for each of the 26 of the block's own node.
        assert!(
            text.len() + 26 * 15 <= v2_bytes,
            "V3 {} bytes, V2 {v2_bytes}",
            text.len()
        );
        assert_eq!(v3.in_format(BlockFormat::V2).format, BlockFormat::V3);
    }

    /// 58 pods as the CNI plugin records them: random container IDs, one namespace.
    fn block_of_pods() -> IpamBlock {
        let mut b = IpamBlock::new("10.244.1.0/26".parse().expect("cidr"), Some("node1".into()));
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..58 {
            let container: String = (0..4)
                .map(|_| {
                    // xorshift: as random as a runtime's IDs, to a compressor.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    format!("{state:016x}")
                })
                .collect();
            let mut a = attrs(&container, &format!("checkout-7d9f8c6b5-{i:05}"));
            a.insert("node".into(), "node1".into());
            b.assign(
                1,
                &format!("k8s-pod-network.{container}"),
                &a,
                1_000,
                0,
                |_| false,
            );
        }
        b
    }

    /// `value` (format `what`) is under `1 / parts` of the same block's `v3`.
    fn assert_under_part_of_v3(what: &str, value: &[u8], parts: usize, v3: &[u8]) {
        assert!(
            value.len() * parts < v3.len(),
            "{what} {} bytes, V3 {} bytes",
            value.len(),
            v3.len()
        );
    }

    #[test]
    fn v4_is_v3_compressed_and_under_a_third_of_its_size_for_a_block_of_pods() {
        let b = block_of_pods();
        let v3 = crate::codec::encode_block(&b.clone().in_format(BlockFormat::V3));
        let v4 = crate::codec::encode_block(&b.clone().in_format(BlockFormat::V4));
        assert_eq!(v3[0], b'{', "V3 is JSON");
        assert!(v4.starts_with(&crate::codec::ZSTD_MAGIC));
        assert_under_part_of_v3("V4", &v4, 3, &v3);
        let back = round_trip(&b.clone().in_format(BlockFormat::V4));
        assert_eq!(back.format, BlockFormat::V4);
        assert_eq!(
            IpamBlock {
                format: BlockFormat::V1,
                ..back.clone()
            },
            b
        );
        // Never back to an older format: rewritten, it stays compressed.
        assert_eq!(back.in_format(BlockFormat::V3).format, BlockFormat::V4);
    }

    #[test]
    fn v5_is_binary_under_half_of_v3_and_compressed_under_a_third() {
        let pods = block_of_pods();
        let v3 = crate::codec::encode_block(&pods.clone().in_format(BlockFormat::V3));
        let b = pods.in_format(BlockFormat::V5);
        let binary = encode_binary(&b).expect("encode");
        assert!(binary.starts_with(&[BINARY_MAGIC.as_slice(), &[5]].concat()));
        // Each container ID is 32 bytes, not 64 hex digits twice (handle and attribute);
        // `network`, `namespace` and their values are stored once.
        assert_under_part_of_v3("V5", &binary, 2, &v3);
        let stored = crate::codec::encode_block(&b);
        assert!(stored.starts_with(&crate::codec::ZSTD_MAGIC));
        assert_under_part_of_v3("V5 compressed", &stored, 3, &v3);
        let back = round_trip(&b);
        assert_eq!(back.format, BlockFormat::V5);
        assert_eq!(back, b);
        assert_eq!(back.in_format(BlockFormat::V4).format, BlockFormat::V5);
    }

    #[test]
    fn a_small_v5_block_stays_uncompressed() {
        let b = IpamBlock::new("10.244.1.0/26".parse().expect("cidr"), Some("node1".into()))
            .in_format(BlockFormat::V5);
        let bytes = crate::codec::encode_block(&b);
        assert!(bytes.starts_with(&[BINARY_MAGIC.as_slice(), &[5]].concat()));
        assert!(bytes.len() < 40, "{} bytes", bytes.len());
        assert_eq!(round_trip(&b), b);
    }

    #[test]
    fn a_v5_block_reads_as_json_for_readers_that_ask_for_json() {
        let b = used_block().in_format(BlockFormat::V5);
        let bytes = crate::codec::encode_block(&b);
        let json: serde_json::Value = crate::from_stored(&bytes).expect("JSON form");
        assert_eq!(json["v"], 5);
        assert_eq!(json["cidr"], "10.244.1.0/26");
        // `V3`'s shape: the CNI handles whole, their derived attributes left out.
        let entries = json["a"].as_array().expect("a");
        assert_eq!(entries.len(), b.in_use());
        // Ordinal 0 was released: the second entry is ordinal 2.
        assert_eq!(entries[1][0], 2);
        assert_eq!(entries[1][2], format!("k8s-pod-network.{:064x}", 2));
        assert_eq!(
            entries[1][4],
            serde_json::json!({"ifname": "eth0", "namespace": "default", "pod": "pod-2"})
        );
        // And that JSON, written back as a value, is the same V5 block.
        let again: IpamBlock = crate::from_stored(json.to_string().as_bytes()).expect("reads");
        assert_eq!(again, b);
    }

    #[test]
    fn a_damaged_v5_value_is_an_error_not_a_block() {
        // The binary form itself (large blocks are compressed over it; checksummed).
        let bytes = encode_binary(&used_block().in_format(BlockFormat::V5)).expect("encode");
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 4] {
            let e = crate::from_stored::<IpamBlock>(&bytes[..bytes.len() - cut]);
            assert!(e.is_err(), "{cut} bytes cut");
        }
        let longer = [bytes.as_slice(), b"x"].concat();
        let e = crate::from_stored::<IpamBlock>(&longer).expect_err("a byte too many");
        assert!(e.to_string().contains("1 bytes after its end"), "{e}");
        // An index outside the string table: the table, written last, emptied.
        let mut b = IpamBlock::new("10.244.1.0/30".parse().expect("cidr"), None);
        b.assign(1, "net.ab", &Attributes::new(), 1_000, 0, |_| false);
        let good = crate::codec::encode_block(&b.in_format(BlockFormat::V5));
        assert!(good.ends_with(&[1, 3, b'n', b'e', b't']), "{good:?}");
        let bad = [&good[..good.len() - 5], &[0]].concat();
        let e = crate::from_stored::<IpamBlock>(&bad).expect_err("no string 0");
        assert!(
            e.to_string().contains("string 0 named, of a table of 0"),
            "{e}"
        );
        let newer = [&BINARY_MAGIC[..], &[7], &bad[4..]].concat();
        let e = crate::from_stored::<IpamBlock>(&newer).expect_err("format 7");
        assert!(e.to_string().contains("version 7 is newer"), "{e}");
    }

    #[test]
    fn only_ids_that_hex_encode_back_to_themselves_are_stored_as_bytes() {
        let mut buf = [0u8; MAX_HEX_ID_BYTES];
        for (id, as_bytes) in [
            ("0a1b", Some(&[0x0a, 0x1b][..])),
            ("ff", Some(&[0xff][..])),
            ("0A1B", None),
            ("abc", None),
            ("", None),
            ("xyz1", None),
        ] {
            let got = lower_hex_bytes(id, &mut buf).map(|len| buf[..len].to_vec());
            assert_eq!(got.as_deref(), as_bytes, "{id}");
        }
        assert_eq!(
            lower_hex_bytes(&"ab".repeat(MAX_HEX_ID_BYTES), &mut buf),
            Some(MAX_HEX_ID_BYTES)
        );
        assert_eq!(
            lower_hex_bytes(&"ab".repeat(MAX_HEX_ID_BYTES + 1), &mut buf),
            None
        );
    }

    #[test]
    fn a_damaged_compressed_value_is_an_error_not_a_block() {
        for format in [BlockFormat::V4, BlockFormat::V5] {
            let bytes = crate::codec::encode_block(&used_block().in_format(format));
            assert!(bytes.starts_with(&crate::codec::ZSTD_MAGIC), "{format:?}");
            for cut in [4, bytes.len() / 2, bytes.len() - 10] {
                let e = crate::from_stored::<IpamBlock>(&bytes[..bytes.len() - cut]);
                assert!(e.is_err(), "{format:?}, {cut} bytes cut");
            }
            let mut flipped = bytes.clone();
            flipped[20] ^= 0xff;
            assert!(
                crate::from_stored::<IpamBlock>(&flipped).is_err_and(|e| !e.to_string().is_empty()),
                "{format:?}"
            );
        }
    }

    #[test]
    fn a_small_v4_block_stays_json_and_reads_back_as_v4() {
        let b = IpamBlock::new("10.244.1.0/26".parse().expect("cidr"), Some("node1".into()))
            .in_format(BlockFormat::V4);
        let bytes = crate::codec::encode_block(&b);
        assert!(bytes.len() < crate::codec::COMPRESS_FROM_BYTES);
        assert_eq!(
            String::from_utf8(bytes).expect("JSON"),
            r#"{"v":4,"cidr":"10.244.1.0/26","affinity":"node1","seq":0,"a":[],"f":[0,-64]}"#
        );
        assert_eq!(round_trip(&b).format, BlockFormat::V4);
    }

    #[test]
    fn an_empty_v2_block_is_small() {
        let b = IpamBlock::new("10.244.1.0/26".parse().expect("cidr"), Some("node1".into()))
            .in_format(BlockFormat::V2);
        let text = serde_json::to_string(&b).expect("encode");
        assert_eq!(
            text,
            r#"{"v":2,"cidr":"10.244.1.0/26","affinity":"node1","seq":0,"a":[],"f":[0,-64]}"#
        );
        assert_eq!(round_trip(&b), b);
    }

    #[test]
    fn a_newer_format_or_a_broken_v2_is_refused_not_misread() {
        for (text, says) in [
            (
                r#"{"v":7,"cidr":"10.244.1.0/30","affinity":null}"#,
                "version 7 is newer",
            ),
            (
                r#"{"v":3,"cidr":"10.244.1.0/30","affinity":null,"seq":0,"a":[[1,0,"h",2,{}]],"f":[]}"#,
                "a block without one",
            ),
            (
                r#"{"v":3,"cidr":"10.244.1.0/30","affinity":"n","seq":0,"a":[[1,0,"h",8,{}]],"f":[]}"#,
                "is not a format 3 entry",
            ),
            (
                r#"{"v":2,"cidr":"10.244.1.0/30","affinity":"n","seq":0,"a":[[1,0,"h",1,{}]],"f":[]}"#,
                "is not a format 2 entry",
            ),
            (
                r#"{"v":2,"cidr":"10.244.1.0/30","affinity":null,"seq":0,"a":[[4,0,"h",false,{}]],"f":[]}"#,
                "ordinal 4 outside",
            ),
            (
                r#"{"v":2,"cidr":"10.244.1.0/30","affinity":null,"seq":0,"a":[],"f":[0]}"#,
                "odd number",
            ),
            (
                r#"{"v":2,"cidr":"10.244.1.0/30","affinity":null,"seq":0,"a":[],"f":[2,-3]}"#,
                "free ordinal 4 outside",
            ),
            (
                r#"{"cidr":"10.244.1.0/30","affinity":null}"#,
                "missing field `allocations`",
            ),
            (
                r#"{"v":3,"cidr":"10.0.0.0/8","affinity":null,"seq":0,"a":[],"f":[]}"#,
                "a block of 16777216 addresses",
            ),
        ] {
            let e = serde_json::from_str::<IpamBlock>(text).expect_err(text);
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
    }

    proptest! {
        /// Any sequence of assignments and releases: every format decodes to the same block.
        #[test]
        fn every_format_holds_the_same_block(ops in proptest::collection::vec((any::<bool>(), 0u32..16, 0u8..4), 0..60)) {
            let mut b = IpamBlock::new("fd10:244::/124".parse().expect("cidr"), Some("n".into()));
            let mut now = 1_000u64;
            for (assign, ordinal, cni_handle) in ops {
                now += 7;
                if assign {
                    // Lower-case hex IDs are stored as bytes in V5; others as text.
                    let c = if ordinal % 3 == 0 { format!("{now:X}") } else { format!("{now:x}") };
                    // The CNI's handle and attributes, or another's; the block's node, or
                    // another (a borrowed address).
                    let (h, mut a) = if cni_handle & 1 != 0 {
                        (format!("net.{c}"), Attributes::from([("network".to_string(), "net".to_string()), ("containerID".to_string(), c.clone())]))
                    } else {
                        (format!("other-{c}"), Attributes::new())
                    };
                    let node = if cni_handle & 2 != 0 { "n" } else { "elsewhere" };
                    a.insert("node".to_string(), node.to_string());
                    b.assign(1, &h, &a, now, 0, |_| false);
                } else if let Some(addr) = b.addr(ordinal) {
                    let _ = b.release(addr, None, now);
                }
            }
            let v1 = round_trip(&b);
            let v2 = round_trip(&b.clone().in_format(BlockFormat::V2));
            let v3 = round_trip(&b.clone().in_format(BlockFormat::V3));
            let v4 = round_trip(&b.clone().in_format(BlockFormat::V4));
            let v5 = round_trip(&b.clone().in_format(BlockFormat::V5));
            prop_assert_eq!(v5.format, BlockFormat::V5);
            prop_assert_eq!(IpamBlock { format: BlockFormat::V1, ..v5 }, b.clone());
            prop_assert_eq!(&v1, &b);
            prop_assert_eq!(IpamBlock { format: BlockFormat::V1, ..v2 }, b.clone());
            prop_assert_eq!(IpamBlock { format: BlockFormat::V1, ..v3 }, b.clone());
            prop_assert_eq!(v4.format, BlockFormat::V4);
            prop_assert_eq!(IpamBlock { format: BlockFormat::V1, ..v4 }, b.clone());
            // V6's JSON form (a handoff file's): V3's with `"v": 6`. Its keys are tested
            // in `block_store`.
            let v6 = b.clone().in_format(BlockFormat::V6);
            let json: IpamBlock = serde_json::from_slice(&serde_json::to_vec(&v6).expect("json")).expect("decode");
            prop_assert_eq!(json.format, BlockFormat::V6);
            prop_assert_eq!(IpamBlock { format: BlockFormat::V1, ..json }, b);
        }
    }
}
