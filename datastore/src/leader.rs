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
    // Followers ask on every pass. A lease granted and revoked per ask is two durable etcd
    // writes for nothing: 64 agents made ~130 a second, and etcd, not the agents, became what
    // limited a 5,000-pod cluster. A held key is seen with one read.
    if kv.get(key).await.ok()?.is_some() {
        return None;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    #[tokio::test]
    async fn one_leader_and_followers_ask_without_a_lease_of_their_own() {
        let kv = MemKv::new();
        let leader = try_lead(&kv, "/lead", "a", 10).await.expect("a leads");
        assert!(keep(&kv, &leader).await);
        for _ in 0..5 {
            assert_eq!(try_lead(&kv, "/lead", "b", 10).await, None);
        }
        let holder = kv.get("/lead").await.expect("get").expect("key");
        assert_eq!(
            (holder.value.as_slice(), holder.lease),
            (&b"a"[..], leader.lease)
        );
        // The next lease is the one after the leader's: the five asks granted none.
        assert_eq!(kv.lease_grant(10).await.expect("grant"), leader.lease + 1);

        // The leader's lease gone, the key goes with it and the next ask leads.
        kv.lease_revoke(leader.lease).await.expect("revoke");
        let next = try_lead(&kv, "/lead", "b", 10).await.expect("b leads");
        assert_ne!(next.key_rev, leader.key_rev);
    }
}
