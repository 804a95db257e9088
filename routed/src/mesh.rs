//! Peers from the datastore: the iBGP full mesh built from the Node records, or, when some
//! nodes carry the route-reflector label, reflectors peering with everyone (the others as
//! their clients) and the others peering with the reflectors only. [`mesh_peers`] is pure;
//! [`follow_datastore`] feeds it from etcd and hands the result to the running speaker.

use std::time::Duration;

use ipnetwork::IpNetwork;
use tessera_datastore::keys;
use tessera_datastore::kv::Kv;
use tessera_datastore::model::Node;
use tokio::sync::mpsc;

use crate::config::PeerConfig;
use crate::speaker::Command;

/// `tessera.dev/route-reflector: "true"` makes a node a route reflector.
pub const REFLECTOR_LABEL: &str = "tessera.dev/route-reflector";

fn is_reflector(n: &Node) -> bool {
    n.labels.get(REFLECTOR_LABEL).is_some_and(|v| v == "true")
}

/// The BGP peers of node `me`.
pub fn mesh_peers(me: &str, default_asn: u32, nodes: &[Node]) -> Vec<PeerConfig> {
    let Some(me_node) = nodes.iter().find(|n| n.name == me) else {
        return Vec::new();
    };
    let local = me_node.ipv4_address.map(|a| a.ip());
    let reflectors = nodes.iter().any(is_reflector);
    let i_reflect = is_reflector(me_node);
    let mut peers: Vec<PeerConfig> = nodes
        .iter()
        .filter(|n| n.name != me)
        .filter(|n| !reflectors || i_reflect || is_reflector(n))
        .filter_map(|n| {
            let addr = match n.ipv4_address? {
                IpNetwork::V4(a) => std::net::IpAddr::V4(a.ip()),
                IpNetwork::V6(_) => return None,
            };
            let asn = n.as_number.unwrap_or(default_asn);
            Some(PeerConfig {
                address: addr,
                asn,
                port: 179,
                passive: false,
                rr_client: i_reflect
                    && !is_reflector(n)
                    && asn == me_node.as_number.unwrap_or(default_asn),
                local_address: local,
                password: None,
                bfd: false,
            })
        })
        .collect();
    peers.sort_by_key(|p| p.address);
    peers
}

/// Re-reads the Node records every `period` and sends the speaker its peers when they change.
pub async fn follow_datastore<K: Kv>(
    kv: K,
    me: String,
    default_asn: u32,
    period: Duration,
    tx: mpsc::Sender<Command>,
) {
    let mut last: Option<Vec<(std::net::IpAddr, u32, bool)>> = None;
    loop {
        match kv.get_prefix(keys::NODES).await {
            Ok((kvs, _)) => {
                let nodes: Vec<Node> = kvs
                    .iter()
                    .filter_map(|k| serde_json::from_slice(&k.value).ok())
                    .collect();
                let peers = mesh_peers(&me, default_asn, &nodes);
                let key: Vec<_> = peers
                    .iter()
                    .map(|p| (p.address, p.asn, p.rr_client))
                    .collect();
                if last.as_ref() != Some(&key) {
                    tracing::info!(peers = key.len(), "peers from the datastore changed");
                    if tx.send(Command::SetDynamicPeers(peers)).await.is_err() {
                        return;
                    }
                    last = Some(key);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read nodes; keeping the current peers"),
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, rr: bool) -> Node {
        let mut n = Node {
            name: name.into(),
            ipv4_address: Some(format!("{ip}/24").parse().expect("net")),
            ..Default::default()
        };
        if rr {
            n.labels.insert(REFLECTOR_LABEL.into(), "true".into());
        }
        n
    }

    #[test]
    fn full_mesh_without_reflectors() {
        let nodes = [
            node("a", "198.18.0.10", false),
            node("b", "198.18.0.11", false),
            node("c", "198.18.1.10", false),
        ];
        let p = mesh_peers("a", 64512, &nodes);
        assert_eq!(
            p.iter().map(|p| p.address.to_string()).collect::<Vec<_>>(),
            ["198.18.0.11", "198.18.1.10"]
        );
        assert!(p.iter().all(|p| !p.rr_client
            && p.local_address.map(|a| a.to_string()) == Some("198.18.0.10".into())));
        assert!(mesh_peers("unknown", 64512, &nodes).is_empty());
    }

    #[test]
    fn reflectors_peer_with_everyone_and_clients_with_reflectors_only() {
        let nodes = [
            node("rr", "198.18.0.2", true),
            node("a", "198.18.0.10", false),
            node("b", "198.18.0.11", false),
        ];
        let rr = mesh_peers("rr", 64512, &nodes);
        assert_eq!(rr.len(), 2);
        assert!(rr.iter().all(|p| p.rr_client));
        let a = mesh_peers("a", 64512, &nodes);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].address.to_string(), "198.18.0.2");
        assert!(!a[0].rr_client);
    }
}
