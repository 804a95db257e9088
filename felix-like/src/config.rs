//! The agent's configuration: a YAML file (the ConfigMap) overlaid by environment variables
//! (the DaemonSet's `env:`), validated with errors that name the field or variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::autodetect::Method;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name (`NODENAME`).
    #[serde(default)]
    pub node_name: String,
    /// How to reach etcd (the settings every Tessera binary shares; `ETCD_*` variables
    /// override them).
    #[serde(default)]
    pub datastore: tessera_datastore::connection::DatastoreConfig,
    /// `IP_AUTODETECTION_METHOD`: first-found, can-reach=<addr>, interface=<regex>, or an
    /// explicit address with its prefix length.
    #[serde(default)]
    pub ip_autodetection_method: Method,
    /// `AS`: the node's AS number. Unset: the one its Node record has (an operator's
    /// `tesseractl apply`), else the BGPConfiguration's, else 64512.
    #[serde(default)]
    pub as_number: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the CNI plugin reads the pod MTU (`mtuFile` in its config).
    #[serde(default = "default_mtu_file")]
    pub mtu_file: PathBuf,
    /// `host:port`, or `unix:<path>` for a socket.
    #[serde(default = "default_health")]
    pub health_listen: String,
    /// Seconds the liveness lease outlives a silent agent.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
    /// The witness endpoint, on the node's underlay address: GC asks it before reclaiming a
    /// node whose lease lapsed (`TESSERA_WITNESS_PORT`; 0 turns it off, and then such a node
    /// is never reclaimed without a decommission).
    #[serde(default = "default_witness_port")]
    pub witness_port: u16,
    /// Where the agent keeps its identity across restarts (`TESSERA_IDENTITY_FILE`).
    #[serde(default = "default_identity_file")]
    pub identity_file: PathBuf,
    /// Full reconcile of the kernel state every so often (netlink events trigger one at once).
    #[serde(default = "default_reconcile")]
    pub reconcile_interval_ms: u64,
    #[serde(default)]
    pub bgp: BgpSettings,
    #[serde(default)]
    pub gc: GcSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_bgp_port")]
    pub port: u16,
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    #[serde(default = "default_gr")]
    pub graceful_restart_seconds: u16,
}

