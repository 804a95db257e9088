use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::etcd::Etcd;
use crate::netns::Netns;
use crate::unique_prefix;

/// A node of the lab: a namespace with an underlay interface `eth0`.
pub struct LabNode {
    /// The node's name in the cluster (`node1`, ...), what its agent registers.
    pub name: String,
    pub subnet: u8,
    pub ipv4: Ipv4Network,
    pub ipv6: Ipv6Network,
    pub netns: Netns,
}

/// What to build: `subnets` underlay subnets, nodes spread over them round-robin.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub nodes: usize,
    pub subnets: u8,
    pub etcd: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            nodes: 2,
            subnets: 1,
            etcd: true,
        }
    }
}

/// A cluster of namespaces. Fields drop in order: processes first, then namespaces.
pub struct Lab {
    etcd: Option<Etcd>,
    /// The members of a multi-member etcd ([`Lab::with_etcd_cluster`]), and their namespaces.
    pub etcd_members: Vec<Etcd>,
    pub etcd_member_ns: Vec<Netns>,
    pub nodes: Vec<LabNode>,
    pub ctl: Netns,
    pub router: Netns,
    prefix: String,
}

/// Where the control namespace sits on subnet 0.
pub const CTL_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

impl Lab {
    /// Builds the lab; on any error, what was built so far is removed (drop).
    pub fn new(test: &str, spec: LabSpec) -> anyhow::Result<Self> {
        crate::require_root();
        assert!(spec.subnets >= 1 && spec.subnets <= 200 && spec.nodes <= 200);
        let prefix = unique_prefix(test);
        let router = Netns::new(&format!("{prefix}-rt"))?;
        let ctl = Netns::new(&format!("{prefix}-ctl"))?;
        let mut lab = Lab {
            etcd: None,
            etcd_members: Vec::new(),
            etcd_member_ns: Vec::new(),
            nodes: Vec::new(),
            ctl,
            router,
            prefix: prefix.clone(),
        };
        lab.router.sysctl("net.ipv4.ip_forward", "1")?;
        lab.router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for s in 0..spec.subnets {
            let br = format!("br{s}");
            lab.router.ip(&["link", "add", &br, "type", "bridge"])?;
            lab.router
                .ip(&["addr", "add", &format!("198.18.{s}.254/24"), "dev", &br])?;
            lab.router.ip(&[
                "addr",
                "add",
                &format!("2001:db8:{s}::fe/64"),
                "dev",
                &br,
                "nodad",
            ])?;
            lab.router.ip(&["link", "set", &br, "up"])?;
        }
        lab.attach(
            &lab.ctl,
            "ctl",
            0,
            CTL_ADDR,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
        )?;
        for i in 0..spec.nodes {
            let subnet = (i % usize::from(spec.subnets)) as u8;
            let host = 10 + (i / usize::from(spec.subnets)) as u8;
            let name = format!("node{}", i + 1);
            let netns = Netns::new(&format!("{prefix}-{name}"))?;
            let v4 = Ipv4Addr::new(198, 18, subnet, host);
            let v6 = Ipv6Addr::new(
                0x2001,
                0xdb8,
                u16::from(subnet),
                0,
                0,
                0,
                0,
                u16::from(host),
            );
            lab.attach(&netns, &name, subnet, v4, v6)?;
            lab.nodes.push(LabNode {
                name,
                subnet,
                ipv4: Ipv4Network::new(v4, 24)?,
                ipv6: Ipv6Network::new(v6, 64)?,
                netns,
            });
        }
        if spec.etcd {
            lab.etcd = Some(Etcd::start_in(lab.ctl.name(), &CTL_ADDR.to_string())?);
        }
        Ok(lab)
    }

