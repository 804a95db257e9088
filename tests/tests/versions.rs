//! `--version` on every binary the workspace ships or runs: the workspace version and the git
//! commit it was built from (issue 11).

use tessera_testbed::cluster::bin;

/// Every binary target of the workspace, as cargo reads the manifests, so that a new binary
/// cannot be left out.
fn workspace_binaries() -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let mut bins = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        for target in package["targets"].as_array().into_iter().flatten() {
            if target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
            {
                bins.push(target["name"].as_str().expect("a name").to_string());
            }
        }
    }
    bins.sort();
    bins
}

#[test]
fn every_binary_prints_the_version_and_the_commit() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let binaries = workspace_binaries();
    assert!(
        binaries.len() >= 15,
        "the manifests name too few binaries: {binaries:?}"
    );
    for name in &binaries {
        let out = std::process::Command::new(bin(name))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{name} --version: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --version failed: {text}");
        assert!(
            text.starts_with(name.as_str()) && text.contains(env!("CARGO_PKG_VERSION")),
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
