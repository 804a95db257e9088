//! The CNI protocol (spec 1.1 and the versions runtimes still send): environment, network
//! configuration, results, and version handling.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CniError;

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A spec version as a comparable triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u8, pub u8, pub u8);

impl Version {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        if !SUPPORTED_VERSIONS.contains(&s) {
            return Err(CniError::incompatible(format!(
                "unsupported cniVersion {s:?}; supported: {}",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let mut it = s.split('.').map(|p| p.parse::<u8>().unwrap_or(0));
        Ok(Version(
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The CNI_* environment.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
    pub path: Vec<PathBuf>,
}

/// CNI_ARGS keys Tessera understands; others need `IgnoreUnknown=1`.
const KNOWN_ARGS: [&str; 7] = [
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IP",
    "MAC",
];

impl CniEnv {
    pub fn from_env() -> Result<Self, CniError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Parses and validates the environment for its command (required variables present,
    /// CNI_ARGS well formed).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND {other:?}"
                )))
            }
            None => return Err(CniError::invalid_env("CNI_COMMAND is not set")),
        };
        let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
        let env = CniEnv {
            command,
            container_id: non_empty("CNI_CONTAINERID"),
            netns: non_empty("CNI_NETNS"),
            ifname: non_empty("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
            path: get("CNI_PATH")
                .unwrap_or_default()
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        };
        let required: &[(&str, bool)] = match command {
            Command::Add | Command::Check => &[
                ("CNI_CONTAINERID", env.container_id.is_some()),
                ("CNI_NETNS", env.netns.is_some()),
                ("CNI_IFNAME", env.ifname.is_some()),
            ],
            Command::Del => &[
                ("CNI_CONTAINERID", env.container_id.is_some()),
                ("CNI_IFNAME", env.ifname.is_some()),
            ],
            _ => &[],
        };
        for (name, present) in required {
            if !present {
                return Err(CniError::invalid_env(format!(
                    "{name} is required for this command"
                )));
            }
        }
        if let Some(id) = &env.container_id {
            if !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(CniError::invalid_env(format!(
                    "CNI_CONTAINERID {id:?} has invalid characters"
                )));
            }
        }
        if let Some(ifname) = &env.ifname {
            if ifname.len() > 15 || ifname.contains('/') || ifname.is_empty() {
                return Err(CniError::invalid_env(format!(
                    "CNI_IFNAME {ifname:?} is not a valid interface name"
                )));
            }
        }
        Ok(env)
    }

    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or("eth0")
    }
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::invalid_env(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"))
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    let ignore_unknown = out
        .get("IgnoreUnknown")
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !ignore_unknown {
        if let Some(k) = out.keys().find(|k| !KNOWN_ARGS.contains(&k.as_str())) {
            return Err(CniError::invalid_env(format!(
                "unknown CNI_ARGS key {k:?} (set IgnoreUnknown=1 to ignore)"
            )));
        }
    }
    Ok(out)
}

/// The network configuration on stdin (one plugin's entry of a conflist, with `name` and
/// `cniVersion` filled in by the runtime).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub datastore: DatastoreConf,
    /// The apiserver, for a pod whose intent the Kubernetes controllers have not written
    /// yet (install-cni.sh writes the kubeconfig, as Calico's install does).
    #[serde(default)]
    pub kubernetes: Option<KubernetesConf>,
    /// This node's name in the datastore; else TESSERA_NODENAME, else `nodenameFile`, else
    /// the hostname.
    #[serde(default)]
    pub nodename: Option<String>,
    #[serde(default)]
    pub nodename_file: Option<String>,
    /// Host-side interface name prefix (Calico's `cali`).
    #[serde(default)]
    pub veth_prefix: Option<String>,
    /// The pod's device pair: `veth` (the default) or `netkit` (L3 mode, Linux 6.7+).
    #[serde(default)]
    pub pod_interface: crate::wiring::PodInterface,
    /// Where the node agent writes the pod MTU, when `mtu` is not set.
    #[serde(default)]
    pub mtu_file: Option<String>,
    #[serde(default)]
    pub log_file: Option<String>,
    /// The node-wide IPAM lock; its handoff and queue go beside it (default: under
    /// /var/run/tessera, named by node, datastore and network namespace).
    #[serde(default)]
    pub ipam_lock_file: Option<String>,
    #[serde(default)]
    pub feature_flags: FeatureFlags,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// Everything else (capabilities, other plugins' settings) passes through untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesConf {
    pub kubeconfig: String,
}

