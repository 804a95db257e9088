//! Stamps the git commit into `tessera_datastore::VERSION`, which every binary prints for
//! `--version` (all of them depend on this crate).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=TESSERA_GIT_COMMIT");
    let commit = std::env::var("TESSERA_GIT_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild the stamp when HEAD moves: HEAD itself (a checkout) and the ref it names (a
    // commit on the branch), loose or packed.
    // Only files that exist: cargo takes a missing one as changed, and would rebuild every
    // crate above this one on every build (a fresh clone has no packed-refs).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let mut watched = vec![format!("{dir}/HEAD"), format!("{dir}/packed-refs")];
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(format!("{dir}/{r}"));
        }
        for path in watched.iter().filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=TESSERA_GIT_COMMIT={commit}");
}
