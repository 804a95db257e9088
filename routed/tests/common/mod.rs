//! What the interop tests share: the lab, Tessera's speaker as a process, kernel routes, its
//! status, and FRR's daemons (bfdd; zebra with bgpd).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_testbed::{Child, Lab, LabSpec, Netns};

pub const ROUTED: &str = env!("CARGO_BIN_EXE_tessera-routed");

pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn start_routed(ns: &Netns, dir: &Path, conf: &str) -> Child {
    let path = dir.join("routed.yaml");
    std::fs::write(&path, conf).expect("routed.yaml");
    let mut cmd = ns.command(ROUTED);
    cmd.args(["run", "--config", &path.to_string_lossy()]);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("routed.log"))
        .expect("log");
    cmd.env("TESSERA_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log);
    Child::spawn(cmd, "tessera-routed").expect("start tessera-routed")
}

pub fn route(ns: &Netns, v6: bool, prefix: &str) -> Option<serde_json::Value> {
    let mut args = vec![];
    if v6 {
        args.push("-6");
    }
    args.extend(["route", "show", prefix]);
    let v = ns.ip_json(&args).ok()?;
    v.as_array()?.first().cloned()
}

pub fn status(dir: &Path) -> serde_json::Value {
    let out = Command::new(ROUTED)
        .args([
            "status",
            "--socket",
            &dir.join("routed.sock").to_string_lossy(),
        ])
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

pub fn routed_conf(
    dir: &Path,
    asn: u32,
    me: &str,
    me6: &str,
    peer: &str,
    peer_as: u32,
    nets: &[&str],
) -> String {
    format!(
        "asn: {asn}\nrouterId: {me}\nlisten: {me}\nconnectRetrySeconds: 1\nholdTime: 9\nnextHopV6: \"{me6}\"\nnetworks: [{nets}]\nstatusSocket: {sock}\npeers:\n  - {{ address: {peer}, asn: {peer_as}, localAddress: {me} }}\n",
        nets = nets.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
        sock = dir.join("routed.sock").display()
    )
}

/// `nodes` lab nodes on one subnet.
pub fn one_subnet(test: &str, nodes: usize, etcd: bool) -> Lab {
    Lab::new(
        test,
        LabSpec {
            nodes,
            subnets: 1,
            etcd,
        },
    )
    .expect("lab")
}

/// Two lab nodes on one subnet, a temp dir and a directory in it for BIRD.
pub fn two_nodes(test: &str, etcd: bool) -> (Lab, tempfile::TempDir, std::path::PathBuf) {
    let lab = one_subnet(test, 2, etcd);
    let dir = tempfile::tempdir().expect("tempdir");
    let bdir = dir.path().join("bird");
    std::fs::create_dir_all(&bdir).expect("mkdir");
    (lab, dir, bdir)
}

/// node1's and node2's IPv4 and IPv6 underlay addresses.
pub fn addresses(lab: &Lab) -> [String; 4] {
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    [n1.ipv4.ip(), n2.ipv4.ip()]
        .map(|a| a.to_string())
        .into_iter()
        .chain([n1.ipv6.ip(), n2.ipv6.ip()].map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .try_into()
        .expect("four addresses")
}

/// Something to ping behind each node: 10.244.N.1 on its loopback.
pub fn pods_on_lo(lab: &Lab) {
    for (i, n) in lab.nodes.iter().enumerate() {
        n.netns
            .ip(&[
                "addr",
                "add",
                &format!("10.244.{}.1/32", i + 1),
                "dev",
                "lo",
            ])
            .expect("addr");
    }
}

/// FRR's bfdd in `ns`, with a single-hop session from `local` to `peer` at 300 ms.
pub fn start_bfdd(ns: &Netns, dir: &Path, local: &str, peer: &str) -> Child {
    let fdir = dir.join("frr");
    std::fs::create_dir_all(&fdir).expect("mkdir");
    // bfdd drops privileges to the frr user: its directory must be writable for it.
    std::process::Command::new("chmod")
        .args(["0777", &fdir.to_string_lossy(), &dir.to_string_lossy()])
        .status()
        .expect("chmod");
    std::fs::write(
        fdir.join("bfdd.conf"),
        format!("bfd\n peer {peer} local-address {local}\n  receive-interval 300\n  transmit-interval 300\n exit\nexit\n"),
    )
    .expect("bfdd.conf");
    let f = |name: &str| fdir.join(name).to_string_lossy().into_owned();
    let mut cmd = ns.command("/usr/lib/frr/bfdd");
    cmd.args([
        "-f",
        &f("bfdd.conf"),
        "-u",
        "frr",
        "-g",
        "frr",
        "-i",
        &f("bfdd.pid"),
        "--vty_socket",
        &f(""),
        "--bfdctl",
        &f("bfdd.sock"),
        "-z",
        &f("zserv.api"),
        "-P",
        "0",
        "--log",
        "stdout",
    ]);
    cmd.stdout(std::fs::File::create(fdir.join("bfdd.log")).expect("log"))
        .stderr(Stdio::null());
    Child::spawn(cmd, "bfdd").expect("bfdd")
}

/// FRR's zebra and bgpd in a namespace, as a router runs them: bgpd speaks BGP, zebra puts its
/// routes in the namespace's kernel. Both killed (by PID) and reaped on drop.
pub struct Frr {
    _zebra: Child,
    _bgpd: Child,
    dir: std::path::PathBuf,
}

impl Frr {
    pub fn start(ns: &Netns, dir: &Path, bgpd_conf: &str) -> Frr {
        let fdir = dir.join("frr");
        std::fs::create_dir_all(&fdir).expect("mkdir");
        // The daemons drop privileges to the frr user: their directory must be writable.
        Command::new("chmod")
            .args(["0777", &fdir.to_string_lossy(), &dir.to_string_lossy()])
            .status()
            .expect("chmod");
        std::fs::write(fdir.join("zebra.conf"), "").expect("zebra.conf");
        std::fs::write(fdir.join("bgpd.conf"), bgpd_conf).expect("bgpd.conf");
        let f = |name: &str| fdir.join(name).to_string_lossy().into_owned();
        let daemon = |name: &str, extra: &[&str]| {
            let mut cmd = ns.command(&format!("/usr/lib/frr/{name}"));
            cmd.args(["-f", &f(&format!("{name}.conf")), "-u", "frr", "-g", "frr"])
                .args(["-i", &f(&format!("{name}.pid")), "--vty_socket", &f("")])
                .args(["-z", &f("zserv.api"), "-P", "0", "--log", "stdout"])
                .args(extra);
            cmd.stdout(std::fs::File::create(fdir.join(format!("{name}.log"))).expect("log"))
                .stderr(Stdio::null());
            Child::spawn(cmd, name).expect(name)
        };
        let zebra = daemon("zebra", &[]);
        wait_for("zebra's socket", Duration::from_secs(10), || {
            fdir.join("zserv.api").exists()
        });
        let bgpd = daemon("bgpd", &[]);
        Frr {
            _zebra: zebra,
            _bgpd: bgpd,
            dir: fdir,
        }
    }

    pub fn bgpd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bgpd.log")).unwrap_or_default()
    }
}

// ---- speakers and raw peers on loopback -------------------------------------------------

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A speaker on this runtime (no kernel routes) from its YAML configuration; send on the
/// sender to stop it.
pub fn spawn_speaker(
    yaml: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let cfg = tessera_routed::config::Config::parse(yaml).expect("config");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let speaker = tokio::spawn(tessera_routed::speaker::run(
        cfg,
        None,
        std::sync::Arc::new(tessera_routed::kernel::NativeRoutes),
        async {
            let _ = stop_rx.await;
        },
    ));
    (stop_tx, speaker)
}

/// A raw peer's connection to `to` from address `local` (retried while the speaker starts),
/// with a 200 ms read timeout and, given, a small receive buffer (a peer slow to read).
pub fn connect_from(
    local: &str,
    to: std::net::SocketAddr,
    rcvbuf: Option<usize>,
) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    let local: std::net::SocketAddr = format!("{local}:0").parse().expect("local address");
    loop {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        sock.bind(&local.into()).expect("bind");
        match sock.connect(&to.into()) {
            Ok(()) => {
                let s: std::net::TcpStream = sock.into();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .expect("timeout");
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("connect from {local}: {e}"),
        }
    }
}

/// A running speaker's status (its status socket), if it answers.
pub fn status_at(sock: &str) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(&out).ok()
}

/// BIRD 2 in a namespace, with its control socket.
pub struct Bird {
    /// Killed (by PID) and reaped on drop.
    _child: Child,
    pub sock: String,
}

impl Bird {
    pub fn start(ns: &Netns, dir: &Path, conf: &str) -> Bird {
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf).expect("bird.conf");
        let sock = dir.join("bird.ctl").to_string_lossy().into_owned();
        let mut cmd = ns.command("bird");
        cmd.args(["-f", "-c", &path.to_string_lossy(), "-s", &sock]);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        Bird {
            _child: Child::spawn(cmd, "bird").expect("start bird"),
            sock,
        }
    }

    pub fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc")
            .args(["-s", &self.sock])
            .args(args)
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
