//! The pure core of the agent: the cluster as read from the datastore ([`ClusterView`]) and
//! what this node's kernel and BGP speaker should hold for it ([`Desired`]). No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use tessera_datastore::block::IpamBlock;
use tessera_datastore::block_store::{block_from_parts, is_v6_value, BlockKey};
use tessera_datastore::keys;
use tessera_datastore::model::{BgpPeer, EncapMode, IpPool, Node, WorkloadEndpoint};
use tessera_routed::config::PeerConfig;
use tessera_routed::kernel::Target;
use tessera_tunnel::desired::{Mode, RemoteNode, Route, VxlanEntries};

/// A node's blocks and borrowed addresses (see [`ClusterView::destinations`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    pub blocks: Vec<IpNetwork>,
    pub borrowed: Vec<IpNetwork>,
}

/// Everything the agent needs from the datastore, at one revision.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub revision: i64,
    pub pools: Vec<IpPool>,
    pub nodes: Vec<Node>,
    /// Shared with the records they were decoded into: a view per watch event must not copy
    /// thousands of blocks (at 5,000 nodes that copy cost more than the desired state).
    pub blocks: Vec<Arc<IpamBlock>>,
    pub bgp_peers: Vec<BgpPeer>,
    /// The cluster's BGP settings (defaults when no record exists).
    pub bgp_config: tessera_datastore::model::BgpConfiguration,
    /// Nodes whose liveness lease is held.
    pub live: BTreeSet<String>,
    /// Keys that did not decode (reported, never fatal).
    pub corrupt: Vec<String>,
    /// Our node's workload endpoints (the sync follows no other node's).
    pub workloads: Vec<WorkloadEndpoint>,
}

impl ClusterView {
    /// Decodes the keys under `/tessera/v1/` (any order).
    pub fn from_kvs<'a>(kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>, revision: i64) -> Self {
        let mut records = Records::default();
        for (k, v) in kvs {
            records.put(k, v);
        }
        records.view(revision)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pool_of(&self, net: IpNetwork) -> Option<&IpPool> {
        self.pools
            .iter()
            .find(|p| !p.spec.disabled && p.spec.cidr.contains(net.network()))
    }

    /// What each node is the way to, in one pass over the blocks: the blocks affine to it,
    /// and the addresses its workloads hold in blocks that are not its own (borrowed when its
    /// blocks were full, or left from a block whose affinity moved) as /32 or /128.
    pub fn destinations(&self) -> BTreeMap<&str, Destinations> {
        let mut out: BTreeMap<&str, Destinations> = BTreeMap::new();
        for b in &self.blocks {
            if let Some(owner) = b.affinity.as_deref() {
                out.entry(owner).or_default().blocks.push(b.cidr);
            }
            for (ip, a) in b.allocated() {
                if let Some(holder) = a.attrs.get("node").map(String::as_str) {
                    if b.affinity.as_deref() != Some(holder) {
                        out.entry(holder)
                            .or_default()
                            .borrowed
                            .push(IpNetwork::from(ip));
                    }
                }
            }
        }
        out
    }
}

