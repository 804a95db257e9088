//! What one pod start and stop costs in datastore round trips, counted on the in-memory
//! store: the IPAM's share of a CNI ADD and DEL, and of the IPAM benchmark's pairs. Each
//! round trip to etcd is a network hop and, for a transaction, a disk commit; the counts
//! are the budget a change to the IPAM has to keep.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tessera_datastore::kv::{KeyValue, KvError, Txn, TxnOutcome};
use tessera_datastore::resources::apply_config;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{AssignRequest, Ipam, Kv, MemKv, Owner};

/// MemKv that counts the requests it serves, reads and transactions apart.
#[derive(Clone, Default)]
struct Counting {
    kv: MemKv,
    reads: Arc<AtomicUsize>,
    txns: Arc<AtomicUsize>,
}

impl Counting {
    fn take(&self) -> (usize, usize) {
        (
            self.reads.swap(0, Ordering::SeqCst),
            self.txns.swap(0, Ordering::SeqCst),
        )
    }
}

impl Kv for Counting {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.kv.get(key).await
    }
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.kv.get_prefix(prefix).await
    }
    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, i64)>, KvError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.kv.list_keys(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, KvError> {
        self.txns.fetch_add(1, Ordering::SeqCst);
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

const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: p }
spec: { cidr: 10.244.0.0/24, blockSize: 26 }
";

fn request(handle: &str) -> AssignRequest {
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

#[tokio::test]
async fn a_pair_on_a_node_with_its_block_costs_few_round_trips() {
    let kv = Counting::default();
    let r = parse_resources(POOL).expect("pool");
    apply_config(&kv, &r.pools, &r.reservations)
        .await
        .expect("apply");
    let ipam = Ipam::new(kv.clone(), "node1");
    // The first pair claims the block and warms the caches.
    ipam.auto_assign(&request("warm")).await.expect("assign");
    ipam.release_by_handle("warm").await.expect("release");
    kv.take();
    for i in 0..5 {
        ipam.auto_assign(&request(&format!("h{i}")))
            .await
            .expect("assign");
        let assign = kv.take();
        ipam.release_by_handle(&format!("h{i}"))
            .await
            .expect("release");
        let release = kv.take();
        eprintln!("pair {i}: assign {assign:?}, release {release:?} (reads, transactions)");
        // Block, handle and configuration come from the cache the last transaction left;
        // the transactions' guards say whether it was still right.
        assert_eq!(assign, (0, 1), "assignment: one transaction, no read");
        assert_eq!(release, (0, 1), "release: one transaction, no read");
    }
}

#[tokio::test]
async fn an_assignment_to_a_handle_that_exists_already_adds_to_it() {
    // The optimistic path assumes a handle it has not seen is new; one that exists (a second
    // Ipam, as another CNI invocation for the same pod would be) fails the guard once and
    // is then extended, not replaced.
    let kv = Counting::default();
    let r = parse_resources(POOL).expect("pool");
    apply_config(&kv, &r.pools, &r.reservations)
        .await
        .expect("apply");
    let first = Ipam::new(kv.clone(), "node1");
    let a = first.auto_assign(&request("shared")).await.expect("assign");
    let second = Ipam::new(kv.clone(), "node1");
    let b = second
        .auto_assign(&request("shared"))
        .await
        .expect("assign");
    assert_ne!(a[0].addr, b[0].addr);
    let mut held = Ipam::new(kv.clone(), "node1")
        .handle_addresses("shared")
        .await
        .expect("handle");
    held.sort();
    let mut want = vec![a[0].addr, b[0].addr];
    want.sort();
    assert_eq!(held, want, "the handle holds both addresses");
    let released = second.release_by_handle("shared").await.expect("release");
    assert_eq!(released.len(), 2);
}

#[tokio::test]
async fn after_the_read_ahead_a_pods_assignment_is_one_transaction() {
    // What a CNI ADD does: a new process (nothing cached) reads ahead concurrently, then
    // assigns. Everything the assignment needs (pools, labels, affinities, the block, the
    // pod's last addresses) comes from the read-ahead.
    let kv = Counting::default();
    let r = parse_resources(POOL).expect("pool");
    apply_config(&kv, &r.pools, &r.reservations)
        .await
        .expect("apply");
    Ipam::new(kv.clone(), "node1")
        .auto_assign(&request("earlier-pod"))
        .await
        .expect("the node's block");
    let cni = Ipam::new(kv.clone(), "node1");
    kv.take();
    cni.prefetch_for(Some(("default", "web-1")))
        .await
        .expect("read ahead");
    let (reads, txns) = kv.take();
    assert_eq!(txns, 0);
    assert!(reads <= 6, "read-ahead requests: {reads}");
    let mut req = request("k8s-pod-network.web-1");
    req.owner.workload = Some(tessera_datastore::model::WorkloadId {
        namespace: "default".into(),
        name: "web-1".into(),
        labels: Default::default(),
    });
    cni.auto_assign(&req).await.expect("assign");
    assert_eq!(
        kv.take(),
        (0, 1),
        "the assignment: one transaction, no read"
    );
}
