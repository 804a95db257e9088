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
use tessera_datastore::model::{BgpConfiguration, BgpPeer, Node};
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
/// The cluster's [`BgpConfiguration`] applies: its AS for nodes without their own (over
/// `default_asn`), and with the node-to-node mesh off only the `BgpPeer`s remain.
pub fn node_peers(
    me: &str,
    default_asn: u32,
    nodes: &[Node],
    bgp_peers: &[BgpPeer],
    live: &BTreeSet<String>,
    holders: &BTreeSet<String>,
    bgp: &BgpConfiguration,
) -> Vec<PeerConfig> {
    let default_asn = bgp.as_number.unwrap_or(default_asn);
    let meshed: Vec<Node> = nodes
        .iter()
        .filter(|n| n.name == me || live.contains(&n.name) || holders.contains(&n.name))
        .cloned()
        .collect();
    let mut peers = if bgp.node_to_node_mesh_enabled {
        mesh_peers(me, default_asn, &meshed)
    } else {
        Vec::new()
    };
    for e in external_peers(me, &meshed, bgp_peers) {
        if !peers.iter().any(|p| p.address == e.address) {
            peers.push(e);
        }
    }
    peers.sort_by_key(|p| p.address);
    peers
}

/// The cluster id of a node labelled as a route reflector: the configured one, else its
/// router id. None for other nodes, and with the node-to-node mesh off.
pub fn cluster_id(
    labels: &BTreeMap<String, String>,
    router_id: Ipv4Addr,
    bgp: &BgpConfiguration,
) -> Option<Ipv4Addr> {
    (bgp.node_to_node_mesh_enabled && labels.get(REFLECTOR_LABEL).is_some_and(|v| v == "true"))
        .then(|| bgp.route_reflector_cluster_id.unwrap_or(router_id))
}

/// The cluster's BGP settings from the `default` record (the defaults when there is none or
/// it does not decode).
pub async fn bgp_configuration<K: Kv>(kv: &K) -> BgpConfiguration {
    match kv.get(&keys::bgp_config("default")).await {
        Ok(Some(item)) => tessera_datastore::from_stored(&item.value).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the BGPConfiguration does not decode: using the defaults");
            BgpConfiguration::default()
        }),
        _ => BgpConfiguration::default(),
    }
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
fn decode_all<T: serde::de::DeserializeOwned + 'static>(
    kvs: &[tessera_datastore::kv::KeyValue],
) -> Vec<T> {
    kvs.iter()
        .filter_map(|k| tessera_datastore::from_stored(&k.value).ok())
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
        let bgp = bgp_configuration(&kv).await;
        let read = nodes.and_then(|n| Ok((n, bgp_peers?, live?, blocks?)));
        match read {
            Ok(((kvs, _), (pkvs, _), live, (bkvs, _))) => {
                let nodes: Vec<Node> = decode_all(&kvs);
                let external: Vec<BgpPeer> = decode_all(&pkvs);
                // A block that does not decode is skipped, as a corrupt record is.
                let blocks: Vec<IpamBlock> = tessera_datastore::block_store::each_block(&bkvs)
                    .filter_map(|b| b.ok().map(|(block, _)| block))
                    .collect();
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
                    &bgp,
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
            node_peers(
                "a",
                64512,
                &nodes,
                &[],
                &live,
                &holders(blocks),
                &BgpConfiguration::default(),
            )
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
        let bgp = BgpConfiguration::default();
        assert_eq!(
            cluster_id(&node("a", "198.18.0.10", true).labels, id, &bgp),
            Some(id)
        );
        assert_eq!(
            cluster_id(&node("a", "198.18.0.10", false).labels, id, &bgp),
            None
        );
        let configured = BgpConfiguration {
            route_reflector_cluster_id: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        };
        assert_eq!(
            cluster_id(&node("a", "198.18.0.10", true).labels, id, &configured),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
    }

    #[test]
    fn the_bgp_configuration_sets_the_as_and_turns_the_mesh_off() {
        let nodes = vec![
            node("a", "198.18.0.10", false),
            node("b", "198.18.0.11", false),
        ];
        let live: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let tor = BgpPeer {
            name: "tor".into(),
            peer_ip: "198.18.0.1".parse().expect("ip"),
            as_number: 65000,
            node_selector: tessera_datastore::selector::Selector::all(),
            password: None,
            bfd: false,
        };
        let peers = |bgp: &BgpConfiguration| {
            node_peers(
                "a",
                64512,
                &nodes,
                std::slice::from_ref(&tor),
                &live,
                &BTreeSet::new(),
                bgp,
            )
            .iter()
            .map(|p| (p.address.to_string(), p.asn))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            peers(&BgpConfiguration::default()),
            [("198.18.0.1".into(), 65000), ("198.18.0.11".into(), 64512)]
        );
        let other_as = BgpConfiguration {
            as_number: Some(64600),
            ..Default::default()
        };
        assert_eq!(
            peers(&other_as),
            [("198.18.0.1".into(), 65000), ("198.18.0.11".into(), 64600)]
        );
        let no_mesh = BgpConfiguration {
            node_to_node_mesh_enabled: false,
            ..Default::default()
        };
        assert_eq!(peers(&no_mesh), [("198.18.0.1".into(), 65000)]);
    }
}
