//! routed
pub mod packet;
