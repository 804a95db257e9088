//! A running cluster on the test bed: the [`Lab`]'s namespaces and etcd, a `tessera-node`
//! agent per node, a BGP router on the underlay (Tessera's own speaker, as a top-of-rack
//! router would be), and pods wired by the real CNI plugin. Used by the README's lab command
//! and by the end-to-end tests. Everything it starts it stops by PID on drop.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_datastore::keys;
use tessera_datastore::model::PodIntent;

use crate::process::Child;
use crate::{Lab, LabSpec, Netns};

/// The router's BGP address (on subnet 0; nodes on other subnets reach it through it).
pub const ROUTER_BGP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// One pool per mode: routed by BGP (with natOutgoing), VXLAN CrossSubnet, VXLAN Always, and
/// an IPv6 VXLAN pool.
pub const MODE_POOLS: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: bgp }
spec: { cidr: 10.244.0.0/20, blockSize: 26, natOutgoing: true }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: vxlan-crosssubnet }
spec: { cidr: 10.244.16.0/20, blockSize: 26, vxlanMode: CrossSubnet }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: vxlan-always }
spec: { cidr: 10.244.32.0/20, blockSize: 26, vxlanMode: Always }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: vxlan-v6 }
spec: { cidr: \"fd10:244::/48\", blockSize: 122, vxlanMode: Always }
";

/// Where the project's binaries are: next to this executable (bins) or one level up (tests
/// and benches run from `target/<profile>/deps`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for d in [
        dir.clone(),
        dir.parent().map(Path::to_path_buf).unwrap_or_default(),
    ] {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "binary {name} not found next to {} (build the workspace first: cargo build --workspace)",
        exe.display()
    );
}

/// A pool of exactly ten addresses (a /28 cut into /30 blocks, six reserved): small enough to
/// run out, the shape of a service's fixed addresses.
pub const POOL_OF_TEN: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: ten }
spec: { cidr: 10.244.100.0/28, blockSize: 30 }
---
apiVersion: tessera.dev/v1
kind: IPReservation
metadata: { name: not-these-six }
spec:
  reservedCidrs: [10.244.100.10/31, 10.244.100.12/30]
";

pub struct Pod {
    pub name: String,
    pub node: String,
    pub pool: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, for pods started with an IPv6 pool too.
    pub ip6: Option<std::net::Ipv6Addr>,
    pub netns: Netns,
    container_id: String,
}

/// How a CNI invocation that was to be killed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniEnd {
    /// It finished before the kill (successfully or not).
    Finished { ok: bool },
    /// SIGKILL while it ran.
    Killed,
}

/// What the CNI plugin is told about a pod.
struct PodRef<'a> {
    node: &'a str,
    name: &'a str,
    container_id: &'a str,
    netns: &'a Netns,
    ipv6: bool,
}

impl<'a> From<&'a Pod> for PodRef<'a> {
    fn from(p: &'a Pod) -> Self {
        PodRef {
            node: &p.node,
            name: &p.name,
            container_id: &p.container_id,
            netns: &p.netns,
            ipv6: p.ip6.is_some(),
        }
    }
}

/// Options for the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub lab: LabSpec,
    /// Pools (YAML) applied before the agents start.
    pub pools: String,
    /// Extra agent configuration (YAML), merged into every agent's file.
    pub agent_yaml: String,
    /// Run the underlay router's BGP speaker (needed for routed pools across subnets).
    pub router_bgp: bool,
    /// Node labels (`k=v,k2=v2`) per node name, given to its agent.
    pub node_labels: std::collections::BTreeMap<String, String>,
    /// etcd members: 1 runs in the control namespace; more run as a cluster, each in its
    /// own namespace ([`Lab::with_etcd_cluster`]).
    pub etcd_members: u8,
    /// With several members: the one whose data lives on a small filesystem of its own, to
    /// fill ([`crate::Etcd::fill_disk`]).
    pub etcd_small_disk: Option<usize>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            lab: LabSpec {
                nodes: 4,
                subnets: 2,
                etcd: true,
            },
            pools: String::new(),
            agent_yaml: String::new(),
            router_bgp: true,
            node_labels: Default::default(),
            etcd_members: 1,
            etcd_small_disk: None,
        }
    }
}

