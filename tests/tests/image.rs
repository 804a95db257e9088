//! The image deploy/image/build.sh makes from Debian packages (no registry): its binaries
//! run, and its CNI install step puts the plugins and conflist where a runtime looks, again
//! and again with the same result.

use std::path::Path;
use std::process::Command;

use tessera_testbed::cluster::bin;

const TAG: &str = "image-test";

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman").args(args).output().expect("podman")
}

fn run_in_image(extra: &[&str], cmd: &[&str]) -> String {
    let image = format!("localhost/tessera:{TAG}");
    // Root here lacks CAP_SYS_RESOURCE: podman's default nofile limit cannot be set.
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
    ];
    args.extend_from_slice(extra);
    args.push(&image);
    args.extend_from_slice(cmd);
    let out = podman(&args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the test image (the cached base stays), on panic too.
struct Image;
impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "--force", &format!("localhost/tessera:{TAG}")]);
    }
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for sub in ["bin", "net.d", "state"] {
        let d = dir.join(sub);
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map(|r| r.filter_map(Result::ok).collect())
            .unwrap_or_default();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = format!("{sub}/{}", e.file_name().to_string_lossy());
            out.push((name, std::fs::read(e.path()).unwrap_or_default()));
        }
    }
    out
}

#[test]
fn the_image_runs_and_installs_the_cni_plugins_idempotently() {
    tessera_testbed::require_root();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let _image = Image;
    let built = Command::new(root.join("deploy/image/build.sh"))
        .args(["--profile", "debug", "--tag", TAG])
        .output()
        .expect("build.sh");
    assert!(
        built.status.success(),
        "build.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&built.stdout).trim(),
        format!("localhost/tessera:{TAG}")
    );

    for b in [
        "tessera-node",
        "tessera-routed",
        "tesseractl",
        "tessera-kube-controllers",
    ] {
        let v = run_in_image(&[], &[b, "--version"]);
        assert!(
            v.contains(env!("CARGO_PKG_VERSION")),
            "{b} --version in the image: {v}"
        );
    }
    // The agent's runtime needs: nft and ip from the Debian base.
    run_in_image(&[], &["nft", "--version"]);
    run_in_image(&[], &["ip", "-V"]);

    // The init container's step, into a temporary "host".
    let host = tempfile::tempdir().expect("host dir");
    for d in ["bin", "net.d", "state"] {
        std::fs::create_dir_all(host.path().join(d)).expect("dir");
    }
    let mount = |d: &str, at: &str| format!("{}:{at}", host.path().join(d).display());
    let (bin_mount, net_mount, state_mount) = (
        mount("bin", "/host/opt/cni/bin"),
        mount("net.d", "/host/etc/cni/net.d"),
        mount("state", "/host/var/lib/tessera"),
    );
    let install = || {
        run_in_image(
            &[
                "-v",
                &bin_mount,
                "-v",
                &net_mount,
                "-v",
                &state_mount,
                "-e",
                "CNI_BIN_DIR=/host/opt/cni/bin",
                "-e",
                "CNI_CONF_DIR=/host/etc/cni/net.d",
                "-e",
                "TESSERA_STATE_DIR=/host/var/lib/tessera",
                "-e",
                "ETCD_ENDPOINTS=http://198.18.0.2:2379",
                "-e",
                "TESSERA_NODENAME=node7",
            ],
            &[
                "/deploy/install-cni.sh",
                "/usr/local/bin",
                "/deploy/10-tessera.conflist",
            ],
        )
    };
    install();
    let first = snapshot(host.path());
    let names: Vec<&str> = first.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "bin/tessera",
            "bin/tessera-ipam",
            "net.d/10-tessera.conflist",
            "state/nodename"
        ],
        "what a runtime looks for, and nothing half-written"
    );
    let conf: serde_json::Value =
        serde_json::from_slice(&first[2].1).expect("the conflist is JSON");
    assert_eq!(
        conf["plugins"][0]["datastore"]["etcdEndpoints"],
        serde_json::json!(["http://198.18.0.2:2379"])
    );
    // The installed plugin runs on the host and speaks CNI.
    let version = Command::new(host.path().join("bin/tessera"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the installed plugin runs");
    let v: serde_json::Value = serde_json::from_slice(&version.stdout).expect("version JSON");
    assert!(v["supportedVersions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == "1.1.0")));
    // Again: the same files, byte for byte.
    install();
    assert_eq!(snapshot(host.path()), first, "a re-run changes nothing");
    // The plugin on the host is the one this repository built (stripped).
    assert!(bin("tessera").is_file());
}
