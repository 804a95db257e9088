//! What an operator's tool (tesseractl) does to the datastore: read resources of any kind,
//! write a set of them in one guarded transaction (all or nothing), delete them, and refuse
//! to delete or shrink a pool whose addresses are in use unless forced.
//!
//! Every write compares each key it writes with the revision it read (0: absent), so a
//! concurrent change makes the whole write fail instead of being overwritten; pool and
//! reservation writes bump the configuration epoch in the same transaction, so IPAM writes
//! planned against the old pools fail and re-plan. When a pool's addresses were counted, its
//! blocks are guarded at the revisions counted: an allocation made meanwhile fails the write.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;

use crate::codec::{decode, encode};
use crate::error::IpamError;
use crate::keys;
use crate::kv::{Compare, Kv, Op, Txn};
use crate::model::{BgpConfiguration, BgpPeer, IpPool, IpReservation, IpamConfiguration, Node};
use crate::snapshot::Snapshot;
use crate::yaml::{Kind, Resources};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{kind} {name:?} already exists (use apply or replace)")]
    Exists { kind: Kind, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: Kind, name: String },
    #[error("IPPool {name:?} has {count} address(es) in use {what}: refused (release them first, or --force)")]
    PoolInUse {
        name: String,
        count: usize,
        what: &'static str,
    },
    #[error("the datastore changed while writing (someone else wrote {key}); nothing was written: run again")]
    Conflict { key: String },
    #[error(transparent)]
    Store(#[from] IpamError),
}

/// How a write treats resources that exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Create what is missing, replace what exists.
    Apply,
    /// Every resource must be new.
    Create,
    /// Every resource must exist.
    Replace,
}

/// What a write did, per resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Written::Created => "created",
            Written::Configured => "configured",
            Written::Unchanged => "unchanged",
        })
    }
}

fn key_of(kind: Kind, name: &str) -> String {
    match kind {
        Kind::IpamConfiguration => keys::ipam_config(name),
        Kind::IpPool => keys::pool(name),
        Kind::IpReservation => keys::reservation(name),
        Kind::BgpConfiguration => keys::bgp_config(name),
        Kind::BgpPeer => keys::bgp_peer(name),
        Kind::Node => keys::node(name),
    }
}

fn prefix_of(kind: Kind) -> &'static str {
    match kind {
        Kind::IpamConfiguration => keys::IPAM_CONFIG,
        Kind::IpPool => keys::POOLS,
        Kind::IpReservation => keys::RESERVATIONS,
        Kind::BgpConfiguration => keys::BGP_CONFIG,
        Kind::BgpPeer => keys::BGP_PEERS,
        Kind::Node => keys::NODES,
    }
}

/// Resources as stored, with each key's revision.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub resources: Resources,
    pub revisions: BTreeMap<String, i64>,
}

