//! What one pod start and stop costs in datastore round trips, counted on the in-memory
//! store: the IPAM's share of a CNI ADD and DEL, and of the IPAM benchmark's pairs. Each
//! round trip to etcd is a network hop and, for a transaction, a disk commit; the counts
//! are the budget a change to the IPAM has to keep.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{request, Interpose, Interposed};
use tessera_datastore::kv::Txn;
use tessera_datastore::resources::apply_config;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{Ipam, Kv};

/// Counts the requests the store serves, reads and transactions apart.
#[derive(Clone, Default)]
struct Counts {
    reads: Arc<AtomicUsize>,
    txns: Arc<AtomicUsize>,
}

impl Interpose for Counts {
    fn before_read(&self) {
        self.reads.fetch_add(1, Ordering::SeqCst);
    }
    async fn before_txn(&self, _txn: &Txn) {
        self.txns.fetch_add(1, Ordering::SeqCst);
    }
}

/// MemKv that counts the requests it serves.
type Counting = Interposed<Counts>;

impl Counting {
    fn take(&self) -> (usize, usize) {
        (
            self.on.reads.swap(0, Ordering::SeqCst),
            self.on.txns.swap(0, Ordering::SeqCst),
        )
    }
}

const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: p }
spec: { cidr: 10.244.0.0/24, blockSize: 26 }
";

/// An in-memory store holding the test pool.
async fn store_with_pool() -> Counting {
    let kv = Counting::default();
    let r = parse_resources(POOL).expect("pool");
    apply_config(&kv, &r.pools, &r.reservations)
        .await
        .expect("apply");
    kv
}

