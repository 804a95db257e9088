//! The CNI protocol through the spec 1.1 driver: every verb and version, idempotency,
//! GC, STATUS, bad input, concurrency, and chaining with Debian's reference plugins.

mod common;

use std::collections::HashSet;

use common::{code, ips, CniLab};
use serde_json::json;
use tessera_testbed::assert_nothing_left;

fn finish(c: CniLab) {
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    assert_nothing_left(&prefix, &pids);
}

#[test]
fn every_verb_in_every_version() {
    let mut c = CniLab::new("cni_versions", 1);
    let v = c.driver("node1").version("tessera").expect("VERSION");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let v = c.driver("node1").version("tessera-ipam").expect("VERSION");
    assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(5));
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let d = c.driver_with("node1", version, vec![c.plugin("node1", false)]);
        let pod = c.pod_netns();
        let att = c.attachment(pod);
        let r = d.add(&att).unwrap_or_else(|e| panic!("ADD {version}: {e}"));
        assert_eq!(r["cniVersion"], version);
        let legacy = version.starts_with("0.");
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            legacy,
            "{version}: {r}"
        );
        if version != "0.3.0" && version != "0.3.1" {
            d.check(&att, &r)
                .unwrap_or_else(|e| panic!("CHECK {version}: {e}"));
        } else {
            assert_eq!(
                code(&d.check(&att, &r).unwrap_err()),
                1,
                "CHECK needs 0.4.0"
            );
        }
        if version == "1.1.0" {
            d.status().expect("STATUS");
            d.gc(&[(att.container_id.clone(), "eth0".into())])
                .expect("GC");
        } else {
            assert_eq!(code(&d.status().unwrap_err()), 1, "STATUS needs 1.1.0");
        }
        d.del(&att, Some(&r))
            .unwrap_or_else(|e| panic!("DEL {version}: {e}"));
    }
    assert!(c.host_links("node1").is_empty());
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
    finish(c);
}

#[test]
fn del_is_idempotent_and_add_twice_keeps_the_address() {
    let mut c = CniLab::new("cni_idempotent", 1);
    let d = c.driver("node1");
    let (pod, r) = c.add_pod("node1");
    let att = c.attachment(pod);
    // ADD again for the same container: same address, one interface, one handle.
    let again = d.add(&att).expect("second ADD");
    assert_eq!(ips(&again), ips(&r));
    assert_eq!(c.host_links("node1").len(), 1);
    assert_eq!(c.etcd_keys("/tessera/v1/ipam/handles/").len(), 1);
    // DEL twice.
    d.del(&att, Some(&again)).expect("DEL");
    d.del(&att, Some(&again)).expect("second DEL");
    // DEL after the netns is gone (a runtime that lost it), for a pod that was wired.
    let (pod2, r2) = c.add_pod("node1");
    let att2 = c.attachment(pod2);
    let ns = c.pods.remove(pod2);
    drop(ns);
    d.del(&att2, Some(&r2)).expect("DEL without netns");
    assert!(c.host_links("node1").is_empty());
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
    assert!(c.etcd_keys("/tessera/v1/workloads/").is_empty());
    finish(c);
}

#[test]
fn check_fails_when_someone_deletes_the_pods_route() {
    let mut c = CniLab::new("cni_check", 1);
    let d = c.driver("node1");
    let (pod, r) = c.add_pod("node1");
    let att = c.attachment(pod);
    d.check(&att, &r).expect("CHECK of a healthy pod");
    c.pods[pod]
        .ip(&["route", "del", "default"])
        .expect("delete route");
    let e = d.check(&att, &r).unwrap_err();
    assert_eq!(code(&e), 105, "{e}");
    assert!(e.to_string().contains("default route"), "{e}");
    // The host route too.
    let (pod2, r2) = c.add_pod("node1");
    let a = ips(&r2)[0].clone();
    c.lab
        .node("node1")
        .netns
        .ip(&["route", "del", &format!("{a}/32")])
        .expect("del host route");
    assert_eq!(code(&d.check(&c.attachment(pod2), &r2).unwrap_err()), 105);
    finish(c);
}

#[test]
fn gc_releases_attachments_that_are_not_valid() {
    let mut c = CniLab::new("cni_gc", 1);
    let d = c.driver("node1");
    let pods: Vec<_> = (0..3).map(|_| c.add_pod("node1")).collect();
    let keep = c.attachment(pods[0].0);
    d.gc(&[(keep.container_id.clone(), "eth0".into())])
        .expect("GC");
    let handles = c.etcd_keys("/tessera/v1/ipam/handles/");
    assert_eq!(handles.len(), 1, "{handles:?}");
    assert!(handles[0].contains(&keep.container_id));
    let weps = c.etcd_keys("/tessera/v1/workloads/");
    assert_eq!(weps.len(), 1, "{weps:?}");
    // The kept pod still works.
    d.check(&keep, &pods[0].1).expect("CHECK kept pod");
    finish(c);
}

