//! The move from the first block format to the compact one, as an operator makes it: a
//! cluster with blocks written in V1, then `IPAMConfiguration` set to V2. Blocks already
//! in etcd keep working and move to V2 when next written; new blocks start in V2; and a
//! value in a format newer than this Tessera knows is refused, not misread.

mod common;

use common::{apply, request};
use tessera_datastore::{keys, Ipam, IpamError, Kv, MemKv};

const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: p }
spec: { cidr: 10.244.0.0/24, blockSize: 26 }
";

const V2: &str = "
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: { name: default }
spec: { blockFormat: V2 }
";

/// The blocks in etcd: (the block's own key, format version: 1 when the value has none).
async fn stored_formats(kv: &MemKv) -> Vec<(String, u64)> {
    let (items, _) = kv.get_prefix(keys::BLOCKS).await.expect("blocks");
    tessera_datastore::block_store::blocks_from(&items)
        .expect("blocks")
        .into_iter()
        .map(|(b, _)| {
            let v = serde_json::to_value(&b).expect("json");
            (keys::block(b.cidr), v["v"].as_u64().unwrap_or(1))
        })
        .collect()
}

/// A store with pool `p` and, when `format` is given, an `IPAMConfiguration` naming it;
/// node1's client, and the address it assigned handle `a`.
async fn node1_assigned_a(
    format: Option<&str>,
) -> (MemKv, Ipam<MemKv>, Vec<tessera_datastore::Assignment>) {
    let kv = MemKv::new();
    apply(&kv, POOL).await;
    if let Some(f) = format {
        apply(&kv, f).await;
    }
    let n1 = Ipam::new(kv.clone(), "node1");
    let a = n1.auto_assign(&request("a")).await.expect("assign");
    (kv, n1, a)
}

/// A fresh client (nothing cached) releasing `handle` stops at its block, which it finds
/// corrupt for a reason that `says` so; nothing is written.
async fn release_is_refused_as_corrupt(kv: &MemKv, handle: &str, says: &str) {
    let fresh = Ipam::new(kv.clone(), "node1");
    match fresh.release_by_handle(handle).await {
        Err(IpamError::Corrupt { reason, .. }) => assert!(reason.contains(says), "{reason}"),
        other => panic!("a block refused for {says} read as {other:?}"),
    }
}

#[tokio::test]
async fn blocks_move_to_v2_when_the_cluster_says_so_and_nothing_is_lost() {
    let (kv, _, first) = node1_assigned_a(None).await;
    assert_eq!(stored_formats(&kv).await[0].1, 1, "V1 by default");

    apply(&kv, V2).await;
    // node1's next assignment sees the new configuration (the epoch moved) and writes its
    // block back in V2, with the earlier allocation in it.
    let n1 = Ipam::new(kv.clone(), "node1");
    let second = n1.auto_assign(&request("b")).await.expect("assign");
    assert_eq!(second[0].block, first[0].block);
    assert_eq!(
        stored_formats(&kv).await,
        vec![(keys::block(first[0].block), 2)]
    );
    // A node's new block starts in V2.
    Ipam::new(kv.clone(), "node2")
        .auto_assign(&request("c"))
        .await
        .expect("assign");
    assert!(stored_formats(&kv).await.iter().all(|(_, v)| *v == 2));
    // Every address is still held by its handle, and releases work on V2 blocks.
    for (h, want) in [("a", first[0].addr), ("b", second[0].addr)] {
        let got = n1.release_by_handle(h).await.expect("release");
        assert_eq!(got, vec![want], "handle {h}");
    }
}