/// Fields drop in order: pods and processes before the lab's namespaces.
pub struct Cluster {
    pub pods: Vec<Pod>,
    /// Sandboxes whose ADD failed, waiting for their DEL.
    failed_adds: Vec<Pod>,
    agents: Vec<Option<Child>>,
    router: Option<Child>,
    outside: Option<Netns>,
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    spec: ClusterSpec,
    pod_seq: usize,
    /// Fields added to the CNI configuration (e.g. `kubernetes`).
    pub cni_extra: serde_json::Map<String, serde_json::Value>,
}

impl Cluster {
    pub fn new(test: &str, spec: ClusterSpec) -> anyhow::Result<Self> {
        let lab = if spec.etcd_members > 1 {
            Lab::with_etcd_cluster(
                test,
                spec.lab.clone(),
                spec.etcd_members,
                spec.etcd_small_disk,
            )?
        } else {
            Lab::new(test, spec.lab.clone())?
        };
        let dir = tempfile::tempdir()?;
        if !spec.pools.trim().is_empty() {
            lab.apply_yaml(&spec.pools)?;
        }
        let mut c = Cluster {
            pods: Vec::new(),
            failed_adds: Vec::new(),
            agents: Vec::new(),
            router: None,
            outside: None,
            lab,
            dir,
            spec,
            pod_seq: 0,
            cni_extra: Default::default(),
        };
        c.agents = (0..c.lab.nodes.len()).map(|_| None).collect();
        if c.spec.router_bgp {
            c.start_router()?;
        }
        Ok(c)
    }

    /// The underlay router peers with every node (iBGP, AS 64512) and installs their blocks:
    /// pods of routed pools on different subnets reach each other through it.
    fn start_router(&mut self) -> anyhow::Result<()> {
        let mut yaml = format!(
            "asn: 64512\nrouterId: {ROUTER_BGP}\nlisten: 0.0.0.0\nconnectRetrySeconds: 1\ngracefulRestartSeconds: 120\npeers:\n"
        );
        for n in &self.lab.nodes {
            yaml.push_str(&format!("  - {{ address: {}, asn: 64512 }}\n", n.ipv4.ip()));
        }
        let cfg = self.dir.path().join("router.yaml");
        std::fs::write(&cfg, yaml)?;
        let log = std::fs::File::create(self.dir.path().join("router.log"))?;
        let mut cmd = self
            .lab
            .router
            .command(&bin("tessera-routed").to_string_lossy());
        cmd.args(["run", "--config"]).arg(&cfg);
        cmd.stdout(Stdio::null()).stderr(log);
        self.router = Some(Child::spawn(cmd, "the router's BGP speaker")?);
        // Every node peers with the router.
        self.lab.apply_yaml(&format!(
            "apiVersion: tessera.dev/v1\nkind: BGPPeer\nmetadata: {{ name: underlay-router }}\nspec: {{ peerIP: {ROUTER_BGP}, asNumber: 64512 }}\n"
        ))?;
        Ok(())
    }

    pub fn node_index(&self, node: &str) -> usize {
        self.lab
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    pub fn health_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.health"))
    }

    pub fn mtu_file(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.mtu"))
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.log"))
    }

