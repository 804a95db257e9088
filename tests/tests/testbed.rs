//! The test bed itself: namespaces wired through a router, etcd reachable from the nodes,
//! and nothing left behind, also when a test panics.

use tessera_testbed::{assert_nothing_left, Lab, LabSpec};

#[test]
fn nodes_on_two_subnets_reach_each_other_and_etcd() {
    let lab = Lab::new(
        "nodes_on_two_subnets",
        LabSpec {
            nodes: 3,
            subnets: 2,
            etcd: true,
        },
    )
    .expect("lab");
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    assert_eq!((n1.subnet, n2.subnet, n3.subnet), (0, 1, 0));
    // Across the router (IPv4 and IPv6) and on the same subnet.
    n1.netns
        .exec("ping", &["-c1", "-W2", &n2.ipv4.ip().to_string()])
        .expect("n1 -> n2 across the router");
    n2.netns
        .exec("ping", &["-6", "-c1", "-W2", &n1.ipv6.ip().to_string()])
        .expect("n2 -> n1 over IPv6");
    n3.netns
        .exec("ping", &["-c1", "-W2", &n1.ipv4.ip().to_string()])
        .expect("n3 -> n1 on one subnet");
    // etcd from a node on the other subnet, as a node agent would reach it.
    let ep = lab.etcd_endpoint();
    n2.netns
        .exec(
            "etcdctl",
            &["--endpoints", &ep, "put", "/tessera/test", "hello"],
        )
        .expect("put");
    let got = n1
        .netns
        .exec(
            "etcdctl",
            &[
                "--endpoints",
                &ep,
                "get",
                "--print-value-only",
                "/tessera/test",
            ],
        )
        .expect("get");
    assert_eq!(got.trim(), "hello");
    // The root namespace has no route to the lab: nothing was added there.
    let root_routes =
        tessera_testbed::ip(&["-4", "route", "show", "table", "all"]).expect("routes");
    assert!(
        !root_routes.contains("198.18."),
        "root namespace touched: {root_routes}"
    );

    let prefix = lab.prefix().to_string();
    let pids = lab.pids();
    assert!(!pids.is_empty());
    drop(lab);
    assert_nothing_left(&prefix, &pids);
}

/// Pinned neighbours: every underlay peer and gateway is a permanent entry on both sides,
/// so traffic needs no ARP or ND at all (what lets 64 nodes share one kernel's tables).
#[test]
fn pinned_underlay_neighbours_carry_traffic_without_arp() {
    let lab = Lab::new(
        "pinned_neighbours",
        LabSpec {
            nodes: 3,
            subnets: 2,
            etcd: true,
        },
    )
    .expect("lab");
    lab.pin_underlay_neighbours().expect("pin");
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    n1.netns
        .exec("ping", &["-c1", "-W2", &n2.ipv4.ip().to_string()])
        .expect("n1 -> n2 across the router");
    n3.netns
        .exec("ping", &["-c1", "-W2", &n1.ipv4.ip().to_string()])
        .expect("n3 -> n1 on one subnet");
    n3.netns
        .exec("ping", &["-6", "-c1", "-W2", &n1.ipv6.ip().to_string()])
        .expect("n3 -> n1 over IPv6");
    n1.netns
        .exec(
            "etcdctl",
            &[
                "--endpoints",
                &lab.etcd_endpoint(),
                "put",
                "/tessera/pinned",
                "yes",
            ],
        )
        .expect("etcd from a node");
    // Every entry any of them holds is one we pinned: nothing was resolved on the way.
    for n in &lab.nodes {
        let table = n.netns.ip(&["neigh", "show", "nud", "all"]).expect("neigh");
        let learned: Vec<&str> = table
            .lines()
            .filter(|l| !l.contains("PERMANENT") && !l.contains("NOARP"))
            .collect();
        assert!(
            learned.is_empty(),
            "{}: learned entries {learned:?}",
            n.name
        );
    }
    let n1_table = n1
        .netns
        .ip(&["neigh", "show", "nud", "permanent"])
        .expect("neigh");
    for want in [
        n3.ipv4.ip().to_string(),
        n3.ipv6.ip().to_string(),
        "198.18.0.254".to_string(),
        "2001:db8:0::fe".replace(":0::", "::"),
    ] {
        assert!(
            n1_table.lines().any(|l| l.starts_with(&format!("{want} "))),
            "node1 has no permanent entry for {want}: {table}",
            table = n1_table
        );
    }
    // Not node2's: it is on the other subnet, reached through the router.
    assert!(!n1_table.contains(&format!("{} ", n2.ipv4.ip())));
    let router_table = lab
        .router
        .ip(&["neigh", "show", "nud", "permanent"])
        .expect("router neigh");
    for n in &lab.nodes {
        assert!(
            router_table.contains(&format!("{} dev br{} ", n.ipv4.ip(), n.subnet)),
            "the router has no permanent entry for {}: {router_table}",
            n.name
        );
    }
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let lab = Lab::new(
            "panicking",
            LabSpec {
                nodes: 1,
                subnets: 1,
                etcd: true,
            },
        )
        .expect("lab");
        tx.send((lab.prefix().to_string(), lab.pids()))
            .expect("send");
        panic!("deliberate panic with the lab up");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let (prefix, pids) = rx.recv().expect("lab was built");
    assert_nothing_left(&prefix, &pids);
}
