//! tesseractl against Debian's etcd: apply/get/delete round trips with golden tables, an
//! invalid multi-document file applies nothing, pools in use are not deleted unless forced,
//! `ipam check` finds a leaked address, `node decommission` writes the record; and the same
//! over TLS with client certificates.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ipnetwork::IpNetwork;
use tessera_datastore::ipam::{AssignRequest, Ipam, Owner};
use tessera_datastore::kv::{EtcdKv, Kv};
use tessera_datastore::model::WorkloadEndpoint;
use tessera_datastore::resources::put_workload_endpoint_bound;
use tessera_datastore::snapshot::Snapshot;
use tessera_testbed::pki::Pki;
use tessera_testbed::Etcd;

const CTL: &str = env!("CARGO_BIN_EXE_tesseractl");

const RESOURCES: &str = r#"
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: default-ipv4 }
spec: { cidr: 10.244.0.0/16, vxlanMode: CrossSubnet, natOutgoing: true }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: fixed }
spec: { cidr: 10.244.200.0/28, blockSize: 28 }
---
apiVersion: tessera.dev/v1
kind: BGPPeer
metadata: { name: tor }
spec: { peerIP: 198.18.0.1, asNumber: 65000 }
---
apiVersion: tessera.dev/v1
kind: Node
metadata: { name: node1, labels: { rack: r1 } }
spec: { ipv4Address: 198.18.0.11/24 }
"#;

struct Ctl {
    args: Vec<String>,
}

