//! netkit pod devices (`podInterface: netkit`) through the real agent and CNI plugin, on a
//! kernel that has them. Neither this development kernel nor bookworm's 6.1 is built with
//! netkit, so the three QEMU guests of `tessera_testbed::vm_cluster` boot Debian's 6.12
//! cloud kernel (`CONFIG_NETKIT=y`, unpacked by `scripts/install-deps.sh`). netkit pods and
//! a veth pod share one pool without encapsulation (the router's speaker carries the blocks
//! across the two subnets): every pod reaches every other, the agent leaves the netkit
//! pods' links and routes alone, and DEL takes a netkit pod's link away.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use tessera_testbed::vm::VM_ROOT_NETKIT;
use tessera_testbed::vm_cluster::{VmCluster, IP};

const POOL: &str = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: native }\nspec: { cidr: 10.244.64.0/20, blockSize: 26, ipipMode: Never, vxlanMode: Never }\n";

/// The guest's netkit links, one `ip -d -o link` line each.
fn netkit_links(c: &VmCluster, g: usize) -> Vec<String> {
    c.sh_ok(g, &format!("{IP} -d -o link show type netkit"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Every pod pings every other (routes converge after a pod appears).
fn all_reach_all(c: &VmCluster, when: &str) {
    let ips: Vec<Ipv4Addr> = c.pods.iter().map(|p| p.ip).collect();
    for p in 0..c.pods.len() {
        for (q, &to) in ips.iter().enumerate() {
            if p != q {
                assert!(
                    c.wait_ping(p, to, Duration::from_secs(60)).is_some(),
                    "{when}: {} -> {} ({to})\n{}",
                    c.pods[p].name,
                    c.pods[q].name,
                    c.agent_log(c.pods[p].guest)
                );
            }
        }
    }
}

#[test]
fn netkit_pods_reach_each_other_and_veth_pods_through_the_real_agent_in_three_vms() {
    tessera_testbed::require_root();
    let mut c = VmCluster::with_kernel("netkit_vms", POOL, Path::new(VM_ROOT_NETKIT))
        .expect("VM cluster on the netkit kernel");
    let kernel = c.sh_ok(0, "uname -r").unwrap();
    // Two netkit pods on vm1 (same node), one on vm2 (same subnet), one on vm3 (the other
    // subnet), and a veth pod on vm2 beside them.
    for (g, device) in [
        (0, "netkit"),
        (0, "netkit"),
        (1, "netkit"),
        (2, "netkit"),
        (1, "veth"),
    ] {
        if let Err(e) = c.add_pod_with(g, "native", Some(device)) {
            panic!(
                "{kernel}: {device} pod on vm{}: {e:#}\n{}\nconsole:\n{}",
                g + 1,
                c.agent_log(g),
                c.console_tail(g, 40)
            );
        }
    }
    // The host ends are netkit links (iproute2 6.1 prints no netkit details: the mode shows
    // on the pod end below), the veth pod's is a veth.
    let vm1 = netkit_links(&c, 0);
    assert_eq!(vm1.len(), 2, "two netkit host links on vm1: {vm1:?}");
    assert!(vm1.iter().all(|l| l.contains("netkit")), "{vm1:?}");
    let veth_pod = c.pods[4].name.clone();
    let eth0 = c
        .sh_ok(1, &format!("{IP} -n {veth_pod} -d -o link show eth0"))
        .unwrap();
    assert!(eth0.contains("veth"), "{eth0}");
    let eth0 = c.pod_sh(0, &format!("{IP} -d -o link show eth0")).unwrap();
    // L3 mode: no ARP and an all-zero hardware address.
    assert!(
        eth0.text.contains("NOARP") && eth0.text.contains("00:00:00:00:00:00"),
        "a netkit pod's eth0 in L3 mode: {}",
        eth0.text
    );

    all_reach_all(&c, "netkit and veth pods");

    // DEL of a netkit pod takes its link away; the others keep reaching each other (the
    // agent's sweep leaves live netkit pods' links and routes alone).
    let gone = c.pods[1].name.clone();
    c.sh_ok(0, &format!("pod-del {gone}")).expect("CNI DEL");
    let left = netkit_links(&c, 0);
    assert_eq!(left.len(), 1, "one netkit link left on vm1: {left:?}");
    c.pods.remove(1);
    std::thread::sleep(Duration::from_secs(3));
    all_reach_all(&c, "after a DEL");
    eprintln!("netkit pods on {kernel}: every pod reached every other");
    c.finish();
}
