//! IPIP through the real agent: three QEMU guests booting Debian's kernel (this development
//! kernel has no ipip module), two on one underlay subnet and one on another, each running
//! `tessera-node` with its in-process BGP speaker and wiring pods through the real CNI
//! plugin (see `tessera_testbed::vm_cluster`). One pool, switched live from `ipipMode:
//! Always` to `CrossSubnet` to `Never` while a TCP connection between two pods stays open;
//! tcpdump on the router's bridges shows what is encapsulated at each step.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tessera_testbed::vm_cluster::{VmCluster, IP, OUTSIDE};

fn pool(mode: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: ipip }}\nspec: {{ cidr: 10.244.48.0/20, blockSize: 26, ipipMode: {mode}, natOutgoing: true }}\n"
    )
}

/// The /26 block an address of this pool is in.
fn block_of(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3] & 0xc0)
}

/// Polls `cond` (a guest's view that converges after a change) until it holds.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<bool, String>) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match cond() {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => last = e,
        }
        assert!(Instant::now() < deadline, "{what}: never happened ({last})");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Guest `g`'s route to `block`, as `ip route show` prints it.
fn route(c: &VmCluster, g: usize, block: &str) -> String {
    c.sh_ok(g, &format!("{IP} route show {block}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn ipip_pools_through_the_real_agent_in_three_vms() {
    tessera_testbed::require_root();
    let mut c = VmCluster::new("ipip_vms", &pool("Always")).expect("VM cluster");
    // One pod per guest: vm1 and vm2 share subnet 198.18.10.0/24, vm3 is on 198.18.11.0/24.
    for g in 0..3 {
        if let Err(e) = c.add_pod(g, "ipip") {
            panic!("{e:#}\n{}", c.agent_log(g));
        }
    }
    let ips: Vec<Ipv4Addr> = c.pods.iter().map(|p| p.ip).collect();
    let (a, b, far) = (0, 1, 2);

    // Always: tunl0 on every guest, MTU 1480 written for the CNI plugin and on the pods.
    for g in 0..3 {
        let tunl0 = c
            .sh_ok(
                g,
                &format!("{IP} -o link show tunl0; {IP} -o addr show dev tunl0"),
            )
            .unwrap();
        assert!(
            tunl0.contains("mtu 1480") && tunl0.contains("inet 10.244."),
            "{tunl0}"
        );
        assert_eq!(
            c.sh_ok(g, "cat /var/lib/tessera/mtu").unwrap().trim(),
            "1480"
        );
    }
    for p in 0..3 {
        let eth0 = c.pod_sh(p, &format!("{IP} -o link show eth0")).unwrap();
        assert!(eth0.text.contains("mtu 1480"), "{}", eth0.text);
    }
    for p in 0..3 {
        for (q, &to) in ips.iter().enumerate() {
            if p != q {
                assert!(
                    c.wait_ping(p, to, Duration::from_secs(60)).is_some(),
                    "Always: {} -> {to}\n{}",
                    c.pods[p].name,
                    c.agent_log(c.pods[p].guest)
                );
            }
        }
    }
    // Encapsulated even within a subnet, and a full 1480-octet packet fits the tunnel.
    let (seen, ping) = c
        .capture("br1", "ip proto 4", 2, || {
            c.pod_sh(a, &format!("ping -c 1 -s 1452 {}", ips[b]))
        })
        .unwrap();
    assert!(ping.unwrap().success(), "1480-octet ping over tunl0");
    let outer = format!("198.18.10.11 > 198.18.10.12: IP {} > {}", ips[a], ips[b]);
    assert!(
        seen.iter().any(|l| l.contains(&outer)),
        "Always, same subnet: protocol 4 on the underlay: {seen:?}"
    );

    // natOutgoing: the outside host has no route to pods; it sees the node's address.
    let (seen, ping) = c.capture("out0", "icmp", 1, || c.ping(a, OUTSIDE)).unwrap();
    assert!(ping.is_some(), "natOutgoing: pod -> {OUTSIDE}");
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("198.18.10.11 > {OUTSIDE}"))),
        "masqueraded to the node's address: {seen:?}"
    );

    // Drift: someone strips tunl0's address and takes it down; the agent puts it back.
    c.sh_ok(
        b,
        &format!("{IP} addr flush dev tunl0 && {IP} link set tunl0 down"),
    )
    .unwrap();
    wait_for("tunl0 repaired on vm2", Duration::from_secs(60), || {
        let t = c
            .sh_ok(
                b,
                &format!("{IP} -o addr show dev tunl0; {IP} -o link show tunl0"),
            )
            .map_err(|e| e.to_string())?;
        Ok(t.contains("inet 10.244.") && t.contains(",UP"))
    });
    assert!(
        c.wait_ping(a, ips[b], Duration::from_secs(30)).is_some(),
        "vm1 -> vm2 after the repair"
    );

    // A connection held open across both switches: vm1's pod to vm3's (across subnets).
    c.pod_sh(far, "tcp-probe serve 5000 >/dev/null 2>&1 &")
        .unwrap();
    wait_for(
        "the probe's server listens",
        Duration::from_secs(30),
        || {
            c.pod_sh(far, "netstat -ltn")
                .map(|o| o.text.contains(":5000"))
                .map_err(|e| e.to_string())
        },
    );
    c.pod_sh(
        a,
        &format!("tcp-probe send {}:5000 45 >/tmp/probe.out 2>&1 &", ips[far]),
    )
    .unwrap();

    // CrossSubnet: native within the subnet, encapsulated across it.
    c.apply_yaml(&pool("CrossSubnet")).unwrap();
    let (to_b, to_far) = (block_of(ips[b]), block_of(ips[far]));
    wait_for(
        "vm1 routes vm2's block natively",
        Duration::from_secs(60),
        || Ok(route(&c, a, &to_b).contains("via 198.18.10.12 dev eth0")),
    );
    assert!(
        route(&c, a, &to_far).contains("dev tunl0"),
        "across subnets still over tunl0: {}",
        route(&c, a, &to_far)
    );
    // (The held connection's packets to vm3 cross br1 too: the filter leaves them out.)
    let (seen, _) = c
        .capture(
            "br1",
            &format!(
                "(icmp and host {}) or (ip proto 4 and host 198.18.10.12)",
                ips[b]
            ),
            2,
            || c.ping(a, ips[b]),
        )
        .unwrap();
    let plain = format!("IP {} > {}: ICMP echo request", ips[a], ips[b]);
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&plain) || l.contains(&format!(" {plain}")))
            && !seen
                .iter()
                .any(|l| l.contains("198.18.10.11 > 198.18.10.12")),
        "CrossSubnet, same subnet: native: {seen:?}"
    );
    let (seen, _) = c
        .capture(
            "br1",
            "ip proto 4 and src host 198.18.10.11 and dst host 198.18.11.13",
            1,
            || c.ping(a, ips[far]),
        )
        .unwrap();
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("198.18.10.11 > 198.18.11.13: IP {}", ips[a]))),
        "CrossSubnet, across subnets: encapsulated: {seen:?}"
    );

    // Never: no tunnel; across subnets the router (which learned the blocks over BGP)
    // forwards the pods' own packets.
    c.apply_yaml(&pool("Never")).unwrap();
    wait_for(
        "no route over tunl0 on vm1",
        Duration::from_secs(60),
        || {
            Ok(!c
                .sh_ok(a, &format!("{IP} route"))
                .map_err(|e| e.to_string())?
                .contains("tunl0"))
        },
    );
    assert!(
        c.wait_ping(a, ips[far], Duration::from_secs(30)).is_some(),
        "Never: vm1 -> vm3 through the router"
    );
    let (seen, _) = c
        .capture("br1", "icmp or ip proto 4", 2, || c.ping(a, ips[far]))
        .unwrap();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|l| !l.contains("proto IPIP") && !l.contains("198.18.10.11 >")),
        "Never: nothing encapsulated: {seen:?}"
    );

    // The held connection survived Always -> CrossSubnet -> Never (and was still open when
    // the last switch had been seen through).
    let running = c.sh_ok(a, "cat /tmp/probe.out").unwrap();
    assert!(
        running.trim().is_empty(),
        "the probe ended before the switches: {running}"
    );
    let mut probe = String::new();
    wait_for("the probe finishes", Duration::from_secs(180), || {
        probe = c
            .sh_ok(a, "cat /tmp/probe.out")
            .map_err(|e| e.to_string())?;
        Ok(!probe.trim().is_empty())
    });
    assert!(
        probe.starts_with("ok "),
        "the connection across the switches: {probe}"
    );
    c.finish();
}
