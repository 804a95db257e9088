//! The cluster's truth against the datastore's, decided without I/O: which addresses a
//! StatefulSet's pods keep while they are away (sticky addresses), which allocations are
//! leaks (Calico's rule: valid while the pod exists and is bound to the allocation's node),
//! and which nodes are decommissioned because their Node object was deleted.

use std::collections::{BTreeMap, BTreeSet};

use crate::intent::NamespaceView;

/// Opting a StatefulSet (or every StatefulSet of a namespace) in to sticky addresses.
pub const STICKY_ANNOTATION: &str = "tessera.dev/sticky-addresses";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatefulSetView {
    pub namespace: String,
    pub name: String,
    pub replicas: u32,
    pub annotations: BTreeMap<String, String>,
}

/// The ordinal of `pod` if it is `<statefulset>-<ordinal>` (decimal, no leading zero).
pub fn ordinal(pod: &str, statefulset: &str) -> Option<u32> {
    let digits = pod.strip_prefix(statefulset)?.strip_prefix('-')?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

fn says_true(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(STICKY_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Whether `sts`'s pods keep their addresses: its own annotation, else its namespace's.
pub fn is_sticky(sts: &StatefulSetView, namespace: Option<&NamespaceView>) -> bool {
    match sts.annotations.get(STICKY_ANNOTATION) {
        Some(_) => says_true(&sts.annotations),
        None => namespace.is_some_and(|ns| says_true(&ns.annotations)),
    }
}

/// Addresses a sticky pod holds while it is away: `<namespace>/<statefulset>-<ordinal>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StickyHold {
    pub namespace: String,
    pub statefulset: String,
    pub ordinal: u32,
}

/// Holds that end: their StatefulSet is gone or no longer sticky, or scaled below the
/// ordinal.
pub fn holds_to_release(
    holds: &[StickyHold],
    sets: &[StatefulSetView],
    namespaces: &[NamespaceView],
) -> Vec<StickyHold> {
    holds
        .iter()
        .filter(|h| {
            let set = sets
                .iter()
                .find(|s| s.namespace == h.namespace && s.name == h.statefulset);
            match set {
                None => true,
                Some(s) => {
                    let ns = namespaces.iter().find(|n| n.name == s.namespace);
                    !is_sticky(s, ns) || h.ordinal >= s.replicas
                }
            }
        })
        .cloned()
        .collect()
}

/// An allocation as the leak GC sees it (from its attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAllocation {
    pub handle: String,
    pub node: String,
    pub namespace: String,
    pub pod: String,
}

/// What GC does with an allocation now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakVerdict {
    /// Its pod exists and is bound to the allocation's node.
    Valid,
    /// Not valid since `since_ms`: released once the grace period has passed.
    Waiting { since_ms: u64 },
    /// Not valid for the whole grace period: release it (with the same guards as any leak
    /// release: its endpoint absent, its handle unchanged).
    Release,
}

/// Calico's rule, with a grace period: `pods` maps (namespace, name) to the node the pod is
/// bound to (None while unscheduled); `first_invalid_ms` is when this allocation was first
/// seen invalid (None: not before).
pub fn leak_verdict(
    a: &PodAllocation,
    pods: &BTreeMap<(String, String), Option<String>>,
    first_invalid_ms: Option<u64>,
    now_ms: u64,
    grace_ms: u64,
) -> LeakVerdict {
    let bound_here = pods
        .get(&(a.namespace.clone(), a.pod.clone()))
        .is_some_and(|node| node.as_deref() == Some(a.node.as_str()));
    if bound_here {
        return LeakVerdict::Valid;
    }
    let since_ms = first_invalid_ms.unwrap_or(now_ms);
    if now_ms.saturating_sub(since_ms) >= grace_ms {
        LeakVerdict::Release
    } else {
        LeakVerdict::Waiting { since_ms }
    }
}

