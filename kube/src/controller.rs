//! The thin adapter: kube-rs watchers on Pods, Namespaces and Nodes feed [`IntentSync`]; its
//! writes go to etcd (pod intents, decommission records) and to the apiserver (Warning
//! Events on pods). kube-rs's watcher relists after a 410 Gone or a broken watch and follows
//! bookmarks; a relist here is one complete [`Change`] (`PodsListed`, ...), so that what was
//! deleted while the watch was down is noticed. The only module that spawns nothing but its
//! own loop: one task.

use std::collections::BTreeSet;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tessera_datastore::kv::Kv;

use crate::intent::{NamespaceView, PodView};
use crate::sync::{Change, IntentSync, Write};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("datastore: {0}")]
    Datastore(#[from] tessera_datastore::error::IpamError),
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

/// One watcher event of any of the three kinds.
pub enum Watched {
    // Boxed: the objects are large and of very different sizes.
    Pod(Box<Event<Pod>>),
    Namespace(Box<Event<Namespace>>),
    Node(Box<Event<Node>>),
}

/// Turns watcher events into [`Change`]s, holding a (re)list back until it is complete.
#[derive(Default)]
pub struct Relists {
    pods: Option<Vec<PodView>>,
    namespaces: Option<Vec<NamespaceView>>,
    nodes: Option<Vec<String>>,
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
        }
    }
}

/// The three watches as one stream (each retried with kube-rs's default backoff).
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
    futures::stream::select(pods, futures::stream::select(namespaces, nodes))
}

/// Carries out the state machine's writes.
pub struct Executor<K: Kv> {
    pub kv: K,
    pub recorder: Option<Recorder>,
}

impl<K: Kv> Executor<K> {
    pub async fn run(&self, writes: Vec<Write>) -> Result<(), ControllerError> {
        use tessera_datastore::resources::{delete_pod_intent, put_pod_intent};
        for w in writes {
            match w {
                Write::PutIntent {
                    namespace,
                    name,
                    intent,
                } => put_pod_intent(&self.kv, &namespace, &name, &intent).await?,
                Write::DeleteIntent { namespace, name } => {
                    delete_pod_intent(&self.kv, &namespace, &name).await?
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

/// Runs until `shutdown`: the state from the datastore, then every watch event through the
/// state machine and its writes.
pub async fn run<K: Kv + Clone>(
    client: Client,
    kv: K,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ControllerError> {
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
        kv,
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: "tessera-kube-controllers".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        )),
    };
    let mut relists = Relists::default();
    let events = watches(&client);
    futures::pin_mut!(events);
    futures::pin_mut!(shutdown);
    loop {
        let next = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            next = events.next() => next,
        };
        match next {
            None => return Ok(()),
            Some(Err(e)) => tracing::warn!(error = %e, "watch error; retrying"),
            Some(Ok(w)) => {
                if let Some(change) = relists.change(w) {
                    exec.run(sync.apply(change)).await?;
                }
            }
        }
    }
}
