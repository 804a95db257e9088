//! A cluster of three QEMU guests booting Debian's kernel (which has the ipip module this
//! development kernel lacks), each running the real `tessera-node` agent with its
//! in-process BGP speaker and getting pods through the real CNI plugin, inside the guest.
//!
//! ```text
//!                 router namespace (<prefix>-vmr): forwards, runs etcd and a BGP speaker
//!   br1 198.18.10.1/24          br2 198.18.11.1/24          out0 203.0.113.254/24
//!    |            |               |                            |
//!  vm1 .10.11   vm2 .10.12      vm3 .11.13                 outside 203.0.113.10
//! ```
//!
//! vm1 and vm2 share a subnet and vm3 is on the other, so CrossSubnet has both cases. The
//! router's speaker (Tessera's own, as a top-of-rack router would be) learns every node's
//! blocks, so that pools without encapsulation reach across subnets. The test process
//! talks to the guests over the underlay from a thread inside the router namespace (a
//! `guest-shell` runs in each guest). Everything it starts is stopped by PID on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cluster::bin;
use crate::vm::{self, Boot, Initramfs, Output};
use crate::{Child, Etcd, Netns};

/// The router's address on the first subnet: etcd, the BGP speaker, the guests' gateway.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
/// iproute2 in the guests (a bare `ip` there is busybox's applet, which knows no netns).
pub const IP: &str = "/usr/local/sbin/ip";
/// The "outside" host: reachable from pods only through natOutgoing.
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// What the guests' kernel must load: virtio, the tunnels, veth, and nftables' NAT.
const GUEST_MODULES: [&str; 10] = [
    "virtio_pci",
    "virtio_net",
    "ipip",
    "vxlan",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nf_nat",
    "nf_conntrack",
];