    /// Starts (or restarts) the agent of `node`.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self.node_index(node);
        let cfg = self.dir.path().join("agent.yaml");
        if !cfg.exists() {
            let yaml = if self.spec.agent_yaml.trim().is_empty() {
                "leaseTtlSeconds: 10\ngc:\n  workloadGraceSeconds: 30\n".to_string()
            } else {
                self.spec.agent_yaml.clone()
            };
            std::fs::write(&cfg, yaml)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log(node))?;
        let mut cmd = self.lab.nodes[i]
            .netns
            .command(&bin("tessera-node").to_string_lossy());
        cmd.arg("--config")
            .arg(&cfg)
            .env("NODENAME", node)
            .env("ETCD_ENDPOINTS", self.lab.etcd_endpoint())
            // What the agent used before the shared default (5 s): failover tests time by it.
            .env("ETCD_TIMEOUT_MS", "3000")
            .env("IP_AUTODETECTION_METHOD", "interface=eth0")
            .env(
                "TESSERA_HEALTH_LISTEN",
                format!("unix:{}", self.health_socket(node).display()),
            )
            .env("TESSERA_MTU_FILE", self.mtu_file(node))
            .env(
                "TESSERA_IDENTITY_FILE",
                self.dir.path().join(format!("{node}.identity")),
            )
            .env("TESSERA_LOG", "info")
            .env(
                "TESSERA_LABELS",
                self.spec.node_labels.get(node).cloned().unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(log);
        self.agents[i] = Some(Child::spawn(cmd, &format!("tessera-node on {node}"))?);
        Ok(())
    }

    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.lab.nodes.iter().map(|n| n.name.clone()).collect();
        for n in names {
            self.start_agent(&n)?;
        }
        Ok(())
    }

    /// kill -9 the agent of `node`.
    pub fn kill_agent(&mut self, node: &str) {
        let i = self.node_index(node);
        if let Some(mut a) = self.agents[i].take() {
            a.kill();
        }
    }

    /// The node dies: its agent is killed, its pods' and its own namespace vanish, and no
    /// CNI DEL ever runs.
    pub fn kill_node(&mut self, node: &str) {
        let i = self.node_index(node);
        if let Some(mut a) = self.agents.remove(i) {
            a.kill();
        }
        self.pods.retain(|p| p.node != node);
        drop(self.lab.nodes.remove(i));
    }

    /// Sends `sig` to the agent of `node` (SIGSTOP/SIGCONT freeze and thaw it).
    pub fn signal_agent(&self, node: &str, sig: nix::sys::signal::Signal) {
        let i = self.node_index(node);
        if let Some(a) = &self.agents[i] {
            a.signal(sig);
        }
    }

    /// SIGTERM; returns whether it exited within `grace`.
    pub fn stop_agent(&mut self, node: &str, grace: Duration) -> Option<std::process::ExitStatus> {
        let i = self.node_index(node);
        self.agents[i].take().and_then(|mut a| a.stop(grace))
    }

    pub fn agent_exited(&mut self, node: &str) -> Option<std::process::ExitStatus> {
        let i = self.node_index(node);
        self.agents[i].as_mut().and_then(Child::try_wait)
    }

    /// GET `path` from the agent's health endpoint: (status code, body).
    pub fn http(&self, node: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let mut s = std::os::unix::net::UnixStream::connect(self.health_socket(node))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {out:?}"))?;
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        Ok((code, body))
    }

    /// The BGP sessions `node`'s agent reports established (its /metrics; 0 when it does not
    /// answer).
    pub fn bgp_sessions_established(&self, node: &str) -> usize {
        self.http(node, "/metrics")
            .map(|(_, m)| {
                m.lines()
                    .filter(|l| {
                        l.starts_with("tessera_bgp_session_established{") && l.ends_with(" 1")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits until every agent answers /readyz with 200.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for n in &self.lab.nodes {
            loop {
                match self.http(&n.name, "/readyz") {
                    Ok((200, _)) => break,
                    other if Instant::now() > deadline => {
                        anyhow::bail!("{} not ready: {other:?}", n.name)
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        Ok(())
    }

    fn cni_config(&self, node: &str, ipv6: bool) -> String {
        let mut conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "k8s-pod-network",
            "type": "tessera",
            "nodename": node,
            "datastore": { "etcdEndpoints": self.lab.etcd_endpoints(), "timeoutMs": 3000 },
            "mtuFile": self.mtu_file(node),
            "logFile": self.dir.path().join("cni.log"),
            // The cluster's own: nothing left in /var/run/tessera.
            "ipamLockFile": self.dir.path().join(format!("ipam-{node}.lock")),
            "ipam": { "type": "tessera-ipam", "assignIpv4": true, "assignIpv6": ipv6 }
        });
        for (k, v) in &self.cni_extra {
            conf[k] = v.clone();
        }
        conf.to_string()
    }

    /// Runs the CNI plugin for one pod, as a runtime would.
    fn cni(&self, command: &str, p: &PodRef<'_>) -> anyhow::Result<serde_json::Value> {
        self.cni_with(command, p, None)
    }

    fn cni_with(
        &self,
        command: &str,
        p: &PodRef<'_>,
        prev_result: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut cmd = self.cni_command(command, p);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            let mut conf: serde_json::Value =
                serde_json::from_str(&self.cni_config(p.node, p.ipv6))?;
            if let Some(prev) = prev_result {
                conf["prevResult"] = prev;
            }
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            anyhow::bail!("CNI {command} of {} on {}: {text}", p.name, p.node);
        }
        Ok(if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Starts pod `name` on `node` (namespace `default`) with whatever its intent in etcd
    /// says, as written by the Kubernetes controllers; returns its index.
    pub fn add_pod_as_kubernetes_says(&mut self, node: &str, name: &str) -> anyhow::Result<usize> {
        self.add_pod_as(node, "", None, Some(name))
    }

    /// Starts a pod on `node` with an address from `pool`; returns its index.
    pub fn add_pod(&mut self, node: &str, pool: &str) -> anyhow::Result<usize> {
        self.add_pod_with(node, pool, None)
    }

    /// Starts a pod called `name` (a workload's replacement pod keeps its name, and with it
    /// its last address when that is free).
    pub fn add_named_pod(&mut self, node: &str, pool: &str, name: &str) -> anyhow::Result<usize> {
        self.add_pod_as(node, pool, None, Some(name))
    }

    /// CNI CHECK of pod `i`, with the result ADD gave as prevResult.
    pub fn check_pod(&self, i: usize) -> anyhow::Result<()> {
        let p = &self.pods[i];
        let mut ips =
            vec![serde_json::json!({ "address": format!("{}/32", p.ip), "interface": 1 })];
        if let Some(v6) = p.ip6 {
            ips.push(serde_json::json!({ "address": format!("{v6}/128"), "interface": 1 }));
        }
        let prev = serde_json::json!({ "cniVersion": "1.1.0", "ips": ips });
        self.cni_with("CHECK", &PodRef::from(p), Some(prev))?;
        Ok(())
    }

    /// Cuts `node` off from etcd only (a `prohibit` route to the etcd address inside the
    /// node's namespace): its agent, pods, data plane and BGP sessions keep running.
    pub fn partition_from_etcd(&self, node: &str) -> anyhow::Result<()> {
        self.etcd_route(node, "add")
    }

    pub fn heal_partition(&self, node: &str) -> anyhow::Result<()> {
        self.etcd_route(node, "del")
    }

    fn etcd_route(&self, node: &str, verb: &str) -> anyhow::Result<()> {
        let etcd = self.etcd_address()?;
        let n = &self.lab.node(node).netns;
        n.ip(&["route", verb, "prohibit", &format!("{etcd}/32")])?;
        Ok(())
    }

    fn etcd_address(&self) -> anyhow::Result<String> {
        let ep = self.lab.etcd_endpoint();
        ep.trim_start_matches("http://")
            .split(':')
            .next()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no host in {ep}"))
    }

    /// Starts a pod with an IPv4 address from `pool` and, with `pool6`, an IPv6 one too.
    pub fn add_pod_with(
        &mut self,
        node: &str,
        pool: &str,
        pool6: Option<&str>,
    ) -> anyhow::Result<usize> {
        self.add_pod_as(node, pool, pool6, None)
    }

    fn add_pod_as(
        &mut self,
        node: &str,
        pool: &str,
        pool6: Option<&str>,
        name: Option<&str>,
    ) -> anyhow::Result<usize> {
        let (name, netns, container_id) = self.new_pod(node, pool, pool6, name)?;
        let r = self.cni(
            "ADD",
            &PodRef {
                node,
                name: &name,
                container_id: &container_id,
                netns: &netns,
                ipv6: pool6.is_some(),
            },
        )?;
        let addrs: Vec<std::net::IpAddr> = r["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        let ip = addrs
            .iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(v) => Some(*v),
                _ => None,
            })
            .ok_or_else(|| anyhow::anyhow!("no IPv4 address in {r}"))?;
        let ip6 = addrs.iter().find_map(|a| match a {
            std::net::IpAddr::V6(v) => Some(*v),
            _ => None,
        });
        self.pods.push(Pod {
            name,
            node: node.to_string(),
            pool: pool.to_string(),
            ip,
            ip6,
            netns,
            container_id,
        });
        Ok(self.pods.len() - 1)
    }

    /// Starts one IPv4 pod per `(node, pool)`, `parallel` CNI ADDs at a time (as kubelets
    /// on many nodes do); returns their indices. Stops at the first failure.
    pub fn add_pods(
        &mut self,
        wanted: &[(String, String)],
        parallel: usize,
    ) -> anyhow::Result<Vec<usize>> {
        let mut added = Vec::with_capacity(wanted.len());
        for batch in wanted.chunks(parallel.max(1)) {
            let mut fresh = Vec::with_capacity(batch.len());
            for (node, pool) in batch {
                fresh.push((node, pool, self.new_pod(node, pool, None, None)?));
            }
            let this = &*self;
            let results: Vec<anyhow::Result<serde_json::Value>> = std::thread::scope(|s| {
                let runs: Vec<_> = fresh
                    .iter()
                    .map(|(node, _, (name, netns, container_id))| {
                        s.spawn(move || {
                            this.cni(
                                "ADD",
                                &PodRef {
                                    node,
                                    name,
                                    container_id,
                                    netns,
                                    ipv6: false,
                                },
                            )
                        })
                    })
                    .collect();
                runs.into_iter()
                    .map(|r| r.join().expect("CNI ADD thread"))
                    .collect()
            });
            for ((node, pool, (name, netns, container_id)), r) in fresh.into_iter().zip(results) {
                let ip = first_ipv4(&r?)?;
                self.pods.push(Pod {
                    name,
                    node: node.clone(),
                    pool: pool.clone(),
                    ip,
                    ip6: None,
                    netns,
                    container_id,
                });
                added.push(self.pods.len() - 1);
            }
        }
        Ok(added)
    }

    /// Gives `node` these labels (`k=v,k2=v2`) from its agent's next start on.
    pub fn set_node_labels(&mut self, node: &str, labels: &str) {
        self.spec
            .node_labels
            .insert(node.to_string(), labels.to_string());
    }

    /// A new pod's name (given, or `<node>-<pool>-<n>`), its namespace and container id,
    /// with its intent (the pools it asks for) in etcd, as the Kubernetes integration writes
    /// it.
    fn new_pod(
        &mut self,
        node: &str,
        pool: &str,
        pool6: Option<&str>,
        name: Option<&str>,
    ) -> anyhow::Result<(String, Netns, String)> {
        self.pod_seq += 1;
        let name = name
            .map(str::to_string)
            .unwrap_or_else(|| format!("{node}-{pool}-{}", self.pod_seq));
        // An empty pool: the intent is someone else's to write (the Kubernetes controllers).
        if !pool.is_empty() {
            let intent = PodIntent {
                ipv4_pools: vec![pool.to_string()],
                ipv6_pools: pool6.into_iter().map(String::from).collect(),
                ..Default::default()
            };
            self.lab.etcdctl(&[
                "put",
                &keys::pod_intent("default", &name),
                &serde_json::to_string(&intent)?,
            ])?;
        }
        let netns = Netns::new(&format!("{}-p{}", self.lab.prefix(), self.pod_seq))?;
        let container_id = format!("{:064x}", self.pod_seq);
        Ok((name, netns, container_id))
    }

    /// A CNI ADD killed in its middle, as a node crash or an OOM kill leaves it: the plugin
    /// runs with debug logs; as soon as it says it assigned addresses and starts wiring,
    /// etcd is stopped (SIGSTOP, so the endpoint write cannot land), the plugin is killed
    /// with SIGKILL, and etcd continues. Returns the addresses it had been given and whether
    /// its endpoint got written anyway (the kill came too late: no leak). The pod's
    /// namespace goes with its links.
    pub fn add_pod_killed_mid_add(
        &mut self,
        node: &str,
        pool: &str,
    ) -> anyhow::Result<(Vec<std::net::IpAddr>, bool)> {
        use std::io::BufRead;
        let (name, netns, container_id) = self.new_pod(node, pool, None, None)?;
        let i = self.node_index(node);
        let plugin = bin("tessera");
        let mut cmd: Command = self.lab.nodes[i].netns.command(&plugin.to_string_lossy());
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &container_id)
            .env("CNI_NETNS", netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
            )
            .env("TESSERA_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut conf = tempfile::tempfile()?;
        conf.write_all(self.cni_config(node, false).as_bytes())?;
        std::io::Seek::rewind(&mut conf)?;
        let mut child = Child::spawn_with_stdin(cmd, "the CNI plugin", Stdio::from(conf))?;
        let stderr = child
            .take_stderr()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let mut addresses = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line?;
            if let Some(rest) = line.split("ADD: wiring addresses=[").nth(1) {
                addresses = rest
                    .split(']')
                    .next()
                    .unwrap_or("")
                    .split(", ")
                    .filter_map(|a| a.trim().parse().ok())
                    .collect();
                let etcd = self
                    .lab
                    .etcd()
                    .pid()
                    .map(|p| nix::unistd::Pid::from_raw(p as i32));
                if let Some(pid) = etcd {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
                }
                child.kill();
                if let Some(pid) = etcd {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                }
                break;
            }
        }
        drop(child);
        drop(netns);
        let recorded = self
            .lab
            .etcdctl(&["get", &keys::workload(node, "default", &name, "eth0")])?
            .contains(&name);
        Ok((addresses, recorded))
    }

    /// The plugin's command for `p`, with the environment a runtime sets.
    fn cni_command(&self, command: &str, p: &PodRef<'_>) -> Command {
        let i = self.node_index(p.node);
        let plugin = bin("tessera");
        let mut cmd: Command = self.lab.nodes[i].netns.command(&plugin.to_string_lossy());
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", p.container_id)
            .env("CNI_NETNS", p.netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}",
                    p.name
                ),
            );
        cmd
    }

    /// Starts the CNI plugin for `p` without waiting for it (its stdin already written).
    fn spawn_cni(&self, command: &str, p: &PodRef<'_>) -> anyhow::Result<Child> {
        let mut cmd = self.cni_command(command, p);
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut conf = tempfile::tempfile()?;
        conf.write_all(self.cni_config(p.node, p.ipv6).as_bytes())?;
        std::io::Seek::rewind(&mut conf)?;
        Child::spawn_with_stdin(cmd, "the CNI plugin", Stdio::from(conf))
    }

    /// Runs `command` for `p` and SIGKILLs the plugin after `delay` unless it finished;
    /// returns how it ended and, when it finished, what it printed.
    fn cni_killed_after(
        &self,
        command: &str,
        p: &PodRef<'_>,
        delay: Duration,
    ) -> anyhow::Result<(CniEnd, String)> {
        let mut child = self.spawn_cni(command, p)?;
        let mut stdout = child
            .take_stdout()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let until = Instant::now() + delay;
        let status = loop {
            if let Some(s) = child.try_wait() {
                break Some(s);
            }
            if Instant::now() >= until {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let end = match status {
            Some(s) => CniEnd::Finished { ok: s.success() },
            None => {
                child.kill();
                CniEnd::Killed
            }
        };
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        Ok((end, out))
    }

    /// A crash during ADD: the plugin is SIGKILLed after `delay` (unless it finished first)
    /// and, unless the ADD finished and succeeded, the sandbox goes with the crash and no
    /// DEL ever comes. Returns how the plugin ended.
    pub fn add_pod_killed_after(&mut self, node: &str, delay: Duration) -> anyhow::Result<CniEnd> {
        let (name, netns, container_id) = self.new_pod(node, "", None, None)?;
        let pod = Pod {
            name,
            node: node.to_string(),
            pool: String::new(),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
            netns,
            container_id,
        };
        let (end, out) = self.cni_killed_after("ADD", &PodRef::from(&pod), delay)?;
        if end == (CniEnd::Finished { ok: true }) {
            let r: serde_json::Value = serde_json::from_str(&out)?;
            let ip = first_ipv4(&r)?;
            self.pods.push(Pod { ip, ..pod });
        }
        Ok(end)
    }

    /// A crash during DEL of pod `i`: the plugin is SIGKILLed after `delay` (unless it
    /// finished first) and the pod's sandbox is gone either way, with no DEL retried.
    pub fn delete_pod_killed_after(&mut self, i: usize, delay: Duration) -> anyhow::Result<CniEnd> {
        let pod = self.pods.remove(i);
        let (end, _) = self.cni_killed_after("DEL", &PodRef::from(&pod), delay)?;
        Ok(end)
    }

    /// CNI DEL of a pod, and its namespace gone. A failed DEL leaves the pod in place (a
    /// runtime retries it).
    pub fn delete_pod(&mut self, i: usize) -> anyhow::Result<()> {
        self.cni("DEL", &PodRef::from(&self.pods[i]))?;
        self.pods.remove(i);
        Ok(())
    }

    /// ADD as kubelet runs it: when the ADD fails, the sandbox is kept for a DEL, which the
    /// runtime retries until it succeeds ([`Cluster::retry_failed_adds_del`]). Returns the
    /// pod's index, or the ADD's error.
    pub fn add_pod_as_kubelet(&mut self, node: &str, pool: &str) -> anyhow::Result<usize> {
        let (name, netns, container_id) = self.new_pod(node, pool, None, None)?;
        let pod = Pod {
            name,
            node: node.to_string(),
            pool: pool.to_string(),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
            netns,
            container_id,
        };
        match self.cni("ADD", &PodRef::from(&pod)) {
            Ok(r) => {
                let ip = first_ipv4(&r)?;
                self.pods.push(Pod { ip, ..pod });
                Ok(self.pods.len() - 1)
            }
            Err(e) => {
                self.failed_adds.push(pod);
                Err(e)
            }
        }
    }

    /// DEL of every sandbox whose ADD failed; returns how many DELs still fail.
    pub fn retry_failed_adds_del(&mut self) -> usize {
        let failed = std::mem::take(&mut self.failed_adds);
        for p in failed {
            if self.cni("DEL", &PodRef::from(&p)).is_err() {
                self.failed_adds.push(p);
            }
        }
        self.failed_adds.len()
    }

    /// One ping from pod `from` to `to`: the round trip in ms, or None if it did not cross.
    pub fn ping(&self, from: usize, to: impl Into<std::net::IpAddr>) -> Option<f64> {
        ping_in(&self.pods[from].netns, to, 1)
    }

    /// Waits until pod `from` reaches `to` (convergence), or `timeout`.
    pub fn wait_ping(
        &self,
        from: usize,
        to: impl Into<std::net::IpAddr> + Copy,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.ping(from, to).is_some() {
                return true;
            }
        }
        false
    }

    /// An "outside" host, 203.0.113.10/24 behind the router, that knows the underlay
    /// (198.18.0.0/15) but has no route to pods: a pod reaches it only with its source
    /// translated. Returns its namespace (dropped with the cluster).
    pub fn add_outside_host(&mut self) -> anyhow::Result<Ipv4Addr> {
        let ns = Netns::new(&format!("{}-out", self.lab.prefix()))?;
        self.lab.router.veth_to("out0", &ns, "eth0")?;
        self.lab
            .router
            .ip(&["addr", "add", "203.0.113.254/24", "dev", "out0"])?;
        self.lab.router.ip(&["link", "set", "out0", "up"])?;
        ns.ip(&["addr", "add", "203.0.113.10/24", "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "198.18.0.0/15", "via", "203.0.113.254"])?;
        self.outside = Some(ns);
        Ok(Ipv4Addr::new(203, 0, 113, 10))
    }

    pub fn outside(&self) -> Option<&Netns> {
        self.outside.as_ref()
    }

    /// `ip -j route` of a node's main table, IPv4.
    pub fn routes(&self, node: &str) -> Vec<serde_json::Value> {
        let i = self.node_index(node);
        self.lab.nodes[i]
            .netns
            .ip_json(&["route", "show"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// `tesseractl ipam check` in the control namespace: the number of findings (`usize::MAX`
    /// when the report cannot be read) and the report.
    pub fn ipam_check(&self) -> (usize, String) {
        let out = self
            .lab
            .ctl
            .command(&bin("tesseractl").to_string_lossy())
            .args([
                "--etcd-endpoints",
                &self.lab.etcd_endpoint(),
                "ipam",
                "check",
            ])
            .env("NO_COLOR", "1")
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| e.to_string());
        let n = text
            .split(" finding(s)")
            .next()
            .and_then(|t| t.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        (n, text)
    }

    /// PIDs of the running agents.
    pub fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().flatten().map(Child::pid).collect()
    }

    /// The agent's PID per node, in node order (`None` where it is not running).
    pub fn agent_pids_by_node(&self) -> Vec<Option<u32>> {
        self.agents
            .iter()
            .map(|a| a.as_ref().map(Child::pid))
            .collect()
    }

    /// Node namespaces, router and control: what [`crate::assert_nothing_left`] checks.
    pub fn pids(&self) -> Vec<u32> {
        let mut p = self.lab.pids();
        p.extend(self.agents.iter().flatten().map(Child::pid));
        p.extend(self.router.iter().map(Child::pid));
        p
    }

    /// Tears everything down and checks nothing is left.
    pub fn finish(self) {
        let prefix = self.lab.prefix().to_string();
        let pids = self.pids();
        drop(self);
        crate::assert_nothing_left(&prefix, &pids);
    }
}

/// A ping running in the background (every 50 ms) until [`ContinuousPing::finish`].
pub struct ContinuousPing(Child);

impl ContinuousPing {
    pub fn start(ns: &Netns, to: Ipv4Addr) -> anyhow::Result<Self> {
        let mut cmd = ns.command("ping");
        cmd.args(["-n", "-q", "-i", "0.05", &to.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        Ok(ContinuousPing(Child::spawn(cmd, "ping")?))
    }

    /// Stops it (SIGINT, so it prints its summary): (transmitted, received).
    pub fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        self.0.signal(nix::sys::signal::Signal::SIGINT);
        let mut out = String::new();
        if let Some(mut o) = self.0.take_stdout() {
            o.read_to_string(&mut out)?;
        }
        self.0.stop(Duration::from_secs(2));
        let line = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| anyhow::anyhow!("no ping summary in {out:?}"))?;
        let num = |i: usize| -> u64 {
            line.split(',')
                .nth(i)
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok((num(0), num(1)))
    }
}

/// `ping -c1 -W<secs>` from `ns`: the round trip in ms.
/// The first IPv4 address of a CNI result.
fn first_ipv4(r: &serde_json::Value) -> anyhow::Result<Ipv4Addr> {
    r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find_map(|a| a.split('/').next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no IPv4 address in {r}"))
}

pub fn ping_in(ns: &Netns, to: impl Into<std::net::IpAddr>, wait_secs: u32) -> Option<f64> {
    let to: std::net::IpAddr = to.into();
    let out = ns
        .exec(
            "ping",
            &["-n", "-c1", &format!("-W{wait_secs}"), &to.to_string()],
        )
        .ok()?;
    out.split("time=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}
