//! Helpers shared by the tunnel tests and benchmark: nodes converged by the real code, pods
//! wired by hand as the CNI plugin would.
#![allow(dead_code)]

pub mod vm;

use std::net::IpAddr;

use tessera_testbed::{Lab, LabNode, Netns};
use tessera_tunnel::{
    ensure_device, ensure_entries, vtep_mac, vxlan_entries, Mode, RemoteNode, TunnelError,
    VxlanDevice,
};

/// Runs `f` with a netlink handle inside `ns` (a thread of its own: setns is per thread).
pub fn in_ns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce(rtnetlink::Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (conn, h, _) = rtnetlink::new_connection().expect("netlink");
            tokio::spawn(conn);
            f(h).await
        })
    })
    .join()
    .expect("netns thread")
}

pub fn block(i: usize) -> String {
    format!("10.244.{i}.0/26")
}
pub fn vtep(i: usize) -> IpAddr {
    format!("10.244.{i}.0").parse().expect("ip")
}
pub fn pod_ip(i: usize) -> String {
    format!("10.244.{i}.1")
}

pub fn remote(n: &LabNode, i: usize) -> RemoteNode {
    RemoteNode {
        name: n.name.clone(),
        underlay: ipnetwork::IpNetwork::V4(n.ipv4),
        vtep_ip: vtep(i),
        vtep_mac: vtep_mac(&n.name),
        blocks: vec![block(i).parse().expect("net")],
    }
}

pub fn device(n: &LabNode, i: usize) -> VxlanDevice {
    VxlanDevice::calico(
        IpAddr::V4(n.ipv4.ip()),
        "eth0",
        1500,
        vtep_mac(&n.name),
        vtep(i),
    )
}

/// Converges node `i` (1-based) to `mode`.
pub fn ensure(lab: &Lab, i: usize, mode: Mode) -> Result<(), TunnelError> {
    let me = &lab.nodes[i - 1];
    let remotes: Vec<RemoteNode> = lab
        .nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| j + 1 != i)
        .map(|(j, n)| remote(n, j + 1))
        .collect();
    let dev = device(me, i);
    let entries = vxlan_entries(ipnetwork::IpNetwork::V4(me.ipv4), mode, &remotes);
    in_ns(&me.netns, move |h| {
        Box::pin(async move {
            let idx = ensure_device(&h, &dev).await?;
            ensure_entries(&h, idx, &entries).await
        })
    })
}

/// A pod behind node `i`, wired by hand as the CNI plugin would.
pub fn pod(lab: &Lab, i: usize) -> Netns {
    let node = &lab.nodes[i - 1];
    let ns = Netns::new(&format!("{}-p{i}", lab.prefix())).expect("pod ns");
    let host = format!("cali{i}");
    node.netns.veth_to(&host, &ns, "eth0").expect("veth");
    ns.ip(&["link", "set", "eth0", "mtu", "1450", "up"])
        .expect("up");
    ns.ip(&["addr", "add", &format!("{}/32", pod_ip(i)), "dev", "eth0"])
        .expect("addr");
    ns.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])
    .expect("route");
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])
    .expect("route");
    node.netns
        .ip(&["link", "set", &host, "address", "ee:ee:ee:ee:ee:ee", "up"])
        .expect("host up");
    node.netns
        .sysctl(&format!("net.ipv4.conf.{host}.proxy_arp"), "1")
        .expect("proxy_arp");
    node.netns
        .sysctl(&format!("net.ipv4.neigh.{host}.proxy_delay"), "0")
        .expect("proxy_delay");
    node.netns
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding");
    node.netns
        .ip(&[
            "route",
            "add",
            &format!("{}/32", pod_ip(i)),
            "dev",
            &host,
            "scope",
            "link",
        ])
        .expect("host route");
    ns
}
