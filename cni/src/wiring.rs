//! Pod wiring as Calico does it, through rtnetlink:
//!
//! - a veth pair; the host end `<prefix><11 hex of sha1(identity)>`, MAC ee:ee:ee:ee:ee:ee,
//!   proxy ARP, forwarding; the pod end `eth0` (CNI_IFNAME) in the pod's namespace;
//! - in the pod: the /32 and /128, `169.254.1.1 dev eth0 scope link`,
//!   `default via 169.254.1.1`, and for IPv6 `default via <host end's link-local>`;
//! - on the host: `<pod-ip>/32 dev <host end> scope link` (and /128).
//!
//! With `podInterface: netkit` (opt-in; Linux 6.7 and later) the pair is a netkit pair in
//! L3 mode instead: no MAC addresses and no ARP (the /32 and host-route model needs
//! neither), and the kernel hands packets to the peer without veth's per-CPU backlog.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use std::os::fd::AsRawFd;

use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoNetkit, InfoVeth, LinkAttribute, LinkMessage, NetkitMode,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha1::{Digest, Sha1};

use crate::error::CniError;
use crate::netns::{in_netns, open_netns};
use tessera_tunnel::routes::{is_enodev, is_retired, RETIRED_ALIAS};

pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pod's gateway: answered by proxy ARP on the host end.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The host end's link-local address (EUI-64 of ee:ee:ee:ee:ee:ee), the pod's IPv6 gateway.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// `<prefix>` + 11 hex characters of SHA-1 over the workload identity (Calico's scheme, so
/// host interface names match what Calico operators know).
pub fn host_ifname(prefix: &str, identity: &str) -> String {
    let digest = Sha1::digest(identity.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let keep = 15usize.saturating_sub(prefix.len()).min(11);
    format!("{prefix}{}", &hex[..keep])
}

/// The kind of device pair a pod gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodInterface {
    /// What Calico uses, and every kernel has.
    #[default]
    Veth,
    /// A netkit pair in L3 mode (Linux 6.7+).
    Netkit,
}

/// What to build for one pod interface.
#[derive(Debug, Clone)]
pub struct PodWiring {
    pub device: PodInterface,
    pub netns: String,
    pub host_ifname: String,
    pub ifname: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct Wired {
    pub container_mac: String,
    /// The pair was already there from an earlier ADD and was repaired in place (the pod
    /// kept its interface, MAC and connections).
    pub repaired: bool,
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], CniError> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| CniError::invalid_config(format!("invalid MAC address {s:?}")))?;
    parts
        .try_into()
        .map_err(|_| CniError::invalid_config(format!("invalid MAC address {s:?}")))
}

fn nl(what: &str) -> impl Fn(rtnetlink::Error) -> CniError + '_ {
    move |e| CniError::netlink(format!("{what}: {e}"))
}

/// The link called `name`, if any.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if is_enodev(&e) => Ok(None),
        Err(e) => Err(CniError::netlink(format!("looking up {name}: {e}"))),
    }
}

pub fn link_mac(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(format_mac(m)),
        _ => None,
    })
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn sysctl(path: &str, value: &str) -> Result<(), CniError> {
    std::fs::write(format!("/proc/sys/{path}"), value)
        .map_err(|e| CniError::io(format!("sysctl {path}={value}: {e}")))
}

/// Builds the pod's interface, or, when an earlier ADD for the same container and interface
/// already built it, repairs it in place: the pod keeps its interface (same index and MAC) and
/// its connections; whatever is missing (an address, a route, the link state) is put back.
/// `h` is a handle in the host (node) namespace, which is also the calling thread's. A pair
/// this call created is removed again if a later step fails; a repaired one is left as it is.
pub async fn wire_pod(h: &Handle, w: &PodWiring) -> Result<Wired, CniError> {
    let ns = open_netns(&w.netns)?;
    let (host, repaired) = match intact_pair(h, w).await? {
        Some(host) => {
            tracing::info!(host = %w.host_ifname, "ADD again: the pod's interface is there, repairing in place");
            (host, true)
        }
        None => (create_pair(h, w, &ns).await?, false),
    };
    match configure(h, w, &host).await {
        Ok(container_mac) => Ok(Wired {
            container_mac,
            repaired,
        }),
        Err(e) => {
            if !repaired {
                let _ = remove_host_end(h, &w.host_ifname).await;
            }
            Err(e)
        }
    }
}

