//! The speaker's decisions with time passed in: no sockets, no kernel, no clock.

use super::*;
use crate::packet::{AsSegment, Origin, PathAttr, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};

struct Native;
impl RouteTarget for Native {
    fn target(&self, _: IpNetwork, _: IpAddr) -> Target {
        Target::Native
    }
}

const A: &str = "198.18.0.11";
const B: &str = "198.18.0.12";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}
fn net(s: &str) -> IpNetwork {
    s.parse().expect("prefix")
}
fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn peer(addr: &str, asn: u32) -> PeerConfig {
    PeerConfig {
        address: ip(addr),
        asn,
        port: 179,
        passive: false,
        rr_client: false,
        local_address: None,
        password: None,
        bfd: false,
        interface: None,
    }
}

fn config(peers: Vec<PeerConfig>, networks: &[&str]) -> Config {
    let mut cfg =
        Config::parse("asn: 64512\nrouterId: 198.18.0.10\nlisten: 198.18.0.10\n").expect("config");
    cfg.peers = peers;
    cfg.networks = networks.iter().map(|n| net(n)).collect();
    cfg.next_hop_v6 = Some(ip("2001:db8:1::10"));
    cfg
}

fn core(peers: Vec<PeerConfig>, networks: &[&str]) -> SpeakerCore {
    let mut c = SpeakerCore::new(config(peers, networks), true, Arc::new(Native));
    c.start(Duration::ZERO, vec![]);
    c
}

/// The peer's OPEN: the families it advertises and, with `gr`, its restart time and the
/// families it preserves.
fn open(id: &str, asn: u32, afis: &[u16], gr: Option<(u16, &[u16])>) -> Open {
    let mut capabilities: Vec<Capability> = afis
        .iter()
        .map(|afi| Capability::MultiProtocol {
            afi: *afi,
            safi: SAFI_UNICAST,
        })
        .collect();
    capabilities.push(Capability::FourOctetAs(asn));
    if let Some((time, preserved)) = gr {
        capabilities.push(Capability::GracefulRestart {
            restarting: false,
            time,
            families: preserved.iter().map(|a| (*a, SAFI_UNICAST, true)).collect(),
        });
    }
    Open {
        version: 4,
        my_as: 23456,
        hold_time: 90,
        bgp_id: id.parse().expect("id"),
        capabilities,
    }
}

fn session_up(c: &mut SpeakerCore, now: Duration, addr: &str, open: Open) -> Vec<Output> {
    c.handle(
        now,
        Input::SessionUp {
            peer: ip(addr),
            open,
            ctx: Ctx {
                four_octet_as: true,
                extended_message: false,
            },
            local: ip("198.18.0.10"),
            interface: None,
        },
    )
}

fn announce(path: &[u32], next_hop: &str, nets: &[&str]) -> Update {
    let mut attrs = vec![
        PathAttr::Origin(Origin::Igp),
        PathAttr::AsPath(vec![AsSegment::Sequence(path.to_vec())]),
    ];
    let (v4, v6): (Vec<IpNetwork>, Vec<IpNetwork>) =
        nets.iter().map(|n| net(n)).partition(IpNetwork::is_ipv4);
    match ip(next_hop) {
        IpAddr::V4(nh) => attrs.push(PathAttr::NextHop(nh)),
        nh @ IpAddr::V6(_) => attrs.push(PathAttr::MpReach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            next_hops: vec![nh],
            nlri: v6,
        }),
    }
    Update {
        withdrawn: vec![],
        attrs,
        nlri: v4
            .into_iter()
            .filter_map(|n| match n {
                IpNetwork::V4(n) => Some(n),
                IpNetwork::V6(_) => None,
            })
            .collect(),
        treat_as_withdraw: false,
        extended_length: vec![],
    }
}

fn end_of_rib_v4() -> Update {
    Update {
        withdrawn: vec![],
        attrs: vec![],
        nlri: vec![],
        treat_as_withdraw: false,
        extended_length: vec![],
    }
}

fn update(c: &mut SpeakerCore, now: Duration, from: &str, u: Update) -> Vec<Output> {
    c.handle(
        now,
        Input::Update {
            peer: ip(from),
            update: u,
        },
    )
}

