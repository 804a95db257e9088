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
    let status = Command::new(root.join("deploy/install-cni.sh"))
        .arg(bin_src)
        .env("CNI_BIN_DIR", tmp.path().join("bin"))
        .env("CNI_CONF_DIR", tmp.path().join("net.d"))
        .env("TESSERA_STATE_DIR", tmp.path().join("state"))
        .env(
            "TESSERA_ETCD_ENDPOINTS",
            "http://198.18.0.2:2379,http://198.18.0.3:2379",
        )
        .env("TESSERA_NODENAME", "node7")
        .status()
        .expect("run install-cni.sh");
    assert!(status.success());
    for b in ["tessera", "tessera-ipam"] {
        assert!(tmp.path().join("bin").join(b).is_file(), "{b} installed");
    }
    let text =
        std::fs::read_to_string(tmp.path().join("net.d/10-tessera.conflist")).expect("conflist");
    let conf: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(
        conf["plugins"][0]["datastore"]["etcdEndpoints"],
        serde_json::json!(["http://198.18.0.2:2379", "http://198.18.0.3:2379"])
    );
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
