//! The thin adapter: kube-rs watchers on Pods, Namespaces, StatefulSets and Nodes feed
//! [`IntentSync`]; its writes go to etcd (pod intents, decommission records, each guarded by
//! the leader key) and to the apiserver (Warning Events on pods). kube-rs's watcher relists
//! after a 410 Gone or a broken watch and follows bookmarks; a relist here is one complete
//! [`Change`] (`PodsListed`, ...), so that what was deleted while the watch was down is
//! noticed. Everything runs in one loop on the caller's task: nothing is spawned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tessera_datastore::kv::{Kv, Op, Txn};
use tessera_datastore::leader::{self, Leadership};

use crate::decisions::{StatefulSetView, StickyHold};
use crate::intent::{NamespaceView, PodView};
use crate::sync::{Change, IntentSync, Write};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("datastore: {0}")]
    Datastore(#[from] tessera_datastore::error::IpamError),
    #[error("lost the controllers' leadership (another replica leads now)")]
    LostLeadership,
}

/// Held by the one active replica (the Deployment may run more, on standby).
pub const LEADER_KEY: &str = "/tessera/v1/kube-controllers/leader";

#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's name in the leader key (its pod name).
    pub identity: String,
    pub leader_lease_seconds: u64,
    /// An allocation whose pod is gone, or bound to another node, is released after this.
    pub leak_grace: Duration,
    pub gc_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            identity: "tessera-kube-controllers".into(),
            leader_lease_seconds: 15,
            leak_grace: Duration::from_secs(120),
            gc_interval: Duration::from_secs(10),
        }
    }
}

pub fn pod_view(p: &Pod) -> PodView {
    PodView {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        labels: p.labels().clone(),
        annotations: p.annotations().clone(),
        statefulset: p
            .owner_references()
            .iter()
            .find(|o| o.kind == "StatefulSet")
            .map(|o| o.name.clone()),
    }
}

pub fn namespace_view(n: &Namespace) -> NamespaceView {
    NamespaceView {
        name: n.name_any(),
        labels: n.labels().clone(),
        annotations: n.annotations().clone(),
    }
}

pub fn statefulset_view(s: &StatefulSet) -> StatefulSetView {
    StatefulSetView {
        namespace: s.namespace().unwrap_or_default(),
        name: s.name_any(),
        replicas: s
            .spec
            .as_ref()
            .and_then(|sp| sp.replicas)
            .map_or(1, |r| u32::try_from(r).unwrap_or(0)),
        annotations: s.annotations().clone(),
    }
}

/// One watcher event of any of the kinds watched.
pub enum Watched {
    // Boxed: the objects are large and of very different sizes.
    Pod(Box<Event<Pod>>),
    Namespace(Box<Event<Namespace>>),
    Node(Box<Event<Node>>),
    StatefulSet(Box<Event<StatefulSet>>),
}

/// Turns watcher events into [`Change`]s, holding a (re)list back until it is complete.
#[derive(Default)]
pub struct Relists {
    pods: Option<Vec<PodView>>,
    namespaces: Option<Vec<NamespaceView>>,
    nodes: Option<Vec<String>>,
    sets: Option<Vec<StatefulSetView>>,
}

impl Relists {
    pub fn change(&mut self, w: Watched) -> Option<Change> {
        match w {
            Watched::Pod(e) => match *e {
                Event::Init => {
                    self.pods = Some(Vec::new());
                    None
                }
                Event::InitApply(p) => {
                    self.pods.get_or_insert_with(Vec::new).push(pod_view(&p));
                    None
                }
                Event::InitDone => Some(Change::PodsListed(self.pods.take().unwrap_or_default())),
                Event::Apply(p) => Some(Change::PodApplied(pod_view(&p))),
                Event::Delete(p) => Some(Change::PodDeleted {
                    namespace: p.namespace().unwrap_or_default(),
                    name: p.name_any(),
                }),
            },
            Watched::Namespace(e) => match *e {
                Event::Init => {
                    self.namespaces = Some(Vec::new());
                    None
                }
                Event::InitApply(n) => {
                    self.namespaces
                        .get_or_insert_with(Vec::new)
                        .push(namespace_view(&n));
                    None
                }
                Event::InitDone => Some(Change::NamespacesListed(
                    self.namespaces.take().unwrap_or_default(),
                )),
                Event::Apply(n) => Some(Change::NamespaceApplied(namespace_view(&n))),
                Event::Delete(n) => Some(Change::NamespaceDeleted(n.name_any())),
            },
            Watched::Node(e) => match *e {
                Event::Init => {
                    self.nodes = Some(Vec::new());
                    None
                }
                Event::InitApply(n) => {
                    self.nodes.get_or_insert_with(Vec::new).push(n.name_any());
                    None
                }
                Event::InitDone => Some(Change::NodesListed(self.nodes.take().unwrap_or_default())),
                Event::Apply(n) => Some(Change::NodeApplied(n.name_any())),
                Event::Delete(n) => Some(Change::NodeDeleted(n.name_any())),
            },
            Watched::StatefulSet(e) => match *e {
                Event::Init => {
                    self.sets = Some(Vec::new());
                    None
                }
                Event::InitApply(s) => {
                    self.sets
                        .get_or_insert_with(Vec::new)
                        .push(statefulset_view(&s));
                    None
                }
                Event::InitDone => Some(Change::StatefulSetsListed(
                    self.sets.take().unwrap_or_default(),
                )),
                Event::Apply(s) => Some(Change::StatefulSetApplied(statefulset_view(&s))),
                Event::Delete(s) => Some(Change::StatefulSetDeleted {
                    namespace: s.namespace().unwrap_or_default(),
                    name: s.name_any(),
                }),
            },
        }
    }
}

