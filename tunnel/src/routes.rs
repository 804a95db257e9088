//! The routes Tessera programs from the datastore (protocol [`PROTO`]): one reconciler for
//! every kind (VXLAN onlink, native via the underlay, tunl0 onlink, blackholes for our own
//! blocks). Routes of other protocols are never looked at; ours that nobody wants are removed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::vxlan::{TunnelError, PROTO};

/// One route as Tessera wants it in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelRoute {
    pub dst: IpNetwork,
    pub kind: RouteKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// `via <gw>`, on `dev` (`onlink`) when given, else wherever the kernel reaches `gw`.
    Via { gw: IpAddr, dev: Option<u32> },
    /// `blackhole <dst>`: our own block's unallocated addresses go nowhere.
    Blackhole,
}

/// What a reconcile changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: usize,
    pub removed: usize,
}

impl RouteChanges {
    pub fn total(&self) -> usize {
        self.added + self.removed
    }
}

/// The route a kernel message describes, if it is one of the shapes we program.
fn parse(r: &RouteMessage) -> Option<KernelRoute> {
    let dst_ip = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })
        .unwrap_or(match r.header.address_family {
            rtnetlink::packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        });
    let dst = IpNetwork::new(dst_ip, r.header.destination_prefix_length).ok()?;
    if r.header.kind == RouteType::BlackHole {
        return Some(KernelRoute {
            dst,
            kind: RouteKind::Blackhole,
        });
    }
    let gw = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let oif = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let onlink = r
        .header
        .flags
        .contains(rtnetlink::packet_route::route::RouteFlags::Onlink);
    Some(KernelRoute {
        dst,
        kind: RouteKind::Via {
            gw,
            dev: oif.filter(|_| onlink),
        },
    })
}

fn message(r: &KernelRoute) -> RouteMessage {
    let proto = RouteProtocol::Other(PROTO);
    match (r.dst, r.kind) {
        (IpNetwork::V4(d), kind) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix())
                .protocol(proto);
            match kind {
                RouteKind::Blackhole => b = b.kind(RouteType::BlackHole),
                RouteKind::Via { gw, dev } => {
                    if let IpAddr::V4(g) = gw {
                        b = b.gateway(g);
                    }
                    if let Some(dev) = dev {
                        b = b.output_interface(dev).onlink();
                    }
                }
            }
            b.build()
        }
        (IpNetwork::V6(d), kind) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix())
                .protocol(proto);
            match kind {
                RouteKind::Blackhole => b = b.kind(RouteType::BlackHole),
                RouteKind::Via { gw, dev } => {
                    if let IpAddr::V6(g) = gw {
                        b = b.gateway(g);
                    }
                    if let Some(dev) = dev {
                        b = b.output_interface(dev).onlink();
                    }
                }
            }
            b.build()
        }
    }
}

/// Our routes in the main table now.
pub async fn current_routes(h: &Handle) -> Result<Vec<(KernelRoute, RouteMessage)>, TunnelError> {
    let mut out = Vec::new();
    for msg in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let rs: Vec<RouteMessage> =
            h.route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(|source| TunnelError::Netlink {
                    what: "listing routes".into(),
                    source,
                })?;
        out.extend(
            rs.into_iter()
                .filter(|r| r.header.protocol == RouteProtocol::Other(PROTO))
                .filter_map(|r| parse(&r).map(|k| (k, r))),
        );
    }
    Ok(out)
}

/// Makes our routes exactly `wanted` (one route per destination): missing or different ones
/// replaced, ours that are not wanted removed.
pub async fn ensure_routes(
    h: &Handle,
    wanted: &[KernelRoute],
) -> Result<RouteChanges, TunnelError> {
    ensure_routes_among(h, wanted, |_| true).await
}

