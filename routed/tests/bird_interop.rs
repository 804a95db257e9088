//! Tessera's speaker against BIRD 2 (Debian's bird2) in the test bed: iBGP and eBGP with a
//! 4-octet AS, IPv4 and IPv6, routes checked in BIRD and in both kernels, and a ping that
//! crosses on them.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tessera_testbed::Child;

mod common;
use common::*;

#[allow(clippy::too_many_arguments)]
fn bird_conf(
    dir: &Path,
    router: &str,
    local_as: u32,
    peer: &str,
    peer_as: u32,
    v4: &str,
    v6: &str,
    nh6: &str,
) -> String {
    format!(
        r#"router id {router};
log "{log}" all;
protocol device {{ scan time 10; }}
protocol kernel k4 {{ ipv4 {{ import none; export where proto = "peer"; }}; }}
protocol kernel k6 {{ ipv6 {{ import none; export where proto = "peer"; }}; }}
protocol static s4 {{ ipv4; route {v4} blackhole; }}
protocol static s6 {{ ipv6; route {v6} blackhole; }}
protocol bgp peer {{
  local {router} as {local_as};
  neighbor {peer} as {peer_as};
  direct;
  connect delay time 1;
  connect retry time 1;
  graceful restart on;
  ipv4 {{ import all; export where proto = "s4"; next hop self; }};
  ipv6 {{ import all; export where proto = "s6"; next hop address {nh6}; }};
}}
"#,
        log = dir.join("bird.log").display()
    )
}

/// The usual BIRD on node2 (`a2`, AS 64512): iBGP with Tessera on node1 (`a1`), announcing
/// 10.244.2.0/26 and fd10:244::2:0/122 (IPv6 next hop `a26`).
fn node2_bird_conf(dir: &Path, a1: &str, a2: &str, a26: &str) -> String {
    bird_conf(
        dir,
        a2,
        64512,
        a1,
        64512,
        "10.244.2.0/26",
        "fd10:244::2:0/122",
        a26,
    )
}

