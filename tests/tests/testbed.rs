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
