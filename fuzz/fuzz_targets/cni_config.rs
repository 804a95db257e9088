//! The CNI network configuration parser (stdin). The check is `tessera_cni::fuzzing::netconf`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _accepted = tessera_cni::fuzzing::netconf(data);
});