/// [`ensure_routes`] for the part of our routes `scope` selects: ours outside it are left
/// alone (e.g. only those on tunl0, for a process that owns nothing else).
pub async fn ensure_routes_among(
    h: &Handle,
    wanted: &[KernelRoute],
    scope: impl Fn(&KernelRoute) -> bool,
) -> Result<RouteChanges, TunnelError> {
    let nl = |what: &'static str| {
        move |source| TunnelError::Netlink {
            what: what.into(),
            source,
        }
    };
    let want: HashMap<IpNetwork, KernelRoute> = wanted.iter().map(|r| (r.dst, *r)).collect();
    let mut changes = RouteChanges::default();
    let mut have: HashMap<IpNetwork, KernelRoute> = HashMap::new();
    for (route, msg) in current_routes(h).await? {
        if !scope(&route) {
            continue;
        }
        if want.get(&route.dst) == Some(&route) {
            have.insert(route.dst, route);
        } else {
            h.route()
                .del(msg)
                .execute()
                .await
                .map_err(nl("removing a route of ours"))?;
            changes.removed += 1;
        }
    }
    for r in want.values() {
        if have.get(&r.dst) != Some(r) {
            h.route()
                .add(message(r))
                .replace()
                .execute()
                .await
                .map_err(|source| TunnelError::Netlink {
                    what: format!("adding route {r:?}"),
                    source,
                })?;
            changes.added += 1;
        }
    }
    Ok(changes)
}

/// The alias CNI DEL gives a pod's host interface it is done with. Deleting a veth costs the
/// kernel an RCU grace period (~20 ms, most of DEL), so DEL retires the link and a reaper
/// process deletes it after DEL has returned. A retired link is a gone pod's: nothing counts
/// it as a running pod's interface, ADD replaces it, and the agent deletes any a reaper left.
pub const RETIRED_ALIAS: &str = "tessera: retired by CNI DEL";

/// Whether DEL retired this link (see [`RETIRED_ALIAS`]).
pub fn is_retired(link: &LinkMessage) -> bool {
    use rtnetlink::packet_route::link::LinkAttribute;
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfAlias(alias) if alias == RETIRED_ALIAS))
}

async fn all_links(h: &Handle) -> Result<Vec<LinkMessage>, TunnelError> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| TunnelError::Netlink {
            what: "listing links".into(),
            source,
        })
}

/// Whether netlink said the link does not exist (ENODEV): for deletions and lookups that
/// are done when the link is gone.
pub fn is_enodev(e: &rtnetlink::Error) -> bool {
    const ENODEV: i32 = 19;
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -ENODEV)
}

/// Deletes the retired links a reaper did not get to (it was killed, or the node restarted
/// in between); returns how many. A link gone meanwhile is not an error.
pub async fn delete_retired_links(h: &Handle) -> Result<usize, TunnelError> {
    let mut deleted = 0;
    for link in all_links(h).await?.iter().filter(|l| is_retired(l)) {
        match h.link().del(link.header.index).execute().await {
            Ok(()) => deleted += 1,
            Err(e) if is_enodev(&e) => {}
            Err(source) => {
                return Err(TunnelError::Netlink {
                    what: "deleting a retired pod interface".into(),
                    source,
                })
            }
        }
    }
    Ok(deleted)
}

/// The names of the namespace's links, but not the retired ones (a gone pod's: see
/// [`RETIRED_ALIAS`]).
pub async fn link_names(h: &Handle) -> Result<std::collections::HashSet<String>, TunnelError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    Ok(all_links(h)
        .await?
        .iter()
        .filter(|l| !is_retired(l))
        .flat_map(|l| l.attributes.iter())
        .filter_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .collect())
}

/// Removes the host route to a pod address (`<addr>/32 dev <ifname>`, or /128), whoever made
/// it: a fenced pod must not be reached through this node. True when a route was removed;
/// no route (or no such link) is not an error.
pub async fn remove_host_route(
    h: &Handle,
    addr: IpAddr,
    ifname: &str,
) -> Result<bool, TunnelError> {
    let Some(link) = crate::vxlan::link(h, ifname).await? else {
        return Ok(false);
    };
    let index = link.header.index;
    // Protocol unspecified and scope "nowhere": match the route whoever made it, at any
    // scope (the CNI plugin's is `proto boot scope link`).
    let msg = match addr {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(index)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(index)
            .protocol(RouteProtocol::Unspec)
            .build(),
    };
    match h.route().del(msg).execute().await {
        Ok(()) => Ok(true),
        // ESRCH: no such route (already fenced).
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -3 => Ok(false),
        Err(source) => Err(TunnelError::Netlink {
            what: format!("removing the host route to {addr}"),
            source,
        }),
    }
}
