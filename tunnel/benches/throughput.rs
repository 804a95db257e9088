//! iperf3 between pods on two nodes (same underlay subnet) in each mode, against iperf3
//! between the two node namespaces over the bare underlay, in the same run; VXLAN also
//! against a VXLAN device made by hand with `ip link` (the kernel's reference).
//!
//! `cargo bench -p tessera-tunnel --bench throughput [-- --seconds N --rounds N]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{ensure, pod, pod_ip};
use tessera_testbed::bench_results::median;
use tessera_testbed::{Child, Lab, LabSpec, Netns};
use tessera_tunnel::Mode;

/// Gbit/s received, from `client` to `server_ip` (server running in `server`).
fn iperf(server: &Netns, client: &Netns, server_ip: &str, streams: u32, seconds: u32) -> f64 {
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "-B", server_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut srv = Child::spawn(cmd, "iperf3 server").expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .exec(
            "iperf3",
            &[
                "-c",
                server_ip,
                "-J",
                "-t",
                &seconds.to_string(),
                "-P",
                &streams.to_string(),
            ],
        )
        .expect("iperf3 -c");
    srv.stop(Duration::from_secs(2));
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// The reference: a VXLAN device and entries made by hand with iproute2, as in the test
/// bed recipe, in place of Tessera's.
fn hand_made_vxlan(lab: &Lab, up: bool) {
    for (i, n) in lab.nodes.iter().enumerate() {
        if !up {
            n.netns.ip(&["link", "del", "vxlan.ref"]).expect("del ref");
            continue;
        }
        let _ = n.netns.ip(&["link", "del", "vxlan.calico"]);
        n.netns
            .ip(&[
                "link",
                "add",
                "vxlan.ref",
                "type",
                "vxlan",
                "id",
                "4096",
                "dstport",
                "4789",
                "local",
                &n.ipv4.ip().to_string(),
                "dev",
                "eth0",
                "nolearning",
            ])
            .expect("ref dev");
        n.netns
            .ip(&[
                "link",
                "set",
                "vxlan.ref",
                "address",
                &format!("66:00:00:00:00:0{}", i + 1),
                "mtu",
                "1450",
                "up",
            ])
            .expect("ref up");
        n.netns
            .ip(&[
                "addr",
                "add",
                &format!("10.244.{}.0/32", i + 1),
                "dev",
                "vxlan.ref",
            ])
            .expect("ref addr");
    }
    if !up {
        return;
    }
    for (i, n) in lab.nodes.iter().enumerate() {
        let j = if i == 0 { 2 } else { 1 };
        let other = &lab.nodes[j - 1];
        n.netns
            .ip(&[
                "neigh",
                "add",
                &format!("10.244.{j}.0"),
                "lladdr",
                &format!("66:00:00:00:00:0{j}"),
                "dev",
                "vxlan.ref",
                "nud",
                "permanent",
            ])
            .expect("neigh");
        n.netns
            .exec(
                "bridge",
                &[
                    "fdb",
                    "add",
                    &format!("66:00:00:00:00:0{j}"),
                    "dev",
                    "vxlan.ref",
                    "dst",
                    &other.ipv4.ip().to_string(),
                ],
            )
            .expect("fdb");
        n.netns
            .ip(&[
                "route",
                "replace",
                &format!("10.244.{j}.0/26"),
                "via",
                &format!("10.244.{j}.0"),
                "dev",
                "vxlan.ref",
                "onlink",
            ])
            .expect("route");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u32| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (seconds, rounds) = (arg("--seconds", 3), arg("--rounds", 5));
    let lab = Lab::new(
        "tunnel_bench",
        LabSpec {
            nodes: 2,
            subnets: 1,
            etcd: false,
        },
    )
    .expect("lab");
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let pods: Vec<Netns> = (1..=2).map(|i| pod(&lab, i)).collect();
    let underlay = n2.ipv4.ip().to_string();
    // Pod MTU as the node agent sets it per mode: the underlay's for native routing, 50 less
    // for VXLAN.
    let set_mtu = |mtu: &str| {
        for p in &pods {
            p.ip(&["link", "set", "eth0", "mtu", mtu]).expect("pod mtu");
        }
    };
    let paths = [
        "bare underlay (node to node)",
        "pods, native (CrossSubnet, same subnet)",
        "pods, Tessera VXLAN (Always)",
        "pods, hand-made VXLAN (reference)",
    ];
    // results[path][streams index] = samples; the paths are interleaved in every round so that
    // drift on the shared machine hits all of them alike.
    let mut results = vec![[Vec::new(), Vec::new()]; paths.len()];
    for _ in 0..rounds {
        for (k, streams) in [1u32, 4].into_iter().enumerate() {
            results[0][k].push(iperf(&n2.netns, &n1.netns, &underlay, streams, seconds));
            for i in 1..=2 {
                ensure(&lab, i, Mode::CrossSubnet).expect("ensure");
            }
            set_mtu("1500");
            results[1][k].push(iperf(&pods[1], &pods[0], &pod_ip(2), streams, seconds));
            set_mtu("1450");
            for i in 1..=2 {
                ensure(&lab, i, Mode::Always).expect("ensure");
            }
            results[2][k].push(iperf(&pods[1], &pods[0], &pod_ip(2), streams, seconds));
            hand_made_vxlan(&lab, true);
            results[3][k].push(iperf(&pods[1], &pods[0], &pod_ip(2), streams, seconds));
            hand_made_vxlan(&lab, false);
        }
    }
    // Ratios are medians of the rounds' ratios (each round's paths ran back to back).
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    println!("iperf3, {seconds} s per run, {rounds} interleaved rounds, Gbit/s received (median); ratio = median of the rounds' ratios to the bare underlay");
    println!();
    println!("| path | 1 stream | ratio | 4 streams | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (p, r) in paths.iter().zip(&results) {
        println!(
            "| {p} | {:.2} | {:.2} | {:.2} | {:.2} |",
            median(r[0].clone()),
            ratio(&r[0], &results[0][0]),
            median(r[1].clone()),
            ratio(&r[1], &results[0][1]),
        );
    }
    use tessera_testbed::bench_results::{BenchRun, Target};
    let mut run = BenchRun::new(
        "tunnel_throughput",
        "cargo bench -p tessera-tunnel --bench throughput",
    );
    for (k, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
        run.ratio(
            &format!("pod throughput, native, {streams} / bare underlay"),
            ratio(&results[1][k], &results[0][k]),
            Some(Target::AtLeast(0.95)),
        )
        .ratio(
            &format!("pod throughput, VXLAN, {streams} / hand-made VXLAN"),
            ratio(&results[2][k], &results[3][k]),
            Some(Target::AtLeast(0.95)),
        );
    }
    run.save();
    drop(pods);
    drop(lab);
}
