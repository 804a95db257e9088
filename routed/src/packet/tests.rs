use super::*;
use proptest::prelude::*;

const FOUR: Ctx = Ctx {
    four_octet_as: true,
    extended_message: false,
};
const TWO: Ctx = Ctx {
    four_octet_as: false,
    extended_message: false,
};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn keepalive_is_19_bytes() {
    let b = encode(&Message::Keepalive, FOUR);
    assert_eq!(
        b.as_ref(),
        hex("ffffffffffffffffffffffffffffffff 0013 04").as_slice()
    );
    assert_eq!(decode(&b, FOUR), Ok(Message::Keepalive));
}

#[test]
fn open_with_capabilities_byte_for_byte() {
    // OPEN, AS 64512, hold 240, id 198.18.0.11, capabilities MP IPv4 unicast, route refresh,
    // 4-octet AS 64512 (the same bytes BIRD 2 sends for this config, minus its extra caps).
    let bytes = hex(
        "ffffffffffffffffffffffffffffffff 0029 01 04 fc00 00f0 c612000b
         10 02 0e 0104 0001 0001 0200 4104 0000fc00",
    );
    let hexlen = bytes.len();
    let mut b = bytes.clone();
    b[16..18].copy_from_slice(&(hexlen as u16).to_be_bytes());
    let m = decode(&b, FOUR).expect("decodes");
    let Message::Open(o) = &m else {
        panic!("not an OPEN")
    };
    assert_eq!(o.asn(), 64512);
    assert_eq!(o.hold_time, 240);
    assert_eq!(o.bgp_id, Ipv4Addr::new(198, 18, 0, 11));
    assert_eq!(
        o.capabilities,
        vec![
            Capability::MultiProtocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
            Capability::FourOctetAs(64512)
        ]
    );
    assert_eq!(encode(&m, FOUR).as_ref(), b.as_slice());
}

#[test]
fn update_with_ipv4_and_ipv6_byte_for_byte() {
    let u = Update {
        withdrawn: vec!["10.244.9.0/26".parse().expect("net")],
        attrs: vec![
            PathAttr::Origin(Origin::Igp),
            PathAttr::AsPath(vec![AsSegment::Sequence(vec![4_200_000_000, 64512])]),
            PathAttr::NextHop(Ipv4Addr::new(198, 18, 0, 11)),
            PathAttr::LocalPref(100),
            PathAttr::MpReach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                next_hops: vec!["2001:db8::b".parse().expect("addr")],
                nlri: vec!["fd10:244::40/122".parse().expect("net")],
            },
        ],
        nlri: vec!["10.244.1.0/26".parse().expect("net")],
        treat_as_withdraw: false,
        extended_length: vec![],
    };
    let b = encode(&Message::Update(u.clone()), FOUR);
    assert_eq!(decode(&b, FOUR), Ok(Message::Update(u.clone())));
    // The withdrawn field: length 5, then /26 and four octets.
    assert_eq!(&b[19..26], hex("0005 1a 0af40900").as_slice());
    // NLRI at the end: /26, 10.244.1.0.
    assert_eq!(&b[b.len() - 5..], hex("1a 0af40100").as_slice());
    assert_eq!(u.announced().len(), 2);
}

#[test]
fn two_octet_peer_gets_as_trans_and_as4_path_and_we_merge_it_back() {
    let mut attrs = vec![
        PathAttr::Origin(Origin::Igp),
        PathAttr::AsPath(vec![AsSegment::Sequence(vec![4_200_000_001, 65001])]),
        PathAttr::NextHop(Ipv4Addr::new(198, 18, 0, 1)),
    ];
    add_as4_path(&mut attrs);
    let u = Update {
        attrs,
        nlri: vec!["10.244.3.0/24".parse().expect("net")],
        ..Default::default()
    };
    let b = encode(&Message::Update(u), TWO);
    // On the wire the AS_PATH carries AS_TRANS (0x5ba0) for the 4-octet AS.
    assert!(
        b.windows(4).any(|w| w == hex("5ba0 fde9").as_slice()),
        "{b:x?}"
    );
    let Ok(Message::Update(back)) = decode(&b, TWO) else {
        panic!("decode")
    };
    assert_eq!(
        back.attr(attr::AS_PATH),
        Some(&PathAttr::AsPath(vec![AsSegment::Sequence(vec![
            4_200_000_001,
            65001
        ])]))
    );
    assert!(back.attr(attr::AS4_PATH).is_none());
}

