//! UPDATE packing by encoded size: as many prefixes per message as fit in the session's
//! limit (4096 octets, 65535 with Extended Message), measured on the encoding itself, so that
//! long AS paths, many communities or IPv6 next hops never make a message oversize. Pure.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::packet::{
    attr, encode, Ctx, Message, PathAttr, Update, AFI_IPV4, AFI_IPV6, HEADER_LEN, SAFI_UNICAST,
};

/// Attributes so large that not even one prefix fits beside them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path attributes of {len} octets leave no room for a prefix in a {max}-octet message")]
pub struct AttributesTooLarge {
    pub len: usize,
    pub max: usize,
}

/// Octets one prefix takes in NLRI or withdrawn routes: length byte and the prefix's bytes.
fn nlri_len(n: &IpNetwork) -> usize {
    1 + usize::from(n.prefix()).div_ceil(8)
}

fn encoded_len(u: &Update, ctx: Ctx) -> usize {
    encode(&Message::Update(u.clone()), ctx).len()
}

/// Fills copies of `empty` (an UPDATE without prefixes) with `nets`, through `put`, as
/// long as each stays within the session's limit.
fn fill(
    empty: Update,
    nets: &[IpNetwork],
    ctx: Ctx,
    put: impl Fn(&mut Update, IpNetwork),
) -> Result<Vec<Update>, AttributesTooLarge> {
    let max = ctx.max_len();
    let fixed = encoded_len(&empty, ctx);
    let smallest = nets.iter().map(nlri_len).min().unwrap_or(0);
    if !nets.is_empty() && fixed + smallest > max {
        return Err(AttributesTooLarge { len: fixed, max });
    }
    let mut out = Vec::new();
    let mut current = empty.clone();
    let mut used = fixed;
    let mut any = false;
    for n in nets {
        let len = nlri_len(n);
        if any && used + len > max {
            out.push(std::mem::replace(&mut current, empty.clone()));
            used = fixed;
        }
        if used + len > max {
            return Err(AttributesTooLarge { len: fixed, max });
        }
        put(&mut current, *n);
        used += len;
        any = true;
    }
    if any {
        out.push(current);
    }
    Ok(out)
}

/// UPDATEs announcing `nets` (one family) with the path attributes `base` and `next_hop`:
/// IPv4 in the NLRI field with NEXT_HOP, IPv6 in MP_REACH_NLRI (RFC 4760).
pub fn announcements(
    base: &[PathAttr],
    next_hop: IpAddr,
    nets: &[IpNetwork],
    ctx: Ctx,
) -> Result<Vec<Update>, AttributesTooLarge> {
    let mut attrs = base.to_vec();
    let ipv6 = nets.first().is_some_and(|n| n.is_ipv6());
    let mut empty = Update::default();
    if ipv6 {
        attrs.push(PathAttr::MpReach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            // A link-local next hop goes second, after `::` (RFC 2545 §3 wants a global
            // one first; BIRD sends this when the interface has no global address).
            next_hops: if crate::rib::is_link_local(&next_hop) {
                vec![IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), next_hop]
            } else {
                vec![next_hop]
            },
            nlri: vec![],
        });
        // A 2-octet attribute length from the start: the size per prefix stays exact.
        empty.extended_length.push(attr::MP_REACH);
    } else if let IpAddr::V4(nh) = next_hop {
        attrs.push(PathAttr::NextHop(nh));
    }
    empty.attrs = attrs;
    fill(empty, nets, ctx, |u, n| match n {
        IpNetwork::V4(v) => u.nlri.push(v),
        IpNetwork::V6(_) => {
            if let Some(PathAttr::MpReach { nlri, .. }) = u.attrs.last_mut() {
                nlri.push(n);
            }
        }
    })
}

/// UPDATEs withdrawing `nets` (one family): IPv4 in the withdrawn routes field, IPv6 in
/// MP_UNREACH_NLRI.
pub fn withdrawals(nets: &[IpNetwork], ctx: Ctx) -> Vec<Update> {
    let ipv6 = nets.first().is_some_and(|n| n.is_ipv6());
    let mut empty = Update::default();
    if ipv6 {
        empty.attrs.push(PathAttr::MpUnreach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            withdrawn: vec![],
        });
        empty.extended_length.push(attr::MP_UNREACH);
    }
    // Withdrawals carry no attributes of their own: they always fit.
    fill(empty, nets, ctx, |u, n| match n {
        IpNetwork::V4(v) => u.withdrawn.push(v),
        IpNetwork::V6(_) => {
            if let Some(PathAttr::MpUnreach { withdrawn, .. }) = u.attrs.last_mut() {
                withdrawn.push(n);
            }
        }
    })
    .unwrap_or_default()
}

/// The End-of-RIB marker of a family (RFC 4724 §2).
pub fn end_of_rib(afi: u16) -> Update {
    if afi == AFI_IPV4 {
        return Update::default();
    }
    Update {
        attrs: vec![PathAttr::MpUnreach {
            afi,
            safi: SAFI_UNICAST,
            withdrawn: vec![],
        }],
        ..Default::default()
    }
}

