use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Child;

/// Debian's etcd-server with a temporary data dir, in a namespace or on loopback.
pub struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_url: String,
    peer_url: String,
    netns: Option<String>,
    /// The member's name and the cluster it starts in (`name=peer-url,...`).
    name: String,
    initial_cluster: Option<String>,
    /// Client-certificate authentication: etcd's CA, its server pair, and the client pair
    /// the health check uses.
    tls: Option<EtcdTls>,
    /// The data dir is a filesystem of its own this size (MiB): a tmpfs mounted in the
    /// member's private mount namespace, gone with the process (no restart on it).
    small_disk_mib: Option<u32>,
}

struct EtcdTls {
    ca: std::path::PathBuf,
    server: crate::pki::CertPair,
    client: crate::pki::CertPair,
}

/// The size of a member's own filesystem when it has one: room for etcd's 64 MiB WAL
/// segment, the next one it preallocates in the background, and its database (96 MiB was
/// full before the test filled it, on a loaded machine).
pub const SMALL_DISK_MIB: u32 = 256;

impl Etcd {
    /// On 127.0.0.1 with free ports: for tests whose own process talks to etcd.
    pub fn start_loopback() -> anyhow::Result<Self> {
        let client = free_port()?;
        let peer = free_port()?;
        Self::start(
            None,
            format!("http://127.0.0.1:{client}"),
            format!("http://127.0.0.1:{peer}"),
        )
    }

    /// On 127.0.0.1 over TLS, requiring client certificates signed by `pki`'s CA
    /// (`--client-cert-auth`), as production etcd clusters run.
    pub fn start_loopback_tls(pki: &crate::pki::Pki) -> anyhow::Result<Self> {
        let client = free_port()?;
        let peer = free_port()?;
        let mut e = Etcd {
            child: None,
            data: tempfile::Builder::new().prefix("tessera-etcd").tempdir()?,
            client_url: format!("https://127.0.0.1:{client}"),
            peer_url: format!("http://127.0.0.1:{peer}"),
            netns: None,
            name: "tessera".into(),
            initial_cluster: None,
            tls: Some(EtcdTls {
                ca: pki.ca(),
                server: pki.server(),
                client: pki.client(),
            }),
            small_disk_mib: None,
        };
        e.spawn()?;
        Ok(e)
    }

    /// Inside namespace `ns` on `addr` (ports 2379/2380: the namespace is ours alone).
    pub fn start_in(ns: &str, addr: &str) -> anyhow::Result<Self> {
        Self::start(
            Some(ns.to_string()),
            format!("http://{addr}:2379"),
            format!("http://{addr}:2380"),
        )
    }

    fn start(netns: Option<String>, client_url: String, peer_url: String) -> anyhow::Result<Self> {
        let mut e = Etcd {
            child: None,
            data: tempfile::Builder::new().prefix("tessera-etcd").tempdir()?,
            client_url,
            peer_url,
            netns,
            name: "tessera".into(),
            initial_cluster: None,
            tls: None,
            small_disk_mib: None,
        };
        e.spawn()?;
        Ok(e)
    }

