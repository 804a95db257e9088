//! `IpipDevice`: `tunl0`, the fallback IPIP device the kernel creates when the `ipip` module
//! loads. Tessera brings it up with the right MTU and the node's tunnel address, and routes
//! each remote block `via <node underlay ip> dev tunl0 onlink`.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::vxlan::{TunnelError, PROTO};

pub const TUNL0: &str = "tunl0";

#[derive(Debug, Clone)]
pub struct IpipDevice {
    /// Underlay MTU - 20.
    pub mtu: u32,
    /// The node's tunnel address (from IPAM, per-node handle).
    pub tunnel_addr: Ipv4Addr,
}

/// Brings `tunl0` up with the MTU and address; returns its index. Without the kernel's
/// `ipip` module there is no `tunl0`: the error says so.
pub async fn ensure_ipip(h: &Handle, d: &IpipDevice) -> Result<u32, TunnelError> {
    let link = crate::vxlan::link(h, TUNL0)
        .await?
        .ok_or(TunnelError::IpipUnavailable)?;
    let idx = link.header.index;
    // Written only when they differ: a converged tunl0 sees no writes.
    let mtu = link.attributes.iter().find_map(|a| match a {
        rtnetlink::packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let up = link
        .header
        .flags
        .contains(rtnetlink::packet_route::link::LinkFlags::Up);
    if mtu != Some(d.mtu) || !up {
        h.link()
            .set(LinkUnspec::new_with_index(idx).mtu(d.mtu).up().build())
            .execute()
            .await
            .map_err(|source| TunnelError::Netlink {
                what: "tunl0 MTU and up".into(),
                source,
            })?;
    }
    let addrs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(idx)
        .execute()
        .try_collect()
        .await
        .map_err(|source| TunnelError::Netlink {
            what: "listing tunl0 addresses".into(),
            source,
        })?;
    let has = addrs.iter().any(|a| {
        a.attributes.iter().any(|x| {
            matches!(x, rtnetlink::packet_route::address::AddressAttribute::Address(ip) if *ip == IpAddr::V4(d.tunnel_addr))
        })
    });
    if !has {
        h.address()
            .add(idx, IpAddr::V4(d.tunnel_addr), 32)
            .replace()
            .execute()
            .await
            .map_err(|source| TunnelError::Netlink {
                what: "tunl0 address".into(),
                source,
            })?;
    }
    Ok(idx)
}

/// Routes `block via node dev tunl0 onlink` for each (block, node underlay ip), replacing
/// ours that differ and removing ours on tunl0 that are no longer wanted.
pub async fn ensure_ipip_routes(
    h: &Handle,
    tunl0: u32,
    routes: &[(IpNetwork, Ipv4Addr)],
) -> Result<(), TunnelError> {
    let nl = |what: &'static str| {
        move |source| TunnelError::Netlink {
            what: what.into(),
            source,
        }
    };
    let existing: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes"))?;
    let on_tunl0 = |r: &RouteMessage| {
        r.header.protocol == RouteProtocol::Other(PROTO)
            && r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == tunl0))
    };
    let dst = |r: &RouteMessage| {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                Some((*d, r.header.destination_prefix_length))
            }
            _ => None,
        })
    };
    for r in existing.iter().filter(|r| on_tunl0(r)) {
        let wanted = dst(r).is_some_and(|(d, p)| {
            routes
                .iter()
                .any(|(b, _)| b.ip() == IpAddr::V4(d) && b.prefix() == p)
        });
        if !wanted {
            h.route()
                .del(r.clone())
                .execute()
                .await
                .map_err(nl("removing a stray tunl0 route"))?;
        }
    }
    for (block, via) in routes {
        let IpNetwork::V4(b) = block else { continue };
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(b.network(), b.prefix())
            .gateway(*via)
            .output_interface(tunl0)
            .onlink()
            .protocol(RouteProtocol::Other(PROTO))
            .build();
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl("adding a tunl0 route"))?;
    }
    Ok(())
}
