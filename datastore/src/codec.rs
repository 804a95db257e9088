//! JSON encoding of stored values (deflated for IPAM blocks in format V4), and the bounded
//! retry policy every datastore call goes through.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::block::{BlockFormat, IpamBlock};
use crate::error::IpamError;
use crate::kv::{KeyValue, KvError};

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, IpamError> {
    from_stored(&kv.value).map_err(|e| IpamError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

/// What begins a deflated value. JSON never begins with a zero byte, so a reader tells the
/// two apart without being told the format.
const DEFLATED: &[u8] = b"\0deflate\0";

/// Blocks in format V4 whose JSON is shorter than this are stored as JSON: deflating a
/// nearly empty block costs the client more than the bytes it saves cost etcd.
pub const DEFLATE_FROM_BYTES: usize = 1024;

thread_local! {
    // A deflate stream's state is hundreds of kilobytes: set up once per thread, reset per
    // value (setting it up per value cost more than compressing a full /26).
    static DEFLATE: std::cell::RefCell<flate2::Compress> =
        std::cell::RefCell::new(flate2::Compress::new(flate2::Compression::fast(), false));
    static INFLATE: std::cell::RefCell<flate2::Decompress> =
        std::cell::RefCell::new(flate2::Decompress::new(false));
}

/// Reads a stored value: JSON, or deflated JSON (IPAM blocks in format V4). Every reader of
/// stored values outside this crate goes through here.
pub fn from_stored<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let Some(deflated) = bytes.strip_prefix(DEFLATED) else {
        return serde_json::from_slice(bytes);
    };
    let json = INFLATE
        .with_borrow_mut(|inflate| {
            inflate.reset(false);
            let mut json = Vec::with_capacity(deflated.len() * 4);
            loop {
                let (read, written) = (inflate.total_in(), inflate.total_out());
                let status = inflate.decompress_vec(
                    &deflated[read as usize..],
                    &mut json,
                    flate2::FlushDecompress::None,
                )?;
                if status == flate2::Status::StreamEnd {
                    return Ok(json);
                }
                if json.len() == json.capacity() {
                    json.reserve(json.len().max(1024));
                } else if (read, written) == (inflate.total_in(), inflate.total_out()) {
                    // Room left, yet no progress: the stream was cut short.
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        })
        .map_err(|e: std::io::Error| serde_json::Error::io(e))?;
    serde_json::from_slice(&json)
}

/// An IPAM block as stored: JSON, deflated from format V4 on when it is large (a /26 of pods
/// deflates to about a third: container IDs are hex, names repeat).
pub fn encode_block(block: &IpamBlock) -> Vec<u8> {
    let json = encode(block);
    if block.format < BlockFormat::V4 || json.len() < DEFLATE_FROM_BYTES {
        return json;
    }
    DEFLATE.with_borrow_mut(|deflate| {
        deflate.reset();
        let mut out = Vec::with_capacity(json.len() / 2);
        out.extend_from_slice(DEFLATED);
        loop {
            let read = deflate.total_in() as usize;
            match deflate.compress_vec(&json[read..], &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => return out,
                Ok(_) => out.reserve(json.len() / 2 + 64),
                // Compressing into memory does not fail; if it did, JSON is still a value.
                Err(_) => return json.clone(),
            }
        }
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
