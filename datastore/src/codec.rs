//! Encoding of stored values (JSON; IPAM blocks compressed in format V4, binary in V5), and the bounded
//! retry policy every datastore call goes through.

use std::any::Any;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::block::{BlockFormat, IpamBlock};
use crate::block_format::{decode_binary, encode_binary, encode_v6_core, BINARY_MAGIC};
use crate::error::IpamError;
use crate::kv::{KeyValue, KvError};

pub(crate) fn decode<T: DeserializeOwned + 'static>(kv: &KeyValue) -> Result<T, IpamError> {
    from_stored(&kv.value).map_err(|e| IpamError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

/// What every zstd frame begins with. No JSON value begins with it (`(`, 0x28), nor a V5
/// block's binary form (a zero byte), so a reader tells them apart without being told the
/// format.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Blocks in formats V4 and V5 shorter than this are stored uncompressed: compressing a
/// nearly empty block costs the client more than the bytes it saves cost etcd.
pub const COMPRESS_FROM_BYTES: usize = 1024;

/// A compressed value that says it is larger than this is refused as corrupt rather than
/// given the memory (a /20 block of 4,096 pods is about 600 KB of JSON).
const MAX_DECOMPRESSED: u64 = 64 << 20;

thread_local! {
    // Set up once per thread (contexts hold their tables), reused for every value.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Reads a stored value: JSON, a block in format V5's binary form, or either of them
/// compressed (IPAM blocks in formats V4 and V5). Every reader of stored values outside
/// this crate goes through here.
pub fn from_stored<T: DeserializeOwned + 'static>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    if !bytes.starts_with(&ZSTD_MAGIC) {
        return from_uncompressed(bytes);
    }
    let inner = DECOMPRESSOR
        .with_borrow_mut(|slot| {
            let size = zstd::zstd_safe::get_frame_content_size(bytes)
                .ok()
                .flatten()
                .filter(|n| *n <= MAX_DECOMPRESSED)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a compressed value without a plausible size",
                    )
                })?;
            let decompressor = match slot {
                Some(d) => d,
                None => slot.insert(zstd::bulk::Decompressor::new()?),
            };
            decompressor.decompress(bytes, size as usize)
        })
        .map_err(serde_json::Error::io)?;
    from_uncompressed(&inner)
}

fn from_uncompressed<T: DeserializeOwned + 'static>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    if bytes.starts_with(&BINARY_MAGIC) {
        let block =
            decode_binary(bytes).map_err(<serde_json::Error as serde::de::Error>::custom)?;
        return binary_block_as(block);
    }
    serde_json::from_slice(bytes)
}

/// A block read from format V5's binary form as what its reader asked for: the block
/// itself (the datastore, the agent), or anything else (`serde_json::Value`, a partial
/// view) read from its JSON form, `V3`'s with `"v": 5`.
fn binary_block_as<T: DeserializeOwned + 'static>(
    block: IpamBlock,
) -> Result<T, serde_json::Error> {
    let mut slot = Some(block);
    if let Some(wanted) = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
    {
        return Ok(wanted);
    }
    serde_json::from_value(serde_json::to_value(&slot)?)
}

/// An IPAM block's own value: JSON up to format V4, binary in V5; from V4 on compressed
/// (zstd, level 1) once 1 KiB or more: a /26 of pods shrinks to a quarter of its JSON
/// (container IDs are hex, names repeat). In V6 only the block's own key, without its
/// allocations' records ([`crate::block_store`] writes both).
pub fn encode_block(block: &IpamBlock) -> Vec<u8> {
    let plain = match block.format {
        BlockFormat::V6 => return encode_v6_core(block),
        BlockFormat::V1 | BlockFormat::V2 | BlockFormat::V3 | BlockFormat::V4 => encode(block),
        // Cannot fail (strings, numbers and sequences of known length); if it did, the
        // JSON is a V5 value too.
        BlockFormat::V5 => encode_binary(block).unwrap_or_else(|_| encode(block)),
    };
    if block.format < BlockFormat::V4 || plain.len() < COMPRESS_FROM_BYTES {
        return plain;
    }
    let compressed = COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some(c) => c,
            None => {
                let mut c = zstd::bulk::Compressor::new(1)?;
                // A damaged value is then refused, never read as another block.
                c.include_checksum(true)?;
                slot.insert(c)
            }
        };
        compressor.compress(&plain)
    });
    // Compressing into memory does not fail; if it did, the plain value is still one.
    compressed.unwrap_or(plain)
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
