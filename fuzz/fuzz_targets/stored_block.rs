//! A stored IPAM block in any format. The check is `tessera_datastore::fuzzing::stored_block`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _decoded = tessera_datastore::fuzzing::stored_block(data);
});