/// The watches as one stream (each retried with kube-rs's default backoff).
pub fn watches(client: &Client) -> impl Stream<Item = Result<Watched, watcher::Error>> + Send {
    let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(|e| Watched::Pod(Box::new(e))));
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|e| Watched::Namespace(Box::new(e))));
    let nodes = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(|e| Watched::Node(Box::new(e))));
    let sets = watcher(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|e| Watched::StatefulSet(Box::new(e))));
    futures::stream::select(
        futures::stream::select(pods, namespaces),
        futures::stream::select(nodes, sets),
    )
}

/// Carries out the state machine's writes, each guarded by the leader key.
pub struct Executor<K: Kv> {
    pub kv: K,
    pub recorder: Option<Recorder>,
    pub leadership: Leadership,
}

impl<K: Kv> Executor<K> {
    /// One transaction that holds only while we lead.
    async fn as_leader(&self, op: Op) -> Result<(), ControllerError> {
        let txn = Txn::new()
            .expect(LEADER_KEY, self.leadership.key_rev)
            .then(op);
        let out = self
            .kv
            .txn(txn)
            .await
            .map_err(tessera_datastore::error::IpamError::from)?;
        if out.succeeded {
            Ok(())
        } else {
            Err(ControllerError::LostLeadership)
        }
    }

