//! ADD+DEL latency of `tessera` (with in-process Tessera IPAM in etcd) against Debian's
//! reference `ptp` + `host-local` doing the same pods, in the same run and the same lab node,
//! both driven by Tessera's spec driver through `nsenter` into the node namespace.
//!
//! `cargo bench -p tessera-cni --bench cni_latency [-- --pairs N] [--rounds R]`
//!
//! Each row is `R` interleaved rounds (the side that goes first alternates), `N / R` pairs
//! per round (per worker when parallel). The ratios recorded are the medians of the rounds'
//! ratios, so that one noisy round cannot decide; the latencies shown are over all rounds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_cni::driver::{Attachment, Driver};
use tessera_testbed::{Lab, LabSpec, Netns};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latencies of ADD+DEL pairs, and of the ADDs and DELs alone.
#[derive(Default)]
struct Samples {
    /// Machine CPU time over the run, and the pairs it was spent on.
    busy: Duration,
    pairs: usize,
    pair: Vec<Duration>,
    add: Vec<Duration>,
    del: Vec<Duration>,
}

/// `threads` workers, each with its own pod namespace, doing `pairs` ADD+DEL each.
/// CPU time the whole machine has spent busy (user, system, interrupts), from /proc/stat:
/// the plugins, the kernel's work for them and etcd's.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        // user nice system idle iowait irq softirq steal: all but idle, iowait and steal.
        .filter(|(i, _)| ![3, 4, 7].contains(i))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    // /proc/stat counts in USER_HZ, 100 per second on Linux.
    Duration::from_millis(ticks * 10)
}

