//! The controllers drive the real thing: a test-bed cluster (etcd, agents, the CNI plugin)
//! and tessera-kube-controllers fed by a fake apiserver (kube-rs's mock service, answering
//! lists and watches from objects the test adds and deletes). Nothing writes pod intents but
//! the controllers. Checked: a labelled pod gets its address from the pool its label owns and
//! an unlabelled one does not; a pod deleted without its CNI DEL (a lost DEL) has its
//! endpoint and addresses released after the grace period; a deleted Node is decommissioned
//! and its addresses reclaimed at once; a sticky StatefulSet pod gets its address back on
//! another node, nobody takes it meanwhile, and a scale-down frees it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tessera_testbed::cluster::{Cluster, ClusterSpec, MODE_POOLS};
use tokio::sync::mpsc;

const OWNED_POOL: &str = "
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: ledger-owned }
spec: { cidr: 10.244.100.0/28, blockSize: 30, ownerSelector: app == \"ledger\" }
---
apiVersion: tessera.dev/v1
kind: IPReservation
metadata: { name: ledger-owned-edges }
spec: { reservedCidrs: [10.244.100.10/31, 10.244.100.12/30] }
";

// Ten addresses owned by app=ledger: a /28 cut into /30 blocks, six reserved.

/// A change the test makes to the cluster's objects.
enum Push {
    Add(&'static str, Value),
    Delete(&'static str, Value),
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Sender = tower_test::mock::SendResponse<Response<Body>>;

fn resource_of(path: &str) -> Option<&'static str> {
    match path {
        "/api/v1/pods" => Some("pods"),
        "/api/v1/namespaces" => Some("namespaces"),
        "/api/v1/nodes" => Some("nodes"),
        "/apis/apps/v1/statefulsets" => Some("statefulsets"),
        _ => None,
    }
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "pods" => "Pod",
        "namespaces" => "Namespace",
        "statefulsets" => "StatefulSet",
        _ => "Node",
    }
}

fn api_version_of(resource: &str) -> &'static str {
    if resource == "statefulsets" {
        "apps/v1"
    } else {
        "v1"
    }
}

/// Answers like the apiserver: lists of the current objects at the current
/// resourceVersion, watches with the events since (a parked watch is answered when one
/// comes), Events accepted.
async fn fake_apiserver(mut handle: Handle, mut pushes: mpsc::UnboundedReceiver<Push>) {
    let mut objects: BTreeMap<&'static str, BTreeMap<String, Value>> = BTreeMap::new();
    let mut queued: BTreeMap<&'static str, Vec<Value>> = BTreeMap::new();
    let mut parked: BTreeMap<&'static str, Sender> = BTreeMap::new();
    let mut rv: u64 = 100;
    let respond = |send: Sender, body: Vec<u8>| {
        send.send_response(
            Response::builder()
                .body(Body::from(body))
                .expect("response"),
        );
    };
    let lines = |events: &[Value]| -> Vec<u8> {
        events
            .iter()
            .flat_map(|e| {
                let mut l = serde_json::to_vec(e).expect("json");
                l.push(b'\n');
                l
            })
            .collect()
    };
    loop {
        tokio::select! {
            req = handle.next_request() => {
                let Some((req, send)) = req else { return };
                let path = req.uri().path().to_string();
                let watch = req.uri().query().unwrap_or("").contains("watch=true");
                if path.contains("/events") {
                    let mut echo = json!({ "apiVersion": "events.k8s.io/v1", "kind": "Event",
                        "metadata": { "name": "ev", "namespace": "default" }, "eventTime": "2026-11-30T00:00:00.000000Z" });
                    echo["reason"] = json!("InvalidNetworkAnnotations");
                    send.send_response(Response::builder().status(201).body(Body::from(serde_json::to_vec(&echo).expect("json"))).expect("response"));
                    continue;
                }
                let Some(r) = resource_of(&path) else {
                    parked.insert("other", send);
                    continue;
                };
                if watch {
                    match queued.remove(r) {
                        Some(events) if !events.is_empty() => respond(send, lines(&events)),
                        _ => { parked.insert(r, send); }
                    }
                } else {
                    let items: Vec<Value> = objects.get(r).map(|m| m.values().cloned().collect()).unwrap_or_default();
                    let list = json!({ "apiVersion": api_version_of(r), "kind": format!("{}List", kind_of(r)),
                        "metadata": { "resourceVersion": rv.to_string() }, "items": items });
                    respond(send, serde_json::to_vec(&list).expect("json"));
                }
            }
            push = pushes.recv() => {
                let Some(push) = push else { return };
                rv += 1;
                let (r, kind, mut obj) = match push {
                    Push::Add(r, o) => (r, "ADDED", o),
                    Push::Delete(r, o) => (r, "DELETED", o),
                };
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
                if kind == "DELETED" {
                    objects.entry(r).or_default().remove(&name);
                } else {
                    objects.entry(r).or_default().insert(name, obj.clone());
                }
                let event = json!({ "type": kind, "object": obj });
                match parked.remove(r) {
                    Some(send) => respond(send, lines(&[event])),
                    None => queued.entry(r).or_default().push(event),
                }
            }
        }
    }
}

fn pod(name: &str, node: &str, labels: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "default", "labels": labels, "uid": format!("uid-{name}") },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "x" }] } })
}

