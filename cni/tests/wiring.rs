//! Pods wired by the real plugin in the test bed: addresses from the node's block, every
//! route, sysctl and MAC checked in the kernel, the etcd records checked, and pings that cross.

mod common;

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

    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    assert_nothing_left(&prefix, &pids);
}
