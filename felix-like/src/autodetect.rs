//! Which address is this node's underlay address: Calico's autodetection methods. The choice
//! is pure (over a list of interfaces); [`interfaces`] reads that list through netlink.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::Handle;
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Method {
    /// The first global address on an interface that is not ours (cali*, vxlan*, tunl0...).
    #[default]
    FirstFound,
    /// The address the kernel would send from to reach this one.
    CanReach(IpAddr),
    /// The first global address on an interface whose name matches.
    Interface(String),
    /// This address (with its prefix length).
    Explicit(IpNetwork),
}

impl TryFrom<String> for Method {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "first-found" {
            return Ok(Method::FirstFound);
        }
        if let Some(a) = s.strip_prefix("can-reach=") {
            return a
                .parse()
                .map(Method::CanReach)
                .map_err(|_| format!("can-reach={a}: not an IP address"));
        }
        if let Some(r) = s.strip_prefix("interface=") {
            regex::Regex::new(r).map_err(|e| format!("interface={r}: {e}"))?;
            return Ok(Method::Interface(r.into()));
        }
        s.parse::<IpNetwork>().map(Method::Explicit).map_err(|_| {
            format!(
                "{s:?}: expected first-found, can-reach=<address>, interface=<regex> or an address/prefix"
            )
        })
    }
}

/// An interface and its global addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub addrs: Vec<IpNetwork>,
}

/// Interfaces Tessera made or that never carry the underlay.
fn excluded(name: &str) -> bool {
    name == "lo"
        || ["cali", "vxlan", "tunl", "veth", "docker", "cni", "kube-"]
            .iter()
            .any(|p| name.starts_with(p))
}

fn global(a: &IpNetwork) -> bool {
    match a.ip() {
        IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
        IpAddr::V6(v) => !v.is_loopback() && (v.segments()[0] & 0xffc0) != 0xfe80,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AutodetectError {
    #[error("IP autodetection (first-found): no interface has a global IPv4 address")]
    NothingFound,
    #[error("IP autodetection (interface={0}): no matching interface has a global IPv4 address")]
    NoMatchingInterface(String),
    #[error("IP autodetection (can-reach={0}): no route to it ({1})")]
    Unreachable(IpAddr, String),
    #[error("IP autodetection: {0} is not on any interface of this node")]
    NotLocal(IpAddr),
}

/// The underlay: the chosen address (with its prefix length), the interface it is on, and the
/// first global IPv6 address of that interface if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub interface: String,
    pub v4: IpNetwork,
    pub v6: Option<IpNetwork>,
}

/// Picks the underlay among `ifaces`; `source_for` answers can-reach (the kernel's source
/// address towards a destination).
pub fn choose(
    method: &Method,
    ifaces: &[Interface],
    source_for: impl Fn(IpAddr) -> Result<IpAddr, String>,
) -> Result<Underlay, AutodetectError> {
    let on_iface = |ip: IpAddr| {
        ifaces
            .iter()
            .find_map(|i| i.addrs.iter().find(|a| a.ip() == ip).map(|a| (i, *a)))
    };
    let first_v4 = |i: &Interface| i.addrs.iter().find(|a| a.is_ipv4() && global(a)).copied();
    let (iface, v4) = match method {
        Method::FirstFound => ifaces
            .iter()
            .filter(|i| !excluded(&i.name))
            .find_map(|i| first_v4(i).map(|a| (i, a)))
            .ok_or(AutodetectError::NothingFound)?,
        Method::Interface(pattern) => {
            let re = regex::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|_| AutodetectError::NoMatchingInterface(pattern.clone()))?;
            ifaces
                .iter()
                .filter(|i| re.is_match(&i.name))
                .find_map(|i| first_v4(i).map(|a| (i, a)))
                .ok_or_else(|| AutodetectError::NoMatchingInterface(pattern.clone()))?
        }
        Method::CanReach(dst) => {
            let src = source_for(*dst).map_err(|e| AutodetectError::Unreachable(*dst, e))?;
            on_iface(src).ok_or(AutodetectError::NotLocal(src))?
        }
        Method::Explicit(net) => {
            let (i, _) = on_iface(net.ip()).ok_or(AutodetectError::NotLocal(net.ip()))?;
            (i, *net)
        }
    };
    let v6 = iface
        .addrs
        .iter()
        .find(|a| a.is_ipv6() && global(a))
        .copied();
    Ok(Underlay {
        interface: iface.name.clone(),
        v4,
        v6,
    })
}