fn measure(driver: &Driver, pods: &[Netns], threads: usize, pairs: usize, tag: &str) -> Samples {
    let busy_before = machine_busy();
    let all: Vec<(Duration, Duration)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let ns = &pods[t];
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(pairs);
                    for i in 0..pairs {
                        let att = Attachment {
                            container_id: format!("{tag}{t:03}{i:06}"),
                            netns: ns.path(),
                            ifname: "eth0".into(),
                            args: [
                                ("IgnoreUnknown", "1"),
                                ("K8S_POD_NAMESPACE", "bench"),
                                ("K8S_POD_NAME", &format!("{tag}-{t}")),
                            ]
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                            capability_args: Default::default(),
                        };
                        let start = Instant::now();
                        let r = driver.add(&att).expect("ADD");
                        let added = start.elapsed();
                        driver.del(&att, Some(&r)).expect("DEL");
                        lat.push((added, start.elapsed() - added));
                    }
                    lat
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    Samples {
        busy: machine_busy().saturating_sub(busy_before),
        pairs: all.len(),
        pair: all.iter().map(|(a, d)| *a + *d).collect(),
        add: all.iter().map(|(a, _)| *a).collect(),
        del: all.iter().map(|(_, d)| *d).collect(),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let pairs: usize = args
        .iter()
        .position(|a| a == "--pairs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        // 40 per round: a round's p99 is then not just its slowest pair.
        .unwrap_or(200);
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    let only_parallel = args.iter().any(|a| a == "--only-parallel");
    let lab = Lab::new(
        "cni_bench",
        LabSpec {
            nodes: 1,
            subnets: 1,
            etcd: true,
        },
    )?;
    lab.apply_yaml(
        "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: pods }\nspec: { cidr: 10.244.0.0/16 }\n",
    )?;
    let data = tempfile::tempdir()?;
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_tessera"));
    let bins = vec![
        ours.parent().expect("bin dir").to_path_buf(),
        PathBuf::from("/usr/lib/cni"),
    ];
    let node = lab.node("node1").netns.path();
    let tessera = Driver::from_conflist(
        &json!({ "cniVersion": "1.0.0", "name": "bench", "plugins": [{
            "type": "tessera", "nodename": "node1", "mtu": 1500,
            "ipamLockFile": data.path().join("ipam-node1.lock"),
            "datastore": { "etcdEndpoints": [lab.etcd_endpoint()] },
            "logFile": std::env::var("BENCH_CNI_LOG").map(PathBuf::from).unwrap_or_else(|_| data.path().join("cni.log")),
            "ipam": { "type": "tessera-ipam" }
        }]}),
        bins.clone(),
    )?
    .in_netns(&node);
    let reference = Driver::from_conflist(
        &json!({ "cniVersion": "1.0.0", "name": "bench", "plugins": [{
            "type": "ptp", "ipMasq": false, "mtu": 1500,
            "ipam": { "type": "host-local", "dataDir": data.path().join("host-local"),
                      "ranges": [[{ "subnet": "10.245.0.0/16" }]] }
        }]}),
        bins,
    )?
    .in_netns(&node);
    let pods: Vec<Netns> = (0..10)
        .map(|i| Netns::new(&format!("{}-b{i}", lab.prefix())))
        .collect::<anyhow::Result<_>>()?;

    println!("ADD+DEL latency, {pairs} pairs per row (sequential) or per worker (parallel), {rounds} interleaved rounds; ratios tessera / ptp+host-local, medians of the rounds'");
    println!();
    let mut run = tessera_testbed::bench_results::BenchRun::new(
        "cni_latency",
        "cargo bench -p tessera-cni --bench cni_latency",
    );
    let at_most = Some(tessera_testbed::bench_results::Target::AtMost(0.8));
    println!("| run | plugin | ADD+DEL p50 ms | ADD+DEL p99 ms | ADD p50 ms | DEL p50 ms | machine CPU ms per pair | p50 ratio | p99 ratio |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, threads) in [("sequential", 1usize), ("10 in parallel", 10)] {
        if only_parallel && threads == 1 {
            continue;
        }
        // Interleaved rounds, so drift on the machine hits both sides alike.
        let mut t = Samples::default();
        let mut r = Samples::default();
        let (mut p50_ratios, mut p99_ratios) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let per_round = (pairs / rounds).max(1);
            let run_ref = || measure(&reference, &pods, threads, per_round, &format!("r{round}"));
            let run_ours = || measure(&tessera, &pods, threads, per_round, &format!("t{round}"));
            let (mut rs, mut ts) = if round % 2 == 0 {
                let rs = run_ref();
                (rs, run_ours())
            } else {
                let ts = run_ours();
                (run_ref(), ts)
            };
            rs.pair.sort();
            ts.pair.sort();
            let ratio = |p: f64| {
                percentile(&ts.pair, p).as_secs_f64() / percentile(&rs.pair, p).as_secs_f64()
            };
            p50_ratios.push(ratio(0.5));
            p99_ratios.push(ratio(0.99));
            for (all, one) in [(&mut r, rs), (&mut t, ts)] {
                all.busy += one.busy;
                all.pairs += one.pairs;
                all.pair.extend(one.pair);
                all.add.extend(one.add);
                all.del.extend(one.del);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p50_ratio, p99_ratio) = (median(&mut p50_ratios), median(&mut p99_ratios));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let row = |s: &mut Samples| {
            s.pair.sort();
            s.add.sort();
            s.del.sort();
            (
                percentile(&s.pair, 0.5),
                percentile(&s.pair, 0.99),
                percentile(&s.add, 0.5),
                percentile(&s.del, 0.5),
            )
        };
        let (r50, r99, ra, rd) = row(&mut r);
        let (t50, t99, ta, td) = row(&mut t);
        let cpu = |s: &Samples| ms(s.busy) / s.pairs.max(1) as f64;
        println!(
            "| {label} | ptp + host-local | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | | |",
            ms(r50),
            ms(r99),
            ms(ra),
            ms(rd),
            cpu(&r)
        );
        println!(
            "| {label} | tessera | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | **{p50_ratio:.2}** | **{p99_ratio:.2}** |",
            ms(t50),
            ms(t99),
            ms(ta),
            ms(td),
            cpu(&t),
        );
        run.ratio(
            &format!("CNI ADD+DEL p50, {label} / ptp+host-local"),
            p50_ratio,
            at_most,
        )
        .ratio(
            &format!("CNI ADD+DEL p99, {label} / ptp+host-local"),
            p99_ratio,
            at_most,
        );
    }
    run.save();
    Ok(())
}
