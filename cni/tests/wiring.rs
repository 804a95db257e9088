//! Pods wired by the real plugin in the test bed: addresses from the node's block, every
//! route, sysctl and MAC checked in the kernel, the etcd records checked, and pings that cross.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{ips, CniLab};
use tessera_testbed::assert_nothing_left;

#[test]
fn pods_get_their_nodes_block_and_reach_each_other_and_the_node() {
    let mut c = CniLab::new("cni_wiring", 2);
    let (p0, r0) = c.add_pod("node1");
    let (p1, r1) = c.add_pod("node1");
    let (p2, r2) = c.add_pod("node2");
    let (a0, a1, a2) = (ips(&r0), ips(&r1), ips(&r2));
    assert_eq!(a0.len(), 2, "dual stack: {r0}");
    assert!(a0[0].starts_with("10.244.") && a0[1].starts_with("fd10:244:"));

    // Each pod's address is in a block whose affinity is its node.
    let blocks = c
        .lab
        .etcd_prefix("/tessera/v1/ipam/blocks/")
        .expect("blocks");
    let owner_of = |addr: &str| -> String {
        let a: std::net::IpAddr = addr.parse().expect("addr");
        blocks
            .iter()
            .map(|(_, v)| serde_json::from_str::<serde_json::Value>(v).expect("json"))
            .find(|b| {
                b["cidr"]
                    .as_str()
                    .and_then(|s| s.parse::<ipnetwork::IpNetwork>().ok())
                    .is_some_and(|n| n.contains(a))
            })
            .and_then(|b| b["affinity"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(owner_of(&a0[0]), "node1");
    assert_eq!(owner_of(&a1[0]), "node1");
    assert_eq!(owner_of(&a2[0]), "node2");
    assert_eq!(owner_of(&a2[1]), "node2");

    // Host side, in the kernel: MAC, link up, sysctls, host routes.
    let node1 = &c.lab.node("node1").netns;
    let host_if = r0["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    assert!(
        host_if.starts_with("cali") && host_if.len() == 15,
        "{host_if}"
    );
    let link = node1.ip_json(&["link", "show", &host_if]).expect("link");
    assert_eq!(link[0]["address"], "ee:ee:ee:ee:ee:ee");
    assert!(link[0]["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .any(|f| f == "UP"));
    for (key, want) in [
        (format!("net.ipv4.conf.{host_if}.proxy_arp"), "1"),
        (format!("net.ipv4.neigh.{host_if}.proxy_delay"), "0"),
        (format!("net.ipv4.conf.{host_if}.forwarding"), "1"),
        (format!("net.ipv6.conf.{host_if}.accept_dad"), "0"),
        ("net.ipv4.ip_forward".to_string(), "1"),
    ] {
        let got = node1.exec("sysctl", &["-n", &key]).expect("sysctl");
        assert_eq!(got.trim(), want, "{key}");
    }
    let routes = node1
        .ip_json(&["route", "show", &format!("{}/32", a0[0])])
        .expect("route");
    assert_eq!(routes[0]["dev"], host_if.as_str());
    assert_eq!(routes[0]["scope"], "link");
    let routes6 = node1
        .ip_json(&["-6", "route", "show", &format!("{}/128", a0[1])])
        .expect("route6");
    assert_eq!(routes6[0]["dev"], host_if.as_str());

    // Pod side: eth0 with the /32 and /128, the gateway routes.
    let pod0 = &c.pods[p0];
    let addrs = pod0.ip_json(&["addr", "show", "eth0"]).expect("addr");
    let pod_addrs: Vec<(String, u64)> = addrs[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| {
            (
                a["local"].as_str().unwrap_or_default().to_string(),
                a["prefixlen"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(pod_addrs.contains(&(a0[0].clone(), 32)), "{pod_addrs:?}");
    assert!(pod_addrs.contains(&(a0[1].clone(), 128)), "{pod_addrs:?}");
    assert_eq!(r0["interfaces"][1]["mac"], addrs[0]["address"]);
    let pod_routes = pod0.ip_json(&["route", "show"]).expect("routes");
    let has = |dst: &str, gw: Option<&str>, scope: Option<&str>| {
        pod_routes.as_array().expect("routes").iter().any(|r| {
            r["dst"] == dst
                && r["dev"] == "eth0"
                && gw.is_none_or(|g| r["gateway"] == g)
                && scope.is_none_or(|s| r["scope"] == s)
        })
    };
    assert!(has("169.254.1.1", None, Some("link")), "{pod_routes}");
    assert!(has("default", Some("169.254.1.1"), None), "{pod_routes}");
    let pod_routes6 = pod0
        .ip_json(&["-6", "route", "show", "default"])
        .expect("routes6");
    assert_eq!(pod_routes6[0]["gateway"], "fe80::ecee:eeff:feee:eeee");

    // Traffic: pod to pod on one node (v4 and v6), node to pod.
    pod0.exec("ping", &["-c1", "-W2", &a1[0]])
        .expect("pod0 -> pod1 (IPv4)");
    pod0.exec("ping", &["-6", "-c1", "-W2", &a1[1]])
        .expect("pod0 -> pod1 (IPv6)");
    node1
        .exec("ping", &["-c1", "-W2", &a0[0]])
        .expect("node1 -> pod0");
    // The pod resolved its gateway to the host end's MAC through proxy ARP.
    let neigh = pod0
        .ip_json(&["neigh", "show", "169.254.1.1"])
        .expect("neigh");
    assert_eq!(neigh[0]["lladdr"], "ee:ee:ee:ee:ee:ee");

    // etcd: one endpoint record and one handle per pod.
    let weps = c.lab.etcd_prefix("/tessera/v1/workloads/").expect("weps");
    assert_eq!(weps.len(), 3);
    let wep0 = weps
        .iter()
        .find(|(k, _)| k.ends_with("/node1/default/pod-0/eth0"))
        .expect("pod-0 endpoint");
    let wep0: serde_json::Value = serde_json::from_str(&wep0.1).expect("json");
    assert_eq!(wep0["hostInterface"], host_if.as_str());
    assert_eq!(wep0["addresses"][0], format!("{}/32", a0[0]));
    assert_eq!(c.etcd_keys("/tessera/v1/ipam/handles/").len(), 3);

    // DEL: links, routes, records and addresses all go.
    for (pod, node, result) in [(p0, "node1", &r0), (p1, "node1", &r1), (p2, "node2", &r2)] {
        c.driver(node)
            .del(&c.attachment(pod), Some(result))
            .expect("DEL");
    }
    assert!(c.host_links("node1").is_empty() && c.host_links("node2").is_empty());
    assert!(c.etcd_keys("/tessera/v1/workloads/").is_empty());
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
    let left = node1
        .ip_json(&["route", "show", &format!("{}/32", a0[0])])
        .expect("route");
    assert_eq!(left.as_array().map(Vec::len), Some(0));

    finish(c);
}

fn finish(c: CniLab) {
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    assert_nothing_left(&prefix, &pids);
}

/// Runs `f` on a thread inside the network namespace at `path`: a socket made there stays
/// in that namespace, whichever thread uses it later.
fn in_netns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// One round trip on a held connection: the client writes a line, the server echoes it.
fn round_trip(client: &mut TcpStream, server: &mut TcpStream, n: u32) {
    let line = format!("ping {n}\n");
    client.write_all(line.as_bytes()).expect("client write");
    let mut buf = vec![0; line.len()];
    server.read_exact(&mut buf).expect("server read");
    server.write_all(&buf).expect("server write");
    let mut back = vec![0; line.len()];
    client
        .read_exact(&mut back)
        .expect("client read: the connection broke");
    assert_eq!(back, line.as_bytes());
}

/// What a repeated ADD must not change in the pod: its interface (index, MAC, MTU, state),
/// addresses, routes, and the host end's index; and what it must put back when damaged.
fn pod_state(c: &CniLab, pod: usize, host_if: &str) -> serde_json::Value {
    let ns = &c.pods[pod];
    let strip = |mut v: serde_json::Value| {
        // Lifetimes and counters tick; the rest is the pod's wiring.
        for a in v.as_array_mut().into_iter().flatten() {
            if let Some(o) = a.as_object_mut() {
                o.remove("addr_info").map(|ai| {
                    let kept: Vec<_> = ai
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|i| serde_json::json!([i["local"], i["prefixlen"], i["scope"]]))
                        .collect();
                    o.insert("addrs".into(), kept.into())
                });
                for k in [
                    "valid_life_time",
                    "preferred_life_time",
                    "stats64",
                    "txqlen",
                ] {
                    o.remove(k);
                }
            }
        }
        v
    };
    serde_json::json!({
        "pod_addr": strip(ns.ip_json(&["addr", "show", "dev", "eth0"]).expect("addr")),
        "pod_routes4": ns.ip_json(&["-4", "route", "show"]).expect("routes"),
        "pod_routes6": ns.ip_json(&["-6", "route", "show", "default"]).expect("routes"),
        "host_link": c.lab.node("node1").netns.ip_json(&["link", "show", host_if]).expect("host")[0]["ifindex"],
    })
}

#[test]
fn add_again_leaves_a_running_pod_alone_and_repairs_damage_in_place() {
    let mut c = CniLab::new("cni_add_again", 1);
    let d = c.driver("node1");
    let (server_pod, r) = c.add_pod("node1");
    let (client_pod, _) = c.add_pod("node1");
    let server_ip = ips(&r)[0].clone();
    let host_if = r["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();

    // A connection from the client pod to the server pod, held across everything below.
    let listener = in_netns(&c.pods[server_pod].path(), || {
        TcpListener::bind("0.0.0.0:7070").expect("listen")
    });
    let addr = format!("{server_ip}:7070");
    let mut client = in_netns(&c.pods[client_pod].path(), move || {
        TcpStream::connect(&addr).expect("connect")
    });
    let (mut server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
    }
    round_trip(&mut client, &mut server, 1);
    let before = pod_state(&c, server_pod, &host_if);
    let neigh_before = c.pods[server_pod]
        .ip(&["neigh", "show", "169.254.1.1"])
        .expect("neigh");
    assert!(neigh_before.contains("ee:ee:ee:ee:ee:ee"), "{neigh_before}");

    // A runtime retrying after a timeout: the same result, nothing in the pod changed.
    let att = c.attachment(server_pod);
    let again = d.add(&att).expect("second ADD");
    assert_eq!(again, r, "a repeated ADD returns the same result");
    assert_eq!(pod_state(&c, server_pod, &host_if), before);
    let neigh_after = c.pods[server_pod]
        .ip(&["neigh", "show", "169.254.1.1"])
        .expect("neigh");
    assert!(
        neigh_after.contains("ee:ee:ee:ee:ee:ee"),
        "the neighbour entry is kept: {neigh_after}"
    );
    round_trip(&mut client, &mut server, 2);

    // Damage: the pod's default route, an address, the host route and the host end's state.
    let pod_ns = &c.pods[server_pod];
    pod_ns
        .ip(&["route", "del", "default"])
        .expect("del default");
    let v6 = ips(&r)[1].clone();
    pod_ns
        .ip(&["addr", "del", &format!("{v6}/128"), "dev", "eth0"])
        .expect("del v6");
    let node = &c.lab.node("node1").netns;
    node.ip(&["route", "del", &format!("{server_ip}/32")])
        .expect("del host route");
    node.ip(&["link", "set", &host_if, "down"])
        .expect("host end down");
    assert!(d.check(&att, &r).is_err(), "CHECK sees the damage");

    // ADD repairs it in place: same interface and MAC, everything back, connection alive.
    let repaired = d.add(&att).expect("ADD repairs");
    assert_eq!(repaired, r);
    assert_eq!(pod_state(&c, server_pod, &host_if), before);
    d.check(&att, &r).expect("CHECK after the repair");
    round_trip(&mut client, &mut server, 3);
    assert_eq!(c.host_links("node1").len(), 2);
    assert_eq!(c.etcd_keys("/tessera/v1/ipam/handles/").len(), 2);
    drop((client, server, listener));
    finish(c);
}

/// DEL leaves the host end retired for its reaper (deleting a veth costs the kernel an RCU
/// grace period, which DEL does not wait for). An ADD for the same container before the
/// reaper ran (a runtime reconnecting a network) must replace the retired pair, not repair it
/// in place: the reaper deletes by index, and the new pair has a new one.
#[test]
fn add_replaces_a_retired_link_and_del_reaps_the_new_one() {
    let mut c = CniLab::new("cni_retired", 1);
    let d = c.driver("node1");
    let (pod, r) = c.add_pod("node1");
    let att = c.attachment(pod);
    let host_if = r["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    let node = &c.lab.node("node1").netns;
    let link = |name: &str| -> Option<serde_json::Value> {
        node.ip_json(&["link", "show", name])
            .ok()
            .and_then(|l| l.as_array().and_then(|a| a.first().cloned()))
    };
    // A DEL's state before its reaper ran: the pair still there, retired.
    let old = link(&host_if).expect("host end");
    node.ip(&[
        "link",
        "set",
        &host_if,
        "alias",
        tessera_tunnel::routes::RETIRED_ALIAS,
    ])
    .expect("retire");

    let again = d.add(&att).expect("ADD over a retired link");
    let new = link(&host_if).expect("the new host end");
    assert_ne!(
        new["ifindex"], old["ifindex"],
        "a new pair, not the retired one repaired"
    );
    assert!(
        new["ifalias"].is_null(),
        "the new pair is not retired: {new}"
    );
    d.check(&att, &again).expect("CHECK of the new pair");

    // A real DEL: it returns with the link retired or already gone, and its reaper deletes it.
    d.del(&att, Some(&again)).expect("DEL");
    assert!(link(&host_if).is_none_or(|l| l["ifalias"] == tessera_tunnel::routes::RETIRED_ALIAS));
    assert!(c.host_links("node1").is_empty());
    assert!(link(&host_if).is_none());
    finish(c);
}

#[test]
fn netkit_pods_in_l3_mode_reach_each_other_and_pass_check() {
    // `podInterface: netkit`: an L3 netkit pair instead of a veth, no MAC and no ARP; the
    // same addresses, routes and records, and CHECK and DEL work the same.
    let mut c = CniLab::new("cni_netkit", 2);
    let netkit = |c: &CniLab, node: &str| {
        let mut plugin = c.plugin(node, true);
        plugin["podInterface"] = "netkit".into();
        c.driver_with(node, "1.1.0", vec![plugin])
    };
    if !kernel_has_netkit() {
        // Where the kernel has none, ADD says so as a configuration error and leaves
        // nothing: no link, no endpoint record, no address held.
        let pod = c.pod_netns();
        let err = netkit(&c, "node1")
            .add(&c.attachment(pod))
            .expect_err("ADD without netkit in the kernel");
        let text = format!("{err:?}");
        assert!(
            text.contains("code: 7") && text.contains("CONFIG_NETKIT"),
            "{text}"
        );
        assert!(c.host_links("node1").is_empty());
        assert!(c.etcd_keys("/tessera/v1/workloads/").is_empty());
        assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
        eprintln!("this kernel has no netkit (CONFIG_NETKIT): checked the refusal only");
        finish(c);
        return;
    }
    let mut pods = Vec::new();
    for node in ["node1", "node1", "node2"] {
        let pod = c.pod_netns();
        let r = netkit(&c, node).add(&c.attachment(pod)).expect("ADD");
        pods.push((pod, node, r));
    }
    let (p0, _, r0) = &pods[0];
    let host_if = r0["interfaces"][0]["name"].as_str().expect("host if");
    let node1 = &c.lab.node("node1").netns;
    let link = node1
        .ip_json(&["-d", "link", "show", host_if])
        .expect("link");
    assert_eq!(link[0]["linkinfo"]["info_kind"], "netkit", "{link}");
    assert_eq!(link[0]["linkinfo"]["info_data"]["mode"], "l3", "{link}");
    assert!(r0["interfaces"][1].get("mac").is_none(), "no MAC: {r0}");
    let (a0, a1, a2) = (ips(r0), ips(&pods[1].2), ips(&pods[2].2));
    let pod0 = &c.pods[*p0];
    pod0.exec("ping", &["-c1", "-W2", &a1[0]])
        .expect("pod0 -> pod1 (IPv4)");
    pod0.exec("ping", &["-6", "-c1", "-W2", &a1[1]])
        .expect("pod0 -> pod1 (IPv6)");
    node1
        .exec("ping", &["-c1", "-W2", &a0[0]])
        .expect("node1 -> pod0");
    // Across nodes: the lab's nodes route each other's pod addresses by hand here (the agent
    // does it in the cluster tests).
    let (n1, n2) = (
        c.lab.node("node1").ipv4.ip().to_string(),
        c.lab.node("node2").ipv4.ip().to_string(),
    );
    c.lab
        .node("node1")
        .netns
        .ip(&["route", "add", &format!("{}/32", a2[0]), "via", &n2])
        .expect("route");
    c.lab
        .node("node2")
        .netns
        .ip(&["route", "add", &format!("{}/32", a0[0]), "via", &n1])
        .expect("route");
    pod0.exec("ping", &["-c1", "-W2", &a2[0]])
        .expect("pod0 on node1 -> pod2 on node2");
    for (pod, node, r) in &pods {
        netkit(&c, node)
            .check(&c.attachment(*pod), r)
            .expect("CHECK");
    }
    for (pod, node, r) in &pods {
        netkit(&c, node)
            .del(&c.attachment(*pod), Some(r))
            .expect("DEL");
    }
    assert!(c.host_links("node1").is_empty() && c.host_links("node2").is_empty());
    assert!(c.etcd_keys("/tessera/v1/workloads/").is_empty());
    finish(c);
}

/// Whether the running kernel was built with netkit (`CONFIG_NETKIT`), from its own
/// configuration; true when it does not publish one (then the ADD itself tells).
fn kernel_has_netkit() -> bool {
    let Ok(out) = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
    else {
        return true;
    };
    let config = String::from_utf8_lossy(&out.stdout);
    config.is_empty()
        || config
            .lines()
            .any(|l| l == "CONFIG_NETKIT=y" || l == "CONFIG_NETKIT=m")
}