/// The kernel's source address towards `dst` (a connected UDP socket sends nothing).
pub fn kernel_source_for(dst: IpAddr) -> Result<IpAddr, String> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "bind".to_string())?
    } else {
        "[::]:0".parse().map_err(|_| "bind".to_string())?
    };
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.connect(SocketAddr::new(dst, 9))
        .map_err(|e| e.to_string())?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.ip())
}

/// Every interface with its addresses.
pub async fn interfaces(h: &Handle) -> Result<Vec<Interface>, rtnetlink::Error> {
    let links: Vec<_> = h.link().get().execute().try_collect().await?;
    let addrs: Vec<_> = h.address().get().execute().try_collect().await?;
    let mut out: Vec<Interface> = links
        .iter()
        .map(|l| Interface {
            name: l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            addrs: addrs
                .iter()
                .filter(|a| a.header.index == l.header.index)
                .filter_map(|a| {
                    let ip = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    IpNetwork::new(ip, a.header.prefix_len).ok()
                })
                .filter(global)
                .collect(),
        })
        .collect();
    out.sort_by_key(|i| i.name.clone());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifaces() -> Vec<Interface> {
        let i = |n: &str, a: &[&str]| Interface {
            name: n.into(),
            addrs: a.iter().map(|s| s.parse().expect("net")).collect(),
        };
        vec![
            i("cali1234", &["10.244.0.1/32"]),
            i("eth0", &["198.18.1.10/24", "2001:db8:1::10/64"]),
            i("eth1", &["198.18.2.10/24"]),
            i("vxlan.calico", &["10.244.0.0/32"]),
        ]
    }

    #[test]
    fn methods() {
        let none = |_| Err("no route".to_string());
        let u = choose(&Method::FirstFound, &ifaces(), none).expect("found");
        assert_eq!(
            (u.interface.as_str(), u.v4.to_string()),
            ("eth0", "198.18.1.10/24".into())
        );
        assert_eq!(
            u.v6.map(|a| a.to_string()),
            Some("2001:db8:1::10/64".into())
        );
        let u = choose(&Method::Interface("eth1".into()), &ifaces(), none).expect("found");
        assert_eq!(u.v4.to_string(), "198.18.2.10/24");
        let reach = |_| Ok("198.18.2.10".parse().expect("addr"));
        let u = choose(
            &Method::CanReach("198.18.2.254".parse().expect("addr")),
            &ifaces(),
            reach,
        )
        .expect("found");
        assert_eq!(u.interface, "eth1");
        assert_eq!(
            choose(
                &Method::CanReach("203.0.113.1".parse().expect("addr")),
                &ifaces(),
                none
            ),
            Err(AutodetectError::Unreachable(
                "203.0.113.1".parse().expect("addr"),
                "no route".into()
            ))
        );
        assert_eq!(
            choose(&Method::Interface("ens.*".into()), &ifaces(), none),
            Err(AutodetectError::NoMatchingInterface("ens.*".into()))
        );
        let only_ours = vec![ifaces().remove(0)];
        assert_eq!(
            choose(&Method::FirstFound, &only_ours, none),
            Err(AutodetectError::NothingFound)
        );
    }

    #[test]
    fn parsing() {
        assert_eq!("first-found".parse(), Ok(Method::FirstFound));
        assert_eq!(
            "198.18.1.10/24".parse(),
            Ok(Method::Explicit("198.18.1.10/24".parse().expect("net")))
        );
        assert!("interface=(".parse::<Method>().is_err());
        assert!("can-reach=nowhere".parse::<Method>().is_err());
    }
}