fn kernel_ops(out: &[Output]) -> Vec<KernelOp> {
    out.iter()
        .filter_map(|o| match o {
            Output::Kernel(ops) => Some(ops.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn sent_to(out: &[Output], addr: &str) -> Vec<Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { peer, messages } if *peer == ip(addr) => Some(messages.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Every AFI the messages carry anything of (routes, withdrawals or End-of-RIB).
fn afis(msgs: &[Message]) -> Vec<u16> {
    crate::packet::afis_of(msgs)
}

fn end_of_ribs(msgs: &[Message]) -> Vec<u16> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Update(u) => u.end_of_rib().map(|(afi, _)| afi),
            _ => None,
        })
        .collect()
}

#[test]
fn start_runs_the_configured_peers_and_watches_bfd_for_those_that_ask() {
    let mut a = peer(A, 64512);
    a.bfd = true;
    let mut c = SpeakerCore::new(config(vec![a, peer(B, 65001)], &[]), true, Arc::new(Native));
    let out = c.start(Duration::ZERO, vec![]);
    let started: Vec<(IpAddr, Option<u32>)> = out
        .iter()
        .filter_map(|o| match o {
            Output::StartSession { peer, session } => Some((peer.address, session.peer_as)),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![(ip(A), Some(64512)), (ip(B), Some(65001))]);
    assert!(out.contains(&Output::WatchBfd(vec![ip(A)])));
    assert!(kernel_ops(&out).is_empty(), "{out:?}");
}

#[test]
fn a_session_gets_only_the_families_it_negotiated_and_their_end_of_rib() {
    let nets = ["10.244.100.0/26", "fd10:244:0:100::/64"];
    for (afis_open, want) in [
        (&[AFI_IPV4][..], vec![AFI_IPV4]),
        (&[AFI_IPV6][..], vec![AFI_IPV6]),
        (&[AFI_IPV4, AFI_IPV6][..], vec![AFI_IPV4, AFI_IPV6]),
        // No Multiprotocol capability at all: IPv4 unicast is implied (RFC 4760 §8).
        (&[][..], vec![AFI_IPV4]),
    ] {
        let mut c = core(vec![peer(A, 65001)], &nets);
        let out = session_up(&mut c, secs(1), A, open(A, 65001, afis_open, None));
        let msgs = sent_to(&out, A);
        assert_eq!(afis(&msgs), want, "peer advertised {afis_open:?}");
        assert_eq!(end_of_ribs(&msgs), want, "End-of-RIB for {afis_open:?}");
        assert_eq!(c.status(secs(1)).peers[0].prefixes_sent, want.len());
    }
}

#[test]
fn learned_routes_go_to_the_kernel_and_to_the_other_peers() {
    let mut c = core(vec![peer(A, 65001), peer(B, 64512)], &[]);
    let both = [AFI_IPV4, AFI_IPV6];
    session_up(&mut c, secs(1), A, open(A, 65001, &both, None));
    session_up(&mut c, secs(1), B, open(B, 64512, &both, None));
    let out = update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], A, &["10.244.7.0/26"]),
    );
    assert_eq!(
        kernel_ops(&out),
        vec![KernelOp::Replace(
            net("10.244.7.0/26"),
            ip(A),
            Target::Native
        )]
    );
    assert!(
        sent_to(&out, A).is_empty(),
        "not back to where it came from"
    );
    let to_b = sent_to(&out, B);
    assert!(
        matches!(&to_b[..], [Message::Update(u)] if u.nlri.len() == 1 && u.attrs.contains(&PathAttr::NextHop("198.18.0.10".parse().expect("ip")))),
        "to the iBGP peer with next hop self: {to_b:?}"
    );
    let st = c.status(secs(2));
    assert_eq!(
        (
            st.loc_rib,
            st.peers[0].prefixes_received,
            st.peers[1].prefixes_sent
        ),
        (1, 1, 1)
    );
    // Withdrawn by its only source: out of the kernel, withdrawn from B.
    let mut w = end_of_rib_v4();
    w.withdrawn = vec!["10.244.7.0/26".parse().expect("net")];
    let out = update(&mut c, secs(3), A, w);
    assert_eq!(
        kernel_ops(&out),
        vec![KernelOp::Delete(net("10.244.7.0/26"))]
    );
    assert!(
        matches!(&sent_to(&out, B)[..], [Message::Update(u)] if u.withdrawn.len() == 1 && u.nlri.is_empty())
    );
}

