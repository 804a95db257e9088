//! The agent's pure desired-state calculation on synthetic cluster views of Kubernetes'
//! documented limits (5,000 nodes, 150,000 pods), and smaller ones for the curve. Each node
//! has an underlay address (250 per /24 subnet), a VXLAN VTEP, and one /26 block in each of
//! two pools (IPIP Always, VXLAN CrossSubnet) holding 15 pods each. Measured: building the
//! view, the resident memory it takes, one full `desired()` (what the agent runs on every
//! datastore event that changes what it programs: median of 5), the view's own cost per event
//! (the agent's sync decoding every key again, as it did, against [`Records`] decoding only
//! the changed Node record), and the etcd footprint the cluster's IPAM writes (keys and value
//! sizes, as the datastore encodes them).
//!
//! `cargo bench -p tessera-node --bench scale_view`

use std::time::{Duration, Instant};

use tessera_datastore::block::{Attributes, IpamBlock};
use tessera_datastore::keys;
use tessera_datastore::model::{EncapMode, IpPool, IpPoolSpec, Node};
use tessera_node::state::{desired, ClusterView, Me, Records};

const PODS_PER_BLOCK: usize = 15;

fn rss_kib() -> u64 {
    tessera_testbed::process::rss_kib(std::process::id())
}

fn pool(name: &str, cidr: &str, vxlan: EncapMode, ipip: EncapMode) -> IpPool {
    IpPool {
        name: name.into(),
        spec: IpPoolSpec {
            cidr: cidr.parse().expect("cidr"),
            block_size: Some(26),
            ipip_mode: ipip,
            vxlan_mode: vxlan,
            nat_outgoing: false,
            disabled: false,
            node_selector: Default::default(),
            owner_selector: None,
            strict_affinity: false,
            min_reuse_delay_seconds: 0,
        },
    }
}

/// Node `i`'s /26 in the pool whose second octet starts at `second` (0: IPIP, 128: VXLAN).
fn block_of(second: usize, i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(
        10,
        (second + i / 1024) as u8,
        ((i % 1024) / 4) as u8,
        ((i % 4) * 64) as u8,
    )
}

fn view(nodes: usize) -> ClusterView {
    let mut v = ClusterView {
        pools: vec![
            pool("ipip", "10.0.0.0/9", EncapMode::Never, EncapMode::Always),
            pool(
                "vxlan",
                "10.128.0.0/9",
                EncapMode::CrossSubnet,
                EncapMode::Never,
            ),
        ],
        ..Default::default()
    };
    for i in 0..nodes {
        let name = format!("node{i}");
        let (subnet, host) = (i / 250, i % 250 + 2);
        v.nodes.push(Node {
            name: name.clone(),
            ipv4_address: Some(
                format!("198.{}.{}.{host}/24", 18 + subnet / 256, subnet % 256)
                    .parse()
                    .expect("underlay"),
            ),
            // The VTEP address is the first of the node's VXLAN block, as Calico takes it.
            vxlan_tunnel_address: Some(block_of(128, i).into()),
            vxlan_tunnel_mac: Some(format!("66:00:00:{:02x}:{:02x}:01", i / 256, i % 256)),
            ..Default::default()
        });
        for second in [0, 128] {
            let net = format!("{}/26", block_of(second, i));
            let mut b = IpamBlock::new(net.parse().expect("block"), Some(name.clone()));
            for p in 0..PODS_PER_BLOCK {
                let handle = format!("k8s-pod-network.{i:x}{second:x}{p:04x}.eth0");
                let attrs: Attributes = [
                    ("namespace".to_string(), "default".to_string()),
                    ("pod".to_string(), format!("pod-{i}-{second}-{p}")),
                    ("node".to_string(), name.clone()),
                    ("containerID".to_string(), format!("{:064x}", i * 1000 + p)),
                    ("ifname".to_string(), "eth0".to_string()),
                ]
                .into();
                b.assign(1, &handle, &attrs, 0, 0, |_| false);
            }
            v.blocks.push(b.into());
        }
        v.live.insert(name);
    }
    v
}

