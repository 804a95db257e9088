//! A block keeps when its free addresses were released only while the pool's reuse delay
//! holds them back: past it, the time is dead weight written with every change (a kilobyte
//! for a /26 that has cycled through its addresses).

mod common;

use common::{apply, request};
use tessera_datastore::block::IpamBlock;
use tessera_datastore::{keys, Ipam, Kv, MemKv};

async fn store(pool_spec: &str) -> MemKv {
    let kv = MemKv::new();
    apply(
        &kv,
        &format!("apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: p }}\nspec: {pool_spec}\n"),
    )
    .await;
    // The compact format, whose free queue runs of ordinals with no release time shrink.
    apply(
        &kv,
        "apiVersion: tessera.dev/v1\nkind: IPAMConfiguration\nmetadata: { name: default }\nspec: { blockFormat: V3 }\n",
    )
    .await;
    kv
}

/// The stored block and the length of its value.
async fn stored(kv: &MemKv, cidr: &str) -> (IpamBlock, usize) {
    let v = kv
        .get(&keys::block(cidr.parse().expect("cidr")))
        .await
        .expect("get")
        .expect("the block is stored");
    (
        serde_json::from_slice(&v.value).expect("decode"),
        v.value.len(),
    )
}

#[tokio::test]
async fn without_a_reuse_delay_a_block_that_cycled_through_its_addresses_stores_no_release_times() {
    let kv = store("{ cidr: 10.244.0.0/24, blockSize: 26 }").await;
    let ipam = Ipam::new(kv.clone(), "n1");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..64 {
        let handle = format!("pod-{i}");
        let got = ipam.auto_assign(&request(&handle)).await.expect("assign");
        seen.insert(got[0].addr);
        ipam.release_by_handle(&handle).await.expect("release");
    }
    assert_eq!(seen.len(), 64, "every address of the block was used once");
    let (block, len) = stored(&kv, "10.244.0.0/26").await;
    assert_eq!(block.free.len(), 64);
    assert!(block.free.iter().all(|s| s.released_ms.is_none()));
    // The whole free queue is one run of ordinals in the order they will be handed out.
    assert!(len < 120, "{len} bytes");
}

#[tokio::test]
async fn within_the_reuse_delay_the_release_time_is_kept_and_holds_the_address_back() {
    let kv = store("{ cidr: 10.244.0.0/30, blockSize: 30, minReuseDelaySeconds: 3600 }").await;
    let ipam = Ipam::new(kv.clone(), "n1");
    let mut first = Vec::new();
    for i in 0..4 {
        let got = ipam
            .auto_assign(&request(&format!("pod-{i}")))
            .await
            .expect("assign");
        first.push(got[0].addr);
    }
    ipam.release_by_handle("pod-0").await.expect("release");
    // A second write to the block within the first one's delay.
    ipam.release_by_handle("pod-1").await.expect("release");
    let (block, _) = stored(&kv, "10.244.0.0/30").await;
    let times: Vec<_> = block
        .free
        .iter()
        .map(|s| (s.ordinal, s.released_ms.is_some()))
        .collect();
    assert_eq!(times, [(0, true), (1, true)], "{block:?}");
    // Both free addresses are in their delay: a new pod gets neither.
    let refused = ipam.auto_assign(&request("pod-4")).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        first[0],
        "10.244.0.0".parse::<std::net::IpAddr>().expect("ip")
    );
}
