//! Peer oscillation damping on the wire (RFC 4271 §8.1.1): a peer that answers every OPEN
//! with a NOTIFICATION sees our connection attempts come further and further apart; after a
//! session that stayed up (stable), they come quickly again. The status says why.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, spawn_speaker};
use tessera_routed::packet::{encode, Capability, Ctx, Message, Notification, Open};

fn open() -> Vec<u8> {
    let o = Open {
        version: 4,
        my_as: 65002,
        hold_time: 3,
        bgp_id: Ipv4Addr::new(127, 0, 0, 2),
        capabilities: vec![Capability::FourOctetAs(65002)],
    };
    encode(&Message::Open(o), Ctx::default()).to_vec()
}

fn cease() -> Vec<u8> {
    let n = Notification {
        code: 6,
        subcode: 0,
        data: vec![],
    };
    encode(&Message::Notification(n), Ctx::default()).to_vec()
}

fn keepalive() -> Vec<u8> {
    encode(&Message::Keepalive, Ctx::default()).to_vec()
}

/// Waits for the speaker's next connection; reads its OPEN.
fn next_attempt(l: &TcpListener) -> (TcpStream, Instant) {
    let (mut s, _) = l.accept().expect("accept");
    let at = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut open = [0u8; 19];
    s.read_exact(&mut open).expect("the speaker's OPEN header");
    let len = usize::from(u16::from_be_bytes([open[16], open[17]]));
    let mut rest = vec![0u8; len - 19];
    s.read_exact(&mut rest).expect("the speaker's OPEN");
    (s, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_attempts_to_a_flapping_peer_spread_out_and_come_back_after_a_stable_session() {
    let peer = TcpListener::bind("127.0.0.2:0").expect("listen");
    let peer_port = peer.local_addr().expect("addr").port();
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir
        .path()
        .join("routed.sock")
        .to_string_lossy()
        .into_owned();
    let (stop_tx, speaker) = spawn_speaker(&format!(
        "asn: 64512\nrouterId: 127.0.0.1\nlisten: 127.0.0.1\nlistenPort: {port}\nholdTime: 3\nconnectRetrySeconds: 1\nidleHoldMaxSeconds: 4\nstableAfterSeconds: 2\nstatusSocket: {sock}\npeers:\n  - {{ address: 127.0.0.2, asn: 65002, port: {peer_port} }}\n"
    ));
    let sock2 = sock.clone();
    let (gaps, after_stable, reason) = tokio::task::spawn_blocking(move || {
        // Five attempts, each answered with OPEN then a NOTIFICATION (Cease).
        let mut times = Vec::new();
        for _ in 0..5 {
            let (mut s, at) = next_attempt(&peer);
            s.write_all(&open()).expect("open");
            s.write_all(&cease()).expect("cease");
            times.push(at);
        }
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        let reason = {
            let mut s = std::os::unix::net::UnixStream::connect(&sock2).expect("status");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("status");
            out
        };
        // Then a session that stays up past stableAfterSeconds, and one more flap.
        let (mut s, _) = next_attempt(&peer);
        s.write_all(&open()).expect("open");
        s.write_all(&keepalive()).expect("keepalive");
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(800));
            s.write_all(&keepalive()).expect("keepalive");
        }
        s.write_all(&cease()).expect("cease");
        let down = Instant::now();
        let (_s, at) = next_attempt(&peer);
        (gaps, at - down, reason)
    })
    .await
    .expect("peer");
    eprintln!("gaps between attempts: {gaps:?}; after a stable session: {after_stable:?}");
    // 1, 2, 4, 4 s (the cap): each at least the one before, and the last well above the first.
    assert!(
        gaps.windows(2)
            .all(|w| w[1] + Duration::from_millis(300) >= w[0]),
        "{gaps:?}"
    );
    assert!(gaps[2] > gaps[0] * 2, "{gaps:?}");
    assert!(
        after_stable < gaps[2],
        "back to a short wait: {after_stable:?} vs {gaps:?}"
    );
    assert!(
        reason.contains("NOTIFICATION 6/0"),
        "the status says why: {reason}"
    );
    let _ = stop_tx.send(());
    speaker.await.expect("join").expect("speaker ran");
}
