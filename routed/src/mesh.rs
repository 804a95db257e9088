//! Peers from the datastore: the iBGP full mesh built from the Node records, or, when some
//! nodes carry the route-reflector label, reflectors peering with everyone (the others as
//! their clients) and the others peering with the reflectors only. [`mesh_peers`] is pure;
//! [`follow_datastore`] feeds it from etcd and hands the result to the running speaker.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tessera_datastore::block::{holders, IpamBlock};
use tessera_datastore::keys;
use tessera_datastore::kv::Kv;
use tessera_datastore::model::{BgpPeer, Node};
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
                interface: None,
            })
        })
        .collect();
    peers.sort_by_key(|p| p.address);
    peers
}

/// Every BGP peer of node `me` from the datastore, for the node agent and the standalone
/// speaker alike (one policy): the full mesh (or route reflectors) over the nodes that hold
/// their liveness lease (`live`) or still hold blocks or addresses (`holders`), and the
/// external `BgpPeer`s that select `me`. A lapsed lease alone does not unpeer a node: it may
/// be cut off from etcd only, its pods running; once reclaimed it holds nothing and goes.
pub fn node_peers(
    me: &str,
    default_asn: u32,
    nodes: &[Node],
    bgp_peers: &[BgpPeer],
    live: &BTreeSet<String>,
    holders: &BTreeSet<String>,
) -> Vec<PeerConfig> {
    let meshed: Vec<Node> = nodes
        .iter()
        .filter(|n| n.name == me || live.contains(&n.name) || holders.contains(&n.name))
        .cloned()
        .collect();
    let mut peers = mesh_peers(me, default_asn, &meshed);
    for e in external_peers(me, &meshed, bgp_peers) {
        if !peers.iter().any(|p| p.address == e.address) {
            peers.push(e);
        }
    }
    peers.sort_by_key(|p| p.address);
    peers
}

/// The cluster id of a node labelled as a route reflector: its router id. None otherwise.
pub fn cluster_id(labels: &BTreeMap<String, String>, router_id: Ipv4Addr) -> Option<Ipv4Addr> {
    labels
        .get(REFLECTOR_LABEL)
        .is_some_and(|v| v == "true")
        .then_some(router_id)
}

/// External peers (`BgpPeer` resources) whose node selector matches node `me`.
pub fn external_peers(me: &str, nodes: &[Node], peers: &[BgpPeer]) -> Vec<PeerConfig> {
    let Some(me_node) = nodes.iter().find(|n| n.name == me) else {
        return Vec::new();
    };
    let local = me_node.ipv4_address.map(|a| a.ip());
    peers
        .iter()
        .filter(|p| p.node_selector.matches(&me_node.labels))
        .map(|p| PeerConfig {
            address: p.peer_ip,
            asn: p.as_number,
            port: 179,
            passive: false,
            rr_client: false,
            local_address: local.filter(|l| l.is_ipv4() == p.peer_ip.is_ipv4()),
            password: p.password.clone(),
            bfd: p.bfd,
            interface: None,
        })
        .collect()
}

/// The values that decode (a corrupt record is skipped, as the agent does).
fn decode_all<T: serde::de::DeserializeOwned>(kvs: &[tessera_datastore::kv::KeyValue]) -> Vec<T> {
    kvs.iter()
        .filter_map(|k| serde_json::from_slice(&k.value).ok())
        .collect()
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
        let (nodes, bgp_peers, live, blocks) = tokio::join!(
            kv.get_prefix(keys::NODES),
            kv.get_prefix(keys::BGP_PEERS),
            kv.list_keys(keys::LIVENESS),
            kv.get_prefix(keys::BLOCKS),
        );
        let read = nodes.and_then(|n| Ok((n, bgp_peers?, live?, blocks?)));
        match read {
            Ok(((kvs, _), (pkvs, _), live, (bkvs, _))) => {
                let nodes: Vec<Node> = decode_all(&kvs);
                let external: Vec<BgpPeer> = decode_all(&pkvs);
                let blocks: Vec<IpamBlock> = decode_all(&bkvs);
                let live: BTreeSet<String> = live
                    .into_iter()
                    .filter_map(|(k, _)| k.strip_prefix(keys::LIVENESS).map(String::from))
                    .collect();
                let peers = node_peers(
                    &me,
                    default_asn,
                    &nodes,
                    &external,
                    &live,
                    &holders(&blocks),
                );
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
    fn external_peers_follow_the_node_selector() {
        let mut a = node("a", "198.18.0.10", false);
        a.labels.insert("rack".into(), "r1".into());
        let nodes = [a, node("b", "198.18.0.11", false)];
        let tor = BgpPeer {
            name: "tor-r1".into(),
            peer_ip: "198.18.0.1".parse().expect("addr"),
            as_number: 65001,
            node_selector: "rack == \"r1\"".parse().expect("selector"),
            password: Some("pw".into()),
            bfd: true,
        };
        let p = external_peers("a", &nodes, std::slice::from_ref(&tor));
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].asn, p[0].bfd, p[0].password.as_deref()),
            (65001, true, Some("pw"))
        );
        assert!(external_peers("b", &nodes, &[tor]).is_empty());
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

    #[test]
    fn one_policy_keeps_a_node_that_still_holds_something_and_drops_a_reclaimed_one() {
        let nodes = vec![
            node("a", "198.18.0.10", false),
            node("b", "198.18.0.11", false),
            node("c", "198.18.0.12", false),
        ];
        let live: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let mut block = IpamBlock::new("10.244.0.0/26".parse().expect("net"), Some("c".into()));
        let peers = |blocks: &[IpamBlock]| {
            node_peers("a", 64512, &nodes, &[], &live, &holders(blocks))
                .iter()
                .map(|p| p.address.to_string())
                .collect::<Vec<_>>()
        };
        // c's lease lapsed but it holds a block: it may be cut off from etcd only.
        assert_eq!(
            peers(std::slice::from_ref(&block)),
            ["198.18.0.11", "198.18.0.12"]
        );
        // Reclaimed: nothing held, unpeered.
        block.affinity = None;
        assert_eq!(peers(&[block]), ["198.18.0.11"]);
    }

    #[test]
    fn only_a_labelled_node_gets_a_cluster_id() {
        let id = Ipv4Addr::new(198, 18, 0, 10);
        assert_eq!(
            cluster_id(&node("a", "198.18.0.10", true).labels, id),
            Some(id)
        );
        assert_eq!(
            cluster_id(&node("a", "198.18.0.10", false).labels, id),
            None
        );
    }
}
