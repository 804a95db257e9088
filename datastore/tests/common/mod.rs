//! What the datastore's integration tests share: resources applied as an operator applies
//! them, and the one-address request they all make.
#![allow(dead_code)]

use tessera_datastore::admin::{self, WriteMode};
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{AssignRequest, Kv, Owner};

/// One IPv4 address from pool `p` for `handle`.
pub fn request(handle: &str) -> AssignRequest {
    AssignRequest {
        owner: Owner {
            handle: handle.into(),
            ..Default::default()
        },
        num_v4: 1,
        pools: vec!["p".into()],
        ..Default::default()
    }
}

/// Applies the resources in `yaml` (pools, `IPAMConfiguration`, ...) as `tesseractl apply` does.
pub async fn apply<K: Kv>(kv: &K, yaml: &str) {
    let r = parse_resources(yaml).expect("yaml");
    admin::write(kv, &r, WriteMode::Apply, false)
        .await
        .expect("apply");
}