#[test]
fn status_says_not_ready_when_etcd_is_down() {
    let mut c = CniLab::new("cni_status", 1);
    let d = c.driver("node1");
    d.status().expect("ready");
    c.lab.etcd().kill();
    let e = d.status().unwrap_err();
    assert_eq!(code(&e), 50, "{e}");
    finish(c);
}

#[test]
fn bad_input_gets_the_right_code_and_leaves_nothing() {
    let mut c = CniLab::new("cni_bad_input", 1);
    let d = c.driver("node1");
    let pod = c.pod_netns();
    let att = c.attachment(pod);
    let plugin = c.plugin("node1", false);

    // Malformed JSON: decode error.
    let e = d
        .exec("tessera", "ADD", &att, &json!("{not json"))
        .unwrap_err();
    assert_eq!(code(&e), 6, "{e}");
    // Unknown cniVersion.
    let mut conf = plugin.clone();
    conf["cniVersion"] = json!("9.9.9");
    conf["name"] = json!("k8s-pod-network");
    let e = d.exec("tessera", "ADD", &att, &conf).unwrap_err();
    assert_eq!(code(&e), 1, "{e}");
    // Missing environment (no netns).
    conf["cniVersion"] = json!("1.1.0");
    let mut no_netns = att.clone();
    no_netns.netns = String::new();
    let e = d.exec("tessera", "ADD", &no_netns, &conf).unwrap_err();
    assert_eq!(code(&e), 4, "{e}");
    // A netns path that does not exist: unknown container.
    let mut gone = att.clone();
    gone.netns = "/run/netns/tessera-no-such-netns".into();
    let e = d.exec("tessera", "ADD", &gone, &conf).unwrap_err();
    assert_eq!(code(&e), 3, "{e}");
    // An `ips` address outside every pool.
    let mut outside = att.clone();
    outside
        .capability_args
        .insert("ips".into(), json!(["10.99.0.1/32"]));
    let e = d.add(&outside).unwrap_err();
    assert_eq!(code(&e), 102, "{e}");
    // `IP=` in CNI_ARGS that is not an address.
    let mut garbage = att.clone();
    garbage.args.insert("IP".into(), "not-an-ip".into());
    let e = d.add(&garbage).unwrap_err();
    assert_eq!(code(&e), 7, "{e}");
    // A failure after the addresses were assigned (the pod already has an eth0): ADD rolls
    // back (address released, host end removed).
    c.pods[pod]
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "other",
        ])
        .expect("squat eth0");
    let e = d.add(&att).unwrap_err();
    assert_eq!(code(&e), 7, "{e}");
    assert!(
        e.to_string().contains("already has an interface eth0"),
        "{e}"
    );

    assert!(c.host_links("node1").is_empty(), "a link was left behind");
    assert!(
        c.etcd_keys("/tessera/v1/ipam/handles/").is_empty(),
        "an address was left allocated"
    );
    assert!(c.etcd_keys("/tessera/v1/workloads/").is_empty());
    let snap = c
        .lab
        .etcd_prefix("/tessera/v1/ipam/blocks/")
        .expect("blocks");
    assert!(
        snap.iter().all(|(_, v)| !v.contains("\"handle\"")),
        "allocations left: {snap:?}"
    );
    finish(c);
}

#[test]
fn requested_addresses_through_ips_and_ip_args() {
    let mut c = CniLab::new("cni_exact", 1);
    let d = c.driver("node1");
    let pod = c.pod_netns();
    let mut att = c.attachment(pod);
    att.capability_args
        .insert("ips".into(), json!(["10.244.77.7/32"]));
    att.capability_args
        .insert("mac".into(), json!("02:42:0a:f4:4d:07"));
    let r = d.add(&att).expect("ADD with ips");
    assert_eq!(ips(&r)[0], "10.244.77.7");
    assert_eq!(r["interfaces"][1]["mac"], "02:42:0a:f4:4d:07");
    // The same address for another pod: in use.
    let pod2 = c.pod_netns();
    let mut att2 = c.attachment(pod2);
    att2.args.insert("IP".into(), "10.244.77.7".into());
    assert_eq!(code(&d.add(&att2).unwrap_err()), 101);
    att2.args.insert("IP".into(), "10.244.77.8".into());
    assert_eq!(ips(&d.add(&att2).expect("ADD with IP="))[0], "10.244.77.8");
    finish(c);
}

