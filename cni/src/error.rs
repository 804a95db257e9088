//! CNI errors: the spec's codes and Tessera's own (>= 100), mapped in one place.

use serde_json::{json, Value};
use tessera_datastore::IpamError;

/// A CNI error as printed on stdout: `{cniVersion, code, msg, details}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The spec's codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    // Tessera's own.
    pub const IPAM_EXHAUSTED: u32 = 100;
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    pub const ADDRESS_NOT_IN_POOL: u32 = 102;
    pub const NETLINK: u32 = 103;
    pub const DATASTORE: u32 = 104;
    pub const CHECK_FAILED: u32 = 105;
    pub const DELEGATE_FAILED: u32 = 106;
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    pub fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }
    pub fn incompatible(msg: impl Into<String>) -> Self {
        Self::new(code::INCOMPATIBLE_VERSION, msg)
    }
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }
    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(code::DECODE, msg)
    }
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(code::IO, msg)
    }
    pub fn netlink(msg: impl Into<String>) -> Self {
        Self::new(code::NETLINK, msg)
    }
    pub fn check_failed(msg: impl Into<String>) -> Self {
        Self::new(code::CHECK_FAILED, msg)
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let c = match &e {
            IpamError::Exhausted { .. } | IpamError::NoPool { .. } => code::IPAM_EXHAUSTED,
            IpamError::AddressInUse { .. } | IpamError::AddressReserved { .. } => {
                code::ADDRESS_UNAVAILABLE
            }
            IpamError::AddressNotInPool { .. } => code::ADDRESS_NOT_IN_POOL,
            IpamError::InvalidHandle(_) => code::INVALID_ENV,
            e if e.is_transient() => code::TRY_AGAIN_LATER,
            _ => code::DATASTORE,
        };
        CniError::new(c, e.to_string())
    }
}