#[tokio::test]
async fn a_pair_on_a_node_with_its_block_costs_few_round_trips() {
    let kv = store_with_pool().await;
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
    let kv = store_with_pool().await;
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
    let kv = store_with_pool().await;
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

/// What a CNI invocation does before its node's IPAM lock: read everything ahead.
async fn read_ahead(ipam: &Ipam<Counting>, handle: &str) {
    let store = tessera_datastore::handoff::store_id(ipam.kv())
        .await
        .expect("store id");
    ipam.set_store(store);
    ipam.held(handle).await.expect("handle");
    ipam.prefetch().await.expect("read ahead");
}

#[tokio::test]
async fn with_the_previous_holders_handoff_a_stale_read_ahead_costs_no_read_and_no_retry() {
    // Ten ADDs on one node read ahead together, then take the lock in turn: each one's
    // read of the block is stale by the time it holds the lock. The handoff of the holder
    // before brings it up to date without a round trip.
    let kv = store_with_pool().await;
    Ipam::new(kv.clone(), "node1")
        .auto_assign(&request("earlier-pod"))
        .await
        .expect("the node's block");
    let first = Ipam::new(kv.clone(), "node1");
    let second = Ipam::new(kv.clone(), "node1");
    read_ahead(&first, "pod-a").await;
    read_ahead(&second, "pod-b").await;
    kv.take();

    let a = first.auto_assign(&request("pod-a")).await.expect("assign");
    assert_eq!(kv.take(), (0, 1));
    second.adopt(first.handoff());
    let b = second.auto_assign(&request("pod-b")).await.expect("assign");
    assert_eq!(
        kv.take(),
        (0, 1),
        "one transaction: no read, no failed compare"
    );
    assert_ne!(a[0].addr, b[0].addr);

    // Without the handoff the stale read costs a failed transaction first.
    let third = Ipam::new(kv.clone(), "node1");
    read_ahead(&third, "pod-c").await;
    Ipam::new(kv.clone(), "node1")
        .auto_assign(&request("pod-d"))
        .await
        .expect("assign");
    kv.take();
    third.auto_assign(&request("pod-c")).await.expect("assign");
    assert_eq!(kv.take(), (0, 2), "the stale block fails the first compare");
}

#[tokio::test]
async fn a_handoff_tells_the_next_holder_what_was_deleted_and_claimed() {
    let kv = store_with_pool().await;
    // A repeated ADD read the pod's handle (present) while the DEL before it held the
    // lock and released it: after the handoff it sees the handle gone, without a read.
    let add = Ipam::new(kv.clone(), "node1");
    add.auto_assign(&request("pod-a")).await.expect("assign");
    let repeated = Ipam::new(kv.clone(), "node1");
    read_ahead(&repeated, "pod-a").await;
    assert_eq!(repeated.held("pod-a").await.expect("held").0.len(), 1);
    let del = Ipam::new(kv.clone(), "node1");
    read_ahead(&del, "pod-a").await;
    del.release_by_handle("pod-a").await.expect("release");
    kv.take();
    repeated.adopt(del.handoff());
    let (addresses, rev) = repeated.held("pod-a").await.expect("held");
    assert_eq!(
        (addresses.len(), rev),
        (0, 0),
        "released by the holder before"
    );
    assert_eq!(kv.take(), (0, 0));

    // On a fresh node, parallel ADDs all read "no affinities" ahead; the first claims a
    // block and the next, with its handoff, assigns from that block instead of claiming
    // one of its own.
    let fresh_a = Ipam::new(kv.clone(), "node2");
    let fresh_b = Ipam::new(kv.clone(), "node2");
    read_ahead(&fresh_a, "pod-x").await;
    read_ahead(&fresh_b, "pod-y").await;
    let x = fresh_a
        .auto_assign(&request("pod-x"))
        .await
        .expect("assign");
    fresh_b.adopt(fresh_a.handoff());
    kv.take();
    let y = fresh_b
        .auto_assign(&request("pod-y"))
        .await
        .expect("assign");
    assert_eq!(kv.take(), (0, 1), "no claim, no read");
    assert_eq!(x[0].block, y[0].block);

    // A handoff older than what was read is not taken: the later read stands.
    let old = fresh_b.handoff();
    Ipam::new(kv.clone(), "node2")
        .auto_assign(&request("pod-z"))
        .await
        .expect("assign");
    let late = Ipam::new(kv.clone(), "node2");
    read_ahead(&late, "pod-w").await;
    late.adopt(old);
    kv.take();
    late.auto_assign(&request("pod-w")).await.expect("assign");
    assert_eq!(kv.take(), (0, 1), "the later read, not the older handoff");

    // Another node's handoff is ignored.
    let other = Ipam::new(kv.clone(), "node1");
    read_ahead(&other, "pod-v").await;
    other.adopt(late.handoff());
    kv.take();
    other.auto_assign(&request("pod-v")).await.expect("assign");
    assert_eq!(kv.take(), (0, 1));
    assert_ne!(
        other.held("pod-v").await.expect("held").0,
        late.held("pod-w").await.expect("held").0
    );
}

fn assign_op(handle: &str) -> tessera_datastore::BatchedOp {
    tessera_datastore::BatchedOp::Assign {
        request: request(handle),
        previous: None,
    }
}

fn release_op(ipam: &Ipam<Counting>, handle: &str) -> tessera_datastore::BatchedOp {
    tessera_datastore::BatchedOp::Release {
        handle: handle.into(),
        as_read: ipam.known_handle(handle),
        also_delete: Vec::new(),
    }
}

#[tokio::test]
async fn a_batch_of_pod_starts_and_stops_is_one_transaction() {
    use tessera_datastore::BatchedOutcome;
    let kv = store_with_pool().await;
    // Two pods that are stopping, each read by its own invocation.
    let earlier = Ipam::new(kv.clone(), "node1");
    let old_a = earlier
        .auto_assign(&request("old-a"))
        .await
        .expect("assign");
    earlier
        .auto_assign(&request("old-b"))
        .await
        .expect("assign");
    let stopping = Ipam::new(kv.clone(), "node1");
    stopping.held("old-a").await.expect("read");
    stopping.held("old-b").await.expect("read");

    // The lock holder does three starts and the two stops.
    let holder = Ipam::new(kv.clone(), "node1");
    read_ahead(&holder, "new-a").await;
    kv.take();
    let ops = vec![
        assign_op("new-a"),
        release_op(&stopping, "old-a"),
        assign_op("new-b"),
        release_op(&stopping, "old-b"),
        assign_op("new-c"),
    ];
    let outcomes = holder.apply_batch(&ops).await.expect("batch");
    assert_eq!(kv.take(), (0, 1), "no read, one transaction for five pods");
    let mut addresses = Vec::new();
    for o in &outcomes {
        match o {
            BatchedOutcome::Assigned { assignments, .. } => {
                addresses.extend(assignments.iter().map(|a| a.addr))
            }
            BatchedOutcome::Released { addresses } => assert_eq!(addresses.len(), 1),
            BatchedOutcome::Alone => panic!("left alone: {outcomes:?}"),
        }
    }
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 3, "three distinct addresses");
    // What the datastore holds, read by a client that saw none of it.
    let fresh = Ipam::new(kv.clone(), "node1");
    for h in ["new-a", "new-b", "new-c"] {
        assert_eq!(
            fresh.handle_addresses(h).await.expect("read").len(),
            1,
            "{h}"
        );
    }
    for h in ["old-a", "old-b"] {
        assert!(
            fresh.handle_addresses(h).await.expect("read").is_empty(),
            "{h}"
        );
    }
    assert!(!old_a.is_empty());
}