    pub async fn run(&self, writes: Vec<Write>) -> Result<(), ControllerError> {
        use tessera_datastore::keys::pod_intent;
        for w in writes {
            match w {
                Write::PutIntent {
                    namespace,
                    name,
                    intent,
                } => {
                    // Plain structs with string keys: serialising cannot fail.
                    let value = serde_json::to_vec(&intent).unwrap_or_default();
                    self.as_leader(Op::put(pod_intent(&namespace, &name), value))
                        .await?
                }
                Write::DeleteIntent { namespace, name } => {
                    self.as_leader(Op::delete(pod_intent(&namespace, &name)))
                        .await?
                }
                Write::Decommission(node) => {
                    tracing::info!(%node, "the Kubernetes Node was deleted: decommissioning it");
                    tessera_datastore::gc::decommission(
                        &self.kv,
                        &node,
                        "the Kubernetes Node object was deleted",
                    )
                    .await?;
                }
                Write::WarnPod {
                    namespace,
                    name,
                    message,
                } => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), %message, "invalid network annotations");
                    if let Some(r) = &self.recorder {
                        let reference = ObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            namespace: Some(namespace),
                            name: Some(name),
                            ..Default::default()
                        };
                        let ev = KubeEvent {
                            type_: EventType::Warning,
                            reason: "InvalidNetworkAnnotations".into(),
                            note: Some(message),
                            action: "ComputeNetworkIntent".into(),
                            secondary: None,
                        };
                        if let Err(e) = r.publish(&ev, &reference).await {
                            tracing::warn!(error = %e, "cannot publish the Event");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs until `shutdown` (or until leadership is lost): waits to lead, takes the state from
/// the datastore, then feeds every watch event through the state machine and carries out
/// its writes; every `gc_interval` releases the allocations of pods that are gone.
pub async fn run<K: Kv + Clone>(
    client: Client,
    kv: K,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ControllerError> {
    futures::pin_mut!(shutdown);
    let leadership = loop {
        let l = leader::try_lead(
            &kv,
            LEADER_KEY,
            &settings.identity,
            settings.leader_lease_seconds,
        )
        .await;
        if let Some(l) = l {
            tracing::info!(identity = %settings.identity, "leading the Kubernetes controllers");
            break l;
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let existing = tessera_datastore::resources::list_pod_intents(&kv).await?;
    let (nodes, _) = kv
        .get_prefix(tessera_datastore::keys::NODES)
        .await
        .map_err(tessera_datastore::error::IpamError::from)?;
    let datastore_nodes: BTreeSet<String> = nodes
        .iter()
        .filter_map(|k| k.key.strip_prefix(tessera_datastore::keys::NODES))
        .map(String::from)
        .collect();
    let mut sync = IntentSync::new(existing, datastore_nodes);
    let exec = Executor {
        kv: kv.clone(),
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: "tessera-kube-controllers".into(),
                instance: Some(settings.identity.clone()),
            },
        )),
        leadership,
    };
    let mut relists = Relists::default();
    let events = watches(&client);
    futures::pin_mut!(events);
    let mut keepalive = tokio::time::interval(Duration::from_secs(
        (settings.leader_lease_seconds / 3).max(1),
    ));
    let mut gc = tokio::time::interval(settings.gc_interval);
    let mut first_invalid: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                let _ = kv.lease_revoke(leadership.lease).await;
                return Ok(());
            }
            _ = keepalive.tick() => {
                if !leader::keep(&kv, &leadership).await {
                    return Err(ControllerError::LostLeadership);
                }
            }
            _ = gc.tick() => {
                if let Err(e) = release_holds(&kv, &mut sync, &exec).await {
                    tracing::warn!(error = %e, "sticky hold pass failed; the next one retries");
                }
                if let Some(pods) = sync.bound_pods() {
                    let grace = settings.leak_grace.as_millis() as u64;
                    match gc_pass(&kv, &pods, &mut first_invalid, tessera_datastore::now_ms(), grace).await {
                        Ok(released) if !released.is_empty() => tracing::info!(?released, "released the addresses of pods that are gone"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "leak GC pass failed; the next one retries"),
                    }
                }
            }
            next = events.next() => match next {
                None => return Ok(()),
                Some(Err(e)) => tracing::warn!(error = %e, "watch error; retrying"),
                Some(Ok(w)) => {
                    if let Some(change) = relists.change(w) {
                        exec.run(sync.apply(change)).await?;
                    }
                }
            },
        }
    }
}

/// Releases the sticky holds whose StatefulSet is gone, no longer sticky or scaled below
/// them (and the intents kept for their pods).
async fn release_holds<K: Kv + Clone>(
    kv: &K,
    sync: &mut IntentSync,
    exec: &Executor<K>,
) -> Result<(), ControllerError> {
    use tessera_datastore::sticky::{parse_hold, HOLD_PREFIX};
    let prefix = format!("{}{HOLD_PREFIX}", tessera_datastore::keys::HANDLES);
    let keys = kv
        .list_keys(&prefix)
        .await
        .map_err(tessera_datastore::error::IpamError::from)?;
    let holds: Vec<StickyHold> = keys
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(tessera_datastore::keys::HANDLES))
        .filter_map(parse_hold)
        .map(|(namespace, statefulset, ordinal)| StickyHold {
            namespace,
            statefulset,
            ordinal,
        })
        .collect();
    let Some(release) = sync.holds_to_release(&holds) else {
        return Ok(());
    };
    let ipam = tessera_datastore::Ipam::new(kv.clone(), "");
    for h in release {
        let handle =
            tessera_datastore::sticky::hold_handle(&h.namespace, &h.statefulset, h.ordinal);
        let freed = ipam.release_by_handle(&handle).await?;
        tracing::info!(%handle, ?freed, "released a sticky hold (StatefulSet gone, opted out or scaled down)");
        let pod = format!("{}-{}", h.statefulset, h.ordinal);
        if let Some(w) = sync.forget_kept_intent(&h.namespace, &pod) {
            exec.run(vec![w]).await?;
        }
    }
    Ok(())
}