/// Every resource of `kinds` (sorted by name).
pub async fn read<K: Kv>(kv: &K, kinds: &[Kind]) -> Result<Stored, IpamError> {
    let mut out = Stored::default();
    for kind in kinds {
        let (items, _) = kv.get_prefix(prefix_of(*kind)).await?;
        for item in &items {
            out.revisions.insert(item.key.clone(), item.mod_revision);
            match kind {
                Kind::IpamConfiguration => out
                    .resources
                    .ipam_configs
                    .push(decode::<IpamConfiguration>(item)?),
                Kind::IpPool => out.resources.pools.push(decode::<IpPool>(item)?),
                Kind::IpReservation => out
                    .resources
                    .reservations
                    .push(decode::<IpReservation>(item)?),
                Kind::BgpConfiguration => out
                    .resources
                    .bgp_configs
                    .push(decode::<BgpConfiguration>(item)?),
                Kind::BgpPeer => out.resources.bgp_peers.push(decode::<BgpPeer>(item)?),
                Kind::Node => out.resources.nodes.push(decode::<Node>(item)?),
            }
        }
    }
    let r = &mut out.resources;
    r.pools.sort_by(|a, b| a.name.cmp(&b.name));
    r.reservations.sort_by(|a, b| a.name.cmp(&b.name));
    r.bgp_peers.sort_by(|a, b| a.name.cmp(&b.name));
    r.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Addresses allocated in `pool` that would be left outside it with `new_cidr` (every one
/// when the pool goes away).
pub fn addresses_left_out(snap: &Snapshot, pool: &IpPool, new_cidr: Option<IpNetwork>) -> usize {
    snap.blocks
        .values()
        .filter(|b| pool.spec.cidr.contains(b.value.cidr.network()))
        .flat_map(|b| b.value.allocated().map(|(a, _)| a))
        .filter(|a| new_cidr.is_none_or(|c| !c.contains(*a)))
        .count()
}

/// The blocks of `pool`, to guard at the revisions their addresses were counted.
fn pool_block_guards(snap: &Snapshot, pool: &IpPool) -> Vec<Compare> {
    snap.blocks
        .iter()
        .filter(|(cidr, _)| pool.spec.cidr.contains(cidr.network()))
        .map(|(cidr, b)| Compare::ModRevision(keys::block(*cidr), b.rev))
        .collect()
}

/// The resource of `kind` called `name` among `items`.
fn named<'a, T>(
    items: &'a [T],
    name_of: impl Fn(&T) -> &str,
    kind: Kind,
    name: &str,
) -> Result<&'a T, AdminError> {
    items
        .iter()
        .find(|v| name_of(v) == name)
        .ok_or_else(|| AdminError::NotFound {
            kind,
            name: name.to_string(),
        })
}

/// Writes `desired` in one transaction. Nothing is written when any resource fails its
/// mode's rule or a pool would lose addresses in use (without `force`).
pub async fn write<K: Kv>(
    kv: &K,
    desired: &Resources,
    mode: WriteMode,
    force: bool,
) -> Result<Vec<(Kind, String, Written)>, AdminError> {
    let current = read(kv, &Kind::ALL).await?;
    let mut txn = Txn::new();
    let mut report = Vec::new();
    let mut config_changed = false;
    let mut snap: Option<Snapshot> = None;
    let stored_pool = |name: &str| current.resources.pools.iter().find(|p| p.name == name);
    for (kind, name) in desired.names() {
        let key = key_of(kind, &name);
        let rev = current.revisions.get(&key).copied();
        match (mode, rev) {
            (WriteMode::Create, Some(_)) => return Err(AdminError::Exists { kind, name }),
            (WriteMode::Replace, None) => return Err(AdminError::NotFound { kind, name }),
            _ => {}
        }
        let value = match kind {
            Kind::IpamConfiguration => {
                // Read with the pools and guarded by the same epoch: IPAM writes in flight
                // when it changes start over with it.
                config_changed = true;
                encode(named(&desired.ipam_configs, |v| &v.name, kind, &name)?)
            }
            Kind::IpPool => {
                let p = named(&desired.pools, |v| &v.name, kind, &name)?;
                if let Some(old) = stored_pool(&name).filter(|o| o.spec.cidr != p.spec.cidr) {
                    if snap.is_none() {
                        snap = Some(Snapshot::read(kv).await?);
                    }
                    let s = snap.as_ref().ok_or_else(|| AdminError::Conflict {
                        key: keys::PREFIX.into(),
                    })?;
                    let left = addresses_left_out(s, old, Some(p.spec.cidr));
                    if left > 0 && !force {
                        return Err(AdminError::PoolInUse {
                            name,
                            count: left,
                            what: "outside its new CIDR",
                        });
                    }
                    txn.compares.extend(pool_block_guards(s, old));
                }
                config_changed = true;
                encode(p)
            }
            Kind::IpReservation => {
                config_changed = true;
                encode(named(&desired.reservations, |v| &v.name, kind, &name)?)
            }
            Kind::BgpConfiguration => {
                encode(named(&desired.bgp_configs, |v| &v.name, kind, &name)?)
            }
            Kind::BgpPeer => encode(named(&desired.bgp_peers, |v| &v.name, kind, &name)?),
            Kind::Node => {
                let wanted = named(&desired.nodes, |v| &v.name, kind, &name)?;
                // The agent's own fields (tunnel addresses, identity) stay as it wrote them.
                let mut node = current
                    .resources
                    .nodes
                    .iter()
                    .find(|n| n.name == name)
                    .cloned()
                    .unwrap_or_default();
                node.name = wanted.name.clone();
                node.labels = wanted.labels.clone();
                node.ipv4_address = wanted.ipv4_address;
                node.ipv6_address = wanted.ipv6_address;
                node.as_number = wanted.as_number;
                encode(&node)
            }
        };
        let unchanged = rev.is_some()
            && kv
                .get(&key)
                .await
                .map_err(IpamError::from)?
                .is_some_and(|kvp| kvp.value == value);
        report.push((
            kind,
            name,
            match (rev, unchanged) {
                (None, _) => Written::Created,
                (Some(_), true) => Written::Unchanged,
                (Some(_), false) => Written::Configured,
            },
        ));
        txn.compares
            .push(Compare::ModRevision(key.clone(), rev.unwrap_or(0)));
        txn.success.push(Op::put(key, value));
    }
    if config_changed {
        txn.success
            .push(Op::put(keys::CONFIG_EPOCH, b"{}".to_vec()));
    }
    commit(kv, txn).await?;
    Ok(report)
}