/// The view's keys and values as the datastore holds them.
fn stored(v: &ClusterView) -> Vec<(String, Vec<u8>)> {
    fn json<T: serde::Serialize>(record: &T) -> Vec<u8> {
        serde_json::to_vec(record).expect("json")
    }
    let mut kvs: Vec<(String, Vec<u8>)> = Vec::new();
    kvs.extend(v.pools.iter().map(|p| (keys::pool(&p.name), json(p))));
    kvs.extend(v.nodes.iter().map(|n| (keys::node(&n.name), json(n))));
    kvs.extend(v.blocks.iter().map(|b| (keys::block(b.cidr), json(&**b))));
    kvs.extend(v.live.iter().map(|n| (keys::liveness(n), b"1".to_vec())));
    kvs
}

/// Median of 5 of `f`, in milliseconds.
fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[2].as_secs_f64() * 1000.0
}

fn main() {
    println!("Desired state on synthetic views: 2 pools, a /26 per node and pool, {PODS_PER_BLOCK} pods per block");
    println!();
    println!("| nodes | pods | blocks | build (s) | view RSS (MiB) | desired() p50 (ms) | view per event: all decoded (ms) | view per event: one key decoded (ms) | ratio | routes | VXLAN entries | block value (B, mean) | IPAM + endpoint keys |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (mut per_event, mut view_mib) = (Vec::new(), Vec::new());
    for nodes in [100, 1000, 5000] {
        let before = rss_kib();
        let t = Instant::now();
        let v = view(nodes);
        let build = t.elapsed();
        let rss = rss_kib().saturating_sub(before);
        let me = Me {
            name: "node0".into(),
            asn: 64512,
            v4: v.nodes[0].ipv4_address.expect("underlay"),
            v6: None,
        };
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let d = desired(&me, &v);
                let e = t.elapsed();
                std::hint::black_box(d);
                e
            })
            .collect();
        times.sort();
        let d = desired(&me, &v);
        // One event: node0's record changes (a VTEP address written, as in a mode change).
        let kvs = stored(&v);
        let mut changed = v.nodes[0].clone();
        changed.vxlan_tunnel_mac = Some("66:00:00:ff:ff:01".into());
        let (changed_key, changed_value) = (
            keys::node(&changed.name),
            serde_json::to_vec(&changed).expect("json"),
        );
        let all_decoded = median_ms(|| {
            let view = ClusterView::from_kvs(
                kvs.iter().map(|(k, v)| {
                    if *k == changed_key {
                        (k.as_str(), changed_value.as_slice())
                    } else {
                        (k.as_str(), v.as_slice())
                    }
                }),
                2,
            );
            std::hint::black_box(view);
        });
        let mut records = Records::default();
        for (k, val) in &kvs {
            records.put(k, val);
        }
        let one_decoded = median_ms(|| {
            records.put(&changed_key, &changed_value);
            std::hint::black_box(records.view(2));
        });
        drop(records);
        drop(kvs);
        let value_bytes: usize = v
            .blocks
            .iter()
            .map(|b| serde_json::to_vec(&**b).expect("block").len())
            .sum();
        let pods = v.blocks.len() * PODS_PER_BLOCK;
        // Per pod: its handle, its endpoint record, its intent; per block: the block and
        // its affinity; per node: the node record and its liveness key.
        let keys = pods * 3 + v.blocks.len() * 2 + nodes * 2;
        println!(
            "| {nodes} | {pods} | {} | {:.2} | {:.1} | {:.1} | {all_decoded:.1} | {one_decoded:.1} | {:.2} | {} | {} | {} | {keys} |",
            v.blocks.len(),
            build.as_secs_f64(),
            rss as f64 / 1024.0,
            times[2].as_secs_f64() * 1000.0,
            one_decoded / all_decoded,
            d.routes.len(),
            d.vxlan_entries.neighbours.len() + d.vxlan_entries.fdb.len(),
            value_bytes / v.blocks.len().max(1),
        );
        per_event.push((nodes as f64, times[2].as_secs_f64() * 1000.0));
        view_mib.push((nodes as f64, rss as f64 / 1024.0));
        drop(v);
    }
    tessera_testbed::bench_results::BenchRun::new(
        "scale_view",
        "cargo bench -p tessera-node --bench scale_view",
    )
    .series(
        "scale_view",
        "desired() per event, ms",
        ("nodes", "ms per event / MiB"),
        per_event,
    )
    .series(
        "scale_view",
        "the view's memory, MiB",
        ("nodes", "ms per event / MiB"),
        view_mib,
    )
    .save();
}
