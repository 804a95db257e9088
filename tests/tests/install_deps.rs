//! `scripts/install-deps.sh` installs every program the code, tests, benchmarks and scripts
//! run (issue 11: iperf3 was missing and CI passed only because an earlier session had
//! installed it by hand).
//!
//! The audit finds the programs the workspace runs (string literals in program position in
//! Rust: `Command::new("x")`, `.command("x")`, `.exec("x", ..)`, `run("x", ..)`, absolute
//! paths under /usr, /bin and /sbin; the commands of the shell scripts), resolves each to its
//! Debian package with `dpkg -S`, and fails naming program and package when the package is
//! neither in install-deps.sh nor essential or priority required.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;

/// Programs that are not Debian packages install-deps.sh could install, and why.
const NOT_FROM_THE_LIST: [(&str, &str); 5] = [
    (
        "cargo",
        "the Rust toolchain, installed by rustup (README: Build)",
    ),
    ("rustup", "installs the Rust toolchain itself"),
    (
        "apt-get",
        "install-deps.sh's own installer (apt, priority important)",
    ),
    (
        "apt-cache",
        "install-deps.sh's own installer (apt, priority important)",
    ),
    (
        "sudo",
        "only to become root when a script is started by another user",
    ),
];

/// Scripts that run on an operator's machine, not on the test bed, and why.
const OTHER_MACHINES: [(&str, &str); 2] = [
    (
        "deploy/kind/up.sh",
        "needs kind, kubectl and a container engine daemon, which the test bed cannot run (README)",
    ),
    (
        "deploy/kind/scenarios.sh",
        "runs against a kind cluster with kubectl (README)",
    ),
];

/// Words in command position of a shell script that are not programs.
const SHELL_WORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case",
    "esac", "function", "return", "exit", "set", "shift", "cd", "echo", "printf", "export",
    "local", "read", "trap", "exec", "eval", "source", ".", "[", "[[", "]]", "test", "true",
    "false", "command", "wait", "kill", "unset", "break", "continue", "!", "{", "}", "time",
    "readonly", "declare", "let", ":", "type", "pwd", "umask", "ulimit", "getopts", "mapfile",
];

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Use {
    program: String,
    /// `file:line`, to name where the program is run.
    at: String,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The packages listed in install-deps.sh's `PKGS=( ... )`, one or more per line, each line
/// with an optional comment.
fn listed_packages(script: &str) -> BTreeSet<String> {
    let mut lines = script
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("PKGS=("));
    assert!(lines.next().is_some(), "install-deps.sh has PKGS=(");
    lines
        .map(strip_comment)
        .take_while(|l| l.trim() != ")")
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// Programs run by Rust code, found by the shapes the workspace uses to run them.
fn rust_uses(text: &str, file: &str) -> Vec<Use> {
    let call = Regex::new(r#"(?:Command::new|\.command|\.exec|\brun)\(\s*"([A-Za-z0-9_./+-]+)""#)
        .expect("regex");
    let path = Regex::new(
        r#""((?:/usr)?/s?bin/[A-Za-z0-9_.+-]+|/usr/lib/[a-z0-9_-]+(?:/[A-Za-z0-9_.+-]+)?)""#,
    )
    .expect("regex");
    let mut out = Vec::new();
    for c in call.captures_iter(text).chain(path.captures_iter(text)) {
        let m = c.get(1).expect("group");
        out.push(Use {
            program: m.as_str().to_string(),
            at: format!("{file}:{}", line_of(text, m.start())),
        });
    }
    out
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The commands of a shell script: the first word of each simple command (after `;`, `&&`,
/// `||`, `|`, `(`, `$(`, and the keywords that start a command list), without assignments,
/// builtins and the script's own functions.
fn shell_uses(text: &str, file: &str) -> Vec<Use> {
    let functions: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_suffix("() {")
                .or_else(|| l.trim().strip_suffix("(){"))
        })
        .collect();
    let separators = Regex::new(r"\$\(|&&|\|\||[;|(`]|\bthen\b|\bdo\b|\belse\b").expect("regex");
    let heredoc = Regex::new(r"<<-?\s*'?([A-Za-z_]+)'?").expect("regex");
    let mut out = Vec::new();
    let mut in_array = false;
    // A here-document's body is text, not commands: skipped up to its end word.
    let mut until: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        if let Some(end) = &until {
            if raw.trim() == end {
                until = None;
            }
            continue;
        }
        if let Some(c) = heredoc.captures(raw) {
            until = Some(c[1].to_string());
        }
        let line = unquote(&strip_comment(raw));
        // An array literal over several lines holds words, not commands.
        if line.trim_end().ends_with("=(") {
            in_array = true;
        }
        if in_array {
            in_array = line.trim() != ")";
            continue;
        }
        for segment in separators.split(&line) {
            let word = segment.split_whitespace().find(|w| {
                !is_assignment(w)
                    && !matches!(
                        *w,
                        "!" | "exec" | "command" | "time" | "if" | "while" | "until" | "{"
                    )
            });
            let Some(word) = word else { continue };
            let word = word.trim_end_matches([')', '}', ';']);
            if word.is_empty()
                || SHELL_WORDS.contains(&word)
                || functions.contains(word)
                || !word
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '/')
                || word.contains('$')
                || word.contains('"')
                || word.contains('=')
                || word.starts_with("./")
            {
                continue;
            }
            out.push(Use {
                program: word.to_string(),
                at: format!("{file}:{}", i + 1),
            });
        }
    }
    out
}

