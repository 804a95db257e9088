//! natOutgoing through nftables: one table of ours, `inet tessera`, replaced atomically (one
//! `nft -j -f -` transaction) whenever the wanted rules change or someone altered it.
//!
//! ```text
//! table inet tessera {
//!   set pools-v4 { type ipv4_addr; flags interval; elements = { <every pool> } }
//!   set masq-v4  { type ipv4_addr; flags interval; elements = { <natOutgoing pools> } }
//!   (and -v6)
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr @masq-v4 ip daddr != @pools-v4 masquerade
//!     ip6 saddr @masq-v6 ip6 daddr != @pools-v6 masquerade } }
//! ```

use std::borrow::Cow;
use std::collections::HashSet;

use ipnetwork::IpNetwork;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{
    Chain, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::state::NatRules;

pub const TABLE: &str = "tessera";

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("nft: {0} (is Debian's nftables installed?)")]
    Nft(String),
}

fn set(name: &'static str, v6: bool, nets: &[IpNetwork]) -> NfListObject<'static> {
    let elem: Vec<Expression<'static>> = nets
        .iter()
        .filter(|n| n.is_ipv6() == v6)
        .map(|n| {
            Expression::Named(NamedExpression::Prefix(Prefix {
                addr: Box::new(Expression::String(Cow::Owned(n.network().to_string()))),
                len: u32::from(n.prefix()),
            }))
        })
        .collect();
    NfListObject::Set(Box::new(Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        set_type: SetTypeValue::Single(if v6 {
            SetType::Ipv6Addr
        } else {
            SetType::Ipv4Addr
        }),
        flags: Some(HashSet::from([SetFlag::Interval])),
        elem: (!elem.is_empty()).then(|| Cow::Owned(elem)),
        ..Set::default()
    }))
}

fn addr_match(
    proto: &'static str,
    field: &'static str,
    op: Operator,
    set: &'static str,
) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: proto.into(),
                field: field.into(),
            },
        ))),
        right: Expression::String(Cow::Owned(format!("@{set}"))),
        op,
    })
}

/// The whole table as one transaction: create (so the delete cannot fail), delete, recreate.
pub fn ruleset(r: &NatRules) -> Nftables<'static> {
    let table = || {
        NfListObject::Table(Table {
            family: NfFamily::INet,
            name: TABLE.into(),
            ..Table::default()
        })
    };
    let mut b = Batch::new();
    b.add(table());
    b.delete(table());
    b.add(table());
    b.add(set("pools-v4", false, &r.pools));
    b.add(set("masq-v4", false, &r.masquerade));
    b.add(set("pools-v6", true, &r.pools));
    b.add(set("masq-v6", true, &r.masquerade));
    b.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: "postrouting".into(),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(100),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    for (proto, masq, pools) in [
        ("ip", "masq-v4", "pools-v4"),
        ("ip6", "masq-v6", "pools-v6"),
    ] {
        b.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: "postrouting".into(),
            expr: Cow::Owned(vec![
                addr_match(proto, "saddr", Operator::EQ, masq),
                addr_match(proto, "daddr", Operator::NEQ, pools),
                Statement::Masquerade(None),
            ]),
            ..Rule::default()
        }));
    }
    b.to_nftables()
}

/// Our table as nft lists it now (None: absent).
pub fn current() -> Option<String> {
    nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "table", "inet", TABLE],
    )
    .ok()
}

/// Replaces the table; returns the listing right after, to notice later changes by others.
pub fn apply(r: &NatRules) -> Result<String, NatError> {
    nftables::helper::apply_ruleset(&ruleset(r)).map_err(|e| NatError::Nft(e.to_string()))?;
    current().ok_or_else(|| NatError::Nft("table missing right after creating it".into()))
}

/// Removes the table (clean shutdown without natOutgoing pools, or tests).
pub fn remove() {
    let mut b = Batch::new();
    b.delete(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        ..Table::default()
    }));
    let _ = nftables::helper::apply_ruleset(&b.to_nftables());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_masquerades_only_pool_to_outside() {
        let r = NatRules {
            pools: vec![
                "10.244.0.0/18".parse().expect("net"),
                "fd10:244::/48".parse().expect("net"),
            ],
            masquerade: vec!["10.244.0.0/18".parse().expect("net")],
        };
        let json = serde_json::to_value(ruleset(&r)).expect("json");
        let text = json.to_string();
        assert!(text.contains(r#""masquerade":null"#), "{text}");
        assert!(text.contains(r#""right":"@pools-v4""#), "{text}");
        assert!(text.contains(r#""op":"!=""#), "{text}");
        assert!(
            text.contains(r#"{"prefix":{"addr":"10.244.0.0","len":18}}"#),
            "{text}"
        );
        // The masq-v6 set is created empty (no IPv6 pool has natOutgoing).
        let sets: Vec<_> = json["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|o| o["add"]["set"].as_object())
            .collect();
        assert_eq!(sets.len(), 4);
        assert!(sets
            .iter()
            .any(|s| s["name"] == "masq-v6" && s.get("elem").is_none()));
    }
}
