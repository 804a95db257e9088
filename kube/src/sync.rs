//! The controller's state machine, without I/O: what the watches said (pods, namespaces,
//! nodes, and complete relists after a watch restarted) goes in; the datastore writes and
//! the Kubernetes Events to make come out. The adapter (controller.rs) feeds it from
//! kube-rs watchers and carries the writes out.

use std::collections::{BTreeMap, BTreeSet};

use tessera_datastore::model::PodIntent;

use crate::decisions::{
    holds_to_release, is_sticky, nodes_to_decommission, ordinal, StatefulSetView, StickyHold,
};
use crate::intent::{pod_intent, NamespaceView, PodView};

type PodKey = (String, String);

/// What a watch reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    PodApplied(PodView),
    PodDeleted {
        namespace: String,
        name: String,
    },
    /// Every pod, after the pod watch (re)started: pods not in it are gone.
    PodsListed(Vec<PodView>),
    NamespaceApplied(NamespaceView),
    NamespaceDeleted(String),
    NamespacesListed(Vec<NamespaceView>),
    StatefulSetApplied(StatefulSetView),
    StatefulSetDeleted {
        namespace: String,
        name: String,
    },
    StatefulSetsListed(Vec<StatefulSetView>),
    NodeApplied(String),
    NodeDeleted(String),
    /// Every node, after the node watch (re)started: nodes seen before and missing now
    /// were deleted while the watch was down.
    NodesListed(Vec<String>),
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    PutIntent {
        namespace: String,
        name: String,
        intent: PodIntent,
    },
    DeleteIntent {
        namespace: String,
        name: String,
    },
    /// The node's Kubernetes object was deleted: reclaim it now.
    Decommission(String),
    /// A Warning Event on the pod (its annotations cannot be followed).
    WarnPod {
        namespace: String,
        name: String,
        message: String,
    },
}

#[derive(Debug, Default)]
pub struct IntentSync {
    pods: BTreeMap<PodKey, PodView>,
    namespaces: BTreeMap<String, NamespaceView>,
    /// The intents in the datastore, as last written (or found at start).
    written: BTreeMap<PodKey, PodIntent>,
    /// The message last published per pod, so an unchanged problem is not repeated.
    warned: BTreeMap<PodKey, String>,
    /// The datastore's nodes: only these are decommissioned.
    datastore_nodes: BTreeSet<String>,
    /// Nodes Kubernetes has shown us.
    seen_nodes: BTreeSet<String>,
    /// A complete pod list has been seen: only then is a missing pod known to be gone.
    pods_listed: bool,
    sets: BTreeMap<(String, String), StatefulSetView>,
    /// A complete StatefulSet list has been seen: only then may holds be released.
    sets_listed: bool,
}