/// Deletes each (kind, name) in one transaction. A pool with addresses in use is refused
/// with the count unless `force`.
pub async fn delete<K: Kv>(
    kv: &K,
    targets: &[(Kind, String)],
    force: bool,
) -> Result<(), AdminError> {
    let current = read(kv, &Kind::ALL).await?;
    let mut txn = Txn::new();
    let mut config_changed = false;
    let mut snap: Option<Snapshot> = None;
    for (kind, name) in targets {
        let key = key_of(*kind, name);
        let Some(rev) = current.revisions.get(&key).copied() else {
            return Err(AdminError::NotFound {
                kind: *kind,
                name: name.clone(),
            });
        };
        if *kind == Kind::IpPool {
            if let Some(pool) = current.resources.pools.iter().find(|p| &p.name == name) {
                if snap.is_none() {
                    snap = Some(Snapshot::read(kv).await?);
                }
                if let Some(s) = &snap {
                    let in_use = addresses_left_out(s, pool, None);
                    if in_use > 0 && !force {
                        return Err(AdminError::PoolInUse {
                            name: name.clone(),
                            count: in_use,
                            what: "",
                        });
                    }
                    txn.compares.extend(pool_block_guards(s, pool));
                }
            }
        }
        config_changed |= matches!(kind, Kind::IpPool | Kind::IpReservation);
        txn.compares.push(Compare::ModRevision(key.clone(), rev));
        txn.success.push(Op::delete(key));
    }
    if config_changed {
        txn.success
            .push(Op::put(keys::CONFIG_EPOCH, b"{}".to_vec()));
    }
    commit(kv, txn).await
}

/// What releasing one leaked handle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeakRelease {
    Released(Vec<std::net::IpAddr>),
    /// Not released: the state is no longer what the report recorded.
    Stale(StaleReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The handle changed (or went) since the report: someone else released or used it.
    HandleChanged,
    /// A workload endpoint now names the handle: its ADD finished; the addresses are live.
    WorkloadExists,
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StaleReason::HandleChanged => "the handle changed since the report",
            StaleReason::WorkloadExists => "a workload endpoint holds it now",
        })
    }
}