#[tokio::test]
async fn a_batched_returning_workload_gets_its_previous_address_back() {
    use tessera_datastore::model::WorkloadId;
    use tessera_datastore::BatchedOutcome;
    let kv = store_with_pool().await;
    let named = |handle: &str| {
        let mut req = request(handle);
        req.owner.workload = Some(WorkloadId {
            namespace: "default".into(),
            name: "db-0".into(),
            labels: Default::default(),
        });
        req
    };
    let first = Ipam::new(kv.clone(), "node1");
    first.auto_assign(&request("filler")).await.expect("assign");
    let before = first.auto_assign(&named("db-0.one")).await.expect("assign");
    first.release_by_handle("db-0.one").await.expect("release");
    // The pod's next invocation reads its previous addresses ahead and queues them.
    let next = Ipam::new(kv.clone(), "node1");
    next.prefetch_for(Some(("default", "db-0")))
        .await
        .expect("read");
    let previous = next.previous_addresses(named("x").owner.workload.as_ref().unwrap());
    assert_eq!(previous, Some(vec![before[0].addr]));
    let holder = Ipam::new(kv.clone(), "node1");
    read_ahead(&holder, "other").await;
    let out = holder
        .apply_batch(&[
            assign_op("other"),
            tessera_datastore::BatchedOp::Assign {
                request: named("db-0.two"),
                previous,
            },
        ])
        .await
        .expect("batch");
    let BatchedOutcome::Assigned { assignments, .. } = &out[1] else {
        panic!("{out:?}");
    };
    assert_eq!(assignments[0].addr, before[0].addr, "its previous address");
    let BatchedOutcome::Assigned { assignments, .. } = &out[0] else {
        panic!("{out:?}");
    };
    assert_ne!(assignments[0].addr, before[0].addr);
}

#[tokio::test]
async fn a_batch_leaves_alone_what_it_cannot_do_plainly_and_everything_when_its_guard_fails() {
    use tessera_datastore::BatchedOutcome;
    let kv = store_with_pool().await;
    // A node without a block: an assignment would claim one, the ordinary path's work.
    let fresh_node = Ipam::new(kv.clone(), "node2");
    read_ahead(&fresh_node, "x").await;
    let out = fresh_node
        .apply_batch(&[assign_op("x")])
        .await
        .expect("batch");
    assert_eq!(out, vec![BatchedOutcome::Alone]);

    let holder = Ipam::new(kv.clone(), "node1");
    holder
        .auto_assign(&request("exists"))
        .await
        .expect("assign");
    // A release of a handle nobody read, and an assignment to a handle that exists.
    let out = holder
        .apply_batch(&[
            tessera_datastore::BatchedOp::Release {
                handle: "never-read".into(),
                as_read: None,
                also_delete: Vec::new(),
            },
            assign_op("exists"),
            assign_op("plain"),
        ])
        .await
        .expect("batch");
    assert_eq!(out[0], BatchedOutcome::Alone);
    assert_eq!(out[1], BatchedOutcome::Alone);
    assert!(matches!(out[2], BatchedOutcome::Assigned { .. }));

    // Another client writes the block after the holder read it: the batch's guard fails,
    // nothing is written, every operation is left to its own client.
    let stale = Ipam::new(kv.clone(), "node1");
    read_ahead(&stale, "late").await;
    Ipam::new(kv.clone(), "node1")
        .auto_assign(&request("meanwhile"))
        .await
        .expect("assign");
    let out = stale
        .apply_batch(&[assign_op("late"), assign_op("later")])
        .await
        .expect("batch");
    assert_eq!(out, vec![BatchedOutcome::Alone, BatchedOutcome::Alone]);
    let fresh = Ipam::new(kv.clone(), "node1");
    assert!(fresh
        .handle_addresses("late")
        .await
        .expect("read")
        .is_empty());
    // The ordinary path then does it.
    stale.auto_assign(&request("late")).await.expect("assign");
    assert_eq!(fresh.handle_addresses("late").await.expect("read").len(), 1);
}