/// The datastore's records as the agent follows them, each decoded once: a watch event
/// decodes only the keys it changed, and each new [`ClusterView`] is assembled from decoded
/// records. Parsing every block's JSON again on every event made a pool mode change on a
/// 64-node, 5,000-pod cluster cost each agent seconds of CPU (64 Node updates, each a full
/// parse on every node).
#[derive(Debug, Clone, Default)]
pub struct Records {
    by_key: BTreeMap<String, Record>,
    /// Blocks in format `V6`, by their own key: their own value and their allocations'
    /// records, which arrive as keys of their own.
    v6_blocks: BTreeMap<String, V6Parts>,
    /// `V6` blocks changed since the last view: assembled when the next one is taken, when
    /// a whole transaction's keys (the block's and its records') have arrived.
    v6_changed: BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
struct V6Parts {
    own: Option<Vec<u8>>,
    records: BTreeMap<u32, Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Record {
    Pool(IpPool),
    Node(Node),
    Block(Arc<IpamBlock>),
    BgpPeer(BgpPeer),
    BgpConfig(tessera_datastore::model::BgpConfiguration),
    Live(String),
    Workload(WorkloadEndpoint),
    /// Did not decode: reported in [`ClusterView::corrupt`], never fatal.
    Corrupt,
}

impl Record {
    /// None: a key the view does not read.
    fn decode(key: &str, value: &[u8]) -> Option<Record> {
        fn json<T: serde::de::DeserializeOwned + 'static>(
            value: &[u8],
            wrap: fn(T) -> Record,
        ) -> Record {
            tessera_datastore::from_stored(value).map_or(Record::Corrupt, wrap)
        }
        Some(if key.starts_with(keys::POOLS) {
            json(value, Record::Pool)
        } else if key.starts_with(keys::NODES) {
            json(value, Record::Node)
        } else if key.starts_with(keys::BLOCKS) {
            json(value, |b| Record::Block(Arc::new(b)))
        } else if key.starts_with(keys::BGP_PEERS) {
            json(value, Record::BgpPeer)
        } else if key == keys::bgp_config("default") {
            json(value, Record::BgpConfig)
        } else if let Some(node) = key.strip_prefix(keys::LIVENESS) {
            Record::Live(node.to_string())
        } else if key.starts_with(keys::WORKLOADS) {
            json(value, Record::Workload)
        } else {
            return None;
        })
    }
}

impl Records {
    /// A key was written: its record is decoded now (a `V6` block's when the view is taken).
    pub fn put(&mut self, key: &str, value: &[u8]) {
        if self.put_v6_part(key, Some(value)) {
            return;
        }
        match Record::decode(key, value) {
            Some(r) => {
                self.by_key.insert(key.to_string(), r);
            }
            None => self.delete(key),
        }
    }

    pub fn delete(&mut self, key: &str) {
        self.put_v6_part(key, None);
        self.by_key.remove(key);
    }

    /// Keeps `key` if it is part of a `V6` block (its own key with a `V6` value, or an
    /// allocation's record) and says so; a block key with an older format's value ends the
    /// block's `V6` parts. `None`: deleted.
    fn put_v6_part(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        let Some(part) = BlockKey::parse(key) else {
            return false;
        };
        let own_key = format!("{}{}", keys::BLOCKS, part.segment());
        match (part, value) {
            (BlockKey::Block(_), Some(v)) if !is_v6_value(v) => {
                self.v6_blocks.remove(&own_key);
                return false;
            }
            (BlockKey::Block(_), v) => {
                self.v6_blocks.entry(own_key.clone()).or_default().own = v.map(<[u8]>::to_vec)
            }
            (BlockKey::Record(_, ordinal), Some(v)) => {
                let parts = self.v6_blocks.entry(own_key.clone()).or_default();
                parts.records.insert(ordinal, v.to_vec());
            }
            (BlockKey::Record(_, ordinal), None) => {
                if let Some(parts) = self.v6_blocks.get_mut(&own_key) {
                    parts.records.remove(&ordinal);
                }
            }
        }
        self.v6_changed.insert(own_key);
        true
    }

    /// Decodes the `V6` blocks changed since the last view from their parts.
    fn assemble_v6_blocks(&mut self) {
        for own_key in std::mem::take(&mut self.v6_changed) {
            let Some(parts) = self.v6_blocks.get(&own_key) else {
                continue;
            };
            let Some(own) = &parts.own else {
                // Deleted (its records with it, or they follow).
                if parts.records.is_empty() {
                    self.v6_blocks.remove(&own_key);
                }
                self.by_key.remove(&own_key);
                continue;
            };
            let records = parts.records.iter().map(|(o, v)| (*o, v.as_slice()));
            let record = match block_from_parts(own, records) {
                Ok(b) => Record::Block(Arc::new(b)),
                Err(_) => Record::Corrupt,
            };
            self.by_key.insert(own_key, record);
        }
    }