impl Default for BgpSettings {
    fn default() -> Self {
        BgpSettings {
            enabled: true,
            port: default_bgp_port(),
            hold_time: default_hold(),
            graceful_restart_seconds: default_gr(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GcSettings {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_gc_interval")]
    pub interval_seconds: u64,
    /// An allocation whose workload is gone is released only after this long.
    #[serde(default = "default_grace")]
    pub workload_grace_seconds: u64,
    /// TTL of the leader lease: how long GC pauses when its leader dies.
    #[serde(default = "default_leader_lease")]
    pub leader_lease_seconds: u64,
    /// A node whose lease lapsed (suspect) is reclaimed only after this long, and only if its
    /// agent does not answer the witness probe. The default is the 300 s Kubernetes waits
    /// before evicting the pods of an unreachable node: by then the cluster treats them as
    /// gone too.
    #[serde(default = "default_reclaim_after")]
    pub reclaim_after_seconds: u64,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            enabled: true,
            interval_seconds: default_gc_interval(),
            workload_grace_seconds: default_grace(),
            leader_lease_seconds: default_leader_lease(),
            reclaim_after_seconds: default_reclaim_after(),
        }
    }
}

fn yes() -> bool {
    true
}
/// The AS of a node when nothing sets one (Calico's default too).
pub const DEFAULT_ASN: u32 = 64512;
fn default_mtu_file() -> PathBuf {
    PathBuf::from("/var/lib/tessera/mtu")
}
fn default_health() -> String {
    "127.0.0.1:9099".into()
}
fn default_lease_ttl() -> u64 {
    30
}
fn default_reclaim_after() -> u64 {
    300
}
fn default_witness_port() -> u16 {
    9097
}
fn default_identity_file() -> PathBuf {
    PathBuf::from("/var/lib/tessera/agent-identity")
}
fn default_leader_lease() -> u64 {
    10
}
fn default_reconcile() -> u64 {
    5000
}
fn default_bgp_port() -> u16 {
    179
}
fn default_hold() -> u16 {
    90
}
fn default_gr() -> u16 {
    120
}
fn default_gc_interval() -> u64 {
    5
}
fn default_grace() -> u64 {
    60
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("field {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("datastore: {0}")]
    Datastore(String),
}

/// Where the health endpoints listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl AgentConfig {
    /// The configuration from `file` (if any), then the environment (`env` looks a variable
    /// up; pass `std::env::var` in production), validated.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::load_with_flags(file, env, &Default::default())
    }

    /// [`AgentConfig::load`], then the datastore flags of the command line over both.
    pub fn load_with_flags(
        file: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &tessera_datastore::connection::DatastoreFlags,
    ) -> Result<Self, ConfigError> {
        let text = match file {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.into(),
                source,
            })?,
            None => "{}".into(),
        };
        let mut cfg: AgentConfig = if text.trim().is_empty() {
            serde_saphyr::from_str("{}")
        } else {
            serde_saphyr::from_str(&text)
        }
        .map_err(|e| ConfigError::Yaml {
            path: file.map(Into::into).unwrap_or_default(),
            message: e.to_string(),
        })?;
        if let Some(v) = env("NODENAME") {
            cfg.node_name = v;
        }
        cfg.datastore
            .apply_env(&env)
            .map_err(|e| ConfigError::Datastore(e.to_string()))?;
        flags.apply(&mut cfg.datastore);
        if let Some(v) = env("IP_AUTODETECTION_METHOD") {
            cfg.ip_autodetection_method = v.parse().map_err(|message| ConfigError::Env {
                var: "IP_AUTODETECTION_METHOD",
                message,
            })?;
        }
        if let Some(v) = env("AS") {
            cfg.as_number = Some(v.parse().map_err(|_| ConfigError::Env {
                var: "AS",
                message: format!("{v:?} is not an AS number"),
            })?);
        }
        if let Some(v) = env("TESSERA_HEALTH_LISTEN") {
            cfg.health_listen = v;
        }
        if let Some(v) = env("TESSERA_MTU_FILE") {
            cfg.mtu_file = v.into();
        }
        if let Some(v) = env("TESSERA_IDENTITY_FILE") {
            cfg.identity_file = v.into();
        }
        if let Some(v) = env("TESSERA_WITNESS_PORT") {
            cfg.witness_port = v.parse().map_err(|_| ConfigError::Env {
                var: "TESSERA_WITNESS_PORT",
                message: format!("{v:?} is not a port"),
            })?;
        }
        if let Some(v) = env("TESSERA_LABELS") {
            for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, val) = pair.split_once('=').ok_or_else(|| ConfigError::Env {
                    var: "TESSERA_LABELS",
                    message: format!("{pair:?} is not key=value"),
                })?;
                cfg.labels.insert(k.trim().into(), val.trim().into());
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !tessera_datastore::keys::valid_segment(&self.node_name) {
            return Err(ConfigError::Invalid {
                field: "nodeName",
                message: format!(
                    "{:?} is not a node name (set NODENAME or nodeName)",
                    self.node_name
                ),
            });
        }
        self.datastore
            .validate()
            .map_err(|e| ConfigError::Datastore(e.to_string()))?;
        if self.as_number == Some(0) {
            return Err(ConfigError::Invalid {
                field: "asNumber",
                message: "0 is not a usable AS number".into(),
            });
        }
        if self.lease_ttl_seconds < 2 {
            return Err(ConfigError::Invalid {
                field: "leaseTtlSeconds",
                message: "must be at least 2".into(),
            });
        }
        self.health()?;
        Ok(())
    }

    pub fn health(&self) -> Result<HealthListen, ConfigError> {
        match self.health_listen.strip_prefix("unix:") {
            Some(path) => Ok(HealthListen::Unix(path.into())),
            None => self
                .health_listen
                .parse()
                .map(HealthListen::Tcp)
                .map_err(|_| ConfigError::Invalid {
                    field: "healthListen",
                    message: format!(
                        "{:?} is neither host:port nor unix:<path>",
                        self.health_listen
                    ),
                }),
        }
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms.max(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("node.yaml");
        std::fs::write(
            &f,
            "nodeName: from-file\ndatastore: { etcdEndpoints: [\"http://198.18.0.2:2379\"] }\nasNumber: 65001\nbgp:\n  holdTime: 9\n",
        )
        .expect("write");
        let c = AgentConfig::load(
            Some(&f),
            env(&[
                ("NODENAME", "node-a"),
                ("IP_AUTODETECTION_METHOD", "can-reach=198.18.0.2"),
                ("TESSERA_LABELS", "rack=r1, zone=z"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.as_number, Some(65001));
        assert_eq!(c.bgp.hold_time, 9);
        assert_eq!(
            c.ip_autodetection_method,
            Method::CanReach("198.18.0.2".parse().expect("addr"))
        );
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("z"));
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("node.yaml");
        std::fs::write(&f, "nodeName: a\netcdEndpoint: [x]\n").expect("write");
        let e = AgentConfig::load(Some(&f), env(&[])).expect_err("unknown field");
        assert!(e.to_string().contains("etcdEndpoint"), "{e}");
        let e = AgentConfig::load(None, env(&[("NODENAME", "a")])).expect_err("no etcd");
        assert!(e.to_string().contains("ETCD_ENDPOINTS"), "{e}");
        let e = AgentConfig::load(
            None,
            env(&[
                ("NODENAME", "a"),
                ("ETCD_ENDPOINTS", "http://x:2379"),
                ("IP_AUTODETECTION_METHOD", "nearest"),
            ]),
        )
        .expect_err("bad method");
        assert!(e.to_string().contains("IP_AUTODETECTION_METHOD"), "{e}");
        let e = AgentConfig::load(
            None,
            env(&[
                ("NODENAME", "a"),
                ("ETCD_ENDPOINTS", "http://x:2379"),
                ("AS", "sixty"),
            ]),
        )
        .expect_err("bad AS");
        assert!(e.to_string().contains("AS"), "{e}");
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The ConfigMap in deploy/ stays a valid agent configuration.
    #[test]
    fn the_daemonsets_configmap_is_valid() {
        let manifest = include_str!("../../deploy/kubernetes/tessera-node.yaml");
        let start = manifest
            .find("tessera-node.yaml: |")
            .expect("the ConfigMap key");
        let body: String = manifest[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("tessera-node.yaml");
        std::fs::write(&f, body).expect("write");
        let c = AgentConfig::load(Some(&f), |k| (k == "NODENAME").then(|| "node-a".into()))
            .expect("valid");
        assert_eq!(c.datastore.etcd_endpoints, ["https://10.0.0.1:2379"]);
        assert!(c.datastore.etcd_cert_file.is_some() && c.datastore.etcd_key_file.is_some());
        assert_eq!(c.gc.workload_grace_seconds, 60);
        assert_eq!(
            c.health().expect("health"),
            HealthListen::Tcp("127.0.0.1:9099".parse().expect("addr"))
        );
    }
}