#[test]
fn an_update_for_a_family_not_negotiated_is_ignored_and_the_session_stays() {
    let mut c = core(vec![peer(A, 65001)], &[]);
    session_up(&mut c, secs(1), A, open(A, 65001, &[AFI_IPV4], None));
    let out = update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], "2001:db8:1::11", &["fd10:244:0:7::/64"]),
    );
    assert!(
        out.is_empty(),
        "nothing installed, nothing dropped: {out:?}"
    );
    let st = c.status(secs(2));
    assert_eq!((st.loc_rib, st.peers[0].state), (0, State::Established));
}

#[test]
fn graceful_restart_keeps_the_preserved_family_until_the_restart_time() {
    let mut c = core(vec![peer(A, 65001)], &[]);
    // Both families negotiated; only IPv4 preserved across the peer's restart.
    let o = open(A, 65001, &[AFI_IPV4, AFI_IPV6], Some((120, &[AFI_IPV4])));
    session_up(&mut c, secs(1), A, o);
    update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], A, &["10.244.7.0/26"]),
    );
    update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], "2001:db8:1::11", &["fd10:244:0:7::/64"]),
    );
    let down = c.handle(
        secs(10),
        Input::SessionDown {
            peer: ip(A),
            reason: "connection lost".into(),
        },
    );
    assert_eq!(
        kernel_ops(&down),
        vec![KernelOp::Delete(net("fd10:244:0:7::/64"))],
        "the family not preserved goes at once"
    );
    assert!(
        c.handle(secs(129), Input::Tick).is_empty(),
        "still within 120 s"
    );
    let expired = c.handle(secs(130), Input::Tick);
    assert_eq!(
        kernel_ops(&expired),
        vec![KernelOp::Delete(net("10.244.7.0/26"))]
    );
    assert!(c.handle(secs(131), Input::Tick).is_empty(), "once");
}

#[test]
fn a_peer_back_from_its_restart_replaces_its_stale_routes_at_end_of_rib() {
    let mut c = core(vec![peer(A, 65001)], &[]);
    let o = || open(A, 65001, &[AFI_IPV4], Some((120, &[AFI_IPV4])));
    session_up(&mut c, secs(1), A, o());
    update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], A, &["10.244.7.0/26", "10.244.8.0/26"]),
    );
    let down = c.handle(
        secs(10),
        Input::SessionDown {
            peer: ip(A),
            reason: "hold timer expired".into(),
        },
    );
    assert!(kernel_ops(&down).is_empty(), "{down:?}");
    session_up(&mut c, secs(20), A, o());
    // Back with one of the two: the other is stale until End-of-RIB says it is gone.
    let again = update(
        &mut c,
        secs(21),
        A,
        announce(&[65001], A, &["10.244.7.0/26"]),
    );
    assert_eq!(
        kernel_ops(&again),
        vec![KernelOp::Replace(
            net("10.244.7.0/26"),
            ip(A),
            Target::Native
        )]
    );
    let eor = update(&mut c, secs(22), A, end_of_rib_v4());
    assert_eq!(
        kernel_ops(&eor),
        vec![KernelOp::Delete(net("10.244.8.0/26"))]
    );
    assert!(
        c.handle(secs(200), Input::Tick).is_empty(),
        "no deadline left"
    );
}

#[test]
fn bfd_down_drops_the_session_and_its_routes_without_graceful_restart() {
    let mut a = peer(A, 65001);
    a.bfd = true;
    let mut c = core(vec![a], &[]);
    session_up(
        &mut c,
        secs(1),
        A,
        open(A, 65001, &[AFI_IPV4], Some((120, &[AFI_IPV4]))),
    );
    update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], A, &["10.244.7.0/26"]),
    );
    let out = c.handle(
        secs(3),
        Input::Bfd {
            peer: ip(A),
            state: BfdState::Down,
        },
    );
    assert_eq!(out, vec![Output::DropSession(ip(A))]);
    let down = c.handle(
        secs(3),
        Input::SessionDown {
            peer: ip(A),
            reason: "connection lost".into(),
        },
    );
    assert_eq!(
        kernel_ops(&down),
        vec![KernelOp::Delete(net("10.244.7.0/26"))]
    );
}