impl IntentSync {
    /// Starts from what the datastore holds: its pod intents and its nodes.
    pub fn new(
        existing: impl IntoIterator<Item = ((String, String), PodIntent)>,
        datastore_nodes: BTreeSet<String>,
    ) -> Self {
        IntentSync {
            written: existing.into_iter().collect(),
            datastore_nodes,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, change: Change) -> Vec<Write> {
        let mut out = Vec::new();
        match change {
            Change::PodApplied(p) => {
                let key = (p.namespace.clone(), p.name.clone());
                self.pods.insert(key.clone(), p);
                self.sync_pod(&key, &mut out);
            }
            Change::PodDeleted { namespace, name } => {
                let key = (namespace, name);
                self.pods.remove(&key);
                self.sync_pod(&key, &mut out);
            }
            Change::PodsListed(pods) => {
                self.pods_listed = true;
                let stale: Vec<PodKey> = self.written.keys().cloned().collect();
                self.pods = pods
                    .into_iter()
                    .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                    .collect();
                let mut keys: BTreeSet<PodKey> = self.pods.keys().cloned().collect();
                keys.extend(stale);
                for key in keys {
                    self.sync_pod(&key, &mut out);
                }
            }
            Change::NamespaceApplied(ns) => {
                let name = ns.name.clone();
                self.namespaces.insert(name.clone(), ns);
                self.sync_namespace(&name, &mut out);
            }
            Change::NamespaceDeleted(name) => {
                self.namespaces.remove(&name);
                self.sync_namespace(&name, &mut out);
            }
            Change::NamespacesListed(list) => {
                let before: BTreeSet<String> = self.namespaces.keys().cloned().collect();
                self.namespaces = list.into_iter().map(|n| (n.name.clone(), n)).collect();
                let mut names: BTreeSet<String> = self.namespaces.keys().cloned().collect();
                names.extend(before);
                for n in names {
                    self.sync_namespace(&n, &mut out);
                }
            }
            Change::StatefulSetApplied(set) => {
                let key = (set.namespace.clone(), set.name.clone());
                self.sets.insert(key.clone(), set);
                self.sync_set(&key, &mut out);
            }
            Change::StatefulSetDeleted { namespace, name } => {
                let key = (namespace, name);
                self.sets.remove(&key);
                self.sync_set(&key, &mut out);
            }
            Change::StatefulSetsListed(list) => {
                self.sets_listed = true;
                let mut keys: BTreeSet<PodKey> = self.sets.keys().cloned().collect();
                self.sets = list
                    .into_iter()
                    .map(|s| ((s.namespace.clone(), s.name.clone()), s))
                    .collect();
                keys.extend(self.sets.keys().cloned());
                for k in keys {
                    self.sync_set(&k, &mut out);
                }
            }
            Change::NodeApplied(n) => {
                self.seen_nodes.insert(n.clone());
                self.datastore_nodes.insert(n);
            }
            Change::NodeDeleted(n) => {
                self.decommission([n].into(), &mut out);
            }
            Change::NodesListed(list) => {
                let now: BTreeSet<String> = list.into_iter().collect();
                let gone: BTreeSet<String> = self.seen_nodes.difference(&now).cloned().collect();
                self.seen_nodes.extend(now.iter().cloned());
                self.datastore_nodes.extend(now);
                self.decommission(gone, &mut out);
            }
        }
        out
    }

    /// The holds (from the datastore's handles) to release now: their StatefulSet is gone,
    /// no longer sticky, or scaled below them, and their pod is not running. None until
    /// complete StatefulSet and pod lists have been seen.
    pub fn holds_to_release(&self, holds: &[StickyHold]) -> Option<Vec<StickyHold>> {
        if !self.sets_listed || !self.pods_listed {
            return None;
        }
        let sets: Vec<StatefulSetView> = self.sets.values().cloned().collect();
        let namespaces: Vec<NamespaceView> = self.namespaces.values().cloned().collect();
        Some(
            holds_to_release(holds, &sets, &namespaces)
                .into_iter()
                .filter(|h| {
                    let pod = format!("{}-{}", h.statefulset, h.ordinal);
                    !self.pods.contains_key(&(h.namespace.clone(), pod))
                })
                .collect(),
        )
    }

    /// A released hold's pod keeps no intent (it was kept only for the hold).
    pub fn forget_kept_intent(&mut self, namespace: &str, pod: &str) -> Option<Write> {
        let key = (namespace.to_string(), pod.to_string());
        if self.pods.contains_key(&key) {
            return None;
        }
        self.written.remove(&key).map(|_| Write::DeleteIntent {
            namespace: key.0,
            name: key.1,
        })
    }

    fn sync_set(&mut self, key: &PodKey, out: &mut Vec<Write>) {
        let pods: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|((ns, _), p)| *ns == key.0 && p.statefulset.as_deref() == Some(key.1.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        for k in pods {
            self.sync_pod(&k, out);
        }
    }

    /// The hold of a pod of a sticky StatefulSet, within its replicas.
    fn sticky_hold(&self, pod: &PodView) -> Option<String> {
        let set_name = pod.statefulset.as_deref()?;
        let o = ordinal(&pod.name, set_name)?;
        let set = self
            .sets
            .get(&(pod.namespace.clone(), set_name.to_string()))?;
        (is_sticky(set, self.namespaces.get(&pod.namespace)) && o < set.replicas)
            .then(|| tessera_datastore::sticky::hold_handle(&pod.namespace, set_name, o))
    }

    /// Every pod and the node it is bound to, once a complete list has been seen (the leak
    /// GC's truth); None before.
    pub fn bound_pods(&self) -> Option<BTreeMap<(String, String), Option<String>>> {
        self.pods_listed.then(|| {
            self.pods
                .iter()
                .map(|(k, p)| (k.clone(), p.node.clone()))
                .collect()
        })
    }

    fn decommission(&mut self, deleted: BTreeSet<String>, out: &mut Vec<Write>) {
        for n in nodes_to_decommission(&self.datastore_nodes, &deleted) {
            self.seen_nodes.remove(&n);
            self.datastore_nodes.remove(&n);
            out.push(Write::Decommission(n));
        }
    }

    fn sync_namespace(&mut self, ns: &str, out: &mut Vec<Write>) {
        let keys: Vec<PodKey> = self.pods.keys().filter(|(n, _)| n == ns).cloned().collect();
        for key in keys {
            self.sync_pod(&key, out);
        }
    }

    /// Brings the datastore's intent for `key` in line with the pod (or its absence).
    fn sync_pod(&mut self, key: &PodKey, out: &mut Vec<Write>) {
        let (namespace, name) = key.clone();
        let Some(pod) = self.pods.get(key) else {
            self.warned.remove(key);
            // A sticky pod's intent stays while it is away: its DEL (which may come after
            // the pod object is gone) hands its addresses to the hold the intent names.
            if self
                .written
                .get(key)
                .is_some_and(|i| i.sticky_hold.is_some())
            {
                return;
            }
            if self.written.remove(key).is_some() {
                out.push(Write::DeleteIntent { namespace, name });
            }
            return;
        };
        let hold = self.sticky_hold(pod);
        let wanted = match pod_intent(pod, self.namespaces.get(&pod.namespace)) {
            Ok(mut i) => {
                self.warned.remove(key);
                i.sticky_hold = hold;
                i
            }
            Err(e) => {
                let message = e.to_string();
                if self.warned.get(key) != Some(&message) {
                    self.warned.insert(key.clone(), message.clone());
                    out.push(Write::WarnPod {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        message: message.clone(),
                    });
                }
                // The CNI plugin refuses the pod with the same words: never a silent
                // fallback to the defaults.
                PodIntent {
                    invalid: Some(message),
                    ..Default::default()
                }
            }
        };
        if self.written.get(key) != Some(&wanted) {
            self.written.insert(key.clone(), wanted.clone());
            out.push(Write::PutIntent {
                namespace,
                name,
                intent: wanted,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, annotations: &[(&str, &str)]) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            node: Some("node1".into()),
            labels: [("app".to_string(), name.to_string())].into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            statefulset: None,
        }
    }

    fn puts(w: &[Write]) -> Vec<(String, PodIntent)> {
        w.iter()
            .filter_map(|w| match w {
                Write::PutIntent { name, intent, .. } => Some((name.clone(), intent.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn intents_follow_pods_and_their_namespace_and_are_written_once() {
        let mut s = IntentSync::default();
        let w = s.apply(Change::PodApplied(pod("shop", "web", &[])));
        assert_eq!(puts(&w).len(), 1);
        assert!(
            s.apply(Change::PodApplied(pod("shop", "web", &[])))
                .is_empty(),
            "unchanged"
        );
        // The namespace gains a pool default: the pod's intent changes.
        let w = s.apply(Change::NamespaceApplied(NamespaceView {
            name: "shop".into(),
            annotations: [(
                "tessera.dev/ipv4pools".to_string(),
                r#"["ten"]"#.to_string(),
            )]
            .into(),
            ..Default::default()
        }));
        assert_eq!(puts(&w)[0].1.ipv4_pools, ["ten"]);
        let w = s.apply(Change::PodDeleted {
            namespace: "shop".into(),
            name: "web".into(),
        });
        assert_eq!(
            w,
            [Write::DeleteIntent {
                namespace: "shop".into(),
                name: "web".into()
            }]
        );
    }

    #[test]
    fn an_invalid_annotation_is_an_event_once_and_an_intent_the_cni_refuses() {
        let mut s = IntentSync::default();
        let bad = pod("shop", "web", &[("tessera.dev/ipAddrs", "10.0.0.1")]);
        let w = s.apply(Change::PodApplied(bad.clone()));
        assert!(
            matches!(&w[0], Write::WarnPod { message, .. } if message.contains("tessera.dev/ipAddrs"))
        );
        assert!(puts(&w)[0].1.invalid.is_some());
        assert!(s.apply(Change::PodApplied(bad)).is_empty(), "no repeat");
        let fixed = pod("shop", "web", &[("tessera.dev/ipAddrs", r#"["10.0.0.1"]"#)]);
        let w = s.apply(Change::PodApplied(fixed));
        assert_eq!(puts(&w)[0].1.invalid, None);
    }

    #[test]
    fn a_relist_removes_intents_of_pods_deleted_while_the_watch_was_down() {
        let existing = [(
            ("shop".to_string(), "gone".to_string()),
            PodIntent::default(),
        )];
        let mut s = IntentSync::new(existing, BTreeSet::new());
        let w = s.apply(Change::PodsListed(vec![pod("shop", "web", &[])]));
        assert!(w.contains(&Write::DeleteIntent {
            namespace: "shop".into(),
            name: "gone".into()
        }));
        assert_eq!(puts(&w).len(), 1);
    }

    #[test]
    fn a_sticky_statefulset_pod_names_its_hold_and_keeps_its_intent_while_away() {
        let mut s = IntentSync::default();
        s.apply(Change::PodsListed(vec![]));
        s.apply(Change::StatefulSetsListed(vec![StatefulSetView {
            namespace: "shop".into(),
            name: "ledger".into(),
            replicas: 2,
            annotations: [(
                crate::decisions::STICKY_ANNOTATION.to_string(),
                "true".to_string(),
            )]
            .into(),
        }]));
        let mut p = pod("shop", "ledger-1", &[]);
        p.statefulset = Some("ledger".into());
        let w = s.apply(Change::PodApplied(p));
        assert_eq!(
            puts(&w)[0].1.sticky_hold.as_deref(),
            Some("sticky.shop.ledger.1")
        );
        // Deleted: the intent stays for its DEL and its return.
        let w = s.apply(Change::PodDeleted {
            namespace: "shop".into(),
            name: "ledger-1".into(),
        });
        assert!(w.is_empty(), "{w:?}");
        let hold = StickyHold {
            namespace: "shop".into(),
            statefulset: "ledger".into(),
            ordinal: 1,
        };
        assert_eq!(
            s.holds_to_release(std::slice::from_ref(&hold)),
            Some(vec![])
        );
        // Scaled to one: ordinal 1's hold goes, and the intent kept for it.
        s.apply(Change::StatefulSetApplied(StatefulSetView {
            namespace: "shop".into(),
            name: "ledger".into(),
            replicas: 1,
            annotations: [(
                crate::decisions::STICKY_ANNOTATION.to_string(),
                "true".to_string(),
            )]
            .into(),
        }));
        assert_eq!(
            s.holds_to_release(std::slice::from_ref(&hold)),
            Some(vec![hold.clone()])
        );
        assert_eq!(
            s.forget_kept_intent("shop", "ledger-1"),
            Some(Write::DeleteIntent {
                namespace: "shop".into(),
                name: "ledger-1".into()
            })
        );
    }

    #[test]
    fn a_deleted_node_is_decommissioned_once_and_only_if_the_datastore_has_it() {
        let mut s = IntentSync::new([], ["node1".to_string(), "node2".to_string()].into());
        s.apply(Change::NodesListed(vec!["node1".into(), "node2".into()]));
        assert_eq!(
            s.apply(Change::NodeDeleted("node2".into())),
            [Write::Decommission("node2".into())]
        );
        assert!(s.apply(Change::NodeDeleted("node2".into())).is_empty());
        assert!(s.apply(Change::NodeDeleted("elsewhere".into())).is_empty());
        // Deleted while the watch was down: the relist shows it missing.
        assert_eq!(
            s.apply(Change::NodesListed(vec![])),
            [Write::Decommission("node1".into())]
        );
    }
}