/// The host end, if it and the pod's `ifname` are the two ends of one veth pair (each names
/// the other's index), which is what an earlier ADD for this container left.
async fn intact_pair(h: &Handle, w: &PodWiring) -> Result<Option<LinkMessage>, CniError> {
    let Some(host) = link_by_name(h, &w.host_ifname).await? else {
        return Ok(None);
    };
    // A DEL for this container retired it: its reaper may delete it any moment.
    if is_retired(&host) {
        return Ok(None);
    }
    let Some(peer_index) = link_peer(&host) else {
        return Ok(None);
    };
    let host_index = host.header.index;
    let ifname = w.ifname.clone();
    let paired = in_netns(&w.netns, move |c| async move {
        Ok(link_by_name(&c, &ifname).await?.is_some_and(|pod| {
            pod.header.index == peer_index && link_peer(&pod) == Some(host_index)
        }))
    })
    .await?;
    Ok(paired.then_some(host))
}

/// A veth's `IFLA_LINK`: the index of its peer (in the peer's namespace).
fn link_peer(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// A new veth pair, replacing a leftover host end (an ADD that crashed half-way).
async fn create_pair(
    h: &Handle,
    w: &PodWiring,
    ns: &std::fs::File,
) -> Result<LinkMessage, CniError> {
    remove_host_end(h, &w.host_ifname).await?;
    // The pod end is created directly inside the pod's namespace under its final name:
    // moving a link between namespaces afterwards costs an RCU grace period (~20 ms).
    let mut pod_end = LinkMessageBuilder::<LinkUnspec>::new()
        .name(w.ifname.clone())
        .mtu(w.mtu)
        .append_extra_attribute(LinkAttribute::NetNsFd(ns.as_raw_fd()));
    if let Some(mac) = w.mac {
        pod_end = pod_end.address(mac.to_vec());
    }
    let pair = match w.device {
        PodInterface::Veth => LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(w.host_ifname.clone())
            .mtu(w.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(pod_end.build())))
            .build(),
        PodInterface::Netkit => {
            LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Netkit)
                .name(w.host_ifname.clone())
                .mtu(w.mtu)
                .set_info_data(InfoData::Netkit(vec![
                    InfoNetkit::Mode(NetkitMode::L3),
                    InfoNetkit::Peer(pod_end.build()),
                ]))
                .build()
        }
    };
    h.link().add(pair).execute().await.map_err(|e| match &e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() == -17 => CniError::new(
            crate::error::code::INVALID_CONFIG,
            format!("the pod already has an interface {}", w.ifname),
        ),
        rtnetlink::Error::NetlinkError(m)
            if m.raw_code() == -95 && w.device == PodInterface::Netkit =>
        {
            CniError::invalid_config(
                "podInterface netkit: this kernel has no netkit devices (Linux 6.7 or later built with CONFIG_NETKIT); use veth",
            )
        }
        _ => CniError::netlink(format!("creating the {:?} pair: {e}", w.device)),
    })?;
    link_by_name(h, &w.host_ifname)
        .await?
        .ok_or_else(|| CniError::netlink("host end vanished"))
}

