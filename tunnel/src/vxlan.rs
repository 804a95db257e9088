//! `VxlanDevice` and its entries through rtnetlink, converging from any state: a device with
//! the wrong VNI, port or local address is replaced, a wrong MTU or MAC fixed; missing
//! neighbour/FDB entries and routes are added, stray ones of ours removed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

use crate::desired::{Route, VxlanEntries};
use crate::routes::{KernelRoute, RouteKind};

/// The route protocol of routes Tessera programs from the datastore (VXLAN and IPIP): ours
/// are recognisable, and distinct from the BGP speaker's (80), so that neither sweeps the
/// other's routes.
pub const PROTO: u8 = 81;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "IPIP is not available: the kernel has no `tunl0` (load the `ipip` module: modprobe ipip)"
    )]
    IpipUnavailable,
    #[error("underlay interface {0} not found")]
    NoUnderlay(String),
    #[error("device {name} exists and is not a VXLAN device; not touching it")]
    NotOurs { name: String },
    #[error("VNI {vni} is already used by device {other}")]
    VniClash { vni: u32, other: String },
    #[error("address {0} is of the wrong family for this device (vxlan.calico: IPv4, vxlan-v6.calico: IPv6)")]
    WrongFamily(IpAddr),
}

fn nl(what: &str) -> impl Fn(rtnetlink::Error) -> TunnelError + '_ {
    move |source| TunnelError::Netlink {
        what: what.to_string(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct VxlanDevice {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub underlay_if: String,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub vtep_ip: IpAddr,
    /// The device carries IPv6 pools over an IPv6 underlay (`vxlan-v6.calico`).
    pub ipv6: bool,
}

impl VxlanDevice {
    /// Calico's defaults: `vxlan.calico`, VNI 4096, UDP 4789, MTU = underlay MTU - 50.
    pub fn calico(
        local: IpAddr,
        underlay_if: &str,
        underlay_mtu: u32,
        mac: [u8; 6],
        vtep_ip: IpAddr,
    ) -> Self {
        VxlanDevice {
            name: "vxlan.calico".into(),
            vni: 4096,
            port: 4789,
            local,
            underlay_if: underlay_if.into(),
            mtu: underlay_mtu.saturating_sub(crate::mtu::VXLAN_OVERHEAD),
            mac,
            vtep_ip,
            ipv6: false,
        }
    }

    /// Calico's IPv6 device: `vxlan-v6.calico`, VNI 6096, MTU = underlay MTU - 70.
    pub fn calico_v6(
        local: IpAddr,
        underlay_if: &str,
        underlay_mtu: u32,
        mac: [u8; 6],
        vtep_ip: IpAddr,
    ) -> Self {
        VxlanDevice {
            name: "vxlan-v6.calico".into(),
            vni: 6096,
            mtu: underlay_mtu.saturating_sub(crate::mtu::VXLAN_V6_OVERHEAD),
            ipv6: true,
            ..Self::calico(local, underlay_if, underlay_mtu, mac, vtep_ip)
        }
    }
}

/// The link called `name`, if any.
pub(crate) async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, TunnelError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if crate::routes::is_enodev(&e) => Ok(None),
        Err(e) => Err(TunnelError::Netlink {
            what: format!("looking up {name}"),
            source: e,
        }),
    }
}

fn vxlan_info(l: &LinkMessage) -> Option<Vec<InfoVxlan>> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.clone()),
            _ => None,
        }),
        _ => None,
    })
}

fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Creates or fixes the device; returns its index.
pub async fn ensure_device(h: &Handle, d: &VxlanDevice) -> Result<u32, TunnelError> {
    if d.local.is_ipv6() != d.ipv6 || d.vtep_ip.is_ipv6() != d.ipv6 {
        return Err(TunnelError::WrongFamily(if d.local.is_ipv6() != d.ipv6 {
            d.local
        } else {
            d.vtep_ip
        }));
    }
    let local_attr = match d.local {
        IpAddr::V4(a) => InfoVxlan::Local(a),
        IpAddr::V6(a) => InfoVxlan::Local6(a),
    };
    let underlay = link(h, &d.underlay_if)
        .await?
        .ok_or_else(|| TunnelError::NoUnderlay(d.underlay_if.clone()))?;
    // Another VXLAN device with our VNI and port would make creation fail half-way.
    let all: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    for l in &all {
        let name = link_name(l);
        if name == d.name {
            continue;
        }
        if let Some(info) = vxlan_info(l) {
            let same_vni = info.contains(&InfoVxlan::Id(d.vni));
            let same_port = info.contains(&InfoVxlan::Port(d.port));
            if same_vni && same_port {
                return Err(TunnelError::VniClash {
                    vni: d.vni,
                    other: name,
                });
            }
        }
    }
    if let Some(existing) = link(h, &d.name).await? {
        let Some(info) = vxlan_info(&existing) else {
            return Err(TunnelError::NotOurs {
                name: d.name.clone(),
            });
        };
        let right = info.contains(&InfoVxlan::Id(d.vni))
            && info.contains(&InfoVxlan::Port(d.port))
            && info.contains(&local_attr)
            && info.contains(&InfoVxlan::Learning(false));
        if !right {
            tracing::info!(device = %d.name, "VXLAN device has the wrong VNI, port, local address or learning: recreating");
            h.link()
                .del(existing.header.index)
                .execute()
                .await
                .map_err(nl("deleting the device"))?;
        }
    }
    if link(h, &d.name).await?.is_none() {
        let b = LinkVxlan::new(&d.name, d.vni)
            .port(d.port)
            .dev(underlay.header.index)
            .learning(false);
        let msg = match d.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        }
        .build();
        h.link()
            .add(msg)
            .execute()
            .await
            .map_err(nl("creating the VXLAN device"))?;
    }
    let dev = link(h, &d.name)
        .await?
        .ok_or_else(|| TunnelError::NotOurs {
            name: d.name.clone(),
        })?;
    // MTU, MAC and up: written only when they differ, so a converged device sees no writes
    // (and the node agent's netlink watch no echo of its own reconcile).
    let mtu = dev.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let mac = dev.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    });
    let up = dev
        .header
        .flags
        .contains(rtnetlink::packet_route::link::LinkFlags::Up);
    if mtu != Some(d.mtu) || mac.as_deref() != Some(d.mac.as_slice()) || !up {
        h.link()
            .set(
                LinkUnspec::new_with_index(dev.header.index)
                    .mtu(d.mtu)
                    .address(d.mac.to_vec())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("setting MTU, MAC, up"))?;
    }
    let plen = if d.vtep_ip.is_ipv4() { 32 } else { 128 };
    let addrs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(dev.header.index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing the VTEP address"))?;
    let has_vtep = addrs.iter().any(|a| {
        a.header.prefix_len == plen
            && a.attributes.iter().any(|x| {
                matches!(x, rtnetlink::packet_route::address::AddressAttribute::Address(ip) if *ip == d.vtep_ip)
            })
    });
    if !has_vtep {
        h.address()
            .add(dev.header.index, d.vtep_ip, plen)
            .replace()
            .execute()
            .await
            .map_err(nl("the VTEP address"))?;
    }
    Ok(dev.header.index)
}

