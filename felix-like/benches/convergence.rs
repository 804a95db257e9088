//! Convergence of real agents on the test bed, and their steady-state cost.
//!
//! `cargo build --release --workspace --bins && cargo bench -p tessera-node --bench convergence`
//!
//! For 4 and 16 nodes (two underlay subnets, a BGP router): the time from a pool mode change,
//! a node joining and a node dying until every other node's kernel routes say so (each node
//! is watched by its own thread, polling `ip -j route` every few ms); then, with 1,000 pods
//! across 16 nodes, the agents' CPU and resident memory over 30 s of steady state.

mod common;

use common::{block_of, cpu_and_rss, routes};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tessera_testbed::cluster::{Cluster, ClusterSpec};
use tessera_testbed::LabSpec;

const POOLS: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: vx }
spec: { cidr: 10.244.16.0/20, blockSize: 26, vxlanMode: CrossSubnet }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: bgp }
spec: { cidr: 10.244.0.0/20, blockSize: 26 }
";

fn vx_pool(mode: &str) -> String {
    format!("apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: vx }}\nspec: {{ cidr: 10.244.16.0/20, blockSize: 26, vxlanMode: {mode} }}\n")
}

/// Watches every namespace in parallel until `done(node, routes)` holds on each; returns the
/// slowest node's time since `t0`.
fn converge(
    nodes: &[(String, String)],
    t0: Instant,
    done: impl Fn(&str, &BTreeMap<String, String>) -> bool + Sync,
) -> Duration {
    let limit = Duration::from_secs(120);
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(name, ns)| {
                let done = &done;
                s.spawn(move || loop {
                    if done(name, &routes(ns)) {
                        return t0.elapsed();
                    }
                    if t0.elapsed() > limit {
                        panic!("{name} did not converge in {limit:?}");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("watcher"))
            .max()
            .unwrap_or_default()
    })
}

struct Round {
    nodes: usize,
    mode_change: Duration,
    join_vxlan: Duration,
    join_bgp: Duration,
    death: Duration,
}

fn round(n: usize) -> Round {
    // n nodes plus one that joins later.
    let mut c = Cluster::new(
        "bench_conv",
        ClusterSpec {
            lab: LabSpec {
                nodes: n + 1,
                subnets: 2,
                etcd: true,
            },
            pools: POOLS.into(),
            agent_yaml: "leaseTtlSeconds: 10\ngc:\n  intervalSeconds: 1\n  leaderLeaseSeconds: 5\n"
                .into(),
            ..Default::default()
        },
    )
    .expect("cluster");
    let names: Vec<String> = c.lab.nodes.iter().map(|x| x.name.clone()).collect();
    let (members, joiner) = (&names[..n], names[n].clone());
    for m in members {
        c.start_agent(m).expect("agent");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for m in members {
        while !matches!(c.http(m, "/readyz"), Ok((200, _))) {
            assert!(Instant::now() < deadline, "{m} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for m in members {
        c.add_pod(m, "vx").expect("pod");
        c.add_pod(m, "bgp").expect("pod");
    }
    let ns_of = |c: &Cluster, list: &[String]| -> Vec<(String, String)> {
        list.iter()
            .map(|m| (m.clone(), c.lab.node(m).netns.name().to_string()))
            .collect()
    };
    let watched = ns_of(&c, members);
    let vx_blocks: Vec<(String, String)> = c
        .pods
        .iter()
        .filter(|p| p.pool == "vx")
        .map(|p| (p.node.clone(), block_of(p.ip)))
        .collect();
    let remote_vx = |me: &str| -> Vec<String> {
        vx_blocks
            .iter()
            .filter(|(o, _)| o != me)
            .map(|(_, b)| b.clone())
            .collect()
    };
    // Settled: CrossSubnet routes everywhere.
    converge(&watched, Instant::now(), |me, r| {
        remote_vx(me).into_iter().all(|b| r.contains_key(&b))
    });

    // 1. Mode change: CrossSubnet -> Always; every remote block through vxlan.calico.
    let t0 = Instant::now();
    c.lab.apply_yaml(&vx_pool("Always")).expect("switch");
    let mode_change = converge(&watched, t0, |me, r| {
        remote_vx(me)
            .into_iter()
            .all(|b| r.get(&b).map(String::as_str) == Some("vxlan.calico"))
    });

    // 2. A node joins: its pods exist already (the CNI plugin needs no agent); from its agent
    // starting until every other node routes to its blocks (VXLAN from the datastore; BGP
    // natively from the same-subnet nodes).
    c.add_pod(&joiner, "vx").expect("pod");
    c.add_pod(&joiner, "bgp").expect("pod");
    let jvx = block_of(
        c.pods
            .iter()
            .rev()
            .find(|p| p.pool == "vx")
            .expect("pod")
            .ip,
    );
    let jbgp = block_of(
        c.pods
            .iter()
            .rev()
            .find(|p| p.pool == "bgp")
            .expect("pod")
            .ip,
    );
    let joiner_subnet = c.lab.node(&joiner).subnet;
    let same_subnet: Vec<(String, String)> = watched
        .iter()
        .filter(|(m, _)| c.lab.node(m).subnet == joiner_subnet)
        .cloned()
        .collect();
    let t0 = Instant::now();
    c.start_agent(&joiner).expect("join");
    let join_vxlan = converge(&watched, t0, |_, r| {
        r.get(&jvx).map(String::as_str) == Some("vxlan.calico")
    });
    let join_bgp = converge(&same_subnet, t0, |_, r| r.contains_key(&jbgp));

    // 3. A node dies (agent, pods and namespace gone): until no other node routes to it.
    let victim = members[n - 1].clone();
    let dead_vx = vx_blocks
        .iter()
        .find(|(o, _)| *o == victim)
        .map(|(_, b)| b.clone())
        .expect("block");
    let survivors: Vec<(String, String)> = ns_of(&c, &names)
        .into_iter()
        .filter(|(m, _)| *m != victim)
        .collect();
    let t0 = Instant::now();
    c.kill_node(&victim);
    let death = converge(&survivors, t0, |_, r| !r.contains_key(&dead_vx));
    c.finish();
    Round {
        nodes: n,
        mode_change,
        join_vxlan,
        join_bgp,
        death,
    }
}

fn steady_state() -> (f64, f64, f64, usize) {
    let mut c = Cluster::new(
        "bench_steady",
        ClusterSpec {
            lab: LabSpec {
                nodes: 16,
                subnets: 2,
                etcd: true,
            },
            pools: POOLS.into(),
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(120)).expect("ready");
    let names: Vec<String> = c.lab.nodes.iter().map(|x| x.name.clone()).collect();
    let t = Instant::now();
    for i in 0..1000 {
        let node = &names[i % names.len()];
        c.add_pod(node, if i % 2 == 0 { "vx" } else { "bgp" })
            .expect("pod");
    }
    eprintln!("1,000 pods started in {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(5));
    let pids = c.agent_pids();
    let before: Vec<(u64, u64)> = pids.iter().map(|p| cpu_and_rss(*p)).collect();
    let window = Duration::from_secs(30);
    std::thread::sleep(window);
    let after: Vec<(u64, u64)> = pids.iter().map(|p| cpu_and_rss(*p)).collect();
    let hz = 100.0; // USER_HZ on Linux
    let cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.0 - b.0) as f64 / hz / window.as_secs_f64() * 100.0)
        .collect();
    let rss: Vec<f64> = after.iter().map(|a| a.1 as f64 / 1024.0).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max_rss = rss.iter().cloned().fold(0.0, f64::max);
    let pods = c.pods.len();
    c.finish();
    (mean(&cpu), mean(&rss), max_rss, pods)
}

fn main() {
    tessera_testbed::require_root();
    let rounds: Vec<Round> = [4, 16].into_iter().map(round).collect();
    println!("\nconvergence (slowest node; every other node's kernel routes checked)");
    println!(
        "{:>6} {:>14} {:>16} {:>14} {:>14}",
        "nodes", "mode change", "join (VXLAN)", "join (BGP)", "node death"
    );
    for r in &rounds {
        println!(
            "{:>6} {:>14} {:>16} {:>14} {:>14}",
            r.nodes,
            format!("{:.0} ms", r.mode_change.as_secs_f64() * 1e3),
            format!("{:.0} ms", r.join_vxlan.as_secs_f64() * 1e3),
            format!("{:.0} ms", r.join_bgp.as_secs_f64() * 1e3),
            format!("{:.1} s", r.death.as_secs_f64()),
        );
    }
    let (cpu, rss, max_rss, pods) = steady_state();
    let ms = |f: fn(&Round) -> Duration| -> Vec<(f64, f64)> {
        rounds
            .iter()
            .map(|r| (r.nodes as f64, f(r).as_secs_f64() * 1e3))
            .collect()
    };
    let mut run = tessera_testbed::bench_results::BenchRun::new(
        "node_convergence",
        "cargo bench -p tessera-node --bench convergence",
    );
    run.series(
        "node_convergence",
        "pool mode change",
        ("nodes", "ms, slowest node"),
        ms(|r| r.mode_change),
    )
    .series(
        "node_convergence",
        "node joins (VXLAN)",
        ("nodes", "ms, slowest node"),
        ms(|r| r.join_vxlan),
    )
    .series(
        "node_convergence",
        "node joins (BGP)",
        ("nodes", "ms, slowest node"),
        ms(|r| r.join_bgp),
    );
    run.extra = serde_json::json!({
        "steady_16_nodes": { "pods": pods, "agent_cpu_percent": cpu, "rss_mib_mean": rss, "rss_mib_max": max_rss },
        "node_death_s": rounds.iter().map(|r| (r.nodes, r.death.as_secs_f64())).collect::<Vec<_>>(),
    });
    run.save();
    println!("\nsteady state, 16 nodes, {pods} pods, 30 s window: agent CPU {cpu:.2} % of a core (mean), RSS {rss:.1} MiB mean, {max_rss:.1} MiB max");
}
