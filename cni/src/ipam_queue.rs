//! The node's queue of IPAM operations waiting for its lock.
//!
//! Pods of one node start and stop together, and their IPAM writes are serialised by the
//! node's lock: each holder pays a disk-synced etcd commit while the others wait. So an
//! invocation with a plain operation (a new pod's addresses from the node's blocks, a pod's
//! release) leaves it in the queue (`<id>.req`) before it waits for the lock, listening on
//! a socket of its own (`<id>.sock`). Whoever gets the lock does every queued operation in
//! one transaction ([`Ipam::apply_batch`]) and sends each invocation its outcome; they
//! return without waiting for their turn at the lock.
//!
//! Nothing depends on the queue for correctness. An operation the batch leaves alone, or
//! whose outcome went missing with a holder that crashed, is done by its own invocation the
//! ordinary way, with the lock held; every operation is idempotent per handle, so one done
//! twice is done once.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tessera_datastore::{BatchedOp, BatchedOutcome, EtcdKv, Ipam};
use tokio::net::UnixDatagram;

use crate::error::CniError;

/// A request older than this is dropped unread: its invocation has given up waiting (or
/// died), and one still waiting finds it gone and does its operation itself.
const STALE_REQUEST: Duration = Duration::from_secs(30);
/// A socket left this long by an invocation that died is removed.
const STALE_SOCKET: Duration = Duration::from_secs(120);

const REQUEST: &str = "req";
const SOCKET: &str = "sock";

/// Outcomes are a few hundred bytes of JSON; this bounds a malformed one.
const MAX_OUTCOME: usize = 64 * 1024;

/// A queued operation and the datastore it is for
/// ([`tessera_datastore::handoff::store_id`]): a holder does only its own store's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Queued {
    store: u64,
    op: BatchedOp,
}

/// One invocation's place in the queue. Dropping it takes its request and socket away.
pub struct Ticket {
    dir: PathBuf,
    id: String,
    outcomes: UnixDatagram,
}

impl Ticket {
    /// Leaves `op` (for the datastore `store`) in the queue at `dir`.
    pub fn submit(dir: &Path, store: u64, op: &BatchedOp) -> Result<Ticket, CniError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CniError::io(format!("{}: {e}", dir.display())))?;
        // Short: a socket's path has at most 107 bytes. Unique: one per process.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let id = format!("{:x}-{nanos:x}", std::process::id());
        let socket = dir.join(format!("{id}.{SOCKET}"));
        // Listening before the request exists: no outcome can come before it.
        let outcomes = UnixDatagram::bind(&socket)
            .map_err(|e| CniError::io(format!("{}: {e}", socket.display())))?;
        let ticket = Ticket {
            dir: dir.to_path_buf(),
            id,
            outcomes,
        };
        let queued = Queued {
            store,
            op: op.clone(),
        };
        let bytes = serde_json::to_vec(&queued).map_err(|e| CniError::io(e.to_string()))?;
        write_atomically(&ticket.path(REQUEST), &bytes)?;
        Ok(ticket)
    }

    fn path(&self, kind: &str) -> PathBuf {
        self.dir.join(format!("{}.{kind}", self.id))
    }

    /// The operation as another holder did it, when it comes. Never
    /// [`BatchedOutcome::Alone`]: an operation the batch left alone is done the ordinary
    /// way, with the lock, so this stays pending.
    pub async fn delivered(&self) -> BatchedOutcome {
        let mut buf = vec![0; MAX_OUTCOME];
        loop {
            match self.outcomes.recv(&mut buf).await {
                Ok(n) => match serde_json::from_slice(&buf[..n]) {
                    Ok(BatchedOutcome::Alone) => {}
                    Ok(outcome) => return outcome,
                    Err(e) => tracing::warn!(error = %e, "unreadable IPAM outcome ignored"),
                },
                // Then the outcome is found when the lock comes.
                Err(_) => return std::future::pending().await,
            }
        }
    }

    /// With the node's IPAM lock held: this invocation's outcome, sent by an earlier holder
    /// or done now with everything else queued. `None`: the request is gone without an
    /// outcome (its holder crashed); the caller does the operation itself.
    pub async fn serve(self, ipam: &Ipam<EtcdKv>) -> Result<Option<BatchedOutcome>, CniError> {
        let mut buf = vec![0; MAX_OUTCOME];
        // An earlier holder sends before it lets the lock go: it is here if it was sent.
        if let Ok(n) = self.outcomes.try_recv(&mut buf) {
            if let Ok(outcome) = serde_json::from_slice(&buf[..n]) {
                return Ok(Some(outcome));
            }
        }
        if !self.path(REQUEST).exists() {
            return Ok(None);
        }
        combine(&self.dir, ipam, Own::Queued(&self.id)).await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path(REQUEST));
        let _ = std::fs::remove_file(self.path(SOCKET));
    }
}

