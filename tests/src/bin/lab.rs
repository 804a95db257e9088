//! `tessera-lab`: the README's main command. Brings up etcd, a router and nodes as network
//! namespaces on two underlay subnets, a `tessera-node` agent on each node, one pool per
//! mode (BGP, VXLAN CrossSubnet, VXLAN Always, and IPIP when the kernel has it), a pod per
//! node and pool through the real CNI plugin, then prints who reaches whom, with latency.
//! Everything is torn down at the end (or on Ctrl-C); `--keep` leaves it up for poking.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tessera_testbed::cluster::{Cluster, ClusterSpec, MODE_POOLS as POOLS};
use tessera_testbed::LabSpec;

#[derive(Parser)]
#[command(
    about = "Tessera's lab: nodes as network namespaces, pods talking across them",
    name = "tessera-lab",
    version = tessera_datastore::VERSION
)]
struct Args {
    /// Nodes (spread over two underlay subnets).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Keep the lab up (until Ctrl-C) and print commands to poke around.
    #[arg(long)]
    keep: bool,
    /// Three QEMU guests booting Debian's kernel instead of namespaces (IPIP needs the
    /// ipip module this kernel may lack); each runs the agent and the CNI plugin inside.
    #[arg(long)]
    vms: bool,
}

const IPIP_POOL: &str = "
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: ipip-always }
spec: { cidr: 10.244.48.0/20, blockSize: 26, ipipMode: Always }
";

/// Blocks in the newest format, as `deploy/pools/ipam-configuration.yaml` sets it: the
/// agents route from blocks whose allocations are keys of their own.
const IPAM_CONFIGURATION: &str = include_str!("../../../deploy/pools/ipam-configuration.yaml");

