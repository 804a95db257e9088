//! The soak: pod ADD/DEL churn across nodes with agents for a while, one agent killed
//! (SIGKILL) and brought back at every restart tick, and at every checkpoint
//! `tesseractl ipam check` plus "exactly one responder per address" (every pod serves its
//! name; a probe pod asks every address who it is) and the agents' resident memory. At the
//! end every pod is deleted and nothing may be left: no finding, no route or link of a pod.
//! The test runs it for two minutes in CI; `tessera-soak --minutes 30` is the long one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::cluster::{Cluster, ClusterSpec};
use crate::responders::{who_answers, NameServers};
use crate::LabSpec;

const POOLS: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: churn }
spec: { cidr: 10.244.0.0/18, blockSize: 26 }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: probe }
spec: { cidr: 10.244.200.0/24, blockSize: 28 }
";

#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub nodes: usize,
    pub duration: Duration,
    /// A checkpoint this often.
    pub check_every: Duration,
    /// Every this often (at a checkpoint) one agent is killed; it comes back at the next
    /// checkpoint.
    pub restart_every: Duration,
    /// Churned pods the loop keeps around.
    pub target_pods: usize,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub at: Duration,
    pub pods: usize,
    pub adds: usize,
    pub dels: usize,
    /// `ipam check` findings.
    pub findings: usize,
    /// Addresses that did not answer with their pod's name (after routing settled).
    pub wrong_responders: Vec<String>,
    /// Per node: (agent PID, resident KiB).
    pub agent_rss: BTreeMap<String, (u32, u64)>,
}

#[derive(Debug, Default)]
pub struct SoakReport {
    pub checkpoints: Vec<Checkpoint>,
    pub failures: Vec<String>,
    pub restarts: usize,
    /// Routes or links of pods that no longer exist, and findings, after the last DEL.
    pub left_at_end: Vec<String>,
}

/// Routes and links of pods in every node's namespace that belong to no live pod.
fn left_over(c: &Cluster) -> Vec<String> {
    let mut left = Vec::new();
    for n in &c.lab.nodes {
        let live: Vec<String> = c
            .pods
            .iter()
            .filter(|p| p.node == n.name)
            .map(|p| p.ip.to_string())
            .collect();
        let routes = n
            .netns
            .ip_json(&["-4", "route", "show"])
            .unwrap_or_default();
        for r in routes.as_array().into_iter().flatten() {
            let dev = r["dev"].as_str().unwrap_or_default();
            let dst = r["dst"].as_str().unwrap_or_default();
            if dev.starts_with("cali") && !live.iter().any(|l| l == dst) {
                left.push(format!("{}: route {dst} dev {dev}", n.name));
            }
        }
        let links = n.netns.ip_json(&["link", "show"]).unwrap_or_default();
        let cali = links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["ifname"].as_str().is_some_and(|i| i.starts_with("cali")))
            .count();
        if cali != live.len() {
            left.push(format!(
                "{}: {cali} pod links for {} pods",
                n.name,
                live.len()
            ));
        }
    }
    left
}