fn strip_comment(line: &str) -> String {
    // A `#` that starts a word starts a comment (good enough for these scripts, which keep
    // `#` out of strings).
    let mut out = String::new();
    let mut prev_space = true;
    for ch in line.chars() {
        if ch == '#' && prev_space {
            break;
        }
        prev_space = ch.is_whitespace();
        out.push(ch);
    }
    out
}

/// The line with every quoted string replaced by `%` (a program name is never quoted in
/// these scripts; awk programs and messages are).
fn unquote(line: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    for ch in line.chars() {
        match (quote, ch) {
            (None, '\'' | '"') => {
                quote = Some(ch);
                out.push('%');
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, c) => out.push(c),
        }
    }
    out
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files_under(&p, ext, out);
            }
        } else if name.ends_with(ext) {
            out.push(p);
        }
    }
}

/// Every program the workspace runs, with the places that run it.
fn programs_run(root: &Path) -> BTreeMap<String, Vec<String>> {
    let mut uses = Vec::new();
    let mut rs = Vec::new();
    files_under(root, ".rs", &mut rs);
    // This file names programs in its own tests' inputs.
    rs.retain(|f| !f.ends_with("tests/tests/install_deps.rs"));
    for f in rs {
        let text = std::fs::read_to_string(&f).expect("read");
        let rel = f.strip_prefix(root).unwrap_or(&f).display().to_string();
        uses.extend(rust_uses(&text, &rel));
    }
    let mut sh = Vec::new();
    for d in ["scripts", "deploy", ".ci"] {
        files_under(&root.join(d), "", &mut sh);
    }
    for f in sh {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        if !text.starts_with("#!") || !text.lines().next().unwrap_or("").contains("sh") {
            continue;
        }
        let rel = f.strip_prefix(root).unwrap_or(&f).display().to_string();
        if OTHER_MACHINES.iter().any(|(path, _)| *path == rel) {
            continue;
        }
        uses.extend(shell_uses(&text, &rel));
    }
    let own_binaries = workspace_binaries(root);
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in uses {
        // Ours, by name or at a path (a QEMU guest's copy of a workspace binary).
        let name = u.program.rsplit('/').next().unwrap_or(&u.program);
        if own_binaries.contains(&u.program) || own_binaries.contains(name) {
            continue;
        }
        map.entry(u.program).or_default().push(u.at);
    }
    map
}

/// The workspace's own binaries (built by cargo, not installed from Debian).
fn workspace_binaries(root: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut tomls = Vec::new();
    files_under(root, "Cargo.toml", &mut tomls);
    let name = Regex::new(r#"(?m)^name\s*=\s*"([^"]+)""#).expect("regex");
    for t in tomls {
        let text = std::fs::read_to_string(&t).unwrap_or_default();
        names.extend(name.captures_iter(&text).map(|c| c[1].to_string()));
    }
    let mut bins = Vec::new();
    files_under(root, ".rs", &mut bins);
    names.extend(
        bins.iter()
            .filter(|p| p.parent().is_some_and(|d| d.ends_with("src/bin")))
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().replace('_', "-"))),
    );
    names
}

