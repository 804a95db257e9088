//! Negotiated address families on the wire (RFC 4760, RFC 4724 §2): a peer that negotiated
//! IPv4 unicast only receives no octet of AFI 2 (no routes, no withdrawals, no End-of-RIB),
//! an IPv6-only peer nothing of IPv4, and an UPDATE for a family a peer did not negotiate is
//! ignored without resetting the session. Raw TCP peers on loopback, decoded with the codec.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tessera_routed::packet::{
    decode, encode, frame, AsSegment, Capability, Ctx, Message, Open, Origin, PathAttr, Update,
    AFI_IPV4, AFI_IPV6, SAFI_UNICAST,
};

mod common;
use common::{connect_from, free_port, spawn_speaker, status_at};

const CTX: Ctx = Ctx {
    four_octet_as: true,
    extended_message: false,
};

fn open(asn: u32, id: Ipv4Addr, afis: &[u16]) -> Vec<u8> {
    let mut capabilities: Vec<Capability> = afis
        .iter()
        .map(|afi| Capability::MultiProtocol {
            afi: *afi,
            safi: SAFI_UNICAST,
        })
        .collect();
    capabilities.push(Capability::FourOctetAs(asn));
    let o = Open {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(23456),
        hold_time: 30,
        bgp_id: id,
        capabilities,
    };
    encode(&Message::Open(o), CTX).to_vec()
}

fn keepalive() -> Vec<u8> {
    encode(&Message::Keepalive, CTX).to_vec()
}

fn update(u: Update) -> Vec<u8> {
    encode(&Message::Update(u), CTX).to_vec()
}

fn attrs(asn: u32) -> Vec<PathAttr> {
    vec![
        PathAttr::Origin(Origin::Igp),
        PathAttr::AsPath(vec![AsSegment::Sequence(vec![asn])]),
    ]
}

fn announce_v4(asn: u32, nh: Ipv4Addr, nets: &[&str]) -> Vec<u8> {
    let mut a = attrs(asn);
    a.push(PathAttr::NextHop(nh));
    update(Update {
        attrs: a,
        nlri: nets.iter().map(|n| n.parse().expect("net")).collect(),
        ..Default::default()
    })
}

fn announce_v6(asn: u32, nh: &str, nets: &[&str]) -> Vec<u8> {
    let mut a = attrs(asn);
    a.push(PathAttr::MpReach {
        afi: AFI_IPV6,
        safi: SAFI_UNICAST,
        next_hops: vec![nh.parse().expect("nh")],
        nlri: nets.iter().map(|n| n.parse().expect("net")).collect(),
    });
    update(Update {
        attrs: a,
        ..Default::default()
    })
}

fn withdraw(nets: &[&str]) -> Vec<u8> {
    let nets: Vec<IpNetwork> = nets.iter().map(|n| n.parse().expect("net")).collect();
    let (v4, v6): (Vec<IpNetwork>, Vec<IpNetwork>) = nets.into_iter().partition(|n| n.is_ipv4());
    let mut u = Update {
        withdrawn: v4
            .into_iter()
            .filter_map(|n| match n {
                IpNetwork::V4(v) => Some(v),
                IpNetwork::V6(_) => None,
            })
            .collect(),
        ..Default::default()
    };
    if !v6.is_empty() {
        u.attrs.push(PathAttr::MpUnreach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            withdrawn: v6,
        });
    }
    update(u)
}

/// Every message the peer receives for `wait`, decoded.
fn collect(s: &mut TcpStream, wait: Duration) -> Vec<(Vec<u8>, Message)> {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        while let Ok(Some(len)) = frame(&buf) {
            let raw: Vec<u8> = buf.drain(..len).collect();
            let m = decode(&raw, CTX).expect("the speaker's messages decode");
            out.push((raw, m));
        }
    }
    out
}

