//! What the fuzz targets check (`fuzz/`), as functions that panic on a broken invariant, so
//! that the committed corpora also run as ordinary tests (`tests/fuzz_corpus.rs`).

use crate::block::IpamBlock;
use crate::block_format::RECORD_MAGIC;
use crate::block_store::{block_from_parts, write_ops, BlockKey};
use crate::kv::Op;
use crate::yaml::parse_resources;

/// The resource YAML parser (pools, reservations, BGP settings, nodes) on arbitrary text:
/// never panics, and what it accepts, printed as `get -o yaml` prints it, parses back to
/// the same resources. Returns whether it accepted the text.
pub fn resources_yaml(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(r) = parse_resources(text) else {
        return false;
    };
    {
        let printed: Vec<String> = r
            .documents()
            .iter()
            .map(|d| serde_saphyr::to_string(d).expect("a document prints"))
            .collect();
        let again = parse_resources(&printed.join("---\n"))
            .unwrap_or_else(|e| panic!("printed resources parse back: {e}\n{printed:?}"));
        assert_eq!(r, again);
    }
    true
}

/// A stored IPAM block from arbitrary bytes (JSON in any format, a zstd frame, format V5's
/// binary form, format V6's own value followed by its records, each introduced by
/// [`RECORD_MAGIC`] and its ordinal as one byte): never panics, and what decodes, written
/// back in its format, decodes to the same block. Returns whether the bytes decoded.
pub fn stored_block(data: &[u8]) -> bool {
    let (own, records) = split_records(data);
    let records = records.iter().map(|(o, v)| (*o, v.as_slice()));
    let Ok(block) = block_from_parts(own, records) else {
        return false;
    };
    let mut own = Vec::new();
    let mut records = Vec::new();
    for op in write_ops(None, &block) {
        let Op::Put { key, value, .. } = op else {
            panic!("a new block's writes are puts")
        };
        match BlockKey::parse(&key) {
            Some(BlockKey::Block(_)) => own = value,
            Some(BlockKey::Record(_, ordinal)) => records.push((ordinal, value)),
            None => panic!("{key} is not a block's key"),
        }
    }
    let again = block_from_parts(&own, records.iter().map(|(o, v)| (*o, v.as_slice())))
        .unwrap_or_else(|e| panic!("a block written back reads: {e}\n{block:?}"));
    assert_eq!(again, block);
    true
}

/// `data` up to the first [`RECORD_MAGIC`], and after each one its ordinal (a byte) and
/// the record it begins.
fn split_records(data: &[u8]) -> (&[u8], Vec<(u32, Vec<u8>)>) {
    let starts: Vec<usize> = data
        .windows(RECORD_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == RECORD_MAGIC)
        .map(|(i, _)| i)
        .collect();
    let Some(&first) = starts.first() else {
        return (data, Vec::new());
    };
    let ends = starts.iter().skip(1).copied().chain([data.len()]);
    let records = starts
        .iter()
        .zip(ends)
        .filter_map(|(&start, end)| {
            let body = data.get(start + RECORD_MAGIC.len()..end)?;
            let (&ordinal, rest) = body.split_first()?;
            Some((u32::from(ordinal), [&RECORD_MAGIC[..], rest].concat()))
        })
        .collect();
    (&data[..first], records)
}

/// The fuzzer's input for block `block` in format V6: its own value, then each record
/// after [`RECORD_MAGIC`] and its ordinal (what [`stored_block`] reads).
pub fn v6_input(block: &IpamBlock) -> Vec<u8> {
    let mut own = Vec::new();
    let mut records = Vec::new();
    for op in write_ops(None, block) {
        if let Op::Put { key, value, .. } = op {
            match BlockKey::parse(&key) {
                Some(BlockKey::Record(_, ordinal)) => records.push((ordinal, value)),
                _ => own = value,
            }
        }
    }
    for (ordinal, value) in records {
        own.extend(RECORD_MAGIC);
        own.push(ordinal as u8);
        own.extend(&value[RECORD_MAGIC.len()..]);
    }
    own
}
