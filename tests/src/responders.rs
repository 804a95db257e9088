//! "Exactly one responder per address": pods serve their own name on TCP port
//! [`NAME_PORT`]; a probe connects to an address from inside some namespace and reads who
//! answered. Used by the reclaim tests and the soak.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const NAME_PORT: u16 = 7000;

/// One name server per pod, each stoppable on its own (a pod deleted takes its server
/// down); all stopped and their sockets closed on drop.
#[derive(Default)]
pub struct NameServers {
    servers: Vec<(String, Arc<AtomicBool>, JoinHandle<()>)>,
}

impl NameServers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `name` in the namespace at `netns` (a path); returns once it listens.
    pub fn serve(&mut self, netns: String, name: String) {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                crate::netns::enter_on_this_thread(&netns).expect("enter the pod's namespace");
                let l = TcpListener::bind(("0.0.0.0", NAME_PORT)).expect("bind");
                l.set_nonblocking(true).expect("nonblocking");
                let _ = ready_tx.send(());
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(format!("{name}\n").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        ready.recv().expect("server ready");
        self.servers.push((name, stop, thread));
    }

    /// Stops the server of `name` (before its pod is deleted).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.servers.iter().position(|(n, _, _)| n == name) {
            let (_, stop, thread) = self.servers.remove(i);
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

impl Drop for NameServers {
    fn drop(&mut self) {
        for (_, stop, _) in &self.servers {
            stop.store(true, Ordering::Relaxed);
        }
        for (_, _, t) in self.servers.drain(..) {
            let _ = t.join();
        }
    }
}

/// Who answers at `addr`, asked from inside the namespace at `from` (a path).
pub fn who_answers(from: &str, addr: Ipv4Addr) -> Result<String, String> {
    let from = from.to_string();
    std::thread::spawn(move || {
        crate::netns::enter_on_this_thread(&from).map_err(|e| e.to_string())?;
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((addr, NAME_PORT)),
            Duration::from_secs(2),
        )
        .map_err(|e| format!("{addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("{addr}: {e}"))?;
        Ok(out.trim().to_string())
    })
    .join()
    .expect("probe thread")
}
