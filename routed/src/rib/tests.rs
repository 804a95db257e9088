use super::*;

fn attrs(path: &[u32], lp: Option<u32>, nh: &str) -> Arc<Attrs> {
    Arc::new(Attrs {
        origin: Origin::Igp,
        as_path: if path.is_empty() {
            vec![]
        } else {
            vec![AsSegment::Sequence(path.to_vec())]
        },
        next_hop: nh.parse().expect("addr"),
        med: None,
        local_pref: lp,
        communities: vec![],
        originator_id: None,
        cluster_list: vec![],
        other: vec![],
    })
}

fn peer(addr: &str, id: u8, ibgp: bool) -> Arc<PeerInfo> {
    Arc::new(PeerInfo {
        addr: addr.parse().expect("addr"),
        router_id: Ipv4Addr::new(10, 0, 0, id),
        ibgp,
        rr_client: false,
    })
}

fn net(s: &str) -> IpNetwork {
    s.parse().expect("net")
}

#[test]
fn decision_process_table() {
    let p = |a: Arc<Attrs>, from: Arc<PeerInfo>| Path {
        attrs: a,
        peer: Some(from),
        stale: false,
    };
    let ib = peer("198.18.0.2", 2, true);
    let eb = peer("198.18.0.3", 3, false);
    let cases = [
        (
            "higher local pref wins",
            p(attrs(&[1, 2, 3], Some(200), "198.18.0.2"), ib.clone()),
            p(attrs(&[1], Some(100), "198.18.0.3"), eb.clone()),
        ),
        (
            "shorter AS path wins",
            p(attrs(&[1], None, "198.18.0.2"), ib.clone()),
            p(attrs(&[1, 2], None, "198.18.0.3"), eb.clone()),
        ),
        (
            "eBGP over iBGP",
            p(attrs(&[1], None, "198.18.0.3"), eb.clone()),
            p(attrs(&[1], None, "198.18.0.2"), ib.clone()),
        ),
        (
            "lower router id",
            p(attrs(&[1], None, "198.18.0.2"), peer("198.18.0.9", 1, true)),
            p(attrs(&[1], None, "198.18.0.2"), peer("198.18.0.8", 2, true)),
        ),
    ];
    for (why, winner, loser) in cases {
        assert!(better(&winner, &loser), "{why}");
        assert!(!better(&loser, &winner), "{why}");
    }
    let mut lower_origin = (*attrs(&[1], None, "198.18.0.2")).clone();
    lower_origin.origin = Origin::Incomplete;
    assert!(better(
        &p(attrs(&[1], None, "198.18.0.2"), ib.clone()),
        &p(Arc::new(lower_origin), ib.clone())
    ));
    let mut med = (*attrs(&[1], None, "198.18.0.2")).clone();
    med.med = Some(50);
    assert!(
        better(
            &p(attrs(&[1], None, "198.18.0.2"), ib.clone()),
            &p(Arc::new(med), ib)
        ),
        "lower MED"
    );
}

#[test]
fn best_path_follows_announcements_and_withdrawals() {
    let mut rib = Rib::new(false);
    let a = peer("198.18.0.2", 2, true);
    let b = peer("198.18.0.3", 3, true);
    let n = net("10.244.1.0/26");
    let ch = rib.apply(&a, vec![(n, attrs(&[], None, "198.18.0.2"))], vec![]);
    assert!(matches!(&ch[..], [BestChange::Best { .. }]));
    // A worse path from b changes nothing.
    assert!(rib
        .apply(&b, vec![(n, attrs(&[], Some(50), "198.18.0.3"))], vec![])
        .is_empty());
    // a withdraws: b's path becomes best.
    let ch = rib.apply(&a, vec![], vec![n]);
    assert!(
        matches!(&ch[..], [BestChange::Best { best, .. }] if best.attrs.next_hop.to_string() == "198.18.0.3")
    );
    // b goes down: nothing left.
    assert_eq!(rib.peer_down(&b.addr), vec![BestChange::Gone { prefix: n }]);
}

#[test]
fn ecmp_keeps_equal_paths() {
    let mut rib = Rib::new(true);
    let n = net("10.244.1.0/26");
    rib.apply(
        &peer("198.18.0.2", 2, true),
        vec![(n, attrs(&[], None, "198.18.0.2"))],
        vec![],
    );
    let ch = rib.apply(
        &peer("198.18.0.3", 3, true),
        vec![(n, attrs(&[], None, "198.18.0.3"))],
        vec![],
    );
    assert!(matches!(&ch[..], [BestChange::Best { multipath, .. }] if multipath.len() == 2));
}

