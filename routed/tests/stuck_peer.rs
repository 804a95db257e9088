//! A stuck peer harms no one (issue 13): a peer that completes OPEN/KEEPALIVE, keeps sending
//! KEEPALIVEs and stops reading while the speaker has 100,000 routes (announced and withdrawn
//! several times) to send it. Meanwhile
//! another peer's new route still reaches a third peer, the status socket answers, and the
//! stuck peer is dropped once it took nothing for a hold time. Raw peers on loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use tessera_routed::pack;
use tessera_routed::packet::{
    decode, encode, frame, AsSegment, Capability, Ctx, Message, Open, Origin, PathAttr, AFI_IPV4,
    SAFI_UNICAST,
};

mod common;
use common::{connect_from, free_port, spawn_speaker, status_at};

const CTX: Ctx = Ctx {
    four_octet_as: true,
    extended_message: false,
};

fn open(asn: u32, id: Ipv4Addr, hold: u16) -> Vec<u8> {
    let o = Open {
        version: 4,
        my_as: 23456,
        hold_time: hold,
        bgp_id: id,
        capabilities: vec![
            Capability::MultiProtocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::FourOctetAs(asn),
        ],
    };
    encode(&Message::Open(o), CTX).to_vec()
}

fn keepalive() -> Vec<u8> {
    encode(&Message::Keepalive, CTX).to_vec()
}

/// UPDATEs announcing `nets` from `asn` with next hop `nh`, packed by size.
fn announce(asn: u32, nh: Ipv4Addr, nets: &[IpNetwork]) -> Vec<u8> {
    let base = vec![
        PathAttr::Origin(Origin::Igp),
        PathAttr::AsPath(vec![AsSegment::Sequence(vec![asn])]),
    ];
    pack::announcements(&base, nh.into(), nets, CTX)
        .expect("pack")
        .into_iter()
        .flat_map(|u| encode(&Message::Update(u), CTX).to_vec())
        .collect()
}

fn peer_state(v: &serde_json::Value, addr: &str) -> String {
    v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["address"] == addr)
        .and_then(|p| p["state"].as_str())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_dropped_and_holds_up_no_one() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir
        .path()
        .join("routed.sock")
        .to_string_lossy()
        .into_owned();
    let (stop_tx, speaker) = spawn_speaker(&format!(
        "asn: 64512\nrouterId: 127.0.0.1\nlisten: 127.0.0.1\nlistenPort: {port}\nholdTime: 6\nstatusSocket: {sock}\npeers:\n  - {{ address: 127.0.0.2, asn: 65002, passive: true }}\n  - {{ address: 127.0.0.3, asn: 65003, passive: true }}\n  - {{ address: 127.0.0.4, asn: 65004, passive: true }}\n"
    ));
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let done = tokio::task::spawn_blocking(move || {
        let quit = Arc::new(AtomicBool::new(false));
        // The stuck peer: a small receive buffer, KEEPALIVEs every second, never reads.
        let mut stuck = connect_from("127.0.0.3", to, Some(4096));
        stuck
            .write_all(&open(65003, Ipv4Addr::new(127, 0, 0, 3), 6))
            .expect("open");
        stuck.write_all(&keepalive()).expect("keepalive");
        let q = quit.clone();
        let stuck_writer = std::thread::spawn(move || {
            while !q.load(Ordering::Relaxed) && stuck.write_all(&keepalive()).is_ok() {
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        // The observer reads everything and remembers the prefixes it was sent.
        let mut observer = connect_from("127.0.0.4", to, None);
        observer
            .write_all(&open(65004, Ipv4Addr::new(127, 0, 0, 4), 6))
            .expect("open");
        observer.write_all(&keepalive()).expect("keepalive");
        observer
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<IpNetwork>();
        let q = quit.clone();
        let observer_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            let mut last_keepalive = Instant::now();
            while !q.load(Ordering::Relaxed) {
                if last_keepalive.elapsed() > Duration::from_secs(1) {
                    let _ = observer.write_all(&keepalive());
                    last_keepalive = Instant::now();
                }
                match observer.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(_) => continue,
                }
                while let Ok(Some(len)) = frame(&buf) {
                    let raw: Vec<u8> = buf.drain(..len).collect();
                    if let Ok(Message::Update(u)) = decode(&raw, CTX) {
                        for n in u.announced() {
                            let _ = seen_tx.send(n);
                        }
                    }
                }
            }
        });
        // The feeder: 100,000 routes, which the speaker passes on to both other peers.
        let mut feeder = connect_from("127.0.0.2", to, None);
        feeder
            .write_all(&open(65002, Ipv4Addr::new(127, 0, 0, 2), 0))
            .expect("open");
        feeder.write_all(&keepalive()).expect("keepalive");
        std::thread::sleep(Duration::from_millis(300));
        let table: Vec<IpNetwork> = (0..100_000u32)
            .map(|i| {
                IpNetwork::V4(
                    Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 + (i << 6)), 26).expect("net"),
                )
            })
            .collect();
        // Announced, withdrawn and announced again a few times: more than the kernel's
        // socket buffers hold (4 MiB here), so the speaker's own queue for the stuck peer
        // grows while it reads nothing.
        let withdraw: Vec<u8> = pack::withdrawals(&table, CTX)
            .into_iter()
            .flat_map(|u| encode(&Message::Update(u), CTX).to_vec())
            .collect();
        let announced = announce(65002, Ipv4Addr::new(127, 0, 0, 2), &table);
        for _ in 0..6 {
            feeder.write_all(&announced).expect("feed");
            feeder.write_all(&withdraw).expect("withdraw");
        }
        feeder.write_all(&announced).expect("feed");
        // Then one new prefix: it must reach the observer while the stuck peer is stuck.
        let fresh: IpNetwork = "10.255.255.0/24".parse().expect("net");
        let fed = Instant::now();
        feeder
            .write_all(&announce(65002, Ipv4Addr::new(127, 0, 0, 2), &[fresh]))
            .expect("fresh");
        let mut reached = None;
        while reached.is_none() && fed.elapsed() < Duration::from_secs(60) {
            if let Ok(n) = seen_rx.recv_timeout(Duration::from_millis(100)) {
                if n == fresh {
                    reached = Some(fed.elapsed());
                }
            }
        }
        // The status socket answers, and the stuck peer is dropped by its write deadline.
        let mut dropped = None;
        let mut answered = 0;
        while dropped.is_none() && fed.elapsed() < Duration::from_secs(60) {
            if let Some(v) = status_at(&sock) {
                answered += 1;
                if peer_state(&v, "127.0.0.3") != "Established" {
                    dropped = Some(fed.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let observer_up =
            status_at(&sock).is_some_and(|v| peer_state(&v, "127.0.0.4") == "Established");
        quit.store(true, Ordering::Relaxed);
        let _ = stuck_writer.join();
        let _ = observer_thread.join();
        drop(feeder);
        (reached, dropped, answered, observer_up)
    })
    .await
    .expect("peers");
    let (reached, dropped, answered, observer_up) = done;
    eprintln!(
        "new prefix reached the observer after {reached:?}; stuck peer dropped after {dropped:?}"
    );
    assert!(
        reached.is_some(),
        "the new prefix never reached the observer"
    );
    assert!(dropped.is_some(), "the stuck peer was never dropped");
    assert!(answered > 0, "the status socket answered");
    assert!(observer_up, "the reading peer stayed up");
    let _ = stop_tx.send(());
    speaker.await.expect("join").expect("speaker ran");
}
