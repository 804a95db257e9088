//! The sans-IO speaker core fed sequences of messages and session resets. The check is `tessera_routed::fuzzing::speaker_sequence`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _accepted = tessera_routed::fuzzing::speaker_sequence(data);
});
