//! User-facing YAML (pools, reservations), Kubernetes-style documents:
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

use crate::keys;
use crate::model::{IpPool, IpPoolSpec, IpReservation, IpReservationSpec};

pub const API_VERSION: &str = "tessera.dev/v1";

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    pub pools: Vec<IpPool>,
    pub reservations: Vec<IpReservation>,
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
    #[allow(dead_code)]
    labels: std::collections::BTreeMap<String, String>,
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
        if header.api_version.as_deref() != Some(API_VERSION) {
            return Err(ResourceError::Invalid {
                document,
                line,
                what,
                field: "apiVersion".into(),
                reason: format!("must be {API_VERSION}"),
            });
        }
        if !keys::valid_segment(&meta.name) {
            return Err(ResourceError::Invalid {
                document,
                line,
                what,
                field: "metadata.name".into(),
                reason: "must be non-empty printable ASCII without '/'".into(),
            });
        }
        fn typed<S: DeserializeOwned>(doc: &str) -> Result<Document<S>, serde_saphyr::Error> {
            serde_saphyr::from_str(doc)
        }
        match kind.as_str() {
            "IPPool" => {
                let d = typed::<IpPoolSpec>(doc).map_err(|e| parse_err(Some(what.clone()), &e))?;
                let pool = IpPool {
                    name: d.metadata.name,
                    spec: d.spec,
                };
                pool.validate()
                    .map_err(|(field, reason)| ResourceError::Invalid {
                        document,
                        line,
                        what: what.clone(),
                        field: field.into(),
                        reason,
                    })?;
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
            other => {
                return Err(ResourceError::Invalid {
                    document,
                    line,
                    what,
                    field: "kind".into(),
                    reason: format!("unknown kind {other:?} (expected IPPool or IPReservation)"),
                })
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
