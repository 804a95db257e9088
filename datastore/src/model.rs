//! The cluster model: typed resources stored as JSON under [`crate::keys::PREFIX`].
//!
//! The IPAM block itself ([`crate::block::IpamBlock`]) lives in its own module because it
//! carries the pure allocator.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// When a pool's traffic is encapsulated (Calico's ipipMode / vxlanMode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EncapMode {
    Always,
    /// Only towards nodes whose underlay address is on another subnet.
    CrossSubnet,
    #[default]
    Never,
}

/// An IP pool: where pod addresses come from and how their traffic leaves the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPoolSpec {
    pub cidr: IpNetwork,
    /// Prefix length of the blocks the pool is cut into (default /26 IPv4, /122 IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    #[serde(default)]
    pub ipip_mode: EncapMode,
    #[serde(default)]
    pub vxlan_mode: EncapMode,
    #[serde(default)]
    pub nat_outgoing: bool,
    #[serde(default)]
    pub disabled: bool,
    /// Which nodes may claim blocks from this pool.
    #[serde(default)]
    pub node_selector: Selector,
    /// When set, only workloads whose labels match may get addresses from this pool, and
    /// such workloads use it in preference to every other pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_selector: Option<Selector>,
    /// Refuse to borrow addresses from blocks affine to other nodes.
    #[serde(default)]
    pub strict_affinity: bool,
    /// A released address is not handed to another workload before this many seconds.
    #[serde(default)]
    pub min_reuse_delay_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpPool {
    pub name: String,
    pub spec: IpPoolSpec,
}

impl IpPool {
    pub fn block_size(&self) -> u8 {
        self.spec.block_size.unwrap_or(match self.spec.cidr {
            IpNetwork::V4(_) => 26,
            IpNetwork::V6(_) => 122,
        })
    }

    pub fn is_ipv4(&self) -> bool {
        self.spec.cidr.is_ipv4()
    }

    /// The block of this pool that holds `addr`.
    pub fn block_of(&self, addr: IpAddr) -> Option<IpNetwork> {
        if !self.spec.cidr.contains(addr) {
            return None;
        }
        let net = IpNetwork::new(addr, self.block_size()).ok()?;
        IpNetwork::new(net.network(), self.block_size()).ok()
    }

    /// Number of blocks in the pool (saturating at u64::MAX for huge IPv6 pools).
    pub fn block_count(&self) -> u64 {
        let bits = u32::from(self.block_size() - self.spec.cidr.prefix());
        1u64.checked_shl(bits).unwrap_or(u64::MAX)
    }

    /// The `index`-th block of the pool.
    pub fn nth_block(&self, index: u64) -> Option<IpNetwork> {
        let host_bits = u32::from(max_prefix(self.spec.cidr) - self.block_size());
        let offset = u128::from(index).checked_shl(host_bits)?;
        let base = addr_to_u128(self.spec.cidr.network());
        let addr = u128_to_addr(base.checked_add(offset)?, self.spec.cidr.is_ipv4())?;
        if !self.spec.cidr.contains(addr) {
            return None;
        }
        IpNetwork::new(addr, self.block_size()).ok()
    }

    /// Checks what serde cannot: family-dependent ranges and alignment. Errors name the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let cidr = self.spec.cidr;
        if cidr.network() != cidr.ip() {
            return Err((
                "spec.cidr",
                format!("{cidr} has host bits set; did you mean {}?", cidr.network()),
            ));
        }
        let (lo, hi) = if cidr.is_ipv4() { (20, 32) } else { (116, 128) };
        let bs = self.block_size();
        if !(lo..=hi).contains(&bs) {
            return Err((
                "spec.blockSize",
                format!("{bs} is outside {lo}..={hi} for this address family"),
            ));
        }
        if bs < cidr.prefix() {
            return Err((
                "spec.blockSize",
                format!("/{bs} blocks do not fit in the pool {cidr}"),
            ));
        }
        if self.spec.ipip_mode != EncapMode::Never && self.spec.vxlan_mode != EncapMode::Never {
            return Err((
                "spec.ipipMode",
                "ipipMode and vxlanMode cannot both be enabled on one pool".into(),
            ));
        }
        if self.spec.ipip_mode != EncapMode::Never && !cidr.is_ipv4() {
            return Err(("spec.ipipMode", "IPIP carries IPv4 pools only".into()));
        }
        Ok(())
    }
}