/// With the node's IPAM lock held, for an invocation that got it before it queued: `op`
/// done with everything queued.
pub async fn serve_with(
    dir: &Path,
    op: BatchedOp,
    ipam: &Ipam<EtcdKv>,
) -> Result<BatchedOutcome, CniError> {
    let outcome = combine(dir, ipam, Own::NotQueued(op)).await?;
    Ok(outcome.unwrap_or(BatchedOutcome::Alone))
}

/// The lock holder's own operation: in the queue under its id, or not queued.
enum Own<'a> {
    Queued(&'a str),
    NotQueued(BatchedOp),
}

/// Does the queued operations and the holder's own in one batch, sends the others their
/// outcomes and returns the holder's.
async fn combine(
    dir: &Path,
    ipam: &Ipam<EtcdKv>,
    own: Own<'_>,
) -> Result<Option<BatchedOutcome>, CniError> {
    let Some(store) = ipam.store() else {
        // Not knowing its store, it cannot tell whose requests are whose.
        return Ok(match own {
            Own::Queued(_) => Some(BatchedOutcome::Alone),
            Own::NotQueued(op) => Some(ipam.apply_batch(&[op]).await?.remove(0)),
        });
    };
    let mut queued: Vec<(Option<String>, BatchedOp)> = read_queue(dir, store)
        .into_iter()
        .map(|(id, op)| (Some(id), op))
        .collect();
    let own_id = match own {
        Own::Queued(id) => Some(id),
        Own::NotQueued(op) => {
            queued.insert(0, (None, op));
            None
        }
    };
    let ops: Vec<BatchedOp> = queued.iter().map(|(_, op)| op.clone()).collect();
    let outcomes = ipam.apply_batch(&ops).await.map_err(CniError::from)?;
    tracing::debug!(operations = ops.len(), "IPAM queue served");
    let sender = std::os::unix::net::UnixDatagram::unbound()
        .map_err(|e| CniError::io(format!("a socket for IPAM outcomes: {e}")))?;
    let mut own = None;
    for ((id, _), outcome) in queued.iter().zip(outcomes) {
        let Some(id) = id.as_deref().filter(|id| Some(*id) != own_id) else {
            own = Some(outcome);
            continue;
        };
        let bytes = serde_json::to_vec(&outcome).map_err(|e| CniError::io(e.to_string()))?;
        // An invocation gone meanwhile: its operation is done, and a repeated one finds
        // it done.
        if let Err(e) = sender.send_to(&bytes, dir.join(format!("{id}.{SOCKET}"))) {
            tracing::debug!(error = %e, %id, "IPAM outcome not delivered");
        }
        let _ = std::fs::remove_file(dir.join(format!("{id}.{REQUEST}")));
    }
    if let Some(id) = own_id {
        let _ = std::fs::remove_file(dir.join(format!("{id}.{REQUEST}")));
    }
    // Our own request may have been too old to serve (a long wait): then it is ours to do.
    Ok(own.or(Some(BatchedOutcome::Alone)))
}

