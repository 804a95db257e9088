//! Pod MTU: the underlay interface's MTU minus the encapsulation overhead of the pools in
//! use, written where the CNI plugin reads it (`mtuFile`, default /var/lib/tessera/mtu).

use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::Handle;

use crate::vxlan::TunnelError;

/// Bytes a packet grows by, per encapsulation.
pub const VXLAN_OVERHEAD: u32 = 50;
pub const VXLAN_V6_OVERHEAD: u32 = 70;
pub const IPIP_OVERHEAD: u32 = 20;

/// An encapsulation in use on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    Vxlan,
    VxlanV6,
    Ipip,
}

impl Encap {
    /// Bytes a packet grows by.
    pub fn overhead(self) -> u32 {
        match self {
            Encap::Vxlan => VXLAN_OVERHEAD,
            Encap::VxlanV6 => VXLAN_V6_OVERHEAD,
            Encap::Ipip => IPIP_OVERHEAD,
        }
    }
}

/// The largest pod MTU that never fragments: underlay MTU minus the largest overhead in use.
pub fn pod_mtu(underlay_mtu: u32, in_use: &[Encap]) -> u32 {
    let overhead = in_use.iter().map(|e| e.overhead()).max().unwrap_or(0);
    underlay_mtu.saturating_sub(overhead)
}

/// The MTU of interface `name`.
pub async fn interface_mtu(h: &Handle, name: &str) -> Result<u32, TunnelError> {
    let link = crate::vxlan::link(h, name)
        .await?
        .ok_or_else(|| TunnelError::NoUnderlay(name.into()))?;
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .ok_or_else(|| TunnelError::NoUnderlay(name.into()))
}

/// Writes the pod MTU atomically (write, then rename) for the CNI plugin.
pub fn write_mtu_file(path: &std::path::Path, mtu: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{mtu}\n"))?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_mtu_takes_the_largest_overhead() {
        assert_eq!(pod_mtu(1500, &[]), 1500);
        assert_eq!(pod_mtu(1500, &[Encap::Vxlan]), 1450);
        assert_eq!(pod_mtu(1500, &[Encap::Ipip]), 1480);
        assert_eq!(pod_mtu(9000, &[Encap::Vxlan, Encap::Ipip]), 8950);
        assert_eq!(pod_mtu(1500, &[Encap::Vxlan, Encap::VxlanV6]), 1430);
    }
}