#[tokio::test]
async fn with_a_handoff_read_before_the_lock_the_read_ahead_skips_pools_affinities_and_blocks() {
    let kv = store_with_pool().await;
    let holder = Ipam::new(kv.clone(), "node1");
    read_ahead(&holder, "pod-a").await;
    holder.auto_assign(&request("pod-a")).await.expect("assign");
    let handed = holder.handoff();
    assert!(handed.config.is_some(), "the pools travel with it");
    assert!(handed.affinities.as_ref().is_some_and(|a| a.read_ms > 0));

    let next = Ipam::new(kv.clone(), "node1");
    next.set_store(handed.store.expect("the store it was written in"));
    next.adopt(handed);
    kv.take();
    next.held("pod-b").await.expect("handle");
    next.prefetch().await.expect("read ahead");
    assert_eq!(
        kv.take(),
        (2, 0),
        "the node's labels and the pod's handle only"
    );
    next.auto_assign(&request("pod-b")).await.expect("assign");
    assert_eq!(kv.take(), (0, 1));
}

#[tokio::test]
async fn a_handoff_of_another_store_is_ignored() {
    // Two clusters with a node1 on one host (the test bed's): revisions of two stores do
    // not compare, and the handles and blocks of one mean nothing in the other.
    let (ours, theirs) = (store_with_pool().await, store_with_pool().await);
    let elsewhere = Ipam::new(theirs.clone(), "node1");
    read_ahead(&elsewhere, "pod-a").await;
    for i in 0..20 {
        // Their revisions run ahead of ours.
        elsewhere
            .auto_assign(&request(&format!("theirs-{i}")))
            .await
            .expect("assign");
    }
    elsewhere
        .auto_assign(&request("pod-a"))
        .await
        .expect("assign");
    Ipam::new(ours.clone(), "node1")
        .auto_assign(&request("earlier"))
        .await
        .expect("our node's block");
    let here = Ipam::new(ours.clone(), "node1");
    read_ahead(&here, "pod-a").await;
    here.adopt(elsewhere.handoff());
    assert_eq!(
        here.held("pod-a").await.expect("held"),
        (Vec::new(), 0),
        "not ours"
    );
    ours.take();
    here.auto_assign(&request("pod-a")).await.expect("assign");
    assert_eq!(ours.take(), (0, 1), "our own reads stand");
}

/// A CNI DEL's endpoint record goes with its release in the batch's one transaction; when
/// the release is left to its own client, so is the record.
#[tokio::test]
async fn a_batched_release_deletes_its_endpoint_record_in_the_same_transaction() {
    use tessera_datastore::kv::{Op, Txn};
    use tessera_datastore::{BatchedOp, BatchedOutcome};
    let kv = store_with_pool().await;
    let earlier = Ipam::new(kv.clone(), "node1");
    earlier
        .auto_assign(&request("old-a"))
        .await
        .expect("assign");
    for key in ["/t/endpoint-a", "/t/endpoint-b"] {
        kv.txn(Txn::new().then(Op::put(key, b"{}".to_vec())))
            .await
            .expect("endpoint");
    }
    let stopping = Ipam::new(kv.clone(), "node1");
    stopping.held("old-a").await.expect("read");
    let holder = Ipam::new(kv.clone(), "node1");
    read_ahead(&holder, "new-a").await;
    kv.take();
    let outcomes = holder
        .apply_batch(&[
            BatchedOp::Release {
                handle: "old-a".into(),
                as_read: stopping.known_handle("old-a"),
                also_delete: vec!["/t/endpoint-a".into()],
            },
            // Never read by its client: not released here, its record not deleted either.
            BatchedOp::Release {
                handle: "never-read".into(),
                as_read: None,
                also_delete: vec!["/t/endpoint-b".into()],
            },
        ])
        .await
        .expect("batch");
    assert!(
        matches!(outcomes[0], BatchedOutcome::Released { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], BatchedOutcome::Alone);
    assert_eq!(kv.take(), (0, 1), "one transaction");
    assert_eq!(kv.get("/t/endpoint-a").await.expect("read"), None);
    assert!(kv.get("/t/endpoint-b").await.expect("read").is_some());
}