/// Releases the addresses of a handle that a report found with no workload endpoint, without
/// locking the datastore: only if the handle is still at `handle_rev`, and (every
/// transaction) only while the endpoint the allocation names (`workload_key`) is absent. A
/// CNI ADD writes that endpoint guarded by the handle's revision, so an ADD still running is
/// never left with released addresses: whichever of the two writes comes second fails.
/// Without a `workload_key` (allocations made before the attributes named their pod) the
/// endpoints are listed just before instead.
pub async fn release_leaked_handle<K: Kv + Clone>(
    kv: &K,
    handle: &str,
    handle_rev: i64,
    workload_key: Option<&str>,
) -> Result<LeakRelease, IpamError> {
    let current = kv.get(&keys::handle(handle)).await?;
    if current.as_ref().map(|h| h.mod_revision) != Some(handle_rev) {
        return Ok(LeakRelease::Stale(StaleReason::HandleChanged));
    }
    let guards: Vec<(String, i64)> = match workload_key {
        Some(k) => vec![(k.to_string(), 0)],
        None => {
            let weps = crate::resources::list_all_workload_endpoints(kv).await?;
            if weps.iter().any(|w| w.handle == handle) {
                return Ok(LeakRelease::Stale(StaleReason::WorkloadExists));
            }
            Vec::new()
        }
    };
    let ipam = crate::ipam::Ipam::new(kv.clone(), "");
    match ipam.release_handle_guarded(handle, &guards).await {
        Ok(released) => Ok(LeakRelease::Released(released)),
        Err(IpamError::GuardChanged { .. }) => Ok(LeakRelease::Stale(StaleReason::WorkloadExists)),
        Err(e) => Err(e),
    }
}

/// Releases the addresses of a pod the cluster says is gone (the Kubernetes controllers'
/// leak GC), with the fencing of a dead node's reclaim: its endpoint record goes first (in a
/// transaction that holds only if the handle is still at `handle_rev` and the endpoint is as
/// read), so the node's agent removes the pod's routes; then the addresses, as a leak.
pub async fn release_gone_pod<K: Kv + Clone>(
    kv: &K,
    handle: &str,
    handle_rev: i64,
    workload_key: Option<&str>,
) -> Result<LeakRelease, IpamError> {
    if let Some(key) = workload_key {
        if let Some(wep) = kv.get(key).await? {
            let txn = Txn::new()
                .expect(keys::handle(handle), handle_rev)
                .expect(key, wep.mod_revision)
                .then(Op::delete(key));
            if !kv.txn(txn).await?.succeeded {
                return Ok(LeakRelease::Stale(StaleReason::HandleChanged));
            }
            tracing::info!(%handle, endpoint = %key, "removed the endpoint of a pod that is gone");
        }
    }
    release_leaked_handle(kv, handle, handle_rev, workload_key).await
}

/// Where the endpoint of an allocation with these attributes is (the CNI plugin records
/// node, namespace, pod and interface).
pub fn workload_key_of(attrs: &crate::block::Attributes) -> Option<String> {
    Some(keys::workload(
        attrs.get("node")?,
        attrs.get("namespace")?,
        attrs.get("pod")?,
        attrs.get("ifname")?,
    ))
}

