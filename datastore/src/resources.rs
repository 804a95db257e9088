//! Reading and writing the non-IPAM resources: pools, reservations, nodes, workload endpoints.
//! Pool and reservation writes bump [`keys::CONFIG_EPOCH`] in the same transaction.

use crate::codec::{decode, encode, now_ms, with_retry};
use crate::error::IpamError;
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::{Conflict, IpPool, IpReservation, Node, PodIntent, WorkloadEndpoint};

/// Pools and reservations as read at one revision, with the epoch's revision.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub epoch_rev: i64,
    pub pools: Vec<IpPool>,
    pub reservations: Vec<IpReservation>,
    /// The format blocks are written in (the `IPAMConfiguration`'s; V1 without one).
    pub block_format: crate::block::BlockFormat,
}

impl Config {
    pub fn is_reserved(&self, addr: std::net::IpAddr) -> bool {
        self.reservations
            .iter()
            .flat_map(|r| &r.spec.reserved_cidrs)
            .any(|c| c.contains(addr))
    }

    pub fn pool_of(&self, addr: std::net::IpAddr) -> Option<&IpPool> {
        self.pools.iter().find(|p| p.spec.cidr.contains(addr))
    }
}

pub async fn load_config<K: Kv>(kv: &K) -> Result<Config, IpamError> {
    let (kvs, _) = with_retry(|| kv.get_prefix(keys::CONFIG)).await?;
    let mut cfg = Config::default();
    for item in &kvs {
        if item.key == keys::CONFIG_EPOCH {
            cfg.epoch_rev = item.mod_revision;
        } else if item.key.starts_with(keys::POOLS) {
            cfg.pools.push(decode(item)?);
        } else if item.key.starts_with(keys::RESERVATIONS) {
            cfg.reservations.push(decode(item)?);
        } else if item.key == keys::ipam_config("default") {
            let c: crate::model::IpamConfiguration = decode(item)?;
            cfg.block_format = c.block_format;
        }
    }
    Ok(cfg)
}

