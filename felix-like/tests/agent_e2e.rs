//! The node agent end to end: real agents in node namespaces, real etcd, the real CNI plugin,
//! a BGP router on the underlay; pods ping across nodes in every mode.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tessera_testbed::cluster::{Cluster, ClusterSpec, MODE_POOLS};

/// Four nodes on two subnets with the router, one pool per mode; agents not started.
fn cluster_without_agents(test: &str) -> Cluster {
    Cluster::new(
        test,
        ClusterSpec {
            pools: MODE_POOLS.into(),
            ..Default::default()
        },
    )
    .expect("cluster")
}

/// The same with every agent running and ready.
fn cluster(test: &str) -> Cluster {
    let mut c = cluster_without_agents(test);
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("agents ready");
    c
}

/// Two nodes on one subnet, no underlay router; agents not started.
fn two_nodes_one_subnet(test: &str) -> Cluster {
    Cluster::new(
        test,
        ClusterSpec {
            lab: tessera_testbed::LabSpec {
                nodes: 2,
                subnets: 1,
                etcd: true,
            },
            pools: MODE_POOLS.into(),
            router_bgp: false,
            ..Default::default()
        },
    )
    .expect("cluster")
}

/// Every pod reaches every pod of its pool on other nodes (waiting for convergence first).
fn assert_full_mesh(c: &Cluster, pool: &str) {
    let idx: Vec<usize> = (0..c.pods.len())
        .filter(|&i| c.pods[i].pool == pool)
        .collect();
    for &i in &idx {
        for &j in &idx {
            if i != j {
                assert!(
                    c.wait_ping(i, c.pods[j].ip, Duration::from_secs(15)),
                    "{pool}: {} ({}) cannot reach {} ({})",
                    c.pods[i].ip,
                    c.pods[i].node,
                    c.pods[j].ip,
                    c.pods[j].node
                );
            }
        }
    }
}

fn route_to<'a>(routes: &'a [serde_json::Value], dst: &str) -> Option<&'a serde_json::Value> {
    routes.iter().find(|r| r["dst"] == dst)
}

fn block_of(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3] & 0xc0)
}

/// `tesseractl node status node1 --agent …` (its agent's socket follows).
const NODE_STATUS: [&str; 4] = ["node", "status", "node1", "--agent"];

