//! Nothing answers, or tells, what it should not: the agent's health and metrics on loopback
//! by default, the speaker's status socket and the agent's Unix health socket root's alone,
//! the CNI log not writable by others, and the etcd password in no output or log (with
//! debug logging on). Each binary runs in a namespace of its own against an etcd address
//! that does not answer, so every path that reports a connection problem runs too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tessera_testbed::cluster::bin;
use tessera_testbed::{Child, Netns};

const PASSWORD: &str = "pw-NEVER-logged-7f3a";
/// On the namespace's own subnet but nobody's: connections to etcd time out.
const NO_ETCD: &str = "http://198.18.0.77:2379";

/// A namespace with an `eth0` at 198.18.0.5/24 (an underlay address to autodetect; a veth
/// whose peer stays in the namespace: this kernel has no dummy device).
fn node_ns(prefix: &str) -> Netns {
    let ns = Netns::new(&format!("{prefix}-n")).expect("netns");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .expect("veth");
    ns.ip(&["link", "set", "eth0p", "up"]).expect("up");
    ns.ip(&["addr", "add", "198.18.0.5/24", "dev", "eth0"])
        .expect("addr");
    ns.ip(&["link", "set", "eth0", "up"]).expect("up");
    ns
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the agent in `ns` with a user and password for an etcd that does not answer.
fn agent(ns: &Netns, dir: &Path, health: Option<&str>) -> Child {
    let mut cmd = ns.command(&bin("tessera-node").to_string_lossy());
    cmd.env("NODENAME", "node1")
        .env("ETCD_ENDPOINTS", NO_ETCD)
        .env("ETCD_USERNAME", "tessera")
        .env("ETCD_PASSWORD", PASSWORD)
        .env("ETCD_TIMEOUT_MS", "300")
        .env("IP_AUTODETECTION_METHOD", "interface=eth0")
        .env("TESSERA_MTU_FILE", dir.join("mtu"))
        .env("TESSERA_IDENTITY_FILE", dir.join("identity"))
        .env("TESSERA_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(h) = health {
        cmd.env("TESSERA_HEALTH_LISTEN", h);
    }
    Child::spawn(cmd, "tessera-node").expect("agent")
}

/// Everything the agent logs, once it has logged `needle` (so that it got that far) and
/// was stopped.
fn log_until(mut child: Child, needle: &str) -> String {
    let stderr = child.take_stderr().expect("stderr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = seen.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    wait_for(&format!("the agent logging {needle:?}"), || {
        seen.lock().expect("lock").contains(needle)
    });
    child.signal(nix::sys::signal::Signal::SIGTERM);
    drop(child);
    reader.join().expect("reader");
    let all = seen.lock().expect("lock").clone();
    all
}

#[test]
fn the_agent_serves_health_on_loopback_and_never_shows_its_etcd_password() {
    tessera_testbed::require_root();
    let prefix = tessera_testbed::unique_prefix("exposure_agent");
    let ns = node_ns(&prefix);
    let dir = tempfile::tempdir().expect("tempdir");

    // Default listener: TCP on loopback only.
    let a = agent(&ns, dir.path(), None);
    let listening = || ns.exec("ss", &["-Hltn"]).unwrap_or_default();
    wait_for("the health listener", || listening().contains(":9099"));
    let health: Vec<String> = listening()
        .lines()
        .filter(|l| l.contains(":9099"))
        .map(str::to_string)
        .collect();
    assert!(
        health.iter().all(|l| l.contains("127.0.0.1:9099")),
        "health and metrics on loopback only: {health:?}"
    );
    // It tries etcd with its credentials (its debug log says where) before it is stopped.
    let printed = log_until(a, "198.18.0.77");
    assert!(
        !printed.contains(PASSWORD),
        "password in the agent's output: {printed}"
    );

    // The Unix-socket listener is root's alone.
    let sock = dir.path().join("health.sock");
    let a = agent(&ns, dir.path(), Some(&format!("unix:{}", sock.display())));
    wait_for("the health socket", || sock.exists());
    assert_eq!(mode(&sock), 0o600, "health socket mode");
    let printed = log_until(a, "198.18.0.77");
    assert!(
        !printed.contains(PASSWORD),
        "password in the agent's output: {printed}"
    );
    drop(ns);
    tessera_testbed::assert_nothing_left(&prefix, &[]);
}

#[test]
fn the_speakers_status_socket_is_roots_alone() {
    tessera_testbed::require_root();
    let prefix = tessera_testbed::unique_prefix("exposure_routed");
    let ns = node_ns(&prefix);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("status.sock");
    let cfg = dir.path().join("routed.yaml");
    std::fs::write(
        &cfg,
        format!(
            "asn: 64512\nrouterId: 198.18.0.5\nlisten: 198.18.0.5\nstatusSocket: {}\npeers: []\n",
            sock.display()
        ),
    )
    .expect("config");
    let mut cmd = ns.command(&bin("tessera-routed").to_string_lossy());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let speaker = Child::spawn(cmd, "tessera-routed").expect("speaker");
    wait_for("the status socket", || sock.exists());
    assert_eq!(mode(&sock), 0o600, "status socket mode");
    drop(speaker);
    drop(ns);
    tessera_testbed::assert_nothing_left(&prefix, &[]);
}

#[test]
fn the_cni_log_is_not_writable_by_others_and_never_shows_the_etcd_password() {
    tessera_testbed::require_root();
    let prefix = tessera_testbed::unique_prefix("exposure_cni");
    let ns = node_ns(&prefix);
    let pod = Netns::new(&format!("{prefix}-p")).expect("pod netns");
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |log: &Path| -> (bool, String) {
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "k8s-pod-network",
            "type": "tessera",
            "nodename": "node1",
            "datastore": {
                "etcdEndpoints": [NO_ETCD],
                "etcdUsername": "tessera",
                "etcdPassword": PASSWORD,
                "timeoutMs": 300
            },
            "logFile": log,
            "ipam": { "type": "tessera-ipam", "assignIpv4": true }
        });
        let plugin = bin("tessera");
        let mut cmd = ns.command(&plugin.to_string_lossy());
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().expect("dir"))
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p")
            .env("TESSERA_LOG", "debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("config");
        let out = child.wait_with_output().expect("plugin output");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // A fresh log file: 0640.
    let fresh = dir.path().join("fresh/cni.log");
    let (ok, printed) = run(&fresh);
    assert!(!ok, "no etcd, no address: {printed}");
    assert!(
        printed.contains("\"code\""),
        "a CNI error on stdout: {printed}"
    );
    assert_eq!(mode(&fresh), 0o640, "new CNI log mode");

    // One left world-writable is tightened.
    let loose = dir.path().join("loose.log");
    std::fs::write(&loose, "").expect("log");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (_, printed2) = run(&loose);
    assert_eq!(
        mode(&loose) & 0o022,
        0,
        "the loose log is no longer writable by others"
    );

    for text in [
        printed,
        printed2,
        std::fs::read_to_string(&fresh).expect("log"),
        std::fs::read_to_string(&loose).expect("log"),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "password in the CNI output or log: {text}"
        );
    }
    let lines = BufReader::new(std::fs::File::open(&fresh).expect("log"))
        .lines()
        .count();
    assert!(lines > 0, "the debug log was written");
    drop(pod);
    drop(ns);
    tessera_testbed::assert_nothing_left(&prefix, &[]);
}