    /// The view at `revision`, from the decoded records.
    pub fn view(&mut self, revision: i64) -> ClusterView {
        self.assemble_v6_blocks();
        let mut v = ClusterView {
            revision,
            ..Default::default()
        };
        for (key, r) in &self.by_key {
            match r {
                Record::Pool(p) => v.pools.push(p.clone()),
                Record::Node(n) => v.nodes.push(n.clone()),
                Record::Block(b) => v.blocks.push(Arc::clone(b)),
                Record::BgpPeer(p) => v.bgp_peers.push(p.clone()),
                Record::BgpConfig(c) => v.bgp_config = c.clone(),
                Record::Live(n) => {
                    v.live.insert(n.clone());
                }
                Record::Workload(w) => v.workloads.push(w.clone()),
                Record::Corrupt => v.corrupt.push(key.clone()),
            }
        }
        v.pools.sort_by(|a, b| a.name.cmp(&b.name));
        v.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        v.blocks.sort_by_key(|b| b.cidr);
        v
    }
}

/// A local pod's address that now belongs to another workload: no host route to it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// `namespace/pod`.
    pub pod: String,
    pub address: IpAddr,
    pub host_interface: String,
}

/// The fenced addresses of our workload endpoints (those the agent marked conflicted). Pure.
pub fn fenced(view: &ClusterView) -> Vec<Fenced> {
    view.workloads
        .iter()
        .filter_map(|w| Some((w, w.conflict.as_ref()?, w.host_interface.as_ref()?)))
        .flat_map(|(w, c, host)| {
            c.addresses.iter().map(|a| Fenced {
                pod: format!("{}/{}", w.namespace, w.pod),
                address: *a,
                host_interface: host.clone(),
            })
        })
        .collect()
}

fn mode(m: EncapMode) -> Mode {
    match m {
        EncapMode::Always => Mode::Always,
        EncapMode::CrossSubnet => Mode::CrossSubnet,
        EncapMode::Never => Mode::Never,
    }
}

/// How one pool's traffic leaves the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRouting {
    pub cidr: IpNetwork,
    pub vxlan: Mode,
    pub ipip: Mode,
}

/// The decision the BGP speaker asks for each learned route (see [`RouteTarget`]): VXLAN
/// pools are routed by the agent from the datastore, IPIP pools through tunl0 (onlink), the
/// rest natively when the next hop is on our subnet; a next hop elsewhere is left to the
/// underlay's router (which learns pod routes over BGP too).
///
/// [`RouteTarget`]: tessera_routed::kernel::RouteTarget
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetTable {
    pub pools: Vec<PoolRouting>,
    pub subnets: Vec<IpNetwork>,
    pub tunl0: Option<u32>,
    /// Our blocks, and the host prefix of every address allocated to our workloads: a
    /// learned route for one of these is never installed (it would replace our blackhole
    /// or a pod's host route; it can only be a peer's stale view of an address that moved).
    pub local: BTreeSet<IpNetwork>,
}

impl TargetTable {
    pub fn target(&self, prefix: IpNetwork, next_hop: IpAddr) -> Target {
        if self.local.contains(&prefix) {
            return Target::Skip;
        }
        let same_subnet = self.subnets.iter().any(|s| s.contains(next_hop));
        let native = if same_subnet {
            Target::Native
        } else {
            Target::Skip
        };
        let Some(pool) = self
            .pools
            .iter()
            .find(|p| p.cidr.contains(prefix.network()))
        else {
            return native;
        };
        if pool.vxlan != Mode::Never {
            return Target::Skip;
        }
        let tunnel = match pool.ipip {
            Mode::Always => true,
            Mode::CrossSubnet => !same_subnet,
            Mode::Never => false,
        };
        match (tunnel, self.tunl0) {
            (true, Some(dev)) => Target::Onlink(dev),
            (true, None) => Target::Skip,
            (false, _) => native,
        }
    }
}

/// The NAT rules: masquerade from `masquerade` pools to anything outside `pools`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatRules {
    pub pools: Vec<IpNetwork>,
    pub masquerade: Vec<IpNetwork>,
}

/// Where this node is, as the calculation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub name: String,
    pub asn: u32,
    pub v4: IpNetwork,
    pub v6: Option<IpNetwork>,
}