#[test]
fn pods_talk_across_nodes_in_every_mode_and_leave_through_nat() {
    let mut c = cluster("agent_modes");
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    for pool in ["bgp", "vxlan-crosssubnet", "vxlan-always"] {
        for n in &nodes {
            c.add_pod(n, pool).expect("pod");
        }
    }
    for pool in ["bgp", "vxlan-crosssubnet", "vxlan-always"] {
        assert_full_mesh(&c, pool);
    }
    // What an operator on node1 sees: `tesseractl node status` from the agent's endpoint.
    let out = std::process::Command::new(tessera_testbed::cluster::bin("tesseractl"))
        .args(NODE_STATUS)
        .arg(format!("unix:{}", c.health_socket("node1").display()))
        .env("NO_COLOR", "1")
        .output()
        .expect("tesseractl node status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("node node1: ready"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("198.18.0.254 ") && l.contains("Established")),
        "the session with the underlay router: {text}"
    );
    assert!(text.contains("Tunnel devices: vxlan.calico"), "{text}");
    // And the bug-report tarball, collected inside node1.
    let diags = tempfile::tempdir().expect("tempdir");
    let tarball = diags.path().join("diags.tar.gz");
    c.lab.nodes[0]
        .netns
        .exec(
            &tessera_testbed::cluster::bin("tesseractl").to_string_lossy(),
            &[
                "node",
                "diags",
                "--agent",
                &format!("unix:{}", c.health_socket("node1").display()),
                "--log",
                &c.agent_log("node1").to_string_lossy(),
                "-o",
                &tarball.to_string_lossy(),
            ],
        )
        .expect("tesseractl node diags");
    let unpacked = diags.path().join("x");
    std::fs::create_dir_all(&unpacked).expect("dir");
    let ok = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .expect("tar");
    assert!(ok.success());
    let read =
        |f: &str| std::fs::read_to_string(unpacked.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert!(read("status.json").contains("\"node\":\"node1\""));
    assert!(
        read("routes-v4.json").contains("\"protocol\":\"80\""),
        "BGP routes of node1"
    );
    assert!(read("nft-tessera.json").contains("tessera"));
    assert!(read("links.json").contains("vxlan.calico"));
    assert!(std::fs::read_dir(&unpacked)
        .expect("files")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("log-")));

    // The kernel holds what each mode says (node1 on subnet 0; node2 and node4 on subnet 1,
    // node3 on subnet 0 with node1).
    let r = c.routes("node1");
    let pod = |node: &str, pool: &str| {
        c.pods
            .iter()
            .find(|p| p.node == node && p.pool == pool)
            .expect("pod")
            .ip
    };
    // BGP, same subnet: native via node3, learned over BGP (proto 80).
    let same = route_to(&r, &block_of(pod("node3", "bgp"))).expect("bgp route");
    assert_eq!(
        (same["gateway"].as_str(), same["protocol"].as_str()),
        (Some("198.18.0.11"), Some("80")),
        "{same}"
    );
    // BGP, other subnet: left to the default route (the router learned it over BGP).
    assert!(route_to(&r, &block_of(pod("node2", "bgp"))).is_none());
    // VXLAN CrossSubnet: native to node3, VXLAN to node2.
    let native = route_to(&r, &block_of(pod("node3", "vxlan-crosssubnet"))).expect("native");
    assert_eq!(
        (native["dev"].as_str(), native["protocol"].as_str()),
        (Some("eth0"), Some("81")),
        "{native}"
    );
    let vx = route_to(&r, &block_of(pod("node2", "vxlan-crosssubnet"))).expect("vxlan");
    assert_eq!(vx["dev"], "vxlan.calico", "{vx}");
    assert!(vx["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .any(|f| f == "onlink"));
    // VXLAN Always: even to node3 on the same subnet.
    let vx3 = route_to(&r, &block_of(pod("node3", "vxlan-always"))).expect("vxlan");
    assert_eq!(vx3["dev"], "vxlan.calico", "{vx3}");
    // Our own blocks are blackholed (unallocated addresses go nowhere, not out again).
    assert!(r
        .iter()
        .any(|x| x["type"] == "blackhole" && x["dst"] == block_of(pod("node1", "bgp"))));
    // The device: VNI 4096, port 4789, MTU underlay - 50, learning off.
    let dev = c
        .lab
        .node("node1")
        .netns
        .ip_json(&["-d", "link", "show", "vxlan.calico"])
        .expect("dev");
    let info = &dev[0]["linkinfo"]["info_data"];
    assert_eq!(
        (
            info["id"].as_u64(),
            info["port"].as_u64(),
            info["learning"].as_bool()
        ),
        (Some(4096), Some(4789), Some(false)),
        "{info}"
    );
    assert_eq!(dev[0]["mtu"], 1450);
    // The CNI plugin's MTU file: the largest overhead in use wins (an IPv6 VXLAN pool: 70).
    let mtu = std::fs::read_to_string(c.mtu_file("node1")).expect("mtu file");
    assert_eq!(mtu.trim(), "1430");
    let pod_mtu = c.pods[0]
        .netns
        .ip_json(&["link", "show", "eth0"])
        .expect("pod link");
    assert_eq!(pod_mtu[0]["mtu"], 1430);

    // A node reaches a remote pod.
    let far = pod("node2", "bgp");
    assert!(
        tessera_testbed::cluster::ping_in(&c.lab.node("node1").netns, far, 3).is_some(),
        "node1 -> {far}"
    );

    // natOutgoing: the bgp pool's pods reach the outside host, which has no route to pods;
    // a pod of a pool without natOutgoing does not.
    let outside = c.add_outside_host().expect("outside host");
    let nat_pod = c
        .pods
        .iter()
        .position(|p| p.pool == "bgp")
        .expect("bgp pod");
    let plain_pod = c
        .pods
        .iter()
        .position(|p| p.pool == "vxlan-always")
        .expect("pod");
    assert!(
        c.wait_ping(nat_pod, outside, Duration::from_secs(5)),
        "natOutgoing pod -> outside"
    );
    assert!(
        c.ping(plain_pod, outside).is_none(),
        "a pod without natOutgoing must not reach the outside"
    );
    let nft = c
        .lab
        .node("node1")
        .netns
        .exec("nft", &["list", "table", "inet", "tessera"])
        .expect("nft");
    assert!(
        nft.contains("masquerade") && nft.contains("10.244.0.0/20"),
        "{nft}"
    );

    // Metrics and health.
    let (code, metrics) = c.http("node1", "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tessera_ipam_addresses_in_use{pool=\"bgp\",node=\"node1\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_bgp_session_established{peer=\"198.18.0.254\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tessera_reconcile_duration_seconds_count"),
        "{metrics}"
    );
    assert_eq!(c.http("node1", "/livez").expect("livez").0, 200);
    c.finish();
}

/// Waits for `check` to hold; returns how long it took.
fn restored(what: &str, timeout: Duration, check: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < timeout, "{what} was not restored");
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    eprintln!("{what}: restored after {took:?}");
    took
}

