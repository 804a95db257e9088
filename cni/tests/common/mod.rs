//! A lab for CNI tests: nodes with a conflist each, pods as namespaces, the spec 1.1 driver.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_cni::driver::{Attachment, Driver, DriverError};
use tessera_testbed::{Lab, LabSpec, Netns};

pub const POOLS: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: pods-v4 }
spec: { cidr: 10.244.0.0/16, blockSize: 26 }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: pods-v6 }
spec: { cidr: \"fd10:244::/48\", blockSize: 122 }
";

pub struct CniLab {
    pub pods: Vec<Netns>,
    pub lab: Lab,
    pub logs: tempfile::TempDir,
}

pub fn bin_dirs() -> Vec<PathBuf> {
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_tessera"));
    vec![
        ours.parent().expect("bin dir").to_path_buf(),
        PathBuf::from("/usr/lib/cni"),
    ]
}

impl CniLab {
    pub fn new(test: &str, nodes: usize) -> Self {
        let lab = Lab::new(
            test,
            LabSpec {
                nodes,
                subnets: 1,
                etcd: true,
            },
        )
        .expect("lab");
        lab.apply_yaml(POOLS).expect("pools");
        CniLab {
            pods: Vec::new(),
            lab,
            logs: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The `tessera` plugin entry for a node.
    pub fn plugin(&self, node: &str, dual_stack: bool) -> Value {
        json!({
            "type": "tessera",
            "nodename": node,
            "datastore": { "etcdEndpoints": [self.lab.etcd_endpoint()], "timeoutMs": 2000 },
            "logFile": self.logs.path().join("cni.log"),
            // The lab's own: nothing left in /var/run/tessera.
            "ipamLockFile": self.logs.path().join(format!("ipam-{node}.lock")),
            "mtu": 1500,
            "ipam": { "type": "tessera-ipam", "assignIpv4": true, "assignIpv6": dual_stack },
            "capabilities": { "ips": true, "mac": true }
        })
    }

    pub fn driver_with(&self, node: &str, version: &str, plugins: Vec<Value>) -> Driver {
        let conflist =
            json!({ "cniVersion": version, "name": "k8s-pod-network", "plugins": plugins });
        Driver::from_conflist(&conflist, bin_dirs())
            .expect("conflist")
            .in_netns(self.lab.node(node).netns.path())
    }

    pub fn driver(&self, node: &str) -> Driver {
        self.driver_with(node, "1.1.0", vec![self.plugin(node, true)])
    }

    /// A new pod namespace (not yet wired).
    pub fn pod_netns(&mut self) -> usize {
        let n = self.pods.len();
        let ns = Netns::new(&format!("{}-p{n}", self.lab.prefix())).expect("pod netns");
        self.pods.push(ns);
        n
    }

    pub fn attachment(&self, pod: usize) -> Attachment {
        Attachment {
            container_id: format!("c{:062x}", pod),
            netns: self.pods[pod].path(),
            ifname: "eth0".into(),
            // As kubelet passes them.
            args: BTreeMap::from([
                ("IgnoreUnknown".to_string(), "1".to_string()),
                ("K8S_POD_NAMESPACE".to_string(), "default".to_string()),
                ("K8S_POD_NAME".to_string(), format!("pod-{pod}")),
            ]),
            capability_args: Default::default(),
        }
    }

    /// ADD a new pod on `node`; returns (pod index, result).
    pub fn add_pod(&mut self, node: &str) -> (usize, Value) {
        let pod = self.pod_netns();
        let att = self.attachment(pod);
        let r = self
            .driver(node)
            .add(&att)
            .unwrap_or_else(|e| panic!("ADD pod {pod} on {node}: {e}"));
        (pod, r)
    }

    pub fn etcd_keys(&self, prefix: &str) -> Vec<String> {
        self.lab
            .etcd_prefix(prefix)
            .expect("etcd")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// Names of `cali*` links on a node, once the reapers of earlier DELs have deleted the
    /// links those retired (fails if one is still there after 10 s: a reaper that never ran).
    pub fn host_links(&self, node: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let links = self
                .lab
                .node(node)
                .netns
                .ip_json(&["link", "show"])
                .expect("links");
            let cali: Vec<&Value> = links
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("cali")))
                .collect();
            let retired = cali
                .iter()
                .filter(|l| l["ifalias"] == tessera_tunnel::routes::RETIRED_ALIAS)
                .count();
            if retired == 0 {
                return cali
                    .iter()
                    .filter_map(|l| l["ifname"].as_str())
                    .map(str::to_string)
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "{retired} retired links on {node} never reaped: {cali:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .collect()
}

pub fn code(e: &DriverError) -> u64 {
    e.code()
        .unwrap_or_else(|| panic!("not a plugin error: {e}"))
}