async fn commit<K: Kv>(kv: &K, txn: Txn) -> Result<(), AdminError> {
    if txn.success.is_empty() {
        return Ok(());
    }
    let first_guard = txn.compares.first().map(|c| match c {
        Compare::ModRevision(k, _) | Compare::Exists(k) => k.clone(),
    });
    let out = kv.txn(txn).await.map_err(IpamError::from)?;
    if !out.succeeded {
        return Err(AdminError::Conflict {
            key: first_guard.unwrap_or_default(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{AssignRequest, Ipam, Owner};
    use crate::kv::MemKv;
    use crate::yaml::parse_resources;

    const POOL: &str = "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: p }\nspec: { cidr: 10.244.0.0/24, blockSize: 28 }\n";

    async fn kv_with_pool() -> MemKv {
        let kv = MemKv::new();
        let r = parse_resources(POOL).expect("pool");
        write(&kv, &r, WriteMode::Create, false)
            .await
            .expect("created");
        kv
    }

    #[tokio::test]
    async fn create_replace_and_apply_follow_their_rules_and_write_all_or_nothing() {
        let kv = kv_with_pool().await;
        let r = parse_resources(POOL).expect("pool");
        assert!(matches!(
            write(&kv, &r, WriteMode::Create, false).await,
            Err(AdminError::Exists { .. })
        ));
        let report = write(&kv, &r, WriteMode::Apply, false)
            .await
            .expect("apply");
        assert_eq!(report, vec![(Kind::IpPool, "p".into(), Written::Unchanged)]);
        // A new peer and a replace of a pool that does not exist: nothing is written.
        let text = format!("{}---\napiVersion: tessera.dev/v1\nkind: BGPPeer\nmetadata: {{ name: tor }}\nspec: {{ peerIP: 198.18.0.1, asNumber: 65000 }}\n", POOL.replace("name: p", "name: q"));
        let both = parse_resources(&text).expect("two");
        assert!(matches!(
            write(&kv, &both, WriteMode::Replace, false).await,
            Err(AdminError::NotFound { .. })
        ));
        assert!(read(&kv, &[Kind::BgpPeer])
            .await
            .expect("read")
            .resources
            .bgp_peers
            .is_empty());
        let report = write(&kv, &both, WriteMode::Apply, false)
            .await
            .expect("apply");
        assert_eq!(report.len(), 2);
        let stored = read(&kv, &Kind::ALL).await.expect("read");
        assert_eq!(stored.resources.pools.len(), 2);
        assert_eq!(stored.resources.bgp_peers[0].as_number, 65000);
    }

    #[tokio::test]
    async fn a_pool_with_addresses_in_use_is_not_deleted_or_shrunk_unless_forced() {
        let kv = kv_with_pool().await;
        let ipam = Ipam::new(kv.clone(), "node1");
        let req = AssignRequest {
            owner: Owner {
                handle: "h1".into(),
                ..Default::default()
            },
            num_v4: 3,
            ..Default::default()
        };
        ipam.auto_assign(&req).await.expect("three addresses");
        let e = delete(&kv, &[(Kind::IpPool, "p".into())], false)
            .await
            .expect_err("in use");
        assert!(e.to_string().contains("3 address(es) in use"), "{e}");
        let shrink =
            parse_resources(&POOL.replace("10.244.0.0/24", "10.244.0.128/25")).expect("pool");
        let e = write(&kv, &shrink, WriteMode::Apply, false)
            .await
            .expect_err("shrink");
        assert!(e.to_string().contains("outside its new CIDR"), "{e}");
        assert_eq!(
            read(&kv, &[Kind::IpPool])
                .await
                .expect("read")
                .resources
                .pools[0]
                .spec
                .cidr
                .to_string(),
            "10.244.0.0/24"
        );
        delete(&kv, &[(Kind::IpPool, "p".into())], true)
            .await
            .expect("forced");
        assert!(read(&kv, &[Kind::IpPool])
            .await
            .expect("read")
            .resources
            .pools
            .is_empty());
    }

    async fn leaked(kv: &MemKv) -> (String, i64, Option<String>) {
        let ipam = Ipam::new(kv.clone(), "node1");
        let attrs = crate::block::Attributes::from([
            ("namespace".to_string(), "default".to_string()),
            ("pod".to_string(), "web".to_string()),
            ("ifname".to_string(), "eth0".to_string()),
        ]);
        let req = AssignRequest {
            owner: Owner {
                handle: "net.c1.eth0".into(),
                attrs,
                ..Default::default()
            },
            num_v4: 1,
            ..Default::default()
        };
        let got = ipam.auto_assign(&req).await.expect("one address");
        let snap = Snapshot::read(kv).await.expect("snap");
        let a = snap.blocks[&got[0].block]
            .value
            .allocation(got[0].addr)
            .cloned()
            .expect("alloc");
        let rev = snap.handles["net.c1.eth0"].rev;
        (a.handle, rev, workload_key_of(&a.attrs))
    }

    fn wep(handle: &str) -> crate::model::WorkloadEndpoint {
        crate::model::WorkloadEndpoint {
            node: "node1".into(),
            namespace: "default".into(),
            pod: "web".into(),
            container_id: "c1".into(),
            interface: "eth0".into(),
            host_interface: None,
            mac: None,
            addresses: vec![],
            handle: handle.into(),
            floating_ips: vec![],
            conflict: None,
        }
    }

    #[tokio::test]
    async fn a_leak_release_and_a_late_endpoint_write_never_both_succeed() {
        // The release first: the ADD's endpoint write (guarded by the handle) fails.
        let kv = kv_with_pool().await;
        let (handle, rev, key) = leaked(&kv).await;
        assert!(key.is_some());
        let r = release_leaked_handle(&kv, &handle, rev, key.as_deref())
            .await
            .expect("release");
        assert!(
            matches!(r, LeakRelease::Released(ref a) if a.len() == 1),
            "{r:?}"
        );
        let e = crate::resources::put_workload_endpoint_bound(&kv, &wep(&handle), rev).await;
        assert!(matches!(e, Err(IpamError::GuardChanged { .. })), "{e:?}");

        // The endpoint first: the release is refused and nothing is freed.
        let kv = kv_with_pool().await;
        let (handle, rev, key) = leaked(&kv).await;
        crate::resources::put_workload_endpoint_bound(&kv, &wep(&handle), rev)
            .await
            .expect("the ADD finishes");
        let r = release_leaked_handle(&kv, &handle, rev, key.as_deref())
            .await
            .expect("release");
        assert_eq!(r, LeakRelease::Stale(StaleReason::WorkloadExists));
        crate::snapshot::assert_invariants(&kv, false).await;
        assert_eq!(
            Snapshot::read(&kv).await.expect("snap").allocations().len(),
            1
        );

        // A report older than the handle's last change: skipped.
        let r = release_leaked_handle(&kv, &handle, rev - 1, key.as_deref())
            .await
            .expect("release");
        assert_eq!(r, LeakRelease::Stale(StaleReason::HandleChanged));
    }

    #[tokio::test]
    async fn a_gone_pods_endpoint_goes_first_then_its_addresses() {
        let kv = kv_with_pool().await;
        let (handle, rev, key) = leaked(&kv).await;
        crate::resources::put_workload_endpoint_bound(&kv, &wep(&handle), rev)
            .await
            .expect("the pod had its endpoint");
        let r = release_gone_pod(&kv, &handle, rev, key.as_deref())
            .await
            .expect("release");
        assert!(
            matches!(r, LeakRelease::Released(ref a) if a.len() == 1),
            "{r:?}"
        );
        assert!(kv
            .get(key.as_deref().expect("key"))
            .await
            .expect("get")
            .is_none());
        crate::snapshot::assert_invariants(&kv, false).await;
        assert!(Snapshot::read(&kv)
            .await
            .expect("snap")
            .allocations()
            .is_empty());
    }

    #[tokio::test]
    async fn applying_a_node_keeps_what_its_agent_registered() {
        let kv = MemKv::new();
        let agent = Node {
            name: "node1".into(),
            vxlan_tunnel_address: Some("10.244.0.1".parse().expect("ip")),
            agent_identity: Some("abc".into()),
            ..Default::default()
        };
        crate::resources::put_node(&kv, &agent)
            .await
            .expect("agent's node");
        let r = parse_resources("apiVersion: tessera.dev/v1\nkind: Node\nmetadata: { name: node1, labels: { rack: r1 } }\nspec: { asNumber: 64600 }\n").expect("node");
        write(&kv, &r, WriteMode::Apply, false)
            .await
            .expect("apply");
        let n = crate::resources::get_node(&kv, "node1")
            .await
            .expect("get")
            .expect("node");
        assert_eq!(n.as_number, Some(64600));
        assert_eq!(n.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(n.agent_identity.as_deref(), Some("abc"));
        assert!(n.vxlan_tunnel_address.is_some());
    }
}
