//! IPAM behaviour against a real etcd (Debian's etcd-server on loopback, one per test).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use tessera_datastore::gc::{gc, mark_suspect, reclaim_node, GcOptions, ReclaimGuard, Verdict};
use tessera_datastore::keys;
use tessera_datastore::kv::{Op, Txn};
use tessera_datastore::liveness::{is_alive, NodeLease};
use tessera_datastore::model::{AffinityState, BlockAffinity, Node, WorkloadId};
use tessera_datastore::resources::{apply_config, delete_node, put_node};
use tessera_datastore::snapshot::assert_invariants;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{
    AssignRequest, EtcdKv, Family, Ipam, IpamError, Kv, Owner, ReleaseOutcome,
};
use tessera_testbed::Etcd;

struct Cluster {
    etcd: Etcd,
    kv: EtcdKv,
}

async fn cluster(yaml: &str, nodes: &[(&str, &[(&str, &str)])]) -> Cluster {
    let etcd = Etcd::start_loopback().expect("etcd");
    let kv = EtcdKv::connect(&[etcd.endpoint().to_string()], Duration::from_secs(2))
        .await
        .expect("connect");
    let r = parse_resources(yaml).expect("yaml");
    apply_config(&kv, &r.pools, &r.reservations)
        .await
        .expect("apply");
    for (name, labels) in nodes {
        let node = Node {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        put_node(&kv, &node).await.expect("node");
    }
    Cluster { etcd, kv }
}

fn pool(name: &str, spec: &str) -> String {
    format!("---\napiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: {name} }}\nspec: {spec}\n")
}

fn v4(handle: &str) -> AssignRequest {
    AssignRequest {
        owner: Owner {
            handle: handle.into(),
            ..Default::default()
        },
        num_v4: 1,
        ..Default::default()
    }
}

fn for_workload(handle: &str, ns: &str, name: &str, labels: &[(&str, &str)]) -> AssignRequest {
    let mut r = v4(handle);
    r.owner.workload = Some(WorkloadId {
        namespace: ns.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    });
    r
}

async fn one(ipam: &Ipam<EtcdKv>, req: &AssignRequest) -> IpAddr {
    let got = ipam.auto_assign(req).await.expect("assign");
    assert_eq!(got.len(), 1);
    got[0].addr
}

#[tokio::test]
async fn exhaustion_returns_a_typed_error_naming_the_pool() {
    let c = cluster(
        &pool("tiny", "{ cidr: 10.244.9.0/28, blockSize: 30 }"),
        &[("n1", &[])],
    )
    .await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let mut got = HashSet::new();
    for i in 0..16 {
        assert!(got.insert(one(&ipam, &v4(&format!("h{i}"))).await));
    }
    match ipam.auto_assign(&v4("h16")).await {
        Err(IpamError::Exhausted { pools, family, .. }) => {
            assert_eq!(pools, vec!["tiny".to_string()]);
            assert_eq!(family, Family::V4);
        }
        other => panic!("expected Exhausted, got {other:?}"),
    }
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn a_node_borrows_when_no_block_is_free_unless_affinity_is_strict() {
    let yaml = pool("loose", "{ cidr: 10.244.9.0/29, blockSize: 30 }")
        + &pool(
            "strict",
            "{ cidr: 10.244.10.0/29, blockSize: 30, strictAffinity: true }",
        );
    let c = cluster(&yaml, &[("n1", &[]), ("n2", &[])]).await;
    let n1 = Ipam::new(c.kv.clone(), "n1");
    let n2 = Ipam::new(c.kv.clone(), "n2");
    // n1 takes one address in each of both blocks of each pool (5 = 4 + 1).
    for pool in ["loose", "strict"] {
        for i in 0..5 {
            let mut r = v4(&format!("{pool}-n1-{i}"));
            r.pools = vec![pool.into()];
            n1.auto_assign(&r).await.expect("n1 assign");
        }
    }
    let mut r = v4("loose-n2");
    r.pools = vec!["loose".into()];
    let borrowed = n2.auto_assign(&r).await.expect("n2 borrows");
    let snap = assert_invariants(&c.kv, true).await;
    let block = &snap.blocks[&borrowed[0].block].value;
    assert_eq!(
        block.affinity.as_deref(),
        Some("n1"),
        "borrowed from n1's block"
    );
    assert_eq!(
        block
            .allocation(borrowed[0].addr)
            .map(|a| a.attrs["node"].as_str()),
        Some("n2")
    );

    let mut r = v4("strict-n2");
    r.pools = vec!["strict".into()];
    assert!(matches!(
        n2.auto_assign(&r).await,
        Err(IpamError::Exhausted { .. })
    ));
}

#[tokio::test]
async fn reservations_are_never_handed_out() {
    let yaml = pool("p", "{ cidr: 10.244.9.0/28, blockSize: 28 }")
        + "---\napiVersion: tessera.dev/v1\nkind: IPReservation\nmetadata: { name: r }\nspec: { reservedCidrs: [10.244.9.0/30, 10.244.9.9/32] }\n";
    let c = cluster(&yaml, &[("n1", &[])]).await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let mut got = Vec::new();
    loop {
        match ipam.auto_assign(&v4(&format!("h{}", got.len()))).await {
            Ok(a) => got.push(a[0].addr),
            Err(IpamError::Exhausted { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got.len(), 16 - 5);
    let reserved: IpAddr = "10.244.9.9".parse().expect("addr");
    assert!(!got.contains(&reserved));
    let owner = Owner {
        handle: "x".into(),
        ..Default::default()
    };
    assert!(matches!(
        ipam.assign_exact(&owner, reserved).await,
        Err(IpamError::AddressReserved { .. })
    ));
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn ipv6_and_dual_stack_allocation() {
    let yaml = pool("v4", "{ cidr: 10.244.0.0/24 }") + &pool("v6", "{ cidr: \"fd10:244::/120\" }");
    let c = cluster(&yaml, &[("n1", &[])]).await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let mut req = v4("dual");
    req.num_v6 = 1;
    let got = ipam.auto_assign(&req).await.expect("dual stack");
    assert_eq!(got.len(), 2);
    assert!(got[0].addr.is_ipv4() && got[1].addr.is_ipv6());
    assert_eq!(got[1].block.prefix(), 122);
    let only6 = AssignRequest {
        num_v4: 0,
        num_v6: 3,
        ..v4("six")
    };
    let got6 = ipam.auto_assign(&only6).await.expect("v6");
    assert!(got6.iter().all(|a| a.addr.is_ipv6()));
    assert_eq!(
        ipam.handle_addresses("dual").await.expect("handle").len(),
        2
    );
    assert_eq!(
        ipam.release_by_handle("dual").await.expect("release").len(),
        2
    );
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn dual_stack_is_all_or_nothing() {
    // IPv6 exhausted: the IPv4 address assigned first is rolled back.
    let yaml = pool("v4", "{ cidr: 10.244.0.0/24 }")
        + &pool("v6", "{ cidr: \"fd10:244::/126\", blockSize: 126 }");
    let c = cluster(&yaml, &[("n1", &[])]).await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let req = AssignRequest {
        num_v4: 1,
        num_v6: 5,
        ..v4("h")
    };
    assert!(matches!(
        ipam.auto_assign(&req).await,
        Err(IpamError::Exhausted {
            family: Family::V6,
            ..
        })
    ));
    let snap = assert_invariants(&c.kv, true).await;
    assert!(snap.allocations().is_empty(), "{:?}", snap.allocations());
}

#[tokio::test]
async fn a_returning_workload_gets_its_previous_address() {
    let c = cluster(
        &pool("p", "{ cidr: 10.244.0.0/24, blockSize: 28 }"),
        &[("n1", &[]), ("n2", &[])],
    )
    .await;
    let n1 = Ipam::new(c.kv.clone(), "n1");
    let n2 = Ipam::new(c.kv.clone(), "n2");
    let first = one(&n1, &for_workload("web-0-c1", "shop", "web-0", &[])).await;
    n1.release_by_handle("web-0-c1").await.expect("release");
    // Other pods come and go in between.
    for i in 0..5 {
        one(&n1, &v4(&format!("other-{i}"))).await;
    }
    // Rescheduled on another node, new container: same address.
    let again = one(&n2, &for_workload("web-0-c2", "shop", "web-0", &[])).await;
    assert_eq!(again, first);
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn freed_addresses_are_reused_last_and_not_before_the_reuse_delay() {
    let c = cluster(
        &pool(
            "p",
            "{ cidr: 10.244.0.0/30, blockSize: 30, minReuseDelaySeconds: 1 }",
        ),
        &[("n1", &[])],
    )
    .await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let a = one(&ipam, &v4("a")).await;
    ipam.release_by_handle("a").await.expect("release");
    // The three never-used addresses come first.
    let next: Vec<IpAddr> = [
        one(&ipam, &v4("b")).await,
        one(&ipam, &v4("c")).await,
        one(&ipam, &v4("d")).await,
    ]
    .into();
    assert!(!next.contains(&a));
    // `a` is free but inside its reuse delay.
    assert!(matches!(
        ipam.auto_assign(&v4("e")).await,
        Err(IpamError::Exhausted { .. })
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(one(&ipam, &v4("e")).await, a);
}

#[tokio::test]
async fn a_stale_release_frees_nothing() {
    let c = cluster(&pool("p", "{ cidr: 10.244.0.0/24 }"), &[("n1", &[])]).await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let owner = Owner {
        handle: "old".into(),
        ..Default::default()
    };
    let addr: IpAddr = "10.244.0.7".parse().expect("addr");
    let old = ipam.assign_exact(&owner, addr).await.expect("exact");
    ipam.release_by_handle("old").await.expect("release");
    let owner2 = Owner {
        handle: "new".into(),
        ..Default::default()
    };
    let new = ipam.assign_exact(&owner2, addr).await.expect("exact again");
    assert_ne!(old.seq, new.seq);
    // A delayed release of the old allocation (e.g. a late CNI DEL) must not free it.
    let out = ipam
        .release_addresses(&[(addr, Some(old.seq))])
        .await
        .expect("release");
    assert_eq!(out, vec![ReleaseOutcome::Stale { addr }]);
    assert_eq!(
        ipam.handle_addresses("new").await.expect("handle"),
        vec![addr]
    );
    let out = ipam
        .release_addresses(&[(addr, Some(new.seq))])
        .await
        .expect("release");
    assert_eq!(
        out,
        vec![ReleaseOutcome::Released {
            addr,
            handle: "new".into()
        }]
    );
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn exact_assignment_errors_are_typed() {
    let c = cluster(
        &pool("p", "{ cidr: 10.244.0.0/24 }"),
        &[("n1", &[]), ("n2", &[])],
    )
    .await;
    let n1 = Ipam::new(c.kv.clone(), "n1");
    let n2 = Ipam::new(c.kv.clone(), "n2");
    let owner = |h: &str| Owner {
        handle: h.into(),
        ..Default::default()
    };
    let addr: IpAddr = "10.244.0.200".parse().expect("addr");
    n1.assign_exact(&owner("a"), addr).await.expect("exact");
    match n2.assign_exact(&owner("b"), addr).await {
        Err(IpamError::AddressInUse { handle, .. }) => assert_eq!(handle, "a"),
        other => panic!("expected AddressInUse, got {other:?}"),
    }
    let outside: IpAddr = "10.99.0.1".parse().expect("addr");
    let e = n1.assign_exact(&owner("c"), outside).await.unwrap_err();
    assert!(matches!(e, IpamError::AddressNotInPool { .. }));
    assert!(e.to_string().contains("outside every IP pool"));
    assert!(matches!(
        n1.auto_assign(&v4("bad/handle")).await,
        Err(IpamError::InvalidHandle(_))
    ));
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn an_owner_selected_pool_serves_only_its_workload() {
    // The seed case: a service owns a fixed range of 10 addresses for its 10 pods.
    let yaml = pool("default", "{ cidr: 10.244.0.0/24 }")
        + &pool("db-range", "{ cidr: 10.244.50.0/28, blockSize: 28, ownerSelector: 'app == \"db\"' }")
        + "---\napiVersion: tessera.dev/v1\nkind: IPReservation\nmetadata: { name: db-spare }\nspec: { reservedCidrs: [10.244.50.10/31, 10.244.50.12/30] }\n";
    let c = cluster(&yaml, &[("n1", &[]), ("n2", &[])]).await;
    let nodes = [Ipam::new(c.kv.clone(), "n1"), Ipam::new(c.kv.clone(), "n2")];
    let range: ipnetwork::IpNetwork = "10.244.50.0/28".parse().expect("cidr");
    let mut db = HashSet::new();
    for i in 0..10 {
        let req = for_workload(
            &format!("db-{i}"),
            "prod",
            &format!("db-{i}"),
            &[("app", "db")],
        );
        let a = one(&nodes[i % 2], &req).await;
        assert!(range.contains(a), "{a} outside the db range");
        db.insert(a);
    }
    assert_eq!(db.len(), 10);
    let req = for_workload("db-10", "prod", "db-10", &[("app", "db")]);
    match nodes[0].auto_assign(&req).await {
        Err(IpamError::Exhausted { pools, .. }) => assert_eq!(pools, vec!["db-range".to_string()]),
        other => panic!("expected the db range exhausted, got {other:?}"),
    }
    let web = one(
        &nodes[1],
        &for_workload("web", "prod", "web", &[("app", "web")]),
    )
    .await;
    assert!(!range.contains(web));
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn node_selectors_decide_which_nodes_use_a_pool() {
    let yaml = pool(
        "zone-a",
        "{ cidr: 10.244.1.0/24, nodeSelector: 'zone == \"a\"' }",
    ) + &pool(
        "zone-b",
        "{ cidr: 10.244.2.0/24, nodeSelector: 'zone == \"b\"' }",
    );
    let c = cluster(
        &yaml,
        &[
            ("na", &[("zone", "a")]),
            ("nb", &[("zone", "b")]),
            ("nx", &[]),
        ],
    )
    .await;
    let a = one(&Ipam::new(c.kv.clone(), "na"), &v4("a")).await;
    let b = one(&Ipam::new(c.kv.clone(), "nb"), &v4("b")).await;
    assert!(a.to_string().starts_with("10.244.1."));
    assert!(b.to_string().starts_with("10.244.2."));
    assert!(matches!(
        Ipam::new(c.kv.clone(), "nx").auto_assign(&v4("x")).await,
        Err(IpamError::NoPool { .. })
    ));
}

#[tokio::test]
async fn release_is_idempotent_and_empty_spare_blocks_go_back_to_the_pool() {
    release_gives_spare_blocks_back(None).await;
}

/// In block format V6 a release leaves its addresses' records beside the block; the spare
/// block's delete (etcd's prefix delete) takes them with it.
#[tokio::test]
async fn an_empty_v6_block_goes_back_to_the_pool_with_every_record() {
    release_gives_spare_blocks_back(Some("V6")).await;
}

async fn release_gives_spare_blocks_back(format: Option<&str>) {
    let c = cluster(
        &pool("p", "{ cidr: 10.244.0.0/24, blockSize: 30 }"),
        &[("n1", &[])],
    )
    .await;
    if let Some(format) = format {
        let yaml = format!(
            "apiVersion: tessera.dev/v1\nkind: IPAMConfiguration\n\
             metadata: {{ name: default }}\nspec: {{ blockFormat: {format} }}\n"
        );
        let r = parse_resources(&yaml).expect("yaml");
        tessera_datastore::admin::write(
            &c.kv,
            &r,
            tessera_datastore::admin::WriteMode::Apply,
            false,
        )
        .await
        .expect("format");
    }
    let ipam = Ipam::new(c.kv.clone(), "n1");
    let mut req = v4("many");
    req.num_v4 = 6; // two blocks of 4
    ipam.auto_assign(&req).await.expect("assign");
    assert_eq!(assert_invariants(&c.kv, true).await.blocks.len(), 2);
    let (stored, _) = c.kv.get_prefix(keys::BLOCKS).await.expect("keys");
    let records = if format.is_some() { 6 } else { 0 };
    assert_eq!(stored.len(), 2 + records);
    assert_eq!(
        ipam.release_by_handle("many").await.expect("release").len(),
        6
    );
    assert!(ipam
        .release_by_handle("many")
        .await
        .expect("again")
        .is_empty());
    // One block stays with the node for its next pod; the spare one is released.
    let snap = assert_invariants(&c.kv, true).await;
    assert_eq!(snap.blocks.len(), 1);
    assert_eq!(snap.affinities.len(), 1);
    assert!(snap.handles.is_empty());
    // Nothing under the blocks but the block kept (and, in V6, its freed addresses' records).
    let kept = keys::block(*snap.blocks.keys().next().expect("one"));
    let (stored, _) = c.kv.get_prefix(keys::BLOCKS).await.expect("keys");
    let strays: Vec<&str> = stored
        .iter()
        .map(|k| k.key.as_str())
        .filter(|k| *k != kept && !k.starts_with(&format!("{kept}/")))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
    assert!(
        stored.len() > 1 || format.is_none(),
        "the kept block's records stay"
    );
}

#[tokio::test]
async fn operations_survive_an_etcd_restart() {
    let c = cluster(
        &pool("p", "{ cidr: 10.244.0.0/22, blockSize: 28 }"),
        &[("n1", &[])],
    )
    .await;
    let ipam = std::sync::Arc::new(Ipam::new(c.kv.clone(), "n1"));
    let worker = {
        let ipam = ipam.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for i in 0..300 {
                let h = format!("h{i}");
                let r = ipam.auto_assign(&v4(&h)).await;
                match r {
                    Ok(a) => held.push((h, a[0].addr)),
                    Err(e) => return Err(format!("assign {i}: {e}")),
                }
                if i % 3 == 0 {
                    let (h, _) = held.remove(0);
                    ipam.release_by_handle(&h)
                        .await
                        .map_err(|e| format!("release: {e}"))?;
                }
            }
            Ok::<_, String>(held)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Crash etcd mid-run and bring it back on the same data after a second.
    let Cluster { mut etcd, kv } = c;
    let etcd = tokio::task::spawn_blocking(move || {
        etcd.kill();
        std::thread::sleep(Duration::from_secs(1));
        etcd.restart().expect("restart etcd");
        etcd
    })
    .await
    .expect("join");
    let c = Cluster { etcd, kv };
    let held = worker
        .await
        .expect("join")
        .expect("operations retried through the restart");
    let snap = assert_invariants(&c.kv, true).await;
    let mut in_etcd: Vec<(IpAddr, String)> = snap.allocations();
    in_etcd.sort();
    let mut want: Vec<(IpAddr, String)> = held.into_iter().map(|(h, a)| (a, h)).collect();
    want.sort();
    assert_eq!(
        in_etcd, want,
        "etcd holds exactly what the client believes it holds"
    );
}

#[tokio::test]
async fn operations_fail_clearly_when_etcd_stays_down() {
    let mut c = cluster(&pool("p", "{ cidr: 10.244.0.0/24 }"), &[("n1", &[])]).await;
    let ipam = Ipam::new(c.kv.clone(), "n1");
    one(&ipam, &v4("before")).await;
    c.etcd.kill();
    let e = ipam.auto_assign(&v4("during")).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("datastore unavailable"), "{e}");
}

#[tokio::test]
async fn a_dead_nodes_allocations_are_reclaimed_and_a_live_nodes_are_not() {
    let c = cluster(
        &pool("p", "{ cidr: 10.244.0.0/24, blockSize: 28 }"),
        &[("dead", &[]), ("live", &[])],
    )
    .await;
    let dead_lease = NodeLease::acquire(c.kv.clone(), "dead", Duration::from_secs(2))
        .await
        .expect("lease");
    let live_lease = NodeLease::acquire(c.kv.clone(), "live", Duration::from_secs(2))
        .await
        .expect("lease");
    let dead = Ipam::new(c.kv.clone(), "dead");
    let live = Ipam::new(c.kv.clone(), "live");
    for i in 0..5 {
        one(&dead, &v4(&format!("dead-{i}"))).await;
        one(&live, &v4(&format!("live-{i}"))).await;
    }
    let unproven = ReclaimGuard {
        leader: None,
        verdict: Verdict::Dead { suspect_rev: 0 },
    };
    assert!(matches!(
        reclaim_node(&c.kv, "live", &unproven).await,
        Err(IpamError::NodeAlive { .. })
    ));
    assert_eq!(
        mark_suspect(&c.kv, "live", 1, None).await.expect("mark"),
        None,
        "a node holding its lease is not suspect"
    );
    // The dead node stops refreshing its lease (a crash); it lapses after its TTL.
    drop(dead_lease);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while is_alive(&c.kv, "dead").await.expect("read") {
        assert!(tokio::time::Instant::now() < deadline, "lease never lapsed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, suspect_rev) = mark_suspect(&c.kv, "dead", 1, None)
        .await
        .expect("mark")
        .expect("suspect");
    let guard = ReclaimGuard {
        leader: None,
        verdict: Verdict::Dead { suspect_rev },
    };
    let report = reclaim_node(&c.kv, "dead", &guard).await.expect("reclaim");
    assert_eq!(report.addresses_released, 5);
    assert_eq!(report.affinities_released, 1);
    let snap = assert_invariants(&c.kv, true).await;
    let holders: BTreeMap<String, usize> =
        snap.allocations()
            .into_iter()
            .fold(BTreeMap::new(), |mut m, (_, h)| {
                *m.entry(h.split('-').next().unwrap_or_default().to_string())
                    .or_default() += 1;
                m
            });
    assert_eq!(holders, BTreeMap::from([("live".to_string(), 5)]));
    assert!(snap.affinities.keys().all(|(n, _)| n == "live"));
    live_lease.release().await.expect("release lease");
}

#[tokio::test]
async fn gc_repairs_interrupted_claims_and_blocks_of_deleted_nodes() {
    let c = cluster(
        &pool("p", "{ cidr: 10.244.0.0/24, blockSize: 28 }"),
        &[("n1", &[]), ("n2", &[])],
    )
    .await;
    // n1 crashed after phase 1 of a claim: a pending affinity with no block.
    let stuck: ipnetwork::IpNetwork = "10.244.0.32/28".parse().expect("cidr");
    let aff = BlockAffinity {
        node: "n1".into(),
        cidr: stuck,
        state: AffinityState::Pending,
        since_ms: tessera_datastore::now_ms(),
    };
    let put = Txn::new().then(Op::put(
        keys::affinity("n1", stuck),
        serde_json::to_vec(&aff).expect("json"),
    ));
    c.kv.txn(put).await.expect("inject");
    // n2 has a pod, then its Node record is deleted (node removed from the cluster).
    let n2 = Ipam::new(c.kv.clone(), "n2");
    one(&n2, &v4("pod-on-n2")).await;
    let mut spare = v4("spare");
    spare.num_v4 = 20; // a second, then third block
    n2.auto_assign(&spare).await.expect("assign");
    n2.release_by_handle("spare").await.expect("release");
    delete_node(&c.kv, "n2").await.expect("delete node");
    // A young pending affinity is left alone (it may be a claim in progress); the deleted
    // node's block (which still holds its pod's address) loses its affinity.
    let r = gc(&c.kv, &GcOptions::default()).await.expect("gc");
    assert_eq!((r.pending_removed, r.blocks_orphaned), (0, 1), "{r:?}");
    // Past the grace period the pending affinity goes.
    let opts = GcOptions {
        pending_grace: Duration::ZERO,
        ..Default::default()
    };
    let r = gc(&c.kv, &opts).await.expect("gc");
    assert_eq!(r.pending_removed, 1, "{r:?}");
    let snap = assert_invariants(&c.kv, true).await;
    assert!(snap.affinities.is_empty(), "{:?}", snap.affinities.keys());
    assert!(snap.blocks.values().all(|b| b.value.affinity.is_none()));
    // The pod's address is kept: only its workload's deletion frees it.
    assert_eq!(snap.allocations().len(), 1);
    // A second pass finds nothing to do.
    assert_eq!(gc(&c.kv, &opts).await.expect("gc").repairs(), 0);
    // n1 can claim the block whose claim was interrupted.
    let n1 = Ipam::new(c.kv.clone(), "n1");
    let pool = n1.config().await.expect("config").pools[0].clone();
    assert!(n1.claim_block(&pool, stuck).await.expect("claim"));
    assert_invariants(&c.kv, true).await;
}

#[tokio::test]
async fn a_prefix_larger_than_one_grpc_message_is_read_whole_at_one_revision() {
    // 300 values of 30 KB: 9 MB, more than twice what one gRPC response may carry (4 MiB),
    // as 2,500 blocks did. Written in batches, then a key outside the prefix after it.
    let c = cluster("", &[]).await;
    let value = vec![b'x'; 30_000];
    for batch in 0..30 {
        let mut txn = Txn::new();
        for i in 0..10 {
            let n = batch * 10 + i;
            txn = txn.then(Op::put(format!("/big/{n:04}"), value.clone()));
        }
        c.kv.txn(txn).await.expect("put");
    }
    c.kv.txn(Txn::new().then(Op::put("/bigger", b"not in /big/".to_vec())))
        .await
        .expect("put");
    let (kvs, rev) = c.kv.get_prefix("/big/").await.expect("read in pages");
    assert_eq!(kvs.len(), 300);
    let keys: Vec<String> = kvs.iter().map(|k| k.key.clone()).collect();
    let want: Vec<String> = (0..300).map(|n| format!("/big/{n:04}")).collect();
    assert_eq!(keys, want, "every key once, in order");
    assert!(kvs.iter().all(|k| k.value.len() == 30_000));
    assert!(kvs.iter().all(|k| k.mod_revision <= rev));
    let listed = c.kv.list_keys("/big/").await.expect("keys");
    assert_eq!(listed.len(), 300);
    drop(c.etcd);
}

/// Reads made together (a `join!`) go to etcd as one request and each gets its own key's
/// value at one revision; a read that was alone is a plain one.
#[tokio::test]
async fn reads_made_together_are_one_request() {
    let c = cluster(&pool("a", "{ cidr: 10.244.0.0/24 }"), &[]).await;
    for (k, v) in [("/t/a", "1"), ("/t/b", "2"), ("/t/c", "3")] {
        c.kv.txn(Txn::new().then(Op::put(k, v.as_bytes().to_vec())))
            .await
            .expect("put");
    }
    let before = c.kv.requests_sent();
    let (a, b, missing, c2) = tokio::join!(
        c.kv.get("/t/a"),
        c.kv.get("/t/b"),
        c.kv.get("/t/none"),
        c.kv.get("/t/c")
    );
    assert_eq!(c.kv.requests_sent() - before, 1, "four reads, one request");
    let value = |r: Result<Option<tessera_datastore::kv::KeyValue>, _>| {
        r.expect("read")
            .map(|kv| String::from_utf8(kv.value).expect("utf-8"))
    };
    assert_eq!(value(a).as_deref(), Some("1"));
    assert_eq!(value(b).as_deref(), Some("2"));
    assert_eq!(value(missing), None);
    assert_eq!(value(c2).as_deref(), Some("3"));

    let before = c.kv.requests_sent();
    assert_eq!(value(c.kv.get("/t/b").await).as_deref(), Some("2"));
    assert_eq!(c.kv.requests_sent() - before, 1);
}

/// A batch's first reader waits a scheduler turn before it sends the batch; dropped in that
/// turn (its caller gave up), the others it was to carry still get their answers.
#[tokio::test]
async fn readers_of_a_dropped_batch_leader_still_get_their_answer() {
    use std::future::Future;
    use std::task::Context;
    let c = cluster(&pool("a", "{ cidr: 10.244.0.0/24 }"), &[]).await;
    c.kv.txn(Txn::new().then(Op::put("/t/b", b"2".to_vec())))
        .await
        .expect("put");
    let mut leader = Box::pin(c.kv.get("/t/a"));
    let mut follower = Box::pin(c.kv.get("/t/b"));
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    assert!(
        leader.as_mut().poll(&mut cx).is_pending(),
        "the leader yields a turn"
    );
    assert!(
        follower.as_mut().poll(&mut cx).is_pending(),
        "the follower joins it"
    );
    drop(leader);
    let got = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the follower is not stranded")
        .expect("read");
    assert_eq!(got.map(|kv| kv.value), Some(b"2".to_vec()));
}
