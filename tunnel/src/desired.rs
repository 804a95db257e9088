//! What the kernel should hold for VXLAN, computed from the nodes (pure, no I/O).

use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// When a pool's traffic to a node is encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Always,
    /// Only towards nodes on another underlay subnet.
    CrossSubnet,
    Never,
}

/// Another node, as the tunnel needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    /// Underlay address with its prefix (e.g. 198.18.1.10/24).
    pub underlay: IpNetwork,
    pub vtep_ip: IpAddr,
    pub vtep_mac: [u8; 6],
    /// The node's blocks.
    pub blocks: Vec<IpNetwork>,
}

/// Why a Node record cannot be a VXLAN peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} has no VTEP MAC (vxlanTunnelMac)")]
    NoVtepMac(String),
    #[error("node {node} has an invalid VTEP MAC {mac:?}")]
    BadVtepMac { node: String, mac: String },
    #[error("node {node} has no VTEP address ({field})")]
    NoVtepAddress { node: String, field: &'static str },
    #[error("node {node}: no {family} underlay address")]
    NoUnderlay { node: String, family: &'static str },
    #[error("node {node}: VTEP address {vtep} is not of the underlay's family")]
    FamilyMismatch { node: String, vtep: IpAddr },
}

impl RemoteNode {
    /// A peer from its Node record and blocks; `ipv6` picks the IPv6 underlay and VTEP.
    pub fn from_node(
        n: &tessera_datastore::model::Node,
        blocks: Vec<IpNetwork>,
        ipv6: bool,
    ) -> Result<Self, NodeError> {
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        let underlay =
            if ipv6 { n.ipv6_address } else { n.ipv4_address }.ok_or(NodeError::NoUnderlay {
                node: n.name.clone(),
                family,
            })?;
        let vtep_ip = if ipv6 {
            n.vxlan_tunnel_address_v6
        } else {
            n.vxlan_tunnel_address
        }
        .ok_or_else(|| NodeError::NoVtepAddress {
            node: n.name.clone(),
            field: if ipv6 {
                "vxlanTunnelAddressV6"
            } else {
                "vxlanTunnelAddress"
            },
        })?;
        if vtep_ip.is_ipv6() != ipv6 {
            return Err(NodeError::FamilyMismatch {
                node: n.name.clone(),
                vtep: vtep_ip,
            });
        }
        let mac_text = n
            .vxlan_tunnel_mac
            .as_deref()
            .ok_or_else(|| NodeError::NoVtepMac(n.name.clone()))?;
        let bad = || NodeError::BadVtepMac {
            node: n.name.clone(),
            mac: mac_text.to_string(),
        };
        let bytes: Vec<u8> = mac_text
            .split(':')
            .map(|p| u8::from_str_radix(p, 16))
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let vtep_mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
        Ok(RemoteNode {
            name: n.name.clone(),
            underlay,
            vtep_ip,
            vtep_mac,
            blocks,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    /// `<block> via <vtep ip> dev vxlan.calico onlink`
    Vxlan { block: IpNetwork, via: IpAddr },
    /// `<block> via <underlay ip>` (same subnet under CrossSubnet).
    Native { block: IpNetwork, via: IpAddr },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanEntries {
    /// Permanent neighbour entries on the VXLAN device: VTEP IP -> VTEP MAC.
    pub neighbours: Vec<(IpAddr, [u8; 6])>,
    /// FDB entries on the VXLAN device: VTEP MAC -> underlay IP.
    pub fdb: Vec<([u8; 6], IpAddr)>,
    pub routes: Vec<Route>,
}

/// The entries for `local` (its underlay network) towards `remotes` in `mode`.
pub fn vxlan_entries(local: IpNetwork, mode: Mode, remotes: &[RemoteNode]) -> VxlanEntries {
    let mut e = VxlanEntries::default();
    for r in remotes {
        let same_subnet = local.contains(r.underlay.ip()) && local.prefix() == r.underlay.prefix();
        let encapsulate = match mode {
            Mode::Always => true,
            Mode::CrossSubnet => !same_subnet,
            Mode::Never => false,
        };
        if encapsulate {
            e.neighbours.push((r.vtep_ip, r.vtep_mac));
            e.fdb.push((r.vtep_mac, r.underlay.ip()));
            e.routes.extend(r.blocks.iter().map(|b| Route::Vxlan {
                block: *b,
                via: r.vtep_ip,
            }));
        } else if same_subnet {
            e.routes.extend(r.blocks.iter().map(|b| Route::Native {
                block: *b,
                via: r.underlay.ip(),
            }));
        }
    }
    e.routes.sort();
    e
}

/// IPIP routes for `local` towards `remotes` in `mode`: `(block, remote underlay ip, via
/// tunl0)`; same-subnet nodes under CrossSubnet (and every node under Never) get a native
/// route through the underlay instead.
pub fn ipip_routes(
    local: IpNetwork,
    mode: Mode,
    remotes: &[RemoteNode],
) -> Vec<(IpNetwork, IpAddr, bool)> {
    let mut out = Vec::new();
    for r in remotes {
        let same_subnet = local.contains(r.underlay.ip()) && local.prefix() == r.underlay.prefix();
        let tunnel = match mode {
            Mode::Always => true,
            Mode::CrossSubnet => !same_subnet,
            Mode::Never => false,
        };
        if tunnel || same_subnet {
            out.extend(r.blocks.iter().map(|b| (*b, r.underlay.ip(), tunnel)));
        }
    }
    out.sort();
    out
}

/// A VTEP MAC derived from the node name: stable across restarts, locally administered
/// unicast (66:...).
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let h = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0x66, b[0], b[1], b[2], b[3], b[4]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, underlay: &str, vtep: &str, block: &str) -> RemoteNode {
        RemoteNode {
            name: name.into(),
            underlay: underlay.parse().expect("net"),
            vtep_ip: vtep.parse().expect("ip"),
            vtep_mac: vtep_mac(name),
            blocks: vec![block.parse().expect("net")],
        }
    }

    #[test]
    fn node_records_without_vxlan_fields_are_refused_clearly() {
        use tessera_datastore::model::Node;
        let ok = Node {
            name: "n2".into(),
            ipv4_address: Some("198.18.0.11/24".parse().expect("net")),
            vxlan_tunnel_address: Some("10.244.2.0".parse().expect("ip")),
            vxlan_tunnel_mac: Some("66:01:02:03:04:05".into()),
            ..Default::default()
        };
        let blocks = vec!["10.244.2.0/26".parse().expect("net")];
        assert_eq!(
            RemoteNode::from_node(&ok, blocks.clone(), false)
                .expect("valid")
                .vtep_mac,
            [0x66, 1, 2, 3, 4, 5]
        );
        let no_mac = Node {
            vxlan_tunnel_mac: None,
            ..ok.clone()
        };
        assert_eq!(
            RemoteNode::from_node(&no_mac, blocks.clone(), false).unwrap_err(),
            NodeError::NoVtepMac("n2".into())
        );
        let bad_mac = Node {
            vxlan_tunnel_mac: Some("66:01".into()),
            ..ok.clone()
        };
        assert!(matches!(
            RemoteNode::from_node(&bad_mac, blocks.clone(), false),
            Err(NodeError::BadVtepMac { .. })
        ));
        let e = RemoteNode::from_node(&ok, blocks.clone(), true).unwrap_err();
        assert!(e.to_string().contains("no IPv6 underlay"), "{e}");
        let v6vtep = Node {
            vxlan_tunnel_address: Some("fd10::1".parse().expect("ip")),
            ..ok
        };
        assert!(matches!(
            RemoteNode::from_node(&v6vtep, blocks, false),
            Err(NodeError::FamilyMismatch { .. })
        ));
    }

    #[test]
    fn modes_table() {
        let local: IpNetwork = "198.18.0.10/24".parse().expect("net");
        let same = node("b", "198.18.0.11/24", "10.244.2.0", "10.244.2.0/26");
        let other = node("c", "198.18.1.10/24", "10.244.3.0", "10.244.3.0/26");
        let all = [same.clone(), other.clone()];
        let always = vxlan_entries(local, Mode::Always, &all);
        assert_eq!(always.fdb.len(), 2);
        assert!(always
            .routes
            .iter()
            .all(|r| matches!(r, Route::Vxlan { .. })));
        let cross = vxlan_entries(local, Mode::CrossSubnet, &all);
        assert_eq!(cross.fdb, vec![(other.vtep_mac, other.underlay.ip())]);
        assert!(cross.routes.contains(&Route::Native {
            block: same.blocks[0],
            via: same.underlay.ip()
        }));
        assert!(cross.routes.contains(&Route::Vxlan {
            block: other.blocks[0],
            via: other.vtep_ip
        }));
        let never = vxlan_entries(local, Mode::Never, &all);
        assert!(never.fdb.is_empty() && never.neighbours.is_empty());
    }

    #[test]
    fn ipip_cross_subnet_tunnels_only_to_other_subnets() {
        let local: IpNetwork = "198.18.0.10/24".parse().expect("net");
        let same = node("b", "198.18.0.11/24", "10.244.2.0", "10.244.2.0/26");
        let other = node("c", "198.18.1.10/24", "10.244.3.0", "10.244.3.0/26");
        let r = ipip_routes(local, Mode::CrossSubnet, &[same.clone(), other.clone()]);
        assert_eq!(
            r,
            vec![
                (same.blocks[0], same.underlay.ip(), false),
                (other.blocks[0], other.underlay.ip(), true)
            ]
        );
        assert!(ipip_routes(local, Mode::Always, std::slice::from_ref(&same))[0].2);
        // Never: only what the underlay can reach natively.
        assert_eq!(ipip_routes(local, Mode::Never, &[same, other]).len(), 1);
    }

    #[test]
    fn vtep_macs_are_stable_and_locally_administered() {
        assert_eq!(vtep_mac("node1"), vtep_mac("node1"));
        assert_ne!(vtep_mac("node1"), vtep_mac("node2"));
        assert_eq!(vtep_mac("x")[0] & 0x03, 0x02);
    }
}
