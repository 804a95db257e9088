//! What the datastore's integration tests share: resources applied as an operator applies
//! them, the one-address request they all make, and an in-memory store a test can watch or
//! meddle with.
#![allow(dead_code)]

use std::future::Future;

use tessera_datastore::admin::{self, WriteMode};
use tessera_datastore::kv::{KeyValue, KvError, Txn, TxnOutcome};
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{AssignRequest, Kv, MemKv, Owner};

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

/// What a test does with each request before the in-memory store serves it.
pub trait Interpose: Clone + Send + Sync + 'static {
    fn before_read(&self) {}
    fn before_txn(&self, _txn: &Txn) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The in-memory store, with `on` seeing every read and transaction first.
#[derive(Clone, Default)]
pub struct Interposed<I> {
    pub kv: MemKv,
    pub on: I,
}

impl<I: Interpose> Kv for Interposed<I> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        self.on.before_read();
        self.kv.get(key).await
    }
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.on.before_read();
        self.kv.get_prefix(prefix).await
    }
    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, i64)>, KvError> {
        self.on.before_read();
        self.kv.list_keys(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, KvError> {
        self.on.before_txn(&txn).await;
        self.kv.txn(txn).await
    }
    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, KvError> {
        self.kv.lease_grant(ttl_secs).await
    }
    async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
        self.kv.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        self.kv.lease_revoke(id).await
    }
}