#[test]
fn fifty_parallel_adds_then_dels_on_one_node() {
    let mut c = CniLab::new("cni_parallel", 1);
    let pods: Vec<usize> = (0..50).map(|_| c.pod_netns()).collect();
    let d = c.driver("node1");
    let atts: Vec<_> = pods.iter().map(|p| c.attachment(*p)).collect();
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = atts.iter().map(|a| s.spawn(|| d.add(a))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("ADD"))
            .collect()
    });
    let addrs: HashSet<String> = results.iter().flat_map(ips).collect();
    assert_eq!(addrs.len(), 100, "50 pods x (v4 + v6), no duplicate");
    assert_eq!(c.host_links("node1").len(), 50);
    // 50 pods fit one block per family: concurrent ADDs on a fresh node share the block the
    // first one claims (each sees the affinity the one before it wrote).
    let blocks = c.etcd_keys("/tessera/v1/ipam/blocks/");
    assert_eq!(blocks.len(), 2, "one IPv4 and one IPv6 block: {blocks:?}");
    std::thread::scope(|s| {
        for (a, r) in atts.iter().zip(&results) {
            let d = &d;
            s.spawn(move || d.del(a, Some(r)).expect("DEL"));
        }
    });
    assert!(c.host_links("node1").is_empty());
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
    assert!(c.etcd_keys("/tessera/v1/workloads/").is_empty());
    finish(c);
}

#[test]
fn chained_with_debians_portmap_and_bandwidth() {
    let mut c = CniLab::new("cni_chain", 1);
    // Debian's reference plugins speak up to 1.0.0.
    let plugins = vec![
        c.plugin("node1", false),
        json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": false }),
        json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } }),
    ];
    let d = c.driver_with("node1", "1.0.0", plugins);
    let pod = c.pod_netns();
    let mut att = c.attachment(pod);
    att.capability_args.insert(
        "portMappings".into(),
        json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }]),
    );
    att.capability_args.insert(
        "bandwidth".into(),
        json!({ "ingressRate": 1_000_000, "ingressBurst": 100_000, "egressRate": 1_000_000, "egressBurst": 100_000 }),
    );
    let r = d.add(&att).expect("ADD through the chain");
    // prevResult went through both: the final result still has our interface and address.
    assert_eq!(ips(&r).len(), 1);
    let host_if = r["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    // bandwidth shaped our host interface; portmap made its DNAT rule.
    let node = &c.lab.node("node1").netns;
    let qdisc = node
        .exec("tc", &["qdisc", "show", "dev", &host_if])
        .expect("tc");
    assert!(qdisc.contains("tbf"), "{qdisc}");
    let nat = node
        .exec("iptables-save", &["-t", "nat"])
        .expect("iptables-save");
    assert!(nat.contains("8080"), "{nat}");
    // CHECK of our own plugin with the chain's final result as prevResult. (Debian's portmap
    // 1.1.1 fails its own CHECK: it looks for its IPv4 DNAT rule in the IPv6 table.)
    let ours = c.driver_with("node1", "1.0.0", vec![c.plugin("node1", false)]);
    ours.check(&att, &r)
        .expect("CHECK of tessera with the chained result");
    d.del(&att, Some(&r)).expect("DEL through the chain");
    assert!(c.host_links("node1").is_empty());
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
    finish(c);
}