#[test]
fn kernel_drift_is_undone() {
    let mut c = cluster("agent_drift");
    for n in ["node1", "node2", "node3"] {
        c.add_pod(n, "vxlan-always").expect("pod");
        c.add_pod(n, "bgp").expect("pod");
    }
    assert_full_mesh(&c, "vxlan-always");
    assert_full_mesh(&c, "bgp");
    let ns = &c.lab.node("node1").netns;
    let vx_block = block_of(
        c.pods
            .iter()
            .find(|p| p.node == "node2" && p.pool == "vxlan-always")
            .expect("pod")
            .ip,
    );
    let bgp_block = block_of(
        c.pods
            .iter()
            .find(|p| p.node == "node3" && p.pool == "bgp")
            .expect("pod")
            .ip,
    );
    let has_route = |dst: &str| {
        ns.ip_json(&["route", "show", dst])
            .map(|v| v.as_array().is_some_and(|a| !a.is_empty()))
            .unwrap_or(false)
    };
    let timeout = Duration::from_secs(10);

    // A VXLAN route (proto 81).
    ns.ip(&["route", "del", &vx_block]).expect("del route");
    restored("deleted VXLAN route", timeout, || has_route(&vx_block));
    // A BGP route (proto 80): the speaker puts it back.
    ns.ip(&["route", "del", &bgp_block]).expect("del route");
    restored("deleted BGP route", timeout, || has_route(&bgp_block));
    // An FDB entry.
    let fdb = ns
        .exec("bridge", &["-j", "fdb", "show", "dev", "vxlan.calico"])
        .expect("fdb");
    let fdb: serde_json::Value = serde_json::from_str(&fdb).expect("json");
    let entry = fdb
        .as_array()
        .and_then(|a| a.iter().find(|e| e["dst"].is_string()))
        .expect("an FDB entry")
        .clone();
    let (mac, dst) = (
        entry["mac"].as_str().expect("mac"),
        entry["dst"].as_str().expect("dst"),
    );
    ns.exec(
        "bridge",
        &["fdb", "del", mac, "dev", "vxlan.calico", "dst", dst],
    )
    .expect("fdb del");
    restored("deleted FDB entry", timeout, || {
        ns.exec("bridge", &["fdb", "show", "dev", "vxlan.calico"])
            .is_ok_and(|o| o.contains(mac) && o.contains(dst))
    });
    // The device itself, and the device downed.
    ns.ip(&["link", "del", "vxlan.calico"]).expect("del dev");
    restored("deleted vxlan.calico", timeout, || has_route(&vx_block));
    ns.ip(&["link", "set", "vxlan.calico", "down"])
        .expect("down");
    restored("downed vxlan.calico", timeout, || {
        ns.ip_json(&["link", "show", "vxlan.calico"])
            .is_ok_and(|l| {
                l[0]["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "UP"))
            })
    });
    // The MTU changed by hand.
    ns.ip(&["link", "set", "vxlan.calico", "mtu", "1300"])
        .expect("mtu");
    restored("changed vxlan.calico MTU", timeout, || {
        ns.ip_json(&["link", "show", "vxlan.calico"])
            .is_ok_and(|l| l[0]["mtu"] == 1450)
    });
    // Our nft table (found by the periodic reconcile: nft changes send no netlink route event).
    ns.exec("nft", &["delete", "table", "inet", "tessera"])
        .expect("nft delete");
    restored("deleted nft table", Duration::from_secs(15), || {
        ns.exec("nft", &["list", "table", "inet", "tessera"])
            .is_ok()
    });
    // A route that is not ours stays; a stray route of ours goes.
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        "198.18.0.254",
        "proto",
        "static",
    ])
    .expect("foreign route");
    ns.ip(&[
        "route",
        "add",
        "10.98.0.0/24",
        "via",
        "198.18.0.254",
        "proto",
        "81",
    ])
    .expect("stray route");
    restored("stray route of ours removed", timeout, || {
        !has_route("10.98.0.0/24")
    });
    assert!(
        has_route("10.99.0.0/24"),
        "a route that is not ours was touched"
    );
    // Connectivity after all that.
    assert_full_mesh(&c, "vxlan-always");
    let (_, m) = c.http("node1", "/metrics").expect("metrics");
    assert!(
        m.lines()
            .any(|l| l.starts_with("tessera_reconcile_corrections_total{kind=\"kernel\"}")),
        "{m}"
    );
    c.finish();
}

