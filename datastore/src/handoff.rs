//! What one short-lived IPAM client leaves for the next on the same node.
//!
//! A CNI invocation is a process: it starts with an empty [`crate::Ipam`] cache and, while it
//! holds the node's IPAM lock, would read the node's affinities, its blocks and the pod's
//! handle before it can write. With ten pods starting at once those reads are most of the
//! time the lock is held, and every waiter pays for them. Instead each holder leaves what it
//! knows after its write ([`crate::Ipam::handoff`], kept by the caller beside the lock), and
//! the next holder merges it with what it read while it waited
//! ([`crate::Ipam::adopt`]): key by key, the newer by etcd revision wins. Its only round
//! trip under the lock is then its own transaction.
//!
//! A handoff is a guess like any cache: every write still compares the revisions it read,
//! so a stale, lost or foreign handoff costs a retry, never a wrong assignment.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::block::IpamBlock;
use crate::codec::{decode, encode, with_retry};
use crate::error::IpamError;
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::IpamHandle;
use crate::resources::Config;

/// Handles carried from one holder to the next: the pods being started and stopped right
/// now, not the node's history.
pub const HANDLES_CARRIED: usize = 64;

/// One node's IPAM state as the last lock holder knew it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handoff {
    /// The node it describes, in which store ([`store_id`]): a handoff of another node or
    /// another store is ignored.
    pub node: String,
    #[serde(default)]
    pub store: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinities: Option<Affinities>,
    /// This node's blocks, and blocks it deleted (as [`Known::value`] `None`).
    #[serde(default)]
    pub blocks: BTreeMap<IpNetwork, Known<IpamBlock>>,
    /// Recently written handles, and deleted ones.
    #[serde(default)]
    pub handles: BTreeMap<String, Known<IpamHandle>>,
    /// Pools and reservations: every write compares their epoch, so any age will do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Config>,
}

/// The node's confirmed affinities, as of a store revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Affinities {
    /// The revision of the read they came from, or of the last claim or release since.
    pub as_of: i64,
    /// When (ms since the epoch) some client last read them from etcd: how stale they can
    /// be as to affinities other clients added (the node agent's, `tesseractl`'s).
    #[serde(default)]
    pub read_ms: u64,
    pub blocks: BTreeSet<IpNetwork>,
}

/// One key's value at a revision: its mod revision, or for `None` (deleted) the revision of
/// the deletion. etcd revisions are global and only grow, so of two versions of a key the
/// one with the higher revision is the later state; "absent" from a read has no revision
/// (0) and loses to any version handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known<T> {
    pub rev: i64,
    pub value: Option<T>,
}

/// The random number that names this datastore, created by the first client that asks.
///
/// What a handoff says is in revisions of one store; a host can see several stores under one
/// node name (the test bed's clusters, built alike, have the same etcd cluster id; two
/// networks may use two datastores), and a handoff of one must never be taken in another.
pub async fn store_id<K: Kv>(kv: &K) -> Result<u64, IpamError> {
    if let Some(found) = with_retry(|| kv.get(keys::STORE_ID)).await? {
        return decode(&found);
    }
    let fresh = random_u64();
    let txn = Txn::new()
        .expect(keys::STORE_ID, 0)
        .then(Op::put(keys::STORE_ID, encode(&fresh)))
        .or_get(keys::STORE_ID);
    let out = with_retry(|| kv.txn(txn.clone())).await?;
    match out.gets.into_iter().next().flatten() {
        // Another client created it first.
        Some(theirs) if !out.succeeded => decode(&theirs),
        _ => Ok(fresh),
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std's hasher keys are random per process; the time and pid make it per call.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}
