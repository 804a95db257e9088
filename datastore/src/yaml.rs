//! User-facing YAML (pools, reservations, BGP peers, nodes), Kubernetes-style documents:
//!
//! ```yaml
//! apiVersion: tessera.dev/v1
//! kind: IPPool
//! metadata: { name: default-ipv4 }
//! spec: { cidr: 10.244.0.0/16, vxlanMode: CrossSubnet, natOutgoing: true }
//! ```
//!
//! Errors name the document (its number and first line in the file), the resource and the
//! field.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::block::BlockFormat;
use crate::keys;
use crate::model::{
    BgpConfiguration, BgpPeer, IpPool, IpPoolSpec, IpReservation, IpReservationSpec,
    IpamConfiguration, Node,
};
use crate::selector::Selector;

pub const API_VERSION: &str = "tessera.dev/v1";

/// The kinds a document may have, in the order they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    IpamConfiguration,
    IpPool,
    IpReservation,
    BgpConfiguration,
    BgpPeer,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::IpamConfiguration,
        Kind::IpPool,
        Kind::IpReservation,
        Kind::BgpConfiguration,
        Kind::BgpPeer,
        Kind::Node,
    ];

    /// The `kind:` of its documents.
    pub fn name(self) -> &'static str {
        match self {
            Kind::IpamConfiguration => "IPAMConfiguration",
            Kind::IpPool => "IPPool",
            Kind::IpReservation => "IPReservation",
            Kind::BgpConfiguration => "BGPConfiguration",
            Kind::BgpPeer => "BGPPeer",
            Kind::Node => "Node",
        }
    }

    /// What a user may type: the kind, its plural, lower case or not, or a short name.
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        let l = l.strip_suffix('s').unwrap_or(&l);
        match l {
            "ipamconfiguration" | "ipamconfig" => Some(Kind::IpamConfiguration),
            "ippool" | "pool" => Some(Kind::IpPool),
            "ipreservation" | "reservation" => Some(Kind::IpReservation),
            "bgpconfiguration" | "bgpconfig" => Some(Kind::BgpConfiguration),
            "bgppeer" | "peer" => Some(Kind::BgpPeer),
            "node" | "no" => Some(Kind::Node),
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    /// The cluster's IPAM settings (one record, `default`).
    pub ipam_configs: Vec<IpamConfiguration>,
    pub pools: Vec<IpPool>,
    pub reservations: Vec<IpReservation>,
    pub bgp_peers: Vec<BgpPeer>,
    /// The cluster's BGP settings (one record, `default`).
    pub bgp_configs: Vec<BgpConfiguration>,
    /// Nodes as an operator describes them (addresses, AS, labels); the agent's own fields
    /// (tunnel addresses, identity) are not part of the document.
    pub nodes: Vec<Node>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.ipam_configs.is_empty()
            && self.pools.is_empty()
            && self.reservations.is_empty()
            && self.bgp_peers.is_empty()
            && self.bgp_configs.is_empty()
            && self.nodes.is_empty()
    }

    /// (kind, name) of every resource, in order.
    pub fn names(&self) -> Vec<(Kind, String)> {
        let mut out: Vec<(Kind, String)> = Vec::new();
        out.extend(
            self.ipam_configs
                .iter()
                .map(|c| (Kind::IpamConfiguration, c.name.clone())),
        );
        out.extend(self.pools.iter().map(|p| (Kind::IpPool, p.name.clone())));
        out.extend(
            self.reservations
                .iter()
                .map(|r| (Kind::IpReservation, r.name.clone())),
        );
        out.extend(
            self.bgp_configs
                .iter()
                .map(|c| (Kind::BgpConfiguration, c.name.clone())),
        );
        out.extend(
            self.bgp_peers
                .iter()
                .map(|p| (Kind::BgpPeer, p.name.clone())),
        );
        out.extend(self.nodes.iter().map(|n| (Kind::Node, n.name.clone())));
        out
    }

    /// Every resource as a document, in the order of [`Kind::ALL`]: what `get -o yaml`
    /// prints and `apply` reads back.
    pub fn documents(&self) -> Vec<serde_json::Value> {
        let doc = |kind: Kind,
                   name: &str,
                   labels: Option<&BTreeMap<String, String>>,
                   spec: serde_json::Value| {
            let mut metadata = serde_json::json!({ "name": name });
            if let Some(l) = labels.filter(|l| !l.is_empty()) {
                metadata["labels"] = serde_json::json!(l);
            }
            serde_json::json!({
                "apiVersion": API_VERSION,
                "kind": kind.name(),
                "metadata": metadata,
                "spec": spec,
            })
        };
        fn json<T: Serialize>(v: &T) -> serde_json::Value {
            serde_json::to_value(v).unwrap_or_default()
        }
        let mut out = Vec::new();
        for c in &self.ipam_configs {
            out.push(doc(
                Kind::IpamConfiguration,
                &c.name,
                None,
                json(&IpamConfigurationSpec::from(c)),
            ));
        }
        for p in &self.pools {
            out.push(doc(Kind::IpPool, &p.name, None, json(&p.spec)));
        }
        for r in &self.reservations {
            out.push(doc(Kind::IpReservation, &r.name, None, json(&r.spec)));
        }
        for c in &self.bgp_configs {
            out.push(doc(
                Kind::BgpConfiguration,
                &c.name,
                None,
                json(&BgpConfigurationSpec::from(c)),
            ));
        }
        for p in &self.bgp_peers {
            out.push(doc(
                Kind::BgpPeer,
                &p.name,
                None,
                json(&BgpPeerSpec::from(p)),
            ));
        }
        for n in &self.nodes {
            out.push(doc(
                Kind::Node,
                &n.name,
                Some(&n.labels),
                json(&NodeSpec::from(n)),
            ));
        }
        out
    }
}

