//! The CNI environment parser with arbitrary CNI_ARGS. The check is `tessera_cni::fuzzing::cni_args`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _accepted = tessera_cni::fuzzing::cni_args(data);
});