fn interrupted(flag: &AtomicBool) -> anyhow::Result<()> {
    if flag.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Prints who reaches whom among `rows` (pod index, its node, its address): a row per pod,
/// a column per pod it pings, the round trip in ms or FAIL. Returns (pairs tried, all
/// reached).
fn ping_table(
    title: &str,
    rows: &[(usize, String, std::net::IpAddr)],
    stop: &AtomicBool,
    mut ping: impl FnMut(usize, std::net::IpAddr) -> Option<f64>,
) -> anyhow::Result<(usize, bool)> {
    let w = rows
        .iter()
        .map(|(_, node, a)| node.len() + 1 + a.to_string().len())
        .max()
        .unwrap_or(0);
    println!("\n{title}: ping from row pod to column pod (ms)");
    print!("{:>w$}", "");
    for (_, node, _) in rows {
        print!(" {node:>8}");
    }
    println!();
    let (mut pairs, mut all_ok) = (0, true);
    for (i, node, from) in rows {
        print!("{:>w$}", format!("{node} {from}"));
        for (_, _, to) in rows {
            if to == from {
                print!(" {:>8}", "-");
                continue;
            }
            interrupted(stop)?;
            pairs += 1;
            match ping(*i, *to) {
                Some(ms) => print!(" {:>8}", format!("{ms:.3}")),
                None => {
                    all_ok = false;
                    print!(" {:>8}", "FAIL");
                }
            }
        }
        println!();
    }
    Ok((pairs, all_ok))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    // Ctrl-C / SIGTERM: stop at the next step; dropping the cluster removes everything.
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                if let (Ok(mut i), Ok(mut t)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    tokio::select! { _ = i.recv() => {}, _ = t.recv() => {} }
                    stop.store(true, Ordering::SeqCst);
                }
            });
        });
    }
    let outcome = if args.vms {
        run_vms(&args, &stop)
    } else {
        run(&args, &stop)
    };
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("tessera-lab: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: &Args, stop: &AtomicBool) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
    if args.nodes < 2 {
        anyhow::bail!("--nodes: at least 2");
    }
    step("building the underlay: router, control namespace with etcd, nodes on 198.18.0.0/24 and 198.18.1.0/24");
    let mut c = Cluster::new(
        "lab",
        ClusterSpec {
            lab: LabSpec {
                nodes: args.nodes,
                subnets: 2,
                etcd: true,
            },
            pools: format!("{POOLS}\n---\n{IPAM_CONFIGURATION}"),
            ..Default::default()
        },
    )?;
    let ipip = c.lab.nodes[0].netns.ip(&["link", "show", "tunl0"]).is_ok();
    let mut pools = vec!["bgp", "vxlan-crosssubnet", "vxlan-always"];
    if ipip {
        c.lab.apply_yaml(&format!("{POOLS}{IPIP_POOL}"))?;
        pools.push("ipip-always");
    } else {
        step("IPIP pools skipped: this kernel has no ipip module (tunl0); the IPIP tests run in QEMU VMs");
    }
    interrupted(stop)?;
    step(&format!(
        "starting tessera-node on {} nodes",
        c.lab.nodes.len()
    ));
    c.start_agents()?;
    c.wait_ready(Duration::from_secs(60))?;
    step("every agent ready (datastore in sync, devices present, BGP sessions up)");
    interrupted(stop)?;
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    for pool in &pools {
        // The VXLAN Always pods are dual-stack: IPv6 from a VXLAN pool over the IPv6 underlay.
        let pool6 = (*pool == "vxlan-always").then_some("vxlan-v6");
        for n in &nodes {
            c.add_pod_with(n, pool, pool6)?;
            interrupted(stop)?;
        }
    }
    step(&format!(
        "{} pods started through the CNI plugin",
        c.pods.len()
    ));
    // The pools went in with `tesseractl apply`; here is what IPAM made of them.
    let ctl = |args: &[&str]| -> anyhow::Result<String> {
        let mut full = vec!["--etcd-endpoints".to_string(), c.lab.etcd_endpoint()];
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        c.lab.ctl.exec(
            &tessera_testbed::cluster::bin("tesseractl").to_string_lossy(),
            &full,
        )
    };
    println!("\n$ tesseractl get ippools\n{}", ctl(&["get", "ippools"])?);
    println!(
        "$ tesseractl get ipamconfigurations\n{}",
        ctl(&["get", "ipamconfigurations"])?
    );
    println!("$ tesseractl ipam show\n{}", ctl(&["ipam", "show"])?);
    let n0 = &c.lab.nodes[0];
    let status = n0.netns.exec(
        &tessera_testbed::cluster::bin("tesseractl").to_string_lossy(),
        &[
            "node",
            "status",
            "--agent",
            &format!("unix:{}", c.health_socket(&n0.name).display()),
        ],
    )?;
    println!("$ tesseractl node status   # on {}\n{status}", n0.name);

    // Every pod to every pod of its pool on other nodes (the first packets may wait for
    // routes to converge, so each pair gets a few seconds before it counts as failed).
    let mut all_ok = true;
    let mut pairs = 0;
    let mut tables: Vec<(String, Vec<(usize, std::net::IpAddr)>)> = pools
        .iter()
        .map(|pool| {
            let pods = (0..c.pods.len())
                .filter(|&i| c.pods[i].pool == *pool)
                .map(|i| (i, std::net::IpAddr::V4(c.pods[i].ip)))
                .collect();
            (pool.to_string(), pods)
        })
        .collect();
    tables.push((
        "vxlan-v6 (IPv6)".into(),
        c.pods
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.ip6.map(|a| (i, std::net::IpAddr::V6(a))))
            .collect(),
    ));
    for (title, pods) in &tables {
        let rows: Vec<(usize, String, std::net::IpAddr)> = pods
            .iter()
            .map(|&(i, a)| (i, c.pods[i].node.clone(), a))
            .collect();
        let (n, ok) = ping_table(title, &rows, stop, |i, to| {
            let ok = c.wait_ping(i, to, Duration::from_secs(10));
            if ok {
                c.ping(i, to)
            } else {
                None
            }
        })?;
        pairs += n;
        all_ok &= ok;
    }
    // natOutgoing: from a bgp-pool pod to the router's outside-facing address happens in
    // the tests (203.0.113.0/24); here, node to remote pod:
    let far = c
        .pods
        .iter()
        .position(|p| p.node != nodes[0] && p.pool == "bgp");
    if let Some(j) = far {
        let ok = tessera_testbed::cluster::ping_in(&c.lab.nodes[0].netns, c.pods[j].ip, 3);
        println!(
            "\nnode {} -> pod {} on {}: {}",
            nodes[0],
            c.pods[j].ip,
            c.pods[j].node,
            ok.map(|ms| format!("{ms:.3} ms")).unwrap_or("FAIL".into())
        );
        all_ok &= ok.is_some();
    }
    println!();
    step(&format!(
        "{pairs} pod pairs across {} tables: {}",
        tables.len(),
        if all_ok {
            "all reachable"
        } else {
            "SOME FAILED"
        }
    ));
    if args.keep {
        let n0 = &c.lab.nodes[0];
        println!("\nThe lab stays up until Ctrl-C. To poke around:");
        println!("  ip netns list | grep {}", c.lab.prefix());
        println!(
            "  ip -n {} route                       # node1's routes (proto 80: BGP, 81: tunnels)",
            n0.netns.name()
        );
        println!(
            "  ip netns exec {} nft list table inet tessera",
            n0.netns.name()
        );
        println!(
            "  ip netns exec {} ping {}",
            c.pods[0].netns.name(),
            c.pods[c.pods.len() - 1].ip
        );
        println!(
            "  ip netns exec {} {} --etcd-endpoints {} get nodes -o wide",
            c.lab.ctl.name(),
            tessera_testbed::cluster::bin("tesseractl").display(),
            c.lab.etcd_endpoint()
        );
        println!(
            "  curl -s --unix-socket {} http://agent/metrics",
            c.health_socket(&n0.name).display()
        );
        println!(
            "  less {}                    # node1's agent log",
            c.agent_log(&n0.name).display()
        );
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    step("tearing down");
    c.finish();
    step("done: nothing left behind");
    Ok(all_ok)
}

