//! VXLAN end to end in the test bed: three nodes, two of them on one subnet and one behind
//! the router, a pod behind each; pings across in Always and CrossSubnet, VNI 4096 seen on the
//! underlay, convergence from drift, and bad input refused with nothing half-built.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{block, device, ensure, in_ns, pod, pod_ip};
use tessera_testbed::{Child, Lab, LabNode, LabSpec, Netns};
use tessera_tunnel::{ensure_device, vtep_mac, Mode, TunnelError};

fn ping(from: &Netns, to: &str) {
    from.exec("ping", &["-c1", "-W2", to])
        .unwrap_or_else(|e| panic!("ping {to}: {e}"));
}

/// Pings while tcpdump listens on `node`'s underlay; returns what tcpdump printed.
fn capture(node: &LabNode, filter: &str, from: &Netns, to: &str) -> String {
    let mut cmd = node.netns.command("tcpdump");
    cmd.args(["-nli", "eth0", "-c", "1", "--immediate-mode", filter]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut dump = Child::spawn(cmd, "tcpdump").expect("tcpdump");
    // Keep tcpdump's stderr open (a closed pipe would kill it with SIGPIPE at exit).
    let mut err = std::io::BufReader::new(dump.take_stderr().expect("stderr"));
    {
        use std::io::BufRead;
        let mut line = String::new();
        err.read_line(&mut line).expect("listening");
    }
    for _ in 0..5 {
        let _ = from.exec("ping", &["-c1", "-W1", to]);
        if dump.try_wait().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // tcpdump ends by itself after one packet; if none came, ask it to stop.
    dump.signal(nix::sys::signal::Signal::SIGTERM);
    let out = dump
        .wait_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    drop(err);
    out
}

#[test]
fn vxlan_always_and_cross_subnet_with_convergence_from_drift() {
    // node1 and node3 on 198.18.0.0/24, node2 on 198.18.1.0/24 behind the router.
    let lab = Lab::new(
        "vxlan",
        LabSpec {
            nodes: 3,
            subnets: 2,
            etcd: false,
        },
    )
    .expect("lab");
    assert_eq!(
        (
            lab.nodes[0].subnet,
            lab.nodes[1].subnet,
            lab.nodes[2].subnet
        ),
        (0, 1, 0)
    );
    let pods: Vec<Netns> = (1..=3).map(|i| pod(&lab, i)).collect();

    // Always: everything encapsulated.
    for i in 1..=3 {
        ensure(&lab, i, Mode::Always).expect("ensure Always");
    }
    let d = lab.nodes[0]
        .netns
        .ip_json(&["-d", "link", "show", "vxlan.calico"])
        .expect("device");
    let info = &d[0]["linkinfo"]["info_data"];
    assert_eq!(
        (
            info["id"].as_u64(),
            info["port"].as_u64(),
            info["learning"].as_bool()
        ),
        (Some(4096), Some(4789), Some(false))
    );
    assert_eq!(d[0]["mtu"], 1450);
    ping(&pods[0], &pod_ip(2));
    ping(&pods[0], &pod_ip(3));
    // The pod MTU from the underlay's, and no fragmentation: a DF ping that fills the pod MTU
    // (1450 - 28 bytes of IP and ICMP headers) crosses the tunnel.
    let mtu = in_ns(&lab.nodes[0].netns, |h| {
        Box::pin(async move { tessera_tunnel::mtu::interface_mtu(&h, "eth0").await })
    })
    .expect("underlay MTU");
    assert_eq!(
        tessera_tunnel::mtu::pod_mtu(mtu, &[tessera_tunnel::mtu::Encap::Vxlan]),
        1450
    );
    pods[0]
        .exec(
            "ping",
            &["-c1", "-W2", "-M", "do", "-s", "1422", &pod_ip(2)],
        )
        .expect("DF ping at the full pod MTU");
    assert!(
        pods[0]
            .exec(
                "ping",
                &["-c1", "-W1", "-M", "do", "-s", "1423", &pod_ip(2)]
            )
            .is_err(),
        "one byte more does not fit"
    );
    let seen = capture(&lab.nodes[1], "udp port 4789", &pods[0], &pod_ip(2));
    assert!(
        seen.contains("VXLAN") && seen.contains("vni 4096"),
        "{seen}"
    );
    // A TCP transfer across the tunnel (1 MB with iperf3).
    let mut srv = pods[1].command("iperf3");
    srv.args(["-s", "-1", "-B", &pod_ip(2)])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut srv = Child::spawn(srv, "iperf3").expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    pods[0]
        .exec("iperf3", &["-c", &pod_ip(2), "-n", "1M"])
        .expect("TCP pod to pod over VXLAN");
    srv.stop(Duration::from_secs(2));
    let seen = capture(&lab.nodes[2], "udp port 4789", &pods[0], &pod_ip(3));
    assert!(
        seen.contains("vni 4096"),
        "same subnet, Always: encapsulated too: {seen}"
    );

    // CrossSubnet: node1 <-> node3 natively, node1 <-> node2 still over VXLAN.
    for i in 1..=3 {
        ensure(&lab, i, Mode::CrossSubnet).expect("ensure CrossSubnet");
    }
    let r = lab.nodes[0]
        .netns
        .ip_json(&["route", "show", &block(3)])
        .expect("route");
    assert_eq!(
        (r[0]["gateway"].as_str(), r[0]["dev"].as_str()),
        (Some("198.18.0.11"), Some("eth0")),
        "{r}"
    );
    let fdb = lab.nodes[0]
        .netns
        .exec("bridge", &["fdb", "show", "dev", "vxlan.calico"])
        .expect("fdb");
    assert!(
        !fdb.contains(&tessera_mac(&lab.nodes[2].name)),
        "node3's FDB entry removed: {fdb}"
    );
    ping(&pods[0], &pod_ip(3));
    ping(&pods[0], &pod_ip(2));
    let seen = capture(
        &lab.nodes[2],
        &format!("icmp and host {}", pod_ip(3)),
        &pods[0],
        &pod_ip(3),
    );
    assert!(
        seen.contains(&pod_ip(1)) && !seen.contains("VXLAN"),
        "plain pod packets on the same subnet: {seen}"
    );
    let seen = capture(&lab.nodes[1], "udp port 4789", &pods[0], &pod_ip(2));
    assert!(seen.contains("vni 4096"), "{seen}");

    // Drift: someone deletes the FDB entry and the route and changes the MTU; ensure restores.
    let n1 = &lab.nodes[0].netns;
    let mac2 = tessera_mac(&lab.nodes[1].name);
    n1.exec("bridge", &["fdb", "del", &mac2, "dev", "vxlan.calico"])
        .expect("fdb del");
    n1.ip(&["route", "del", &block(2)]).expect("route del");
    n1.ip(&["link", "set", "vxlan.calico", "mtu", "1300"])
        .expect("mtu");
    ensure(&lab, 1, Mode::CrossSubnet).expect("ensure after drift");
    let snapshot = || {
        (
            n1.exec("bridge", &["fdb", "show", "dev", "vxlan.calico"])
                .expect("fdb"),
            n1.ip(&["route", "show"]).expect("routes"),
            n1.ip(&["neigh", "show", "dev", "vxlan.calico"])
                .expect("neigh"),
            n1.ip_json(&["link", "show", "vxlan.calico"]).expect("link")[0]["mtu"].clone(),
        )
    };
    let after = snapshot();
    assert!(
        after.0.contains(&mac2) && after.1.contains(&block(2)) && after.3 == 1450,
        "{after:?}"
    );
    ping(&pods[0], &pod_ip(2));
    // A second ensure changes nothing.
    ensure(&lab, 1, Mode::CrossSubnet).expect("ensure again");
    assert_eq!(snapshot(), after);

    drop(pods);
    lab.finish();
}

fn tessera_mac(node: &str) -> String {
    vtep_mac(node)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn bad_input_is_refused_and_nothing_is_half_built() {
    let lab = Lab::new(
        "vxlan_bad",
        LabSpec {
            nodes: 1,
            subnets: 1,
            etcd: false,
        },
    )
    .expect("lab");
    let n = &lab.nodes[0];
    // Another device already has VNI 4096 on port 4789.
    n.netns
        .ip(&[
            "link",
            "add",
            "other",
            "type",
            "vxlan",
            "id",
            "4096",
            "dstport",
            "4789",
            "local",
            &n.ipv4.ip().to_string(),
            "dev",
            "eth0",
            "nolearning",
        ])
        .expect("other vxlan");
    let dev = device(n, 1);
    let r = in_ns(&n.netns, move |h| {
        Box::pin(async move { ensure_device(&h, &dev).await })
    });
    assert!(
        matches!(r, Err(TunnelError::VniClash { vni: 4096, .. })),
        "{r:?}"
    );
    assert!(
        n.netns.ip(&["link", "show", "vxlan.calico"]).is_err(),
        "nothing half-built"
    );
    // An IPv6 local address on the IPv4 device.
    let mut dev6 = device(n, 1);
    dev6.local = n.ipv6.ip().into();
    let r = in_ns(&n.netns, move |h| {
        Box::pin(async move { ensure_device(&h, &dev6).await })
    });
    assert!(matches!(r, Err(TunnelError::WrongFamily(_))), "{r:?}");
    lab.finish();
}

#[test]
fn ipv6_pools_over_an_ipv6_underlay() {
    use tessera_tunnel::{ensure_entries, vxlan_entries, RemoteNode, VxlanDevice};
    let lab = Lab::new(
        "vxlan6",
        LabSpec {
            nodes: 2,
            subnets: 1,
            etcd: false,
        },
    )
    .expect("lab");
    let block6 = |i: usize| format!("fd10:244::{i}:0/122");
    let vtep6 = |i: usize| -> std::net::IpAddr { format!("fd10:244::{i}:0").parse().expect("ip") };
    let pod6 = |i: usize| format!("fd10:244::{i}:1");
    let mut pods = Vec::new();
    for (k, n) in lab.nodes.iter().enumerate() {
        let i = k + 1;
        let ns = Netns::new(&format!("{}-q{i}", lab.prefix())).expect("pod ns");
        let host = format!("cali{i}");
        n.netns.veth_to(&host, &ns, "eth0").expect("veth");
        n.netns
            .ip(&["link", "set", &host, "address", "ee:ee:ee:ee:ee:ee", "up"])
            .expect("host up");
        ns.ip(&["link", "set", "eth0", "mtu", "1430", "up"])
            .expect("pod up");
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/128", pod6(i)),
            "dev",
            "eth0",
            "nodad",
        ])
        .expect("addr");
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fe80::ecee:eeff:feee:eeee",
            "dev",
            "eth0",
        ])
        .expect("route");
        n.netns
            .sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("forwarding");
        n.netns
            .ip(&[
                "-6",
                "route",
                "add",
                &format!("{}/128", pod6(i)),
                "dev",
                &host,
            ])
            .expect("host route");
        pods.push(ns);
    }
    for (k, me) in lab.nodes.iter().enumerate() {
        let i = k + 1;
        let remotes: Vec<RemoteNode> = lab
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(j, n)| RemoteNode {
                name: n.name.clone(),
                underlay: ipnetwork::IpNetwork::V6(n.ipv6),
                vtep_ip: vtep6(j + 1),
                vtep_mac: vtep_mac(&format!("{}-v6", n.name)),
                blocks: vec![block6(j + 1).parse().expect("net")],
            })
            .collect();
        let dev = VxlanDevice::calico_v6(
            me.ipv6.ip().into(),
            "eth0",
            1500,
            vtep_mac(&format!("{}-v6", me.name)),
            vtep6(i),
        );
        let entries = vxlan_entries(ipnetwork::IpNetwork::V6(me.ipv6), Mode::Always, &remotes);
        in_ns(&me.netns, move |h| {
            Box::pin(async move {
                let idx = ensure_device(&h, &dev).await?;
                ensure_entries(&h, idx, &entries).await
            })
        })
        .expect("ensure IPv6 VXLAN");
    }
    let d = lab.nodes[0]
        .netns
        .ip_json(&["-d", "link", "show", "vxlan-v6.calico"])
        .expect("device");
    assert_eq!(d[0]["linkinfo"]["info_data"]["id"].as_u64(), Some(6096));
    assert_eq!(d[0]["mtu"], 1430);
    pods[0]
        .exec("ping", &["-6", "-c1", "-W2", &pod6(2)])
        .expect("IPv6 pod to pod over vxlan-v6.calico");
    let seen = capture(&lab.nodes[1], "udp port 4789", &pods[0], &pod6(2));
    assert!(seen.contains("vni 6096"), "{seen}");
    drop(pods);
    lab.finish();
}