pub fn run(spec: &SoakSpec, mut say: impl FnMut(&str)) -> anyhow::Result<SoakReport> {
    let mut c = Cluster::new(
        "soak",
        ClusterSpec {
            lab: LabSpec {
                nodes: spec.nodes,
                subnets: 2,
                etcd: true,
            },
            pools: POOLS.into(),
            agent_yaml:
                "leaseTtlSeconds: 10\ngc:\n  intervalSeconds: 2\n  workloadGraceSeconds: 10\n"
                    .into(),
            ..Default::default()
        },
    )?;
    c.start_agents()?;
    c.wait_ready(Duration::from_secs(120))?;
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    let probe = c.add_pod(&nodes[0], "probe")?;
    let probe_ns = c.pods[probe].netns.path();
    let probe_name = c.pods[probe].name.clone();
    let mut servers = NameServers::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut report = SoakReport::default();
    let (mut adds, mut dels) = (0, 0);
    let t0 = Instant::now();
    let mut next_check = t0 + spec.check_every;
    let mut next_restart = t0 + spec.restart_every;
    let mut down: Option<String> = None;
    let mut victim = 1 % nodes.len();

    loop {
        let now = Instant::now();
        if now >= next_check {
            if let Some(node) = down.take() {
                c.start_agent(&node)?;
                c.wait_ready(Duration::from_secs(120))?;
                report.restarts += 1;
            }
            let cp = checkpoint(&c, &probe_ns, &probe_name, t0, adds, dels);
            say(&format!(
                "[{:6.1}s] {} pods, {} ADDs, {} DELs, {} findings, {} wrong responders, agents RSS {:?} KiB",
                cp.at.as_secs_f64(),
                cp.pods,
                cp.adds,
                cp.dels,
                cp.findings,
                cp.wrong_responders.len(),
                cp.agent_rss.values().map(|(_, k)| *k).collect::<Vec<_>>()
            ));
            report.checkpoints.push(cp);
            if now >= t0 + spec.duration {
                break;
            }
            if Instant::now() >= next_restart {
                // Not the probe's node: the checkpoints ask from there.
                let node = nodes[victim].clone();
                victim = 1 + victim % (nodes.len() - 1).max(1);
                c.kill_agent(&node);
                say(&format!("agent on {node} killed (SIGKILL)"));
                down = Some(node);
                next_restart += spec.restart_every;
            }
            next_check = Instant::now() + spec.check_every;
        }
        let churned = c.pods.len() - 1;
        if churned < spec.target_pods || rng.random_bool(0.5) && churned < 2 * spec.target_pods {
            let node = &nodes[rng.random_range(0..nodes.len())];
            match c.add_pod(node, "churn") {
                Ok(i) => {
                    adds += 1;
                    servers.serve(c.pods[i].netns.path(), c.pods[i].name.clone());
                }
                Err(e) => report.failures.push(format!("ADD on {node}: {e:#}")),
            }
        } else {
            let i = 1 + rng.random_range(0..churned);
            let name = c.pods[i].name.clone();
            servers.stop(&name);
            match c.delete_pod(i) {
                Ok(()) => dels += 1,
                Err(e) => report.failures.push(format!("DEL of {name}: {e:#}")),
            }
        }
    }

    // Everything goes; what is left after the garbage collectors' grace is a leftover.
    drop(servers);
    while c.pods.len() > 1 {
        let name = c.pods[1].name.clone();
        if let Err(e) = c.delete_pod(1) {
            report.failures.push(format!("DEL of {name}: {e:#}"));
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (n, text) = c.ipam_check();
        let mut left = left_over(&c);
        if n != 0 {
            left.push(text);
        }
        if left.is_empty() || Instant::now() > deadline {
            report.left_at_end = left;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    say(&format!(
        "[{:6.1}s] done: {adds} ADDs, {dels} DELs, {} agent restarts, {} failures, {} left over",
        t0.elapsed().as_secs_f64(),
        report.restarts,
        report.failures.len(),
        report.left_at_end.len()
    ));
    let (prefix, pids) = (c.lab.prefix().to_string(), c.pids());
    drop(c);
    crate::assert_nothing_left(&prefix, &pids);
    Ok(report)
}

fn checkpoint(
    c: &Cluster,
    probe_ns: &str,
    probe_name: &str,
    t0: Instant,
    adds: usize,
    dels: usize,
) -> Checkpoint {
    let at = t0.elapsed();
    let (findings, _) = c.ipam_check();
    // Routes to the newest pods may still be on their way: up to 20 s to settle.
    let deadline = Instant::now() + Duration::from_secs(20);
    let wrong = loop {
        let wrong: Vec<String> = c
            .pods
            .iter()
            .filter(|p| p.name != probe_name)
            .filter_map(|p| match who_answers(probe_ns, p.ip) {
                Ok(got) if got == p.name => None,
                other => Some(format!("{} ({}): {other:?}", p.ip, p.name)),
            })
            .collect();
        if wrong.is_empty() || Instant::now() > deadline {
            break wrong;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let agent_rss = c
        .lab
        .nodes
        .iter()
        .zip(c.agent_pids_by_node())
        .filter_map(|(n, pid)| Some((n.name.clone(), (pid?, crate::process::rss_kib(pid?)))))
        .collect();
    Checkpoint {
        at,
        pods: c.pods.len() - 1,
        adds,
        dels,
        findings,
        wrong_responders: wrong,
        agent_rss,
    }
}