/// Creates or replaces pools and reservations in one transaction.
pub async fn apply_config<K: Kv>(
    kv: &K,
    pools: &[IpPool],
    reservations: &[IpReservation],
) -> Result<(), IpamError> {
    let mut txn = Txn::new().then(Op::put(keys::CONFIG_EPOCH, b"{}".to_vec()));
    for p in pools {
        txn = txn.then(Op::put(keys::pool(&p.name), encode(p)));
    }
    for r in reservations {
        txn = txn.then(Op::put(keys::reservation(&r.name), encode(r)));
    }
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn delete_pool<K: Kv>(kv: &K, name: &str) -> Result<(), IpamError> {
    let txn = Txn::new()
        .then(Op::put(keys::CONFIG_EPOCH, b"{}".to_vec()))
        .then(Op::delete(keys::pool(name)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn delete_reservation<K: Kv>(kv: &K, name: &str) -> Result<(), IpamError> {
    let txn = Txn::new()
        .then(Op::put(keys::CONFIG_EPOCH, b"{}".to_vec()))
        .then(Op::delete(keys::reservation(name)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn put_node<K: Kv>(kv: &K, node: &Node) -> Result<(), IpamError> {
    let txn = Txn::new().then(Op::put(keys::node(&node.name), encode(node)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn get_node<K: Kv>(kv: &K, name: &str) -> Result<Option<Node>, IpamError> {
    let key = keys::node(name);
    match with_retry(|| kv.get(&key)).await? {
        Some(item) => Ok(Some(decode(&item)?)),
        None => Ok(None),
    }
}

pub async fn delete_node<K: Kv>(kv: &K, name: &str) -> Result<(), IpamError> {
    let txn = Txn::new().then(Op::delete(keys::node(name)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn put_workload_endpoint<K: Kv>(kv: &K, wep: &WorkloadEndpoint) -> Result<(), IpamError> {
    let key = keys::workload(&wep.node, &wep.namespace, &wep.pod, &wep.interface);
    let txn = Txn::new().then(Op::put(key, encode(wep)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

/// Writes the endpoint of a pod whose addresses came from IPAM, only while its IPAM handle
/// is still at `handle_rev` (as the ADD left it). Together with a leak release that requires
/// the endpoint absent, this orders the two: either the release wins and this write fails
/// (the ADD fails, the runtime retries it with new addresses), or the endpoint is written
/// first and the release is refused.
pub async fn put_workload_endpoint_bound<K: Kv>(
    kv: &K,
    wep: &WorkloadEndpoint,
    handle_rev: i64,
) -> Result<(), IpamError> {
    let key = keys::workload(&wep.node, &wep.namespace, &wep.pod, &wep.interface);
    let handle = keys::handle(&wep.handle);
    let txn = Txn::new()
        .expect(&handle, handle_rev)
        .then(Op::put(key, encode(wep)));
    let out = with_retry(|| kv.txn(txn.clone())).await?;
    if !out.succeeded {
        return Err(IpamError::GuardChanged { key: handle });
    }
    Ok(())
}

pub async fn get_workload_endpoint<K: Kv>(
    kv: &K,
    node: &str,
    namespace: &str,
    pod: &str,
    interface: &str,
) -> Result<Option<WorkloadEndpoint>, IpamError> {
    let key = keys::workload(node, namespace, pod, interface);
    with_retry(|| kv.get(&key))
        .await?
        .as_ref()
        .map(decode)
        .transpose()
}

/// Records that `lost` (some of the endpoint's addresses) now belong to other workloads: the
/// pod is fenced. One transaction guarded by the endpoint's revision (a DEL or a new ADD
/// since wins); false when the endpoint is gone.
pub async fn mark_workload_conflicted<K: Kv>(
    kv: &K,
    wep: &WorkloadEndpoint,
    lost: &[std::net::IpAddr],
) -> Result<bool, IpamError> {
    let key = keys::workload(&wep.node, &wep.namespace, &wep.pod, &wep.interface);
    for _ in 0..crate::ipam::MAX_CONFLICTS {
        let Some(current) = with_retry(|| kv.get(&key)).await? else {
            return Ok(false);
        };
        let mut w: WorkloadEndpoint = decode(&current)?;
        let conflict = w.conflict.get_or_insert(Conflict {
            addresses: Vec::new(),
            since_ms: now_ms(),
        });
        for a in lost {
            if !conflict.addresses.contains(a) {
                conflict.addresses.push(*a);
            }
        }
        let txn = Txn::new()
            .expect(&key, current.mod_revision)
            .then(Op::put(&key, encode(&w)));
        if with_retry(|| kv.txn(txn.clone())).await?.succeeded {
            return Ok(true);
        }
    }
    Err(IpamError::TooMuchContention {
        what: format!("marking {key} conflicted"),
        attempts: crate::ipam::MAX_CONFLICTS,
    })
}

pub async fn delete_workload_endpoint<K: Kv>(
    kv: &K,
    node: &str,
    namespace: &str,
    pod: &str,
    interface: &str,
) -> Result<(), IpamError> {
    let txn = Txn::new().then(Op::delete(keys::workload(node, namespace, pod, interface)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn list_workload_endpoints<K: Kv>(
    kv: &K,
    node: &str,
) -> Result<Vec<WorkloadEndpoint>, IpamError> {
    let prefix = keys::node_workloads(node);
    let (kvs, _) = with_retry(|| kv.get_prefix(&prefix)).await?;
    kvs.iter().map(decode).collect()
}

/// Every node's workload endpoints.
pub async fn list_all_workload_endpoints<K: Kv>(
    kv: &K,
) -> Result<Vec<WorkloadEndpoint>, IpamError> {
    let (kvs, _) = with_retry(|| kv.get_prefix(keys::WORKLOADS)).await?;
    kvs.iter().map(decode).collect()
}

pub async fn put_pod_intent<K: Kv>(
    kv: &K,
    namespace: &str,
    pod: &str,
    intent: &PodIntent,
) -> Result<(), IpamError> {
    let txn = Txn::new().then(Op::put(keys::pod_intent(namespace, pod), encode(intent)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

pub async fn delete_pod_intent<K: Kv>(kv: &K, namespace: &str, pod: &str) -> Result<(), IpamError> {
    let txn = Txn::new().then(Op::delete(keys::pod_intent(namespace, pod)));
    with_retry(|| kv.txn(txn.clone())).await?;
    Ok(())
}

/// Every pod intent, by (namespace, pod).
pub async fn list_pod_intents<K: Kv>(
    kv: &K,
) -> Result<Vec<((String, String), PodIntent)>, IpamError> {
    let (items, _) = with_retry(|| kv.get_prefix(keys::POD_INTENTS)).await?;
    let mut out = Vec::new();
    for item in &items {
        let Some((ns, pod)) = item
            .key
            .strip_prefix(keys::POD_INTENTS)
            .and_then(|k| k.split_once('/'))
        else {
            continue;
        };
        out.push(((ns.to_string(), pod.to_string()), decode(item)?));
    }
    Ok(out)
}

pub async fn get_pod_intent<K: Kv>(
    kv: &K,
    namespace: &str,
    pod: &str,
) -> Result<Option<PodIntent>, IpamError> {
    let key = keys::pod_intent(namespace, pod);
    match with_retry(|| kv.get(&key)).await? {
        Some(item) => Ok(Some(decode(&item)?)),
        None => Ok(None),
    }
}