#[test]
fn graceful_restart_keeps_stale_routes_until_end_of_rib() {
    let mut rib = Rib::new(false);
    let a = peer("198.18.0.2", 2, true);
    let (n1, n2) = (net("10.244.1.0/26"), net("10.244.2.0/26"));
    rib.apply(
        &a,
        vec![
            (n1, attrs(&[], None, "198.18.0.2")),
            (n2, attrs(&[], None, "198.18.0.2")),
        ],
        vec![],
    );
    rib.mark_stale(&a.addr);
    assert!(
        rib.best(&n1).is_some() && rib.best(&n2).is_some(),
        "kept during the restart"
    );
    // After the restart the peer sends n1 only, then End-of-RIB.
    rib.apply(&a, vec![(n1, attrs(&[], None, "198.18.0.2"))], vec![]);
    assert_eq!(
        rib.sweep_stale(&a.addr),
        vec![BestChange::Gone { prefix: n2 }]
    );
    assert!(rib.best(&n1).is_some());
}

#[test]
fn graceful_restart_keeps_only_the_preserved_familys_routes() {
    let mut rib = Rib::new(false);
    let a = peer("198.18.0.2", 2, true);
    let (v4, v6) = (net("10.244.1.0/26"), net("fd10:244::/122"));
    rib.apply(
        &a,
        vec![
            (v4, attrs(&[], None, "198.18.0.2")),
            (v6, attrs(&[], None, "2001:db8::2")),
        ],
        vec![],
    );
    assert_eq!(rib.received(&a.addr), 2);
    // The peer preserves IPv4 only across its restart: IPv6 goes now, IPv4 stays stale.
    let ch = rib.peer_down_where(&a.addr, |n| n.is_ipv6());
    rib.mark_stale(&a.addr);
    assert_eq!(ch, vec![BestChange::Gone { prefix: v6 }]);
    assert!(rib.best(&v4).is_some_and(|p| p.stale));
    assert_eq!(rib.received(&a.addr), 1);
}

#[test]
fn export_rules() {
    let local = Local {
        asn: 64512,
        router_id: Ipv4Addr::new(198, 18, 0, 1),
        cluster_id: None,
    };
    let me: IpAddr = "198.18.0.1".parse().expect("addr");
    let ib1 = peer("198.18.0.2", 2, true);
    let ib2 = peer("198.18.0.3", 3, true);
    let eb = peer("203.0.113.1", 9, false);
    let own = Path {
        attrs: attrs(&[], None, "0.0.0.0"),
        peer: None,
        stale: false,
    };
    // Our own block to an iBGP peer: next hop self, LOCAL_PREF, empty AS_PATH.
    let a = export(&local, &own, &ib1, 64512, me).expect("exported");
    assert_eq!(
        (a.next_hop, a.local_pref, a.as_path_len()),
        (me, Some(100), 0)
    );
    // To eBGP: our AS prepended, no LOCAL_PREF.
    let a = export(&local, &own, &eb, 65000, me).expect("exported");
    assert_eq!(a.as_path, vec![AsSegment::Sequence(vec![64512])]);
    assert_eq!(a.local_pref, None);
    // iBGP-learned to another iBGP peer: split horizon.
    let learned = Path {
        attrs: attrs(&[], None, "198.18.0.2"),
        peer: Some(ib1.clone()),
        stale: false,
    };
    assert!(export(&local, &learned, &ib2, 64512, me).is_none());
    // ... unless we reflect to a client: CLUSTER_LIST and ORIGINATOR_ID are set.
    let rr = Local {
        cluster_id: Some(Ipv4Addr::new(198, 18, 0, 1)),
        ..local.clone()
    };
    let client = PeerInfo {
        rr_client: true,
        ..(*ib2).clone()
    };
    let a = export(&rr, &learned, &client, 64512, me).expect("reflected");
    assert_eq!(a.cluster_list, vec![Ipv4Addr::new(198, 18, 0, 1)]);
    assert_eq!(a.originator_id, Some(Ipv4Addr::new(10, 0, 0, 2)));
    assert_eq!(
        a.next_hop.to_string(),
        "198.18.0.2",
        "reflection keeps the next hop"
    );
    // A route that already carries our cluster id is a loop.
    let looped = Path {
        attrs: Arc::new(a.clone()),
        peer: Some(Arc::new(PeerInfo {
            rr_client: true,
            ..(*ib1).clone()
        })),
        stale: false,
    };
    assert!(export(&rr, &looped, &client, 64512, me).is_none());
    // Never back to the sender; never to an eBGP peer whose AS is in the path.
    assert!(export(&local, &learned, &ib1, 64512, me).is_none());
    let via = Path {
        attrs: attrs(&[65000], None, "203.0.113.1"),
        peer: Some(eb.clone()),
        stale: false,
    };
    assert!(export(&local, &via, &peer("203.0.113.2", 8, false), 65000, me).is_none());
}
