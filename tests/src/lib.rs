//! Tessera's test bed: a cluster made of network namespaces on this machine.
//!
//! - [`Netns`]: a named network namespace, deleted on drop.
//! - [`Child`]: a process we started, killed by PID and reaped on drop.
//! - [`Etcd`]: Debian's etcd in a namespace (or on loopback) with a temp data dir.
//! - [`Lab`]: a router namespace joining underlay subnets 198.18.S.0/24 and 2001:db8:S::/64,
//!   a control namespace on subnet 0 running etcd, and node namespaces, each with its own
//!   underlay address and a default route via the router.
//!
//! Nothing is added to the root namespace: veth pairs are created directly inside their
//! namespaces, and the test process talks to etcd only on loopback or through a helper
//! process started inside a namespace. Names carry a per-test prefix ([`unique_prefix`]) so
//! tests run in parallel; [`assert_nothing_left`] checks that a prefix left nothing behind.

pub mod bench_results;
pub mod cluster;
pub mod crash;
pub mod etcd;
pub mod lab;
pub mod netns;
pub mod pki;
pub mod process;
pub mod responders;
pub mod soak;
pub mod vm;
pub mod vm_cluster;

pub use etcd::Etcd;
pub use lab::{Lab, LabNode, LabSpec};
pub use netns::Netns;
pub use process::Child;

use std::sync::atomic::{AtomicU32, Ordering};

/// A short prefix unique to this test and process: `t` + 6 hex digits, so that names built
/// from it stay within the kernel's 15-character interface names.
pub fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let seed = format!("{test}/{}/{n}", std::process::id());
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("t{:06x}", h & 0xff_ffff)
}

/// Runs `ip` (iproute2) with `args`; errors carry the command and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// Runs a short command to completion (a waited-for child); errors carry its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Panics if any namespace named with `prefix` or any of `pids` is still there.
pub fn assert_nothing_left(prefix: &str, pids: &[u32]) {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    let left: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for pid in pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "process {pid} left behind");
    }
}

/// Whether this process may build namespaces (root with iproute2). Tests that need the
/// test bed call this and fail loudly rather than skip: CI always runs them as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the test bed needs root (network namespaces); run the README's test command"
    );
}
