//! `tesseractl node status`: asks the node's agent (its health endpoint, TCP or a Unix
//! socket, as `TESSERA_HEALTH_LISTEN` says) for `/status`, and prints it.

use std::io::{Read, Write};
use std::time::Duration;

use crate::render::{table, Style};

pub use tessera_datastore::model::{BgpPeerStatus, NodeStatus};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent at {at}: {source} (is tessera-node running here? --agent or TESSERA_HEALTH_LISTEN)")]
    Connect { at: String, source: std::io::Error },
    #[error("the agent at {at} answered: {answer}")]
    Answer { at: String, answer: String },
}

/// GET `path` from the agent at `at` (`host:port` or `unix:PATH`): the body.
pub fn get(at: &str, path: &str) -> Result<String, AgentError> {
    let io = |source| AgentError::Connect {
        at: at.to_string(),
        source,
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: tessera-node\r\n\r\n");
    let mut response = Vec::new();
    match at.strip_prefix("unix:") {
        Some(p) => {
            let mut s = std::os::unix::net::UnixStream::connect(p).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(io)?;
            s.write_all(request.as_bytes()).map_err(io)?;
            s.read_to_end(&mut response).map_err(io)?;
        }
        None => {
            let mut s = std::net::TcpStream::connect(at).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(io)?;
            s.write_all(request.as_bytes()).map_err(io)?;
            s.read_to_end(&mut response).map_err(io)?;
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(AgentError::Answer {
            at: at.to_string(),
            answer: head.lines().next().unwrap_or("").to_string(),
        });
    }
    Ok(body.to_string())
}

fn since(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        Some(s) => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn render(style: Style, s: &NodeStatus) -> String {
    let mut out = format!(
        "node {}: {}\n",
        s.node,
        match (s.live, s.ready) {
            (true, true) => "ready".to_string(),
            (true, false) => format!("not ready: {}", s.reason.as_deref().unwrap_or("unknown")),
            (false, _) => format!("not live: {}", s.reason.as_deref().unwrap_or("unknown")),
        }
    );
    out.push_str("\nBGP sessions\n");
    out.push_str(&table(
        style,
        &["PEER", "AS", "TYPE", "STATE", "SINCE", "PREFIXES IN", "OUT"],
        s.bgp_peers
            .iter()
            .map(|p| {
                vec![
                    p.address.clone(),
                    p.asn.to_string(),
                    p.kind.clone(),
                    p.state.clone(),
                    since(p.uptime_seconds),
                    p.prefixes_received.to_string(),
                    p.prefixes_sent.to_string(),
                ]
            })
            .collect(),
    ));
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    out.push_str(&format!("\nTunnel devices: {}\n", list(&s.devices)));
    out.push_str(&format!("Blocks: {}\n", list(&s.blocks)));
    out
}
