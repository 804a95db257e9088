//! The full mesh from the datastore: nodes registered in etcd peer with each other; a node
//! that joins is peered and one that is deleted is unpeered, without a restart.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tessera_testbed::{Child, Lab, LabNode, LabSpec};

const ROUTED: &str = env!("CARGO_BIN_EXE_tessera-routed");

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node as its agent registers it: the Node record and its liveness key (the speaker
/// peers with nodes that hold their lease or still hold addresses, as the agent's does).
fn register(lab: &Lab, n: &LabNode) {
    let node = serde_json::json!({ "name": n.name, "ipv4Address": n.ipv4.to_string(), "labels": {}, "asNumber": 64512 });
    lab.etcdctl(&[
        "put",
        &format!("/tessera/v1/nodes/{}", n.name),
        &node.to_string(),
    ])
    .expect("register node");
    lab.etcdctl(&["put", &format!("/tessera/v1/liveness/{}", n.name), "{}"])
        .expect("liveness");
}

fn start(lab: &Lab, n: &LabNode, dir: &std::path::Path, block: &str) -> Child {
    let me = n.ipv4.ip();
    let conf = dir.join(format!("{}.yaml", n.name));
    std::fs::write(
        &conf,
        format!("asn: 64512\nrouterId: {me}\nlisten: {me}\nconnectRetrySeconds: 1\nnetworks: [\"{block}\"]\n"),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join(format!("{}.log", n.name))).expect("log");
    let mut cmd = n.netns.command(ROUTED);
    cmd.args([
        "run",
        "--config",
        &conf.to_string_lossy(),
        "--etcd",
        &lab.etcd_endpoint(),
        "--node",
        &n.name,
    ]);
    cmd.stdout(Stdio::null()).stderr(log);
    Child::spawn(cmd, "tessera-routed").expect("spawn")
}

fn has_route(n: &LabNode, prefix: &str, via: &LabNode) -> bool {
    n.netns
        .ip_json(&["route", "show", prefix])
        .ok()
        .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
        .is_some_and(|r| r["gateway"] == via.ipv4.ip().to_string().as_str())
}

#[test]
fn nodes_join_and_leave_the_mesh_without_restarts() {
    let lab = Lab::new(
        "bgp_mesh",
        LabSpec {
            nodes: 3,
            subnets: 1,
            etcd: true,
        },
    )
    .expect("lab");
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    let dir = tempfile::tempdir().expect("tempdir");
    register(&lab, n1);
    register(&lab, n2);
    let mut s1 = start(&lab, n1, dir.path(), "10.244.1.0/26");
    let mut s2 = start(&lab, n2, dir.path(), "10.244.2.0/26");
    wait_for("node1 and node2 meshed", || {
        has_route(n1, "10.244.2.0/26", n2) && has_route(n2, "10.244.1.0/26", n1)
    });

    // node3 joins: it is registered and starts; the running speakers peer with it.
    register(&lab, n3);
    let mut s3 = start(&lab, n3, dir.path(), "10.244.3.0/26");
    wait_for("node3 in the mesh", || {
        has_route(n1, "10.244.3.0/26", n3)
            && has_route(n3, "10.244.1.0/26", n1)
            && has_route(n3, "10.244.2.0/26", n2)
    });

    // node2 is deleted from the cluster: the others unpeer it and its routes go.
    lab.etcdctl(&["del", "/tessera/v1/nodes/node2"])
        .expect("delete node");
    wait_for("node2 unpeered", || {
        n1.netns
            .ip(&["route", "show", "10.244.2.0/26"])
            .unwrap_or_default()
            .trim()
            .is_empty()
            && n3
                .netns
                .ip(&["route", "show", "10.244.2.0/26"])
                .unwrap_or_default()
                .trim()
                .is_empty()
    });
    assert!(
        has_route(n1, "10.244.3.0/26", n3),
        "the rest of the mesh stays"
    );

    for s in [&mut s1, &mut s2, &mut s3] {
        s.stop(Duration::from_secs(2));
    }
    lab.finish();
}
