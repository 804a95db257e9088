//! The BGP message decoder on arbitrary bytes. The check is `tessera_routed::fuzzing::decode_roundtrip`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _accepted = tessera_routed::fuzzing::decode_roundtrip(data);
});
