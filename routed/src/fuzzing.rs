//! What the fuzz targets check (`fuzz/`), as functions that panic on a broken invariant, so
//! that the committed corpora also run as ordinary tests (`tests/fuzz_corpus.rs`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::config::{Config, PeerConfig};
use crate::kernel::{RouteTarget, Target};
use crate::packet::{
    decode, encode, frame, Capability, Ctx, Message, Open, AFI_IPV4, AFI_IPV6, SAFI_UNICAST,
};
use crate::speaker_core::{Input, SpeakerCore};

/// The decoder on arbitrary bytes: never panics, and what it accepts re-encodes to bytes
/// that decode to the same message. Returns whether it accepted the bytes.
pub fn decode_roundtrip(data: &[u8]) -> bool {
    let mut accepted = false;
    for (four_octet_as, extended_message) in [(true, false), (false, false), (true, true)] {
        let ctx = Ctx {
            four_octet_as,
            extended_message,
        };
        let _ = frame(data);
        if let Ok(m) = decode(data, ctx) {
            accepted = true;
            let again = encode(&m, ctx);
            if again.len() <= ctx.max_len() {
                let back: Message = decode(&again, ctx).expect("our own encoding decodes");
                // treat_as_withdraw is a property of the received bytes, not of the message.
                if let (Message::Update(a), Message::Update(b)) = (&m, &back) {
                    assert_eq!(a.announced(), b.announced());
                } else {
                    assert_eq!(m, back);
                }
            }
        }
    }
    accepted
}

struct Native;
impl RouteTarget for Native {
    fn target(&self, _: IpNetwork, _: IpAddr) -> Target {
        Target::Native
    }
}

/// The speaker core fed a sequence from `data`: each message is a length octet and that
/// many bytes decoded as a BGP message (an UPDATE goes in as received; anything else, or
/// bytes that do not decode, are a session reset and a tick, with time moving on). It
/// never panics, and once the peer's session is down (it asked for no graceful restart)
/// nothing it sent is left: only the speaker's own network. Returns whether any UPDATE
/// went in.
pub fn speaker_sequence(data: &[u8]) -> bool {
    let mut updates = false;
    let peer: IpAddr = "198.18.0.11".parse().expect("address");
    let mut cfg = Config::parse(
        "asn: 64512\nrouterId: 198.18.0.10\nlisten: 198.18.0.10\nnetworks: [\"10.244.0.0/26\"]\n",
    )
    .expect("config");
    cfg.peers = vec![PeerConfig {
        address: peer,
        asn: 64512,
        port: 179,
        passive: false,
        rr_client: false,
        local_address: None,
        password: None,
        bfd: false,
        interface: None,
    }];
    cfg.next_hop_v6 = Some("2001:db8::10".parse().expect("address"));
    let mut core = SpeakerCore::new(cfg, true, Arc::new(Native));
    let ctx = Ctx {
        four_octet_as: true,
        extended_message: false,
    };
    let up = || Input::SessionUp {
        peer,
        open: Open {
            version: 4,
            my_as: 64512,
            hold_time: 90,
            bgp_id: "198.18.0.11".parse().expect("id"),
            capabilities: vec![
                Capability::MultiProtocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::MultiProtocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(64512),
            ],
        },
        ctx,
        local: "198.18.0.10".parse().expect("address"),
        interface: None,
    };
    let mut now = Duration::ZERO;
    core.start(now, vec![]);
    core.handle(now, up());
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let take = usize::from(len).min(tail.len());
        let (bytes, next) = tail.split_at(take);
        rest = next;
        now += Duration::from_millis(u64::from(len) * 10);
        match decode(bytes, ctx) {
            Ok(Message::Update(update)) => {
                updates = true;
                core.handle(now, Input::Update { peer, update });
            }
            _ => {
                core.handle(
                    now,
                    Input::SessionDown {
                        peer,
                        reason: "fuzz".into(),
                    },
                );
                core.handle(now, Input::Tick);
                core.handle(now, up());
            }
        }
    }
    core.handle(
        now,
        Input::SessionDown {
            peer,
            reason: "end".into(),
        },
    );
    let status = core.status(now);
    assert_eq!(
        status.loc_rib, 1,
        "only our own network once the peer is down"
    );
    updates
}
