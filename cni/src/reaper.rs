//! The reaper: deletes the pod interface a DEL retired, after that DEL has returned.
//!
//! Deleting a veth makes the kernel wait for an RCU grace period (~20 ms here, two thirds of
//! DEL), which the runtime need not wait for: the pod is gone once DEL has released its
//! addresses and retired its interface. DEL starts this same binary as
//! `tessera reap-retired-link <index> <name>`, detached (its own process group, no stdio, so
//! the runtime's pipes close when DEL exits), and does not wait for it. If the reaper never
//! runs, the link stays retired: an ADD for the same container replaces it, and the node
//! agent deletes retired links on its next full pass.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// The first argument that makes the plugin binary a reaper.
pub const ARG: &str = "reap-retired-link";

/// Starts a reaper for link `index` (the retired `host_ifname`) in the calling thread's
/// network namespace.
pub fn spawn(index: u32, host_ifname: &str) -> std::io::Result<()> {
    Command::new(std::env::current_exe()?)
        .args([ARG, &index.to_string(), host_ifname])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}

/// The reaper's main: `<index> <name>`. Exits 0 when the link is gone or is no longer the
/// retired one, 1 otherwise (nobody reads it; the agent's sweep is the fallback).
pub fn main(mut args: impl Iterator<Item = String>) -> ! {
    let index = args.next().and_then(|i| i.parse::<u32>().ok());
    let name = args.next();
    let (Some(index), Some(name)) = (index, name) else {
        eprintln!("usage: tessera {ARG} <ifindex> <ifname>");
        std::process::exit(2);
    };
    let reaped = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let h = crate::netns::connect().map_err(|e| e.to_string())?;
                crate::wiring::reap_retired(&h, index, &name)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
    match reaped {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("reaping {name}: {e}");
            std::process::exit(1)
        }
    }
}