#[tokio::test]
async fn a_block_in_a_newer_format_is_refused_with_its_version() {
    let (kv, _, got) = node1_assigned_a(None).await;
    let key = keys::block(got[0].block);
    let mut v: serde_json::Value =
        serde_json::from_slice(&kv.get(&key).await.expect("get").expect("block").value)
            .expect("json");
    v["v"] = 7.into();
    // A JSON value that says 7, and a binary one (V5's header) that says 7.
    for newer in [v.to_string().into_bytes(), b"\0TB\x07anything".to_vec()] {
        kv.txn(
            tessera_datastore::kv::Txn::new()
                .then(tessera_datastore::kv::Op::put(&key, newer.clone())),
        )
        .await
        .expect("put");
        release_is_refused_as_corrupt(&kv, "a", "version 7").await;
        // Untouched: the newer node's value is still there as it wrote it.
        let after = kv.get(&key).await.expect("get").expect("block").value;
        assert_eq!(after, newer);
    }
}

const V3: &str = "
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: { name: default }
spec: { blockFormat: V3 }
";

#[tokio::test]
async fn blocks_move_on_from_v2_to_v3_and_keep_their_nodes_attributes() {
    let (kv, _, first) = node1_assigned_a(Some(V2)).await;
    assert_eq!(stored_formats(&kv).await[0].1, 2);

    apply(&kv, V3).await;
    let n1 = Ipam::new(kv.clone(), "node1");
    let second = n1.auto_assign(&request("b")).await.expect("assign");
    assert_eq!(
        stored_formats(&kv).await,
        vec![(keys::block(first[0].block), 3)]
    );
    // The stored value names the node once (the affinity); read back, every allocation
    // has it again.
    let key = keys::block(first[0].block);
    let value = kv.get(&key).await.expect("get").expect("block").value;
    let text = String::from_utf8(value.clone()).expect("utf-8");
    assert_eq!(text.matches("node1").count(), 1, "{text}");
    let block: tessera_datastore::block::IpamBlock =
        serde_json::from_slice(&value).expect("decode");
    for addr in [first[0].addr, second[0].addr] {
        let a = block.allocation(addr).expect("allocated");
        assert_eq!(a.attrs.get("node").map(String::as_str), Some("node1"));
    }
    // Releases work on V3 blocks; and back to V2 in the configuration, a V3 block stays V3.
    apply(&kv, V2).await;
    let n1 = Ipam::new(kv.clone(), "node1");
    for (h, want) in [("a", first[0].addr), ("b", second[0].addr)] {
        assert_eq!(n1.release_by_handle(h).await.expect("release"), vec![want]);
    }
    assert_eq!(stored_formats(&kv).await[0].1, 3);
}

const V4: &str = "
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: { name: default }
spec: { blockFormat: V4 }
";

const V5: &str = "
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: { name: default }
spec: { blockFormat: V5 }
";