#[test]
fn a_pool_changes_mode_live() {
    let mut c = cluster("agent_switch");
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    for n in &nodes {
        c.add_pod(n, "vxlan-crosssubnet").expect("pod");
    }
    assert_full_mesh(&c, "vxlan-crosssubnet");
    let pool = |vx: &str| {
        format!("apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: vxlan-crosssubnet }}\nspec: {{ cidr: 10.244.16.0/20, blockSize: 26, vxlanMode: {vx} }}\n")
    };
    let far = c.pods.iter().find(|p| p.node == "node2").expect("pod").ip;
    let far_block = block_of(far);
    // One TCP connection from node1's pod to node2's lives through all three switches.
    let probe = tessera_testbed::cluster::bin("tcp-probe");
    let far_pod = c.pods.iter().find(|p| p.node == "node2").expect("pod");
    let mut server = far_pod.netns.command(&probe.to_string_lossy());
    server.args(["serve", "7777"]);
    let _server = tessera_testbed::Child::spawn(server, "tcp-probe server").expect("server");
    let near = c.pods.iter().position(|p| p.node == "node1").expect("pod");
    let mut client = c.pods[near].netns.command(&probe.to_string_lossy());
    client
        .args(["send", &format!("{far}:7777"), "8"])
        .stdout(std::process::Stdio::piped());
    std::thread::sleep(Duration::from_millis(300));
    let client = tessera_testbed::Child::spawn(client, "tcp-probe client").expect("client");
    std::thread::sleep(Duration::from_millis(500));
    for mode in ["Always", "Never", "CrossSubnet"] {
        c.lab.apply_yaml(&pool(mode)).expect("switch");
        // node1 -> node2 crosses the router: Always/CrossSubnet encapsulate, Never routes
        // through the router (BGP).
        let want_dev = if mode == "Never" {
            None
        } else {
            Some("vxlan.calico")
        };
        let t = Instant::now();
        loop {
            let r = c.routes("node1");
            let dev = route_to(&r, &far_block).and_then(|x| x["dev"].as_str().map(String::from));
            if dev.as_deref() == want_dev {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "{mode}: node1 route to {far_block}: {dev:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{mode}: node1 converged in {:?}", t.elapsed());
        assert_full_mesh(&c, "vxlan-crosssubnet");
    }
    let out = client.wait_output().expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("TCP connection across the switches: {text}");
    assert!(
        out.status.success() && text.starts_with("ok "),
        "the established connection broke: {text}"
    );
    c.finish();
}

#[test]
fn bad_input_gets_clear_errors_and_the_agent_keeps_serving() {
    let mut c = two_nodes_one_subnet("agent_bad");
    // etcd down at start: the agent keeps trying and says why it is not ready.
    c.lab.etcd().kill();
    c.start_agent("node1").expect("agent");
    let t = Instant::now();
    let why = loop {
        match c.http("node1", "/readyz") {
            Ok((503, body)) if body.contains("cannot reach etcd") => break body,
            other => {
                assert!(t.elapsed() < Duration::from_secs(20), "{other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    eprintln!("not ready while etcd is down: {why}");
    assert_eq!(c.http("node1", "/livez").expect("livez").0, 200);
    c.lab.etcd().restart().expect("etcd back");
    c.start_agent("node2").expect("agent");
    c.wait_ready(Duration::from_secs(30))
        .expect("ready once etcd is back");

    // An invalid pool YAML is refused as a whole with an error that names the field, and
    // nothing of it reaches the datastore.
    let bad = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: typo }\nspec: { cidr: 10.244.64.0/20, vxlanMod: Always }\n";
    let err = c.lab.apply_yaml(bad).expect_err("invalid pool");
    assert!(err.to_string().contains("vxlanMod"), "{err}");
    assert!(c
        .lab
        .etcd_prefix("/tessera/v1/config/pools/typo")
        .expect("etcd")
        .is_empty());

    // A corrupt pool record: reported; the agent keeps serving what it knows.
    let a = c.add_pod("node1", "vxlan-always").expect("pod");
    let b = c.add_pod("node2", "vxlan-always").expect("pod");
    let to = c.pods[b].ip;
    assert!(
        c.wait_ping(a, to, Duration::from_secs(15)),
        "pods across nodes"
    );
    c.lab
        .etcdctl(&["put", "/tessera/v1/config/pools/broken", "{not json"])
        .expect("put");
    let block = block_of(to);
    let ns = &c.lab.node("node1").netns;
    ns.ip(&["route", "del", &block]).expect("del route");
    restored(
        "route deleted while a record is corrupt",
        Duration::from_secs(10),
        || {
            ns.ip_json(&["route", "show", &block])
                .is_ok_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
        },
    );
    assert!(c.ping(a, to).is_some());
    assert_eq!(c.http("node1", "/livez").expect("livez").0, 200);
    c.lab
        .etcdctl(&["del", "/tessera/v1/config/pools/broken"])
        .expect("del");

    // Our liveness key deleted by hand (as when a partition outlasts the lease): the agent
    // takes a new lease at once.
    c.lab
        .etcdctl(&["del", "/tessera/v1/liveness/node1"])
        .expect("del");
    restored("deleted liveness key", Duration::from_secs(10), || {
        c.lab
            .etcd_prefix("/tessera/v1/liveness/node1")
            .is_ok_and(|v| !v.is_empty())
    });

    // An IPIP pool on a kernel without the ipip module: not ready, and the reason names the
    // module; ready again once the pool is gone.
    c.lab
        .apply_yaml("apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: ipip }\nspec: { cidr: 10.244.48.0/20, ipipMode: Always }\n")
        .expect("ipip pool");
    let t = Instant::now();
    let why = loop {
        match c.http("node1", "/readyz") {
            // (First "waiting for our IPIP tunnel address", then the kernel's verdict.)
            Ok((503, body)) if body.contains("IPIP pools cannot be served") => break body,
            other => {
                assert!(t.elapsed() < Duration::from_secs(15), "{other:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert!(why.contains("modprobe ipip"), "{why}");
    c.lab
        .etcdctl(&["del", "/tessera/v1/config/pools/ipip"])
        .expect("del");
    c.wait_ready(Duration::from_secs(15))
        .expect("ready without the IPIP pool");

    // A configuration error names the field; autodetection that finds nothing says so.
    let node = &c.lab.node("node1").netns;
    let bin = tessera_testbed::cluster::bin("tessera-node");
    let dir = c.dir.path().to_path_buf();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "nodeName: x\ndatastore: { etcdEndpoints: [\"http://198.18.0.2:2379\"] }\nbgp: { holdTim: 3 }\n",
    )
    .expect("write");
    let out = node
        .command(&bin.to_string_lossy())
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holdTim"), "{err}");
    let out = node
        .command(&bin.to_string_lossy())
        .env("NODENAME", "node9")
        .env("ETCD_ENDPOINTS", c.lab.etcd_endpoint())
        .env("IP_AUTODETECTION_METHOD", "interface=ens.*")
        .env(
            "TESSERA_HEALTH_LISTEN",
            format!("unix:{}", dir.join("n9.sock").display()),
        )
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interface=ens.*") && err.contains("no matching interface"),
        "{err}"
    );
    // SIGTERM: a clean, prompt exit, and (graceful restart) node1 keeps node2's BGP route.
    let p2 = c.add_pod("node2", "bgp").expect("pod");
    let p1 = c.add_pod("node1", "bgp").expect("pod");
    let to = c.pods[p2].ip;
    assert!(c.wait_ping(p1, to, Duration::from_secs(15)), "bgp pods");
    let st = c
        .stop_agent("node2", Duration::from_secs(10))
        .expect("exited on SIGTERM");
    assert!(st.success(), "{st:?}");
    let kept = c
        .lab
        .node("node1")
        .netns
        .ip_json(&["route", "show", &block_of(to)])
        .expect("routes");
    assert_eq!(
        kept[0]["protocol"], "80",
        "node2's route kept while it restarts: {kept}"
    );
    assert!(
        c.ping(p1, to).is_some(),
        "traffic still flows while node2's agent is down"
    );
    c.finish();
}

#[test]
fn the_watch_reads_everything_again_after_its_revision_was_compacted() {
    let mut c = two_nodes_one_subnet("agent_compact");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    let a = c.add_pod("node1", "vxlan-always").expect("pod");
    let b = c.add_pod("node2", "vxlan-always").expect("pod");
    let to = c.pods[b].ip;
    assert!(c.wait_ping(a, to, Duration::from_secs(15)));
    let block = block_of(to);
    let dev = |c: &Cluster| {
        route_to(&c.routes("node1"), &block).and_then(|r| r["dev"].as_str().map(String::from))
    };
    assert_eq!(dev(&c).as_deref(), Some("vxlan.calico"));

    // node1's agent is frozen while etcd restarts (its watch breaks), the pool changes, and
    // etcd compacts away the revisions the watch would resume from.
    c.signal_agent("node1", nix::sys::signal::Signal::SIGSTOP);
    c.lab.etcd().kill();
    c.lab.etcd().restart().expect("etcd");
    c.lab
        .apply_yaml("apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: vxlan-always }\nspec: { cidr: 10.244.32.0/20, blockSize: 26, vxlanMode: CrossSubnet }\n")
        .expect("switch");
    // One more revision, so that compacting at the newest removes the switch's own
    // (tesseractl writes the pool in one transaction: one revision).
    c.lab
        .etcdctl(&["put", "/tessera/v1/test/after-the-switch", "x"])
        .expect("put");
    let status = c
        .lab
        .etcdctl(&["get", "/", "-w", "json"])
        .expect("revision");
    let rev = serde_json::from_str::<serde_json::Value>(&status).expect("json")["header"]
        ["revision"]
        .as_i64()
        .expect("revision");
    c.lab
        .etcdctl(&["compact", &rev.to_string()])
        .expect("compact");
    c.signal_agent("node1", nix::sys::signal::Signal::SIGCONT);

    // Same subnet under CrossSubnet: native through eth0.
    let t = Instant::now();
    while dev(&c).as_deref() != Some("eth0") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "node1 never saw the change: {:?}",
            dev(&c)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(c.agent_log("node1")).expect("log");
    assert!(
        log.contains("compacted"),
        "the agent should say it resynced: {log}"
    );
    assert!(c.wait_ping(a, to, Duration::from_secs(15)));
    c.finish();
}

#[test]
fn ipv6_pools_cross_nodes_over_vxlan_v6() {
    let mut c = cluster_without_agents("agent_v6");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    for n in &nodes {
        c.add_pod_with(n, "vxlan-always", Some("vxlan-v6"))
            .expect("dual-stack pod");
    }
    // Every pod reaches every other over IPv6, across the router (IPv6 underlay).
    for i in 0..c.pods.len() {
        for j in 0..c.pods.len() {
            if i == j {
                continue;
            }
            let to = c.pods[j].ip6.expect("an IPv6 address");
            assert!(
                c.wait_ping(i, to, Duration::from_secs(15)),
                "{} cannot reach {to}",
                c.pods[i].node
            );
        }
    }
    // The device and a route through it, in the kernel.
    let ns = &c.lab.node("node1").netns;
    let dev = ns
        .ip_json(&["-d", "link", "show", "vxlan-v6.calico"])
        .expect("vxlan-v6.calico");
    let info = &dev[0]["linkinfo"]["info_data"];
    assert_eq!(
        (info["id"].as_u64(), info["port"].as_u64()),
        (Some(6096), Some(4789)),
        "{info}"
    );
    assert_eq!(dev[0]["mtu"], 1430);
    let far = c.pods.iter().find(|p| p.node == "node2").expect("pod");
    let routes = ns.ip_json(&["-6", "route", "show"]).expect("routes");
    let via_vxlan = routes.as_array().expect("routes").iter().any(|r| {
        r["dev"] == "vxlan-v6.calico"
            && r["dst"]
                .as_str()
                .and_then(|d| d.parse::<ipnetwork::IpNetwork>().ok())
                .is_some_and(|d| d.contains(std::net::IpAddr::V6(far.ip6.expect("v6"))))
    });
    assert!(
        via_vxlan,
        "no route to {:?} through vxlan-v6.calico: {routes}",
        far.ip6
    );
    // Pods get the smaller MTU the IPv6 encapsulation needs.
    let mtu = std::fs::read_to_string(c.mtu_file("node1")).expect("mtu file");
    assert_eq!(mtu.trim(), "1430");
    c.finish();
}

#[test]
fn a_node_labelled_route_reflector_reflects_for_the_others() {
    let mut c = Cluster::new(
        "agent_rr",
        ClusterSpec {
            lab: tessera_testbed::LabSpec {
                nodes: 3,
                subnets: 1,
                etcd: true,
            },
            pools: MODE_POOLS.into(),
            router_bgp: false,
            node_labels: [(
                "node1".to_string(),
                "tessera.dev/route-reflector=true".to_string(),
            )]
            .into(),
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    let p2 = c.add_pod("node2", "bgp").expect("pod");
    let p3 = c.add_pod("node3", "bgp").expect("pod");
    // node2 and node3 peer only with node1, which reflects each one's block to the other.
    let to = c.pods[p3].ip;
    assert!(
        c.wait_ping(p2, to, Duration::from_secs(20)),
        "node2 -> node3 through reflected routes"
    );
    let r = c.routes("node2");
    let learned = route_to(&r, &block_of(to)).expect("node3's block on node2");
    assert_eq!(
        (learned["gateway"].as_str(), learned["protocol"].as_str()),
        (Some("198.18.0.12"), Some("80")),
        "reflected with node3 as the next hop: {learned}"
    );
    assert_eq!(
        c.bgp_sessions_established("node2"),
        1,
        "node2 peers with the reflector only"
    );
    c.finish();
}

#[test]
fn a_full_mesh_becomes_reflected_when_a_node_is_labelled_later() {
    // Three nodes in a full mesh; the operator then labels node1 a route reflector (through
    // the datastore, as the Kubernetes label would arrive) and its agent restarts. The
    // others drop to the one session with node1, their metrics say so (no stale series of
    // the peers they left), and their pods still reach each other.
    let mut c = Cluster::new(
        "agent_rr_later",
        ClusterSpec {
            lab: tessera_testbed::LabSpec {
                nodes: 3,
                subnets: 1,
                etcd: true,
            },
            pools: MODE_POOLS.into(),
            router_bgp: false,
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.bgp_sessions_established("node2") != 2 {
        assert!(Instant::now() < deadline, "node2 never meshed with both");
        std::thread::sleep(Duration::from_millis(200));
    }
    let n1 = c.lab.node("node1");
    let doc = format!(
        "apiVersion: tessera.dev/v1\nkind: Node\nmetadata: {{ name: node1, labels: {{ tessera.dev/route-reflector: \"true\" }} }}\nspec: {{ ipv4Address: \"{}\", ipv6Address: \"{}\" }}\n",
        n1.ipv4, n1.ipv6
    );
    c.lab.apply_yaml(&doc).expect("label node1");
    c.stop_agent("node1", Duration::from_secs(10));
    c.set_node_labels("node1", "tessera.dev/route-reflector=true");
    c.start_agent("node1").expect("node1 again");
    let deadline = Instant::now() + Duration::from_secs(60);
    while (
        c.bgp_sessions_established("node2"),
        c.bgp_sessions_established("node3"),
    ) != (1, 1)
    {
        assert!(
            Instant::now() < deadline,
            "clients still at {} and {} sessions: {}",
            c.bgp_sessions_established("node2"),
            c.bgp_sessions_established("node3"),
            c.http("node2", "/metrics").map(|x| x.1).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let p2 = c.add_pod("node2", "bgp").expect("pod");
    let p3 = c.add_pod("node3", "bgp").expect("pod");
    let to = c.pods[p3].ip;
    assert!(
        c.wait_ping(p2, to, Duration::from_secs(20)),
        "node2 -> node3 through the reflector"
    );
    c.finish();
}
