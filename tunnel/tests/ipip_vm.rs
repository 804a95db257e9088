//! IPIP end to end: this development kernel has no ipip module, so two QEMU virtual machines
//! boot Debian's own cloud kernel (unpacked by scripts/install-deps.sh) under TCG with a
//! small initramfs carrying busybox, iperf3 and Tessera's `tessera-ipip-node`, which
//! converges `tunl0` through the real netlink code. The VMs' taps sit on a bridge inside a
//! network namespace; tcpdump there shows the protocol-4 packets.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::vm::{boot, build_initramfs, vm_lan};
use tessera_testbed::{Child, Netns};

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
LOAD_MODULES
for kv in $(cat /proc/cmdline); do case $kv in tb.*=*) k=${kv%%=*}; k=${k#tb.}; eval "TB_$k=${kv#*=}";; esac; done
ip link set lo up
ip link set eth0 up; ip addr add $TB_ip/24 dev eth0
ip addr add 10.244.$TB_blk.1/32 dev lo          # the "pod" behind this node
/bin/tessera-ipip-node 1500 10.244.$TB_blk.0 10.244.$TB_peerblk.0/26=$TB_peer || echo "TB: ipip-node FAILED"
ip -d link show tunl0; ip route
if [ "$TB_role" = server ]; then
  iperf3 -s -1 -B 10.244.$TB_blk.1
else
  sleep 3
  ping -c 3 -I 10.244.$TB_blk.1 10.244.$TB_peerblk.1 && echo "TB: IPIP PING OK"
  iperf3 -c 10.244.$TB_peerblk.1 -B 10.244.$TB_blk.1 -t 2 && echo "TB: TCP OK"
fi
echo "TB: done"
poweroff -f
"#;

#[test]
fn ipip_between_two_vms_running_debians_kernel() {
    tessera_testbed::require_root();
    let work = tempfile::tempdir().expect("tempdir");
    let (kernel, initrd) = build_initramfs(work.path(), INIT);
    let prefix = tessera_testbed::unique_prefix("ipip_vm");
    let lab = vm_lan(&format!("{prefix}-vmlan"));
    let pcap_txt = work.path().join("tcpdump.txt");
    let mut dump_cmd = lab.command("tcpdump");
    dump_cmd
        .args(["-nli", "br0", "-c", "4", "ip proto 4"])
        .stdout(std::fs::File::create(&pcap_txt).expect("file"))
        .stderr(Stdio::null());
    let mut dump = Child::spawn(dump_cmd, "tcpdump").expect("tcpdump");
    let log = |n: u8| work.path().join(format!("vm{n}.log"));
    let mut vm1 = boot(&lab, &kernel, &initrd, &log(1), 1, "server", 2);
    let mut vm2 = boot(&lab, &kernel, &initrd, &log(2), 2, "client", 1);
    let deadline = Instant::now() + Duration::from_secs(180);
    while vm2.try_wait().is_none() || vm1.try_wait().is_none() {
        assert!(
            Instant::now() < deadline,
            "VMs did not finish: {}",
            std::fs::read_to_string(work.path().join("vm2.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    dump.stop(Duration::from_secs(1));
    let log2 = std::fs::read_to_string(work.path().join("vm2.log")).unwrap_or_default();
    let log1 = std::fs::read_to_string(work.path().join("vm1.log")).unwrap_or_default();
    assert!(
        log1.contains("TB: tunl0 converged (mtu 1480, 1 routes)"),
        "{log1}"
    );
    assert!(log2.contains("TB: tunl0 converged"), "{log2}");
    assert!(
        log2.contains("TB: IPIP PING OK"),
        "ping across tunl0: {log2}"
    );
    assert!(log2.contains("TB: TCP OK"), "TCP across tunl0: {log2}");
    let seen = std::fs::read_to_string(&pcap_txt).unwrap_or_default();
    assert!(
        seen.contains("198.18.1.22 > 198.18.1.21: IP 10.244.2.1 > 10.244.1.1"),
        "protocol 4 on the underlay: {seen}"
    );
    drop(vm1);
    drop(vm2);
    drop(lab);
    tessera_testbed::assert_nothing_left(&prefix, &[]);
}

#[test]
fn without_the_ipip_module_the_error_names_it() {
    // This development kernel is built without IPIP: Tessera must say so, not half-build.
    if Path::new("/sys/module/ipip").exists() {
        eprintln!("this kernel has ipip; the missing-module case cannot be shown here");
        return;
    }
    let ns = Netns::new(&tessera_testbed::unique_prefix("ipip_missing")).expect("netns");
    let path = ns.path();
    let r = std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
            .block_on(async {
                let (conn, h, _) = rtnetlink::new_connection().expect("netlink");
                tokio::spawn(conn);
                let d = tessera_tunnel::ipip::IpipDevice {
                    mtu: 1480,
                    tunnel_addr: "10.244.1.0".parse().expect("ip"),
                };
                tessera_tunnel::ipip::ensure_ipip(&h, &d).await
            })
    })
    .join()
    .expect("thread");
    let e = r.expect_err("no tunl0 here");
    assert!(e.to_string().contains("ipip"), "{e}");
}