/// An IPAMConfiguration document's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IpamConfigurationSpec {
    #[serde(default)]
    block_format: BlockFormat,
}

impl From<&IpamConfiguration> for IpamConfigurationSpec {
    fn from(c: &IpamConfiguration) -> Self {
        IpamConfigurationSpec {
            block_format: c.block_format,
        }
    }
}

/// A BGPConfiguration document's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BgpConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    as_number: Option<u32>,
    #[serde(default = "crate::model::yes")]
    node_to_node_mesh_enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    route_reflector_cluster_id: Option<std::net::Ipv4Addr>,
}

impl From<&BgpConfiguration> for BgpConfigurationSpec {
    fn from(c: &BgpConfiguration) -> Self {
        BgpConfigurationSpec {
            as_number: c.as_number,
            node_to_node_mesh_enabled: c.node_to_node_mesh_enabled,
            route_reflector_cluster_id: c.route_reflector_cluster_id,
        }
    }
}

/// A BGPPeer document's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BgpPeerSpec {
    #[serde(rename = "peerIP")]
    peer_ip: IpAddr,
    as_number: u32,
    #[serde(default = "Selector::all")]
    node_selector: Selector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(default)]
    bfd: bool,
}

impl From<&BgpPeer> for BgpPeerSpec {
    fn from(p: &BgpPeer) -> Self {
        BgpPeerSpec {
            peer_ip: p.peer_ip,
            as_number: p.as_number,
            node_selector: p.node_selector.clone(),
            password: p.password.clone(),
            bfd: p.bfd,
        }
    }
}

/// A Node document's spec: what an operator sets (the agent registers the rest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ipv4_address: Option<IpNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ipv6_address: Option<IpNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    as_number: Option<u32>,
}

impl From<&Node> for NodeSpec {
    fn from(n: &Node) -> Self {
        NodeSpec {
            ipv4_address: n.ipv4_address,
            ipv6_address: n.ipv6_address,
            as_number: n.as_number,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("document {document} (line {line}){}: {message}", what.as_ref().map(|w| format!(", {w}")).unwrap_or_default())]
    Parse {
        document: usize,
        line: usize,
        what: Option<String>,
        message: String,
    },
    #[error("document {document} (line {line}), {what}: field {field}: {reason}")]
    Invalid {
        document: usize,
        line: usize,
        what: String,
        field: String,
        reason: String,
    },
}

#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Metadata>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Metadata,
    spec: S,
}

