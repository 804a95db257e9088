//! Scale in namespaces: 64 nodes with agents on one underlay subnet, 5,000 pods, the BGP
//! full mesh against two route reflectors (nodes labelled `tessera.dev/route-reflector`).
//!
//! `cargo build --release --workspace --bins && cargo bench -p tessera-node --bench scale_cluster`
//! (`TESSERA_SCALE_NODES`, `TESSERA_SCALE_PODS` shrink it). Not in CI: it takes ~20 minutes.
//!
//! 1. The pods first (the CNI plugin needs no agent), 8 ADDs at a time: etcd revisions per
//!    pod and per second.
//! 2. Full mesh: agents started in steps (16, 32, 64 nodes); after each step the time until
//!    every running node routes every other running node's pods, the established sessions
//!    per node, and 15 s of steady state (agent CPU and RSS, etcd revisions per second).
//!    At 64: a node joins (time until every other node routes its blocks), the node dies
//!    (until no node routes them), the pool's mode changes to VXLAN Always and back.
//! 3. Route reflectors, switched live: node1 and node2 restart labelled as reflectors; the
//!    time until every client has exactly its two sessions; then the same measurements at 64,
//!    and steady state with agents stopped down to 32 and 16 (stopped nodes stay in the
//!    mesh as peers that do not answer: they still hold blocks).
//!
//! Convergence is polled by one thread going round the nodes with `ip -j route` (a round
//! takes ~0.3 s at 64 nodes, the resolution of the figures); per-node threads polling every
//! few ms, as the 16-node benchmark does, would take the two cores from the agents.

mod common;

use common::{block_of, cpu_and_rss, routes};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tessera_testbed::bench_results::BenchRun;
use tessera_testbed::cluster::{Cluster, ClusterSpec};
use tessera_testbed::LabSpec;

const REFLECTOR: &str = "tessera.dev/route-reflector=true";