/// Where a program may be installed: its path as given, or every match on PATH (and the
/// sbin dirs, which a non-root PATH may lack), first match first.
fn locations(program: &str) -> Vec<PathBuf> {
    if program.starts_with('/') {
        return [PathBuf::from(program)]
            .into_iter()
            .filter(|p| p.exists())
            .collect();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .filter(|p| p.is_file())
        .collect();
    found
}

/// The Debian package of the first installed copy of `program` that comes from one.
fn resolve(program: &str) -> Result<String, Missing> {
    let places = locations(program);
    if places.is_empty() {
        return Err(Missing::NotInstalled);
    }
    places
        .iter()
        .find_map(|p| package_of(p))
        .ok_or_else(|| Missing::NotFromAPackage(places[0].clone()))
}

/// The Debian package owning `path` (`dpkg -S`), trying the merged-/usr twin and the
/// resolved symlink (alternatives) too.
fn package_of(path: &Path) -> Option<String> {
    let s = path.display().to_string();
    let mut candidates = vec![s.clone()];
    if let Some(rest) = s.strip_prefix("/usr") {
        candidates.push(rest.to_string());
    } else {
        candidates.push(format!("/usr{s}"));
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        candidates.push(real.display().to_string());
    }
    candidates.iter().find_map(|c| {
        let out = Command::new("dpkg").args(["-S", c]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // "pkg[:arch][, pkg2]: /path"; diversions print extra lines.
        text.lines()
            .filter(|l| !l.starts_with("diversion"))
            .find_map(|l| l.rsplit_once(": ").map(|(pkgs, _)| pkgs.to_string()))
            .map(|pkgs| {
                pkgs.split(", ")
                    .next()
                    .unwrap_or_default()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
    })
}

/// Essential packages and priority-required ones are on every Debian system.
fn always_present(package: &str) -> bool {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Essential} ${Priority}", package])
        .output()
        .expect("dpkg-query");
    let text = String::from_utf8_lossy(&out.stdout);
    text.starts_with("yes") || text.ends_with("required")
}

#[derive(Debug, PartialEq, Eq)]
enum Missing {
    NotInstalled,
    /// Installed by hand (e.g. under /usr/local), which a fresh machine will not have.
    NotFromAPackage(PathBuf),
}

#[derive(Debug, PartialEq, Eq)]
enum Problem {
    /// Run by the code, but not installed from a Debian package here: install-deps.sh did
    /// not install it.
    Missing {
        program: String,
        why: Missing,
        at: Vec<String>,
    },
    /// Installed, but from a package install-deps.sh does not list.
    PackageNotListed {
        program: String,
        package: String,
        at: Vec<String>,
    },
}

/// The pure part of the audit: each program with where it runs, its package, and what
/// install-deps.sh lists.
fn audit(
    programs: &BTreeMap<String, Vec<String>>,
    package: impl Fn(&str) -> Result<String, Missing>,
    always: impl Fn(&str) -> bool,
    listed: &BTreeSet<String>,
) -> Vec<Problem> {
    let exempt: BTreeSet<&str> = NOT_FROM_THE_LIST.iter().map(|(p, _)| *p).collect();
    let mut problems = Vec::new();
    for (program, at) in programs {
        if exempt.contains(program.as_str()) {
            continue;
        }
        match package(program) {
            Err(why) => problems.push(Problem::Missing {
                program: program.clone(),
                why,
                at: at.clone(),
            }),
            Ok(p) if listed.contains(&p) || always(&p) => {}
            Ok(p) => problems.push(Problem::PackageNotListed {
                program: program.clone(),
                package: p,
                at: at.clone(),
            }),
        }
    }
    problems
}

#[test]
fn install_deps_lists_every_program_the_workspace_runs() {
    let root = workspace_root();
    let script = std::fs::read_to_string(root.join("scripts/install-deps.sh")).expect("script");
    let listed = listed_packages(&script);
    let programs = programs_run(&root);
    // The audit must see what it is for; if the scanner breaks, this says so.
    for known in [
        "iperf3",
        "etcd",
        "bird",
        "qemu-system-x86_64",
        "nft",
        "apt-get",
        "ping",
    ] {
        assert!(
            programs.contains_key(known),
            "the scan no longer finds {known}: {programs:?}"
        );
    }
    let problems = audit(&programs, resolve, always_present, &listed);
    let report: Vec<String> = problems
        .iter()
        .map(|p| match p {
            Problem::Missing {
                program,
                why: Missing::NotInstalled,
                at,
            } => format!(
                "{program} is run ({}) but is not installed: add its Debian package to scripts/install-deps.sh",
                at.join(", ")
            ),
            Problem::Missing {
                program,
                why: Missing::NotFromAPackage(path),
                at,
            } => format!(
                "{program} is run ({}) but only {} has it, from no Debian package: a fresh machine lacks it",
                at.join(", "),
                path.display()
            ),
            Problem::PackageNotListed {
                program,
                package,
                at,
            } => format!(
                "{program} is run ({}) and comes from package {package}, which scripts/install-deps.sh does not install",
                at.join(", ")
            ),
        })
        .collect();
    assert!(report.is_empty(), "\n{}", report.join("\n"));
    // And every listed package is a real, installed one (a typo would install nothing).
    for p in &listed {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .expect("dpkg-query");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("install ok installed"),
            "scripts/install-deps.sh lists {p}, which is not installed after it ran"
        );
    }
}

#[test]
fn a_program_from_an_unlisted_package_is_named_with_its_package() {
    let mut programs = BTreeMap::new();
    programs.insert(
        "iperf3".to_string(),
        vec!["tunnel/tests/ipip_vm.rs:3".to_string()],
    );
    programs.insert("ip".to_string(), vec!["tests/src/lib.rs:47".to_string()]);
    programs.insert(
        "sed".to_string(),
        vec!["deploy/install-cni.sh:28".to_string()],
    );
    programs.insert("bfdd-missing".to_string(), vec!["x.rs:1".to_string()]);
    let package = |p: &str| match p {
        "iperf3" => Ok("iperf3".to_string()),
        "ip" => Ok("iproute2".to_string()),
        "sed" => Ok("sed".to_string()),
        _ => Err(Missing::NotInstalled),
    };
    let listed: BTreeSet<String> = ["iproute2".to_string()].into();
    let problems = audit(&programs, package, |p| p == "sed", &listed);
    assert_eq!(
        problems,
        vec![
            Problem::Missing {
                program: "bfdd-missing".into(),
                why: Missing::NotInstalled,
                at: vec!["x.rs:1".into()]
            },
            Problem::PackageNotListed {
                program: "iperf3".into(),
                package: "iperf3".into(),
                at: vec!["tunnel/tests/ipip_vm.rs:3".into()]
            },
        ]
    );
}

#[test]
fn here_document_bodies_are_not_commands() {
    let script = "#!/bin/sh\ncat > f <<EOF\napiVersion: v1\nkind: Config\nEOF\nnft list ruleset\n";
    let found: Vec<String> = shell_uses(script, "h.sh")
        .into_iter()
        .map(|u| u.program)
        .collect();
    assert_eq!(found, ["cat", "nft"]);
}

#[test]
fn shell_commands_are_found_after_separators_and_assignments() {
    let script = "#!/bin/sh\nset -eu\nX=1 etcd --name a # etcd in the background\n\
                  pkg=$(apt-cache depends foo | awk '{print}')\nif ! ip link show; then tcpdump -n; fi\n\
                  helper() {\n  true\n}\nhelper\n";
    let found: Vec<String> = shell_uses(script, "s.sh")
        .into_iter()
        .map(|u| u.program)
        .collect();
    assert_eq!(found, ["etcd", "apt-cache", "awk", "ip", "tcpdump"]);
}

#[test]
fn rust_programs_are_found_in_every_shape_the_workspace_uses() {
    let code = r#"
        let a = Command::new("ip");
        ns.exec("ping", &["-c1"]);
        let c = lan.command(
            "qemu-system-x86_64");
        run("nft", &[]);
        copy_with_libs("/usr/bin/iperf3", &root, "x");
        let d = "/usr/lib/frr/bfdd";
    "#;
    let found: Vec<String> = rust_uses(code, "x.rs")
        .into_iter()
        .map(|u| u.program)
        .collect();
    assert_eq!(
        found,
        [
            "ip",
            "ping",
            "qemu-system-x86_64",
            "nft",
            "/usr/bin/iperf3",
            "/usr/lib/frr/bfdd"
        ]
    );
}
