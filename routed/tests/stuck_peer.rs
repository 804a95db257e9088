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
use common::{
    addresses, connect_from, free_port, one_subnet, route, spawn_speaker, start_routed, status,
    status_at, wait_for, Bird,
};

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

/// The same with BIRD and the kernel, as the issue's probe ran it: node1 runs
/// tessera-routed (its sockets' send buffers small, so that a peer that stops reading stalls
/// it at once), node2 BIRD feeding 100,000 routes, node3 the stuck peer. While the stuck
/// peer is still Established (stalled), BIRD flaps a route 300 times and announces a new
/// prefix: the new prefix reaches node1's kernel, Tessera's own route stays in BIRD's, the
/// status socket answers; then the stuck peer is dropped at its hold time.
#[test]
fn a_stuck_peer_holds_up_neither_bird_nor_the_kernel() {
    let lab = one_subnet("stuck_bird", 3, false);
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    let [a1, a2, _, _] = addresses(&lab);
    let a3 = n3.ipv4.ip();
    n1.netns
        .sysctl("net.ipv4.tcp_wmem", "4096 16384 65536")
        .expect("small send buffers");
    let dir = tempfile::tempdir().expect("tempdir");
    let bdir = dir.path().join("bird");
    std::fs::create_dir_all(&bdir).expect("mkdir");
    let conf = format!(
        "asn: 64512\nrouterId: {a1}\nlisten: {a1}\nconnectRetrySeconds: 1\nholdTime: 30\nnetworks: [\"10.244.1.0/26\"]\nstatusSocket: {sock}\npeers:\n  - {{ address: {a2}, asn: 64512, localAddress: {a1} }}\n  - {{ address: {a3}, asn: 65003, passive: true }}\n",
        sock = dir.path().join("routed.sock").display()
    );
    let mut routed = start_routed(&n1.netns, dir.path(), &conf);

    // The stuck peer, from node3: OPEN, KEEPALIVE every second, never reads.
    let quit = Arc::new(AtomicBool::new(false));
    let (q, ns3, to) = (
        quit.clone(),
        n3.netns.path(),
        SocketAddr::new(a1.parse().expect("a1"), 179),
    );
    let stuck = std::thread::spawn(move || {
        tessera_testbed::netns::enter_on_this_thread(&ns3).expect("into node3");
        let mut s = connect_from(&a3.to_string(), to, Some(4096));
        s.write_all(&open(65003, a3, 30)).expect("open");
        while !q.load(Ordering::Relaxed) && s.write_all(&keepalive()).is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let state_of = |addr: &str| peer_state(&status(dir.path()), addr);
    wait_for("the stuck peer's session", Duration::from_secs(20), || {
        state_of(&a3.to_string()) == "Established"
    });

    let table: String = (0..100_000u32)
        .map(|i| {
            format!(
                "route {}/26 blackhole;\n",
                Ipv4Addr::from(0x0a00_0000 + (i << 6))
            )
        })
        .collect();
    let bird = Bird::start(
        &n2.netns,
        &bdir,
        &format!(
            r#"router id {a2};
log "{log}" all;
protocol device {{ scan time 10; }}
protocol kernel k4 {{ ipv4 {{ import none; export where proto = "peer"; }}; }}
protocol static feed {{ ipv4; {table} }}
protocol static flap {{ ipv4; route 10.254.0.0/24 blackhole; }}
protocol static fresh {{ disabled; ipv4; route 10.255.255.0/24 blackhole; }}
protocol bgp peer {{
  local {a2} as 64512;
  neighbor {a1} as 64512;
  direct;
  connect delay time 1;
  connect retry time 1;
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
"#,
            log = bdir.join("bird.log").display()
        ),
    );
    wait_for(
        "BIRD's 100,000 routes in node1's kernel",
        Duration::from_secs(120),
        || route(&n1.netns, false, "10.97.167.192/26").is_some(),
    );
    assert_eq!(
        state_of(&a3.to_string()),
        "Established",
        "the stuck peer is still there, stalled"
    );
    for _ in 0..300 {
        bird.birdc(&["disable", "flap"]);
        bird.birdc(&["enable", "flap"]);
    }
    bird.birdc(&["enable", "fresh"]);
    wait_for(
        "BIRD's new prefix in node1's kernel",
        Duration::from_secs(60),
        || route(&n1.netns, false, "10.255.255.0/24").is_some_and(|r| r["gateway"] == a2.as_str()),
    );
    let st = status(dir.path());
    assert_eq!(
        peer_state(&st, &a3.to_string()),
        "Established",
        "the new prefix came through while the stuck peer was still stalled: {st}"
    );
    assert!(
        route(&n2.netns, false, "10.244.1.0/26").is_some_and(|r| r["gateway"] == a1.as_str()),
        "Tessera's route in BIRD's kernel"
    );
    wait_for(
        "the stuck peer to be dropped at its hold time",
        Duration::from_secs(90),
        || state_of(&a3.to_string()) != "Established",
    );
    let st = status(dir.path());
    assert_eq!(peer_state(&st, &a2), "Established", "{st}");
    assert!(
        st["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["address"] == a2.as_str())
            .is_some_and(|p| p["last_reset"].is_null()),
        "the BIRD session never reset: {st}"
    );
    quit.store(true, Ordering::Relaxed);
    let _ = stuck.join();
    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}
