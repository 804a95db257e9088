use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A process we started. Dropping it sends SIGKILL to its PID (never by name) and reaps it,
/// so nothing is left for a lazy PID 1 to collect.
#[derive(Debug)]
pub struct Child {
    inner: Option<std::process::Child>,
    what: String,
}

impl Child {
    /// Spawns `cmd` with stdin closed; stdout/stderr as the command sets them.
    pub fn spawn(cmd: Command, what: &str) -> anyhow::Result<Self> {
        Self::spawn_with_stdin(cmd, what, Stdio::null())
    }

    /// [`Child::spawn`] reading `stdin` (a file, say).
    pub fn spawn_with_stdin(mut cmd: Command, what: &str, stdin: Stdio) -> anyhow::Result<Self> {
        cmd.stdin(stdin);
        let inner = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {what}: {e}"))?;
        Ok(Child {
            inner: Some(inner),
            what: what.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(c) = &self.inner {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.inner
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut c = self.inner.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
        c.wait().ok()
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps either way.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                self.inner = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// Waits for the process to end by itself and returns its output (when piped).
    pub fn wait_output(mut self) -> anyhow::Result<std::process::Output> {
        let c = self
            .inner
            .take()
            .ok_or_else(|| anyhow::anyhow!("{} already reaped", self.what))?;
        Ok(c.wait_with_output()?)
    }

    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.inner.as_mut().and_then(|c| c.stderr.take())
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.inner.as_mut().and_then(|c| c.stdout.take())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process's resident memory in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