/// Everything after the pair exists, written so that a converged pod is left untouched:
/// sysctls, host end (MAC, MTU, up), the pod side, host routes. Returns the pod end's MAC.
async fn configure(h: &Handle, w: &PodWiring, host: &LinkMessage) -> Result<String, CniError> {
    let ipv6 = w.addresses.iter().any(IpAddr::is_ipv6);
    // Host end: sysctls before it comes up (IPv6 DAD off before its link-local appears).
    let hn = &w.host_ifname;
    if ipv6 {
        sysctl(&format!("net/ipv6/conf/{hn}/accept_dad"), "0")?;
        sysctl(&format!("net/ipv6/conf/{hn}/forwarding"), "1")?;
        sysctl("net/ipv6/conf/all/forwarding", "1")?;
    }
    let veth = w.device == PodInterface::Veth;
    if veth {
        // The pod's gateway is answered here; a netkit pair in L3 mode has no ARP at all.
        sysctl(&format!("net/ipv4/conf/{hn}/proxy_arp"), "1")?;
        sysctl(&format!("net/ipv4/neigh/{hn}/proxy_delay"), "0")?;
    }
    sysctl(&format!("net/ipv4/conf/{hn}/forwarding"), "1")?;
    sysctl("net/ipv4/ip_forward", "1")?;
    let mut set = LinkUnspec::new_with_index(host.header.index).up();
    if veth && link_mac(host) != Some(format_mac(&HOST_MAC)) {
        set = set.address(HOST_MAC.to_vec());
    }
    if link_mtu(host) != Some(w.mtu) {
        set = set.mtu(w.mtu);
    }
    h.link()
        .set(set.build())
        .execute()
        .await
        .map_err(nl("bringing up the host end"))?;

    let pod = w.clone();
    let container_mac = in_netns(
        &w.netns,
        move |c| async move { wire_container(&c, &pod).await },
    )
    .await?;

    for addr in &w.addresses {
        host_route(h, *addr, host.header.index).await?;
    }
    Ok(container_mac)
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

async fn host_route(h: &Handle, addr: IpAddr, index: u32) -> Result<(), CniError> {
    let msg = match addr {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .build(),
    };
    add_route(h, msg, "adding the host route").await
}

/// Inside the pod's namespace: sysctls, link up, addresses, routes, each a no-op when already
/// so (address and route writes are `replace`s). Returns the pod end's MAC.
async fn wire_container(c: &Handle, w: &PodWiring) -> Result<String, CniError> {
    let link = link_by_name(c, &w.ifname)
        .await?
        .ok_or_else(|| CniError::netlink("pod end not in the pod namespace"))?;
    let idx = link.header.index;
    if w.addresses.iter().any(IpAddr::is_ipv6) {
        // The pod's own addresses are unique by IPAM; DAD would only delay them.
        sysctl(&format!("net/ipv6/conf/{}/accept_dad", w.ifname), "0")?;
        sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", w.ifname), "0")?;
    }
    let mut set = LinkUnspec::new_with_index(idx).up();
    if link_mtu(&link) != Some(w.mtu) {
        set = set.mtu(w.mtu);
    }
    if let Some(mac) = w.mac.filter(|m| link_mac(&link) != Some(format_mac(m))) {
        set = set.address(mac.to_vec());
    }
    c.link()
        .set(set.build())
        .execute()
        .await
        .map_err(nl("bringing up the pod end"))?;
    for addr in &w.addresses {
        let plen = if addr.is_ipv4() { 32 } else { 128 };
        c.address()
            .add(idx, *addr, plen)
            .replace()
            .execute()
            .await
            .map_err(nl("adding the pod address"))?;
    }
    if w.addresses.iter().any(IpAddr::is_ipv4) {
        let gw = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY_V4, 32)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        add_route(c, gw, "gateway route").await?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(GATEWAY_V4)
            .output_interface(idx)
            .build();
        add_route(c, default, "default route").await?;
    }
    if w.addresses.iter().any(IpAddr::is_ipv6) {
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(GATEWAY_V6)
            .output_interface(idx)
            .build();
        add_route(c, default, "IPv6 default route").await?;
    }
    let link = link_by_name(c, &w.ifname)
        .await?
        .ok_or_else(|| CniError::netlink("pod end vanished"))?;
    Ok(link_mac(&link).unwrap_or_default())
}

async fn add_route(
    h: &Handle,
    msg: rtnetlink::packet_route::route::RouteMessage,
    what: &str,
) -> Result<(), CniError> {
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(nl(what))
}

/// DEL's part in the kernel: marks the host end retired (a fast attribute write; see
/// [`RETIRED_ALIAS`]) and returns its index for the reaper; None when there is no host end.
pub async fn retire_host_end(h: &Handle, host_ifname: &str) -> Result<Option<u32>, CniError> {
    let Some(link) = link_by_name(h, host_ifname).await? else {
        return Ok(None);
    };
    let index = link.header.index;
    let retire = LinkUnspec::new_with_index(index)
        .append_extra_attribute(LinkAttribute::IfAlias(RETIRED_ALIAS.into()))
        .build();
    match h.link().set(retire).execute().await {
        Ok(()) => Ok(Some(index)),
        Err(e) if is_enodev(&e) => Ok(None),
        Err(e) => Err(CniError::netlink(format!("retiring {host_ifname}: {e}"))),
    }
}

/// Deletes link `index` if it is still the retired `host_ifname` (the pod end goes with it):
/// an ADD for the same container in between replaced it with a new link, left alone.
pub async fn reap_retired(h: &Handle, index: u32, host_ifname: &str) -> Result<(), CniError> {
    let link = match h.link().get().match_index(index).execute().try_next().await {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(()),
        Err(e) if is_enodev(&e) => return Ok(()),
        Err(e) => return Err(CniError::netlink(format!("looking up {host_ifname}: {e}"))),
    };
    let named = link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if n == host_ifname));
    if !named || !is_retired(&link) {
        return Ok(());
    }
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_enodev(&e) => Ok(()),
        Err(e) => Err(CniError::netlink(format!("deleting {host_ifname}: {e}"))),
    }
}

/// Deletes the host end if it exists, retired or not (the pod end goes with it). Idempotent.
pub async fn remove_host_end(h: &Handle, host_ifname: &str) -> Result<(), CniError> {
    if let Some(l) = link_by_name(h, host_ifname).await? {
        match h.link().del(l.header.index).execute().await {
            Ok(()) => {}
            Err(e) if is_enodev(&e) => {}
            Err(e) => return Err(CniError::netlink(format!("deleting {host_ifname}: {e}"))),
        }
    }
    Ok(())
}