/// Nodes to decommission: the datastore's nodes whose Kubernetes Node object was deleted.
/// Only a deletion counts (`deleted`: names from watch Deleted events, or known before and
/// missing from a full list): a datastore node Kubernetes never knew (a standalone route
/// reflector) is not the controller's to judge.
pub fn nodes_to_decommission(
    datastore_nodes: &BTreeSet<String>,
    deleted: &BTreeSet<String>,
) -> Vec<String> {
    datastore_nodes.intersection(deleted).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinals_are_the_statefulsets_own() {
        assert_eq!(ordinal("ledger-0", "ledger"), Some(0));
        assert_eq!(ordinal("ledger-12", "ledger"), Some(12));
        assert_eq!(ordinal("ledger-01", "ledger"), None);
        assert_eq!(ordinal("ledger-x", "ledger"), None);
        assert_eq!(ordinal("ledger-db-0", "ledger"), None, "another set's pod");
        assert_eq!(ordinal("ledger", "ledger"), None);
    }

    fn set(replicas: u32, sticky: Option<&str>) -> StatefulSetView {
        StatefulSetView {
            namespace: "shop".into(),
            name: "ledger".into(),
            replicas,
            annotations: sticky
                .map(|v| [(STICKY_ANNOTATION.to_string(), v.to_string())].into())
                .unwrap_or_default(),
        }
    }

    fn hold(ordinal: u32) -> StickyHold {
        StickyHold {
            namespace: "shop".into(),
            statefulset: "ledger".into(),
            ordinal,
        }
    }

    #[test]
    fn holds_end_with_the_set_its_opt_out_or_a_scale_down() {
        let holds = [hold(0), hold(1), hold(2)];
        let ns = |v: Option<&str>| NamespaceView {
            name: "shop".into(),
            annotations: v
                .map(|v| [(STICKY_ANNOTATION.to_string(), v.to_string())].into())
                .unwrap_or_default(),
            ..Default::default()
        };
        assert!(holds_to_release(&holds, &[set(3, Some("true"))], &[]).is_empty());
        assert_eq!(
            holds_to_release(&holds, &[set(2, Some("true"))], &[]),
            [hold(2)],
            "scaled to 2: ordinal 2 goes"
        );
        assert_eq!(holds_to_release(&holds, &[], &[]).len(), 3, "set deleted");
        assert_eq!(
            holds_to_release(&holds, &[set(3, Some("false"))], &[ns(Some("true"))]).len(),
            3,
            "the set's own word wins over its namespace's"
        );
        assert!(
            holds_to_release(&holds, &[set(3, None)], &[ns(Some("true"))]).is_empty(),
            "opted in by the namespace"
        );
    }

    #[test]
    fn an_allocation_is_valid_while_its_pod_is_bound_to_its_node() {
        let a = PodAllocation {
            handle: "h".into(),
            node: "node1".into(),
            namespace: "shop".into(),
            pod: "web".into(),
        };
        let key = ("shop".to_string(), "web".to_string());
        let bound = |n: Option<&str>| -> BTreeMap<(String, String), Option<String>> {
            [(key.clone(), n.map(String::from))].into()
        };
        assert_eq!(
            leak_verdict(&a, &bound(Some("node1")), None, 1000, 60_000),
            LeakVerdict::Valid
        );
        // Rescheduled elsewhere: this node's allocation is stale.
        assert_eq!(
            leak_verdict(&a, &bound(Some("node2")), None, 1000, 60_000),
            LeakVerdict::Waiting { since_ms: 1000 }
        );
        assert_eq!(
            leak_verdict(&a, &BTreeMap::new(), Some(1000), 60_999, 60_000),
            LeakVerdict::Waiting { since_ms: 1000 }
        );
        assert_eq!(
            leak_verdict(&a, &BTreeMap::new(), Some(1000), 61_000, 60_000),
            LeakVerdict::Release
        );
    }

    #[test]
    fn only_nodes_kubernetes_deleted_are_decommissioned() {
        let ours: BTreeSet<String> = ["node1", "node2", "rr-standalone"].map(String::from).into();
        let deleted: BTreeSet<String> = ["node2", "never-ours"].map(String::from).into();
        assert_eq!(nodes_to_decommission(&ours, &deleted), ["node2"]);
    }

    proptest! {
        /// A valid allocation is never released, whatever the times.
        #[test]
        fn a_bound_pods_allocation_is_never_released(first in proptest::option::of(0u64..1_000_000), now in 0u64..2_000_000, grace in 0u64..100_000) {
            let a = PodAllocation { handle: "h".into(), node: "n".into(), namespace: "ns".into(), pod: "p".into() };
            let pods: BTreeMap<(String, String), Option<String>> = [(("ns".to_string(), "p".to_string()), Some("n".to_string()))].into();
            prop_assert_eq!(leak_verdict(&a, &pods, first, now, grace), LeakVerdict::Valid);
        }
    }
}
