//! The shared datastore configuration against Debian's etcd with client-certificate
//! authentication (`--client-cert-auth`, a CA made by the test): the right certificate
//! works; a missing file, a certificate from another CA, no client certificate or the wrong
//! CA each fail with an error that says which setting and why; the CNI plugin says so in
//! spec error JSON; the agent and the speaker take the same settings.

use std::io::Write;
use std::process::{Command, Stdio};

use tessera_datastore::connection::{DatastoreConfig, DatastoreError};
use tessera_datastore::kv::{Kv, Op, Txn};
use tessera_testbed::cluster::bin;
use tessera_testbed::pki::Pki;
use tessera_testbed::Etcd;

fn config(etcd: &Etcd, pki: &Pki) -> DatastoreConfig {
    let client = pki.client();
    DatastoreConfig {
        etcd_endpoints: vec![etcd.endpoint().to_string()],
        etcd_ca_cert_file: Some(pki.ca()),
        etcd_cert_file: Some(client.cert),
        etcd_key_file: Some(client.key),
        timeout_ms: Some(3000),
        ..Default::default()
    }
}

#[tokio::test]
async fn etcd_with_client_certificates_right_and_wrong() {
    tessera_testbed::require_root();
    let pki = Pki::new(&["127.0.0.1"]).expect("certificates");
    let etcd = Etcd::start_loopback_tls(&pki).expect("etcd with TLS");
    let good = config(&etcd, &pki);

    // The right certificate: a write and a read back.
    let kv = good
        .connect()
        .await
        .expect("connects with the right certificate");
    let key = "/tessera/v1/test/tls";
    let outcome = kv
        .txn(
            Txn::new()
                .expect(key, 0)
                .then(Op::put(key, b"over TLS".to_vec())),
        )
        .await
        .expect("write over TLS");
    assert!(outcome.succeeded);
    let got = kv.get(key).await.expect("read over TLS").expect("the key");
    assert_eq!(got.value, b"over TLS");

    // A missing key file: the setting and the path.
    let mut missing = good.clone();
    missing.etcd_key_file = Some(pki.dir().join("nope.pem"));
    let e = missing.connect().await.err().expect("missing key file");
    assert!(
        matches!(
            &e,
            DatastoreError::File {
                field: "etcdKeyFile",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("nope.pem"), "{e}");

    // A client certificate from another CA: etcd refuses the handshake.
    let mut rogue = good.clone();
    let r = pki.rogue_client();
    rogue.etcd_cert_file = Some(r.cert);
    rogue.etcd_key_file = Some(r.key);
    let e = rogue
        .connect()
        .await
        .err()
        .expect("rogue client certificate");
    assert!(matches!(e, DatastoreError::Refused { .. }), "{e}");
    assert!(
        e.to_string().contains("etcdCertFile"),
        "says what to check: {e}"
    );

    // No client certificate at all: refused too.
    let mut anonymous = good.clone();
    anonymous.etcd_cert_file = None;
    anonymous.etcd_key_file = None;
    let e = anonymous
        .connect()
        .await
        .err()
        .expect("no client certificate");
    assert!(matches!(e, DatastoreError::Refused { .. }), "{e}");

    // The wrong CA: etcd's certificate does not verify.
    let mut wrong_ca = good.clone();
    wrong_ca.etcd_ca_cert_file = Some(pki.dir().join("rogue-ca.pem"));
    let e = wrong_ca.connect().await.err().expect("wrong CA");
    assert!(matches!(e, DatastoreError::Refused { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("does not verify against etcdCACertFile"),
        "{e}"
    );
    eprintln!("wrong CA: {e}");

    // The CNI plugin: ETCD_* variables carry the settings; a wrong certificate is spec
    // error JSON on stdout with a non-zero exit, naming the cause.
    let netconf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "tessera",
        "type": "tessera-ipam",
        "nodename": "node1",
        "datastore": { "etcdEndpoints": [etcd.endpoint()] },
        "ipam": { "type": "tessera-ipam" },
    });
    let invoke = |command: &str, cert: &std::path::Path, key: &std::path::Path| {
        let mut c = Command::new(bin("tessera-ipam"));
        c.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c1")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_PATH", "/opt/cni/bin")
            .env("ETCD_CA_CERT_FILE", pki.ca())
            .env("ETCD_CERT_FILE", cert)
            .env("ETCD_KEY_FILE", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("tessera-ipam");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(netconf.to_string().as_bytes())
            .expect("netconf");
        child.wait_with_output().expect("tessera-ipam ran")
    };
    let rogue = pki.rogue_client();
    // ADD and DEL make no request of their own to prove the connection (their first read
    // is the first request); when that fails they ask why, and say it.
    for command in ["STATUS", "ADD", "DEL"] {
        let out = invoke(command, &rogue.cert, &rogue.key);
        assert!(!out.status.success(), "{command}");
        let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("error JSON");
        assert_eq!(err["cniVersion"], "1.1.0", "{command}: {err}");
        assert!(err["code"].as_u64().is_some(), "{command}: {err}");
        assert!(
            err["msg"].as_str().unwrap_or("").contains("etcdCertFile"),
            "{command}: {err}"
        );
    }
    // The right one: the datastore answers (no pool yet: not ready, for that reason).
    let client = pki.client();
    let out = invoke("STATUS", &client.cert, &client.key);
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert!(
        err["msg"]
            .as_str()
            .unwrap_or("")
            .contains("no enabled IP pool"),
        "reached etcd over TLS: {err}"
    );
}