/// A speaker on loopback with three eBGP peers (what one announces is passed on to the
/// others), and what the tests need of it.
struct Running {
    to: SocketAddr,
    status: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

fn speaker() -> Running {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let status = dir
        .path()
        .join("routed.sock")
        .to_string_lossy()
        .into_owned();
    let (stop, task) = spawn_speaker(&format!(
        "asn: 64512\nrouterId: 127.0.0.1\nlisten: 127.0.0.1\nlistenPort: {port}\nconnectRetrySeconds: 1\nnextHopV6: \"2001:db8::1\"\nstatusSocket: {status}\nnetworks: [10.244.1.0/26, \"fd10:244::/122\"]\npeers:\n  - {{ address: 127.0.0.2, asn: 65002, passive: true }}\n  - {{ address: 127.0.0.3, asn: 65003, passive: true }}\n  - {{ address: 127.0.0.4, asn: 65004, passive: true }}\n"
    ));
    Running {
        to: format!("127.0.0.1:{port}").parse().expect("addr"),
        status,
        stop,
        task,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_peer_hears_only_the_families_it_negotiated() {
    let Running {
        to,
        status: _,
        stop,
        task,
        _dir,
    } = speaker();
    let (v4_only, v6_only) = tokio::task::spawn_blocking(move || {
        // 127.0.0.2: IPv4 only; 127.0.0.3: IPv6 only; 127.0.0.4: both, the source of routes.
        let mut p2 = connect_from("127.0.0.2", to, None);
        p2.write_all(&open(65002, Ipv4Addr::new(127, 0, 0, 2), &[AFI_IPV4]))
            .expect("open");
        p2.write_all(&keepalive()).expect("keepalive");
        let mut p3 = connect_from("127.0.0.3", to, None);
        p3.write_all(&open(65003, Ipv4Addr::new(127, 0, 0, 3), &[AFI_IPV6]))
            .expect("open");
        p3.write_all(&keepalive()).expect("keepalive");
        let mut p4 = connect_from("127.0.0.4", to, None);
        p4.write_all(&open(
            65004,
            Ipv4Addr::new(127, 0, 0, 4),
            &[AFI_IPV4, AFI_IPV6],
        ))
        .expect("open");
        p4.write_all(&keepalive()).expect("keepalive");
        std::thread::sleep(Duration::from_millis(300));
        // Routes of both families come and go.
        p4.write_all(&announce_v4(
            65004,
            Ipv4Addr::new(127, 0, 0, 4),
            &["10.244.9.0/26"],
        ))
        .expect("v4");
        p4.write_all(&announce_v6(65004, "2001:db8::4", &["fd10:244::9:0/122"]))
            .expect("v6");
        std::thread::sleep(Duration::from_millis(300));
        p4.write_all(&withdraw(&["10.244.9.0/26", "fd10:244::9:0/122"]))
            .expect("withdraw");
        let keep = std::thread::spawn(move || collect(&mut p4, Duration::from_secs(2)));
        let t2 = std::thread::spawn(move || collect(&mut p2, Duration::from_secs(2)));
        let got3 = collect(&mut p3, Duration::from_secs(2));
        let _ = keep.join();
        (t2.join().expect("p2"), got3)
    })
    .await
    .expect("peers");
    let updates = |msgs: &[(Vec<u8>, Message)]| -> Vec<Update> {
        msgs.iter()
            .filter_map(|(_, m)| match m {
                Message::Update(u) => Some(u.clone()),
                _ => None,
            })
            .collect()
    };
    for (who, msgs, carried, foreign) in [
        ("IPv4-only peer", &v4_only, AFI_IPV4, AFI_IPV6),
        ("IPv6-only peer", &v6_only, AFI_IPV6, AFI_IPV4),
    ] {
        assert!(
            !msgs
                .iter()
                .any(|(_, m)| matches!(m, Message::Notification(_))),
            "{who}: the session stayed up"
        );
        let us = updates(msgs);
        for u in &us {
            assert!(
                !u.afis().contains(&foreign),
                "{who} got AFI {foreign}: {u:?}"
            );
        }
        // And everything of its own family: our block, the learned route and its withdrawal,
        // and its End-of-RIB.
        let announced: Vec<IpNetwork> = us.iter().flat_map(Update::announced).collect();
        let withdrawn: Vec<IpNetwork> = us.iter().flat_map(Update::withdrawn_all).collect();
        let (ours, learned): (IpNetwork, IpNetwork) = if carried == AFI_IPV4 {
            (
                "10.244.1.0/26".parse().expect("net"),
                "10.244.9.0/26".parse().expect("net"),
            )
        } else {
            (
                "fd10:244::/122".parse().expect("net"),
                "fd10:244::9:0/122".parse().expect("net"),
            )
        };
        assert!(
            announced.contains(&ours) && announced.contains(&learned),
            "{who}: {announced:?}"
        );
        assert!(withdrawn.contains(&learned), "{who}: {withdrawn:?}");
        assert!(
            us.iter()
                .any(|u| u.end_of_rib() == Some((carried, SAFI_UNICAST))),
            "{who}: End-of-RIB"
        );
    }
    let _ = stop.send(());
    task.await.expect("join").expect("speaker ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_for_a_family_not_negotiated_is_ignored_and_the_session_stays_up() {
    let Running {
        to,
        status,
        stop,
        task,
        _dir,
    } = speaker();
    let got = tokio::task::spawn_blocking(move || {
        let mut p2 = connect_from("127.0.0.2", to, None);
        p2.write_all(&open(65002, Ipv4Addr::new(127, 0, 0, 2), &[AFI_IPV4]))
            .expect("open");
        p2.write_all(&keepalive()).expect("keepalive");
        std::thread::sleep(Duration::from_millis(300));
        // An IPv6 route and an IPv6 withdrawal over an IPv4-only session, then an IPv4 route.
        p2.write_all(&announce_v6(65002, "2001:db8::2", &["fd10:244::7:0/122"]))
            .expect("v6");
        p2.write_all(&withdraw(&["fd10:244::8:0/122"]))
            .expect("v6 withdraw");
        p2.write_all(&announce_v4(
            65002,
            Ipv4Addr::new(127, 0, 0, 2),
            &["10.244.7.0/26"],
        ))
        .expect("v4");
        for _ in 0..3 {
            p2.write_all(&keepalive()).expect("keepalive");
            std::thread::sleep(Duration::from_millis(300));
        }
        let got = collect(&mut p2, Duration::from_millis(500));
        (got, p2)
    })
    .await
    .expect("peer");
    // The session is still open while the speaker is asked about it.
    let (got, _p2) = got;
    assert!(
        !got.iter()
            .any(|(_, m)| matches!(m, Message::Notification(_))),
        "no NOTIFICATION: {got:?}"
    );
    let v = status_at(&status).expect("status");
    let p2 = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["address"] == "127.0.0.2")
        .expect("peer")
        .clone();
    assert_eq!(p2["state"], "Established", "{v}");
    // The IPv4 route counts; the IPv6 one was ignored.
    assert_eq!(p2["prefixes_received"], 1, "{v}");
    let _ = stop.send(());
    task.await.expect("join").expect("speaker ran");
}