fn exchange_routes(test: &str, tessera_as: u32, bird_as: u32) {
    let (lab, dir, bdir) = two_nodes(test, false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    pods_on_lo(&lab);

    let bird = Bird::start(
        &n2.netns,
        &bdir,
        &bird_conf(
            &bdir,
            &a2,
            bird_as,
            &a1,
            tessera_as,
            "10.244.2.0/26",
            "fd10:244::2:0/122",
            &a26,
        ),
    );
    let mut routed = start_routed(
        &n1.netns,
        dir.path(),
        &routed_conf(
            dir.path(),
            tessera_as,
            &a1,
            &a16,
            &a2,
            bird_as,
            &["10.244.1.0/26", "fd10:244::1:0/122"],
        ),
    );

    // BIRD's routes in Tessera's kernel table, with Tessera's protocol.
    wait_for(
        "BIRD's IPv4 route in node1's kernel",
        Duration::from_secs(20),
        || route(&n1.netns, false, "10.244.2.0/26").is_some_and(|r| r["gateway"] == a2.as_str()),
    );
    let r = route(&n1.netns, false, "10.244.2.0/26").expect("route");
    assert_eq!(r["protocol"], "80", "{r}");
    wait_for(
        "BIRD's IPv6 route in node1's kernel",
        Duration::from_secs(10),
        || {
            route(&n1.netns, true, "fd10:244::2:0/122")
                .is_some_and(|r| r["gateway"] == a26.as_str())
        },
    );
    // Tessera's routes in BIRD and in node2's kernel.
    wait_for("Tessera's routes in BIRD", Duration::from_secs(10), || {
        let out = bird.birdc(&["show", "route", "protocol", "peer"]);
        out.contains("10.244.1.0/26") && out.contains("fd10:244::1:0/122")
    });
    wait_for(
        "Tessera's route in node2's kernel",
        Duration::from_secs(10),
        || route(&n2.netns, false, "10.244.1.0/26").is_some_and(|r| r["gateway"] == a1.as_str()),
    );
    let all = bird.birdc(&["show", "route", "all", "10.244.1.0/26"]);
    assert!(
        all.contains(
            &format!(
                "BGP.as_path: {}",
                if tessera_as == bird_as {
                    String::new()
                } else {
                    tessera_as.to_string()
                }
            )
            .trim_end()
            .to_string()
        ),
        "{all}"
    );
    if tessera_as != bird_as {
        assert!(
            all.contains(&tessera_as.to_string()),
            "4-octet AS in the path: {all}"
        );
    }
    // A ping crosses on the BGP routes.
    n1.netns
        .exec("ping", &["-c1", "-W2", "-I", "10.244.1.1", "10.244.2.1"])
        .expect("ping across the BGP routes");
    // Status.
    wait_for(
        "the status to count both prefixes",
        Duration::from_secs(5),
        || status(dir.path())["peers"][0]["prefixes_received"] == 2,
    );
    let st = status(dir.path());
    assert_eq!(st["peers"][0]["state"], "Established", "{st}");
    assert_eq!(st["peers"][0]["prefixes_sent"], 2, "{st}");
    assert_eq!(st["loc_rib"], 4, "{st}");

    // BIRD withdraws its IPv4 route: it leaves Tessera's kernel table.
    bird.birdc(&["disable", "s4"]);
    wait_for(
        "the withdrawal in node1's kernel",
        Duration::from_secs(10),
        || route(&n1.netns, false, "10.244.2.0/26").is_none(),
    );
    assert!(
        route(&n1.netns, true, "fd10:244::2:0/122").is_some(),
        "the IPv6 route stays"
    );

    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

/// node's IPv6 link-local address on eth0, once duplicate address detection is done.
fn link_local(ns: &tessera_testbed::Netns) -> String {
    let mut found = None;
    wait_for(
        "a usable link-local address",
        Duration::from_secs(10),
        || {
            let v = ns
                .ip_json(&["-6", "addr", "show", "dev", "eth0", "scope", "link"])
                .unwrap_or_default();
            // iproute2 lists an empty object for the filtered-out addresses.
            found = v[0]["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["tentative"].is_null())
                .find_map(|a| a["local"].as_str().map(str::to_string));
            found.is_some()
        },
    );
    found.expect("link-local address")
}

/// IPv6 only, the session over IPv6. `link_local`: BIRD's node has no global IPv6 address
/// and the session runs between the link-local addresses, so that both sides' next hops are
/// link-local (BIRD sends `::` and its link-local address; so does Tessera); else over the
/// global underlay addresses, where BIRD's next hop is global and link-local (32 octets).
fn exchange_ipv6_routes(test: &str, link_local_session: bool) {
    let (lab, dir, bdir) = two_nodes(test, false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    for (i, n) in lab.nodes.iter().enumerate() {
        let pod = format!("fd10:244::{}:1/128", i + 1);
        n.netns
            .ip(&["-6", "addr", "add", &pod, "dev", "lo"])
            .expect("pod address");
    }
    let (ll1, ll2) = (link_local(&n1.netns), link_local(&n2.netns));
    if link_local_session {
        n2.netns
            .ip(&["-6", "addr", "del", &format!("{a26}/64"), "dev", "eth0"])
            .expect("remove node2's global IPv6 address");
    }
    let neighbor = if link_local_session {
        format!("{ll1}%eth0")
    } else {
        a16.clone()
    };
    let local = if link_local_session {
        ll2.clone()
    } else {
        a26.clone()
    };
    let bird = Bird::start(
        &n2.netns,
        &bdir,
        &format!(
            r#"router id {a2};
log "{log}" all;
protocol device {{ scan time 10; }}
protocol kernel k6 {{ ipv6 {{ import none; export where proto = "peer"; }}; }}
protocol static s6 {{ ipv6; route fd10:244::2:0/122 blackhole; }}
protocol bgp peer {{
  local {local} as 64512;
  neighbor {neighbor} as 64512;
  direct;
  connect delay time 1;
  connect retry time 1;
  ipv6 {{ import all; export where proto = "s6"; next hop self; }};
}}
"#,
            log = bdir.join("bird.log").display()
        ),
    );
    let peer = if link_local_session {
        format!("\"{ll2}\", interface: eth0")
    } else {
        format!("\"{a26}\", localAddress: \"{a16}\"")
    };
    let next_hop_v6 = if link_local_session {
        String::new()
    } else {
        format!("nextHopV6: \"{a16}\"\n")
    };
    let conf = format!(
        "asn: 64512\nrouterId: {a1}\nlisten: \"{a16}\"\nconnectRetrySeconds: 1\nholdTime: 9\n{next_hop_v6}networks: [\"fd10:244::1:0/122\"]\nstatusSocket: {sock}\npeers:\n  - {{ address: {peer}, asn: 64512 }}\n",
        sock = dir.path().join("routed.sock").display()
    );
    let mut routed = start_routed(&n1.netns, dir.path(), &conf);

    let (via2, via1) = if link_local_session {
        (ll2.as_str(), ll1.as_str())
    } else {
        (a26.as_str(), a16.as_str())
    };
    wait_for(
        "BIRD's IPv6 route in node1's kernel",
        Duration::from_secs(30),
        || {
            route(&n1.netns, true, "fd10:244::2:0/122").is_some_and(|r| {
                r["gateway"] == via2 && r["dev"] == "eth0" && r["protocol"] == "80"
            })
        },
    );
    wait_for(
        "Tessera's IPv6 route in node2's kernel, through BIRD",
        Duration::from_secs(30),
        || {
            route(&n2.netns, true, "fd10:244::1:0/122")
                .is_some_and(|r| r["gateway"] == via1 && r["dev"] == "eth0")
        },
    );
    n1.netns
        .exec(
            "ping",
            &["-6", "-c1", "-W2", "-I", "fd10:244::1:1", "fd10:244::2:1"],
        )
        .expect("an IPv6 ping across the BGP routes");
    let st = status(dir.path());
    assert_eq!(st["peers"][0]["state"], "Established", "{st}");
    assert_eq!(
        (
            &st["peers"][0]["prefixes_sent"],
            &st["peers"][0]["prefixes_received"]
        ),
        (&1.into(), &1.into()),
        "{st}"
    );
    // IPv4 was not negotiated: nothing of it reached BIRD.
    let all = bird.birdc(&["show", "route", "protocol", "peer", "all"]);
    assert!(!all.contains("10.244."), "{all}");
    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

#[test]
fn ibgp_with_bird_ipv6_only_over_ipv6_transport() {
    exchange_ipv6_routes("bgp_v6", false);
}

#[test]
fn ibgp_with_bird_over_link_local_addresses_and_link_local_next_hops() {
    exchange_ipv6_routes("bgp_ll", true);
}

#[test]
fn ibgp_with_bird_ipv4_and_ipv6() {
    exchange_routes("bgp_ibgp", 64512, 64512);
}

#[test]
fn ebgp_with_bird_and_a_4_octet_as() {
    exchange_routes("bgp_ebgp", 4_200_000_001, 64600);
}

#[test]
fn graceful_restart_keeps_routes_and_traffic_while_tessera_restarts() {
    let (lab, dir, bdir) = two_nodes("bgp_gr", false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    pods_on_lo(&lab);
    let bird = Bird::start(&n2.netns, &bdir, &node2_bird_conf(&bdir, &a1, &a2, &a26));
    let conf = routed_conf(dir.path(), 64512, &a1, &a16, &a2, 64512, &["10.244.1.0/26"]);
    let mut routed = start_routed(&n1.netns, dir.path(), &conf);
    wait_for("routes both ways", Duration::from_secs(20), || {
        route(&n1.netns, false, "10.244.2.0/26").is_some()
            && route(&n2.netns, false, "10.244.1.0/26").is_some()
    });
    n2.netns
        .exec("ping", &["-c1", "-W2", "-I", "10.244.2.1", "10.244.1.1"])
        .expect("ping before");

    // kill -9: no NOTIFICATION, no withdrawal. BIRD keeps our route (stale) and our kernel
    // keeps BIRD's; traffic goes on. (Without our GR capability BIRD drops the route here:
    // checked by hand with gracefulRestartSeconds: 0.)
    routed.kill();
    wait_for(
        "BIRD to notice the session loss",
        Duration::from_secs(15),
        || {
            !bird
                .birdc(&["show", "protocols", "peer"])
                .contains("Established")
        },
    );
    assert!(
        route(&n2.netns, false, "10.244.1.0/26").is_some(),
        "BIRD kept the route during the restart"
    );
    assert!(bird
        .birdc(&["show", "route", "10.244.1.0/26"])
        .contains("10.244.1.0/26"));
    n2.netns
        .exec("ping", &["-c1", "-W2", "-I", "10.244.2.1", "10.244.1.1"])
        .expect("ping during the restart");

    // Restart: the session comes back, our kernel routes were never removed, and after
    // End-of-RIB everything is current again.
    let mut routed = start_routed(&n1.netns, dir.path(), &conf);
    wait_for("the session back", Duration::from_secs(20), || {
        bird.birdc(&["show", "protocols", "peer"])
            .contains("Established")
    });
    n2.netns
        .exec("ping", &["-c1", "-W2", "-I", "10.244.2.1", "10.244.1.1"])
        .expect("ping after");
    let r = route(&n1.netns, false, "10.244.2.0/26").expect("route kept across the restart");
    assert_eq!(r["protocol"], "80");

    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

/// BIRD's config for a route reflector with the given clients.
fn bird_rr_conf(dir: &Path, router: &str, clients: &[&str]) -> String {
    let mut c = format!(
        "router id {router};\nlog \"{}\" all;\nprotocol device {{ scan time 10; }}\nprotocol kernel k4 {{ ipv4 {{ import none; export none; }}; }}\n",
        dir.join("bird.log").display()
    );
    for (i, client) in clients.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp c{i} {{\n  local {router} as 64512;\n  neighbor {client} as 64512;\n  direct;\n  rr client;\n  rr cluster id {router};\n  connect delay time 1;\n  connect retry time 1;\n  ipv4 {{ import all; export all; }};\n}}\n"
        ));
    }
    c
}

#[test]
fn tessera_clients_of_a_bird_route_reflector() {
    let lab = one_subnet("bgp_bird_rr", 3, false);
    let addr = |i: usize| lab.nodes[i].ipv4.ip().to_string();
    let addr6 = |i: usize| lab.nodes[i].ipv6.ip().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let bdir = dir.path().join("bird");
    std::fs::create_dir_all(&bdir).expect("mkdir");
    let bird = Bird::start(
        &lab.nodes[0].netns,
        &bdir,
        &bird_rr_conf(&bdir, &addr(0), &[&addr(1), &addr(2)]),
    );
    let mut speakers = Vec::new();
    for (i, net) in [(1, "10.244.2.0/26"), (2, "10.244.3.0/26")] {
        let d = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        let conf = routed_conf(&d, 64512, &addr(i), &addr6(i), &addr(0), 64512, &[net]);
        speakers.push(start_routed(&lab.nodes[i].netns, &d, &conf));
    }
    // node3 learns node2's block through the reflector, with node2 as next hop.
    wait_for(
        "the reflected route on node3",
        Duration::from_secs(20),
        || {
            route(&lab.nodes[2].netns, false, "10.244.2.0/26")
                .is_some_and(|r| r["gateway"] == addr(1).as_str())
        },
    );
    wait_for(
        "the reflected route on node2",
        Duration::from_secs(10),
        || {
            route(&lab.nodes[1].netns, false, "10.244.3.0/26")
                .is_some_and(|r| r["gateway"] == addr(2).as_str())
        },
    );
    for mut s in speakers {
        s.stop(Duration::from_secs(2));
    }
    drop(bird);
    lab.finish();
}

#[test]
fn tessera_reflects_routes_between_bird_clients() {
    let lab = one_subnet("bgp_tessera_rr", 3, false);
    let addr = |i: usize| lab.nodes[i].ipv4.ip().to_string();
    let addr6 = |i: usize| lab.nodes[i].ipv6.ip().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = format!(
        "asn: 64512\nrouterId: {me}\nlisten: {me}\nconnectRetrySeconds: 1\nclusterId: {me}\nstatusSocket: {sock}\npeers:\n  - {{ address: {a}, asn: 64512, rrClient: true, localAddress: {me} }}\n  - {{ address: {b}, asn: 64512, rrClient: true, localAddress: {me} }}\n",
        me = addr(0),
        a = addr(1),
        b = addr(2),
        sock = dir.path().join("routed.sock").display()
    );
    let mut rr = start_routed(&lab.nodes[0].netns, dir.path(), &conf);
    let mut birds = Vec::new();
    for (i, v4, v6) in [
        (1, "10.244.2.0/26", "fd10:244::2:0/122"),
        (2, "10.244.3.0/26", "fd10:244::3:0/122"),
    ] {
        let d = dir.path().join(format!("bird{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        birds.push(Bird::start(
            &lab.nodes[i].netns,
            &d,
            &bird_conf(&d, &addr(i), 64512, &addr(0), 64512, v4, v6, &addr6(i)),
        ));
    }
    // BIRD on node3 has node2's block, reflected: next hop node2, ORIGINATOR_ID and
    // CLUSTER_LIST set by Tessera.
    wait_for(
        "the reflected route in node3's BIRD",
        Duration::from_secs(20),
        || {
            birds[1]
                .birdc(&["show", "route", "10.244.2.0/26"])
                .contains("10.244.2.0/26")
        },
    );
    let all = birds[1].birdc(&["show", "route", "all", "10.244.2.0/26"]);
    assert!(all.contains(&format!("BGP.next_hop: {}", addr(1))), "{all}");
    assert!(
        all.contains(&format!("BGP.originator_id: {}", addr(1))),
        "{all}"
    );
    assert!(
        all.contains(&format!("BGP.cluster_list: {}", addr(0))),
        "{all}"
    );
    wait_for(
        "the reflected route in node3's kernel",
        Duration::from_secs(10),
        || {
            route(&lab.nodes[2].netns, false, "10.244.2.0/26")
                .is_some_and(|r| r["gateway"] == addr(1).as_str())
        },
    );
    rr.stop(Duration::from_secs(2));
    drop(birds);
    lab.finish();
}

/// TCP payload bytes sent by `from` (IPv4) in a pcap file, per connection (keyed by the
/// port pair), in capture order.
fn tcp_streams_from(pcap: &[u8], from: std::net::Ipv4Addr) -> Vec<Vec<u8>> {
    let mut out: Vec<((u16, u16), Vec<u8>)> = Vec::new();
    let mut at = 24; // global header
    while at + 16 <= pcap.len() {
        let incl =
            u32::from_le_bytes([pcap[at + 8], pcap[at + 9], pcap[at + 10], pcap[at + 11]]) as usize;
        let frame = &pcap[at + 16..(at + 16 + incl).min(pcap.len())];
        at += 16 + incl;
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[9] != 6 || ip[12..16] != from.octets() || total > ip.len() {
            continue;
        }
        let tcp = &ip[ihl..total];
        let off = usize::from(tcp[12] >> 4) * 4;
        let ports = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        match out.iter_mut().find(|(p, _)| *p == ports) {
            Some((_, v)) => v.extend_from_slice(&tcp[off..]),
            None => out.push((ports, tcp[off..].to_vec())),
        }
    }
    out.into_iter().map(|(_, v)| v).collect()
}

#[test]
fn bird_messages_decode_and_reencode_byte_for_byte() {
    use tessera_routed::packet::{decode, encode, frame, Ctx, Message};
    let (lab, dir, bdir) = two_nodes("bgp_golden", false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    let pcap = dir.path().join("bgp.pcap");
    // tcpdump on node2's underlay, as the capture the issue asks for.
    let mut cmd = n2.netns.command("tcpdump");
    cmd.args([
        "-i",
        "eth0",
        "--immediate-mode",
        "-U",
        "-s",
        "0",
        "-w",
        &pcap.to_string_lossy(),
        "tcp port 179",
    ]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut dump = Child::spawn(cmd, "tcpdump").expect("tcpdump");
    // Start the peers only once tcpdump says it listens.
    {
        use std::io::BufRead;
        let err = dump.take_stderr().expect("tcpdump stderr");
        let mut line = String::new();
        std::io::BufReader::new(err)
            .read_line(&mut line)
            .expect("tcpdump started");
        assert!(line.contains("listening"), "tcpdump: {line}");
    }
    let bird = Bird::start(&n2.netns, &bdir, &node2_bird_conf(&bdir, &a1, &a2, &a26));
    let mut routed = start_routed(
        &n1.netns,
        dir.path(),
        &routed_conf(dir.path(), 64512, &a1, &a16, &a2, 64512, &["10.244.1.0/26"]),
    );
    wait_for("both routes from BIRD", Duration::from_secs(20), || {
        route(&n1.netns, false, "10.244.2.0/26").is_some()
            && route(&n1.netns, true, "fd10:244::2:0/122").is_some()
    });
    std::thread::sleep(Duration::from_millis(300));
    dump.stop(Duration::from_secs(2));
    let bytes = std::fs::read(&pcap).expect("pcap");
    let ctx = Ctx {
        four_octet_as: true,
        extended_message: false,
    };
    let mut seen = Vec::new();
    for stream in tcp_streams_from(&bytes, n2.ipv4.ip()) {
        let mut at = 0;
        while let Ok(Some(len)) = frame(&stream[at..]) {
            let raw = &stream[at..at + len];
            at += len;
            let m = decode(raw, ctx).unwrap_or_else(|e| panic!("BIRD's {raw:02x?}: {e}"));
            assert_eq!(encode(&m, ctx).as_ref(), raw, "re-encoding {m:?}");
            seen.push(m);
        }
    }
    eprintln!(
        "decoded {} messages from BIRD ({} bytes of capture)",
        seen.len(),
        bytes.len()
    );
    // What BIRD sent: its OPEN (AS 64512, 4-octet AS, MP IPv4 and IPv6, GR), and UPDATEs
    // carrying its IPv4 and IPv6 blocks with the expected next hops.
    let open = seen.iter().find_map(|m| match m {
        Message::Open(o) => Some(o.clone()),
        _ => None,
    });
    let open = open.expect("BIRD's OPEN captured");
    assert_eq!(open.asn(), 64512);
    assert_eq!(open.bgp_id, n2.ipv4.ip());
    let announced: Vec<String> = seen
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u.announced()),
            _ => None,
        })
        .flatten()
        .map(|n| n.to_string())
        .collect();
    assert!(
        announced.contains(&"10.244.2.0/26".to_string()),
        "{announced:?}"
    );
    assert!(
        announced.contains(&"fd10:244::2:0/122".to_string()),
        "{announced:?}"
    );
    assert!(seen.iter().any(|m| matches!(m, Message::Keepalive)));
    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

#[test]
fn md5_passwords_must_match() {
    let (lab, dir, bdir) = two_nodes("bgp_md5", false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    let conf = node2_bird_conf(&bdir, &a1, &a2, &a26)
        .replace("  direct;\n", "  direct;\n  password \"s3cret\";\n");
    let bird = Bird::start(&n2.netns, &bdir, &conf);
    let with = |pw: &str| {
        routed_conf(dir.path(), 64512, &a1, &a16, &a2, 64512, &["10.244.1.0/26"]).replace(
            &format!("localAddress: {a1} }}"),
            &format!("localAddress: {a1}, password: {pw} }}"),
        )
    };
    // A wrong password: the kernels drop every segment, the session never comes up.
    let mut wrong = start_routed(&n1.netns, dir.path(), &with("wrong"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !bird
            .birdc(&["show", "protocols", "peer"])
            .contains("Established"),
        "a wrong password must not connect"
    );
    assert!(route(&n1.netns, false, "10.244.2.0/26").is_none());
    wrong.stop(Duration::from_secs(2));
    // The right one: up, routes exchanged.
    let mut right = start_routed(&n1.netns, dir.path(), &with("s3cret"));
    wait_for(
        "the session with the right password",
        Duration::from_secs(20),
        || route(&n1.netns, false, "10.244.2.0/26").is_some(),
    );
    assert!(bird
        .birdc(&["show", "protocols", "peer"])
        .contains("Established"));
    right.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

#[test]
fn bfd_with_frr_detects_a_dead_peer_long_before_the_hold_time() {
    let (lab, dir, bdir) = two_nodes("bgp_bfd", false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    // BGP with BIRD (no graceful restart: a dead peer's routes must go), BFD with FRR's bfdd.
    let conf = node2_bird_conf(&bdir, &a1, &a2, &a26).replace("  graceful restart on;\n", "");
    let bird = Bird::start(&n2.netns, &bdir, &conf);
    let _bfdd = start_bfdd(&n2.netns, dir.path(), &a2, &a1);

    // Hold time 90 s: only BFD can bring the session down within seconds.
    let conf = routed_conf(dir.path(), 64512, &a1, &a16, &a2, 64512, &["10.244.1.0/26"])
        .replace("holdTime: 9", "holdTime: 90")
        .replace(
            &format!("localAddress: {a1} }}"),
            &format!("localAddress: {a1}, bfd: true }}"),
        );
    let mut routed = start_routed(&n1.netns, dir.path(), &conf);
    wait_for("BGP routes and BFD Up", Duration::from_secs(20), || {
        route(&n1.netns, false, "10.244.2.0/26").is_some()
            && status(dir.path())["peers"][0]["bfd"] == "Up"
    });

    // node2 drops off the network (its link goes down: no NOTIFICATION, no FIN).
    n2.netns
        .ip(&["link", "set", "eth0", "down"])
        .expect("link down");
    wait_for(
        "BFD Down and the route withdrawn, well before the 90 s hold time",
        Duration::from_secs(10),
        || {
            status(dir.path())["peers"][0]["bfd"] == "Down"
                && route(&n1.netns, false, "10.244.2.0/26").is_none()
        },
    );
    assert_ne!(status(dir.path())["peers"][0]["state"], "Established");

    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

#[test]
fn external_peers_come_from_bgppeer_resources_in_the_datastore() {
    let (lab, dir, bdir) = two_nodes("bgp_external", true);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, _, a26] = addresses(&lab);
    // BIRD plays a top-of-rack router in AS 65001.
    let bird = Bird::start(
        &n2.netns,
        &bdir,
        &bird_conf(
            &bdir,
            &a2,
            65001,
            &a1,
            64512,
            "10.244.9.0/24",
            "fd10:244::9:0/122",
            &a26,
        ),
    );
    let node = serde_json::json!({ "name": "node1", "ipv4Address": n1.ipv4.to_string(), "labels": { "rack": "r1" } });
    lab.etcdctl(&["put", "/tessera/v1/nodes/node1", &node.to_string()])
        .expect("node");
    // The ToR also runs BFD (FRR's bfdd); the resource asks for it.
    let _bfdd = start_bfdd(&n2.netns, dir.path(), &a2, &a1);
    let peer = serde_json::json!({ "name": "tor", "peerIp": a2, "asNumber": 65001, "nodeSelector": "rack == \"r1\"", "bfd": true });
    lab.etcdctl(&["put", "/tessera/v1/config/bgppeers/tor", &peer.to_string()])
        .expect("bgppeer");

    let conf = dir.path().join("routed.yaml");
    std::fs::write(&conf, format!("asn: 64512\nrouterId: {a1}\nlisten: {a1}\nconnectRetrySeconds: 1\nnetworks: [\"10.244.1.0/26\"]\nstatusSocket: {}\n", dir.path().join("routed.sock").display())).expect("conf");
    let log = std::fs::File::create(dir.path().join("routed.log")).expect("log");
    let mut cmd = n1.netns.command(ROUTED);
    cmd.args([
        "run",
        "--config",
        &conf.to_string_lossy(),
        "--etcd",
        &lab.etcd_endpoint(),
        "--node",
        "node1",
    ]);
    cmd.stdout(Stdio::null()).stderr(log);
    let mut routed = Child::spawn(cmd, "tessera-routed").expect("spawn");

    wait_for(
        "the ToR's route, over eBGP",
        Duration::from_secs(20),
        || route(&n1.netns, false, "10.244.9.0/24").is_some_and(|r| r["gateway"] == a2.as_str()),
    );
    wait_for("our block at the ToR", Duration::from_secs(10), || {
        bird.birdc(&["show", "route", "10.244.1.0/26"])
            .contains("10.244.1.0/26")
    });
    wait_for(
        "BFD Up with the peer from the datastore",
        Duration::from_secs(10),
        || status(dir.path())["peers"][0]["bfd"] == "Up",
    );
    // The resource goes: the peering goes, and so does the route.
    lab.etcdctl(&["del", "/tessera/v1/config/bgppeers/tor"])
        .expect("delete bgppeer");
    wait_for("the ToR unpeered", Duration::from_secs(10), || {
        route(&n1.netns, false, "10.244.9.0/24").is_none()
    });

    routed.stop(Duration::from_secs(2));
    drop(bird);
    lab.finish();
}

#[test]
fn ecmp_installs_every_equal_path_in_the_kernel() {
    let lab = one_subnet("bgp_ecmp", 3, false);
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = |i: usize| lab.nodes[i].ipv4.ip().to_string();
    let ip6 = |i: usize| lab.nodes[i].ipv6.ip().to_string();
    let (a1, a16) = (ip(0), ip6(0));
    // node2 and node3 both announce 10.244.9.0/24 with equal attributes (iBGP, next hop self).
    // No graceful restart (BIRD then only says it is GR-aware, preserving no family): a BIRD
    // that stops takes its path with it at once.
    let mut birds: Vec<Bird> = [1, 2]
        .iter()
        .map(|&i| {
            let bdir = dir.path().join(format!("bird{i}"));
            std::fs::create_dir_all(&bdir).expect("mkdir");
            let conf = bird_conf(
                &bdir,
                &ip(i),
                64512,
                &a1,
                64512,
                "10.244.9.0/24",
                "fd10:244::9:0/122",
                &ip6(i),
            )
            .replace("  graceful restart on;\n", "");
            Bird::start(&lab.nodes[i].netns, &bdir, &conf)
        })
        .collect();
    let conf = routed_conf(
        dir.path(),
        64512,
        &a1,
        &a16,
        &ip(1),
        64512,
        &["10.244.1.0/26"],
    ) + &format!(
        "  - {{ address: {}, asn: 64512, localAddress: {a1} }}\necmp: true\n",
        ip(2)
    );
    let mut routed = start_routed(&lab.nodes[0].netns, dir.path(), &conf);
    let hops = |r: &serde_json::Value| -> Vec<String> {
        r["nexthops"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["gateway"].as_str().map(String::from))
            .collect()
    };
    wait_for(
        "a route with both next hops",
        Duration::from_secs(20),
        || {
            route(&lab.nodes[0].netns, false, "10.244.9.0/24").is_some_and(|r| {
                let mut h = hops(&r);
                h.sort();
                h == [ip(1), ip(2)]
            })
        },
    );
    // One path goes: a single next hop is left.
    drop(birds.pop());
    wait_for("the remaining next hop", Duration::from_secs(20), || {
        route(&lab.nodes[0].netns, false, "10.244.9.0/24")
            .is_some_and(|r| hops(&r).is_empty() && r["gateway"] == ip(1).as_str())
    });
    routed.stop(Duration::from_secs(2));
    drop(birds);
    lab.finish();
}