impl Ctl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new(CTL);
        c.args(&self.args)
            .args(args)
            .env_remove("ETCD_ENDPOINTS")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("tesseractl");
        if let Some(s) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(s.as_bytes())
                .expect("write stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("tesseractl ran")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "tesseractl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(!out.status.success(), "tesseractl {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// An ADD's IPAM step for pod `name` (as the CNI plugin does it): one address from `fixed`,
/// its attributes naming the endpoint to come. Returns the address and the handle revision.
async fn assign_for_pod(kv: &EtcdKv, name: &str) -> (std::net::IpAddr, i64) {
    let ipam = Ipam::new(kv.clone(), "node1");
    let handle = format!("k8s-pod-network.{name}.eth0");
    let req = AssignRequest {
        owner: Owner {
            handle: handle.clone(),
            attrs: [
                ("namespace", "default"),
                ("pod", name),
                ("ifname", "eth0"),
                ("containerID", name),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        },
        num_v4: 1,
        pools: vec!["fixed".into()],
        ..Default::default()
    };
    let got = ipam.auto_assign(&req).await.expect("an address");
    (
        got[0].addr,
        ipam.handle_revision(&handle).await.expect("rev"),
    )
}

/// The rest of that ADD: its endpoint, written as the plugin writes it.
async fn finish_add(kv: &EtcdKv, name: &str, assigned: &(std::net::IpAddr, i64)) {
    let wep = WorkloadEndpoint {
        node: "node1".into(),
        namespace: "default".into(),
        pod: name.into(),
        container_id: name.into(),
        interface: "eth0".into(),
        host_interface: None,
        mac: None,
        addresses: vec![IpNetwork::from(assigned.0)],
        handle: format!("k8s-pod-network.{name}.eth0"),
        floating_ips: vec![],
        conflict: None,
    };
    put_workload_endpoint_bound(kv, &wep, assigned.1)
        .await
        .expect("endpoint");
}

#[tokio::test]
async fn resources_round_trip_and_ipam_is_checked() {
    tessera_testbed::require_root();
    let etcd = Etcd::start_loopback().expect("etcd");
    let ctl = Ctl {
        args: vec!["--etcd-endpoints".into(), etcd.endpoint().into()],
    };
    assert_eq!(
        ctl.ok(&["apply", "-f", "-"], Some(RESOURCES)),
        "IPPool default-ipv4 created\nIPPool fixed created\nBGPPeer tor created\nNode node1 created\n"
    );
    assert_eq!(
        ctl.ok(&["get", "ippools"], None),
        "\
NAME          CIDR             BLOCK  ENCAPSULATION      NAT  DISABLED
default-ipv4  10.244.0.0/16    /26    VXLAN CrossSubnet  yes  no
fixed         10.244.200.0/28  /28    none               no   no
"
    );
    // What get prints in YAML and JSON applies back unchanged.
    let yaml = ctl.ok(&["get", "ippool", "-o", "yaml"], None);
    assert_eq!(
        ctl.ok(&["apply", "-f", "-"], Some(&yaml)),
        "IPPool default-ipv4 unchanged\nIPPool fixed unchanged\n"
    );
    let json = ctl.ok(&["get", "node", "node1", "-o", "json"], None);
    assert_eq!(
        ctl.ok(&["replace", "-f", "-"], Some(&json)),
        "Node node1 unchanged\n"
    );
    assert!(ctl
        .fails(&["create", "-f", "-"], Some(RESOURCES))
        .contains("already exists"));

    // An invalid second document: nothing of the file is applied.
    let bad = format!(
        "{}---\napiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: broken }}\nspec: {{ cidr: 10.245.0.0/16, blockSize: 8 }}\n",
        RESOURCES.replace("asNumber: 65000", "asNumber: 65001")
    );
    let e = ctl.fails(&["apply", "-f", "-"], Some(&bad));
    assert!(
        e.contains("document 5") && e.contains("spec.blockSize") && e.contains("nothing applied"),
        "{e}"
    );
    assert!(ctl
        .ok(&["get", "bgppeer", "-o", "wide"], None)
        .contains("65000"));

    // Addresses in use: one with a workload endpoint would be fine; these have none.
    let kv = EtcdKv::connect(&[etcd.endpoint().to_string()], Duration::from_secs(3))
        .await
        .expect("kv");
    let ipam = Ipam::new(kv.clone(), "node1");
    let req = AssignRequest {
        owner: Owner {
            handle: "k8s-pod-network.lost-del".into(),
            attrs: [("containerID".to_string(), "lost-del".to_string())].into(),
            ..Default::default()
        },
        num_v4: 2,
        pools: vec!["fixed".into()],
        ..Default::default()
    };
    let got = ipam.auto_assign(&req).await.expect("two addresses");
    let show = ctl.ok(&["ipam", "show", "--show-blocks"], None);
    assert!(show.contains("fixed") && show.contains("2 (12%)"), "{show}");
    assert!(show.contains("10.244.200.0/28  node1"), "{show}");

    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let out = ctl.run(
        &["ipam", "check", "-o", &report_path.to_string_lossy()],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "findings: exit 1");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("json");
    let leaked: Vec<&str> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "leakedAddress")
        .filter_map(|f| f["address"].as_str())
        .collect();
    let want: Vec<String> = got.iter().map(|a| a.addr.to_string()).collect();
    assert_eq!(leaked, want, "{report}");
    let who = ctl.ok(&["ipam", "show", "--ip", &want[0]], None);
    assert!(
        who.contains("k8s-pod-network.lost-del") && who.contains("workload: none"),
        "{who}"
    );

    // Release from the report, while the datastore changes: a pod whose ADD finishes
    // after the report (its endpoint written) keeps its address; a pod added after the report
    // is not in it; the leaks go.
    let late = assign_for_pod(&kv, "late").await;
    let report_path2 = dir.path().join("report2.json");
    let out = ctl.run(
        &["ipam", "check", "-o", &report_path2.to_string_lossy()],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    finish_add(&kv, "late", &late).await;
    let live = assign_for_pod(&kv, "live").await;
    finish_add(&kv, "live", &live).await;
    let released = ctl.ok(
        &[
            "ipam",
            "release",
            "--from-report",
            &report_path2.to_string_lossy(),
        ],
        None,
    );
    assert!(
        released.contains("2 address(es) released, 1 stale entr(y/ies) skipped")
            && released.contains(
                "skipped handle k8s-pod-network.late.eth0: a workload endpoint holds it now"
            ),
        "{released}"
    );
    let clean = ctl.ok(&["ipam", "check"], None);
    assert!(clean.contains("0 finding(s)"), "{clean}");
    let allocated: Vec<String> = Snapshot::read(&kv)
        .await
        .expect("snapshot")
        .allocations()
        .into_iter()
        .map(|(a, _)| a.to_string())
        .collect();
    assert_eq!(
        allocated.len(),
        2,
        "late and live keep theirs: {allocated:?}"
    );
    let e = ctl.fails(&["ipam", "release", "--ip", &live.0.to_string()], None);
    assert!(
        e.contains("is not leaked") && e.contains("default/live"),
        "{e}"
    );

    // A pool with addresses in use is not deleted, nor shrunk, unless forced.
    // The cluster's BGP settings: one record, named default.
    let bgp = "apiVersion: tessera.dev/v1\nkind: BGPConfiguration\nmetadata: { name: default }\nspec: { asNumber: 64600, nodeToNodeMeshEnabled: false }\n";
    assert_eq!(
        ctl.ok(&["apply", "-f", "-"], Some(bgp)),
        "BGPConfiguration default created\n"
    );
    assert_eq!(
        ctl.ok(&["get", "bgpconfiguration"], None),
        "NAME     AS     NODE-TO-NODE MESH  CLUSTER ID\ndefault  64600  off                -\n"
    );
    let e = ctl.fails(
        &["apply", "-f", "-"],
        Some(&bgp.replace("name: default", "name: other")),
    );
    assert!(e.contains("named default"), "{e}");

    // The explicit "this node is gone".
    ctl.ok(&["node", "decommission", "node1"], None);
    assert!(kv
        .get(&tessera_datastore::keys::decommission("node1"))
        .await
        .expect("get")
        .is_some());
}

#[tokio::test]
async fn over_tls_with_client_certificates() {
    tessera_testbed::require_root();
    let pki = Pki::new(&["127.0.0.1"]).expect("certificates");
    let etcd = Etcd::start_loopback_tls(&pki).expect("etcd with TLS");
    let client = pki.client();
    let flags = |cert: &std::path::Path, key: &std::path::Path| Ctl {
        args: vec![
            "--etcd-endpoints".into(),
            etcd.endpoint().into(),
            "--etcd-ca-cert-file".into(),
            pki.ca().to_string_lossy().into_owned(),
            "--etcd-cert-file".into(),
            cert.to_string_lossy().into_owned(),
            "--etcd-key-file".into(),
            key.to_string_lossy().into_owned(),
        ],
    };
    let ctl = flags(&client.cert, &client.key);
    ctl.ok(&["apply", "-f", "-"], Some(RESOURCES));
    assert!(ctl.ok(&["get", "ippools"], None).contains("default-ipv4"));
    let rogue = pki.rogue_client();
    let e = flags(&rogue.cert, &rogue.key).fails(&["get", "ippools"], None);
    assert!(e.contains("did not accept our client certificate"), "{e}");
    // The same settings from a file's `datastore:` section.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("tesseractl.yaml");
    std::fs::write(
        &cfg,
        format!(
            "datastore:\n  etcdEndpoints: [\"{}\"]\n  etcdCACertFile: {}\n  etcdCertFile: {}\n  etcdKeyFile: {}\n",
            etcd.endpoint(),
            pki.ca().display(),
            client.cert.display(),
            client.key.display()
        ),
    )
    .expect("config");
    let from_file = Ctl {
        args: vec!["--config".into(), cfg.to_string_lossy().into_owned()],
    };
    assert!(from_file.ok(&["get", "nodes"], None).contains("node1"));
}
