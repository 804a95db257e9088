//! Follows the datastore: one range read of `/tessera/v1/`, then an etcd watch resumed from
//! that revision. Each batch of events updates a local copy (decoding only the keys it
//! changed) and publishes a new [`ClusterView`]. When the watch breaks (etcd restarted,
//! network) it resumes from the last revision seen; when that revision was compacted away it
//! reads everything again.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tessera_datastore::keys;
use tessera_datastore::kv::Kv;
use tessera_datastore::EtcdKv;
use tokio::sync::watch;

use crate::state::{ClusterView, Records};

/// What the rest of the agent sees: the latest view, and whether it is current.
#[derive(Debug, Clone, Default)]
pub struct Synced {
    pub view: Arc<ClusterView>,
    /// False while the watch is broken (the view may be stale).
    pub in_sync: bool,
}

/// Runs forever; publishes on `tx`. `node` is ours: of all workload endpoints, only ours are
/// followed (the agent fences a local pod whose address went elsewhere).
pub async fn follow(kv: EtcdKv, node: String, tx: watch::Sender<Synced>) {
    let relevant = |key: &str| relevant(key, &node);
    let mut copy = Records::default();
    let mut revision: Option<i64> = None;
    loop {
        if revision.is_none() {
            match kv.get_prefix(keys::PREFIX).await {
                Ok((kvs, rev)) => {
                    copy = Records::default();
                    for k in kvs.iter().filter(|k| relevant(&k.key)) {
                        copy.put(&k.key, &k.value);
                    }
                    revision = Some(rev);
                    publish(&tx, &mut copy, rev, true);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "datastore read failed; retrying");
                    mark_stale(&tx);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let Some(rev) = revision else { continue };
        match watch_from(&kv, rev, &mut copy, &tx, &relevant).await {
            WatchEnd::Compacted => {
                tracing::warn!(
                    revision = rev,
                    "watch revision compacted; reading everything again"
                );
                revision = None;
            }
            WatchEnd::Broken(last, why) => {
                tracing::warn!(error = %why, member = %kv.endpoint(), "datastore watch broken; resuming on the next etcd member");
                revision = Some(last);
                mark_stale(&tx);
                kv.watch_broke().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

enum WatchEnd {
    Compacted,
    Broken(i64, String),
}

async fn watch_from(
    kv: &EtcdKv,
    rev: i64,
    copy: &mut Records,
    tx: &watch::Sender<Synced>,
    relevant: &(dyn Fn(&str) -> bool + Sync),
) -> WatchEnd {
    let mut client = kv.client();
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1)
        .with_progress_notify();
    let mut stream = match client.watch(keys::PREFIX, Some(opts)).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Broken(rev, e.to_string()),
    };
    let mut last = rev;
    // The watch is established: the copy is current as of `rev`.
    publish(tx, copy, last, true);
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.compact_revision() > 0 {
                    return WatchEnd::Compacted;
                }
                if resp.canceled() {
                    return WatchEnd::Broken(last, format!("canceled: {}", resp.cancel_reason()));
                }
                let mut changed = false;
                for ev in resp.events() {
                    let Some(k) = ev.kv() else { continue };
                    last = last.max(k.mod_revision());
                    let key = String::from_utf8_lossy(k.key()).into_owned();
                    if !relevant(&key) {
                        continue;
                    }
                    changed = true;
                    match ev.event_type() {
                        EventType::Put => copy.put(&key, k.value()),
                        EventType::Delete => copy.delete(&key),
                    }
                }
                // A progress notification (no events) says everything up to its revision was
                // sent; an event batch's header may be ahead of events still to come.
                if resp.events().is_empty() {
                    if let Some(h) = resp.header() {
                        last = last.max(h.revision());
                    }
                }
                if changed || !tx.borrow().in_sync {
                    publish(tx, copy, last, true);
                }
            }
            Ok(None) => return WatchEnd::Broken(last, "stream ended".into()),
            Err(e) => return WatchEnd::Broken(last, e.to_string()),
        }
    }
}

/// The keys the calculation reads; pods coming and going (handles, endpoints, last
/// addresses, intents) change only blocks as far as the agent is concerned, except our own
/// workload endpoints (which say what runs here and what is fenced).
fn relevant(key: &str, node: &str) -> bool {
    [
        keys::POOLS,
        keys::NODES,
        keys::BLOCKS,
        keys::BGP_PEERS,
        keys::LIVENESS,
    ]
    .iter()
    .any(|p| key.starts_with(p))
        || key
            .strip_prefix(keys::WORKLOADS)
            .and_then(|rest| rest.strip_prefix(node))
            .is_some_and(|rest| rest.starts_with('/'))
}

fn publish(tx: &watch::Sender<Synced>, copy: &mut Records, rev: i64, in_sync: bool) {
    let view = copy.view(rev);
    tx.send_replace(Synced {
        view: Arc::new(view),
        in_sync,
    });
}

fn mark_stale(tx: &watch::Sender<Synced>) {
    tx.send_if_modified(|s| std::mem::replace(&mut s.in_sync, false));
}