/// The smallest UPDATE: header, two empty length fields.
pub const EMPTY_UPDATE_LEN: usize = HEADER_LEN + 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{decode, AsSegment, Origin, MAX_LEN};
    use proptest::prelude::*;

    fn base(as_path: Vec<u32>, communities: Vec<u32>) -> Vec<PathAttr> {
        vec![
            PathAttr::Origin(Origin::Igp),
            PathAttr::AsPath(vec![AsSegment::Sequence(as_path)]),
            PathAttr::LocalPref(100),
            PathAttr::Communities(communities),
        ]
    }

    /// Prefixes as they come back from the wire: network address, host bits clear.
    fn net(a: IpAddr, len: u8) -> IpNetwork {
        let n = IpNetwork::new(a, len).expect("net");
        IpNetwork::new(n.network(), len).expect("net")
    }

    fn v4(i: u32, len: u8) -> IpNetwork {
        net(
            IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000u32.wrapping_add(i << 8),
            )),
            len,
        )
    }

    fn v6(i: u32, len: u8) -> IpNetwork {
        let a = std::net::Ipv6Addr::new(0xfd10, 0x244, (i >> 16) as u16, i as u16, 0, 0, 0, 0);
        net(IpAddr::V6(a), len)
    }

    /// Every message within the limit, every prefix exactly once, in order, and each message
    /// but the last full (the next prefix would not have fitted).
    fn check(msgs: &[Update], nets: &[IpNetwork], ctx: Ctx, withdraw: bool) {
        let mut seen = Vec::new();
        for (i, u) in msgs.iter().enumerate() {
            let bytes = encode(&Message::Update(u.clone()), ctx);
            assert!(
                bytes.len() <= ctx.max_len(),
                "{} > {}",
                bytes.len(),
                ctx.max_len()
            );
            let Message::Update(back) = decode(&bytes, ctx).expect("decodes") else {
                panic!("not an UPDATE");
            };
            let got = if withdraw {
                back.withdrawn_all()
            } else {
                back.announced()
            };
            if i + 1 < msgs.len() {
                let next = nets[seen.len() + got.len()];
                assert!(
                    bytes.len() + nlri_len(&next) > ctx.max_len(),
                    "message {i} not full"
                );
            }
            seen.extend(got);
        }
        assert_eq!(seen, nets);
    }

    #[test]
    fn a_plain_table_packs_by_size_not_count() {
        let ctx = Ctx {
            four_octet_as: true,
            extended_message: false,
        };
        let nets: Vec<IpNetwork> = (0..2000).map(|i| v4(i, 26)).collect();
        let msgs = announcements(
            &base(vec![64512], vec![]),
            "198.18.0.10".parse().expect("ip"),
            &nets,
            ctx,
        )
        .expect("pack");
        check(&msgs, &nets, ctx, false);
        // 5 octets a /26: about 800 per 4096-octet message, not the 400 a count would give.
        assert_eq!(msgs.len(), 3);
        let ext = Ctx {
            extended_message: true,
            ..ctx
        };
        let msgs = announcements(
            &base(vec![64512], vec![]),
            "198.18.0.10".parse().expect("ip"),
            &nets,
            ext,
        )
        .expect("pack");
        assert_eq!(msgs.len(), 1);
        check(&msgs, &nets, ext, false);
    }

    #[test]
    fn attributes_that_leave_no_room_are_refused_not_sent_oversize() {
        let ctx = Ctx::default();
        let huge = base(vec![64512; 20], (0..1100).collect());
        let e = announcements(&huge, "198.18.0.10".parse().expect("ip"), &[v4(1, 26)], ctx)
            .unwrap_err();
        assert_eq!(e.max, MAX_LEN);
    }

    #[test]
    fn end_of_rib_markers_are_per_family() {
        assert_eq!(
            end_of_rib(AFI_IPV4).end_of_rib(),
            Some((AFI_IPV4, SAFI_UNICAST))
        );
        assert_eq!(
            end_of_rib(AFI_IPV6).end_of_rib(),
            Some((AFI_IPV6, SAFI_UNICAST))
        );
        assert_eq!(
            encode(&Message::Update(end_of_rib(AFI_IPV4)), Ctx::default()).len(),
            EMPTY_UPDATE_LEN
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn packed_updates_fit_and_carry_every_prefix(
            as_path in proptest::collection::vec(1u32..4_000_000_000, 1..=255),
            communities in proptest::collection::vec(any::<u32>(), 0..400),
            count in 1usize..3000,
            len4 in 8u8..=32,
            len6 in 16u8..=128,
            ipv6 in any::<bool>(),
            four_octet in any::<bool>(),
            extended in any::<bool>(),
            withdraw in any::<bool>(),
        ) {
            let ctx = Ctx { four_octet_as: four_octet, extended_message: extended };
            let nets: Vec<IpNetwork> = (0..count as u32)
                .map(|i| if ipv6 { v6(i, len6) } else { v4(i, len4) })
                .collect();
            if withdraw {
                check(&withdrawals(&nets, ctx), &nets, ctx, true);
            } else {
                let nh: IpAddr = if ipv6 { "2001:db8::10".parse().expect("ip") } else { "198.18.0.10".parse().expect("ip") };
                match announcements(&base(as_path, communities), nh, &nets, ctx) {
                    Ok(msgs) => check(&msgs, &nets, ctx, false),
                    // Only when not even the smallest prefix fits beside the attributes.
                    Err(e) => prop_assert!(e.len + nlri_len(&nets[0]) > ctx.max_len(), "{e}"),
                }
            }
        }
    }
}
