//! What a pod asks of the network, from its annotations and labels and its namespace's:
//! the [`PodIntent`] the CNI plugin reads. Pure: the adapter hands in what the apiserver
//! said, this decides.
//!
//! Annotations, each a JSON list of strings, under Tessera's prefix `tessera.dev/` or, for
//! migration, Calico's `cni.projectcalico.org/`: `ipAddrs`, `ipAddrsNoIpam`, `ipv4pools`,
//! `ipv6pools`, `floatingIPs`. A namespace's `ipv4pools`/`ipv6pools` are defaults that the
//! pod's override. One name set under both prefixes with different values is an error, as
//! is anything that does not parse: never a silent fallback.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tessera_datastore::model::PodIntent;

pub const TESSERA_PREFIX: &str = "tessera.dev/";
pub const CALICO_PREFIX: &str = "cni.projectcalico.org/";

/// The label every intent carries with the pod's namespace (for `ownerSelector`s).
pub const NAMESPACE_LABEL: &str = "tessera.dev/namespace";
/// Namespace labels reach the pod's intent under this prefix (Calico's convention).
pub const NAMESPACE_LABEL_PREFIX: &str = "pcns.";

/// A pod as the mapping needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    /// The node it is bound to (none while pending).
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Its controller, when a StatefulSet owns it.
    pub statefulset: Option<String>,
}

/// A namespace as the mapping needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The annotations the mapping reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Annotation {
    IpAddrs,
    IpAddrsNoIpam,
    Ipv4Pools,
    Ipv6Pools,
    FloatingIps,
}

impl Annotation {
    pub const ALL: [Annotation; 5] = [
        Annotation::IpAddrs,
        Annotation::IpAddrsNoIpam,
        Annotation::Ipv4Pools,
        Annotation::Ipv6Pools,
        Annotation::FloatingIps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Annotation::IpAddrs => "ipAddrs",
            Annotation::IpAddrsNoIpam => "ipAddrsNoIpam",
            Annotation::Ipv4Pools => "ipv4pools",
            Annotation::Ipv6Pools => "ipv6pools",
            Annotation::FloatingIps => "floatingIPs",
        }
    }

    /// A namespace may set defaults only for the pools (addresses are one pod's).
    fn namespace_default(self) -> bool {
        matches!(self, Annotation::Ipv4Pools | Annotation::Ipv6Pools)
    }
}

/// Why a pod's (or its namespace's) annotations cannot be followed: the text of the
/// Kubernetes Event on the pod and of the CNI error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {key} = {value:?} is not a JSON list of strings: {reason}")]
    NotAList {
        key: String,
        value: String,
        reason: String,
    },
    #[error("annotation {key}: {item:?} is not an IP address")]
    NotAnAddress { key: String, item: String },
    #[error("annotation {key}: {item:?} is not a pool name")]
    NotAPoolName { key: String, item: String },
    #[error("annotations {tessera} and {calico} disagree; keep one")]
    Disagree { tessera: String, calico: String },
    #[error("ipAddrs and ipAddrsNoIpam cannot both be set")]
    BothAddressKinds,
}

/// The value of `a` on one object: Tessera's name, else Calico's; both set and different
/// is an error.
fn lookup(
    annotations: &BTreeMap<String, String>,
    a: Annotation,
) -> Result<Option<(String, &str)>, AnnotationError> {
    let tessera_key = format!("{TESSERA_PREFIX}{}", a.name());
    let calico_key = format!("{CALICO_PREFIX}{}", a.name());
    match (annotations.get(&tessera_key), annotations.get(&calico_key)) {
        (Some(t), Some(c)) if parse_list(&tessera_key, t)? != parse_list(&calico_key, c)? => {
            Err(AnnotationError::Disagree {
                tessera: tessera_key,
                calico: calico_key,
            })
        }
        (Some(t), _) => Ok(Some((tessera_key, t.as_str()))),
        (None, Some(c)) => Ok(Some((calico_key, c.as_str()))),
        (None, None) => Ok(None),
    }
}

