//! Convergence against BIRD 2, in the same run: a feeder (tessera-routed originating the
//! prefixes) sends 100,000 IPv4 and 20,000 IPv6 prefixes to a receiver, which is (a) Tessera,
//! (b) BIRD with an equivalent config. Measured: time from Established to all prefixes in the
//! RIB, to all in the receiver namespace's kernel table, and the receiver's resident memory.
//!
//! `cargo bench -p tessera-routed --bench convergence [-- --v4 N --v6 M]`

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_testbed::{Child, Lab, LabSpec, Netns};

const ROUTED: &str = env!("CARGO_BIN_EXE_tessera-routed");

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn spawn(ns: &Netns, program: &str, args: &[&str], log: &Path) -> Child {
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    Child::spawn(cmd, program).expect("spawn")
}

fn kernel_count(ns: &Netns, proto: &str) -> usize {
    let v4 = ns
        .ip(&["-4", "route", "show", "proto", proto])
        .unwrap_or_default()
        .lines()
        .count();
    let v6 = ns
        .ip(&["-6", "route", "show", "proto", proto])
        .unwrap_or_default()
        .lines()
        .count();
    v4 + v6
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Result {
    rib: Duration,
    kernel: Duration,
    rss_kib: u64,
}

/// Polls `established`, then `rib_count` and `kernel` until all `n` prefixes are there.
fn measure(
    n: usize,
    mut established: impl FnMut() -> bool,
    mut rib_count: impl FnMut() -> usize,
    mut kernel: impl FnMut() -> usize,
    pid: u32,
) -> Result {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !established() {
        assert!(Instant::now() < deadline, "session never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let (mut rib, mut kern) = (None, None);
    while rib.is_none() || kern.is_none() {
        assert!(Instant::now() < deadline, "never converged");
        if rib.is_none() && rib_count() >= n {
            rib = Some(t0.elapsed());
        }
        if kern.is_none() && kernel() >= n {
            kern = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Result {
        rib: rib.unwrap_or_default(),
        kernel: kern.unwrap_or_default(),
        rss_kib: rss_kib(pid),
    }
}

fn main() -> anyhow::Result<()> {
    let (n4, n6) = (arg("--v4", 100_000), arg("--v6", 20_000));
    let lab = Lab::new(
        "bgp_bench",
        LabSpec {
            nodes: 2,
            subnets: 1,
            etcd: false,
        },
    )?;
    let (feed, recv) = (&lab.nodes[0], &lab.nodes[1]);
    let (fa, ra) = (feed.ipv4.ip().to_string(), recv.ipv4.ip().to_string());
    let (fa6, ra6) = (feed.ipv6.ip().to_string(), recv.ipv6.ip().to_string());
    let dir = tempfile::tempdir()?;
    let d = dir.path();

    // The feeder's prefixes: 10.0.0.0/8 in /24s, fd00:1::/32 in /48s.
    let mut nets = Vec::with_capacity(n4 + n6);
    for i in 0..n4 {
        nets.push(format!(
            "\"{}.{}.{}.0/24\"",
            10 + i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    for i in 0..n6 {
        nets.push(format!("\"fd00:1:{:x}::/48\"", i));
    }
    let feeder_conf = d.join("feeder.yaml");
    std::fs::write(
        &feeder_conf,
        format!(
            "asn: 64512\nrouterId: {fa}\nlisten: {fa}\nconnectRetrySeconds: 1\nnextHopV6: \"{fa6}\"\nkernel: {{ install: false }}\nnetworks: [{}]\npeers:\n  - {{ address: {ra}, asn: 64512, localAddress: {fa} }}\n",
            nets.join(", ")
        ),
    )?;
    let total = n4 + n6;
    println!(
        "Receiving {n4} IPv4 + {n6} IPv6 prefixes from a feeder over iBGP (time from Established)"
    );
    println!();
    println!("| receiver | to RIB (s) | to kernel (s) | RSS after (MiB) |");
    println!("|---|---:|---:|---:|");

    // (a) Tessera.
    let sock = d.join("recv.sock");
    let recv_conf = d.join("recv.yaml");
    std::fs::write(
        &recv_conf,
        format!(
            "asn: 64512\nrouterId: {ra}\nlisten: {ra}\nconnectRetrySeconds: 1\nnextHopV6: \"{ra6}\"\nstatusSocket: {}\npeers:\n  - {{ address: {fa}, asn: 64512, localAddress: {ra}, passive: true }}\n",
            sock.display()
        ),
    )?;
    let receiver = spawn(
        &recv.netns,
        ROUTED,
        &["run", "--config", &recv_conf.to_string_lossy()],
        &d.join("recv.log"),
    );
    let mut feeder = spawn(
        &feed.netns,
        ROUTED,
        &["run", "--config", &feeder_conf.to_string_lossy()],
        &d.join("feeder.log"),
    );
    let status = || -> serde_json::Value {
        let out = Command::new(ROUTED)
            .args(["status", "--socket", &sock.to_string_lossy()])
            .output();
        out.ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    };
    let t = measure(
        total,
        || status()["peers"][0]["state"] == "Established",
        || {
            status()["peers"][0]["prefixes_received"]
                .as_u64()
                .unwrap_or(0) as usize
        },
        || kernel_count(&recv.netns, "80"),
        receiver.pid(),
    );
    println!(
        "| tessera-routed | {:.2} | {:.2} | {:.1} |",
        t.rib.as_secs_f64(),
        t.kernel.as_secs_f64(),
        t.rss_kib as f64 / 1024.0
    );
    feeder.kill();
    drop(receiver);

    // (b) BIRD, equivalent: iBGP, import all, export to the kernel.
    let bird_conf = d.join("bird.conf");
    std::fs::write(
        &bird_conf,
        format!(
            "router id {ra};\nprotocol device {{ scan time 10; }}\nprotocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths off; }}\nprotocol kernel k6 {{ ipv6 {{ import none; export all; }}; }}\nprotocol bgp feeder {{\n  local {ra} as 64512;\n  neighbor {fa} as 64512;\n  direct;\n  passive on;\n  ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}\n"
        ),
    )?;
    let bsock = d.join("bird.ctl").to_string_lossy().into_owned();
    let bird = spawn(
        &recv.netns,
        "bird",
        &["-f", "-c", &bird_conf.to_string_lossy(), "-s", &bsock],
        &d.join("bird.log"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut feeder = spawn(
        &feed.netns,
        ROUTED,
        &["run", "--config", &feeder_conf.to_string_lossy()],
        &d.join("feeder2.log"),
    );
    let birdc = |args: &[&str]| -> String {
        Command::new("birdc")
            .args(["-s", &bsock])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let b = measure(
        total,
        || birdc(&["show", "protocols", "feeder"]).contains("Established"),
        || {
            // "12000 of 12000 routes for 12000 networks in table master4", one line per table.
            birdc(&["show", "route", "count"])
                .lines()
                .filter(|l| l.contains(" routes for "))
                .filter_map(|l| {
                    l.split_whitespace()
                        .next()
                        .and_then(|x| x.parse::<usize>().ok())
                })
                .sum()
        },
        || kernel_count(&recv.netns, "bird"),
        bird.pid(),
    );
    println!(
        "| BIRD 2 | {:.2} | {:.2} | {:.1} |",
        b.rib.as_secs_f64(),
        b.kernel.as_secs_f64(),
        b.rss_kib as f64 / 1024.0
    );
    feeder.kill();
    drop(bird);
    println!();
    println!(
        "ratios (tessera / BIRD): RIB {:.2}, kernel {:.2}, memory {:.2}",
        t.rib.as_secs_f64() / b.rib.as_secs_f64(),
        t.kernel.as_secs_f64() / b.kernel.as_secs_f64(),
        t.rss_kib as f64 / b.rss_kib.max(1) as f64
    );
    use tessera_testbed::bench_results::{BenchRun, Target};
    BenchRun::new(
        "routed_convergence",
        "cargo bench -p tessera-routed --bench convergence",
    )
    .ratio(
        "BGP: time to RIB / BIRD 2",
        t.rib.as_secs_f64() / b.rib.as_secs_f64(),
        Some(Target::AtMost(1.0)),
    )
    .ratio(
        "BGP: time to kernel / BIRD 2",
        t.kernel.as_secs_f64() / b.kernel.as_secs_f64(),
        Some(Target::AtMost(1.0)),
    )
    .ratio(
        "BGP: receiver memory / BIRD 2",
        t.rss_kib as f64 / b.rss_kib.max(1) as f64,
        Some(Target::AtMost(1.0)),
    )
    .save();
    drop(lab);
    Ok(())
}