    /// A cluster of members, member `i` named `etcd<i+1>` in namespace `members[i].0` at
    /// address `members[i].1` (ports 2379/2380). All start together (each waits for a
    /// quorum) and the call returns once every member is healthy.
    /// Member `small_disk`, if any, keeps its data on a filesystem of [`SMALL_DISK_MIB`] that
    /// [`Etcd::fill_disk`] fills.
    pub fn start_cluster(
        members: &[(&str, &str)],
        small_disk: Option<usize>,
    ) -> anyhow::Result<Vec<Etcd>> {
        let initial = members
            .iter()
            .enumerate()
            .map(|(i, (_, addr))| format!("etcd{}=http://{addr}:2380", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut all = Vec::new();
        for (i, (ns, addr)) in members.iter().enumerate() {
            let mut e = Etcd {
                child: None,
                data: tempfile::Builder::new().prefix("tessera-etcd").tempdir()?,
                client_url: format!("http://{addr}:2379"),
                peer_url: format!("http://{addr}:2380"),
                netns: Some(ns.to_string()),
                name: format!("etcd{}", i + 1),
                initial_cluster: Some(initial.clone()),
                tls: None,
                small_disk_mib: (small_disk == Some(i)).then_some(SMALL_DISK_MIB),
            };
            e.spawn_process()?;
            all.push(e);
        }
        for e in &mut all {
            e.wait_healthy(Duration::from_secs(60))?;
        }
        Ok(all)
    }

    /// This member's name (`etcd1`, ... in a cluster).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.spawn_process()?;
        self.wait_healthy(Duration::from_secs(30))
    }

    fn spawn_process(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("etcd.log"))?;
        let initial_cluster = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={}", self.name, self.peer_url));
        let data_dir = self.data.path().join("data");
        let mut cmd = match self.small_disk_mib {
            None => self.command("etcd"),
            Some(mib) => {
                // `ip netns exec` runs us in a mount namespace of our own (slave to the
                // host's): the tmpfs is seen by this member only and goes with it.
                std::fs::create_dir_all(&data_dir)?;
                let mut c = self.command("sh");
                c.arg("-c")
                    .arg(format!(
                        "mount -t tmpfs -o size={mib}m tessera-etcd \"$0\" && exec etcd \"$@\""
                    ))
                    .arg(&data_dir);
                c
            }
        };
        cmd.args([
            "--name",
            &self.name,
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--listen-client-urls",
            &self.client_url,
            "--advertise-client-urls",
            &self.client_url,
            "--listen-peer-urls",
            &self.peer_url,
            "--initial-advertise-peer-urls",
            &self.peer_url,
            "--initial-cluster",
            &initial_cluster,
            "--log-level",
            "warn",
        ]);
        if self.initial_cluster.is_some() {
            // A cluster on a shared 2-core machine: heartbeats and elections slow enough that
            // load alone does not depose leaders (etcd's tuning guide for busy hosts).
            cmd.args(["--heartbeat-interval", "250", "--election-timeout", "2500"]);
        }
        if let Some(t) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg(format!("--cert-file={}", t.server.cert.display()))
                .arg(format!("--key-file={}", t.server.key.display()));
        }
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(Child::spawn(cmd, "etcd")?);
        Ok(())
    }

    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.healthy();
            if ok {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait()) {
                anyhow::bail!("etcd exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd not healthy after {timeout:?}: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default();
        log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
    }

    pub fn endpoint(&self) -> &str {
        &self.client_url
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::pid)
    }

    /// Fills the member's own filesystem (see [`Etcd::start_cluster`]) with a file of zeros
    /// until the kernel says ENOSPC; returns the bytes written. The member's next write that
    /// needs a new page fails as on a full disk.
    pub fn fill_disk(&self) -> anyhow::Result<u64> {
        anyhow::ensure!(
            self.small_disk_mib.is_some(),
            "{} has no filesystem of its own to fill",
            self.name
        );
        let pid = self
            .pid()
            .ok_or_else(|| anyhow::anyhow!("{} is not running", self.name))?;
        let filler = self.data.path().join("data").join("filler");
        // dd fails at ENOSPC, which is the point: the size written is what counts.
        let _ = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-m",
                "--",
                "dd",
                "if=/dev/zero",
                "bs=1M",
            ])
            .arg(format!("of={}", filler.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "--", "stat", "-c", "%s"])
            .arg(&filler)
            .output()?;
        let written: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        anyhow::ensure!(written > 0, "nothing written to {}", filler.display());
        Ok(written)
    }

    /// Whether the member answers `endpoint health` (connecting within a second).
    pub fn healthy(&self) -> bool {
        let mut etcdctl = self.command("etcdctl");
        if let Some(t) = &self.tls {
            etcdctl
                .arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client.cert.display()))
                .arg(format!("--key={}", t.client.key.display()));
        }
        etcdctl
            .args([
                "--endpoints",
                &self.client_url,
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "health",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The member's log so far (its last lines), for assertion messages.
    pub fn log(&self) -> String {
        self.log_tail()
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts again on the same data dir and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Starts a killed cluster member again on its data dir, without waiting for it to be
    /// healthy (it cannot be, alone, while the cluster has no quorum).
    pub fn restart_member(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_process()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