/// Parses every document in `text`.
pub fn parse_resources(text: &str) -> Result<Resources, ResourceError> {
    let mut out = Resources::default();
    for (i, (line, doc)) in split_documents(text).into_iter().enumerate() {
        let document = i + 1;
        let parse_err = |what: Option<String>, e: &dyn std::fmt::Display| ResourceError::Parse {
            document,
            line,
            what,
            message: e.to_string(),
        };
        let header: Header = serde_saphyr::from_str(doc).map_err(|e| parse_err(None, &e))?;
        let (Some(kind), Some(meta)) = (header.kind, header.metadata) else {
            return Err(parse_err(None, &"missing `kind` or `metadata.name`"));
        };
        let what = format!("{kind} {:?}", meta.name);
        let invalid = |field: &str, reason: String| ResourceError::Invalid {
            document,
            line,
            what: what.clone(),
            field: field.into(),
            reason,
        };
        // An AS number, where a document gives one, is never 0.
        let check_asn = |asn: Option<u32>| match asn {
            Some(0) => Err(invalid("spec.asNumber", "0 is not an AS number".into())),
            _ => Ok(()),
        };
        if header.api_version.as_deref() != Some(API_VERSION) {
            return Err(invalid("apiVersion", format!("must be {API_VERSION}")));
        }
        if !keys::valid_segment(&meta.name) {
            return Err(invalid(
                "metadata.name",
                "must be non-empty printable ASCII without '/'".into(),
            ));
        }
        fn typed<S: DeserializeOwned>(doc: &str) -> Result<Document<S>, serde_saphyr::Error> {
            serde_saphyr::from_str(doc)
        }
        match kind.as_str() {
            "IPAMConfiguration" => {
                let d = typed::<IpamConfigurationSpec>(doc)
                    .map_err(|e| parse_err(Some(what.clone()), &e))?;
                if d.metadata.name != "default" {
                    return Err(invalid(
                        "metadata.name",
                        "the cluster has one IPAMConfiguration, named default".into(),
                    ));
                }
                out.ipam_configs.push(IpamConfiguration {
                    name: d.metadata.name,
                    block_format: d.spec.block_format,
                });
            }
            "IPPool" => {
                let d = typed::<IpPoolSpec>(doc).map_err(|e| parse_err(Some(what.clone()), &e))?;
                let pool = IpPool {
                    name: d.metadata.name,
                    spec: d.spec,
                };
                pool.validate()
                    .map_err(|(field, reason)| invalid(field, reason))?;
                out.pools.push(pool);
            }
            "IPReservation" => {
                let d = typed::<IpReservationSpec>(doc)
                    .map_err(|e| parse_err(Some(what.clone()), &e))?;
                out.reservations.push(IpReservation {
                    name: d.metadata.name,
                    spec: d.spec,
                });
            }
            "BGPConfiguration" => {
                let d = typed::<BgpConfigurationSpec>(doc)
                    .map_err(|e| parse_err(Some(what.clone()), &e))?;
                if d.metadata.name != "default" {
                    return Err(invalid(
                        "metadata.name",
                        "the cluster has one BGPConfiguration, named default".into(),
                    ));
                }
                check_asn(d.spec.as_number)?;
                out.bgp_configs.push(BgpConfiguration {
                    name: d.metadata.name,
                    as_number: d.spec.as_number,
                    node_to_node_mesh_enabled: d.spec.node_to_node_mesh_enabled,
                    route_reflector_cluster_id: d.spec.route_reflector_cluster_id,
                });
            }
            "BGPPeer" => {
                let d = typed::<BgpPeerSpec>(doc).map_err(|e| parse_err(Some(what.clone()), &e))?;
                check_asn(Some(d.spec.as_number))?;
                out.bgp_peers.push(BgpPeer {
                    name: d.metadata.name,
                    peer_ip: d.spec.peer_ip,
                    as_number: d.spec.as_number,
                    node_selector: d.spec.node_selector,
                    password: d.spec.password,
                    bfd: d.spec.bfd,
                });
            }
            "Node" => {
                let d = typed::<NodeSpec>(doc).map_err(|e| parse_err(Some(what.clone()), &e))?;
                check_asn(d.spec.as_number)?;
                out.nodes.push(Node {
                    name: d.metadata.name,
                    labels: d.metadata.labels,
                    ipv4_address: d.spec.ipv4_address,
                    ipv6_address: d.spec.ipv6_address,
                    as_number: d.spec.as_number,
                    ..Default::default()
                });
            }
            other => {
                return Err(invalid(
                    "kind",
                    format!(
                        "unknown kind {other:?} (expected one of {})",
                        Kind::ALL.map(Kind::name).join(", ")
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Splits on `---` lines; returns (first line number, text) of each non-empty document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_end() == "---" {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = n + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EncapMode;

    const GOOD: &str = r#"
# pools for the lab
apiVersion: tessera.dev/v1
kind: IPPool
metadata:
  name: default-ipv4
spec:
  cidr: 10.244.0.0/16
  vxlanMode: CrossSubnet
  natOutgoing: true
  nodeSelector: zone == "a"
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: default-ipv6 }
spec: { cidr: "fd10:244::/48" }
---
apiVersion: tessera.dev/v1
kind: IPReservation
metadata: { name: gateways }
spec:
  reservedCidrs: [10.244.0.0/30]
"#;

    #[test]
    fn parses_pools_and_reservations() {
        let r = parse_resources(GOOD).expect("parses");
        assert_eq!(r.pools.len(), 2);
        assert_eq!(r.pools[0].spec.vxlan_mode, EncapMode::CrossSubnet);
        assert_eq!(r.pools[0].block_size(), 26);
        assert_eq!(r.pools[1].block_size(), 122);
        assert_eq!(r.reservations[0].spec.reserved_cidrs.len(), 1);
    }

    #[test]
    fn peers_and_nodes_parse_and_every_kind_renders_back_to_the_same_resources() {
        let text = format!(
            "{GOOD}---\napiVersion: tessera.dev/v1\nkind: BGPPeer\nmetadata: {{ name: tor }}\nspec: {{ peerIP: 198.18.0.1, asNumber: 65000, nodeSelector: rack == \"r1\", bfd: true }}\n---\napiVersion: tessera.dev/v1\nkind: Node\nmetadata: {{ name: node1, labels: {{ rack: r1 }} }}\nspec: {{ ipv4Address: 198.18.0.11/24, asNumber: 64513 }}\n"
        );
        let r = parse_resources(&text).expect("parses");
        assert_eq!(r.bgp_peers[0].as_number, 65000);
        assert!(r.bgp_peers[0].bfd);
        assert_eq!(
            r.nodes[0].labels.get("rack").map(String::as_str),
            Some("r1")
        );
        let docs = r.documents();
        assert_eq!(docs.len(), 5);
        let yaml: String = docs
            .iter()
            .map(|d| serde_saphyr::to_string(d).expect("yaml"))
            .collect::<Vec<_>>()
            .join("---\n");
        assert_eq!(parse_resources(&yaml).expect("reads back"), r, "{yaml}");
        let json: String = docs
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n---\n");
        assert_eq!(parse_resources(&json).expect("JSON reads back"), r);
    }

    #[test]
    fn errors_point_at_document_and_field() {
        let bad_field = GOOD.replace("vxlanMode: CrossSubnet", "vxlanMode: Sometimes");
        let e = parse_resources(&bad_field).unwrap_err().to_string();
        assert!(
            e.contains("document 1") && e.contains("default-ipv4"),
            "{e}"
        );
        assert!(e.contains("Sometimes"), "{e}");

        let bad_cidr = GOOD.replace("fd10:244::/48", "fd10:244::/999");
        let e = parse_resources(&bad_cidr).unwrap_err().to_string();
        assert!(
            e.contains("document 2") && e.contains("default-ipv6"),
            "{e}"
        );

        let bad_block = GOOD.replace("natOutgoing: true", "natOutgoing: true\n  blockSize: 8");
        let e = parse_resources(&bad_block).unwrap_err().to_string();
        assert!(
            e.contains("spec.blockSize") && e.contains("document 1"),
            "{e}"
        );

        let typo = GOOD.replace("reservedCidrs", "reservedCIDRs");
        let e = parse_resources(&typo).unwrap_err().to_string();
        assert!(
            e.contains("document 3") && e.contains("reservedCIDRs"),
            "{e}"
        );

        let selector = GOOD.replace("zone == \"a\"", "zone = a");
        let e = parse_resources(&selector).unwrap_err().to_string();
        assert!(e.contains("selector"), "{e}");
    }
}