    /// A lab whose etcd is a cluster of `members` members, each in its own namespace on
    /// subnet 0 (`etcd1` at 198.18.0.3, `etcd2` at .4, ...), as production runs it;
    /// `spec.etcd` is ignored.
    /// Member `small_disk`, if any, keeps its data on a small filesystem of its own
    /// ([`Etcd::fill_disk`]).
    pub fn with_etcd_cluster(
        test: &str,
        spec: LabSpec,
        members: u8,
        small_disk: Option<usize>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=9).contains(&members), "1 to 9 etcd members");
        let mut lab = Lab::new(
            test,
            LabSpec {
                etcd: false,
                ..spec
            },
        )?;
        let mut at = Vec::new();
        for i in 0..members {
            let name = format!("etcd{}", i + 1);
            let ns = Netns::new(&format!("{}-{name}", lab.prefix))?;
            let v4 = Ipv4Addr::new(198, 18, 0, 3 + i);
            lab.attach(
                &ns,
                &name,
                0,
                v4,
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3 + u16::from(i)),
            )?;
            at.push((ns.name().to_string(), v4.to_string()));
            lab.etcd_member_ns.push(ns);
        }
        let refs: Vec<(&str, &str)> = at.iter().map(|(n, a)| (n.as_str(), a.as_str())).collect();
        lab.etcd_members = Etcd::start_cluster(&refs, small_disk)?;
        Ok(lab)
    }

    /// The index in [`Lab::etcd_members`] of the current leader, by asking the members.
    pub fn etcd_leader(&self) -> anyhow::Result<usize> {
        let out = self.ctl.exec(
            "etcdctl",
            &[
                "--endpoints",
                &self.etcd_endpoint(),
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "status",
                "-w",
                "json",
            ],
        );
        // Members that are down make etcdctl fail but still print the others.
        let text = match out {
            Ok(t) => t,
            Err(e) => e.to_string(),
        };
        let start = text
            .find('[')
            .ok_or_else(|| anyhow::anyhow!("etcdctl: {text}"))?;
        let status: serde_json::Value = serde_json::Deserializer::from_str(&text[start..])
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("etcdctl: {text}"))??;
        for s in status.as_array().into_iter().flatten() {
            let (me, leader) = (&s["Status"]["header"]["member_id"], &s["Status"]["leader"]);
            if me == leader {
                let ep = s["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = self.etcd_members.iter().position(|m| m.endpoint() == ep) {
                    return Ok(i);
                }
            }
        }
        anyhow::bail!("no leader among {text}")
    }

    /// Wires `ns` to subnet `s` of the router: `eth0` in `ns`, `port` on bridge `br<s>`.
    fn attach(
        &self,
        ns: &Netns,
        port: &str,
        s: u8,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> anyhow::Result<()> {
        self.router.veth_to(port, ns, "eth0")?;
        self.router
            .ip(&["link", "set", port, "master", &format!("br{s}"), "up"])?;
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &format!("198.18.{s}.254")])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("2001:db8:{s}::fe"),
        ])?;
        Ok(())
    }

    /// Makes every underlay neighbour permanent, on both sides: the nodes', the control and
    /// etcd namespaces' and the router's. For labs of many nodes: the kernel's neighbour
    /// tables are one per family for all namespaces, and entries learned by ARP/ND are
    /// capped at `gc_thresh3` (1024) together. A 64-node full mesh alone needs 64 x 63 per
    /// family; past the cap the kernel drops packets ("neighbor table overflow", sendmsg
    /// ENOBUFS), BGP connections never open and KEEPALIVEs are lost. On a real cluster
    /// each node has its own kernel and a few dozen entries. Permanent entries are outside
    /// that cap, and raising the cap would mean writing the root namespace's sysctls.
    pub fn pin_underlay_neighbours(&self) -> anyhow::Result<()> {
        struct Endpoint<'a> {
            netns: &'a Netns,
            subnet: u8,
            mac: String,
            addresses: Vec<String>,
        }
        let mut endpoints = Vec::new();
        let members = std::iter::once(&self.ctl)
            .chain(&self.etcd_member_ns)
            .chain(self.nodes.iter().map(|n| &n.netns));
        for netns in members {
            let mac = mac_of(netns, "eth0")?;
            let addr = netns.ip_json(&["addr", "show", "dev", "eth0", "scope", "global"])?;
            let addresses: Vec<String> = addr[0]["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["local"].as_str().map(str::to_string))
                .collect();
            let subnet = addresses
                .iter()
                .find_map(|a| a.parse::<Ipv4Addr>().ok())
                .map(|a| a.octets()[2])
                .ok_or_else(|| anyhow::anyhow!("{}: eth0 has no IPv4 address", netns.name()))?;
            endpoints.push(Endpoint {
                netns,
                subnet,
                mac,
                addresses,
            });
        }
        let entry = |address: &str, mac: &str, dev: &str| {
            format!("neigh replace {address} lladdr {mac} dev {dev} nud permanent")
        };
        let mut router_lines = Vec::new();
        let mut bridge_mac = std::collections::BTreeMap::new();
        for s in endpoints.iter().map(|e| e.subnet) {
            if let std::collections::btree_map::Entry::Vacant(v) = bridge_mac.entry(s) {
                v.insert(mac_of(&self.router, &format!("br{s}"))?);
            }
        }
        for e in &endpoints {
            let mut lines = Vec::new();
            for other in endpoints.iter().filter(|o| o.subnet == e.subnet) {
                if std::ptr::eq(other.netns, e.netns) {
                    continue;
                }
                for a in &other.addresses {
                    lines.push(entry(a, &other.mac, "eth0"));
                }
            }
            let s = e.subnet;
            for gateway in [format!("198.18.{s}.254"), format!("2001:db8:{s}::fe")] {
                lines.push(entry(&gateway, &bridge_mac[&s], "eth0"));
            }
            e.netns.ip_batch(&lines)?;
            for a in &e.addresses {
                router_lines.push(entry(a, &e.mac, &format!("br{s}")));
            }
        }
        self.router.ip_batch(&router_lines)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn etcd(&mut self) -> &mut Etcd {
        self.etcd.as_mut().expect("this lab runs etcd")
    }

    /// The etcd endpoint as node namespaces reach it; with a multi-member etcd, every
    /// member's, comma-separated (as ETCD_ENDPOINTS and etcdctl take them).
    pub fn etcd_endpoint(&self) -> String {
        if self.etcd_members.is_empty() {
            format!("http://{CTL_ADDR}:2379")
        } else {
            self.etcd_endpoints().join(",")
        }
    }

    /// The etcd endpoints, one per member (as `etcdEndpoints` lists them).
    pub fn etcd_endpoints(&self) -> Vec<String> {
        if self.etcd_members.is_empty() {
            vec![format!("http://{CTL_ADDR}:2379")]
        } else {
            self.etcd_members
                .iter()
                .map(|m| m.endpoint().to_string())
                .collect()
        }
    }

    /// PIDs of the processes the lab itself runs (for [`crate::assert_nothing_left`]).
    pub fn pids(&self) -> Vec<u32> {
        self.etcd
            .iter()
            .chain(&self.etcd_members)
            .filter_map(Etcd::pid)
            .collect()
    }

    /// `etcdctl <args>` against the lab's etcd, run inside the control namespace.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let ep = self.etcd_endpoint();
        let mut full = vec!["--endpoints", ep.as_str()];
        full.extend_from_slice(args);
        self.ctl.exec("etcdctl", &full)
    }

    /// Every (key, value) under `prefix` in the lab's etcd.
    pub fn etcd_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let out = self.etcdctl(&["get", "--prefix", prefix])?;
        let lines: Vec<&str> = out.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect())
    }

    /// Writes the pools and reservations of a YAML document to the lab's etcd (as
    /// `resources::apply_config` would: values and the config epoch).
    /// Applies pools, reservations, BGP peers or nodes as an operator does: `tesseractl
    /// apply -f -` in the control namespace.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        tesseractl_apply(&self.ctl, &self.etcd_endpoint(), yaml)
    }

    /// Tears the lab down and asserts that it left nothing behind (namespaces, processes).
    pub fn finish(self) {
        let (prefix, pids) = (self.prefix.clone(), self.pids());
        drop(self);
        crate::assert_nothing_left(&prefix, &pids);
    }

    pub fn node(&self, name: &str) -> &LabNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the lab"))
    }
}

/// `tesseractl --etcd-endpoints <endpoints> apply -f -` inside `ns`, with `yaml` on stdin.
pub fn tesseractl_apply(ns: &Netns, endpoints: &str, yaml: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = ns.command(&crate::cluster::bin("tesseractl").to_string_lossy());
    cmd.args(["--etcd-endpoints", endpoints, "apply", "-f", "-"])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(yaml.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "tesseractl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The MAC address of `dev` in `netns`.
fn mac_of(netns: &Netns, dev: &str) -> anyhow::Result<String> {
    let link = netns.ip_json(&["link", "show", "dev", dev])?;
    link[0]["address"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{}: {dev} has no MAC address", netns.name()))
}
