//! `tesseractl ipam show` and `ipam check`: IPAM state read at one etcd revision, summarised
//! per pool and block, and checked against every invariant the datastore knows, plus
//! addresses that no workload holds (leaks).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use tessera_datastore::model::WorkloadEndpoint;
use tessera_datastore::snapshot::Snapshot;

use crate::render::{table, Style};

/// One pool's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub cidr: IpNetwork,
    pub size: u128,
    pub blocks: usize,
    pub in_use: usize,
}

pub fn pool_usage(snap: &Snapshot) -> Vec<PoolUsage> {
    let mut out: Vec<PoolUsage> = snap
        .pools
        .iter()
        .map(|p| {
            let blocks: Vec<_> = snap
                .blocks
                .values()
                .filter(|b| p.spec.cidr.contains(b.value.cidr.network()))
                .collect();
            PoolUsage {
                name: p.name.clone(),
                cidr: p.spec.cidr,
                size: size_of(p.spec.cidr),
                blocks: blocks.len(),
                in_use: blocks.iter().map(|b| b.value.in_use()).sum(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Sizes beyond 2^32 addresses as a power of two (an IPv6 /48 is 2^80, not 25 digits).
fn count_label(n: u128) -> String {
    if n > 1u128 << 32 {
        let bits = 127 - n.leading_zeros();
        let up = 1u128.checked_shl(bits + 1).unwrap_or(u128::MAX);
        if n == 1u128 << bits {
            format!("2^{bits}")
        } else if up - n < up / 100 {
            format!("~2^{}", bits + 1)
        } else {
            format!("~2^{bits}")
        }
    } else {
        n.to_string()
    }
}

fn size_of(cidr: IpNetwork) -> u128 {
    let host_bits = match cidr {
        IpNetwork::V4(n) => 32 - u32::from(n.prefix()),
        IpNetwork::V6(n) => 128 - u32::from(n.prefix()),
    };
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// `ipam show`: per pool; with `blocks`, per block with its node; with `borrowed`, the
/// addresses used by a node other than the block's.
pub fn show(style: Style, snap: &Snapshot, blocks: bool, borrowed: bool) -> String {
    let mut out = table(
        style,
        &["POOL", "CIDR", "SIZE", "BLOCKS", "IN USE", "FREE"],
        pool_usage(snap)
            .into_iter()
            .map(|u| {
                let pct = if u.size == 0 {
                    0.0
                } else {
                    u.in_use as f64 * 100.0 / u.size as f64
                };
                vec![
                    u.name,
                    u.cidr.to_string(),
                    count_label(u.size),
                    u.blocks.to_string(),
                    format!("{} ({pct:.0}%)", u.in_use),
                    count_label(u.size.saturating_sub(u.in_use as u128)),
                ]
            })
            .collect(),
    );
    if blocks {
        out.push('\n');
        out.push_str(&table(
            style,
            &["BLOCK", "NODE", "IN USE", "SIZE"],
            snap.blocks
                .values()
                .map(|b| {
                    vec![
                        b.value.cidr.to_string(),
                        b.value.affinity.clone().unwrap_or_else(|| "-".into()),
                        b.value.in_use().to_string(),
                        size_of(b.value.cidr).to_string(),
                    ]
                })
                .collect(),
        ));
    }
    if borrowed {
        let rows: Vec<Vec<String>> = snap
            .blocks
            .values()
            .flat_map(|b| {
                let owner = b.value.affinity.clone();
                b.value
                    .allocated()
                    .filter_map(move |(addr, a)| {
                        let node = a.attrs.get("node")?.clone();
                        (owner.as_deref() != Some(node.as_str())).then(|| {
                            vec![
                                addr.to_string(),
                                b.value.cidr.to_string(),
                                owner.clone().unwrap_or_else(|| "-".into()),
                                node,
                            ]
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            style,
            &["ADDRESS", "BLOCK", "BLOCK NODE", "USED BY"],
            rows,
        ));
    }
    out
}

/// `ipam show --ip ADDR`: who holds it.
pub fn show_ip(snap: &Snapshot, weps: &[WorkloadEndpoint], addr: IpAddr) -> String {
    let Some((cidr, block)) = snap.blocks.iter().find(|(c, _)| c.contains(addr)) else {
        return match snap.pools.iter().find(|p| p.spec.cidr.contains(addr)) {
            Some(p) => format!("{addr}: free (pool {}, no block claimed)\n", p.name),
            None => format!("{addr}: in no pool\n"),
        };
    };
    let Some(a) = block.value.allocation(addr) else {
        return format!(
            "{addr}: free (block {cidr} of {})\n",
            block.value.affinity.as_deref().unwrap_or("no node")
        );
    };
    let wep = weps.iter().find(|w| w.handle == a.handle);
    let mut s = format!(
        "{addr}: in use\n  block: {cidr} ({})\n  handle: {}\n",
        block.value.affinity.as_deref().unwrap_or("no node"),
        a.handle
    );
    for (k, v) in &a.attrs {
        s.push_str(&format!("  {k}: {v}\n"));
    }
    match wep {
        Some(w) => s.push_str(&format!(
            "  workload: {}/{} on {} ({})\n",
            w.namespace, w.pod, w.node, w.interface
        )),
        None => s.push_str("  workload: none (a leak, or an ADD in progress)\n"),
    }
    s
}

/// What `ipam check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Finding {
    /// An address allocated to a pod (its allocation names a container) whose handle no
    /// workload endpoint names: the pod is gone (a lost DEL) or its ADD is still running. `ipam release --from-report` frees it only
    /// if the handle is still at `handle_revision` and the endpoint is still absent.
    LeakedAddress {
        address: IpAddr,
        handle: String,
        /// The handle's revision when read: a release goes ahead only if it is unchanged.
        handle_revision: i64,
        block: IpNetwork,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        /// The endpoint key the allocation names: a release requires it absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<String>,
    },
    /// An invariant the datastore's checker found broken.
    Inconsistency { message: String },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::LeakedAddress {
                address,
                handle,
                node,
                ..
            } => write!(
                f,
                "leaked address {address}: handle {handle}{} has no workload endpoint",
                node.as_ref()
                    .map(|n| format!(" (node {n})"))
                    .unwrap_or_default()
            ),
            Finding::Inconsistency { message } => f.write_str(message),
        }
    }
}

/// The report `ipam check -o FILE` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The etcd revision everything was read at.
    pub revision: i64,
    pub findings: Vec<Finding>,
}

pub fn check(snap: &Snapshot, weps: &[WorkloadEndpoint]) -> Report {
    let mut findings = Vec::new();
    // Settled: pending or dangling affinities and affine blocks without their record are
    // reported too (a claim in flight shows once; run check again to tell).
    if let Err(v) = snap.check(true) {
        findings.extend(
            v.into_iter()
                .map(|message| Finding::Inconsistency { message }),
        );
    }
    let held: BTreeSet<&str> = weps.iter().map(|w| w.handle.as_str()).collect();
    let mut leaks: BTreeMap<IpAddr, Finding> = BTreeMap::new();
    for (cidr, b) in &snap.blocks {
        // Only a pod's allocation (the CNI plugin records its container) has an endpoint to
        // miss; tunnel addresses and the like belong to their node.
        for (addr, a) in b
            .value
            .allocated()
            .filter(|(_, a)| a.attrs.contains_key("containerID"))
        {
            if !held.contains(a.handle.as_str()) {
                leaks.insert(
                    addr,
                    Finding::LeakedAddress {
                        address: addr,
                        handle: a.handle.clone(),
                        handle_revision: snap.handles.get(&a.handle).map_or(0, |h| h.rev),
                        block: *cidr,
                        node: a.attrs.get("node").cloned(),
                        workload: tessera_datastore::admin::workload_key_of(&a.attrs),
                    },
                );
            }
        }
    }
    findings.extend(leaks.into_values());
    Report {
        revision: snap.revision,
        findings,
    }
}

/// One handle to release, from a report or a live lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakTarget {
    pub handle: String,
    pub handle_revision: i64,
    pub workload: Option<String>,
    /// The addresses the report listed for it.
    pub addresses: Vec<IpAddr>,
}

/// The report's leaks, one target per handle.
pub fn leak_targets(report: &Report) -> Vec<LeakTarget> {
    let mut by_handle: BTreeMap<String, LeakTarget> = BTreeMap::new();
    for f in &report.findings {
        if let Finding::LeakedAddress {
            address,
            handle,
            handle_revision,
            workload,
            ..
        } = f
        {
            by_handle
                .entry(handle.clone())
                .or_insert_with(|| LeakTarget {
                    handle: handle.clone(),
                    handle_revision: *handle_revision,
                    workload: workload.clone(),
                    addresses: Vec::new(),
                })
                .addresses
                .push(*address);
        }
    }
    by_handle.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_counts_read_as_powers_of_two() {
        assert_eq!(count_label(4096), "4096");
        assert_eq!(count_label(1u128 << 80), "2^80");
        assert_eq!(count_label((1u128 << 80) - 8), "~2^80");
        assert_eq!(count_label(3u128 << 40), "~2^41");
    }
}
