//! `tesseractl node diags`: what a bug report needs from one node, in one tarball: the
//! agent's status and metrics, the kernel's links, addresses, routes, neighbours and FDB,
//! Tessera's nft table, and the end of the logs given. Each piece that cannot be had is
//! recorded as an error file instead, so the tarball always says what was tried.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One file of the tarball: its name and how to get its content.
enum Source<'a> {
    Agent(&'a str),
    Program(&'a str, &'a [&'a str]),
}

const KERNEL: [(&str, &str, &[&str]); 8] = [
    ("links.json", "ip", &["-j", "-d", "link", "show"]),
    ("addresses.json", "ip", &["-j", "addr", "show"]),
    (
        "routes-v4.json",
        "ip",
        &["-j", "route", "show", "table", "all"],
    ),
    (
        "routes-v6.json",
        "ip",
        &["-j", "-6", "route", "show", "table", "all"],
    ),
    ("neighbours.json", "ip", &["-j", "neigh", "show"]),
    ("fdb.json", "bridge", &["-j", "fdb", "show"]),
    ("rules.json", "ip", &["-j", "rule", "show"]),
    (
        "nft-tessera.json",
        "nft",
        &["-j", "list", "table", "inet", "tessera"],
    ),
];

/// Collects into a fresh directory, then packs `out` (a .tar.gz). Returns the file names.
pub fn collect(agent: &str, logs: &[PathBuf], out: &Path) -> std::io::Result<Vec<String>> {
    let dir = tempdir()?;
    let mut names = Vec::new();
    let mut write = |name: &str, r: Result<Vec<u8>, String>| -> std::io::Result<()> {
        match r {
            Ok(bytes) => {
                std::fs::write(dir.join(name), bytes)?;
                names.push(name.to_string());
            }
            Err(e) => {
                let err = format!("{name}.error");
                std::fs::write(dir.join(&err), e)?;
                names.push(err);
            }
        }
        Ok(())
    };
    let mut sources: Vec<(&str, Source)> = vec![
        ("status.json", Source::Agent("/status")),
        ("metrics.txt", Source::Agent("/metrics")),
    ];
    sources.extend(KERNEL.iter().map(|(n, p, a)| (*n, Source::Program(p, a))));
    for (name, source) in sources {
        let r = match source {
            Source::Agent(path) => crate::agent::get(agent, path)
                .map(String::into_bytes)
                .map_err(|e| e.to_string()),
            Source::Program(p, args) => run(p, args),
        };
        write(name, r)?;
    }
    for log in logs {
        let name = format!(
            "log-{}",
            log.to_string_lossy()
                .trim_start_matches('/')
                .replace('/', "_")
        );
        write(&name, tail(log, 2000))?;
    }
    write(
        "version.txt",
        Ok(tessera_datastore::VERSION.as_bytes().to_vec()),
    )?;
    let packed = Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(&dir)
        .args(&names)
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    match packed {
        Ok(s) if s.success() => Ok(names),
        Ok(s) => Err(std::io::Error::other(format!("tar exited with {s}"))),
        Err(e) => Err(e),
    }
}

fn run(program: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{program} {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    Ok((all[start..].join("\n") + "\n").into_bytes())
}

fn tempdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tesseractl-diags-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
