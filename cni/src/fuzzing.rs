//! What the fuzz targets check (`fuzz/`), as functions that panic on a broken invariant, so
//! that the committed corpora also run as ordinary tests (`tests/fuzz_corpus.rs`).

use crate::spec::{CniEnv, NetConf};

/// The network configuration parser on arbitrary stdin: never panics, and a configuration
/// it accepts survives a round trip through its own JSON. Returns whether it accepted it.
pub fn netconf(data: &[u8]) -> bool {
    let Ok(conf) = NetConf::parse(data) else {
        return false;
    };
    {
        let json = serde_json::to_vec(&conf).expect("an accepted configuration serialises");
        let again = NetConf::parse(&json).expect("its own JSON parses");
        assert_eq!(
            serde_json::to_value(&conf).expect("value"),
            serde_json::to_value(&again).expect("value")
        );
    }
    true
}

/// The environment parser with `data` as CNI_ARGS (and the other variables valid): never
/// panics; what it accepts has every key it was given, and no entry without `=`. Returns
/// whether it accepted them.
pub fn cni_args(data: &[u8]) -> bool {
    let args = String::from_utf8_lossy(data).into_owned();
    let lookup = |k: &str| -> Option<String> {
        match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_CONTAINERID" => Some("c0ffee".into()),
            "CNI_NETNS" => Some("/run/netns/pod".into()),
            "CNI_IFNAME" => Some("eth0".into()),
            "CNI_PATH" => Some("/opt/cni/bin".into()),
            "CNI_ARGS" => Some(args.clone()),
            _ => None,
        }
    };
    let Ok(env) = CniEnv::from_lookup(lookup) else {
        return false;
    };
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, _) = pair
            .split_once('=')
            .expect("accepted entries are KEY=VALUE");
        assert!(env.args.contains_key(k), "{k:?} kept");
    }
    true
}