#[test]
fn leftovers_of_a_previous_run_are_swept_after_every_end_of_rib_or_at_the_deadline() {
    let left = vec![net("10.244.7.0/26"), net("10.244.9.0/26")];
    let mut c = SpeakerCore::new(config(vec![peer(A, 65001)], &[]), true, Arc::new(Native));
    c.start(Duration::ZERO, left.clone());
    session_up(&mut c, secs(1), A, open(A, 65001, &[AFI_IPV4], None));
    update(
        &mut c,
        secs(2),
        A,
        announce(&[65001], A, &["10.244.7.0/26"]),
    );
    assert!(
        c.handle(secs(3), Input::Tick).is_empty(),
        "before End-of-RIB"
    );
    update(&mut c, secs(4), A, end_of_rib_v4());
    let swept = c.handle(secs(5), Input::Tick);
    assert_eq!(
        kernel_ops(&swept),
        vec![KernelOp::Delete(net("10.244.9.0/26"))],
        "the route the peer sent again stays"
    );
    assert!(c.handle(secs(6), Input::Tick).is_empty(), "once");

    // A peer that never comes: the sweep waits for the deadline (the restart time, 120 s).
    let mut c = SpeakerCore::new(config(vec![peer(A, 65001)], &[]), true, Arc::new(Native));
    c.start(Duration::ZERO, left);
    assert!(c.handle(secs(119), Input::Tick).is_empty());
    assert_eq!(
        kernel_ops(&c.handle(secs(120), Input::Tick)),
        vec![
            KernelOp::Delete(net("10.244.7.0/26")),
            KernelOp::Delete(net("10.244.9.0/26"))
        ]
    );
}

#[test]
fn dynamic_peers_are_added_restarted_when_changed_and_removed_with_their_routes() {
    let mut c = core(vec![peer(A, 65001)], &[]);
    let b = peer(B, 64512);
    let out = c.handle(
        secs(1),
        Input::SetDynamicPeers(vec![b.clone(), peer(A, 65002)]),
    );
    assert!(
        matches!(&out[..], [Output::StartSession { peer, .. }] if peer.address == ip(B)),
        "B starts; A stays as configured: {out:?}"
    );
    assert!(c
        .handle(secs(2), Input::SetDynamicPeers(vec![b.clone()]))
        .is_empty());

    session_up(&mut c, secs(3), B, open(B, 64512, &[AFI_IPV4], None));
    update(&mut c, secs(3), B, announce(&[], B, &["10.244.8.0/26"]));
    let mut passive = b.clone();
    passive.passive = true;
    let out = c.handle(secs(4), Input::SetDynamicPeers(vec![passive]));
    assert_eq!(out[0], Output::StopSession(ip(B)));
    assert!(kernel_ops(&out).contains(&KernelOp::Delete(net("10.244.8.0/26"))));
    assert!(
        matches!(out.last(), Some(Output::StartSession { session, .. }) if session.passive),
        "{out:?}"
    );

    let out = c.handle(secs(5), Input::SetDynamicPeers(vec![]));
    assert_eq!(out, vec![Output::StopSession(ip(B))]);
    let peers: Vec<IpAddr> = c.status(secs(5)).peers.iter().map(|p| p.address).collect();
    assert_eq!(peers, vec![ip(A)]);
}

#[test]
fn status_reports_uptime_and_the_last_reset_from_the_time_passed_in() {
    let mut c = core(vec![peer(A, 65001)], &[]);
    session_up(&mut c, secs(5), A, open(A, 65001, &[AFI_IPV4], None));
    assert_eq!(c.status(secs(65)).peers[0].uptime_seconds, Some(60));
    let damping = Damping {
        resets: 2,
        idle_hold_ms: 10_000,
        reason: "NOTIFICATION 6/2 from the peer".into(),
    };
    c.handle(
        secs(70),
        Input::SessionDown {
            peer: ip(A),
            reason: damping.reason.clone(),
        },
    );
    c.handle(
        secs(70),
        Input::SessionState {
            peer: ip(A),
            state: State::Idle,
            damping: Some(damping.clone()),
        },
    );
    let st = c.status(secs(71));
    assert_eq!(st.peers[0].uptime_seconds, None);
    assert_eq!(st.peers[0].last_reset, Some(damping));
}

