//! What the fuzz targets check (`fuzz/`), as functions that panic on a broken invariant, so
//! that the committed corpora also run as ordinary tests (`tests/fuzz_corpus.rs`).

use crate::block::IpamBlock;
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
/// binary form): never panics, and what decodes, written back in its format, decodes to
/// the same block. Returns whether the bytes decoded.
pub fn stored_block(data: &[u8]) -> bool {
    let Ok(block) = crate::from_stored::<IpamBlock>(data) else {
        return false;
    };
    let again: IpamBlock = crate::from_stored(&crate::encode_block(&block))
        .unwrap_or_else(|e| panic!("a block written back reads: {e}\n{block:?}"));
    assert_eq!(again, block);
    true
}