/// One leak GC pass against the cluster's truth (Calico's rule: an allocation is valid while
/// its pod exists and is bound to the allocation's node). `pods`: (namespace, name) -> node.
/// A pod's allocation invalid for `grace_ms` is released with the fencing of a dead node's
/// reclaim (its endpoint removed first, then its addresses, each guarded). Returns the
/// addresses released.
pub async fn gc_pass<K: Kv + Clone>(
    kv: &K,
    pods: &BTreeMap<(String, String), Option<String>>,
    first_invalid: &mut BTreeMap<String, u64>,
    now_ms: u64,
    grace_ms: u64,
) -> Result<Vec<std::net::IpAddr>, ControllerError> {
    use crate::decisions::{leak_verdict, LeakVerdict, PodAllocation};
    use tessera_datastore::admin::{release_gone_pod, workload_key_of, LeakRelease};
    let snap = tessera_datastore::snapshot::Snapshot::read(kv).await?;
    let mut verdicts: BTreeMap<String, (LeakVerdict, Option<String>)> = BTreeMap::new();
    for b in snap.blocks.values() {
        for (_, a) in b.value.allocated() {
            let (Some(_), Some(ns), Some(pod), Some(node)) = (
                a.attrs.get("containerID"),
                a.attrs.get("namespace"),
                a.attrs.get("pod"),
                a.attrs.get("node"),
            ) else {
                continue;
            };
            let alloc = PodAllocation {
                handle: a.handle.clone(),
                node: node.clone(),
                namespace: ns.clone(),
                pod: pod.clone(),
            };
            let v = leak_verdict(
                &alloc,
                pods,
                first_invalid.get(&a.handle).copied(),
                now_ms,
                grace_ms,
            );
            verdicts.insert(a.handle.clone(), (v, workload_key_of(&a.attrs)));
        }
    }
    first_invalid.retain(|h, _| verdicts.contains_key(h));
    let mut released = Vec::new();
    for (handle, (v, workload)) in verdicts {
        match v {
            LeakVerdict::Valid => {
                first_invalid.remove(&handle);
            }
            LeakVerdict::Waiting { since_ms } => {
                first_invalid.insert(handle, since_ms);
            }
            LeakVerdict::Release => {
                let rev = snap.handles.get(&handle).map_or(0, |h| h.rev);
                match release_gone_pod(kv, &handle, rev, workload.as_deref()).await? {
                    LeakRelease::Released(a) => released.extend(a),
                    LeakRelease::Stale(why) => {
                        tracing::info!(%handle, %why, "leak not released")
                    }
                }
                first_invalid.remove(&handle);
            }
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_datastore::ipam::{AssignRequest, Ipam, Owner};
    use tessera_datastore::kv::MemKv;

    async fn allocate(kv: &MemKv, pod: &str, node: &str) -> std::net::IpAddr {
        let ipam = Ipam::new(kv.clone(), node);
        let req = AssignRequest {
            owner: Owner {
                handle: format!("k8s-pod-network.{pod}.eth0"),
                attrs: [
                    ("containerID", pod),
                    ("namespace", "shop"),
                    ("pod", pod),
                    ("ifname", "eth0"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            },
            num_v4: 1,
            ..Default::default()
        };
        ipam.auto_assign(&req).await.expect("address")[0].addr
    }

    #[tokio::test]
    async fn allocations_of_pods_that_are_gone_or_elsewhere_are_released_after_the_grace() {
        let kv = MemKv::new();
        let pools = tessera_datastore::yaml::parse_resources(
            "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: p }\nspec: { cidr: 10.244.0.0/24 }\n",
        )
        .expect("pool");
        tessera_datastore::admin::write(
            &kv,
            &pools,
            tessera_datastore::admin::WriteMode::Apply,
            false,
        )
        .await
        .expect("pool");
        let web = allocate(&kv, "web", "node1").await;
        let gone = allocate(&kv, "gone", "node1").await;
        let moved = allocate(&kv, "moved", "node1").await;
        let pods: BTreeMap<(String, String), Option<String>> = [
            (
                ("shop".to_string(), "web".to_string()),
                Some("node1".to_string()),
            ),
            (
                ("shop".to_string(), "moved".to_string()),
                Some("node2".to_string()),
            ),
        ]
        .into();
        let mut first = BTreeMap::new();
        let r = gc_pass(&kv, &pods, &mut first, 1_000, 60_000)
            .await
            .expect("pass");
        assert!(r.is_empty(), "within the grace");
        assert_eq!(first.len(), 2, "gone and moved are waiting");
        let mut r = gc_pass(&kv, &pods, &mut first, 61_000, 60_000)
            .await
            .expect("pass");
        r.sort();
        let mut want = vec![gone, moved];
        want.sort();
        assert_eq!(r, want);
        let left: Vec<std::net::IpAddr> = tessera_datastore::snapshot::Snapshot::read(&kv)
            .await
            .expect("snap")
            .allocations()
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(left, [web]);
    }
}
