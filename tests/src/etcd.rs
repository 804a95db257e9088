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
}

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
        };
        e.spawn()?;
        Ok(e)
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
        let log = std::fs::File::create(self.data.path().join("etcd.log"))?;
        let mut cmd = self.command("etcd");
        cmd.args([
            "--name",
            "tessera",
            "--data-dir",
            &self.data.path().join("data").to_string_lossy(),
            "--listen-client-urls",
            &self.client_url,
            "--advertise-client-urls",
            &self.client_url,
            "--listen-peer-urls",
            &self.peer_url,
            "--initial-advertise-peer-urls",
            &self.peer_url,
            "--initial-cluster",
            &format!("tessera={}", self.peer_url),
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(log);
        self.child = Some(Child::spawn(cmd, "etcd")?);
        self.wait_healthy(Duration::from_secs(30))
    }

    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .command("etcdctl")
                .args([
                    "--endpoints",
                    &self.client_url,
                    "--dial-timeout=1s",
                    "endpoint",
                    "health",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
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
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