/// Addresses that IPAM must never hand out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpReservationSpec {
    pub reserved_cidrs: Vec<IpNetwork>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpReservation {
    pub name: String,
    pub spec: IpReservationSpec,
}

/// Whether a node's claim on a block is complete. A `Pending` affinity counts as absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    Pending,
    Confirmed,
    PendingDeletion,
}

/// A node's claim on a block: `/tessera/v1/ipam/affinities/<node>/<block>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinity {
    pub node: String,
    pub cidr: IpNetwork,
    pub state: AffinityState,
    /// When the affinity entered its state (ms since the epoch); GC uses it for its grace period.
    pub since_ms: u64,
}

/// One address held by a handle, with the sequence number of its allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HandleAddress {
    pub addr: IpAddr,
    pub block: IpNetwork,
    pub seq: u64,
}

/// Everything one owner (usually one pod interface) holds: `/tessera/v1/ipam/handles/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamHandle {
    pub id: String,
    pub addresses: Vec<HandleAddress>,
}

/// A cluster node as IPAM, routing and tunnels see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    /// Underlay address with its prefix, e.g. 198.18.0.11/24.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<IpNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_address: Option<IpNetwork>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_tunnel_address: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_tunnel_mac: Option<String>,
    /// The VTEP address of `vxlan-v6.calico` (IPv6 pools over the IPv6 underlay; same MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_tunnel_address_v6: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_tunnel_address: Option<IpAddr>,
    /// A random identity the node's agent keeps across restarts (its identity file). The
    /// agent's witness endpoint proves it knows this, so that an answer at the node's address
    /// counts only when it comes from that node's agent. Not a secret: etcd readers see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_identity: Option<String>,
    /// Where the agent's witness endpoint listens, on `ipv4_address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_port: Option<u16>,
}

/// GC's record that a node lost its liveness lease: `/tessera/v1/nodestatus/suspects/<node>`.
/// A suspect is reclaimed only after `reclaimAfterSeconds` and when the witness finds no agent
/// there; while suspect, nobody borrows from its blocks. The node deletes it when it returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Suspect {
    pub node: String,
    /// When GC first saw the lease gone.
    pub since_ms: u64,
}

/// The operator's word that a node is gone for good (the Kubernetes Node object was deleted,
/// or a human said so): GC reclaims it at once, without waiting or asking a witness.
/// `/tessera/v1/nodestatus/decommissions/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decommission {
    pub node: String,
    pub since_ms: u64,
    #[serde(default)]
    pub reason: String,
}

/// Addresses a workload had that went to another workload while its node was cut off (the
/// node was reclaimed). Its node fences them: no host route, no announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    pub addresses: Vec<IpAddr>,
    pub since_ms: u64,
}

/// A pod's network attachment: `/tessera/v1/workloads/<node>/<namespace>/<pod>/<interface>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpoint {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub container_id: String,
    pub interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub addresses: Vec<IpNetwork>,
    /// The IPAM handle that owns `addresses`.
    pub handle: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub floating_ips: Vec<IpAddr>,
    /// Set by the node's agent when some of `addresses` now belong to another workload: the
    /// pod is fenced and CNI CHECK fails for it, so that the runtime recreates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Conflict>,
}

/// An external BGP peer (a top-of-rack router, a route reflector outside the cluster), for
/// every node or for the nodes `nodeSelector` matches: `/tessera/v1/config/bgppeers/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeer {
    pub name: String,
    pub peer_ip: IpAddr,
    pub as_number: u32,
    #[serde(default)]
    pub node_selector: Selector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default)]
    pub bfd: bool,
}

/// Cluster-wide IPAM settings, one record named `default`: `/tessera/v1/config/ipam/default`
/// (Calico's IPAMConfiguration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfiguration {
    pub name: String,
    /// The format blocks are written in. `V2` (compact) once every node runs a Tessera
    /// that reads it (every release since the format came); blocks move to it as they
    /// are next written. Never back: a V2 block stays V2.
    #[serde(default)]
    pub block_format: crate::block::BlockFormat,
}

/// Cluster-wide BGP settings, one record named `default`: `/tessera/v1/config/bgp/default`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfiguration {
    pub name: String,
    /// The AS of nodes that set none of their own (else each agent's configured default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Nodes peer with each other automatically: the iBGP full mesh, or through the nodes
    /// labelled route reflector. Off: only the BGPPeers that select a node.
    #[serde(default = "crate::model::yes")]
    pub node_to_node_mesh_enabled: bool,
    /// The cluster id of the route reflectors (default: each reflector's router id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_reflector_cluster_id: Option<std::net::Ipv4Addr>,
}

