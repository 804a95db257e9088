//! CNI chaos: the `tessera` plugin SIGKILLed at 200 random points of ADD and DEL (anywhere
//! from its start to its end, not only inside the IPAM step), each crash taking the pod's
//! sandbox with it and no DEL ever retried. Then the agents' garbage collector gets its
//! pass, and the invariants hold: `tesseractl ipam check` finds nothing, and no link, route
//! or endpoint record is left for a pod that does not exist.
//!
//! The kill points are drawn from a seeded generator; the seed is printed, and
//! `TESSERA_CHAOS_SEED=<n>` replays a run.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tessera_testbed::cluster::{Cluster, ClusterSpec, CniEnd};
use tessera_testbed::LabSpec;

const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: bgp }
spec: { cidr: 10.244.0.0/20, blockSize: 26 }
";
const KILLS: usize = 200;

/// The /32 routes through pod interfaces (`cali*`) in a node's namespace, and those
/// interfaces.
fn pod_routes_and_links(c: &Cluster, node: usize) -> (BTreeSet<String>, usize) {
    let ns = &c.lab.nodes[node].netns;
    let routes = ns.ip_json(&["-4", "route", "show"]).expect("routes");
    let via_pods = routes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dev"].as_str().is_some_and(|d| d.starts_with("cali")))
        .filter_map(|r| r["dst"].as_str().map(str::to_string))
        .collect();
    let links = ns.ip_json(&["link", "show"]).expect("links");
    let cali = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("cali")))
        .count();
    (via_pods, cali)
}

#[test]
fn the_plugin_killed_at_200_random_points_leaves_nothing_after_one_gc_pass() {
    let mut c =
        Cluster::new(
            "cni_chaos",
            ClusterSpec {
                lab: LabSpec {
                    nodes: 2,
                    subnets: 1,
                    etcd: true,
                },
                pools: POOL.into(),
                router_bgp: false,
                agent_yaml:
                    "leaseTtlSeconds: 10\ngc:\n  intervalSeconds: 1\n  workloadGraceSeconds: 3\n"
                        .into(),
                ..Default::default()
            },
        )
        .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();

    // How long an uninterrupted ADD and DEL take here: kill points span all of that.
    let (mut add_time, mut del_time) = (Duration::ZERO, Duration::ZERO);
    for n in &nodes {
        let t = Instant::now();
        c.add_pod_as_kubelet(n, "").expect("ADD");
        add_time = add_time.max(t.elapsed());
    }
    let t = Instant::now();
    c.delete_pod(0).expect("DEL");
    del_time = del_time.max(t.elapsed());

    let seed: u64 = std::env::var("TESSERA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("chaos seed {seed} (TESSERA_CHAOS_SEED={seed} replays it); ADD {add_time:?}, DEL {del_time:?}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut killed, mut finished) = (0, 0);
    while killed < KILLS {
        let del = c.pods.len() >= 3 && rng.random_bool(0.5);
        let end = if del {
            let i = rng.random_range(0..c.pods.len());
            let at = del_time.mul_f64(rng.random_range(0.0..1.2));
            c.delete_pod_killed_after(i, at).expect("DEL run")
        } else {
            let node = &nodes[rng.random_range(0..nodes.len())];
            let at = add_time.mul_f64(rng.random_range(0.0..1.2));
            c.add_pod_killed_after(node, at).expect("ADD run")
        };
        match end {
            CniEnd::Killed => killed += 1,
            CniEnd::Finished { .. } => finished += 1,
        }
    }
    eprintln!(
        "{killed} kills, {finished} runs finished first; {} pods live",
        c.pods.len()
    );

    // The garbage collectors' pass: the leader's releases addresses whose endpoint record
    // is gone (grace 3 s, every 1 s); each agent releases its pods whose interface is gone
    // (the same grace, on its full reconcile every 5 s).
    let endpoints = |c: &Cluster, node: &str| {
        c.lab
            .etcd_prefix(&tessera_datastore::keys::node_workloads(node))
            .expect("etcd")
    };
    let live_on = |c: &Cluster, node: &str| c.pods.iter().filter(|p| p.node == node).count();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (findings, report) = c.ipam_check();
        let settled = nodes
            .iter()
            .all(|n| endpoints(&c, n).len() == live_on(&c, n));
        if findings == 0 && settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never clean: {report}\n{:#?}",
            nodes.iter().map(|n| endpoints(&c, n)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Nothing in the kernels or in etcd for a pod that does not exist.
    for (i, node) in nodes.iter().enumerate() {
        let live: BTreeSet<String> = c
            .pods
            .iter()
            .filter(|p| &p.node == node)
            .map(|p| p.ip.to_string())
            .collect();
        let (routes, links) = pod_routes_and_links(&c, i);
        assert_eq!(routes, live, "{node}: routes through pod interfaces");
        assert_eq!(links, live.len(), "{node}: pod interfaces");
        let endpoints = endpoints(&c, node);
        assert_eq!(
            endpoints.len(),
            live.len(),
            "{node}: endpoint records {:?}",
            endpoints.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
    }
    // Every live pod still has its own address, and they reach each other.
    let ips: BTreeSet<_> = c.pods.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), c.pods.len(), "an address on two pods");
    if let (Some(a), Some(b)) = (
        c.pods.iter().position(|p| p.node == nodes[0]),
        c.pods.iter().position(|p| p.node == nodes[1]),
    ) {
        let to = c.pods[b].ip;
        assert!(
            c.wait_ping(a, to, Duration::from_secs(10)),
            "live pods reach each other"
        );
    }
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    tessera_testbed::assert_nothing_left(&prefix, &pids);
}
