//! routed
pub mod fsm;
pub mod packet;
pub mod rib;
