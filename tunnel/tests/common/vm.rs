//! QEMU (TCG) virtual machines booting Debian's cloud kernel with a small initramfs, for what
//! this development kernel cannot do (IPIP). Shared by the IPIP test and benchmark.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tessera_testbed::{Child, Netns};

const NODE_BIN: &str = env!("CARGO_BIN_EXE_tessera-ipip-node");
const VMDIR: &str = "/var/cache/tessera/vm/root";
const MODULES: [&str; 11] = [
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/net/virtio_net",
    "net/ipv4/tunnel4",
    "net/ipv4/ip_tunnel",
    "net/ipv4/ipip",
];

pub fn sh(cmd: &str) {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "failed: {cmd}");
}

/// Copies `bin` and the shared libraries it needs into `root`.
pub fn copy_with_libs(bin: &str, root: &Path, dest: &str) {
    std::fs::copy(bin, root.join(dest)).unwrap_or_else(|e| panic!("copy {bin}: {e}"));
    let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let target = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("dir")).expect("mkdir");
        std::fs::copy(lib, &target).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
}

pub fn build_initramfs(work: &Path, init: &str) -> (PathBuf, PathBuf) {
    let boot = Path::new(VMDIR).join("boot");
    let kernel = std::fs::read_dir(&boot)
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))))
        .expect("Debian's cloud kernel is unpacked in /var/cache/tessera/vm (run scripts/install-deps.sh)");
    let kver = kernel
        .file_name()
        .expect("name")
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let root = work.join("initramfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "lib/modules", "usr/bin"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let km = Path::new(VMDIR)
        .join("lib/modules")
        .join(&kver)
        .join("kernel");
    for m in MODULES {
        let name = Path::new(m)
            .file_name()
            .expect("module")
            .to_string_lossy()
            .into_owned();
        std::fs::copy(
            km.join(format!("{m}.ko")),
            root.join("lib/modules").join(format!("{name}.ko")),
        )
        .unwrap_or_else(|e| panic!("module {m}: {e}"));
    }
    copy_with_libs(NODE_BIN, &root, "bin/tessera-ipip-node");
    copy_with_libs("/usr/bin/iperf3", &root, "usr/bin/iperf3");
    std::fs::write(root.join("init"), init).expect("init");
    sh(&format!(
        "chmod +x {0}/init && cd {0} && find . | cpio -o -H newc --quiet | gzip -1 > {1}",
        root.display(),
        work.join("initrd.gz").display()
    ));
    (kernel, work.join("initrd.gz"))
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
    let mut c = lan.command("qemu-system-x86_64");
    c.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "256",
        "-smp",
        "1",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-nodefaults",
    ]);
    c.args([
        "-kernel",
        &kernel.to_string_lossy(),
        "-initrd",
        &initrd.to_string_lossy(),
    ]);
    c.args(["-serial", &format!("file:{}", log.display())]);
    c.args([
        "-netdev",
        &format!("tap,id=n0,ifname=tap{n},script=no,downscript=no"),
    ]);
    c.args([
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac=52:54:00:00:01:2{n}"),
    ]);
    c.args([
        "-append",
        &format!("console=ttyS0 panic=-1 tb.role={role} tb.ip=198.18.1.2{n} tb.peer=198.18.1.2{peer} tb.blk={n} tb.peerblk={peer}"),
    ]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    Child::spawn(c, "qemu").expect("qemu")
}