/// A cluster moves its blocks from one format to the next (`from` and `to` are
/// `IPAMConfiguration`s, `to_version` the `v` values in `to` say): node1's block of 42
/// allocations is rewritten in the new format when next written, with every allocation; a
/// snapshot (GC, tesseractl) reads them all; node2's new block starts in the new format;
/// releases work; and the blocks stay in it. Returns node1's block as stored before the
/// move and after.
async fn blocks_move_on(from: &str, to: &str, to_version: u64) -> (Vec<u8>, Vec<u8>) {
    let (kv, n1, first) = node1_assigned_a(Some(from)).await;
    // Pods enough that the block is worth compressing: CNI handles (hex container IDs).
    let pods: Vec<String> = (0..40)
        .map(|i| format!("k8s-pod-network.{i:064x}"))
        .collect();
    for p in &pods {
        n1.auto_assign(&request(p)).await.expect("assign");
    }
    let key = keys::block(first[0].block);
    let before = kv.get(&key).await.expect("get").expect("block").value;

    apply(&kv, to).await;
    let n1 = Ipam::new(kv.clone(), "node1");
    let second = n1.auto_assign(&request("b")).await.expect("assign");
    assert_eq!(second[0].block, first[0].block);
    let after = kv.get(&key).await.expect("get").expect("block").value;
    assert_eq!(stored_formats(&kv).await, vec![(key.clone(), to_version)]);
    let snap = tessera_datastore::snapshot::Snapshot::read(&kv)
        .await
        .expect("snapshot");
    let held = snap.allocations();
    assert_eq!(held.len(), 42);
    for (addr, h) in [(first[0].addr, "a"), (second[0].addr, "b")] {
        assert!(held.contains(&(addr, h.to_string())), "{addr} {h}");
    }
    for p in &pods {
        assert!(held.iter().any(|(_, h)| h == p), "{p}");
    }
    let c = Ipam::new(kv.clone(), "node2")
        .auto_assign(&request("c"))
        .await
        .expect("assign");
    assert!(stored_formats(&kv)
        .await
        .iter()
        .all(|(_, v)| *v == to_version));
    for (h, want) in [("a", first[0].addr), ("b", second[0].addr)] {
        assert_eq!(n1.release_by_handle(h).await.expect("release"), vec![want]);
    }
    for p in &pods {
        assert_eq!(n1.release_by_handle(p).await.expect("release").len(), 1);
    }
    let n2 = Ipam::new(kv.clone(), "node2");
    assert_eq!(
        n2.release_by_handle("c").await.expect("release"),
        vec![c[0].addr]
    );
    assert!(stored_formats(&kv)
        .await
        .iter()
        .all(|(_, v)| *v == to_version));
    (before, after)
}

#[tokio::test]
async fn blocks_move_on_from_v3_to_v4_compressed_and_every_reader_reads_them() {
    let (v3, v4) = blocks_move_on(V3, V4, 4).await;
    assert_eq!(v3[0], b'{', "V3 is plain JSON");
    assert!(v3.len() >= tessera_datastore::COMPRESS_FROM_BYTES);
    assert!(
        serde_json::from_slice::<serde_json::Value>(&v4).is_err(),
        "V4 is not JSON as stored"
    );
    assert!(
        v4.len() * 2 < v3.len(),
        "{} bytes, were {}",
        v4.len(),
        v3.len()
    );
}

#[tokio::test]
async fn blocks_move_on_from_v4_to_v5_binary_and_every_reader_reads_them() {
    let (v4, v5) = blocks_move_on(V4, V5, 5).await;
    assert!(
        serde_json::from_slice::<serde_json::Value>(&v4).is_err(),
        "V4 compressed"
    );
    // Compressed as V4 was (the binary form inside); 42 allocations, each its 32 bytes of
    // container ID and a few more, before compression.
    assert_eq!(&v5[..4], &v4[..4], "a zstd frame");
    assert!(v5.len() < 42 * 40, "{} bytes", v5.len());
}

const V6: &str = "
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: { name: default }
spec: { blockFormat: V6 }
";

/// The keys under the block `key`: its own and its records.
async fn block_keys(kv: &MemKv, key: &str) -> Vec<String> {
    let (items, _) = kv.get_prefix(key).await.expect("keys");
    items.into_iter().map(|i| i.key).collect()
}

/// The keys under the block `key` that the store's last write changed.
async fn written_last(kv: &MemKv, key: &str) -> Vec<String> {
    let (items, rev) = kv.get_prefix(key).await.expect("keys");
    items
        .into_iter()
        .filter(|i| i.mod_revision == rev)
        .map(|i| i.key)
        .collect()
}

#[tokio::test]
async fn blocks_move_on_from_v5_to_v6_with_each_allocation_under_its_own_key() {
    let (v5, v6) = blocks_move_on(V5, V6, 6).await;
    assert_eq!(&v5[..4], &tessera_datastore::ZSTD_MAGIC, "V5 compressed");
    // The block's own value after the move: 42 ordinals and sequence numbers, no handles.
    assert_eq!(&v6[..4], b"\0TB\x06");
    assert!(v6.len() < 42 * 4 + 40, "{} bytes", v6.len());
}

