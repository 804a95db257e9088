//! IPIP throughput inside two QEMU TCG VMs (this kernel has no ipip module): iperf3 over the
//! VMs' underlay, over `tunl0` as `tessera-ipip-node` converged it, and over `tunl0`
//! configured by hand with iproute2 (the reference), in the same boot. TCG emulation bounds
//! every number; what the ratios can show is that Tessera's device costs nothing over a
//! hand-made one. `cargo bench -p tessera-tunnel --bench ipip_vm`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::vm::{boot, build_initramfs, vm_lan};

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in failover net_failover virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_net tunnel4 ip_tunnel ipip; do
  insmod /lib/modules/$m.ko
done
for kv in $(cat /proc/cmdline); do case $kv in tb.*=*) k=${kv%%=*}; k=${k#tb.}; eval "TB_$k=${kv#*=}";; esac; done
ip link set lo up
ip link set eth0 up; ip addr add $TB_ip/24 dev eth0
ip addr add 10.244.$TB_blk.1/32 dev lo
/bin/tessera-ipip-node 1500 10.244.$TB_blk.0 10.244.$TB_peerblk.0/26=$TB_peer
if [ "$TB_role" = server ]; then
  iperf3 -s &
  sleep 600
else
  sleep 3
  run() { for i in 1 2 3; do iperf3 -c $1 -B $2 -t 3 -f m | grep receiver | sed "s/^/BENCH $3 /"; done; }
  run $TB_peer $TB_ip underlay
  run 10.244.$TB_peerblk.1 10.244.$TB_blk.1 tessera
  # The same device configured by hand.
  ip route del 10.244.$TB_peerblk.0/26; ip addr flush dev tunl0; ip link set tunl0 down
  ip link set tunl0 mtu 1480 up; ip addr add 10.244.$TB_blk.0/32 dev tunl0
  ip route add 10.244.$TB_peerblk.0/26 via $TB_peer dev tunl0 onlink
  run 10.244.$TB_peerblk.1 10.244.$TB_blk.1 handmade
  echo "BENCH done"
fi
poweroff -f
"#;

fn median(path: &str, log: &str) -> f64 {
    let mut v: Vec<f64> = log
        .lines()
        .filter(|l| l.starts_with(&format!("BENCH {path} ")))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "Mbits/sec")
                .and_then(|i| w.get(i - 1))
                .and_then(|x| x.parse().ok())
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let work = tempfile::tempdir().expect("tempdir");
    let (kernel, initrd) = build_initramfs(work.path(), INIT);
    let lan = vm_lan(&format!(
        "{}-vmbench",
        tessera_testbed::unique_prefix("ipip_bench")
    ));
    let log = |n: u8| work.path().join(format!("vm{n}.log"));
    let mut server = boot(&lan, &kernel, &initrd, &log(1), 1, "server", 2);
    let mut client = boot(&lan, &kernel, &initrd, &log(2), 2, "client", 1);
    let deadline = Instant::now() + Duration::from_secs(300);
    while client.try_wait().is_none() {
        assert!(Instant::now() < deadline, "the client VM did not finish");
        std::thread::sleep(Duration::from_millis(500));
    }
    server.kill();
    let out = std::fs::read_to_string(log(2)).unwrap_or_default();
    let (u, t, h) = (
        median("underlay", &out),
        median("tessera", &out),
        median("handmade", &out),
    );
    println!("iperf3 in two QEMU TCG VMs (Debian's kernel), 3 s x 3 runs each, median Mbit/s");
    println!();
    println!("| path | Mbit/s | ratio to the VMs' underlay |");
    println!("|---|---:|---:|");
    println!("| underlay (VM to VM) | {u:.0} | 1.00 |");
    println!("| pods over tunl0, Tessera | {t:.0} | {:.2} |", t / u);
    println!("| pods over tunl0, by hand | {h:.0} | {:.2} |", h / u);
    drop(lan);
}