#[test]
fn other_ipam_plugins_are_delegated_and_tessera_ipam_runs_standalone() {
    let mut c = CniLab::new("cni_delegate", 1);
    // tessera wiring with Debian's host-local for addresses.
    let data = tempfile::tempdir().expect("tempdir");
    let mut plugin = c.plugin("node1", false);
    plugin["ipam"] = json!({
        "type": "host-local",
        "dataDir": data.path(),
        "ranges": [[{ "subnet": "10.244.200.0/24" }]]
    });
    let d = c.driver_with("node1", "1.0.0", vec![plugin]);
    let pod = c.pod_netns();
    let att = c.attachment(pod);
    let r = d.add(&att).expect("ADD with host-local");
    let addr = ips(&r)[0].clone();
    assert!(addr.starts_with("10.244.200."), "{r}");
    assert!(
        data.path().join("k8s-pod-network").join(&addr).exists(),
        "host-local lease"
    );
    d.del(&att, Some(&r)).expect("DEL");
    assert!(
        !data.path().join("k8s-pod-network").join(&addr).exists(),
        "lease released"
    );

    // tessera-ipam as another main plugin would delegate to it: ADD, CHECK, DEL.
    let mut conf = c.plugin("node1", true);
    conf["cniVersion"] = json!("1.1.0");
    conf["name"] = json!("k8s-pod-network");
    conf["type"] = json!("tessera-ipam");
    let pod = c.pod_netns();
    let att = c.attachment(pod);
    let r = d
        .exec("tessera-ipam", "ADD", &att, &conf)
        .expect("IPAM ADD")
        .expect("result");
    assert_eq!(ips(&r).len(), 2, "{r}");
    assert!(
        r["interfaces"].as_array().is_none_or(Vec::is_empty),
        "IPAM wires nothing: {r}"
    );
    assert!(c.host_links("node1").is_empty());
    conf["prevResult"] = r.clone();
    d.exec("tessera-ipam", "CHECK", &att, &conf)
        .expect("IPAM CHECK");
    assert_eq!(c.etcd_keys("/tessera/v1/ipam/handles/").len(), 1);
    d.exec("tessera-ipam", "DEL", &att, &conf)
        .expect("IPAM DEL");
    assert!(c.etcd_keys("/tessera/v1/ipam/handles/").is_empty());
    // CHECK now fails: the handle no longer holds the addresses.
    let e = d.exec("tessera-ipam", "CHECK", &att, &conf).unwrap_err();
    assert_eq!(code(&e), 105, "{e}");
    finish(c);
}

#[test]
fn pod_intents_ask_for_addresses_and_pools() {
    let mut c = CniLab::new("cni_intents", 1);
    let d = c.driver("node1");
    let pod = c.pod_netns();
    let pod2 = c.pod_netns();
    let att = c.attachment(pod);
    let intent = |pod: usize, v: serde_json::Value| {
        c.lab
            .etcdctl(&[
                "put",
                &format!("/tessera/v1/pod-intents/default/pod-{pod}"),
                &v.to_string(),
            ])
            .expect("put intent");
    };
    intent(pod, json!({ "ipAddrs": ["10.244.99.9"] }));
    let r = d.add(&att).expect("ADD with ipAddrs");
    assert_eq!(ips(&r)[0], "10.244.99.9");

    // Both ipAddrs and ipAddrsNoIpam: refused, nothing allocated.
    intent(
        pod2,
        json!({ "ipAddrs": ["10.244.99.10"], "ipAddrsNoIpam": ["10.250.0.1"] }),
    );
    assert_eq!(code(&d.add(&c.attachment(pod2)).unwrap_err()), 7);
    // ipAddrsNoIpam alone: refused while the feature flag is off.
    intent(pod2, json!({ "ipAddrsNoIpam": ["10.250.0.1"] }));
    let e = d.add(&c.attachment(pod2)).unwrap_err();
    assert_eq!(code(&e), 7);
    assert!(e.to_string().contains("ipAddrsNoIpam"), "{e}");
    assert_eq!(c.etcd_keys("/tessera/v1/ipam/handles/").len(), 1);
    assert_eq!(c.host_links("node1").len(), 1);
    finish(c);
}

#[test]
fn pods_get_the_mtu_the_tunnel_code_writes() {
    let mut c = CniLab::new("cni_mtu", 1);
    // What the node agent does at start: underlay MTU minus the VXLAN overhead, to the file.
    let mtu_file = c.logs.path().join("mtu");
    let mtu = tessera_tunnel::mtu::pod_mtu(1500, &[tessera_tunnel::mtu::Encap::Vxlan]);
    tessera_tunnel::mtu::write_mtu_file(&mtu_file, mtu).expect("write mtu");
    let mut plugin = c.plugin("node1", false);
    plugin.as_object_mut().expect("object").remove("mtu");
    plugin["mtuFile"] = json!(mtu_file);
    let d = c.driver_with("node1", "1.1.0", vec![plugin]);
    let pod = c.pod_netns();
    let att = c.attachment(pod);
    let r = d.add(&att).expect("ADD");
    let link = c.pods[pod]
        .ip_json(&["link", "show", "eth0"])
        .expect("link");
    assert_eq!(link[0]["mtu"], 1450);
    let host_if = r["interfaces"][0]["name"]
        .as_str()
        .expect("host if")
        .to_string();
    let host = c
        .lab
        .node("node1")
        .netns
        .ip_json(&["link", "show", &host_if])
        .expect("host link");
    assert_eq!(host[0]["mtu"], 1450);
    d.del(&att, Some(&r)).expect("DEL");
    finish(c);
}
