//! Node liveness: a node holds an etcd lease with its liveness key attached. When the lease
//! lapses the key disappears and the node is *suspect*: it cannot reach etcd, or it is dead.
//! GC reclaims it only on further evidence ([`crate::gc::reclaim_node`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::codec::with_retry;
use crate::error::IpamError;
use crate::keys;
use crate::kv::{Kv, Op, Txn};

/// A held liveness lease, refreshed in the background at a third of its TTL. Dropping it
/// stops the refresh (the lease then lapses after its TTL); [`NodeLease::release`] ends it now.
pub struct NodeLease<K: Kv> {
    kv: K,
    lease: i64,
    keeper: JoinHandle<()>,
    renewed_ms: Arc<AtomicU64>,
}

impl<K: Kv> NodeLease<K> {
    /// Takes the lease and, in the same transaction, clears the node's suspect and
    /// decommission records: the node is here (any reclaim still running stops, since each of
    /// its transactions requires the liveness key absent and the verdict unchanged).
    pub async fn acquire(kv: K, node: &str, ttl: Duration) -> Result<Self, IpamError> {
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let lease = with_retry(|| kv.lease_grant(ttl_secs)).await?;
        let txn = Txn::new()
            .then(Op::Put {
                key: keys::liveness(node),
                value: b"{}".to_vec(),
                lease: Some(lease),
            })
            .then(Op::delete(keys::suspect(node)))
            .then(Op::delete(keys::decommission(node)));
        with_retry(|| kv.txn(txn.clone())).await?;
        let renewed_ms = Arc::new(AtomicU64::new(crate::now_ms()));
        let renewed = renewed_ms.clone();
        let k = kv.clone();
        let node_name = node.to_string();
        let keeper = tokio::spawn(async move {
            let period = Duration::from_secs((ttl_secs as u64 / 3).max(1));
            loop {
                tokio::time::sleep(period).await;
                match k.lease_keep_alive(lease).await {
                    Ok(ttl) if ttl > 0 => renewed.store(crate::now_ms(), Ordering::Relaxed),
                    Ok(_) => {
                        tracing::error!(node = %node_name, "liveness lease lost");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = %node_name, error = %e, "lease keep-alive failed")
                    }
                }
            }
        });
        Ok(NodeLease {
            kv,
            lease,
            keeper,
            renewed_ms,
        })
    }

    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// When the lease was last granted or renewed (ms since the epoch): a node that has not
    /// renewed it for a TTL is suspect in the cluster's eyes.
    pub fn renewed_ms(&self) -> u64 {
        self.renewed_ms.load(Ordering::Relaxed)
    }

    /// Ends the lease at once (the node shuts down cleanly).
    pub async fn release(self) -> Result<(), IpamError> {
        self.keeper.abort();
        with_retry(|| self.kv.lease_revoke(self.lease)).await?;
        Ok(())
    }
}

impl<K: Kv> Drop for NodeLease<K> {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

pub async fn is_alive<K: Kv>(kv: &K, node: &str) -> Result<bool, IpamError> {
    let key = keys::liveness(node);
    Ok(with_retry(|| kv.get(&key)).await?.is_some())
}
