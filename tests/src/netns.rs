use std::process::Command;

use crate::ip;

/// A named network namespace (`ip netns add`), with loopback up. Deleted on drop, which
/// also destroys every link inside it (veth peers go with them).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        // A namespace left by a killed earlier run of the same test would make `add` fail.
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Duplicate address detection only delays a lab whose addresses are unique by
        // construction (a node's first IPv6 packets would wait about a second).
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what a CNI runtime passes as CNI_NETNS.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Moves the calling thread into this namespace (a network namespace is per thread):
    /// for a test's raw peer or client that must send from a lab address, on a thread of
    /// its own that ends with the test.
    pub fn enter_on_this_thread(&self) -> anyhow::Result<()> {
        enter_on_this_thread(&self.path())
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `ip -n <ns> -batch`: many commands for one process (one `ip` per line is slow when
    /// there are thousands).
    pub fn ip_batch(&self, lines: &[String]) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new()?;
        for l in lines {
            writeln!(f, "{l}")?;
        }
        f.flush()?;
        let path = f.path().to_string_lossy().into_owned();
        self.ip(&["-batch", &path])?;
        Ok(())
    }

    /// `ip -j -n <ns> <args>` parsed as JSON.
    pub fn ip_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = vec!["-j", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        Ok(serde_json::from_str(&ip(&full)?)?)
    }

    /// A command that runs inside the namespace (`ip netns exec`, which keeps the PID: the
    /// child is the program itself).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a short command in the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A veth pair: `local` here, `remote` created directly inside `peer` (nothing passes
    /// through the root namespace).
    pub fn veth_to(&self, local: &str, peer: &Netns, remote: &str) -> anyhow::Result<()> {
        self.ip(&[
            "link",
            "add",
            local,
            "type",
            "veth",
            "peer",
            "name",
            remote,
            "netns",
            peer.name(),
        ])?;
        Ok(())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("test bed: cannot delete namespace {}: {e}", self.name);
        }
    }
}

/// [`Netns::enter_on_this_thread`] by the namespace's path (for a thread that cannot
/// borrow the `Netns`).
pub fn enter_on_this_thread(path: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(path)?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}
