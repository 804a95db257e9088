//! What one peer is sent, decided without I/O: for the prefixes whose best path changed, the
//! export decision (`rib::export`) against what the peer was last sent (its Adj-RIB-Out), in
//! the families the session carries only, packed into UPDATEs by size, and End-of-RIB per
//! negotiated family. The speaker applies the Adj-RIB-Out changes and hands the messages to
//! the peer's task.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;

use crate::pack::{self, AttributesTooLarge};
use crate::packet::{add_as4_path, Ctx, Families, Message, AFI_IPV4, AFI_IPV6};
use crate::rib::{export, to_path_attrs, Attrs, Local, PeerInfo, Rib};

/// The session to one peer, as the export needs it.
pub struct SessionView<'a> {
    pub info: &'a PeerInfo,
    pub asn: u32,
    pub families: Families,
    pub ctx: Ctx,
    /// Our address on the session: next hop self for IPv4 (and IPv6 over IPv6 transport).
    pub local: IpAddr,
    /// Our IPv6 next hop over an IPv4 session (`nextHopV6`).
    pub next_hop_v6: Option<IpAddr>,
}

#[derive(Debug, Default)]
pub struct Outgoing {
    pub messages: Vec<Message>,
    /// Adj-RIB-Out changes: announced with these attributes, or withdrawn (None).
    pub adj_out: Vec<(IpNetwork, Option<Arc<Attrs>>)>,
    /// Prefixes whose attributes do not fit in a message: not sent, not in the Adj-RIB-Out.
    pub refused: Vec<(IpNetwork, AttributesTooLarge)>,
}

