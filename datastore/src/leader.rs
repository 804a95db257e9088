//! One holder at a time for a job (the agents' GC, the Kubernetes controllers): a key put on
//! an etcd lease only if absent. The holder keeps the lease alive; when it cannot, the key
//! goes with the lease and another takes over. Writes made as leader compare the key's
//! revision, so a deposed leader's writes fail.

use crate::kv::{Kv, Op, Txn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub lease: i64,
    /// The leader key's revision: what the leader's writes compare.
    pub key_rev: i64,
}

/// Takes `key` for `me` on a lease of `ttl_secs`, if nobody holds it.
pub async fn try_lead<K: Kv>(kv: &K, key: &str, me: &str, ttl_secs: u64) -> Option<Leadership> {
    let id = kv.lease_grant(ttl_secs.max(2) as i64).await.ok()?;
    let txn = Txn::new().expect(key, 0).then(Op::Put {
        key: key.into(),
        value: me.as_bytes().to_vec(),
        lease: Some(id),
    });
    match kv.txn(txn).await {
        Ok(o) if o.succeeded => Some(Leadership {
            lease: id,
            key_rev: o.revision,
        }),
        _ => {
            let _ = kv.lease_revoke(id).await;
            None
        }
    }
}

/// Renews the lease; false when it is gone (leadership lost).
pub async fn keep<K: Kv>(kv: &K, l: &Leadership) -> bool {
    matches!(kv.lease_keep_alive(l.lease).await, Ok(ttl) if ttl > 0)
}
