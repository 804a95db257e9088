//! Pod MTU: the underlay interface's MTU minus the encapsulation overhead of the pools in
//! use, written where the CNI plugin reads it (`mtuFile`, default /var/lib/tessera/mtu).

use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::Handle;

use crate::vxlan::TunnelError;

/// Bytes a packet grows by, per encapsulation.
pub const VXLAN_OVERHEAD: u32 = 50;
pub const VXLAN_V6_OVERHEAD: u32 = 70;
pub const IPIP_OVERHEAD: u32 = 20;

/// The largest pod MTU that never fragments: underlay MTU minus the largest overhead in use.
pub fn pod_mtu(underlay_mtu: u32, vxlan: bool, ipip: bool) -> u32 {
    let overhead = [(vxlan, VXLAN_OVERHEAD), (ipip, IPIP_OVERHEAD)]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, o)| o)
        .max()
        .unwrap_or(0);
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
        assert_eq!(pod_mtu(1500, false, false), 1500);
        assert_eq!(pod_mtu(1500, true, false), 1450);
        assert_eq!(pod_mtu(1500, false, true), 1480);
        assert_eq!(pod_mtu(9000, true, true), 8950);
    }
}