fn notification_of(bytes: &[u8]) -> (u8, u8) {
    let e = match frame(bytes) {
        Err(e) => e,
        Ok(_) => decode(bytes, FOUR).expect_err("must fail"),
    };
    (e.code, e.subcode)
}

fn with_len(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() as u16;
    b[16..18].copy_from_slice(&n.to_be_bytes());
    b
}

#[test]
fn malformed_messages_get_the_notification_rfc_4271_names() {
    let ka = encode(&Message::Keepalive, FOUR).to_vec();
    let mut bad_marker = ka.clone();
    bad_marker[3] = 0;
    assert_eq!(notification_of(&bad_marker), (1, 1));
    let mut bad_len = ka.clone();
    bad_len[17] = 18;
    assert_eq!(notification_of(&bad_len), (1, 2));
    let mut bad_type = ka.clone();
    bad_type[18] = 9;
    assert_eq!(notification_of(&bad_type), (1, 3));
    let ka_with_body = with_len([ka.clone(), vec![0]].concat());
    assert_eq!(notification_of(&ka_with_body), (1, 2));

    let open = |version: u8, hold: u16, id: [u8; 4]| {
        let mut b = hex("ffffffffffffffffffffffffffffffff 0000 01");
        b.push(version);
        b.extend_from_slice(&64512u16.to_be_bytes());
        b.extend_from_slice(&hold.to_be_bytes());
        b.extend_from_slice(&id);
        b.push(0);
        with_len(b)
    };
    assert!(decode(&open(4, 90, [1, 2, 3, 4]), FOUR).is_ok());
    let e = decode(&open(3, 90, [1, 2, 3, 4]), FOUR).unwrap_err();
    assert_eq!((e.code, e.subcode, e.data.clone()), (2, 1, vec![0, 4]));
    assert_eq!(notification_of(&open(4, 2, [1, 2, 3, 4])), (2, 6));
    assert_eq!(notification_of(&open(4, 90, [0, 0, 0, 0])), (2, 3));

    let update = |body: &str| {
        with_len([hex("ffffffffffffffffffffffffffffffff 0000 02"), hex(body)].concat())
    };
    // Withdrawn length overruns the message.
    assert_eq!(notification_of(&update("00ff 0000")), (3, 1));
    // Attribute length overruns the attribute list.
    assert_eq!(notification_of(&update("0000 0004 4001 05 00")), (3, 1));
    // NLRI prefix length 33.
    assert_eq!(
        notification_of(&update("0000 0000 21 0a000000 00")),
        (3, 10)
    );
    // Unrecognised well-known attribute (type 99, not optional).
    assert_eq!(notification_of(&update("0000 0003 4063 00")), (3, 2));
    // Repeated MP_UNREACH_NLRI.
    let mp = "800f 03 0002 01";
    assert_eq!(
        notification_of(&update(&format!("0000 000c {mp} {mp}"))),
        (3, 1)
    );
    // Malformed MP_REACH_NLRI (next hop length 5).
    assert_eq!(
        notification_of(&update("0000 000b 800e 08 0002 01 05 0000000000")),
        (3, 9)
    );
}

#[test]
fn attribute_errors_withdraw_instead_of_resetting_rfc_7606() {
    let update = |body: &str| {
        with_len([hex("ffffffffffffffffffffffffffffffff 0000 02"), hex(body)].concat())
    };
    // ORIGIN = 7 (invalid), AS_PATH empty, NEXT_HOP, NLRI 10.244.1.0/24.
    let b = update("0000 0015 4001 01 07 4002 00 4003 04 c6120001 4005 04 00000064 18 0af401");
    let Ok(Message::Update(u)) = decode(&b, FOUR) else {
        panic!("decodes")
    };
    assert!(u.treat_as_withdraw);
    assert_eq!(
        u.withdrawn_all(),
        vec!["10.244.1.0/24".parse::<IpNetwork>().expect("net")]
    );
    // Missing NEXT_HOP.
    let b = update("0000 0007 4001 01 00 4002 00 18 0af401");
    let Ok(Message::Update(u)) = decode(&b, FOUR) else {
        panic!("decodes")
    };
    assert!(u.treat_as_withdraw);
    // A bad ATOMIC_AGGREGATE length is discarded; the route stands.
    let b = update("0000 0012 4001 01 00 4002 00 4003 04 c6120001 4006 01 00 18 0af401");
    let Ok(Message::Update(u)) = decode(&b, FOUR) else {
        panic!("decodes")
    };
    assert!(!u.treat_as_withdraw);
    assert!(u.attr(attr::ATOMIC_AGGREGATE).is_none());
}

