//! Crash injection: a [`Kv`] that kills its own process with SIGKILL right after the N-th
//! datastore call returns, i.e. after the call took effect and before its caller could act on
//! the answer. Every gap between two etcd calls is reachable by picking N.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tessera_datastore::kv::{KeyValue, Kv, KvError, Txn, TxnOutcome};

#[derive(Clone)]
pub struct CrashKv<K: Kv> {
    inner: K,
    calls: Arc<AtomicU64>,
    crash_after: Option<u64>,
}

impl<K: Kv> CrashKv<K> {
    pub fn new(inner: K, crash_after: Option<u64>) -> Self {
        CrashKv {
            inner,
            calls: Arc::new(AtomicU64::new(0)),
            crash_after,
        }
    }

    fn tick(&self) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if Some(n) == self.crash_after {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl<K: Kv> CrashKv<K> {
    async fn counted<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        let r = call.await;
        self.tick();
        r
    }
}

impl<K: Kv> Kv for CrashKv<K> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        self.counted(self.inner.get(key)).await
    }
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.counted(self.inner.get_prefix(prefix)).await
    }
    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, i64)>, KvError> {
        self.counted(self.inner.list_keys(prefix)).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, KvError> {
        self.counted(self.inner.txn(txn)).await
    }
    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, KvError> {
        self.counted(self.inner.lease_grant(ttl_secs)).await
    }
    async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
        self.counted(self.inner.lease_keep_alive(id)).await
    }
    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        self.counted(self.inner.lease_revoke(id)).await
    }
}