/// The datastore settings every Tessera binary shares (names, defaults, TLS).
pub use tessera_datastore::connection::DatastoreConfig as DatastoreConf;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureFlags {
    /// Allow pod intents with `ipAddrsNoIpam` (off by default: only this node can route them).
    #[serde(default)]
    pub ip_addrs_no_ipam: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The `ips` capability: exact addresses (with or without a prefix length).
    #[serde(default)]
    pub ips: Vec<String>,
    /// The `mac` capability.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub ipam_type: String,
    #[serde(default = "yes")]
    pub assign_ipv4: bool,
    #[serde(default)]
    pub assign_ipv6: bool,
    #[serde(default)]
    pub ipv4_pools: Vec<String>,
    #[serde(default)]
    pub ipv6_pools: Vec<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        // Read the version first so that even a config we cannot decode gets an error in
        // the version it asked for.
        let conf: NetConf = serde_json::from_slice(stdin)
            .map_err(|e| CniError::decode(format!("network configuration: {e}")))?;
        Version::parse(&conf.cni_version)?;
        if conf.name.is_empty() || !tessera_datastore::keys::valid_segment(&conf.name) {
            return Err(CniError::invalid_config(
                "`name` must be non-empty printable ASCII without '/'",
            ));
        }
        Ok(conf)
    }

    pub fn version(&self) -> Version {
        Version::parse(&self.cni_version).unwrap_or(Version(1, 1, 0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// An ADD result. Serialised in the version the config asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// The result as JSON for `version`: 0.3.x and 0.4.0 carry a `version` per IP.
    pub fn to_json(&self, version: &str) -> Value {
        let legacy = Version::parse(version)
            .map(|v| v < Version(1, 0, 0))
            .unwrap_or(false);
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = serde_json::to_value(ip).unwrap_or(Value::Null);
                if legacy {
                    if let Some(o) = v.as_object_mut() {
                        let fam = if ip.address.is_ipv4() { "4" } else { "6" };
                        o.insert("version".into(), Value::String(fam.into()));
                    }
                }
                v
            })
            .collect();
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::String(version.into()));
        out.insert(
            "interfaces".into(),
            serde_json::to_value(&self.interfaces).unwrap_or_default(),
        );
        out.insert("ips".into(), Value::Array(ips));
        out.insert(
            "routes".into(),
            serde_json::to_value(&self.routes).unwrap_or_default(),
        );
        out.insert(
            "dns".into(),
            if self.dns.is_null() {
                Value::Object(Map::new())
            } else {
                self.dns.clone()
            },
        );
        Value::Object(out)
    }

    pub fn from_json(v: &Value) -> Result<Self, CniError> {
        serde_json::from_value(v.clone()).map_err(|e| CniError::decode(format!("prevResult: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_NETNS"));
        let ok = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;FOO=bar"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .expect("DEL needs no netns");
        assert_eq!(ok.arg("K8S_POD_NAME"), Some("web"));
        assert_eq!(ok.path.len(), 2);
    }

    #[test]
    fn unknown_args_are_refused_without_ignore_unknown() {
        let e = env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "FOO=bar")]).unwrap_err();
        assert_eq!(e.code, 4);
        let e = env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "garbage")]).unwrap_err();
        assert_eq!(e.code, 4);
    }

    #[test]
    fn results_carry_ip_version_before_1_0() {
        let r = CniResult {
            ips: vec![IpConfig {
                address: "10.244.0.5/32".parse().expect("net"),
                gateway: None,
                interface: Some(1),
            }],
            ..Default::default()
        };
        assert_eq!(r.to_json("0.3.1")["ips"][0]["version"], "4");
        assert!(r.to_json("1.1.0")["ips"][0].get("version").is_none());
        assert_eq!(r.to_json("1.0.0")["cniVersion"], "1.0.0");
    }

    #[test]
    fn unknown_versions_are_incompatible() {
        assert_eq!(Version::parse("0.2.0").unwrap_err().code, 1);
        assert_eq!(Version::parse("2.0.0").unwrap_err().code, 1);
        assert!(Version::parse("0.4.0").expect("ok") < Version::parse("1.0.0").expect("ok"));
        let e = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, 6);
    }
}
