//! A real container runtime as the client: Debian's podman 4 (CNI network backend) runs a
//! container from a local rootfs on a Tessera network inside a node namespace.
//! Setup as measured in shared/reference/podman.md: nsenter (not `ip netns exec`, which hides
//! the cgroup mounts), private containers.conf/storage.conf, ulimits this machine allows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin_dirs, CniLab};
use tessera_testbed::assert_nothing_left;

struct Podman {
    dir: tempfile::TempDir,
    netns: String,
}

impl Podman {
    fn new(c: &CniLab) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-podman")
            .tempdir()
            .expect("tempdir");
        let w = dir.path();
        for d in [
            "net.d",
            "tmp",
            "storage/root",
            "storage/runroot",
            "runc-state",
            "rootfs/bin",
        ] {
            std::fs::create_dir_all(w.join(d)).expect("mkdir");
        }
        let plugin_dirs: Vec<String> = bin_dirs()
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        std::fs::write(
            w.join("containers.conf"),
            format!(
                r#"[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{w}/events.log"
tmp_dir = "{w}/tmp"
runtime = "runc"
[engine.runtimes]
runc = ["{w}/runc-wrap"]
[network]
network_backend = "cni"
cni_plugin_dirs = [{dirs}]
network_config_dir = "{w}/net.d"
default_network = "tessera"
"#,
                w = w.display(),
                dirs = plugin_dirs.join(", ")
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            w.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{w}/storage/root\"\nrunroot = \"{w}/storage/runroot\"\n",
                w = w.display()
            ),
        )
        .expect("storage.conf");
        std::fs::write(
            w.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .expect("registries.conf");
        let wrap = w.join("runc-wrap");
        std::fs::write(
            &wrap,
            format!(
                "#!/bin/sh\nexec /usr/bin/runc --root {}/runc-state \"$@\"\n",
                w.display()
            ),
        )
        .expect("runc-wrap");
        chmod_x(&wrap);
        std::fs::copy("/bin/busybox", w.join("rootfs/bin/busybox")).expect("busybox-static");
        for tool in ["sh", "ip", "sleep", "cat"] {
            let _ = std::os::unix::fs::symlink("busybox", w.join("rootfs/bin").join(tool));
        }
        let mut plugin = c.plugin("node1", false);
        plugin["capabilities"] = serde_json::json!({ "ips": true });
        let conflist =
            serde_json::json!({ "cniVersion": "1.0.0", "name": "tessera", "plugins": [plugin] });
        std::fs::write(w.join("net.d/tessera.conflist"), conflist.to_string()).expect("conflist");
        Podman {
            dir,
            netns: c.lab.node("node1").netns.path(),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let w = self.dir.path();
        Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg("podman")
            .args(["--root", &format!("{}/storage/root", w.display())])
            .args(["--runroot", &format!("{}/storage/runroot", w.display())])
            .args(["--cgroup-manager=cgroupfs"])
            .args(args)
            .env("CONTAINERS_CONF", w.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", w.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", w.join("registries.conf"))
            .output()
            .expect("run podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-af", "-t", "0"]);
        // What podman leaves outside its directories (shared/reference/podman.md, gotcha 3):
        // empty cgroup folders of its own.
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.flatten() {
                let _ = std::fs::remove_dir(c.path().join("libpod_parent/conmon"));
                let _ = std::fs::remove_dir(c.path().join("libpod_parent"));
            }
        }
        // libcni's result cache (a fixed path in podman 4.3): removed when empty.
        let _ = std::fs::remove_dir("/var/lib/cni/results");
        let _ = std::fs::remove_dir("/var/lib/cni");
    }
}

fn chmod_x(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn podman_runs_a_container_on_a_tessera_network() {
    let c = CniLab::new("cni_podman", 1);
    let pm = Podman::new(&c);
    let rootfs = pm.rootfs();
    let rootfs = rootfs.to_string_lossy();

    // A container gets its address from Tessera IPAM.
    let out = pm.ok(&[
        "run",
        "--rm",
        "--network",
        "tessera",
        "--rootfs",
        &rootfs,
        "/bin/busybox",
        "ip",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(out.contains("inet 10.244."), "{out}");
    assert!(out.contains("/32"), "{out}");
    // --rm ran DEL: nothing held any more.
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());

    // --ip is honoured (podman passes it as CNI_ARGS IP=).
    pm.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "tessera",
        "--ip",
        "10.244.123.45",
        "--rootfs",
        &rootfs,
        "/bin/busybox",
        "sleep",
        "300",
    ]);
    let handles = c
        .lab
        .etcd_prefix("/tessera/v1/ipam/handles/")
        .expect("etcd");
    assert_eq!(handles.len(), 1, "{handles:?}");
    assert!(handles[0].1.contains("10.244.123.45"), "{handles:?}");
    let weps = c
        .lab
        .etcd_prefix("/tessera/v1/workloads/node1/default/web/")
        .expect("etcd");
    assert_eq!(weps.len(), 1, "endpoint record for the container");
    c.lab
        .node("node1")
        .netns
        .exec("ping", &["-c1", "-W2", "10.244.123.45"])
        .expect("node -> container");

    // Stopping the container releases the address.
    pm.ok(&["stop", "-t", "0", "web"]);
    assert!(
        c.etcd_keys("/tessera/v1/ipam/handles/").is_empty(),
        "address released on stop"
    );
    assert!(c.host_links("node1").is_empty());
    pm.ok(&["rm", "web"]);

    drop(pm);
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    assert_nothing_left(&prefix, &pids);
}