fn parse_list(key: &str, value: &str) -> Result<Vec<String>, AnnotationError> {
    serde_json::from_str::<Vec<String>>(value).map_err(|e| AnnotationError::NotAList {
        key: key.to_string(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}

fn addresses(key: &str, value: &str) -> Result<Vec<IpAddr>, AnnotationError> {
    parse_list(key, value)?
        .into_iter()
        .map(|item| {
            // Calico accepts "10.0.0.1" and "10.0.0.1/32" alike.
            let bare = match item.split_once('/') {
                Some((a, "32" | "128")) => a,
                Some(_) => "",
                None => item.as_str(),
            };
            bare.trim()
                .parse()
                .map_err(|_| AnnotationError::NotAnAddress {
                    key: key.to_string(),
                    item: item.clone(),
                })
        })
        .collect()
}

fn pool_names(key: &str, value: &str) -> Result<Vec<String>, AnnotationError> {
    parse_list(key, value)?
        .into_iter()
        .map(|item| {
            if tessera_datastore::keys::valid_segment(&item) {
                Ok(item)
            } else {
                Err(AnnotationError::NotAPoolName {
                    key: key.to_string(),
                    item,
                })
            }
        })
        .collect()
}

/// The pod's intent. `namespace`: its namespace, when known (its defaults and labels).
pub fn pod_intent(
    pod: &PodView,
    namespace: Option<&NamespaceView>,
) -> Result<PodIntent, AnnotationError> {
    let mut intent = PodIntent::default();
    for a in Annotation::ALL {
        let own = lookup(&pod.annotations, a)?;
        let inherited = match (&own, namespace) {
            (None, Some(ns)) if a.namespace_default() => lookup(&ns.annotations, a)?,
            _ => None,
        };
        let Some((key, value)) = own.or(inherited) else {
            continue;
        };
        match a {
            Annotation::IpAddrs => intent.ip_addrs = addresses(&key, value)?,
            Annotation::IpAddrsNoIpam => intent.ip_addrs_no_ipam = addresses(&key, value)?,
            Annotation::FloatingIps => intent.floating_ips = addresses(&key, value)?,
            Annotation::Ipv4Pools => intent.ipv4_pools = pool_names(&key, value)?,
            Annotation::Ipv6Pools => intent.ipv6_pools = pool_names(&key, value)?,
        }
    }
    if !intent.ip_addrs.is_empty() && !intent.ip_addrs_no_ipam.is_empty() {
        return Err(AnnotationError::BothAddressKinds);
    }
    intent.labels = pod.labels.clone();
    intent
        .labels
        .insert(NAMESPACE_LABEL.into(), pod.namespace.clone());
    if let Some(ns) = namespace {
        for (k, v) in &ns.labels {
            intent
                .labels
                .insert(format!("{NAMESPACE_LABEL_PREFIX}{k}"), v.clone());
        }
    }
    Ok(intent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(annotations: &[(&str, &str)]) -> PodView {
        PodView {
            namespace: "shop".into(),
            name: "ledger-0".into(),
            node: Some("node1".into()),
            labels: map(&[("app", "ledger")]),
            annotations: map(annotations),
            statefulset: Some("ledger".into()),
        }
    }

    #[test]
    fn tessera_and_calico_names_both_work_and_labels_come_along() {
        let ns = NamespaceView {
            name: "shop".into(),
            labels: map(&[("team", "payments")]),
            annotations: map(&[("cni.projectcalico.org/ipv4pools", r#"["ns-default"]"#)]),
        };
        let i = pod_intent(
            &pod(&[
                ("cni.projectcalico.org/ipAddrs", r#"["10.244.224.5/32"]"#),
                ("tessera.dev/floatingIPs", r#"["203.0.113.7"]"#),
            ]),
            Some(&ns),
        )
        .expect("intent");
        assert_eq!(i.ip_addrs, ["10.244.224.5".parse::<IpAddr>().expect("ip")]);
        assert_eq!(i.floating_ips.len(), 1);
        assert_eq!(i.ipv4_pools, ["ns-default"], "the namespace's default");
        assert_eq!(i.labels.get("app").map(String::as_str), Some("ledger"));
        assert_eq!(
            i.labels.get(NAMESPACE_LABEL).map(String::as_str),
            Some("shop")
        );
        assert_eq!(
            i.labels.get("pcns.team").map(String::as_str),
            Some("payments")
        );
    }

    #[test]
    fn a_pods_pools_override_its_namespaces_and_addresses_are_never_inherited() {
        let ns = NamespaceView {
            name: "shop".into(),
            labels: BTreeMap::new(),
            annotations: map(&[
                ("tessera.dev/ipv4pools", r#"["ns-default"]"#),
                ("tessera.dev/ipAddrs", r#"["10.244.0.9"]"#),
            ]),
        };
        let i = pod_intent(&pod(&[("tessera.dev/ipv4pools", r#"["mine"]"#)]), Some(&ns))
            .expect("intent");
        assert_eq!(i.ipv4_pools, ["mine"]);
        assert!(
            i.ip_addrs.is_empty(),
            "a namespace cannot give every pod one address"
        );
    }

    #[test]
    fn invalid_annotations_are_errors_that_say_which_and_why() {
        let e = pod_intent(&pod(&[("tessera.dev/ipAddrs", "10.0.0.1")]), None).unwrap_err();
        assert!(
            e.to_string().contains("tessera.dev/ipAddrs") && e.to_string().contains("JSON"),
            "{e}"
        );
        let e =
            pod_intent(&pod(&[("tessera.dev/ipAddrs", r#"["10.0.0.300"]"#)]), None).unwrap_err();
        assert_eq!(
            e,
            AnnotationError::NotAnAddress {
                key: "tessera.dev/ipAddrs".into(),
                item: "10.0.0.300".into()
            }
        );
        let e = pod_intent(
            &pod(&[
                ("tessera.dev/ipv4pools", r#"["a"]"#),
                ("cni.projectcalico.org/ipv4pools", r#"["b"]"#),
            ]),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, AnnotationError::Disagree { .. }), "{e}");
        let e = pod_intent(
            &pod(&[
                ("tessera.dev/ipAddrs", r#"["10.0.0.1"]"#),
                ("tessera.dev/ipAddrsNoIpam", r#"["10.0.0.2"]"#),
            ]),
            None,
        )
        .unwrap_err();
        assert_eq!(e, AnnotationError::BothAddressKinds);
        let e = pod_intent(&pod(&[("tessera.dev/ipv6pools", r#"["a/b"]"#)]), None).unwrap_err();
        assert!(matches!(e, AnnotationError::NotAPoolName { .. }), "{e}");
        // The same value under both names is fine.
        pod_intent(
            &pod(&[
                ("tessera.dev/ipv4pools", r#"["a"]"#),
                ("cni.projectcalico.org/ipv4pools", r#"["a"]"#),
            ]),
            None,
        )
        .expect("agreeing names");
    }

    proptest! {
        /// Any annotation text gives an intent or an error, never a panic; and an intent's
        /// addresses are exactly the ones written (as addresses, in order).
        #[test]
        fn any_text_is_an_intent_or_an_error(value in ".{0,40}", addrs in proptest::collection::vec(any::<std::net::Ipv4Addr>(), 0..4)) {
            let _ = pod_intent(&pod(&[("tessera.dev/ipAddrs", &value)]), None);
            let text = serde_json::to_string(&addrs.iter().map(ToString::to_string).collect::<Vec<_>>()).expect("json");
            let i = pod_intent(&pod(&[("cni.projectcalico.org/ipAddrs", &text)]), None).expect("valid");
            let want: Vec<IpAddr> = addrs.into_iter().map(IpAddr::V4).collect();
            prop_assert_eq!(i.ip_addrs, want);
        }
    }
}
