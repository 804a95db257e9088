//! `--version` on every binary the workspace ships or runs: the workspace version and the git
//! commit it was built from (issue 11).

use tessera_testbed::cluster::bin;

const BINARIES: [&str; 9] = [
    "tessera",
    "tessera-ipam",
    "tessera-node",
    "tessera-routed",
    "tessera-ipip-node",
    "tessera-lab",
    "ipam-worker",
    "ipam-bench",
    "tcp-probe",
];

#[test]
fn every_binary_prints_the_version_and_the_commit() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    for name in BINARIES {
        let out = std::process::Command::new(bin(name))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{name} --version: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --version failed: {text}");
        assert!(
            text.starts_with(name) && text.contains(env!("CARGO_PKG_VERSION")),
            "{name} --version: {text}"
        );
        match &commit {
            Some(c) => assert!(
                text.contains(&format!("(commit {c}")),
                "{name}: {text} (HEAD is {c})"
            ),
            None => assert!(text.contains("(commit "), "{name}: {text}"),
        }
    }
}