fn pool(mode: &str) -> String {
    format!("apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: bgp }}\nspec: {{ cidr: 10.244.0.0/16, blockSize: 26, vxlanMode: {mode} }}\n")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Goes round `nodes` (name, namespace) until `done` holds for each; the time since `t0` at
/// which the last one did.
fn converge(
    nodes: &[(String, String)],
    t0: Instant,
    done: impl Fn(&str, &BTreeMap<String, String>) -> bool,
) -> Duration {
    let limit = Duration::from_secs(
        std::env::var("TESSERA_SCALE_LIMIT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let mut pending: Vec<&(String, String)> = nodes.iter().collect();
    let mut last = Duration::ZERO;
    while !pending.is_empty() {
        pending.retain(|(name, ns)| {
            if done(name, &routes(ns)) {
                last = t0.elapsed();
                false
            } else {
                true
            }
        });
        assert!(
            t0.elapsed() < limit,
            "{} nodes did not converge in {limit:?}: {:?}",
            pending.len(),
            pending.iter().take(5).map(|p| &p.0).collect::<Vec<_>>()
        );
    }
    last
}

fn etcd_revision(c: &Cluster) -> u64 {
    let out = c
        .lab
        .etcdctl(&["endpoint", "status", "-w", "json"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["Status"]["header"]["revision"].as_u64().unwrap_or(0)
}

#[derive(Debug, Clone, serde::Serialize)]
struct Steady {
    topology: &'static str,
    nodes: usize,
    /// From starting the step's agents until every running node routes every other's pods.
    converge_s: Option<f64>,
    sessions_min: usize,
    sessions_max: usize,
    /// Mean % of one core over the window: reflectors and the others apart.
    cpu_clients: f64,
    cpu_reflectors: Option<f64>,
    rss_mean_mib: f64,
    rss_max_mib: f64,
    etcd_revisions_per_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Events {
    topology: &'static str,
    join_s: f64,
    leave_s: f64,
    mode_to_vxlan_s: f64,
    mode_back_s: f64,
}

/// A pod's address as routes name it: a node routes it by its block when the block is
/// affine to the pod's node, or by the address itself (a /32) when it is not (the pod's
/// node borrowed it, or the block's affinity was released: a node whose agent has not run
/// yet has no Node record, and GC releases the affinities of nodes it does not know).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Addr {
    block: String,
    ip: String,
}

impl Addr {
    fn of(ip: std::net::Ipv4Addr) -> Self {
        Addr {
            block: block_of(ip),
            ip: ip.to_string(),
        }
    }

    /// The device (or type) of the route that carries it, the longest match first.
    fn route<'a>(&self, routes: &'a BTreeMap<String, String>) -> Option<&'a String> {
        routes.get(&self.ip).or_else(|| routes.get(&self.block))
    }
}

struct Bench {
    c: Cluster,
    names: Vec<String>,
    /// Each node's pod addresses: (its /26, the address) as `ip route` names them.
    addresses: BTreeMap<String, BTreeSet<Addr>>,
}

impl Bench {
    fn running(&self) -> Vec<(String, String)> {
        self.c
            .agent_pids_by_node()
            .iter()
            .zip(&self.c.lab.nodes)
            .filter(|(pid, _)| pid.is_some())
            .map(|(_, n)| (n.name.clone(), n.netns.name().to_string()))
            .collect()
    }

    /// Pod addresses of the running nodes other than `me`.
    fn remote_addresses(&self, running: &[(String, String)], me: &str) -> Vec<Addr> {
        running
            .iter()
            .filter(|(n, _)| n != me)
            .flat_map(|(n, _)| self.addresses.get(n).into_iter().flatten().cloned())
            .collect()
    }

    fn all_routed(&self, t0: Instant) -> Duration {
        let running = self.running();
        self.explained(&running, || {
            converge(&running, t0, |me, r| {
                self.remote_addresses(&running, me)
                    .iter()
                    .all(|a| a.route(r).is_some())
            })
        })
    }

    /// Runs `wait`; if it panics (a node did not converge), says why and keeps the logs first.
    fn explained<T>(&self, running: &[(String, String)], wait: impl FnOnce() -> T) -> T {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(wait)).unwrap_or_else(|e| {
            self.why_not_routed(running);
            self.keep_logs();
            std::panic::resume_unwind(e)
        })
    }

    /// Copies every agent's log to `TESSERA_SCALE_LOGS` (a directory), if set: the cluster's
    /// own directory goes with it.
    fn keep_logs(&self) {
        let Ok(dir) = std::env::var("TESSERA_SCALE_LOGS") else {
            return;
        };
        let _ = std::fs::create_dir_all(&dir);
        for n in &self.names {
            let _ = std::fs::copy(self.c.agent_log(n), format!("{dir}/{n}.log"));
        }
        eprintln!("agents' logs kept in {dir}");
    }

    /// What a node that does not route everything is missing, whose blocks those are, its
    /// sessions and the last lines of both agents' logs.
    fn why_not_routed(&self, running: &[(String, String)]) {
        for (me, ns) in running.iter().take(2) {
            let r = routes(ns);
            let missing: Vec<(String, String)> = running
                .iter()
                .filter(|(n, _)| n != me)
                .flat_map(|(n, _)| {
                    self.addresses
                        .get(n)
                        .into_iter()
                        .flatten()
                        .filter(|a| a.route(&r).is_none())
                        .map(move |a| (n.clone(), a.ip.clone()))
                })
                .collect();
            eprintln!(
                "--- {me}: {} sessions established; missing {} addresses: {:?}",
                self.c.bgp_sessions_established(me),
                missing.len(),
                missing.iter().take(8).collect::<Vec<_>>()
            );
            if let Some((owner, _)) = missing.first() {
                for (a, b) in [(me.as_str(), owner.as_str()), (owner.as_str(), me.as_str())] {
                    let addr = self.c.lab.node(b).ipv4.ip().to_string();
                    let m = self
                        .c
                        .http(a, "/metrics")
                        .map(|(_, m)| m)
                        .unwrap_or_default();
                    let lines: Vec<&str> = m
                        .lines()
                        .filter(|l| l.starts_with("tessera_bgp") && l.contains(&*addr))
                        .collect();
                    eprintln!("--- {a}'s BGP metrics for {b} ({addr}): {lines:?}");
                }
            }
            let mut logs = vec![me.clone()];
            logs.extend(missing.first().map(|(n, _)| n.clone()));
            for n in logs {
                let log = std::fs::read_to_string(self.c.agent_log(&n)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                eprintln!("--- {n}'s agent log (newest first):\n{}", tail.join("\n"));
            }
        }
    }

    fn steady(
        &self,
        topology: &'static str,
        converge_s: Option<f64>,
        reflectors: &[&str],
    ) -> Steady {
        std::thread::sleep(Duration::from_secs(3));
        let running = self.running();
        let pids: Vec<(String, u32)> = self
            .c
            .agent_pids_by_node()
            .iter()
            .zip(&self.c.lab.nodes)
            .filter_map(|(p, n)| Some((n.name.clone(), (*p)?)))
            .collect();
        let rev0 = etcd_revision(&self.c);
        let before: Vec<(u64, u64)> = pids.iter().map(|(_, p)| cpu_and_rss(*p)).collect();
        let window = Duration::from_secs(15);
        std::thread::sleep(window);
        let after: Vec<(u64, u64)> = pids.iter().map(|(_, p)| cpu_and_rss(*p)).collect();
        let rev1 = etcd_revision(&self.c);
        let cpu = |b: &(u64, u64), a: &(u64, u64)| {
            (a.0.saturating_sub(b.0)) as f64 / 100.0 / window.as_secs_f64() * 100.0
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (mut rr, mut cl) = (Vec::new(), Vec::new());
        for (i, (name, _)) in pids.iter().enumerate() {
            let x = cpu(&before[i], &after[i]);
            if reflectors.contains(&name.as_str()) {
                rr.push(x);
            } else {
                cl.push(x);
            }
        }
        let rss: Vec<f64> = after.iter().map(|a| a.1 as f64 / 1024.0).collect();
        let counts: Vec<usize> = running
            .iter()
            .map(|(n, _)| self.c.bgp_sessions_established(n))
            .collect();
        Steady {
            topology,
            nodes: running.len(),
            converge_s,
            sessions_min: counts.iter().copied().min().unwrap_or(0),
            sessions_max: counts.iter().copied().max().unwrap_or(0),
            cpu_clients: mean(&cl),
            cpu_reflectors: (!rr.is_empty()).then(|| mean(&rr)),
            rss_mean_mib: mean(&rss),
            rss_max_mib: rss.iter().copied().fold(0.0, f64::max),
            etcd_revisions_per_s: (rev1.saturating_sub(rev0)) as f64 / window.as_secs_f64(),
        }
    }

    /// A node joins (its agent starts, then its first pod), then dies; the pool changes mode
    /// and back. Every figure is the slowest running node's.
    fn events(&mut self, topology: &'static str, joiner: &str) -> Events {
        let others = self.running();
        // As in Kubernetes, where the agent installs the CNI configuration: the new node's
        // first pod comes once its agent runs. Measured from the agent's start to every
        // other node routing that pod's block.
        let t0 = Instant::now();
        self.c.start_agent(joiner).expect("joiner's agent");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !matches!(self.c.http(joiner, "/readyz"), Ok((200, _))) {
            assert!(Instant::now() < deadline, "{joiner} not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pod = self
            .c
            .add_pod(joiner, "bgp")
            .expect("the joiner's first pod");
        let joined = Addr::of(self.c.pods[pod].ip);
        let join = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            converge(&others, t0, |_, r| joined.route(r).is_some())
        }))
        .unwrap_or_else(|_| {
            for n in [joiner, others[0].0.as_str()] {
                let log = std::fs::read_to_string(self.c.agent_log(n)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!(
                    "--- {n}'s agent log (last lines, newest first):\n{}",
                    tail.join("\n")
                );
            }
            eprintln!(
                "joiner's pod {joined:?}; {}'s routes {:?}",
                others[0].0,
                routes(&others[0].1)
            );
            panic!("the joiner's blocks never reached the others");
        });
        // The node leaves as Kubernetes deletes a node: it goes, and the controller declares
        // it decommissioned (a node that only stops answering keeps its routes until there
        // is evidence it is dead: that is the reclaim issue's business, not a leave).
        let t0 = Instant::now();
        self.c.kill_node(joiner);
        let out = self
            .c
            .lab
            .ctl
            .exec(
                &tessera_testbed::cluster::bin("tesseractl").to_string_lossy(),
                &[
                    "--etcd-endpoints",
                    &self.c.lab.etcd_endpoint(),
                    "node",
                    "decommission",
                    joiner,
                ],
            )
            .expect("decommission");
        assert!(out.contains("decommissioned"), "{out}");
        let leave = converge(&others, t0, |_, r| joined.route(r).is_none());
        let mode = |m: &str, dev_is_vxlan: bool| {
            let t0 = Instant::now();
            self.c.lab.apply_yaml(&pool(m)).expect("mode change");
            let running = self.running();
            self.explained(&running, || {
                converge(&running, t0, |me, r| {
                    self.remote_addresses(&running, me).iter().all(|a| {
                        a.route(r)
                            .is_some_and(|dev| (dev == "vxlan.calico") == dev_is_vxlan)
                    })
                })
            })
        };
        let to_vxlan = mode("Always", true);
        let back = mode("Never", false);
        Events {
            topology,
            join_s: join.as_secs_f64(),
            leave_s: leave.as_secs_f64(),
            mode_to_vxlan_s: to_vxlan.as_secs_f64(),
            mode_back_s: back.as_secs_f64(),
        }
    }
}

fn main() {
    tessera_testbed::require_root();
    let nodes = env_usize("TESSERA_SCALE_NODES", 64);
    let pods = env_usize("TESSERA_SCALE_PODS", 5000);
    let steps: Vec<usize> = [16, 32, 64]
        .into_iter()
        .filter(|s| *s < nodes)
        .chain([nodes])
        .collect();
    // Two joiners after the members: one per topology (a joiner dies in its round).
    let c = Cluster::new(
        "bench_scale",
        ClusterSpec {
            lab: LabSpec {
                nodes: nodes + 2,
                subnets: 1,
                etcd: true,
            },
            pools: pool("Never"),
            agent_yaml: "leaseTtlSeconds: 10\ngc:\n  intervalSeconds: 1\n  leaderLeaseSeconds: 5\n"
                .into(),
            router_bgp: false,
            ..Default::default()
        },
    )
    .expect("cluster");
    // 66 nodes' ARP and ND entries overflow the one table all namespaces share.
    c.lab
        .pin_underlay_neighbours()
        .expect("permanent underlay neighbours");
    let names: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    let mut b = Bench {
        c,
        names,
        addresses: BTreeMap::new(),
    };
    let (members, joiners) = b.names.split_at(nodes);
    let (members, joiners) = (members.to_vec(), joiners.to_vec());

    // 1. Pods.
    let wanted: Vec<(String, String)> = (0..pods)
        .map(|i| (members[i % nodes].clone(), "bgp".to_string()))
        .collect();
    let rev0 = etcd_revision(&b.c);
    let t = Instant::now();
    b.c.add_pods(&wanted, 8).expect("pods");
    let pods_s = t.elapsed().as_secs_f64();
    let pod_revisions = etcd_revision(&b.c).saturating_sub(rev0);
    for p in &b.c.pods {
        b.addresses
            .entry(p.node.clone())
            .or_default()
            .insert(Addr::of(p.ip));
    }
    eprintln!(
        "{} pods in {pods_s:.0} s: {pod_revisions} etcd revisions ({:.1} per pod, {:.0}/s)",
        wanted.len(),
        pod_revisions as f64 / wanted.len() as f64,
        pod_revisions as f64 / pods_s
    );

    // 2. Full mesh, in steps.
    let mut steady = Vec::new();
    let mut started = 0;
    for &step in &steps {
        let t0 = Instant::now();
        for m in &members[started..step] {
            b.c.start_agent(m).expect("agent");
        }
        started = step;
        let took = b.all_routed(t0);
        let s = b.steady("full mesh", Some(took.as_secs_f64()), &[]);
        eprintln!("{s:?}");
        steady.push(s);
    }
    let mesh_events = b.events("full mesh", &joiners[0]);
    eprintln!("{mesh_events:?}");

    // 3. Route reflectors, live: node1 and node2 restart labelled.
    let reflectors = [members[0].as_str(), members[1].as_str()];
    let t0 = Instant::now();
    for r in reflectors {
        // The operator labels the node (as `kubectl label node` would reach the datastore),
        // and its agent restarts so that its speaker takes a cluster id.
        let n = b.c.lab.node(r);
        let doc = format!(
            "apiVersion: tessera.dev/v1\nkind: Node\nmetadata: {{ name: {r}, labels: {{ tessera.dev/route-reflector: \"true\" }} }}\nspec: {{ ipv4Address: \"{}\", ipv6Address: \"{}\" }}\n",
            n.ipv4, n.ipv6
        );
        b.c.lab.apply_yaml(&doc).expect("label the reflector");
        let _ = b.c.stop_agent(r, Duration::from_secs(10));
        b.c.set_node_labels(r, REFLECTOR);
        b.c.start_agent(r).expect("reflector");
    }
    let deadline = Instant::now()
        + Duration::from_secs(
            std::env::var("TESSERA_SCALE_LIMIT_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        );
    // Whether the switch took: every client down to the two reflectors.
    let mut switched = None;
    let mut counts = Vec::new();
    while Instant::now() < deadline {
        let running = b.running();
        counts = running
            .iter()
            .map(|(n, _)| (n.clone(), b.c.bgp_sessions_established(n)))
            .collect::<Vec<_>>();
        let settled = counts.iter().all(|(n, got)| {
            *got == if reflectors.contains(&n.as_str()) {
                running.len() - 1
            } else {
                2
            }
        });
        if settled {
            switched = Some(b.all_routed(t0));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut rr_events = None;
    match switched {
        None => eprintln!(
            "THE SWITCH TO ROUTE REFLECTORS DID NOT TAKE (established sessions per node: {counts:?}); the reflector rows are missing"
        ),
        Some(switch) => {
            let s = b.steady("route reflectors", Some(switch.as_secs_f64()), &reflectors);
            eprintln!("{s:?}");
            steady.push(s);
            let e = b.events("route reflectors", &joiners[1]);
            eprintln!("{e:?}");
            rr_events = Some(e);
            for &step in steps.iter().rev().skip(1) {
                for m in &members[step..started] {
                    let _ = b.c.stop_agent(m, Duration::from_secs(10));
                }
                started = step;
                let s = b.steady("route reflectors", None, &reflectors);
                eprintln!("{s:?}");
                steady.push(s);
            }
        }
    }
    b.keep_logs();
    b.c.finish();

    println!("\n{} pods on {nodes} nodes in {pods_s:.0} s (8 ADDs at a time): {:.1} etcd revisions per pod, {:.0} revisions/s", wanted.len(), pod_revisions as f64 / wanted.len() as f64, pod_revisions as f64 / pods_s);
    println!("\n| topology | nodes | converged | sessions/node | agent CPU (clients) | agent CPU (reflectors) | RSS mean / max | etcd revisions/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in &steady {
        println!(
            "| {} | {} | {} | {}-{} | {:.2} % | {} | {:.1} / {:.1} MiB | {:.1} |",
            s.topology,
            s.nodes,
            s.converge_s.map_or("-".into(), |x| format!("{x:.1} s")),
            s.sessions_min,
            s.sessions_max,
            s.cpu_clients,
            s.cpu_reflectors.map_or("-".into(), |x| format!("{x:.2} %")),
            s.rss_mean_mib,
            s.rss_max_mib,
            s.etcd_revisions_per_s
        );
    }
    println!(
        "\n| topology (at {nodes} nodes) | join | leave (node deleted) | mode -> VXLAN | mode back |"
    );
    println!("|---|---:|---:|---:|---:|");
    for e in std::iter::once(&mesh_events).chain(rr_events.as_ref()) {
        println!(
            "| {} | {:.2} s | {:.1} s | {:.2} s | {:.2} s |",
            e.topology, e.join_s, e.leave_s, e.mode_to_vxlan_s, e.mode_back_s
        );
    }
    match switched {
        Some(switch) => println!("\n(the switch to reflectors, live, took {:.1} s until every client had its two sessions and every route)", switch.as_secs_f64()),
        None => println!("\n(the switch to route reflectors did not take: sessions per node stayed {counts:?})"),
    }

    let mut run = BenchRun::new(
        "scale_cluster",
        "cargo bench -p tessera-node --bench scale_cluster",
    );
    for topology in ["full mesh", "route reflectors"] {
        let pts = |f: fn(&Steady) -> f64| -> Vec<(f64, f64)> {
            let mut v: Vec<(f64, f64)> = steady
                .iter()
                .filter(|s| s.topology == topology)
                .map(|s| (s.nodes as f64, f(s)))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v
        };
        run.series(
            "scale_agent_cpu",
            topology,
            ("nodes", "agent CPU, % of a core (clients)"),
            pts(|s| s.cpu_clients),
        );
        run.series(
            "scale_agent_rss",
            topology,
            ("nodes", "agent RSS, MiB (mean)"),
            pts(|s| s.rss_mean_mib),
        );
        run.series(
            "scale_sessions",
            topology,
            ("nodes", "BGP sessions per node (max)"),
            pts(|s| s.sessions_max as f64),
        );
    }
    run.extra = serde_json::json!({
        "nodes": nodes,
        "pods": wanted.len(),
        "pods_seconds": pods_s,
        "etcd_revisions_per_pod": pod_revisions as f64 / wanted.len() as f64,
        "steady": steady,
        "events": [Some(mesh_events), rr_events],
        "reflector_switch_s": switched.map(|d| d.as_secs_f64()),
    });
    run.save();
}
