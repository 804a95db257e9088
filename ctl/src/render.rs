//! What tesseractl prints: tables (plain or wide), YAML and JSON documents. Pure: the tests
//! compare whole tables.

use comfy_table::{presets, Attribute, Cell, ContentArrangement, Table};
use tessera_datastore::model::{EncapMode, IpPool};
use tessera_datastore::yaml::{Kind, Resources};

/// `-o`: how `get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Yaml,
    Json,
}

/// Bold headers only on a terminal, and never with NO_COLOR (https://no-color.org).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Terminal,
}

impl Style {
    pub fn detect() -> Style {
        use std::io::IsTerminal;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        if std::io::stdout().is_terminal() && !no_color {
            Style::Terminal
        } else {
            Style::Plain
        }
    }
}

/// A kubectl-like table: no borders, columns separated by spaces.
pub fn table(style: Style, header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    t.set_header(header.iter().map(|h| {
        let c = Cell::new(h);
        match style {
            Style::Terminal => c.add_attribute(Attribute::Bold),
            Style::Plain => c,
        }
    }));
    if style == Style::Plain {
        t.force_no_tty();
    }
    for r in rows {
        t.add_row(r);
    }
    // comfy-table pads each cell with one space on both sides: trim the line ends.
    t.lines()
        .map(|l| {
            l.trim_end()
                .strip_prefix(' ')
                .unwrap_or(l.trim_end())
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn mode(m: EncapMode) -> &'static str {
    match m {
        EncapMode::Always => "Always",
        EncapMode::CrossSubnet => "CrossSubnet",
        EncapMode::Never => "Never",
    }
}

fn encapsulation(p: &IpPool) -> String {
    match (p.spec.ipip_mode, p.spec.vxlan_mode) {
        (EncapMode::Never, EncapMode::Never) => "none".into(),
        (ipip, EncapMode::Never) => format!("IPIP {}", mode(ipip)),
        (_, vxlan) => format!("VXLAN {}", mode(vxlan)),
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// `get KIND` as a table.
pub fn resources_table(style: Style, kind: Kind, r: &Resources, wide: bool) -> String {
    match kind {
        Kind::IpamConfiguration => table(
            style,
            &["NAME", "BLOCK FORMAT"],
            r.ipam_configs
                .iter()
                .map(|c| vec![c.name.clone(), format!("{:?}", c.block_format)])
                .collect(),
        ),
        Kind::IpPool => {
            let mut header = vec!["NAME", "CIDR", "BLOCK", "ENCAPSULATION", "NAT", "DISABLED"];
            if wide {
                header.extend(["NODES", "OWNERS", "STRICT AFFINITY"]);
            }
            let rows = r
                .pools
                .iter()
                .map(|p| {
                    let mut row = vec![
                        p.name.clone(),
                        p.spec.cidr.to_string(),
                        format!("/{}", p.block_size()),
                        encapsulation(p),
                        yes(p.spec.nat_outgoing),
                        yes(p.spec.disabled),
                    ];
                    if wide {
                        row.push(p.spec.node_selector.to_string());
                        row.push(
                            p.spec
                                .owner_selector
                                .as_ref()
                                .map_or("-".into(), ToString::to_string),
                        );
                        row.push(yes(p.spec.strict_affinity));
                    }
                    row
                })
                .collect();
            table(style, &header, rows)
        }
        Kind::IpReservation => table(
            style,
            &["NAME", "RESERVED"],
            r.reservations
                .iter()
                .map(|x| {
                    vec![
                        x.name.clone(),
                        x.spec
                            .reserved_cidrs
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect(),
        ),
        Kind::BgpConfiguration => table(
            style,
            &["NAME", "AS", "NODE-TO-NODE MESH", "CLUSTER ID"],
            r.bgp_configs
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.as_number.map_or("-".into(), |a| a.to_string()),
                        if c.node_to_node_mesh_enabled {
                            "on"
                        } else {
                            "off"
                        }
                        .into(),
                        c.route_reflector_cluster_id
                            .map_or("-".into(), |a| a.to_string()),
                    ]
                })
                .collect(),
        ),
        Kind::BgpPeer => {
            let mut header = vec!["NAME", "PEER", "AS", "NODES", "BFD"];
            if wide {
                header.push("PASSWORD");
            }
            let rows = r
                .bgp_peers
                .iter()
                .map(|p| {
                    let mut row = vec![
                        p.name.clone(),
                        p.peer_ip.to_string(),
                        p.as_number.to_string(),
                        p.node_selector.to_string(),
                        yes(p.bfd),
                    ];
                    if wide {
                        row.push(if p.password.is_some() { "set" } else { "-" }.into());
                    }
                    row
                })
                .collect();
            table(style, &header, rows)
        }
        Kind::Node => {
            let mut header = vec!["NAME", "IPV4", "IPV6", "AS"];
            if wide {
                header.extend(["LABELS", "VXLAN", "IPIP"]);
            }
            let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let rows = r
                .nodes
                .iter()
                .map(|n| {
                    let mut row = vec![
                        n.name.clone(),
                        dash(n.ipv4_address.map(|a| a.to_string())),
                        dash(n.ipv6_address.map(|a| a.to_string())),
                        dash(n.as_number.map(|a| a.to_string())),
                    ];
                    if wide {
                        let labels: Vec<String> =
                            n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        row.push(if labels.is_empty() {
                            "-".into()
                        } else {
                            labels.join(",")
                        });
                        row.push(dash(n.vxlan_tunnel_address.map(|a| a.to_string())));
                        row.push(dash(n.ipip_tunnel_address.map(|a| a.to_string())));
                    }
                    row
                })
                .collect();
            table(style, &header, rows)
        }
    }
}

/// Documents as YAML, separated by `---`: what `apply -f` reads back.
pub fn yaml_documents(r: &Resources) -> String {
    r.documents()
        .iter()
        .map(|d| serde_saphyr::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// One document as JSON, or a Kubernetes-style `List` of several.
pub fn json_documents(r: &Resources, single: bool) -> String {
    let docs = r.documents();
    let v = if single && docs.len() == 1 {
        docs.into_iter().next().unwrap_or_default()
    } else {
        serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": docs })
    };
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_datastore::yaml::parse_resources;

    const DOCS: &str = r#"
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: default-ipv4 }
spec: { cidr: 10.244.0.0/16, vxlanMode: CrossSubnet, natOutgoing: true }
---
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: fixed }
spec: { cidr: 10.244.200.0/28, blockSize: 28, ipipMode: Always, ownerSelector: app == "db" }
---
apiVersion: tessera.dev/v1
kind: BGPPeer
metadata: { name: tor }
spec: { peerIP: 198.18.0.1, asNumber: 65000, nodeSelector: rack == "r1", password: s3cret }
---
apiVersion: tessera.dev/v1
kind: Node
metadata: { name: node1, labels: { rack: r1 } }
spec: { ipv4Address: 198.18.0.11/24, asNumber: 64512 }
---
apiVersion: tessera.dev/v1
kind: BGPConfiguration
metadata: { name: default }
spec: { asNumber: 64600, nodeToNodeMeshEnabled: false }
"#;

    #[test]
    fn tables_golden() {
        let r = parse_resources(DOCS).expect("docs");
        assert_eq!(
            resources_table(Style::Plain, Kind::IpPool, &r, false),
            "\
NAME          CIDR             BLOCK  ENCAPSULATION      NAT  DISABLED
default-ipv4  10.244.0.0/16    /26    VXLAN CrossSubnet  yes  no
fixed         10.244.200.0/28  /28    IPIP Always        no   no
"
        );
        assert_eq!(
            resources_table(Style::Plain, Kind::BgpPeer, &r, true),
            "\
NAME  PEER        AS     NODES         BFD  PASSWORD
tor   198.18.0.1  65000  rack == \"r1\"  no   set
"
        );
        assert_eq!(
            resources_table(Style::Plain, Kind::BgpConfiguration, &r, false),
            "\
NAME     AS     NODE-TO-NODE MESH  CLUSTER ID
default  64600  off                -
"
        );
        assert_eq!(
            resources_table(Style::Plain, Kind::Node, &r, true),
            "\
NAME   IPV4            IPV6  AS     LABELS   VXLAN  IPIP
node1  198.18.0.11/24  -     64512  rack=r1  -      -
"
        );
    }

    #[test]
    fn yaml_and_json_output_apply_back_to_the_same_resources() {
        let r = parse_resources(DOCS).expect("docs");
        assert_eq!(parse_resources(&yaml_documents(&r)).expect("yaml back"), r);
        let list: serde_json::Value =
            serde_json::from_str(&json_documents(&r, false)).expect("json");
        let back: String = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n---\n");
        assert_eq!(parse_resources(&back).expect("json back"), r);
    }
}
