//! JSON encoding of stored values, and the bounded retry policy every datastore call goes through.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::IpamError;
use crate::kv::{KeyValue, KvError};

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, IpamError> {
    serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our resources are plain structs with string keys: serialising them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// How long transient datastore errors are retried before the error is returned.
pub const TRANSIENT_RETRY_BUDGET: Duration = Duration::from_secs(20);

/// Runs `call` until it succeeds, fails permanently, or transient failures have used up
/// [`TRANSIENT_RETRY_BUDGET`], backing off exponentially from 50 ms to 1 s.
pub(crate) async fn with_retry<T, F, Fut>(mut call: F) -> Result<T, KvError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KvError>>,
{
    let deadline = tokio::time::Instant::now() + TRANSIENT_RETRY_BUDGET;
    let mut backoff = Duration::from_millis(50);
    loop {
        match call().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + backoff < deadline => {
                tracing::debug!(error = %e, ?backoff, "datastore call failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// A small pause between conflicting CAS attempts, growing with the attempt number and
/// spread by `salt` so that contenders do not retry in lockstep.
pub(crate) async fn conflict_pause(attempt: u32, salt: u64) {
    if attempt < 2 {
        return;
    }
    let base = 1u64 << attempt.min(6);
    let jitter = (salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) + u64::from(attempt);
    tokio::time::sleep(Duration::from_millis(base + jitter % base)).await;
}

/// FNV-1a: a stable hash so a node starts its block search at the same place every run.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