/// This node's wanted state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Blocks affine to us: announced over BGP, blackholed locally.
    pub my_blocks: Vec<IpNetwork>,
    /// Our workloads' addresses in other nodes' blocks: announced as /32 (or /128) so that
    /// the longest match beats the block's owner (never blackholed: the pod's own route is
    /// there).
    pub my_borrowed: Vec<IpNetwork>,
    /// `vxlan.calico` is wanted (some enabled IPv4 pool has a VXLAN mode).
    pub vxlan: bool,
    /// Neighbour and FDB entries on `vxlan.calico` (its `routes` stay empty: see `routes`).
    pub vxlan_entries: VxlanEntries,
    /// Routes of VXLAN pools (onlink via VTEPs, or native via same-subnet nodes).
    pub routes: Vec<Route>,
    /// The same for IPv6 pools: `vxlan-v6.calico` over the IPv6 underlay.
    pub vxlan_v6: bool,
    pub vxlan_v6_entries: VxlanEntries,
    pub routes_v6: Vec<Route>,
    /// IPIP pools exist: tunl0 is needed.
    pub ipip: bool,
    pub nat: NatRules,
    pub targets: TargetTable,
    /// The BGP mesh and external peers (nodes that are live or still hold something).
    pub peers: Vec<PeerConfig>,
    /// Records we could not use, with why (surfaced in logs and /readyz).
    pub problems: Vec<String>,
}

/// One family's VXLAN: whether its device is wanted, its neighbour/FDB entries, its routes.
struct FamilyVxlan {
    wanted: bool,
    entries: VxlanEntries,
    routes: Vec<Route>,
}

fn vxlan(
    me: &Me,
    view: &ClusterView,
    destinations: &BTreeMap<&str, Destinations>,
    enabled: &[&IpPool],
    ipv6: bool,
    problems: &mut Vec<String>,
) -> FamilyVxlan {
    let pools: Vec<&&IpPool> = enabled
        .iter()
        .filter(|p| p.spec.cidr.is_ipv6() == ipv6 && p.spec.vxlan_mode != EncapMode::Never)
        .collect();
    let mut out = FamilyVxlan {
        wanted: !pools.is_empty(),
        entries: VxlanEntries::default(),
        routes: Vec::new(),
    };
    let local = if ipv6 { me.v6 } else { Some(me.v4) };
    let Some(local) = local.filter(|_| out.wanted) else {
        if out.wanted {
            problems.push("IPv6 VXLAN pools need an IPv6 underlay address on this node".into());
            out.wanted = false;
        }
        return out;
    };
    let mut neighbours = BTreeMap::new();
    let mut fdb = BTreeMap::new();
    for pool in &pools {
        let remotes: Vec<RemoteNode> = view
            .nodes
            .iter()
            .filter(|n| n.name != me.name)
            .filter_map(|n| {
                // Its blocks, and the addresses it borrowed, in this pool.
                let dest = destinations.get(n.name.as_str())?;
                let blocks: Vec<IpNetwork> = dest
                    .blocks
                    .iter()
                    .chain(&dest.borrowed)
                    .filter(|b| pool.spec.cidr.contains(b.network()))
                    .copied()
                    .collect();
                if blocks.is_empty() {
                    return None;
                }
                match RemoteNode::from_node(n, blocks, ipv6) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        problems.push(format!("pool {}: {e}", pool.name));
                        None
                    }
                }
            })
            .collect();
        let e = tessera_tunnel::desired::vxlan_entries(local, mode(pool.spec.vxlan_mode), &remotes);
        neighbours.extend(e.neighbours);
        fdb.extend(e.fdb);
        out.routes.extend(e.routes);
    }
    out.entries.neighbours = neighbours.into_iter().collect();
    out.entries.fdb = fdb.into_iter().collect();
    out.routes.sort();
    out.routes.dedup();
    out
}