pub(crate) fn yes() -> bool {
    true
}

impl Default for BgpConfiguration {
    fn default() -> Self {
        BgpConfiguration {
            name: "default".into(),
            as_number: None,
            node_to_node_mesh_enabled: true,
            route_reflector_cluster_id: None,
        }
    }
}

/// What a pod asks of the network, as Calico reads it from pod annotations:
/// `/tessera/v1/pod-intents/<namespace>/<pod>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodIntent {
    /// Exact addresses, assigned through IPAM (`cni.projectcalico.org/ipAddrs`).
    #[serde(default)]
    pub ip_addrs: Vec<IpAddr>,
    /// Addresses used without IPAM (`ipAddrsNoIpam`); refused unless the CNI config's
    /// feature flag allows it, since only the local node can route them.
    #[serde(default)]
    pub ip_addrs_no_ipam: Vec<IpAddr>,
    /// Pools to allocate from, by name.
    #[serde(default)]
    pub ipv4_pools: Vec<String>,
    #[serde(default)]
    pub ipv6_pools: Vec<String>,
    /// 1:1 NAT from an outside address to the pod (programmed by the node agent).
    #[serde(default)]
    pub floating_ips: Vec<IpAddr>,
    /// Labels, for owner-selected pools.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Why the pod's annotations cannot be followed (the controller's words): the CNI
    /// plugin refuses the pod with them rather than fall back to defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    /// A sticky StatefulSet pod: the handle that keeps its addresses while it is away
    /// (`crate::sticky`). DEL hands the addresses to it, the next ADD takes them back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_hold: Option<String>,
}

/// Who a workload is, for stable addresses and owner-selected pools.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadId {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

pub(crate) fn max_prefix(net: IpNetwork) -> u8 {
    if net.is_ipv4() {
        32
    } else {
        128
    }
}

pub(crate) fn addr_to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn u128_to_addr(v: u128, ipv4: bool) -> Option<IpAddr> {
    if ipv4 {
        u32::try_from(v)
            .ok()
            .map(|v| IpAddr::V4(std::net::Ipv4Addr::from(v)))
    } else {
        Some(IpAddr::V6(std::net::Ipv6Addr::from(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, bs: Option<u8>) -> IpPool {
        IpPool {
            name: "p".into(),
            spec: IpPoolSpec {
                cidr: cidr.parse().expect("cidr"),
                block_size: bs,
                ipip_mode: EncapMode::Never,
                vxlan_mode: EncapMode::Never,
                nat_outgoing: false,
                disabled: false,
                node_selector: Selector::all(),
                owner_selector: None,
                strict_affinity: false,
                min_reuse_delay_seconds: 0,
            },
        }
    }

    #[test]
    fn blocks_of_a_pool() {
        let p = pool("10.244.0.0/20", None);
        assert_eq!(p.block_count(), 64);
        assert_eq!(
            p.nth_block(1).map(|b| b.to_string()),
            Some("10.244.0.64/26".into())
        );
        assert_eq!(p.nth_block(64), None);
        assert_eq!(
            p.block_of("10.244.3.77".parse().expect("addr"))
                .map(|b| b.to_string()),
            Some("10.244.3.64/26".into())
        );
        let p6 = pool("fd10:244::/120", None);
        assert_eq!(p6.block_count(), 4);
        assert_eq!(
            p6.nth_block(3).map(|b| b.to_string()),
            Some("fd10:244::c0/122".into())
        );
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(
            pool("10.244.0.1/16", None).validate().unwrap_err().0,
            "spec.cidr"
        );
        assert_eq!(
            pool("10.244.0.0/16", Some(8)).validate().unwrap_err().0,
            "spec.blockSize"
        );
        assert_eq!(
            pool("fd10::/48", Some(26)).validate().unwrap_err().0,
            "spec.blockSize"
        );
        assert!(pool("10.244.0.0/16", None).validate().is_ok());
    }
}

/// What the node agent's `/status` answers (and `tesseractl node status` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    pub live: bool,
    pub ready: bool,
    /// Why it is not live or not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub bgp_peers: Vec<BgpPeerStatus>,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub blocks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerStatus {
    pub address: String,
    pub asn: u32,
    /// Internal (same AS) or external.
    pub kind: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    pub prefixes_received: usize,
    pub prefixes_sent: usize,
}
