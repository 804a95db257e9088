//! netkit against veth as the pod device, where the kernel has netkit: the test bed's
//! cluster of QEMU TCG guests booting Debian's 6.12 cloud kernel (`CONFIG_NETKIT=y`; this
//! development kernel has no netkit), the real agent and CNI plugin. On vm1 and vm2 (one
//! subnet, a pool without encapsulation) a veth pod and a netkit pod each; in interleaved
//! rounds, iperf3 over:
//! - the underlay, vm1 to vm2;
//! - veth pod to veth pod;
//! - netkit pod to netkit pod.
//!
//! The ratios are medians of the rounds' ratios. TCG emulation bounds every number: what
//! they compare is the guest kernel's work per packet on each path, not what real hardware
//! reaches. Needs the release binaries:
//! `cargo build --release --workspace --bins && cargo bench -p tessera-cni --bench pod_device_vm`

use std::path::Path;
use std::time::Duration;

use tessera_testbed::bench_results::{median, BenchRun};
use tessera_testbed::vm::{iperf3_mbits, VM_ROOT_NETKIT};
use tessera_testbed::vm_cluster::VmCluster;

const POOL: &str = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: native }\nspec: { cidr: 10.244.64.0/20, blockSize: 26, ipipMode: Never, vxlanMode: Never }\n";
const ROUNDS: usize = 5;
const SECONDS: u32 = 3;

fn main() -> anyhow::Result<()> {
    let mut c = VmCluster::with_kernel("pod_dev_bench", POOL, Path::new(VM_ROOT_NETKIT))?;
    let kernel = c.sh_ok(0, "uname -r")?.trim().to_string();
    let veth = (
        c.add_pod_with(0, "native", Some("veth"))?,
        c.add_pod_with(1, "native", Some("veth"))?,
    );
    let netkit = (
        c.add_pod_with(0, "native", Some("netkit"))?,
        c.add_pod_with(1, "native", Some("netkit"))?,
    );
    for (from, to) in [veth, netkit] {
        let ip = c.pods[to].ip;
        anyhow::ensure!(
            c.wait_ping(from, ip, Duration::from_secs(60)).is_some(),
            "{} never reached {}",
            c.pods[from].name,
            c.pods[to].name
        );
    }
    // Servers: one in each of vm2's pods, one on vm2 itself for the underlay.
    c.pod_sh(veth.1, "iperf3 -s -D")?;
    c.pod_sh(netkit.1, "iperf3 -s -D")?;
    c.sh_ok(1, "iperf3 -s -D -p 5202")?;
    let vm2 = c.guests[1].ip;
    let pod_to_pod = |(from, to): (usize, usize)| -> anyhow::Result<f64> {
        let out = c.pod_sh(
            from,
            &format!("iperf3 -c {} -t {SECONDS} -f m", c.pods[to].ip),
        )?;
        iperf3_mbits(&out.text).ok_or_else(|| anyhow::anyhow!("iperf3: {}", out.text))
    };
    let (mut under, mut by_veth, mut by_netkit) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        // The pod paths alternate which goes first, so neither always follows the underlay.
        let u = c.sh_ok(0, &format!("iperf3 -c {vm2} -p 5202 -t {SECONDS} -f m"))?;
        under.push(iperf3_mbits(&u).unwrap_or(f64::NAN));
        if round % 2 == 0 {
            by_veth.push(pod_to_pod(veth)?);
            by_netkit.push(pod_to_pod(netkit)?);
        } else {
            by_netkit.push(pod_to_pod(netkit)?);
            by_veth.push(pod_to_pod(veth)?);
        }
    }
    let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let (netkit_over_veth, veth_over_under, netkit_over_under) = (
        ratio(&by_netkit, &by_veth),
        ratio(&by_veth, &under),
        ratio(&by_netkit, &under),
    );
    println!(
        "iperf3 in QEMU TCG guests ({kernel}), {SECONDS} s x {ROUNDS} interleaved rounds, Mbit/s"
    );
    println!("underlay {under:?}\nveth pods {by_veth:?}\nnetkit pods {by_netkit:?}\n");
    println!("| path | Mbit/s (median) | / underlay | / veth |");
    println!("|---|---:|---:|---:|");
    println!("| underlay (vm1 to vm2) | {:.0} | 1.00 | |", median(under));
    println!(
        "| veth pods | {:.0} | {veth_over_under:.2} | 1.00 |",
        median(by_veth)
    );
    println!(
        "| netkit pods (L3) | {:.0} | {netkit_over_under:.2} | {netkit_over_veth:.2} |",
        median(by_netkit)
    );
    let command = "cargo bench -p tessera-cni --bench pod_device_vm";
    BenchRun::new("pod_device_vm", command)
        .ratio(
            "pod throughput in QEMU guests, netkit / veth",
            netkit_over_veth,
            None,
        )
        .ratio(
            "pod throughput in QEMU guests, veth / the guests' underlay",
            veth_over_under,
            None,
        )
        .ratio(
            "pod throughput in QEMU guests, netkit / the guests' underlay",
            netkit_over_under,
            None,
        )
        .save();
    c.finish();
    Ok(())
}
