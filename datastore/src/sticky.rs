//! Sticky addresses: a StatefulSet pod's addresses kept for it while it is away. On DEL the
//! pod's handle hands its addresses to a hold (a handle named by the Kubernetes controllers,
//! e.g. `sticky.<namespace>.<statefulset>.<ordinal>`); on the next ADD of that pod, on any
//! node, the hold hands them to the new handle. Nobody else can take them meanwhile: they
//! stay allocated. The controllers release the hold when the StatefulSet is deleted or
//! scaled below the ordinal.

use std::net::IpAddr;
use std::sync::Arc;

use crate::block::{Attributes, IpamBlock};
use crate::block_store;
use crate::codec::{decode, encode, with_retry};
use crate::error::IpamError;
use crate::keys;
use crate::kv::{Kv, Op, Txn};
use crate::model::{HandleAddress, IpamHandle};

/// The prefix of every hold's handle.
pub const HOLD_PREFIX: &str = "sticky.";

/// The hold of `<statefulset>-<ordinal>` in `namespace`.
pub fn hold_handle(namespace: &str, statefulset: &str, ordinal: u32) -> String {
    format!("{HOLD_PREFIX}{namespace}.{statefulset}.{ordinal}")
}

/// (namespace, statefulset, ordinal) of a hold's handle.
pub fn parse_hold(handle: &str) -> Option<(String, String, u32)> {
    let rest = handle.strip_prefix(HOLD_PREFIX)?;
    let (rest, ordinal) = rest.rsplit_once('.')?;
    let (namespace, statefulset) = rest.split_once('.')?;
    Some((namespace.into(), statefulset.into(), ordinal.parse().ok()?))
}

/// Moves every address `from` holds to `to` (its allocations take `attrs`), block by block,
/// each one transaction comparing the block and both handles. Returns what moved (nothing
/// when `from` holds nothing).
pub async fn transfer<K: Kv>(
    kv: &K,
    from: &str,
    to: &str,
    attrs: &Attributes,
) -> Result<Vec<IpAddr>, IpamError> {
    let (fkey, tkey) = (keys::handle(from), keys::handle(to));
    let mut moved = Vec::new();
    let mut conflicts = 0;
    loop {
        let Some(fkv) = with_retry(|| kv.get(&fkey)).await? else {
            return Ok(moved);
        };
        let from_handle: IpamHandle = decode(&fkv)?;
        let Some(cidr) = from_handle.addresses.first().map(|a| a.block) else {
            let txn = Txn::new()
                .expect(&fkey, fkv.mod_revision)
                .then(Op::delete(&fkey));
            with_retry(|| kv.txn(txn.clone())).await?;
            return Ok(moved);
        };
        let bkey = keys::block(cidr);
        let tkv = with_retry(|| kv.get(&tkey)).await?;
        let mut to_handle: IpamHandle = match &tkv {
            Some(t) => decode(t)?,
            None => IpamHandle {
                id: to.to_string(),
                addresses: Vec::new(),
            },
        };
        let (read, block_rev) = block_store::read_block(kv, cidr)
            .await?
            .unwrap_or_else(|| (IpamBlock::new(cidr, None), 0));
        let mut block = read.clone();
        let mut here: Vec<HandleAddress> = Vec::new();
        for e in from_handle.addresses.iter().filter(|a| a.block == cidr) {
            let Some(o) = block.ordinal(e.addr) else {
                continue;
            };
            if let Some(Some(a)) = block.allocations.get_mut(o as usize) {
                if a.handle == from && a.seq == e.seq {
                    let a = Arc::make_mut(a);
                    a.handle = to.to_string();
                    a.attrs = attrs.clone();
                    here.push(e.clone());
                }
            }
        }
        let mut rest = from_handle.clone();
        rest.addresses.retain(|a| a.block != cidr);
        to_handle.addresses.extend(here.iter().cloned());
        let mut txn = Txn::new()
            .expect(&fkey, fkv.mod_revision)
            .expect(&tkey, tkv.as_ref().map_or(0, |t| t.mod_revision))
            .expect(&bkey, block_rev);
        if !here.is_empty() {
            txn = txn
                .then_all(block_store::write_ops(Some(&read), &block))
                .then(Op::put(&tkey, encode(&to_handle)));
        }
        txn = if rest.addresses.is_empty() {
            txn.then(Op::delete(&fkey))
        } else {
            txn.then(Op::put(&fkey, encode(&rest)))
        };
        if with_retry(|| kv.txn(txn.clone())).await?.succeeded {
            moved.extend(here.iter().map(|e| e.addr));
            continue;
        }
        conflicts += 1;
        if conflicts > crate::ipam::MAX_CONFLICTS {
            return Err(IpamError::TooMuchContention {
                what: format!("transfer of {from} to {to}"),
                attempts: conflicts,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{AssignRequest, Ipam, Owner};
    use crate::kv::MemKv;

    #[test]
    fn hold_names_round_trip() {
        let h = hold_handle("shop", "ledger-db", 3);
        assert_eq!(h, "sticky.shop.ledger-db.3");
        assert_eq!(parse_hold(&h), Some(("shop".into(), "ledger-db".into(), 3)));
        assert_eq!(parse_hold("k8s-pod-network.abc.eth0"), None);
    }

    #[tokio::test]
    async fn a_hold_keeps_the_addresses_and_hands_them_back() {
        let kv = MemKv::new();
        let pools = crate::yaml::parse_resources(
            "apiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: { name: p }\nspec: { cidr: 10.244.0.0/29, blockSize: 30 }\n",
        )
        .expect("pool");
        crate::admin::write(&kv, &pools, crate::admin::WriteMode::Apply, false)
            .await
            .expect("pool");
        let owner = |h: &str| Owner {
            handle: h.into(),
            attrs: [("containerID".to_string(), h.to_string())].into(),
            ..Default::default()
        };
        let ipam = Ipam::new(kv.clone(), "node1");
        let req = AssignRequest {
            owner: owner("c1"),
            num_v4: 1,
            ..Default::default()
        };
        let first = ipam.auto_assign(&req).await.expect("address")[0].addr;
        let hold = hold_handle("shop", "ledger", 0);
        let held = transfer(&kv, "c1", &hold, &Attributes::new())
            .await
            .expect("to the hold");
        assert_eq!(held, [first]);
        crate::snapshot::assert_invariants(&kv, false).await;
        // Meanwhile others take every other address: never the held one.
        let ipam2 = Ipam::new(kv.clone(), "node2");
        for i in 0..5 {
            let req = AssignRequest {
                owner: owner(&format!("other{i}")),
                num_v4: 1,
                ..Default::default()
            };
            if let Ok(a) = ipam2.auto_assign(&req).await {
                assert_ne!(a[0].addr, first);
            }
        }
        let back = transfer(
            &kv,
            &hold,
            "c2",
            &[("containerID".to_string(), "c2".to_string())].into(),
        )
        .await
        .expect("back");
        assert_eq!(back, [first]);
        assert!(kv.get(&keys::handle(&hold)).await.expect("get").is_none());
        let snap = crate::snapshot::assert_invariants(&kv, false).await;
        let (_, h) = snap
            .allocations()
            .into_iter()
            .find(|(a, _)| *a == first)
            .expect("allocated");
        assert_eq!(h, "c2");
        assert!(transfer(&kv, &hold, "c3", &Attributes::new())
            .await
            .expect("nothing")
            .is_empty());
    }
}
