//! routed
pub mod adj_in;
pub mod adj_out;
pub mod bfd;
pub mod config;
pub mod fsm;
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub mod md5;
pub mod mesh;
pub mod pack;
pub mod packet;
pub mod rib;
pub mod speaker;
pub mod speaker_core;
