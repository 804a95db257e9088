//! Tessera's speaker against FRR's bgpd, run with zebra as a router runs it (Debian's frr), in
//! the test bed: IPv4 only, dual stack, iBGP and eBGP with a 4-octet AS, TCP MD5. Routes are
//! checked in both kernels, and each session must hold: no reset at all (issue 13: an IPv6
//! End-of-RIB sent to an IPv4-only FRR peer got NOTIFICATION 3/9 and a flap every second).

use std::time::Duration;

mod common;
use common::*;

struct Case {
    test: &'static str,
    tessera_as: u32,
    frr_as: u32,
    ipv4: bool,
    ipv6: bool,
    password: Option<&'static str>,
    /// The session over the IPv6 underlay addresses (else IPv4).
    ipv6_transport: bool,
}

/// FRR's configuration: `a1` is Tessera's session address, `a2` FRR's router id.
fn bgpd_conf(c: &Case, a1: &str, a2: &str) -> String {
    let mut s = format!(
        "frr defaults traditional\nhostname node2\n!\nrouter bgp {}\n bgp router-id {a2}\n no bgp ebgp-requires-policy\n no bgp network import-check\n no bgp default ipv4-unicast\n neighbor {a1} remote-as {}\n neighbor {a1} timers connect 1\n",
        c.frr_as, c.tessera_as
    );
    if let Some(pw) = c.password {
        s.push_str(&format!(" neighbor {a1} password {pw}\n"));
    }
    if c.ipv4 {
        s.push_str(&format!(" address-family ipv4 unicast\n  network 10.244.2.0/26\n  neighbor {a1} activate\n exit-address-family\n"));
    }
    if c.ipv6 {
        s.push_str(&format!(" address-family ipv6 unicast\n  network fd10:244::2:0/122\n  neighbor {a1} activate\n exit-address-family\n"));
    }
    s.push_str("!\n");
    s
}

fn exchange_routes_with_frr(c: Case) {
    let (lab, dir, _) = two_nodes(c.test, false);
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let [a1, a2, a16, a26] = addresses(&lab);
    pods_on_lo(&lab);
    // The session's addresses: IPv4, or the IPv6 underlay.
    let (s1, s2) = if c.ipv6_transport {
        (&a16, &a26)
    } else {
        (&a1, &a2)
    };
    let frr = Frr::start(&n2.netns, dir.path(), &bgpd_conf(&c, s1, &a2));
    // Tessera originates both families whatever the peer negotiates.
    let mut conf = routed_conf(
        dir.path(),
        c.tessera_as,
        &a1,
        &a16,
        s2,
        c.frr_as,
        &["10.244.1.0/26", "fd10:244::1:0/122"],
    );
    if c.ipv6_transport {
        conf = conf
            .replace(&format!("listen: {a1}\n"), &format!("listen: \"{a16}\"\n"))
            .replace(
                &format!("localAddress: {a1} }}"),
                &format!("localAddress: \"{a16}\" }}"),
            );
    }
    if let Some(pw) = c.password {
        conf = conf.replace(" }\n", &format!(", password: {pw} }}\n"));
    }
    let mut routed = start_routed(&n1.netns, dir.path(), &conf);

    let both_ways = |v6: bool, theirs: &str, ours: &str, via2: &str, via1: &str| {
        wait_for(
            &format!("FRR's {theirs} in node1's kernel"),
            Duration::from_secs(30),
            || {
                route(&n1.netns, v6, theirs)
                    .is_some_and(|r| r["gateway"] == via2 && r["protocol"] == "80")
            },
        );
        wait_for(
            &format!("Tessera's {ours} in node2's kernel, through zebra"),
            Duration::from_secs(30),
            || route(&n2.netns, v6, ours).is_some_and(|r| r["gateway"] == via1),
        );
    };
    if c.ipv4 {
        both_ways(false, "10.244.2.0/26", "10.244.1.0/26", &a2, &a1);
        n1.netns
            .exec("ping", &["-c1", "-W2", "-I", "10.244.1.1", "10.244.2.1"])
            .expect("ping across the BGP routes");
    }
    if c.ipv6 {
        both_ways(true, "fd10:244::2:0/122", "fd10:244::1:0/122", &a26, &a16);
    }
    // The session holds: three hold-time thirds later, still Established and never reset;
    // nothing of a family that was not negotiated reached FRR's kernel.
    std::thread::sleep(Duration::from_secs(4));
    let st = status(dir.path());
    let log = frr.bgpd_log();
    assert_eq!(st["peers"][0]["state"], "Established", "{st}\n{log}");
    assert_eq!(
        st["peers"][0]["address"],
        s2.as_str(),
        "the session's transport: {st}"
    );
    // Held through the whole window (a connection collision while both sides first connect
    // may reset an attempt before that; an UPDATE error never).
    assert!(
        st["peers"][0]["uptime_seconds"]
            .as_u64()
            .is_some_and(|u| u >= 4),
        "the session was reset: {st}\n{log}"
    );
    assert!(
        !st["peers"][0]["last_reset"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("NOTIFICATION 3/"),
        "an UPDATE error: {st}\n{log}"
    );
    let sent = usize::from(c.ipv4) + usize::from(c.ipv6);
    assert_eq!(st["peers"][0]["prefixes_sent"], sent, "{st}");
    assert_eq!(st["peers"][0]["prefixes_received"], sent, "{st}");
    if !c.ipv6 {
        assert!(route(&n2.netns, true, "fd10:244::1:0/122").is_none());
    }
    routed.stop(Duration::from_secs(2));
    drop(frr);
    lab.finish();
}

#[test]
fn ibgp_with_frr_ipv4_only() {
    exchange_routes_with_frr(Case {
        test: "frr_ibgp4",
        ipv6_transport: false,
        tessera_as: 64512,
        frr_as: 64512,
        ipv4: true,
        ipv6: false,
        password: None,
    });
}

#[test]
fn ebgp_with_frr_dual_stack_and_a_4_octet_as() {
    exchange_routes_with_frr(Case {
        test: "frr_ebgp",
        ipv6_transport: false,
        tessera_as: 4_200_000_001,
        frr_as: 65002,
        ipv4: true,
        ipv6: true,
        password: None,
    });
}

#[test]
fn ibgp_with_frr_and_tcp_md5() {
    exchange_routes_with_frr(Case {
        test: "frr_md5",
        ipv6_transport: false,
        tessera_as: 64512,
        frr_as: 64512,
        ipv4: true,
        ipv6: true,
        password: Some("s3cret"),
    });
}

#[test]
fn ibgp_with_frr_ipv6_only_over_ipv6_transport() {
    exchange_routes_with_frr(Case {
        test: "frr_ibgp6",
        ipv6_transport: true,
        tessera_as: 64512,
        frr_as: 64512,
        ipv4: false,
        ipv6: true,
        password: None,
    });
}
