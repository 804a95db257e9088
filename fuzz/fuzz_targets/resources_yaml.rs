//! The resource YAML parser (pools, reservations, BGP, nodes). The check is `tessera_datastore::fuzzing::resources_yaml`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _accepted = tessera_datastore::fuzzing::resources_yaml(data);
});
