//! Two QEMU guests on one bridge for the datapath-only IPIP test (`tessera-ipip-node`
//! converging `tunl0` through the real netlink code, no agent): the guests are booted by
//! the test bed's [`tessera_testbed::vm`]. The cluster with the real agent is
//! `tessera_testbed::vm_cluster`.

use std::path::{Path, PathBuf};

use tessera_testbed::vm::{Boot, Initramfs, LOAD_MODULES};
use tessera_testbed::{Child, Netns};

const NODE_BIN: &str = env!("CARGO_BIN_EXE_tessera-ipip-node");

/// An initramfs with the virtio NIC and ipip modules, `tessera-ipip-node` and iperf3; its
/// `/init` is `init` with `LOAD_MODULES` replaced by the lines that load them.
pub fn build_initramfs(work: &Path, init: &str) -> (PathBuf, PathBuf) {
    let mut fs = Initramfs::new(work).expect("initramfs");
    fs.modules(&["virtio_pci", "virtio_net", "ipip"])
        .expect("modules")
        .binary(Path::new(NODE_BIN), "/bin/tessera-ipip-node")
        .expect("tessera-ipip-node")
        .binary(Path::new("/usr/bin/iperf3"), "/usr/bin/iperf3")
        .expect("iperf3");
    fs.build(&init.replace("LOAD_MODULES", LOAD_MODULES))
        .expect("initramfs")
}

/// A namespace with bridge `br0` and taps `tap1`, `tap2` for two VMs.
pub fn vm_lan(name: &str) -> Netns {
    let lab = Netns::new(name).expect("netns");
    lab.ip(&["link", "add", "br0", "type", "bridge"])
        .expect("bridge");
    lab.ip(&["link", "set", "br0", "up"]).expect("up");
    for t in ["tap1", "tap2"] {
        lab.ip(&["tuntap", "add", t, "mode", "tap"]).expect("tap");
        lab.ip(&["link", "set", t, "master", "br0", "up"])
            .expect("tap up");
    }
    lab
}

/// Boots VM `n` (tap`n`, 198.18.1.2`n`, block `n`) with its serial console in `log`.
pub fn boot(
    lan: &Netns,
    kernel: &Path,
    initrd: &Path,
    log: &Path,
    n: u8,
    role: &str,
    peer: u8,
) -> Child {
    tessera_testbed::vm::boot(
        lan,
        &Boot {
            kernel,
            initrd,
            tap: &format!("tap{n}"),
            mac: &format!("52:54:00:00:01:2{n}"),
            append: &format!("tb.role={role} tb.ip=198.18.1.2{n} tb.peer=198.18.1.2{peer} tb.blk={n} tb.peerblk={peer}"),
            memory_mib: 256,
            log,
        },
    )
    .expect("qemu")
}
