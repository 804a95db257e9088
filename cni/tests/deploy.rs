//! deploy/install-cni.sh installs the plugins and a conflist the driver accepts.

use std::path::Path;
use std::process::Command;

#[test]
fn install_script_copies_plugins_and_writes_the_conflist() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin_src = Path::new(env!("CARGO_BIN_EXE_tessera"))
        .parent()
        .expect("bin dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // etcd's TLS files as a mounted Secret would give them.
    let secret = tmp.path().join("secret");
    std::fs::create_dir_all(&secret).expect("secret dir");
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(secret.join(f), format!("PEM of {f}\n")).expect("secret file");
    }
    // The pod's ServiceAccount, as Kubernetes mounts it.
    let sa = tmp.path().join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("sa dir");
    std::fs::write(sa.join("token"), "the-token").expect("token");
    std::fs::write(sa.join("ca.crt"), "PEM of the cluster CA\n").expect("ca");
    let status = Command::new(root.join("deploy/install-cni.sh"))
        .arg(bin_src)
        .env("CNI_BIN_DIR", tmp.path().join("bin"))
        .env("CNI_CONF_DIR", tmp.path().join("net.d"))
        .env("TESSERA_STATE_DIR", tmp.path().join("state"))
        .env(
            "ETCD_ENDPOINTS",
            "https://198.18.0.2:2379,https://198.18.0.3:2379",
        )
        .env("ETCD_CA_CERT_FILE", secret.join("ca.crt"))
        .env("ETCD_CERT_FILE", secret.join("tls.crt"))
        .env("ETCD_KEY_FILE", secret.join("tls.key"))
        .env("TESSERA_NODENAME", "node7")
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .env("SERVICEACCOUNT_DIR", &sa)
        .status()
        .expect("run install-cni.sh");
    assert!(status.success());
    for b in ["tessera", "tessera-ipam"] {
        assert!(tmp.path().join("bin").join(b).is_file(), "{b} installed");
    }
    let text =
        std::fs::read_to_string(tmp.path().join("net.d/10-tessera.conflist")).expect("conflist");
    let conf: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let datastore = &conf["plugins"][0]["datastore"];
    assert_eq!(
        datastore["etcdEndpoints"],
        serde_json::json!(["https://198.18.0.2:2379", "https://198.18.0.3:2379"])
    );
    // The TLS files were copied where the plugin on the host reads them, the key private.
    let tls = tmp.path().join("net.d/tessera-tls");
    for (field, file, from) in [
        ("etcdCACertFile", "ca.pem", "ca.crt"),
        ("etcdCertFile", "cert.pem", "tls.crt"),
        ("etcdKeyFile", "key.pem", "tls.key"),
    ] {
        assert_eq!(
            datastore[field],
            tls.join(file).to_string_lossy().as_ref(),
            "{datastore}"
        );
        assert_eq!(
            std::fs::read_to_string(tls.join(file)).expect("copied"),
            format!("PEM of {from}\n")
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tls.join("key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
    // The kubeconfig for the plugin on the host, from the ServiceAccount, private.
    let kubeconfig = conf["plugins"][0]["kubernetes"]["kubeconfig"]
        .as_str()
        .expect("the conflist names the kubeconfig")
        .to_string();
    let kc = std::fs::read_to_string(&kubeconfig).expect("kubeconfig written");
    assert!(
        kc.contains("server: https://10.96.0.1:443") && kc.contains("token: the-token"),
        "{kc}"
    );
    let mode = std::fs::metadata(&kubeconfig)
        .expect("kc")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let parsed: tessera_cni::spec::DatastoreConf =
        serde_json::from_value(datastore.clone()).expect("the plugin reads the section");
    parsed.validate().expect("consistent TLS settings");
    let types: Vec<&str> = conf["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(types, ["tessera", "portmap", "bandwidth"]);
    tessera_cni::driver::Driver::from_conflist(&conf, vec![]).expect("the driver accepts it");
    let node = std::fs::read_to_string(tmp.path().join("state/nodename")).expect("nodename");
    assert_eq!(node.trim(), "node7");
}