fn statefulset(name: &str, replicas: u32) -> Value {
    json!({ "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"),
                      "annotations": { "tessera.dev/sticky-addresses": "true" } },
        "spec": { "replicas": replicas, "serviceName": name,
                  "selector": { "matchLabels": { "app": "ledger" } },
                  "template": { "metadata": { "labels": { "app": "ledger" } },
                                "spec": { "containers": [{ "name": "c", "image": "x" }] } } } })
}

/// A pod the StatefulSet `set` owns.
fn owned_pod(name: &str, node: &str, set: &str) -> Value {
    let mut p = pod(name, node, json!({ "app": "ledger" }));
    p["metadata"]["ownerReferences"] = json!([{ "apiVersion": "apps/v1", "kind": "StatefulSet",
        "name": set, "uid": format!("uid-{set}"), "controller": true }]);
    p
}

fn node(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name } })
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_controllers_output_drives_pods_leaks_and_node_deletion() {
    let mut c = Cluster::new(
        "kube_e2e",
        ClusterSpec {
            pools: format!("{MODE_POOLS}{OWNED_POOL}"),
            agent_yaml:
                "leaseTtlSeconds: 10\ngc:\n  intervalSeconds: 1\n  workloadGraceSeconds: 600\n"
                    .into(),
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");

    // The controllers, on a thread inside the control namespace (where etcd is), with the
    // mock client made on their own runtime; the fake apiserver on another.
    let (handle_tx, handle_rx) = std::sync::mpsc::channel::<Handle>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ctl_ns = c.lab.ctl.path();
    let endpoint = c.lab.etcd_endpoint();
    let controllers = std::thread::spawn(move || {
        tessera_testbed::netns::enter_on_this_thread(&ctl_ns).expect("into the control namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            handle_tx.send(handle).expect("handle");
            let client = kube::Client::new(service, "default");
            let kv = tessera_datastore::connection::DatastoreConfig {
                etcd_endpoints: vec![endpoint],
                ..Default::default()
            }
            .connect()
            .await
            .expect("etcd");
            let settings = tessera_kube_controllers::controller::Settings {
                leak_grace: Duration::from_secs(2),
                gc_interval: Duration::from_millis(500),
                ..Default::default()
            };
            tessera_kube_controllers::controller::run(client, kv, settings, async {
                let _ = stop_rx.await;
            })
            .await
        })
    });
    let handle = handle_rx.recv().expect("the mock's handle");
    let (push, pushes) = mpsc::unbounded_channel();
    let apiserver_rt = tokio::runtime::Runtime::new().expect("runtime");
    apiserver_rt.spawn(fake_apiserver(handle, pushes));
    push.send(Push::Add(
        "namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "default" } }),
    ))
    .expect("push");
    for n in ["node1", "node2", "node3", "node4"] {
        push.send(Push::Add("nodes", node(n))).expect("push");
    }
    let ledger = pod("ledger-0", "node1", json!({ "app": "ledger" }));
    let web = pod("web", "node2", json!({ "app": "web" }));
    let db = pod("db", "node3", json!({ "app": "db" }));
    for p in [&ledger, &web, &db] {
        push.send(Push::Add("pods", p.clone())).expect("push");
    }
    let intent_of = |c: &Cluster, name: &str| -> Option<Value> {
        c.lab
            .etcd_prefix(&tessera_datastore::keys::pod_intent("default", name))
            .ok()?
            .into_iter()
            .next()
            .and_then(|(_, v)| serde_json::from_str(&v).ok())
    };
    wait_for("the controllers' intents", Duration::from_secs(20), || {
        ["ledger-0", "web", "db"]
            .iter()
            .all(|n| intent_of(&c, n).is_some())
    });
    assert_eq!(
        intent_of(&c, "ledger-0").expect("intent")["labels"]["app"],
        "ledger"
    );

    // The CNI plugin follows them: the labelled pod gets an address of the pool its label
    // owns; the others never do.
    let owned: ipnetwork::IpNetwork = "10.244.100.0/28".parse().expect("net");
    let l = c
        .add_pod_as_kubernetes_says("node1", "ledger-0")
        .expect("ledger-0");
    let w = c.add_pod_as_kubernetes_says("node2", "web").expect("web");
    let d = c.add_pod_as_kubernetes_says("node3", "db").expect("db");
    assert!(owned.contains(c.pods[l].ip.into()), "{}", c.pods[l].ip);
    assert!(!owned.contains(c.pods[w].ip.into()), "{}", c.pods[w].ip);
    assert!(!owned.contains(c.pods[d].ip.into()), "{}", c.pods[d].ip);
    let ledger_ip = c.pods[l].ip;
    let web_ip = c.pods[w].ip;

    // A lost DEL: Kubernetes deleted web, the runtime never ran DEL. After the grace period
    // the controllers remove its endpoint and release its address; ledger-0 keeps its own.
    push.send(Push::Delete("pods", web)).expect("push");
    let allocated = |c: &Cluster, ip: std::net::Ipv4Addr| -> bool {
        let out = c
            .lab
            .ctl
            .exec(
                &tessera_testbed::cluster::bin("tesseractl").to_string_lossy(),
                &[
                    "--etcd-endpoints",
                    &c.lab.etcd_endpoint(),
                    "ipam",
                    "show",
                    "--ip",
                    &ip.to_string(),
                ],
            )
            .unwrap_or_default();
        out.contains("in use")
    };
    wait_for("web's address released", Duration::from_secs(30), || {
        !allocated(&c, web_ip)
    });
    assert!(allocated(&c, ledger_ip), "ledger-0 keeps its address");
    assert!(c
        .lab
        .etcd_prefix("/tessera/v1/workloads/node2/default/web/")
        .expect("etcd")
        .is_empty());

    // node3's machine is gone (its agent killed: a running agent would keep what its pods
    // hold, by design), and Kubernetes deletes its Node: decommissioned at once and
    // reclaimed by the agents' GC without waiting for the lease or the witness.
    c.signal_agent("node3", nix::sys::signal::Signal::SIGKILL);
    push.send(Push::Delete("nodes", node("node3")))
        .expect("push");
    wait_for("node3 decommissioned", Duration::from_secs(20), || {
        !c.lab
            .etcd_prefix(&tessera_datastore::keys::decommission("node3"))
            .unwrap_or_default()
            .is_empty()
    });
    wait_for(
        "node3's addresses reclaimed",
        Duration::from_secs(60),
        || !allocated(&c, c.pods[d].ip),
    );

    // Sticky addresses: the StatefulSet opts in; its pod ledger-1 leaves node1 (DEL, then
    // the object goes), another ledger pod comes meanwhile, and ledger-1 is recreated on
    // node2 with the address it had. Scaled below it, the address is free again.
    push.send(Push::Add("statefulsets", statefulset("ledger", 2)))
        .expect("push");
    let sticky = owned_pod("ledger-1", "node1", "ledger");
    push.send(Push::Add("pods", sticky.clone())).expect("push");
    wait_for(
        "ledger-1's intent with its hold",
        Duration::from_secs(20),
        || intent_of(&c, "ledger-1").is_some_and(|i| i["stickyHold"] == "sticky.default.ledger.1"),
    );
    let s1 = c
        .add_pod_as_kubernetes_says("node1", "ledger-1")
        .expect("ledger-1");
    let kept_ip = c.pods[s1].ip;
    assert!(owned.contains(kept_ip.into()), "{kept_ip}");
    c.delete_pod(s1).expect("DEL of ledger-1");
    push.send(Push::Delete("pods", sticky)).expect("push");
    assert!(allocated(&c, kept_ip), "held while ledger-1 is away");
    push.send(Push::Add(
        "pods",
        pod("ledger-2", "node2", json!({ "app": "ledger" })),
    ))
    .expect("push");
    wait_for("ledger-2's intent", Duration::from_secs(20), || {
        intent_of(&c, "ledger-2").is_some()
    });
    let other = c
        .add_pod_as_kubernetes_says("node2", "ledger-2")
        .expect("ledger-2");
    assert_ne!(c.pods[other].ip, kept_ip, "nobody takes a held address");
    let back = owned_pod("ledger-1", "node2", "ledger");
    push.send(Push::Add("pods", back.clone())).expect("push");
    let s1 = c
        .add_pod_as_kubernetes_says("node2", "ledger-1")
        .expect("ledger-1 again");
    assert_eq!(
        c.pods[s1].ip, kept_ip,
        "ledger-1 back on node2 with its address"
    );
    // Scaled to one: ledger-1 goes for good and so does its hold.
    c.delete_pod(s1).expect("DEL");
    push.send(Push::Delete("pods", back)).expect("push");
    push.send(Push::Add("statefulsets", statefulset("ledger", 1)))
        .expect("push");
    wait_for(
        "the hold released after the scale-down",
        Duration::from_secs(20),
        || !allocated(&c, kept_ip),
    );
    wait_for(
        "ledger-1's kept intent removed",
        Duration::from_secs(20),
        || intent_of(&c, "ledger-1").is_none(),
    );

    let _ = stop_tx.send(());
    controllers
        .join()
        .expect("controllers thread")
        .expect("controllers ran");
    drop(apiserver_rt);
    c.finish();
}