/// The UPDATEs for `prefixes` (and End-of-RIB when `end_of_rib`) to the peer of `to`.
pub fn updates(
    local: &Local,
    rib: &Rib,
    adj_out: &HashMap<IpNetwork, Arc<Attrs>>,
    to: &SessionView<'_>,
    prefixes: &[IpNetwork],
    end_of_rib: bool,
) -> Outgoing {
    let nh_v6 = to.next_hop_v6.or(Some(to.local).filter(IpAddr::is_ipv6));
    let mut announce: HashMap<(bool, Arc<Attrs>), Vec<IpNetwork>> = HashMap::new();
    let mut withdraw: Vec<IpNetwork> = Vec::new();
    let mut out = Outgoing::default();
    for prefix in prefixes.iter().filter(|n| to.families.carries(n)) {
        let nh = if prefix.is_ipv4() {
            Some(to.local)
        } else {
            nh_v6
        };
        let exported = match (rib.best(prefix), nh) {
            (Some(best), Some(nh)) => export(local, best, to.info, to.asn, nh).map(Arc::new),
            _ => None,
        };
        match (&exported, adj_out.get(prefix)) {
            (Some(a), Some(old)) if a == old => continue,
            (Some(a), _) => announce
                .entry((prefix.is_ipv4(), a.clone()))
                .or_default()
                .push(*prefix),
            (None, Some(_)) => withdraw.push(*prefix),
            (None, None) => continue,
        }
        out.adj_out.push((*prefix, exported));
    }
    let mut refused: HashSet<IpNetwork> = HashSet::new();
    for ((_, attrs), nets) in announce {
        let mut base = to_path_attrs(&attrs, to.info.ibgp);
        if !to.ctx.four_octet_as {
            add_as4_path(&mut base);
        }
        match pack::announcements(&base, attrs.next_hop, &nets, to.ctx) {
            Ok(u) => out.messages.extend(u.into_iter().map(Message::Update)),
            Err(e) => {
                refused.extend(nets.iter().copied());
                out.refused.extend(nets.into_iter().map(|n| (n, e.clone())));
            }
        }
    }
    let (w4, w6): (Vec<IpNetwork>, Vec<IpNetwork>) =
        withdraw.into_iter().partition(IpNetwork::is_ipv4);
    for w in [w4, w6] {
        out.messages.extend(
            pack::withdrawals(&w, to.ctx)
                .into_iter()
                .map(Message::Update),
        );
    }
    // End-of-RIB (RFC 4724 §2) for each negotiated family only.
    for (afi, on) in [(AFI_IPV4, to.families.ipv4), (AFI_IPV6, to.families.ipv6)] {
        if end_of_rib && on {
            out.messages.push(Message::Update(pack::end_of_rib(afi)));
        }
    }
    out.adj_out
        .retain(|(n, a)| a.is_none() || !refused.contains(n));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::SAFI_UNICAST;
    use std::net::Ipv4Addr;

    fn local() -> Local {
        Local {
            asn: 64512,
            router_id: Ipv4Addr::new(198, 18, 0, 10),
            cluster_id: None,
        }
    }

    fn originated(rib: &mut Rib, nets: &[&str]) {
        for n in nets {
            let attrs = Arc::new(Attrs::originated("198.18.0.10".parse().expect("ip")));
            rib.originate(n.parse().expect("net"), attrs);
        }
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            addr: "198.18.0.11".parse().expect("ip"),
            router_id: Ipv4Addr::new(198, 18, 0, 11),
            ibgp: true,
            rr_client: false,
        }
    }

    fn view(info: &PeerInfo, families: Families) -> SessionView<'_> {
        SessionView {
            info,
            asn: 64512,
            families,
            ctx: Ctx::default(),
            local: "198.18.0.10".parse().expect("ip"),
            next_hop_v6: Some("2001:db8::10".parse().expect("ip")),
        }
    }

    fn afis(msgs: &[Message]) -> Vec<u16> {
        crate::packet::afis_of(msgs)
    }

    #[test]
    fn an_ipv4_only_session_gets_nothing_of_ipv6() {
        let mut rib = Rib::new(false);
        originated(&mut rib, &["10.244.1.0/26", "fd10:244::1:0/122"]);
        let info = peer();
        let all: Vec<IpNetwork> = rib.loc_rib().map(|(n, _)| n).collect();
        let out = updates(
            &local(),
            &rib,
            &HashMap::new(),
            &view(&info, Families::IPV4),
            &all,
            true,
        );
        assert_eq!(afis(&out.messages), [AFI_IPV4]);
        assert_eq!(out.adj_out.len(), 1);
        // Two messages: the route and the IPv4 End-of-RIB (an empty UPDATE).
        assert_eq!(out.messages.len(), 2);
        let both = updates(
            &local(),
            &rib,
            &HashMap::new(),
            &view(&info, Families::BOTH),
            &all,
            true,
        );
        assert_eq!(afis(&both.messages), [AFI_IPV4, AFI_IPV6]);
        assert!(both.messages.iter().any(
            |m| matches!(m, Message::Update(u) if u.end_of_rib() == Some((AFI_IPV6, SAFI_UNICAST)))
        ));
    }

    #[test]
    fn what_the_peer_already_has_is_not_sent_again_and_a_lost_route_is_withdrawn() {
        let mut rib = Rib::new(false);
        originated(&mut rib, &["10.244.1.0/26"]);
        let info = peer();
        let v = view(&info, Families::BOTH);
        let n: IpNetwork = "10.244.1.0/26".parse().expect("net");
        let first = updates(&local(), &rib, &HashMap::new(), &v, &[n], false);
        let sent: HashMap<IpNetwork, Arc<Attrs>> = first
            .adj_out
            .iter()
            .filter_map(|(n, a)| Some((*n, a.clone()?)))
            .collect();
        assert!(updates(&local(), &rib, &sent, &v, &[n], false)
            .messages
            .is_empty());
        rib.withdraw_local(n);
        let gone = updates(&local(), &rib, &sent, &v, &[n], false);
        assert_eq!(gone.adj_out, vec![(n, None)]);
        assert!(matches!(&gone.messages[..], [Message::Update(u)] if u.withdrawn_all() == vec![n]));
    }
}