#[test]
fn end_of_rib_markers() {
    assert_eq!(
        Update::default().end_of_rib(),
        Some((AFI_IPV4, SAFI_UNICAST))
    );
    let v6 = Update {
        attrs: vec![PathAttr::MpUnreach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            withdrawn: vec![],
        }],
        ..Default::default()
    };
    let b = encode(&Message::Update(v6), FOUR);
    let Ok(Message::Update(u)) = decode(&b, FOUR) else {
        panic!("decodes")
    };
    assert_eq!(u.end_of_rib(), Some((AFI_IPV6, SAFI_UNICAST)));
}

fn v4net() -> impl Strategy<Value = Ipv4Network> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, p)| {
        let n = Ipv4Network::new(Ipv4Addr::from(a), p).expect("net");
        Ipv4Network::new(n.network(), p).expect("net")
    })
}

fn v6net() -> impl Strategy<Value = IpNetwork> {
    (any::<u128>(), 0u8..=128).prop_map(|(a, p)| {
        let n = Ipv6Network::new(Ipv6Addr::from(a), p).expect("net");
        IpNetwork::V6(Ipv6Network::new(n.network(), p).expect("net"))
    })
}

fn seg() -> impl Strategy<Value = AsSegment> {
    prop_oneof![
        proptest::collection::vec(any::<u32>(), 1..5).prop_map(AsSegment::Sequence),
        proptest::collection::vec(any::<u32>(), 1..5).prop_map(AsSegment::Set),
    ]
}

fn update() -> impl Strategy<Value = Update> {
    (
        proptest::collection::vec(v4net(), 0..20),
        proptest::collection::vec(v4net(), 1..20),
        proptest::collection::vec(seg(), 0..3),
        any::<u32>(),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(any::<u32>(), 0..4),
        proptest::collection::vec(v6net(), 0..10),
    )
        .prop_map(|(withdrawn, nlri, path, lp, med, comms, v6)| {
            let mut attrs = vec![
                PathAttr::Origin(Origin::Incomplete),
                PathAttr::AsPath(path),
                PathAttr::NextHop(Ipv4Addr::new(198, 18, 0, 1)),
                PathAttr::LocalPref(lp),
            ];
            if let Some(m) = med {
                attrs.push(PathAttr::Med(m));
            }
            if !comms.is_empty() {
                attrs.push(PathAttr::Communities(comms));
            }
            if !v6.is_empty() {
                attrs.push(PathAttr::MpReach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    next_hops: vec!["2001:db8::1".parse().expect("addr")],
                    nlri: v6,
                });
            }
            Update {
                withdrawn,
                attrs,
                nlri,
                treat_as_withdraw: false,
                extended_length: vec![],
            }
        })
}

proptest! {
    #[test]
    fn updates_round_trip(u in update()) {
        let b = encode(&Message::Update(u.clone()), FOUR);
        prop_assume!(b.len() <= MAX_LEN);
        prop_assert_eq!(decode(&b, FOUR), Ok(Message::Update(u)));
    }

    #[test]
    fn opens_round_trip(asn in any::<u32>(), hold in prop_oneof![Just(0u16), 3u16..], id in 1u32..0xdfff_ffff, gr in any::<bool>()) {
        let mut caps = vec![
            Capability::MultiProtocol { afi: AFI_IPV4, safi: SAFI_UNICAST },
            Capability::MultiProtocol { afi: AFI_IPV6, safi: SAFI_UNICAST },
            Capability::RouteRefresh,
            Capability::FourOctetAs(asn),
        ];
        if gr {
            caps.push(Capability::GracefulRestart { restarting: true, time: 120, families: vec![(1, 1, true)] });
        }
        let o = Open { version: 4, my_as: u16::try_from(asn).unwrap_or(AS_TRANS), hold_time: hold, bgp_id: Ipv4Addr::from(id), capabilities: caps };
        let b = encode(&Message::Open(o.clone()), FOUR);
        prop_assert_eq!(decode(&b, FOUR), Ok(Message::Open(o)));
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn garbage_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..300), ty in 1u8..6) {
        if b.len() >= 19 {
            b[..16].fill(0xff);
            let n = b.len() as u16;
            b[16..18].copy_from_slice(&n.to_be_bytes());
            b[18] = ty;
        }
        let _ = frame(&b);
        let _ = decode(&b, FOUR);
        let _ = decode(&b, TWO);
    }
}