#[test]
fn changing_the_originated_networks_announces_and_withdraws_them() {
    let mut c = core(vec![peer(A, 65001)], &["10.244.100.0/26"]);
    session_up(&mut c, secs(1), A, open(A, 65001, &[AFI_IPV4], None));
    let out = c.handle(secs(2), Input::SetNetworks(vec![net("10.244.101.0/26")]));
    let msgs = sent_to(&out, A);
    let announced: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u.nlri.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    let withdrawn: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(
                u.withdrawn
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(announced, vec!["10.244.101.0/26"]);
    assert_eq!(withdrawn, vec!["10.244.100.0/26"]);
    // Our own prefixes never become kernel routes of ours: only deletes of learned ones.
    assert!(kernel_ops(&out)
        .iter()
        .all(|op| matches!(op, KernelOp::Delete(_))));
}

#[test]
fn a_link_local_next_hop_is_reached_on_the_interface_of_its_session() {
    const LL: &str = "fe80::11";
    let mut p = peer(LL, 65001);
    p.interface = Some("eth0".into());
    // No global next hop configured: the session's address is the next hop.
    let mut cfg = config(vec![p], &["fd10:244::1:0/122"]);
    cfg.next_hop_v6 = None;
    let mut c = SpeakerCore::new(cfg, true, Arc::new(Native));
    c.start(Duration::ZERO, vec![]);
    let out = c.handle(
        secs(1),
        Input::SessionUp {
            peer: ip(LL),
            open: open("198.18.0.11", 65001, &[AFI_IPV6], None),
            ctx: Ctx::default(),
            local: ip("fe80::10"),
            interface: Some(7),
        },
    );
    // Ours goes out with `::` and our link-local address (RFC 2545, as BIRD sends it).
    let hops: Vec<Vec<IpAddr>> = sent_to(&out, LL)
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => u.attrs.iter().find_map(|a| match a {
                PathAttr::MpReach {
                    next_hops, nlri, ..
                } if !nlri.is_empty() => Some(next_hops.clone()),
                _ => None,
            }),
            _ => None,
        })
        .collect();
    assert_eq!(hops, vec![vec![ip("::"), ip("fe80::10")]]);
    // Theirs, `::` first as BIRD sends it: the link-local hop, on interface 7.
    let mut u = announce(&[65001], "2001:db8:9::1", &["fd10:244::2:0/122"]);
    for a in &mut u.attrs {
        if let PathAttr::MpReach { next_hops, .. } = a {
            *next_hops = vec![ip("::"), ip(LL)];
        }
    }
    let out = update(&mut c, secs(2), LL, u);
    assert_eq!(
        kernel_ops(&out),
        vec![KernelOp::Replace(
            net("fd10:244::2:0/122"),
            ip(LL),
            Target::Onlink(7)
        )]
    );
}

#[test]
fn a_global_next_hop_is_preferred_to_a_link_local_one() {
    let mut c = core(vec![peer(A, 65001)], &[]);
    session_up(&mut c, secs(1), A, open(A, 65001, &[AFI_IPV6], None));
    let mut u = announce(&[65001], "2001:db8:1::11", &["fd10:244::2:0/122"]);
    for a in &mut u.attrs {
        if let PathAttr::MpReach { next_hops, .. } = a {
            next_hops.push(ip("fe80::11"));
        }
    }
    assert_eq!(
        kernel_ops(&update(&mut c, secs(2), A, u)),
        vec![KernelOp::Replace(
            net("fd10:244::2:0/122"),
            ip("2001:db8:1::11"),
            Target::Native
        )]
    );
    // Link-local only, on a session that is not link-local: nowhere to send it.
    let u = announce(&[65001], "fe80::11", &["fd10:244::3:0/122"]);
    assert_eq!(
        kernel_ops(&update(&mut c, secs(3), A, u)),
        vec![KernelOp::Replace(
            net("fd10:244::3:0/122"),
            ip("fe80::11"),
            Target::Skip
        )]
    );
}