#[tokio::test]
async fn a_v6_assignment_writes_one_record_and_a_release_only_the_block() {
    let (kv, n1, a) = node1_assigned_a(Some(V6)).await;
    let key = keys::block(a[0].block);
    let ordinal = |addr: std::net::IpAddr| match (addr, a[0].block.network()) {
        (std::net::IpAddr::V4(x), std::net::IpAddr::V4(n)) => u32::from(x) - u32::from(n),
        _ => unreachable!("a v4 pool"),
    };
    let record = |addr| keys::block_record(a[0].block, ordinal(addr));
    assert_eq!(
        block_keys(&kv, &key).await,
        [key.clone(), record(a[0].addr)]
    );
    let pods: Vec<String> = (0..30)
        .map(|i| format!("k8s-pod-network.{i:064x}"))
        .collect();
    for p in &pods {
        n1.auto_assign(&request(p)).await.expect("assign");
    }
    let small = kv.get(&key).await.expect("get").expect("block").value.len();
    let rev_a = kv
        .get(&record(a[0].addr))
        .await
        .expect("get")
        .expect("record")
        .mod_revision;
    // One more pod: its record and the block's own key change, no other record.
    let b = n1.auto_assign(&request("b")).await.expect("assign");
    let changed = written_last(&kv, &key).await;
    assert_eq!(changed, [key.clone(), record(b[0].addr)]);
    assert_eq!(
        kv.get(&record(a[0].addr))
            .await
            .expect("get")
            .expect("record")
            .mod_revision,
        rev_a
    );
    assert!(
        small < 32 * 4 + 40,
        "the block's own value is {small} bytes"
    );
    // Released: only the block's own key is written. The record stays, passed over by
    // readers (the block says the ordinal is free), until the ordinal is assigned again.
    assert_eq!(
        n1.release_by_handle("b").await.expect("release"),
        vec![b[0].addr]
    );
    let changed = written_last(&kv, &key).await;
    assert_eq!(changed, std::slice::from_ref(&key));
    assert_eq!(block_keys(&kv, &key).await.len(), 1 + 1 + 1 + pods.len());
    // A fresh client (no cache) and a snapshot read the blocks back without b.
    let fresh = Ipam::new(kv.clone(), "node1");
    assert!(fresh.handle_addresses("b").await.expect("read").is_empty());
    assert_eq!(
        fresh.release_by_handle("a").await.expect("release"),
        vec![a[0].addr]
    );
    let snap = tessera_datastore::snapshot::Snapshot::read(&kv)
        .await
        .expect("snapshot");
    assert_eq!(snap.allocations().len(), pods.len());
    snap.check(true).expect("invariants hold");
    // Emptied and released (node1 has no Node record: GC gives its empty block back), the
    // block leaves no key behind, its records of free ordinals neither.
    for p in &pods {
        fresh.release_by_handle(p).await.expect("release");
    }
    let gc = tessera_datastore::gc::gc(&kv, &Default::default())
        .await
        .expect("gc");
    assert_eq!(gc.blocks_released, 1, "{gc:?}");
    assert_eq!(block_keys(&kv, &key).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_v6_record_missing_or_out_of_step_is_refused_not_read_as_free() {
    let (kv, n1, a) = node1_assigned_a(Some(V6)).await;
    n1.auto_assign(&request("b")).await.expect("assign");
    let key = keys::block(a[0].block);
    let (items, _) = kv.get_prefix(&key).await.expect("keys");
    let record = items
        .iter()
        .find(|i| i.key != key)
        .expect("a record")
        .clone();
    kv.txn(tessera_datastore::kv::Txn::new().then(tessera_datastore::kv::Op::delete(&record.key)))
        .await
        .expect("delete");
    release_is_refused_as_corrupt(&kv, "a", "has no record").await;
    let (items, _) = kv.get_prefix(keys::BLOCKS).await.expect("keys");
    assert!(tessera_datastore::block_store::blocks_from(&items).is_err());
}

/// A store with pool `p` over `cidr` in blocks of 256 addresses (room for more writes than
/// one transaction takes), blocks written in `format`.
async fn pool_of_24s(cidr: &str, format: &str) -> MemKv {
    let kv = MemKv::new();
    let pool = format!(
        "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: p }}\n\
         spec: {{ cidr: {cidr}, blockSize: 24 }}\n"
    );
    apply(&kv, &pool).await;
    apply(&kv, format).await;
    kv
}

#[tokio::test]
async fn a_v6_batch_stays_within_etcds_operations_per_transaction() {
    use tessera_datastore::BatchedOutcome;
    let kv = pool_of_24s("10.244.0.0/20", V6).await;
    let holder = Ipam::new(kv.clone(), "node1");
    holder.auto_assign(&request("first")).await.expect("assign");
    // 32 pods of 3 addresses each: a record per address, and a handle per pod, are 128
    // writes, more than etcd takes in one transaction (the in-memory store refuses them
    // as etcd does).
    let ops: Vec<_> = (0..32)
        .map(|i| tessera_datastore::BatchedOp::Assign {
            request: tessera_datastore::AssignRequest {
                num_v4: 3,
                ..request(&format!("pod-{i}"))
            },
            previous: None,
        })
        .collect();
    let outcomes = holder.apply_batch(&ops).await.expect("one transaction");
    let batched = outcomes
        .iter()
        .filter(|o| matches!(o, BatchedOutcome::Assigned { .. }))
        .count();
    assert!((20..32).contains(&batched), "{batched} in the batch");
    let fresh = Ipam::new(kv.clone(), "node1");
    for (i, o) in outcomes.iter().enumerate() {
        let held = fresh
            .handle_addresses(&format!("pod-{i}"))
            .await
            .expect("read");
        match o {
            BatchedOutcome::Assigned { .. } => assert_eq!(held.len(), 3, "pod-{i}"),
            BatchedOutcome::Alone => assert!(held.is_empty(), "pod-{i}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A request for more of a V6 block's addresses than one transaction carries (a record
/// each), on a V5 block whose move to V6 also writes its 90 records: it takes several
/// transactions; nothing is refused, and its release frees every address.
#[tokio::test]
async fn a_v6_request_larger_than_a_transaction_takes_several() {
    let kv = pool_of_24s("10.244.0.0/24", V5).await;
    let n1 = Ipam::new(kv.clone(), "node1");
    for i in 0..90 {
        n1.auto_assign(&request(&format!("pod-{i}")))
            .await
            .expect("assign");
    }
    apply(&kv, V6).await;
    let n1 = Ipam::new(kv.clone(), "node1");
    let big = tessera_datastore::AssignRequest {
        num_v4: 150,
        ..request("big")
    };
    let got = n1.auto_assign(&big).await.expect("150 in one request");
    assert_eq!(got.len(), 150);
    let block_key = keys::block(got[0].block);
    assert_eq!(stored_formats(&kv).await, [(block_key.clone(), 6)]);
    // The block's own key and a record per allocation.
    assert_eq!(block_keys(&kv, &block_key).await.len(), 1 + 240);
    let fresh = Ipam::new(kv.clone(), "node1");
    assert_eq!(
        fresh.handle_addresses("big").await.expect("read").len(),
        150
    );
    let freed = fresh.release_by_handle("big").await.expect("release");
    assert_eq!(freed.len(), 150);
    // The records of the freed ordinals stay; the block says they are free.
    assert_eq!(block_keys(&kv, &block_key).await.len(), 1 + 240);
    let snap = tessera_datastore::snapshot::Snapshot::read(&kv)
        .await
        .expect("snapshot");
    assert_eq!(snap.allocations().len(), 90);
    assert!(fresh
        .handle_addresses("big")
        .await
        .expect("read")
        .is_empty());
}
