//! The kube adapter against a mock apiserver, kube-rs's documented way (a `tower-test` mock
//! service behind `kube::Client`), answering list and watch requests as the apiserver does:
//! paged lists with a resourceVersion, watch streams of ADDED/DELETED events and BOOKMARKs,
//! and a 410 Gone (resourceVersion too old) that makes the watcher list again. The datastore
//! is the in-memory `Kv`. Checked: intents written for pods (with their namespace's default),
//! an intent removed for a pod deleted while the watch was down (seen only in the relist), a
//! Warning Event posted for invalid annotations and an intent the CNI refuses, and a deleted
//! Node decommissioned.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::json;
use tessera_datastore::kv::{Kv, MemKv};
use tessera_datastore::model::{Node, PodIntent};

fn pod(name: &str, node: &str, annotations: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "labels": { "app": name },
                      "annotations": annotations, "resourceVersion": "5", "uid": format!("uid-{name}") },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "x" }] }
    })
}

fn list(kind: &str, rv: &str, items: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": format!("{kind}List"),
        "metadata": { "resourceVersion": rv },
        "items": items
    }))
    .expect("json")
}

fn watch_lines(events: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.extend(serde_json::to_vec(e).expect("json"));
        out.push(b'\n');
    }
    out
}

/// What the mock apiserver saw.
#[derive(Default)]
struct Seen {
    pod_lists: usize,
    warnings: Vec<String>,
}

#[tokio::test]
async fn watches_relists_and_writes_follow_the_apiserver() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    let apiserver = tokio::spawn(async move {
        // Requests left unanswered keep their watch open.
        let mut parked = Vec::new();
        let mut pod_watches = 0;
        let mut node_watches = 0;
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let watch = query.contains("watch=true");
            let body: Vec<u8> = match (path.as_str(), watch) {
                ("/api/v1/pods", false) => {
                    let n = {
                        let mut s = seen2.lock().expect("lock");
                        s.pod_lists += 1;
                        s.pod_lists
                    };
                    if n == 1 {
                        list(
                            "Pod",
                            "10",
                            vec![
                                pod("gone", "node1", json!({})),
                                pod("web", "node1", json!({})),
                            ],
                        )
                    } else {
                        // The relist after 410: "gone" was deleted meanwhile.
                        list(
                            "Pod",
                            "20",
                            vec![
                                pod("web", "node1", json!({})),
                                pod(
                                    "db",
                                    "node2",
                                    json!({ "cni.projectcalico.org/ipAddrs": "[\"10.244.9.9\"]" }),
                                ),
                                pod("bad", "node2", json!({ "tessera.dev/ipAddrs": "10.0.0.1" })),
                            ],
                        )
                    }
                }
                ("/api/v1/pods", true) => {
                    pod_watches += 1;
                    if pod_watches == 1 {
                        watch_lines(&[
                            json!({ "type": "BOOKMARK", "object": { "apiVersion": "v1", "kind": "Pod", "metadata": { "resourceVersion": "12" } } }),
                            json!({ "type": "ERROR", "object": { "apiVersion": "v1", "kind": "Status", "status": "Failure",
                                     "message": "too old resource version: 12 (15)", "reason": "Expired", "code": 410 } }),
                        ])
                    } else {
                        parked.push(send);
                        continue;
                    }
                }
                ("/api/v1/namespaces", false) => list(
                    "Namespace",
                    "3",
                    vec![json!({
                        "apiVersion": "v1", "kind": "Namespace",
                        "metadata": { "name": "shop", "resourceVersion": "3", "labels": { "team": "pay" },
                                      "annotations": { "tessera.dev/ipv4pools": "[\"ten\"]" } }
                    })],
                ),
                ("/api/v1/nodes", false) => list(
                    "Node",
                    "7",
                    vec![
                        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node1", "resourceVersion": "7" } }),
                        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node2", "resourceVersion": "7" } }),
                    ],
                ),
                ("/api/v1/nodes", true) => {
                    node_watches += 1;
                    if node_watches == 1 {
                        watch_lines(&[json!({ "type": "DELETED", "object":
                            { "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node2", "resourceVersion": "8" } } })])
                    } else {
                        parked.push(send);
                        continue;
                    }
                }
                (p, _) if p.starts_with("/apis/events.k8s.io/v1/namespaces/shop/events") => {
                    use http_body_util::BodyExt;
                    let bytes = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let ev: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    seen2.lock().expect("lock").warnings.push(format!(
                        "{} {} {}",
                        ev["type"].as_str().unwrap_or(""),
                        ev["regarding"]["name"].as_str().unwrap_or(""),
                        ev["note"].as_str().unwrap_or("")
                    ));
                    let mut echo = ev.clone();
                    echo["metadata"]["name"] = json!("ev1");
                    let response = Response::builder()
                        .status(201)
                        .body(Body::from(serde_json::to_vec(&echo).expect("json")))
                        .expect("response");
                    send.send_response(response);
                    continue;
                }
                _ => {
                    parked.push(send);
                    continue;
                }
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(body))
                    .expect("response"),
            );
        }
    });

    let kv = MemKv::new();
    for name in ["node1", "node2"] {
        tessera_datastore::resources::put_node(
            &kv,
            &Node {
                name: name.into(),
                ..Default::default()
            },
        )
        .await
        .expect("node");
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(tessera_kube_controllers::controller::run(
        client,
        kv.clone(),
        Default::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let intents = |kv: MemKv| async move {
        tessera_datastore::resources::list_pod_intents(&kv)
            .await
            .expect("intents")
            .into_iter()
            .map(|((_, n), i)| (n, i))
            .collect::<BTreeMap<String, PodIntent>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = intents(kv.clone()).await;
        let done = now.contains_key("db")
            && !now.contains_key("gone")
            && kv
                .get(&tessera_datastore::keys::decommission("node2"))
                .await
                .expect("get")
                .is_some()
            && !seen.lock().expect("lock").warnings.is_empty();
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller never caught up: intents {:?}, lists {}, warnings {:?}",
            now.keys().collect::<Vec<_>>(),
            seen.lock().expect("lock").pod_lists,
            seen.lock().expect("lock").warnings
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = intents(kv.clone()).await;
    assert_eq!(
        now.keys().map(String::as_str).collect::<Vec<_>>(),
        ["bad", "db", "web"],
        "gone's intent went with the relist"
    );
    assert_eq!(
        now["web"].ipv4_pools,
        ["ten"],
        "the namespace's default pool"
    );
    assert_eq!(
        now["web"].labels.get("pcns.team").map(String::as_str),
        Some("pay")
    );
    assert_eq!(
        now["db"].ip_addrs,
        ["10.244.9.9".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert!(now["bad"]
        .invalid
        .as_deref()
        .is_some_and(|m| m.contains("tessera.dev/ipAddrs")));
    let warnings = seen.lock().expect("lock").warnings.clone();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("Warning bad ") && w.contains("tessera.dev/ipAddrs")),
        "{warnings:?}"
    );
    assert!(
        seen.lock().expect("lock").pod_lists >= 2,
        "the 410 made the watcher list again"
    );
    assert!(kv
        .get(&tessera_datastore::keys::decommission("node1"))
        .await
        .expect("get")
        .is_none());
    let _ = stop.send(());
    controller.await.expect("join").expect("controller");
    apiserver.abort();
}
