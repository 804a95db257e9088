//! What an UPDATE from a peer means for the RIB, decided without I/O: only the families the
//! session carries (the rest is ignored and counted, RFC 4760 §6 / RFC 7606 §5.3), and a path
//! that loops back to us (our AS over eBGP, our router id as ORIGINATOR_ID, our cluster id in
//! CLUSTER_LIST) or that RFC 7606 says to treat as withdrawn is a withdrawal.

use std::sync::Arc;

use ipnetwork::IpNetwork;

use crate::packet::{Families, Update};
use crate::rib::{Attrs, Local, PeerInfo};

#[derive(Debug, Default, PartialEq)]
pub struct Received {
    pub announced: Vec<(IpNetwork, Arc<Attrs>)>,
    pub withdrawn: Vec<IpNetwork>,
    /// Prefixes of a family the session does not carry (ignored).
    pub foreign: usize,
}

/// Whether a path came back to us.
pub fn looped(local: &Local, from: &PeerInfo, a: &Attrs) -> bool {
    (!from.ibgp && a.contains_as(local.asn))
        || a.originator_id == Some(local.router_id)
        || local
            .cluster_id
            .is_some_and(|c| a.cluster_list.contains(&c))
}

/// The RIB's reading of `u` from the peer `from` on a session carrying `carried`.
pub fn received(local: &Local, from: &PeerInfo, carried: Families, u: &Update) -> Received {
    let mut out = Received::default();
    let mut withdrawn = u.withdrawn_all();
    // Single-family sessions only: the common dual-stack case does no extra work per UPDATE.
    if carried != Families::BOTH {
        let before = withdrawn.len();
        withdrawn.retain(|n| carried.carries(n));
        out.foreign = before - withdrawn.len();
    }
    out.withdrawn = withdrawn;
    let announced = u.announced();
    if u.treat_as_withdraw {
        // `withdrawn_all` already names them.
        return out;
    }
    let v4 = Attrs::from_update(u, false).map(Arc::new);
    let v6 = Attrs::from_update(u, true).map(Arc::new);
    for n in announced {
        if !carried.carries(&n) {
            out.foreign += 1;
            continue;
        }
        match if n.is_ipv4() { &v4 } else { &v6 } {
            Some(a) if !looped(local, from, a) => out.announced.push((n, a.clone())),
            _ => out.withdrawn.push(n),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{AsSegment, Origin, PathAttr, AFI_IPV6, SAFI_UNICAST};
    use std::net::Ipv4Addr;

    fn local(cluster: Option<Ipv4Addr>) -> Local {
        Local {
            asn: 64512,
            router_id: Ipv4Addr::new(198, 18, 0, 10),
            cluster_id: cluster,
        }
    }

    fn from(ibgp: bool) -> PeerInfo {
        PeerInfo {
            addr: "198.18.0.11".parse().expect("ip"),
            router_id: Ipv4Addr::new(198, 18, 0, 11),
            ibgp,
            rr_client: false,
        }
    }

    fn update(path: &[u32], extra: Vec<PathAttr>) -> Update {
        let mut attrs = vec![
            PathAttr::Origin(Origin::Igp),
            PathAttr::AsPath(vec![AsSegment::Sequence(path.to_vec())]),
            PathAttr::NextHop(Ipv4Addr::new(198, 18, 0, 11)),
            PathAttr::MpReach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                next_hops: vec!["2001:db8::11".parse().expect("ip")],
                nlri: vec!["fd10:244::2:0/122".parse().expect("net")],
            },
        ];
        attrs.extend(extra);
        Update {
            attrs,
            nlri: vec!["10.244.2.0/26".parse().expect("net")],
            ..Default::default()
        }
    }

    #[test]
    fn a_family_the_session_does_not_carry_is_ignored_and_counted() {
        let r = received(
            &local(None),
            &from(true),
            Families::IPV4,
            &update(&[], vec![]),
        );
        assert_eq!(r.foreign, 1);
        assert_eq!(r.announced.len(), 1);
        assert!(r.announced[0].0.is_ipv4());
        let both = received(
            &local(None),
            &from(true),
            Families::BOTH,
            &update(&[], vec![]),
        );
        assert_eq!((both.foreign, both.announced.len()), (0, 2));
    }

    #[test]
    fn paths_that_come_back_to_us_are_withdrawals() {
        let ours_over_ebgp = received(
            &local(None),
            &from(false),
            Families::BOTH,
            &update(&[65002, 64512], vec![]),
        );
        assert!(ours_over_ebgp.announced.is_empty() && ours_over_ebgp.withdrawn.len() == 2);
        // Over iBGP our own AS in the path is not a loop.
        let ibgp = received(
            &local(None),
            &from(true),
            Families::BOTH,
            &update(&[64512], vec![]),
        );
        assert_eq!(ibgp.announced.len(), 2);
        let originator = update(
            &[],
            vec![PathAttr::OriginatorId(Ipv4Addr::new(198, 18, 0, 10))],
        );
        assert!(
            received(&local(None), &from(true), Families::BOTH, &originator)
                .announced
                .is_empty()
        );
        let cluster = Ipv4Addr::new(198, 18, 0, 1);
        let reflected = update(&[], vec![PathAttr::ClusterList(vec![cluster])]);
        assert!(received(
            &local(Some(cluster)),
            &from(true),
            Families::BOTH,
            &reflected
        )
        .announced
        .is_empty());
        assert_eq!(
            received(&local(None), &from(true), Families::BOTH, &reflected)
                .announced
                .len(),
            2
        );
    }
}