fn neigh_dst(m: &NeighbourMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        // FDB entries (AF_BRIDGE) carry their IP destination undecoded.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        },
        _ => None,
    })
}

fn neigh_lladdr(m: &NeighbourMessage) -> Option<Vec<u8>> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
        _ => None,
    })
}

/// Adds the missing entries and removes stray ones on the device; routes of protocol
/// [`PROTO`] not desired are removed, other routes are never touched.
pub async fn ensure_entries(h: &Handle, dev: u32, e: &VxlanEntries) -> Result<(), TunnelError> {
    ensure_neighbours(h, dev, e).await?;
    let routes: Vec<KernelRoute> = e.routes.iter().map(|r| kernel_route(r, dev)).collect();
    crate::routes::ensure_routes(h, &routes).await?;
    Ok(())
}

/// The route a desired VXLAN-pool route is in the kernel.
pub fn kernel_route(r: &Route, dev: u32) -> KernelRoute {
    match *r {
        Route::Vxlan { block, via } => KernelRoute {
            dst: block,
            kind: RouteKind::Via {
                gw: via,
                dev: Some(dev),
            },
        },
        Route::Native { block, via } => KernelRoute {
            dst: block,
            kind: RouteKind::Via { gw: via, dev: None },
        },
    }
}

/// The neighbour (VTEP IP -> MAC) and FDB (MAC -> underlay) entries on the device: missing
/// ones added, permanent ones nobody wants removed. Returns how many it changed.
pub async fn ensure_neighbours(
    h: &Handle,
    dev: u32,
    e: &VxlanEntries,
) -> Result<usize, TunnelError> {
    let mut changed = 0;
    // Neighbours (ARP): VTEP IP -> VTEP MAC.
    // One dump per family: ARP, ND and the bridge FDB (a plain dump covers only one).
    let mut neighbours: Vec<NeighbourMessage> = Vec::new();
    for family in [
        AddressFamily::Inet,
        AddressFamily::Inet6,
        AddressFamily::Bridge,
    ] {
        let part: Vec<NeighbourMessage> = h
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing neighbours"))?;
        neighbours.extend(part);
    }
    let mut have_arp = HashSet::new();
    let mut have_fdb = HashSet::new();
    for n in neighbours.iter().filter(|n| n.header.ifindex == dev) {
        match (n.header.family, neigh_dst(n), neigh_lladdr(n)) {
            (AddressFamily::Bridge, Some(dst), Some(mac)) => {
                if e.fdb.iter().any(|(m, u)| m.as_slice() == mac && *u == dst) {
                    have_fdb.insert((mac, dst));
                } else if n.header.state == NeighbourState::Permanent {
                    h.neighbours()
                        .del(n.clone())
                        .execute()
                        .await
                        .map_err(nl("removing a stray FDB entry"))?;
                    changed += 1;
                }
            }
            (AddressFamily::Inet | AddressFamily::Inet6, Some(dst), mac) => {
                let wanted = e
                    .neighbours
                    .iter()
                    .any(|(ip, m)| *ip == dst && mac.as_deref() == Some(m.as_slice()));
                if wanted {
                    have_arp.insert(dst);
                } else if n.header.state == NeighbourState::Permanent {
                    h.neighbours()
                        .del(n.clone())
                        .execute()
                        .await
                        .map_err(nl("removing a stray neighbour"))?;
                    changed += 1;
                }
            }
            _ => {}
        }
    }
    for (ip, mac) in &e.neighbours {
        if !have_arp.contains(ip) {
            h.neighbours()
                .add(dev, *ip)
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl("adding a neighbour"))?;
            changed += 1;
        }
    }
    for (mac, underlay) in &e.fdb {
        if !have_fdb.contains(&(mac.to_vec(), *underlay)) {
            h.neighbours()
                .add_bridge(dev, mac)
                .destination(*underlay)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl("adding an FDB entry"))?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Removes the device (and with it every entry on it).
pub async fn remove_device(h: &Handle, name: &str) -> Result<(), TunnelError> {
    if let Some(l) = link(h, name).await? {
        if vxlan_info(&l).is_none() {
            return Err(TunnelError::NotOurs { name: name.into() });
        }
        h.link()
            .del(l.header.index)
            .execute()
            .await
            .map_err(nl("deleting the device"))?;
    }
    Ok(())
}
