//! Which block an assignment comes from when nodes race for blocks: a node borrows from
//! another node's block only when its pool has no unclaimed block left, however many
//! claims it loses on the way, and it uses the blocks its other processes claimed first.

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{Interpose, Interposed};
use tessera_datastore::kv::{MemKv, Op, Txn};
use tessera_datastore::model::IpPool;
use tessera_datastore::snapshot::Snapshot;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{keys, Ipam, Kv};

/// Four blocks of 64 addresses.
const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: p }
spec: { cidr: 10.244.0.0/24, blockSize: 26 }
";

fn pool() -> IpPool {
    parse_resources(POOL).expect("pool").pools.remove(0)
}

/// Node `rival` wins the next `steals` blocks `node` tries to claim: when `node` writes its
/// pending affinity for a block, `rival` claims that block first.
#[derive(Clone)]
struct Rival {
    kv: MemKv,
    node: &'static str,
    rival: &'static str,
    steals: Arc<AtomicUsize>,
}

impl Interpose for Rival {
    async fn before_txn(&self, txn: &Txn) {
        // Only a fresh pending affinity: the put guarded by the key being absent.
        if txn.compares.len() != 1 {
            return;
        }
        let pool = pool();
        for op in &txn.success {
            let Op::Put { key, .. } = op else { continue };
            let claimed = (0..pool.block_count())
                .filter_map(|i| pool.nth_block(i))
                .find(|b| keys::affinity(self.node, *b) == *key);
            let Some(block) = claimed else { continue };
            let steal = self
                .steals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if steal {
                let rival = Ipam::new(self.kv.clone(), self.rival);
                assert!(rival.claim_block(&pool, block).await.expect("rival claim"));
            }
        }
    }
}

async fn rival_store(steals: usize) -> Interposed<Rival> {
    let kv = MemKv::default();
    common::apply(&kv, POOL).await;
    Interposed {
        kv: kv.clone(),
        on: Rival {
            kv,
            node: "node-a",
            rival: "node-b",
            steals: Arc::new(AtomicUsize::new(steals)),
        },
    }
}

/// The node the block holding `addr` is affine to.
async fn owner_of_block<K: Kv>(kv: &K, addr: IpAddr) -> Option<String> {
    let snap = Snapshot::read(kv).await.expect("snapshot");
    let block = snap
        .blocks
        .values()
        .find(|b| b.value.cidr.contains(addr))
        .expect("a block holds the address");
    block.value.affinity.clone()
}

async fn assign_one<K: Kv>(ipam: &Ipam<K>, handle: &str) -> IpAddr {
    let got = ipam
        .auto_assign(&common::request(handle))
        .await
        .expect("assign");
    assert_eq!(got.len(), 1);
    got[0].addr
}

#[tokio::test]
async fn a_node_that_loses_every_claim_in_its_first_search_searches_again() {
    for steals in 1..=3 {
        let kv = rival_store(steals).await;
        let addr = assign_one(&Ipam::new(kv.clone(), "node-a"), "h").await;
        assert_eq!(
            owner_of_block(&kv, addr).await.as_deref(),
            Some("node-a"),
            "{steals} blocks lost to node-b, one left: node-a claims it instead of borrowing"
        );
        assert_eq!(kv.on.steals.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn a_node_borrows_only_when_every_block_is_claimed() {
    let kv = rival_store(4).await;
    let addr = assign_one(&Ipam::new(kv.clone(), "node-a"), "h").await;
    assert_eq!(owner_of_block(&kv, addr).await.as_deref(), Some("node-b"));
}

#[tokio::test]
async fn a_node_uses_the_blocks_its_other_processes_claimed_before_borrowing() {
    let kv = MemKv::default();
    common::apply(&kv, POOL).await;
    let node_b = Ipam::new(kv.clone(), "node-b");
    assign_one(&node_b, "b").await;
    // Two processes of node-a (two CNI plugin runs: two caches).
    let first = Ipam::new(kv.clone(), "node-a");
    let second = Ipam::new(kv.clone(), "node-a");
    for i in 0..64 {
        assign_one(&first, &format!("first-{i}")).await;
    }
    // The second process reads node-a's affinities (one full block) ...
    for i in 0..64 {
        assign_one(&second, &format!("second-{i}")).await;
    }
    // ... then the first claims the pool's last block and takes one address of it.
    let last = assign_one(&first, "first-64").await;
    assert_eq!(owner_of_block(&kv, last).await.as_deref(), Some("node-a"));
    // The second process finds no unclaimed block; node-a's last block has 63 free.
    let addr = assign_one(&second, "second-64").await;
    assert_eq!(
        owner_of_block(&kv, addr).await.as_deref(),
        Some("node-a"),
        "{addr} was borrowed from node-b while node-a's own block had room"
    );
}