/// What CHECK verifies: the host end (up, our MAC, a host route per address) and, inside the
/// pod, the interface with every address and the default routes.
pub async fn check_pod(h: &Handle, w: &PodWiring) -> Result<(), CniError> {
    let host = link_by_name(h, &w.host_ifname).await?.ok_or_else(|| {
        CniError::check_failed(format!("host interface {} is missing", w.host_ifname))
    })?;
    if w.device == PodInterface::Veth && link_mac(&host).as_deref() != Some(&format_mac(&HOST_MAC))
    {
        return Err(CniError::check_failed(format!(
            "{} has the wrong MAC",
            w.host_ifname
        )));
    }
    let routes = dump_routes(h).await?;
    for addr in &w.addresses {
        let plen = if addr.is_ipv4() { 32 } else { 128 };
        let want = (
            IpNetwork::new(*addr, plen).ok(),
            Some(host.header.index),
            None,
        );
        if !routes.iter().any(|r| (r.0, r.1, r.2) == want) {
            return Err(CniError::check_failed(format!(
                "host route to {addr} via {} is missing",
                w.host_ifname
            )));
        }
    }
    let pod = w.clone();
    in_netns(&w.netns, move |c| async move {
        let link = link_by_name(&c, &pod.ifname).await?.ok_or_else(|| {
            CniError::check_failed(format!("{} is missing in the pod", pod.ifname))
        })?;
        let idx = link.header.index;
        let addrs: Vec<IpAddr> = c
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(nl("listing pod addresses"))?
            .iter()
            .flat_map(|m| m.attributes.iter())
            .filter_map(|a| match a {
                rtnetlink::packet_route::address::AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        for addr in &pod.addresses {
            if !addrs.contains(addr) {
                return Err(CniError::check_failed(format!(
                    "{addr} is missing on {} in the pod",
                    pod.ifname
                )));
            }
        }
        let routes = dump_routes(&c).await?;
        if pod.addresses.iter().any(IpAddr::is_ipv4)
            && !routes.iter().any(|r| {
                r.0.is_some_and(|d| d.prefix() == 0 && d.is_ipv4())
                    && r.2 == Some(IpAddr::V4(GATEWAY_V4))
            })
        {
            return Err(CniError::check_failed(
                "the pod's default route via 169.254.1.1 is missing",
            ));
        }
        if pod.addresses.iter().any(IpAddr::is_ipv6)
            && !routes.iter().any(|r| {
                r.0.is_some_and(|d| d.prefix() == 0 && d.is_ipv6())
                    && r.2 == Some(IpAddr::V6(GATEWAY_V6))
            })
        {
            return Err(CniError::check_failed(
                "the pod's IPv6 default route is missing",
            ));
        }
        Ok(())
    })
    .await
}

/// (destination, output interface, gateway) of every main-table route, both families.
async fn dump_routes(
    h: &Handle,
) -> Result<Vec<(Option<IpNetwork>, Option<u32>, Option<IpAddr>)>, CniError> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let mut out = Vec::new();
    for msg in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let v4 = msg.header.address_family == rtnetlink::packet_route::AddressFamily::Inet;
        let routes: Vec<_> = h
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        for r in routes {
            let addr = |a: &RouteAddress| match a {
                RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
                RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
                _ => None,
            };
            let mut dst = None;
            let mut oif = None;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = addr(d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(g) => gw = addr(g),
                    _ => {}
                }
            }
            let dst = match dst {
                Some(d) => IpNetwork::new(d, r.header.destination_prefix_length).ok(),
                None if v4 => IpNetwork::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).ok(),
                None => IpNetwork::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).ok(),
            };
            out.push((dst, oif, gw));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_calico_style() {
        let n = host_ifname("cali", "default.web-0");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with("cali"));
        assert_eq!(n, host_ifname("cali", "default.web-0"), "deterministic");
        assert_ne!(n, host_ifname("cali", "default.web-1"));
        assert!(host_ifname("averylongprefix", "x").len() <= 15);
    }

    #[test]
    fn gateway_v6_is_the_eui64_of_the_host_mac() {
        // fe80:: + (ee^02):ee:ee:ff:fe:ee:ee:ee
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }

    #[test]
    fn macs_parse_and_format() {
        assert_eq!(
            format_mac(&parse_mac("02:42:ac:11:00:02").expect("mac")),
            "02:42:ac:11:00:02"
        );
        assert_eq!(parse_mac("zz").unwrap_err().code, 7);
    }
}