/// The queued requests for the datastore `store` by id, oldest first (the order their
/// invocations asked in), dropping stale and unreadable ones and sockets of invocations
/// long gone.
fn read_queue(dir: &Path, store: u64) -> Vec<(String, BatchedOp)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    let mut queued = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        match path.extension().and_then(|e| e.to_str()) {
            Some(REQUEST) if age < STALE_REQUEST => {
                match std::fs::read(&path).map(|b| serde_json::from_slice::<Queued>(&b)) {
                    Ok(Ok(q)) if q.store == store => queued.push((age, id.to_string(), q.op)),
                    // Another store's: its own invocations serve it.
                    Ok(Ok(_)) => {}
                    _ => {
                        tracing::warn!(path = %path.display(), "unreadable IPAM request dropped");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Some(REQUEST) => {
                let _ = std::fs::remove_file(&path);
            }
            Some(SOCKET) if age > STALE_SOCKET => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
    queued.sort_by_key(|(age, _, _)| std::cmp::Reverse(*age));
    queued.into_iter().map(|(_, id, op)| (id, op)).collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CniError> {
    // A name the queue's reader skips: it sees the whole request or none.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| CniError::io(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aged(path: &Path, bytes: &[u8], age: Duration) {
        std::fs::write(path, bytes).expect("write");
        let file = std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open");
        file.set_modified(SystemTime::now() - age).expect("mtime");
    }

    fn release(handle: &str) -> BatchedOp {
        BatchedOp::Release {
            handle: handle.into(),
            as_read: None,
            also_delete: Vec::new(),
        }
    }

    #[test]
    fn the_queue_is_read_oldest_first_without_stale_or_unreadable_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = |op: &BatchedOp| {
            let queued = Queued {
                store: 7,
                op: op.clone(),
            };
            serde_json::to_vec(&queued).expect("json")
        };
        aged(
            &dir.path().join("b.req"),
            &json(&release("second")),
            Duration::from_secs(2),
        );
        aged(
            &dir.path().join("a.req"),
            &json(&release("first")),
            Duration::from_secs(5),
        );
        aged(
            &dir.path().join("c.req"),
            &json(&release("third")),
            Duration::ZERO,
        );
        // Given up on by its invocation: dropped unread.
        aged(
            &dir.path().join("old.req"),
            &json(&release("old")),
            STALE_REQUEST * 2,
        );
        aged(&dir.path().join("bad.req"), b"{not json", Duration::ZERO);
        // Another datastore's, with a node of the same name: left for its own.
        let other = Queued {
            store: 8,
            op: release("theirs"),
        };
        let other = serde_json::to_vec(&other).expect("json");
        aged(&dir.path().join("e.req"), &other, Duration::ZERO);
        // Half written: not a request yet.
        aged(
            &dir.path().join("d.tmp"),
            &json(&release("half")),
            Duration::ZERO,
        );
        aged(&dir.path().join("gone.sock"), b"", STALE_SOCKET * 2);
        aged(&dir.path().join("live.sock"), b"", Duration::ZERO);

        let queued = read_queue(dir.path(), 7);
        let handles: Vec<(&str, &str)> = queued
            .iter()
            .map(|(id, op)| match op {
                BatchedOp::Release { handle, .. } => (id.as_str(), handle.as_str()),
                BatchedOp::Assign { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(
            handles,
            vec![("a", "first"), ("b", "second"), ("c", "third")]
        );
        for removed in ["old.req", "bad.req", "gone.sock"] {
            assert!(!dir.path().join(removed).exists(), "{removed}");
        }
        for kept in ["a.req", "d.tmp", "live.sock", "e.req"] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
    }

    #[tokio::test]
    async fn a_ticket_listens_before_it_queues_and_takes_both_away_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ticket = Ticket::submit(dir.path(), 7, &release("pod")).expect("submit");
        let queued = read_queue(dir.path(), 7);
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].0, ticket.id);
        // What a holder does for it: the outcome arrives on its socket.
        let outcome = BatchedOutcome::Released {
            addresses: vec!["10.244.0.7".parse().expect("addr")],
        };
        std::os::unix::net::UnixDatagram::unbound()
            .expect("socket")
            .send_to(
                &serde_json::to_vec(&BatchedOutcome::Alone).expect("json"),
                ticket.path(SOCKET),
            )
            .expect("send");
        std::os::unix::net::UnixDatagram::unbound()
            .expect("socket")
            .send_to(
                &serde_json::to_vec(&outcome).expect("json"),
                ticket.path(SOCKET),
            )
            .expect("send");
        // "Alone" is not a delivery: the operation waits for the lock then.
        assert_eq!(ticket.delivered().await, outcome);
        drop(ticket);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }
}
