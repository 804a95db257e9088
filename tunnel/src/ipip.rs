//! `IpipDevice`: `tunl0`, the fallback IPIP device the kernel creates when the `ipip` module
//! loads. Tessera brings it up with the right MTU and the node's tunnel address, and routes
//! each remote block `via <node underlay ip> dev tunl0 onlink`.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::{Handle, LinkUnspec};

use crate::routes::{ensure_routes_among, KernelRoute, RouteKind};
use crate::vxlan::TunnelError;

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
    let wanted: Vec<KernelRoute> = routes
        .iter()
        .map(|(block, via)| KernelRoute {
            dst: *block,
            kind: RouteKind::Via {
                gw: IpAddr::V4(*via),
                dev: Some(tunl0),
            },
        })
        .collect();
    let on_tunl0 =
        |r: &KernelRoute| matches!(r.kind, RouteKind::Via { dev: Some(d), .. } if d == tunl0);
    ensure_routes_among(h, &wanted, on_tunl0).await?;
    Ok(())
}