/// The pure calculation.
pub fn desired(me: &Me, view: &ClusterView) -> Desired {
    let destinations = view.destinations();
    let mine = destinations
        .get(me.name.as_str())
        .cloned()
        .unwrap_or_default();
    let mut d = Desired {
        my_blocks: mine.blocks,
        my_borrowed: mine.borrowed,
        ..Default::default()
    };
    d.problems.extend(
        view.corrupt
            .iter()
            .map(|k| format!("{k} does not decode; ignored")),
    );
    let enabled: Vec<&IpPool> = view.pools.iter().filter(|p| !p.spec.disabled).collect();
    d.targets.pools = enabled
        .iter()
        .map(|p| PoolRouting {
            cidr: p.spec.cidr,
            vxlan: mode(p.spec.vxlan_mode),
            ipip: mode(p.spec.ipip_mode),
        })
        .collect();
    d.targets.subnets = [Some(me.v4), me.v6].into_iter().flatten().collect();
    d.targets.local = d.my_blocks.iter().copied().collect();
    for b in &view.blocks {
        d.targets.local.extend(
            b.allocated()
                .filter(|(_, a)| a.attrs.get("node") == Some(&me.name))
                .map(|(ip, _)| IpNetwork::from(ip)),
        );
    }
    d.nat = NatRules {
        pools: enabled.iter().map(|p| p.spec.cidr).collect(),
        masquerade: enabled
            .iter()
            .filter(|p| p.spec.nat_outgoing)
            .map(|p| p.spec.cidr)
            .collect(),
    };
    d.ipip = enabled
        .iter()
        .any(|p| p.spec.cidr.is_ipv4() && p.spec.ipip_mode != EncapMode::Never);

    // VXLAN: per family, per pool, the entries towards every other node with blocks in it.
    let v4 = vxlan(me, view, &destinations, &enabled, false, &mut d.problems);
    (d.vxlan, d.vxlan_entries, d.routes) = (v4.wanted, v4.entries, v4.routes);
    let v6 = vxlan(me, view, &destinations, &enabled, true, &mut d.problems);
    (d.vxlan_v6, d.vxlan_v6_entries, d.routes_v6) = (v6.wanted, v6.entries, v6.routes);

    // BGP: one policy with the standalone speaker (routed's mesh::node_peers).
    let holders: BTreeSet<String> = destinations.keys().map(|n| n.to_string()).collect();
    let peers = tessera_routed::mesh::node_peers(
        &me.name,
        me.asn,
        &view.nodes,
        &view.bgp_peers,
        &view.live,
        &holders,
        &view.bgp_config,
    );
    d.peers = peers;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_datastore::model::IpPoolSpec;

    fn pool(name: &str, cidr: &str, vxlan: EncapMode, ipip: EncapMode, nat: bool) -> IpPool {
        IpPool {
            name: name.into(),
            spec: IpPoolSpec {
                cidr: cidr.parse().expect("cidr"),
                block_size: None,
                ipip_mode: ipip,
                vxlan_mode: vxlan,
                nat_outgoing: nat,
                disabled: false,
                node_selector: Default::default(),
                owner_selector: None,
                strict_affinity: false,
                min_reuse_delay_seconds: 0,
            },
        }
    }

    fn node(name: &str, ip: &str, vtep: &str) -> Node {
        Node {
            name: name.into(),
            ipv4_address: Some(format!("{ip}/24").parse().expect("net")),
            vxlan_tunnel_address: Some(vtep.parse().expect("vtep")),
            vxlan_tunnel_mac: Some("66:00:00:00:00:01".into()),
            ..Default::default()
        }
    }

    fn block(cidr: &str, node: &str) -> Arc<IpamBlock> {
        IpamBlock::new(cidr.parse().expect("cidr"), Some(node.into())).into()
    }

    /// The view kept up to date key by key is the view decoded from scratch from the same
    /// keys: after writes, overwrites, a record that stops decoding, deletes.
    /// A `V6` block arrives as its own key and a key per allocation, in one watch response
    /// per transaction: each view has the block as the whole transaction left it.
    #[test]
    fn a_v6_block_is_put_together_from_its_keys() {
        use tessera_datastore::block::BlockFormat;
        use tessera_datastore::block_store::{delete_ops, write_ops};
        use tessera_datastore::kv::Op;
        /// The transaction's events as a watch gives them: one per key (a prefix delete is
        /// a delete event for each key it removed).
        fn apply(records: &mut Records, stored: &mut BTreeSet<String>, ops: Vec<Op>) {
            for op in ops {
                match op {
                    Op::Put { key, value, .. } => {
                        records.put(&key, &value);
                        stored.insert(key);
                    }
                    Op::Delete { key } => {
                        records.delete(&key);
                        stored.remove(&key);
                    }
                    Op::DeletePrefix { prefix } => {
                        let gone: Vec<String> = stored
                            .iter()
                            .filter(|k| k.starts_with(&prefix))
                            .cloned()
                            .collect();
                        for key in gone {
                            records.delete(&key);
                            stored.remove(&key);
                        }
                    }
                    Op::Get { .. } => unreachable!("writes only"),
                }
            }
        }
        let mut records = Records::default();
        let mut stored = BTreeSet::new();
        let empty = IpamBlock::new("10.244.0.0/26".parse().unwrap(), Some("a".into()))
            .in_format(BlockFormat::V6);
        apply(&mut records, &mut stored, write_ops(None, &empty));
        // b borrows an address from a's block, a assigns one of its own.
        let mut full = empty.clone();
        for node in ["b", "a"] {
            let attrs = [("node".to_string(), node.to_string())].into();
            full.assign(1, &format!("h-{node}"), &attrs, 0, 0, |_| false);
        }
        apply(&mut records, &mut stored, write_ops(Some(&empty), &full));
        let v = records.view(2);
        assert_eq!(v.blocks[0].in_use(), 2);
        assert!(v.corrupt.is_empty(), "{:?}", v.corrupt);
        let d = v.destinations();
        assert_eq!(
            d["b"].borrowed,
            ["10.244.0.0/32".parse::<IpNetwork>().unwrap()]
        );
        // b's address released: the block says so; its record stays, passed over.
        let mut released = full.clone();
        released
            .release("10.244.0.0".parse().unwrap(), None, 1)
            .expect("release");
        apply(&mut records, &mut stored, write_ops(Some(&full), &released));
        let v = records.view(3);
        assert_eq!(v.blocks[0].in_use(), 1);
        assert!(!v.destinations().contains_key("b"));
        // A record lost (damage, not a transaction): the block is reported, never guessed.
        records.delete(&tessera_datastore::keys::block_record(released.cidr, 1));
        let v = records.view(4);
        assert!(v.blocks.is_empty());
        assert_eq!(v.corrupt, [keys::block(released.cidr)]);
        // Deleted with its records (b's left one too): gone.
        apply(&mut records, &mut stored, delete_ops(&released));
        let v = records.view(5);
        assert!(v.blocks.is_empty() && v.corrupt.is_empty());
        assert!(records.v6_blocks.is_empty(), "{:?}", records.v6_blocks);
    }

    #[test]
    fn records_updated_key_by_key_give_the_view_decoded_from_scratch() {
        fn json<T: serde::Serialize>(record: &T) -> Vec<u8> {
            serde_json::to_vec(record).expect("json")
        }
        let bgp = pool(
            "bgp",
            "10.244.0.0/18",
            EncapMode::Never,
            EncapMode::Never,
            false,
        );
        let mut bgp_vxlan = bgp.clone();
        bgp_vxlan.spec.vxlan_mode = EncapMode::Always;
        let mut b1 = IpamBlock::new("10.244.0.0/26".parse().unwrap(), Some("a".into()));
        let events: Vec<(String, Option<Vec<u8>>)> = vec![
            (keys::pool("bgp"), Some(json(&bgp))),
            (
                keys::node("a"),
                Some(json(&node("a", "198.18.1.10", "10.244.0.1"))),
            ),
            (
                keys::node("b"),
                Some(json(&node("b", "198.18.1.11", "10.244.0.65"))),
            ),
            (
                keys::block("10.244.0.64/26".parse().unwrap()),
                Some(json(&*block("10.244.0.64/26", "b"))),
            ),
            (
                keys::block("10.244.0.0/26".parse().unwrap()),
                Some(json(&b1)),
            ),
            (keys::liveness("a"), Some(b"1".to_vec())),
            (keys::liveness("b"), Some(b"1".to_vec())),
            (keys::node("c"), Some(b"{not json".to_vec())),
            // The mode change, a pod in a's block (written back binary, as a cluster set to
            // block format V5 writes it), b's lease lapsing, c repaired then gone.
            (keys::pool("bgp"), Some(json(&bgp_vxlan))),
            (keys::block("10.244.0.0/26".parse().unwrap()), {
                b1.assign(
                    1,
                    "h1",
                    &[("node".to_string(), "a".to_string())].into(),
                    0,
                    0,
                    |_| false,
                );
                b1 = b1.in_format(tessera_datastore::block::BlockFormat::V5);
                let stored = tessera_datastore::encode_block(&b1);
                assert_eq!(stored[0], 0, "V5's binary form");
                Some(stored)
            }),
            (keys::liveness("b"), None),
            (
                keys::node("c"),
                Some(json(&node("c", "198.18.2.10", "10.244.0.129"))),
            ),
            (keys::node("d"), Some(b"[]".to_vec())),
            (keys::node("c"), None),
            ("/tessera/v1/handles/h1".to_string(), Some(b"{}".to_vec())),
        ];
        let mut records = Records::default();
        let mut raw: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (i, (key, value)) in events.into_iter().enumerate() {
            match value {
                Some(v) => {
                    records.put(&key, &v);
                    raw.insert(key, v);
                }
                None => {
                    records.delete(&key);
                    raw.remove(&key);
                }
            }
            let fresh =
                ClusterView::from_kvs(raw.iter().map(|(k, v)| (k.as_str(), v.as_slice())), 7);
            assert_eq!(
                format!("{:?}", records.view(7)),
                format!("{fresh:?}"),
                "after event {i}"
            );
        }
        let v = records.view(7);
        assert_eq!(v.pools[0].spec.vxlan_mode, EncapMode::Always);
        assert_eq!(
            v.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(v.corrupt, [keys::node("d")]);
        assert_eq!(v.live.iter().collect::<Vec<_>>(), ["a"]);
        assert_eq!(v.blocks[0].allocated().count(), 1);
    }

    fn view() -> ClusterView {
        ClusterView {
            pools: vec![
                pool(
                    "bgp",
                    "10.244.0.0/18",
                    EncapMode::Never,
                    EncapMode::Never,
                    false,
                ),
                pool(
                    "cross",
                    "10.244.64.0/18",
                    EncapMode::CrossSubnet,
                    EncapMode::Never,
                    true,
                ),
                pool(
                    "ipip",
                    "10.244.192.0/18",
                    EncapMode::Never,
                    EncapMode::Always,
                    false,
                ),
            ],
            nodes: vec![
                node("a", "198.18.1.10", "10.244.64.1"),
                node("b", "198.18.1.11", "10.244.64.65"),
                node("c", "198.18.2.10", "10.244.64.129"),
            ],
            blocks: vec![
                block("10.244.0.0/26", "a"),
                block("10.244.0.64/26", "b"),
                block("10.244.64.0/26", "a"),
                block("10.244.64.64/26", "b"),
                block("10.244.64.128/26", "c"),
            ],
            live: ["a", "b"].iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn me() -> Me {
        Me {
            name: "a".into(),
            asn: 64512,
            v4: "198.18.1.10/24".parse().expect("net"),
            v6: None,
        }
    }

    #[test]
    fn crosssubnet_vxlan_encapsulates_only_across_the_router() {
        let d = desired(&me(), &view());
        assert_eq!(
            d.my_blocks
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>(),
            ["10.244.0.0/26", "10.244.64.0/26"]
        );
        assert!(d.vxlan && d.ipip);
        assert_eq!(
            d.routes,
            vec![
                Route::Vxlan {
                    block: "10.244.64.128/26".parse().expect("net"),
                    via: "10.244.64.129".parse().expect("ip")
                },
                Route::Native {
                    block: "10.244.64.64/26".parse().expect("net"),
                    via: "198.18.1.11".parse().expect("ip")
                },
            ]
        );
        assert_eq!(d.vxlan_entries.fdb.len(), 1);
        assert_eq!(
            d.nat.masquerade,
            vec!["10.244.64.0/18".parse().expect("net")]
        );
        // c's lease lapsed but it still holds a block (it may only be cut off from etcd):
        // still a peer. Once reclaimed (no block of its own) it is dropped.
        let peers = |v: &ClusterView| {
            desired(&me(), v)
                .peers
                .iter()
                .map(|p| p.address.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(peers(&view()), ["198.18.1.11", "198.18.2.10"]);
        let mut reclaimed = view();
        reclaimed
            .blocks
            .retain(|b| b.affinity.as_deref() != Some("c"));
        assert_eq!(peers(&reclaimed), ["198.18.1.11"]);
    }

    #[test]
    fn a_learned_route_to_our_own_block_or_pod_is_never_installed() {
        let mut v = view();
        let mut b = block("10.244.0.128/26", "b");
        let attrs = [("node".to_string(), "a".to_string())].into();
        Arc::make_mut(&mut b)
            .assign_exact(
                "10.244.0.130".parse().expect("ip"),
                "pod-on-a",
                &attrs,
                |_| false,
            )
            .expect("assign");
        v.blocks.push(b);
        let t = desired(&me(), &v).targets;
        let b_node: IpAddr = "198.18.1.11".parse().expect("ip");
        // A peer still announcing our pod's address (it held it before) or our block.
        assert_eq!(
            t.target("10.244.0.130/32".parse().expect("net"), b_node),
            Target::Skip
        );
        assert_eq!(
            t.target("10.244.0.0/26".parse().expect("net"), b_node),
            Target::Skip
        );
        // Its own block, with our pod's /32 inside it, is still routed to it.
        assert_eq!(
            t.target("10.244.0.128/26".parse().expect("net"), b_node),
            Target::Native
        );
    }

    #[test]
    fn route_targets_per_pool() {
        let mut t = desired(&me(), &view()).targets;
        t.tunl0 = Some(7);
        let nh_same: IpAddr = "198.18.1.11".parse().expect("ip");
        let nh_far: IpAddr = "198.18.2.10".parse().expect("ip");
        let p = |s: &str| s.parse::<IpNetwork>().expect("net");
        assert_eq!(t.target(p("10.244.0.64/26"), nh_same), Target::Native);
        assert_eq!(t.target(p("10.244.0.128/26"), nh_far), Target::Skip);
        assert_eq!(t.target(p("10.244.64.64/26"), nh_same), Target::Skip);
        assert_eq!(t.target(p("10.244.192.0/26"), nh_same), Target::Onlink(7));
        t.tunl0 = None;
        assert_eq!(t.target(p("10.244.192.0/26"), nh_far), Target::Skip);
    }

    #[test]
    fn a_mode_switch_changes_the_routes() {
        let mut v = view();
        v.pools[1].spec.vxlan_mode = EncapMode::Always;
        let d = desired(&me(), &v);
        assert!(d.routes.iter().all(|r| matches!(r, Route::Vxlan { .. })));
        assert_eq!(d.routes.len(), 2);
        v.pools[1].spec.vxlan_mode = EncapMode::Never;
        let d = desired(&me(), &v);
        assert!(d.routes.is_empty() && !d.vxlan);
    }

    #[test]
    fn a_borrowed_address_is_routed_to_the_node_that_holds_it() {
        let mut v = view();
        // c (other subnet) holds 10.244.64.5 in a's block.
        let attrs = [("node".to_string(), "c".to_string())].into();
        Arc::make_mut(&mut v.blocks[2])
            .assign_exact("10.244.64.5".parse().expect("ip"), "h", &attrs, |_| false)
            .expect("assign");
        let a = desired(&me(), &v);
        assert!(a.routes.contains(&Route::Vxlan {
            block: "10.244.64.5/32".parse().expect("net"),
            via: "10.244.64.129".parse().expect("ip"),
        }));
        // a still blackholes (and announces) its block; the /32 wins by the longest match.
        assert!(a
            .my_blocks
            .contains(&"10.244.64.0/26".parse().expect("net")));
        assert!(a.my_borrowed.is_empty());
        let c = desired(
            &Me {
                name: "c".into(),
                asn: 64512,
                v4: "198.18.2.10/24".parse().expect("net"),
                v6: None,
            },
            &v,
        );
        assert_eq!(c.my_borrowed, vec!["10.244.64.5/32".parse().expect("net")]);
    }

    #[test]
    fn a_node_without_a_vtep_is_a_problem_not_a_crash() {
        let mut v = view();
        v.nodes[2].vxlan_tunnel_mac = None;
        let d = desired(&me(), &v);
        assert_eq!(d.routes.len(), 1);
        assert!(d.problems[0].contains("VTEP MAC"), "{:?}", d.problems);
    }
}