/// The pools of the VM lab: the namespace lab's IPv4 pools (the guests' underlay is IPv4
/// only) and IPIP Always and CrossSubnet (the guests' kernel has the module).
fn vm_pools() -> String {
    let v4: Vec<&str> = POOLS
        .split("---")
        .filter(|doc| !doc.contains("vxlan-v6"))
        .collect();
    format!(
        "{}\n---\n{}\n---\napiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: ipip-crosssubnet }}\nspec: {{ cidr: 10.244.64.0/20, blockSize: 26, ipipMode: CrossSubnet }}\n",
        v4.join("---"),
        IPIP_POOL.trim().trim_start_matches("---")
    )
}

fn run_vms(args: &Args, stop: &AtomicBool) -> anyhow::Result<bool> {
    use tessera_testbed::vm_cluster::{VmCluster, IP, OUTSIDE};
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
    step("booting 3 QEMU guests (Debian's kernel, TCG): vm1, vm2 on 198.18.10.0/24, vm3 on 198.18.11.0/24; etcd and a BGP router in the router namespace");
    let mut c = VmCluster::new("lab", &vm_pools())?;
    step("every agent ready (inside its guest)");
    let pools = [
        "bgp",
        "vxlan-crosssubnet",
        "vxlan-always",
        "ipip-always",
        "ipip-crosssubnet",
    ];
    for pool in pools {
        for g in 0..c.guests.len() {
            c.add_pod(g, pool)?;
            interrupted(stop)?;
        }
    }
    step(&format!(
        "{} pods started through the CNI plugin inside the guests",
        c.pods.len()
    ));
    println!(
        "\n$ ip route   # on vm1\n{}",
        c.sh_ok(0, &format!("{IP} route"))?
    );
    let (mut pairs, mut all_ok) = (0, true);
    for pool in pools {
        let rows: Vec<(usize, String, std::net::IpAddr)> = (0..c.pods.len())
            .filter(|&i| c.pods[i].pool == pool)
            .map(|i| {
                let p = &c.pods[i];
                (
                    i,
                    c.guests[p.guest].name.clone(),
                    std::net::IpAddr::V4(p.ip),
                )
            })
            .collect();
        let (n, ok) = ping_table(pool, &rows, stop, |i, to| match to {
            std::net::IpAddr::V4(to) => c.wait_ping(i, to, Duration::from_secs(20)),
            std::net::IpAddr::V6(_) => None,
        })?;
        pairs += n;
        all_ok &= ok;
    }
    let nat = c.ping(0, OUTSIDE);
    println!(
        "\nnatOutgoing: pod {} (bgp pool) -> outside {OUTSIDE}: {}",
        c.pods[0].ip,
        nat.map(|ms| format!("{ms:.3} ms")).unwrap_or("FAIL".into())
    );
    all_ok &= nat.is_some();
    println!();
    step(&format!(
        "{pairs} pod pairs across {} pools: {}",
        pools.len(),
        if all_ok {
            "all reachable"
        } else {
            "SOME FAILED"
        }
    ));
    if args.keep {
        println!(
            "\nThe guests stay up until Ctrl-C. Their underlay is inside namespace {}:",
            c.router.name()
        );
        println!(
            "  ip netns exec {} tcpdump -ni br1 ip proto 4",
            c.router.name()
        );
        println!(
            "  less {}/vm1.console                # vm1's serial console",
            c.dir.path().display()
        );
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    step("tearing down");
    c.finish();
    step("done: nothing left behind");
    Ok(all_ok)
}
