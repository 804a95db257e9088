//! IPIP throughput with the real agent, in the test bed's cluster of QEMU TCG guests booting
//! Debian's kernel (this development kernel has no ipip module): pods on vm1 and vm2 (one
//! subnet) of a pool with `ipipMode: Always`, wired by the CNI plugin. Three paths, in
//! interleaved rounds in the same boot:
//! - the underlay: node to node;
//! - pod to pod over `tunl0` as the agent configured it;
//! - pod to pod over an IPIP device made by hand with iproute2 (`ip tunnel add hand0 mode
//!   ipip local A remote B`, MTU 1480), the pods' /32 routes pointed at it for the round.
//!
//! TCG emulation bounds every number; what the ratios show is whether the agent's device
//! costs anything over a hand-made one. Needs the release binaries:
//! `cargo build --release --workspace --bins && cargo bench -p tessera-tunnel --bench ipip_vm`

use std::time::Duration;

use tessera_testbed::bench_results::median;
use tessera_testbed::vm::iperf3_mbits as mbits;
use tessera_testbed::vm_cluster::{VmCluster, IP};

const POOL: &str = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: ipip }\nspec: { cidr: 10.244.48.0/20, blockSize: 26, ipipMode: Always }\n";
const ROUNDS: usize = 3;
const SECONDS: u32 = 3;

fn main() -> anyhow::Result<()> {
    let mut c = VmCluster::new("ipip_bench", POOL)?;
    let (pa, pb) = (c.add_pod(0, "ipip")?, c.add_pod(1, "ipip")?);
    let (ipa, ipb) = (c.pods[pa].ip, c.pods[pb].ip);
    let (na, nb) = (c.guests[0].ip, c.guests[1].ip);
    anyhow::ensure!(
        c.wait_ping(pa, ipb, Duration::from_secs(60)).is_some(),
        "pods never reached each other"
    );
    // Servers: one in vm2's pod, one on vm2 itself for the underlay.
    c.pod_sh(pb, "iperf3 -s -D")?;
    c.sh_ok(1, "iperf3 -s -D -p 5202")?;
    // The hand-made device on both sides.
    c.sh_ok(0, &format!("{IP} tunnel add hand0 mode ipip local {na} remote {nb} && {IP} link set hand0 mtu 1480 up"))?;
    c.sh_ok(1, &format!("{IP} tunnel add hand0 mode ipip local {nb} remote {na} && {IP} link set hand0 mtu 1480 up"))?;
    let by_hand = |on: bool| -> anyhow::Result<()> {
        let verb = if on { "replace" } else { "del" };
        let dev = if on { " dev hand0" } else { "" };
        c.sh_ok(0, &format!("{IP} route {verb} {ipb}/32{dev}"))?;
        c.sh_ok(1, &format!("{IP} route {verb} {ipa}/32{dev}"))?;
        Ok(())
    };
    let (mut under, mut agent, mut hand) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let u = c.sh_ok(0, &format!("iperf3 -c {nb} -p 5202 -t {SECONDS} -f m"))?;
        under.push(mbits(&u).unwrap_or(0.0));
        let a = c.pod_sh(pa, &format!("iperf3 -c {ipb} -t {SECONDS} -f m"))?;
        agent.push(mbits(&a.text).unwrap_or(0.0));
        by_hand(true)?;
        let h = c.pod_sh(pa, &format!("iperf3 -c {ipb} -t {SECONDS} -f m"))?;
        hand.push(mbits(&h.text).unwrap_or(0.0));
        by_hand(false)?;
    }
    // The hand-made rounds really went over hand0 (its counters moved).
    let stats = c.sh_ok(0, &format!("{IP} -s link show hand0"))?;
    println!("iperf3 in QEMU TCG guests (Debian's kernel), {SECONDS} s x {ROUNDS} interleaved rounds, median Mbit/s");
    println!("underlay {under:?}, agent's tunl0 {agent:?}, hand-made {hand:?}");
    println!();
    let (u, a, h) = (median(under), median(agent), median(hand));
    println!("| path | Mbit/s | ratio to the underlay | ratio to hand-made |");
    println!("|---|---:|---:|---:|");
    println!("| underlay (vm1 to vm2) | {u:.0} | 1.00 | |");
    println!(
        "| pods over tunl0, the agent's | {a:.0} | {:.2} | {:.2} |",
        a / u,
        a / h
    );
    println!(
        "| pods over hand0, by hand | {h:.0} | {:.2} | 1.00 |",
        h / u
    );
    println!("\nhand0 on vm1:\n{stats}");
    use tessera_testbed::bench_results::{BenchRun, Target};
    BenchRun::new(
        "tunnel_ipip_vm",
        "cargo bench -p tessera-tunnel --bench ipip_vm",
    )
    .ratio(
        "pod throughput, IPIP (QEMU guests) / hand-made IPIP",
        a / h,
        Some(Target::AtLeast(0.95)),
    )
    .save();
    c.finish();
    Ok(())
}
