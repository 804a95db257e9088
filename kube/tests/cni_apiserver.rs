//! The CNI plugin never races the controllers: a pod whose intent is not in the datastore
//! yet (no controller running here) is read from the apiserver (a fake one, plain HTTP on
//! the node's loopback, through the kubeconfig in the CNI configuration) after a short wait;
//! its annotations are followed, and an invalid one fails the ADD with CNI error JSON that
//! names it, never a silent fallback to the defaults.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_testbed::cluster::{Cluster, ClusterSpec, MODE_POOLS};
use tessera_testbed::LabSpec;

fn answer(path: &str) -> (u16, serde_json::Value) {
    let pod = |name: &str, annotations: serde_json::Value| {
        json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "default", "annotations": annotations, "labels": { "app": name } },
            "spec": { "nodeName": "node1", "containers": [{ "name": "c", "image": "x" }] } })
    };
    match path {
        "/api/v1/namespaces/default/pods/annotated" => (
            200,
            pod(
                "annotated",
                json!({ "cni.projectcalico.org/ipAddrs": "[\"10.244.0.77\"]" }),
            ),
        ),
        "/api/v1/namespaces/default/pods/bad" => (
            200,
            pod("bad", json!({ "tessera.dev/ipAddrs": "10.244.0.78" })),
        ),
        "/api/v1/namespaces/default" => (
            200,
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "default" } }),
        ),
        _ => (
            404,
            json!({ "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404 }),
        ),
    }
}

/// A fake apiserver on `127.0.0.1` inside the namespace at `netns`; returns its port.
fn serve_in(netns: String, stop: Arc<AtomicBool>) -> (u16, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        tessera_testbed::netns::enter_on_this_thread(&netns).expect("into node1");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        listener.set_nonblocking(true).expect("nonblocking");
        tx.send(listener.local_addr().expect("addr").port())
            .expect("port");
        while !stop.load(Ordering::Relaxed) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            stream.set_nonblocking(false).expect("blocking");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            let path = path.split('?').next().unwrap_or("").to_string();
            let (status, body) = answer(&path);
            let body = body.to_string();
            let mut s = stream;
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (rx.recv().expect("port"), t)
}

#[test]
fn an_add_before_the_controllers_reads_the_pod_from_the_apiserver() {
    let mut c = Cluster::new(
        "cni_apiserver",
        ClusterSpec {
            lab: LabSpec {
                nodes: 2,
                subnets: 1,
                etcd: true,
            },
            pools: MODE_POOLS.into(),
            router_bgp: false,
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    let stop = Arc::new(AtomicBool::new(false));
    let (port, server) = serve_in(c.lab.node("node1").netns.path(), stop.clone());
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"http://127.0.0.1:{port}\" }}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{ cluster: fake, user: u }}\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    c.cni_extra.insert(
        "kubernetes".into(),
        json!({ "kubeconfig": kubeconfig.to_string_lossy() }),
    );

    let i = c
        .add_pod_as_kubernetes_says("node1", "annotated")
        .expect("ADD follows the annotation read from the apiserver");
    assert_eq!(c.pods[i].ip.to_string(), "10.244.0.77");
    let e = c
        .add_pod_as_kubernetes_says("node1", "bad")
        .expect_err("an invalid annotation");
    let e = e.to_string();
    assert!(
        e.contains("tessera.dev/ipAddrs") && e.contains("\"code\""),
        "CNI error JSON naming the annotation: {e}"
    );
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    c.finish();
}
