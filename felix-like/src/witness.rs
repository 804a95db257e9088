//! The witness: evidence that a node whose liveness lease lapsed is still running.
//!
//! A lapsed lease says only that the node could not reach etcd. Before GC reclaims such a
//! node it asks the node's agent directly, over the underlay: `GET /witness?nonce=N` at the
//! node's address and witness port. The agent answers with its node name and
//! `sha256(identity ‖ nonce)`, where `identity` is the random value it keeps in its identity
//! file and registered in its Node record. An answer counts only if both match: some other
//! host, or another agent, at that address does not save the node from reclaim, and a
//! recorded answer cannot be replayed. (The identity is not a secret from etcd's readers;
//! the witness tells a running agent from an empty address, it does not authenticate.)

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The agent's identity: read from `path`, or made (128 random bits) and written there.
pub fn load_or_create_identity(path: &Path) -> std::io::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let id = text.trim();
        if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(id.to_string());
        }
    }
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, path)?;
    Ok(id)
}

pub fn proof(identity: &str, nonce: &str) -> String {
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update(b"\0");
    h.update(nonce.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub node: String,
    pub proof: String,
}

#[derive(Deserialize)]
struct Challenge {
    nonce: String,
}

struct Me {
    node: String,
    identity: String,
}

/// Serves the witness endpoint until the task is dropped.
pub async fn serve(listen: SocketAddr, node: String, identity: String) -> std::io::Result<()> {
    let me = std::sync::Arc::new(Me { node, identity });
    let app = Router::new()
        .route(
            "/witness",
            get(
                |State(me): State<std::sync::Arc<Me>>, Query(c): Query<Challenge>| async move {
                    Json(Answer {
                        node: me.node.clone(),
                        proof: proof(&me.identity, &c.nonce),
                    })
                },
            ),
        )
        .with_state(me);
    let l = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(l, app).await
}

/// What the witness found at a suspect node's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The node's own agent answered: it runs, whatever its lease says.
    Answered,
    /// Nothing there that proves to be the node's agent (why, for the log).
    NoAgent(String),
}

/// Checks an answer body against what the node registered. Pure.
pub fn judge(body: &str, node: &str, identity: &str, nonce: &str) -> Finding {
    match serde_json::from_str::<Answer>(body) {
        Ok(a) if a.node != node => Finding::NoAgent(format!("answered as node {:?}", a.node)),
        Ok(a) if a.proof != proof(identity, nonce) => {
            Finding::NoAgent("answered without the node's registered identity".into())
        }
        Ok(_) => Finding::Answered,
        Err(e) => Finding::NoAgent(format!("not a witness answer: {e}")),
    }
}

/// Asks the agent at `addr` to prove it is `node` with `identity`; gives up after `timeout`.
pub async fn probe(addr: SocketAddr, node: &str, identity: &str, timeout: Duration) -> Finding {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let nonce: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "GET /witness?nonce={nonce} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&resp).into_owned())
    };
    match tokio::time::timeout(timeout, ask).await {
        Err(_) => Finding::NoAgent(format!("no answer from {addr} within {timeout:?}")),
        Ok(Err(e)) => Finding::NoAgent(format!("{addr}: {e}")),
        Ok(Ok(resp)) => match resp.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => {
                judge(body, node, identity, &nonce)
            }
            _ => Finding::NoAgent(format!(
                "{addr} answered {:?}",
                resp.lines().next().unwrap_or("")
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_registered_identity_and_name_count() {
        let good = serde_json::json!({ "node": "n3", "proof": proof("id3", "abc") }).to_string();
        assert_eq!(judge(&good, "n3", "id3", "abc"), Finding::Answered);
        // Another agent at that address (another identity), a replayed answer (another
        // nonce), another node's name, and anything else: not the node's agent.
        assert!(matches!(
            judge(&good, "n3", "other", "abc"),
            Finding::NoAgent(_)
        ));
        assert!(matches!(
            judge(&good, "n3", "id3", "new-nonce"),
            Finding::NoAgent(_)
        ));
        assert!(matches!(
            judge(&good, "n2", "id3", "abc"),
            Finding::NoAgent(_)
        ));
        assert!(matches!(
            judge("<html>", "n3", "id3", "abc"),
            Finding::NoAgent(_)
        ));
    }

    #[test]
    fn the_identity_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/agent-identity");
        let first = load_or_create_identity(&path).expect("create");
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create_identity(&path).expect("load"), first);
    }

    #[tokio::test]
    async fn a_running_agent_answers_and_an_empty_port_does_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let server = tokio::spawn(serve(addr, "n3".into(), "id3".into()));
        let mut found = Finding::NoAgent("not asked".into());
        for _ in 0..50 {
            found = probe(addr, "n3", "id3", Duration::from_secs(2)).await;
            if found == Finding::Answered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(found, Finding::Answered);
        assert!(matches!(
            probe(addr, "n3", "someone-else", Duration::from_secs(2)).await,
            Finding::NoAgent(_)
        ));
        server.abort();
        let _ = server.await;
        assert!(matches!(
            probe(addr, "n3", "id3", Duration::from_secs(2)).await,
            Finding::NoAgent(_)
        ));
    }
}