/// The guest's init: modules, the underlay from the kernel command line, `guest-shell`,
/// the CNI configuration, then the agent (restarted if it exits, as a DaemonSet would).
const INIT: &str = r#"#!/bin/busybox sh
# iproute2 and nft in /usr/local/sbin. Busybox's shell runs its own `ip` applet whatever
# PATH says: scripts name iproute2 by its path (IP in vm_cluster.rs).
export PATH=/usr/local/sbin:/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
ln -s /proc/self/fd /dev/fd; ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
LOAD_MODULES
for kv in $(cat /proc/cmdline); do case $kv in tb.*=*) k=${kv%%=*}; k=${k#tb.}; eval "TB_$k=${kv#*=}";; esac; done
hostname $TB_name; echo $TB_name > /etc/hostname
ip link set lo up; ip link set eth0 up
ip addr add $TB_ip dev eth0; ip route add default via $TB_gw
/bin/guest-shell 0.0.0.0:7000 >/var/log/guest-shell.log 2>&1 &
mkdir -p /etc/cni/net.d
echo '{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"tessera","nodename":"'$TB_name'","datastore":{"etcdEndpoints":["'$TB_etcd'"]},"ipam":{"type":"tessera-ipam","assignIpv4":true}}' > /etc/cni/net.d/10-tessera.conf
echo "TB: up $TB_name"
while true; do
  NODENAME=$TB_name ETCD_ENDPOINTS=$TB_etcd IP_AUTODETECTION_METHOD=interface=eth0 TESSERA_LOG=info /bin/tessera-node >>/var/log/agent.log 2>&1
  echo "TB: agent exited $?"; sleep 1
done
"#;

/// `pod-add NAME [POD_INTERFACE]`: a pod namespace wired by the CNI plugin, as a runtime
/// does; prints the plugin's result. With `POD_INTERFACE` (`veth`, `netkit`) the pod's
/// configuration says `podInterface` so. `pod-del NAME` undoes it, with the same
/// configuration.
const POD_ADD: &str = r#"#!/bin/sh
set -e
conf=/etc/cni/net.d/10-tessera.conf
if [ -n "$2" ]; then
  sed 's/"type":"tessera",/"type":"tessera","podInterface":"'"$2"'",/' $conf > /run/pod-"$1".conf
  conf=/run/pod-"$1".conf
fi
/usr/local/sbin/ip netns add "$1"
CNI_COMMAND=ADD CNI_CONTAINERID="$1" CNI_NETNS=/run/netns/"$1" CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$1" \
  /opt/cni/bin/tessera < $conf 2>>/var/log/cni.log
"#;

const POD_DEL: &str = r#"#!/bin/sh
conf=/etc/cni/net.d/10-tessera.conf
[ -f /run/pod-"$1".conf ] && conf=/run/pod-"$1".conf
CNI_COMMAND=DEL CNI_CONTAINERID="$1" CNI_NETNS=/run/netns/"$1" CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$1" \
  /opt/cni/bin/tessera < $conf 2>>/var/log/cni.log || exit 1
/usr/local/sbin/ip netns del "$1"
rm -f /run/pod-"$1".conf
"#;

pub struct Guest {
    pub name: String,
    pub ip: Ipv4Addr,
    pub log: PathBuf,
    qemu: Child,
}

pub struct VmPod {
    pub name: String,
    /// Index of its guest in [`VmCluster::guests`].
    pub guest: usize,
    pub pool: String,
    pub ip: Ipv4Addr,
}

/// Fields drop in order: guests and the router's processes before the namespaces.
pub struct VmCluster {
    pub guests: Vec<Guest>,
    pub pods: Vec<VmPod>,
    speaker: Child,
    etcd: Etcd,
    outside: Netns,
    pub router: Netns,
    pub dir: tempfile::TempDir,
    prefix: String,
    /// The unpacked kernel the guests boot ([`vm::VM_ROOT`] unless asked otherwise).
    kernel_root: PathBuf,
}

impl VmCluster {
    /// Builds the underlay, starts etcd and the router's speaker, applies `pools` (YAML, as
    /// `tesseractl apply` takes it), boots the three guests and waits until every agent
    /// says it is ready.
    pub fn new(test: &str, pools: &str) -> anyhow::Result<Self> {
        Self::with_kernel(test, pools, std::path::Path::new(vm::VM_ROOT))
    }

    /// [`VmCluster::new`] with the guests booting the kernel unpacked under `kernel_root`
    /// (e.g. [`vm::VM_ROOT_NETKIT`]). The 6.12 kernel needs a QEMU newer than bookworm's
    /// 7.2, whose TCG corrupted its memory while booting beside other guests (two of three
    /// panicked, in the slab allocator or on a stray single-step trap); install-deps.sh
    /// takes QEMU from bookworm-backports.
    pub fn with_kernel(
        test: &str,
        pools: &str,
        kernel_root: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let prefix = crate::unique_prefix(test);
        let dir = tempfile::tempdir()?;
        let router = Netns::new(&format!("{prefix}-vmr"))?;
        for (br, addr) in [("br1", "198.18.10.1/24"), ("br2", "198.18.11.1/24")] {
            router.ip(&["link", "add", br, "type", "bridge"])?;
            router.ip(&["addr", "add", addr, "dev", br])?;
            router.ip(&["link", "set", br, "up"])?;
        }
        for (tap, br) in [("tap1", "br1"), ("tap2", "br1"), ("tap3", "br2")] {
            router.ip(&["tuntap", "add", tap, "mode", "tap"])?;
            router.ip(&["link", "set", tap, "master", br, "up"])?;
        }
        router.sysctl("net.ipv4.ip_forward", "1")?;
        let outside = Netns::new(&format!("{prefix}-vmo"))?;
        router.veth_to("out0", &outside, "eth0")?;
        router.ip(&["addr", "add", "203.0.113.254/24", "dev", "out0"])?;
        router.ip(&["link", "set", "out0", "up"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "eth0"])?;
        outside.ip(&["link", "set", "eth0", "up"])?;
        // The outside knows the underlay but not the pods: only translated packets return.
        outside.ip(&["route", "add", "198.18.0.0/15", "via", "203.0.113.254"])?;

        let etcd = Etcd::start_in(router.name(), &ROUTER.to_string())?;
        let speaker = Self::start_speaker(&router, &dir)?;
        let mut c = VmCluster {
            guests: Vec::new(),
            pods: Vec::new(),
            speaker,
            etcd,
            outside,
            router,
            dir,
            prefix,
            kernel_root: kernel_root.to_path_buf(),
        };
        c.apply_yaml(&format!(
            "{pools}\n---\napiVersion: tessera.dev/v1\nkind: BGPPeer\nmetadata: {{ name: underlay-router }}\nspec: {{ peerIP: {ROUTER}, asNumber: 64512 }}\n"
        ))?;
        c.boot_guests()?;
        c.wait_ready(Duration::from_secs(300))?;
        Ok(c)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The outside host's namespace (203.0.113.10).
    pub fn outside(&self) -> &Netns {
        &self.outside
    }

    pub fn etcd_endpoint(&self) -> String {
        format!("http://{ROUTER}:2379")
    }

    /// PIDs of the processes the cluster runs in the router namespace and of the guests.
    pub fn pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.guests.iter().map(|g| g.qemu.pid()).collect();
        p.push(self.speaker.pid());
        p.extend(self.etcd.pid());
        p
    }

    fn start_speaker(router: &Netns, dir: &tempfile::TempDir) -> anyhow::Result<Child> {
        let mut yaml = format!(
            "asn: 64512\nrouterId: {ROUTER}\nlisten: 0.0.0.0\nconnectRetrySeconds: 1\ngracefulRestartSeconds: 120\npeers:\n"
        );
        for ip in ["198.18.10.11", "198.18.10.12", "198.18.11.13"] {
            // Passive: each node connects to 198.18.10.1 (vm3 from the other subnet).
            yaml.push_str(&format!(
                "  - {{ address: {ip}, asn: 64512, passive: true }}\n"
            ));
        }
        let cfg = dir.path().join("router.yaml");
        std::fs::write(&cfg, yaml)?;
        let mut cmd = router.command(&bin("tessera-routed").to_string_lossy());
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("router.log"))?);
        Child::spawn(cmd, "the router's BGP speaker")
    }

    fn boot_guests(&mut self) -> anyhow::Result<()> {
        let mut fs = Initramfs::for_kernel(self.dir.path(), &self.kernel_root)?;
        fs.modules(&GUEST_MODULES)?;
        for (name, dest) in [
            ("tessera-node", "/bin/tessera-node"),
            ("tessera", "/opt/cni/bin/tessera"),
            ("tessera-ipam", "/opt/cni/bin/tessera-ipam"),
            ("guest-shell", "/bin/guest-shell"),
            ("tcp-probe", "/bin/tcp-probe"),
        ] {
            fs.binary(&bin(name), dest)?;
        }
        for (program, dest) in [
            ("/usr/sbin/ip", "/usr/local/sbin/ip"),
            ("/usr/sbin/nft", "/usr/local/sbin/nft"),
            ("/usr/bin/iperf3", "/usr/bin/iperf3"),
        ] {
            fs.binary(PathBuf::from(program).as_path(), dest)?;
        }
        // Scripts of the guest's own (not programs of this machine).
        fs.file("/usr/local/bin/pod-add", POD_ADD, true)?.file(
            "/usr/local/bin/pod-del",
            POD_DEL,
            true,
        )?;
        let (kernel, initrd) = fs.build(&INIT.replace("LOAD_MODULES", vm::LOAD_MODULES))?;
        let etcd = self.etcd_endpoint();
        for (i, (ip, gw, tap)) in [
            ("198.18.10.11", "198.18.10.1", "tap1"),
            ("198.18.10.12", "198.18.10.1", "tap2"),
            ("198.18.11.13", "198.18.11.1", "tap3"),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("vm{}", i + 1);
            let log = self.dir.path().join(format!("{name}.console"));
            let qemu = vm::boot(
                &self.router,
                &Boot {
                    kernel: &kernel,
                    initrd: &initrd,
                    tap,
                    mac: &format!("52:54:00:00:0a:{:02x}", i + 1),
                    append: &format!("tb.name={name} tb.ip={ip}/24 tb.gw={gw} tb.etcd={etcd}"),
                    memory_mib: 768,
                    log: &log,
                },
            )?;
            self.guests.push(Guest {
                name,
                ip: ip.parse()?,
                log,
                qemu,
            });
        }
        Ok(())
    }

    /// Runs `cmd` in guest `g` (index) and returns what it printed and its exit code.
    pub fn sh(&self, g: usize, cmd: &str) -> anyhow::Result<Output> {
        let addr = SocketAddr::from((self.guests[g].ip, vm::SHELL_PORT));
        vm::guest_sh(&self.router, addr, cmd, Duration::from_secs(120))
    }

    /// Runs `cmd` in guest `g`; an error unless it exits 0.
    pub fn sh_ok(&self, g: usize, cmd: &str) -> anyhow::Result<String> {
        let out = self.sh(g, cmd)?;
        anyhow::ensure!(
            out.success(),
            "{}: `{cmd}` exited {}: {}",
            self.guests[g].name,
            out.code,
            out.text
        );
        Ok(out.text)
    }

    /// Waits until every guest's agent answers /readyz with 200.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for g in 0..self.guests.len() {
            loop {
                let ready = self.sh(g, "wget -q -O - http://127.0.0.1:9099/readyz");
                match ready {
                    Ok(o) if o.success() => break,
                    other => {
                        if Instant::now() > deadline {
                            anyhow::bail!(
                                "{} not ready: {other:?}\nconsole: {:?}\nagent: {}",
                                self.guests[g].name,
                                vm::console_reports(&self.guests[g].log),
                                self.agent_log(g)
                            );
                        }
                        self.check_alive(g)?;
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        }
        Ok(())
    }

    fn check_alive(&self, g: usize) -> anyhow::Result<()> {
        let gone = std::fs::read_to_string(format!("/proc/{}/stat", self.guests[g].qemu.pid()))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        anyhow::ensure!(
            !gone,
            "{} stopped: {}",
            self.guests[g].name,
            std::fs::read_to_string(&self.guests[g].log).unwrap_or_default()
        );
        Ok(())
    }

    /// The last `lines` lines of guest `g`'s serial console (for failure messages).
    pub fn console_tail(&self, g: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.guests[g].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The tail of guest `g`'s agent log (for failure messages).
    pub fn agent_log(&self, g: usize) -> String {
        self.sh(g, "tail -n 40 /var/log/agent.log")
            .map(|o| o.text)
            .unwrap_or_else(|e| format!("(no agent log: {e})"))
    }

    /// `tesseractl apply -f -` in the router namespace.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        crate::lab::tesseractl_apply(&self.router, &self.etcd_endpoint(), yaml)
    }

    /// Starts a pod on guest `g` with an address from `pool` (its intent in etcd, as the
    /// Kubernetes integration writes it); returns its index.
    pub fn add_pod(&mut self, g: usize, pool: &str) -> anyhow::Result<usize> {
        self.add_pod_with(g, pool, None)
    }

    /// [`VmCluster::add_pod`] with the CNI configuration's `podInterface` set to
    /// `pod_interface` (`veth`, `netkit`) for this pod.
    pub fn add_pod_with(
        &mut self,
        g: usize,
        pool: &str,
        pod_interface: Option<&str>,
    ) -> anyhow::Result<usize> {
        let name = format!("{}-{pool}-{}", self.guests[g].name, self.pods.len() + 1);
        let intent = tessera_datastore::model::PodIntent {
            ipv4_pools: vec![pool.to_string()],
            ..Default::default()
        };
        self.router.exec(
            "etcdctl",
            &[
                "--endpoints",
                &self.etcd_endpoint(),
                "put",
                &tessera_datastore::keys::pod_intent("default", &name),
                &serde_json::to_string(&intent)?,
            ],
        )?;
        let text = self
            .sh_ok(
                g,
                &format!("pod-add {name} {}", pod_interface.unwrap_or_default()),
            )
            .with_context(|| format!("CNI ADD of {name}"))?;
        let start = text.find('{').context("no CNI result")?;
        let result: serde_json::Value = serde_json::Deserializer::from_str(&text[start..])
            .into_iter()
            .next()
            .with_context(|| format!("CNI result of {name}: {text}"))?
            .with_context(|| format!("CNI result of {name}: {text}"))?;
        let ip = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .find_map(|a| a.split('/').next()?.parse().ok())
            .with_context(|| format!("no IPv4 address in {result}"))?;
        self.pods.push(VmPod {
            name,
            guest: g,
            pool: pool.to_string(),
            ip,
        });
        Ok(self.pods.len() - 1)
    }

    /// Runs `cmd` inside pod `p`'s namespace, in its guest.
    pub fn pod_sh(&self, p: usize, cmd: &str) -> anyhow::Result<Output> {
        let pod = &self.pods[p];
        self.sh(pod.guest, &format!("{IP} netns exec {} {cmd}", pod.name))
    }

    /// One ping from pod `p` to `to`; the round trip in ms when it answered.
    pub fn ping(&self, p: usize, to: Ipv4Addr) -> Option<f64> {
        let out = self.pod_sh(p, &format!("ping -c 1 -W 2 {to}")).ok()?;
        if !out.success() {
            return None;
        }
        out.text
            .split("time=")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
    }

    /// Pings until `to` answers (routes converge after a change), or `timeout`.
    pub fn wait_ping(&self, p: usize, to: Ipv4Addr, timeout: Duration) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ms) = self.ping(p, to) {
                return Some(ms);
            }
            if Instant::now() > deadline {
                return None;
            }
        }
    }

    /// Captures up to `count` packets matching `filter` on the router's `bridge` while
    /// `during` runs; returns tcpdump's lines.
    pub fn capture<T>(
        &self,
        bridge: &str,
        filter: &str,
        count: u32,
        during: impl FnOnce() -> T,
    ) -> anyhow::Result<(Vec<String>, T)> {
        let file = self.dir.path().join(format!("capture-{bridge}.txt"));
        let mut cmd = self.router.command("tcpdump");
        // Immediate mode: packets are printed as they come, not when a buffer block fills.
        cmd.args([
            "--immediate-mode",
            "-nli",
            bridge,
            "-c",
            &count.to_string(),
            filter,
        ])
        .stdout(std::fs::File::create(&file)?)
        .stderr(Stdio::piped());
        let mut dump = Child::spawn(cmd, "tcpdump")?;
        // Packets sent before tcpdump says it is listening would be missed.
        let stderr = dump.take_stderr().context("tcpdump's stderr")?;
        // Kept open until tcpdump is stopped: its summary on exit must not hit a closed pipe.
        let mut stderr = std::io::BufReader::new(stderr);
        let mut said = String::new();
        while !said.contains("listening") {
            let mut line = String::new();
            anyhow::ensure!(
                std::io::BufRead::read_line(&mut stderr, &mut line)? > 0,
                "tcpdump on {bridge}: {said}"
            );
            said.push_str(&line);
        }
        let r = during();
        // tcpdump exits at `count` packets; fewer may be all there is (what is asserted
        // decides), so it gets a moment to print what came and is then stopped.
        let until = Instant::now() + Duration::from_secs(2);
        while dump.try_wait().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        dump.stop(Duration::from_secs(1));
        drop(stderr);
        let lines = std::fs::read_to_string(&file)?
            .lines()
            .map(str::to_string)
            .collect();
        Ok((lines, r))
    }

    /// Tears everything down and asserts that nothing is left (namespaces, processes).
    pub fn finish(self) {
        let (prefix, pids) = (self.prefix.clone(), self.pids());
        drop(self);
        crate::assert_nothing_left(&prefix, &pids);
    }
}
