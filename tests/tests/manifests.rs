//! deploy/ checked here as far as it can be without a Kubernetes cluster: every manifest
//! validates against the Kubernetes OpenAPI schemas (kubernetes-validate --strict, from
//! PyPI, installed by scripts/install-deps.sh) and a typo does not; the DaemonSet runs the
//! image deploy/image/build.sh makes, with binaries and paths that image has; every example
//! pool applies cleanly with tesseractl to etcd; the kind config's pod subnets hold the
//! pools; the Vagrantfile parses (`ruby -c`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_testbed::cluster::bin;
use tessera_testbed::Etcd;

const VALIDATOR: &str = "/var/cache/tessera/venv/bin/kubernetes-validate";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .expect(dir)
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn validate(path: &Path) -> std::process::Output {
    Command::new(VALIDATOR)
        .arg("--strict")
        .arg(path)
        .output()
        .expect("kubernetes-validate (scripts/install-deps.sh installs it)")
}

#[test]
fn the_kubernetes_manifests_validate_and_a_typo_does_not() {
    let manifests = files("deploy/kubernetes");
    assert!(manifests.len() >= 3, "{manifests:?}");
    for m in &manifests {
        let out = validate(m);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{}: {text}", m.display());
        let docs = std::fs::read_to_string(m)
            .expect("read")
            .split("\n---\n")
            .filter(|d| d.contains("kind:"))
            .count();
        assert_eq!(
            text.matches("passed for resource").count(),
            docs,
            "{}: every document checked: {text}",
            m.display()
        );
    }
    // Negative control: one misspelt field fails strict validation.
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = std::fs::read_to_string(root().join("deploy/kubernetes/tessera-node.yaml"))
        .expect("daemonset");
    let typo = dir.path().join("typo.yaml");
    std::fs::write(&typo, ds.replacen("imagePullPolicy", "imagePullPolcy", 1)).expect("write");
    assert!(!validate(&typo).status.success(), "a typo must fail");
}

#[test]
fn every_workload_runs_what_the_image_contains() {
    let build = std::fs::read_to_string(root().join("deploy/image/build.sh")).expect("build.sh");
    let containerfile =
        std::fs::read_to_string(root().join("deploy/image/Containerfile")).expect("Containerfile");
    assert!(containerfile.contains("COPY bin/ /usr/local/bin/"));
    assert!(containerfile.contains("COPY deploy/ /deploy/"));
    let bins_line = build
        .lines()
        .find(|l| l.starts_with("BINS="))
        .expect("BINS in build.sh");
    // The image build.sh tags by default: localhost/tessera:<workspace version>.
    let image = format!("localhost/tessera:{}", env!("CARGO_PKG_VERSION"));
    let mut commands = 0;
    for m in files("deploy/kubernetes") {
        let text = std::fs::read_to_string(&m).expect("manifest");
        for l in text.lines() {
            if let Some(i) = l.trim().strip_prefix("image: ") {
                assert_eq!(
                    i.split_whitespace().next(),
                    Some(image.as_str()),
                    "{}",
                    m.display()
                );
            }
        }
        // Every program a container runs is where the image puts it.
        for l in text
            .lines()
            .filter(|l| l.trim_start().starts_with("command:"))
        {
            commands += 1;
            let program = l.split('"').nth(1).expect("a command with a program");
            match program.strip_prefix("/usr/local/bin/") {
                Some(b) => assert!(
                    bins_line.split(['"', ' ']).any(|w| w == b),
                    "{b} is not in the image ({bins_line})"
                ),
                None => {
                    let file = program.strip_prefix("/deploy/").expect("/deploy/...");
                    assert!(
                        build.contains(&format!("deploy/{file}")),
                        "{program}: build.sh does not copy deploy/{file}"
                    );
                }
            }
            for arg in l.split('"').filter(|a| a.starts_with("/deploy/")) {
                let file = arg.trim_start_matches("/deploy/");
                assert!(
                    build.contains(&format!("deploy/{file}")),
                    "{arg} not in the image"
                );
            }
        }
    }
    assert!(
        commands >= 3,
        "the agent, its init container and the controllers"
    );
    // The agent's config path is the ConfigMap's mount and key.
    let ds = std::fs::read_to_string(root().join("deploy/kubernetes/tessera-node.yaml"))
        .expect("daemonset");
    assert!(ds.contains("mountPath: /etc/tessera }") && ds.contains("tessera-node.yaml: |"));
}

#[tokio::test]
async fn the_example_pools_apply_with_tesseractl_and_fit_the_kind_subnets() {
    tessera_testbed::require_root();
    let etcd = Etcd::start_loopback().expect("etcd");
    let mut cidrs = Vec::new();
    for f in files("deploy/pools") {
        let out = Command::new(bin("tesseractl"))
            .args(["--etcd-endpoints", etcd.endpoint(), "apply", "-f"])
            .arg(&f)
            .output()
            .expect("tesseractl");
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let r =
            tessera_datastore::yaml::parse_resources(&std::fs::read_to_string(&f).expect("read"))
                .expect("parses");
        cidrs.extend(r.pools.iter().map(|p| p.spec.cidr));
    }
    let check = Command::new(bin("tesseractl"))
        .args(["--etcd-endpoints", etcd.endpoint(), "ipam", "check"])
        .output()
        .expect("tesseractl");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Pools do not overlap, and kind's pod subnets hold every one.
    for (i, a) in cidrs.iter().enumerate() {
        for b in &cidrs[i + 1..] {
            assert!(
                !a.contains(b.network()) && !b.contains(a.network()),
                "{a} and {b} overlap"
            );
        }
    }
    let kind = std::fs::read_to_string(root().join("deploy/kind/cluster.yaml")).expect("kind");
    let subnets: Vec<ipnetwork::IpNetwork> = kind
        .lines()
        .find_map(|l| l.trim().strip_prefix("podSubnet: "))
        .expect("podSubnet")
        .trim_matches('"')
        .split(',')
        .map(|s| s.parse().expect("a CIDR"))
        .collect();
    for c in &cidrs {
        assert!(
            subnets
                .iter()
                .any(|s| s.contains(c.network()) && s.prefix() <= c.prefix()),
            "pool {c} is outside kind's podSubnet {subnets:?}"
        );
    }
}

#[test]
fn the_kind_scenarios_statefulset_validates() {
    let out = validate(&root().join("deploy/kind/ledger-statefulset.yaml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_vagrantfile_parses() {
    let out = Command::new("ruby")
        .arg("-c")
        .arg(root().join("deploy/vagrant/Vagrantfile"))
        .output()
        .expect("ruby (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
