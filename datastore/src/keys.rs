//! The key layout in etcd. Everything Tessera stores lives under [`PREFIX`].

use ipnetwork::IpNetwork;

pub const PREFIX: &str = "/tessera/v1/";

/// Bumped in the same transaction as every pool or reservation change, so that an IPAM write
/// can compare one key to know its view of pools and reservations is current.
pub const CONFIG_EPOCH: &str = "/tessera/v1/config/epoch";
pub const POOLS: &str = "/tessera/v1/config/pools/";
pub const RESERVATIONS: &str = "/tessera/v1/config/reservations/";
pub const BGP_PEERS: &str = "/tessera/v1/config/bgppeers/";
/// Cluster-wide BGP settings (one record, `default`).
pub const BGP_CONFIG: &str = "/tessera/v1/config/bgp/";
/// Pools, reservations and the epoch, readable in one range request.
pub const CONFIG: &str = "/tessera/v1/config/";

pub const BLOCKS: &str = "/tessera/v1/ipam/blocks/";
pub const AFFINITIES: &str = "/tessera/v1/ipam/affinities/";
pub const HANDLES: &str = "/tessera/v1/ipam/handles/";
/// Last addresses of a workload (namespace/name), for stable addresses across restarts.
pub const LAST_ADDRESSES: &str = "/tessera/v1/ipam/last-addresses/";
/// A random number naming this datastore (see [`crate::handoff::store_id`]).
pub const STORE_ID: &str = "/tessera/v1/ipam/store-id";
pub const NODES: &str = "/tessera/v1/nodes/";
pub const LIVENESS: &str = "/tessera/v1/liveness/";
pub const WORKLOADS: &str = "/tessera/v1/workloads/";
/// GC's record that a node's liveness lease lapsed (a [`crate::model::Suspect`]).
pub const SUSPECTS: &str = "/tessera/v1/nodestatus/suspects/";
/// The operator's word that a node is gone (a [`crate::model::Decommission`]).
pub const DECOMMISSIONS: &str = "/tessera/v1/nodestatus/decommissions/";
/// The GC leader's name, on the leader's etcd lease.
pub const GC_LEADER: &str = "/tessera/v1/gc/leader";
pub const POD_INTENTS: &str = "/tessera/v1/pod-intents/";

/// `10.244.1.0/26` -> `10.244.1.0-26`: a CIDR as one path segment.
pub fn cidr_segment(cidr: IpNetwork) -> String {
    format!("{}-{}", cidr.network(), cidr.prefix())
}

pub fn pool(name: &str) -> String {
    format!("{POOLS}{name}")
}
/// `IPAMConfiguration` records: under [`CONFIG`], read with the pools and guarded by the
/// epoch like them.
pub const IPAM_CONFIG: &str = "/tessera/v1/config/ipam/";
pub fn ipam_config(name: &str) -> String {
    format!("{IPAM_CONFIG}{name}")
}
pub fn bgp_config(name: &str) -> String {
    format!("{BGP_CONFIG}{name}")
}
pub fn bgp_peer(name: &str) -> String {
    format!("{BGP_PEERS}{name}")
}
pub fn reservation(name: &str) -> String {
    format!("{RESERVATIONS}{name}")
}
pub fn block(cidr: IpNetwork) -> String {
    format!("{BLOCKS}{}", cidr_segment(cidr))
}
/// A `V6` block's allocation at `ordinal`, beside the block's own key.
pub fn block_record(cidr: IpNetwork, ordinal: u32) -> String {
    format!("{BLOCKS}{}/{ordinal}", cidr_segment(cidr))
}
pub fn node_affinities(node: &str) -> String {
    format!("{AFFINITIES}{node}/")
}
pub fn affinity(node: &str, cidr: IpNetwork) -> String {
    format!("{AFFINITIES}{node}/{}", cidr_segment(cidr))
}
pub fn handle(id: &str) -> String {
    format!("{HANDLES}{id}")
}
pub fn last_addresses(namespace: &str, name: &str) -> String {
    format!("{LAST_ADDRESSES}{namespace}/{name}")
}
pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}
pub fn liveness(name: &str) -> String {
    format!("{LIVENESS}{name}")
}
pub fn suspect(name: &str) -> String {
    format!("{SUSPECTS}{name}")
}
pub fn decommission(name: &str) -> String {
    format!("{DECOMMISSIONS}{name}")
}
pub fn workload(node: &str, namespace: &str, pod: &str, interface: &str) -> String {
    format!("{WORKLOADS}{node}/{namespace}/{pod}/{interface}")
}

pub fn node_workloads(node: &str) -> String {
    format!("{WORKLOADS}{node}/")
}
pub fn pod_intent(namespace: &str, pod: &str) -> String {
    format!("{POD_INTENTS}{namespace}/{pod}")
}

/// A name that becomes one key segment: non-empty, no `/`, printable.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && !s.contains('/') && s.chars().all(|c| c.is_ascii_graphic())
}
