//! A hostile peer sends each class of malformed message to a running speaker (on loopback):
//! the NOTIFICATION RFC 4271 §6 names comes back, and another session stays up throughout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::{connect_from, free_port, spawn_speaker};

const MARKER: [u8; 16] = [0xff; 16];

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = MARKER.to_vec();
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(ty);
    m.extend_from_slice(body);
    m
}

fn open(version: u8, asn: u16, hold: u16, id: [u8; 4]) -> Vec<u8> {
    let mut b = vec![version];
    b.extend_from_slice(&asn.to_be_bytes());
    b.extend_from_slice(&hold.to_be_bytes());
    b.extend_from_slice(&id);
    // Capabilities: MP IPv4 unicast, 4-octet AS.
    let caps = [1u8, 4, 0, 1, 0, 1, 65, 4, 0, 0, (asn >> 8) as u8, asn as u8];
    b.push(caps.len() as u8 + 2);
    b.push(2);
    b.push(caps.len() as u8);
    b.extend_from_slice(&caps);
    msg(1, &b)
}

/// Reads messages until a NOTIFICATION arrives; returns (code, subcode).
fn read_notification(s: &mut TcpStream) -> Option<(u8, u8)> {
    read_notification_within(s, Duration::from_secs(5))
}

fn read_notification_within(s: &mut TcpStream, wait: Duration) -> Option<(u8, u8)> {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        while buf.len() >= 19 {
            let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
            if buf.len() < len {
                break;
            }
            let m: Vec<u8> = buf.drain(..len).collect();
            if m[18] == 3 {
                return Some((m[19], m[20]));
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return None,
        }
    }
    None
}

/// Opens a session as the hostile peer and returns the stream once Established.
fn establish(to: SocketAddr) -> TcpStream {
    let mut s = connect_from("127.0.0.2", to, None);
    s.write_all(&open(4, 64512, 90, [127, 0, 0, 2]))
        .expect("send OPEN");
    s.write_all(&msg(4, &[])).expect("send KEEPALIVE");
    s
}

/// (what, sent after the session is up, the bytes, the NOTIFICATION code/subcode expected)
type Case = (&'static str, bool, Vec<u8>, (u8, u8));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_the_right_notification_and_other_sessions_stay_up() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("routed.sock");
    let (stop_tx, speaker) = spawn_speaker(&format!(
        "asn: 64512\nrouterId: 127.0.0.1\nlisten: 127.0.0.1\nlistenPort: {port}\nconnectRetrySeconds: 1\nstatusSocket: {}\nnetworks: [10.244.1.0/26]\npeers:\n  - {{ address: 127.0.0.2, asn: 64512, passive: true }}\n  - {{ address: 127.0.0.3, asn: 64512, passive: true }}\n",
        sock.display()
    ));
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let sock_path = sock.to_string_lossy().into_owned();

    let results = tokio::task::spawn_blocking(move || {
        // A well-behaved peer (hold time 0: no keepalives needed) that must stay up.
        let mut good = connect_from("127.0.0.3", to, None);
        good.write_all(&open(4, 64512, 0, [127, 0, 0, 3]))
            .expect("good OPEN");
        good.write_all(&msg(4, &[])).expect("good KEEPALIVE");

        let update = |body: &str| {
            let b: Vec<u8> = (0..body.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&body[i..i + 2], 16).expect("hex"))
                .collect();
            msg(2, &b)
        };
        let mut bad_marker = msg(4, &[]);
        bad_marker[0] = 0;
        let mut bad_length = msg(4, &[]);
        bad_length[17] = 5;
        let cases: Vec<Case> = vec![
            ("bad marker", true, bad_marker, (1, 1)),
            ("bad length", true, bad_length, (1, 2)),
            ("bad type", true, msg(9, &[]), (1, 3)),
            (
                "unsupported version",
                false,
                open(3, 64512, 90, [127, 0, 0, 2]),
                (2, 1),
            ),
            (
                "bad hold time",
                false,
                open(4, 64512, 1, [127, 0, 0, 2]),
                (2, 6),
            ),
            (
                "bad peer AS",
                false,
                open(4, 65001, 90, [127, 0, 0, 2]),
                (2, 2),
            ),
            ("UPDATE before OPEN", false, update("00000000"), (5, 1)),
            (
                "malformed attribute list",
                true,
                update("0000000440010500"),
                (3, 1),
            ),
            (
                "bad NLRI length",
                true,
                update("00000000210a00000000"),
                (3, 10),
            ),
            (
                "unrecognised well-known attribute",
                true,
                update("00000003406300"),
                (3, 2),
            ),
        ];
        let mut got = Vec::new();
        for (name, after_open, bytes, want) in cases {
            let mut s = if after_open {
                establish(to)
            } else {
                connect_from("127.0.0.2", to, None)
            };
            if after_open {
                // Wait until Tessera's KEEPALIVE shows the session up, then misbehave.
                std::thread::sleep(Duration::from_millis(200));
            }
            s.write_all(&bytes).expect("send");
            got.push((name, read_notification(&mut s), want));
        }
        (got, good)
    })
    .await
    .expect("client thread");
    let (got, _good) = results;
    for (name, notification, want) in &got {
        assert_eq!(notification.as_ref(), Some(want), "{name}");
    }
    let status = tessera_routed::speaker::query_status(&sock_path)
        .await
        .expect("status");
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    let good = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["address"] == "127.0.0.3")
        .expect("good peer")
        .clone();
    assert_eq!(
        good["state"], "Established",
        "the other session stayed up: {v}"
    );
    let _ = stop_tx.send(());
    speaker.await.expect("join").expect("speaker ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_gets_hold_timer_expired() {
    let port = free_port();
    let (stop_tx, speaker) = spawn_speaker(&format!(
        "asn: 64512\nrouterId: 127.0.0.1\nlisten: 127.0.0.1\nlistenPort: {port}\nholdTime: 3\npeers:\n  - {{ address: 127.0.0.2, asn: 64512, passive: true }}\n",
    ));
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let got = tokio::task::spawn_blocking(move || {
        // OPEN with hold time 3 and one KEEPALIVE, then silence.
        let mut s = connect_from("127.0.0.2", to, None);
        s.write_all(&open(4, 64512, 3, [127, 0, 0, 2]))
            .expect("OPEN");
        s.write_all(&msg(4, &[])).expect("KEEPALIVE");
        read_notification_within(&mut s, Duration::from_secs(10))
    })
    .await
    .expect("client");
    assert_eq!(got, Some((4, 0)), "HOLD TIMER EXPIRED");
    let _ = stop_tx.send(());
    speaker.await.expect("join").expect("speaker ran");
}
