//! routed
pub mod fsm;
pub mod packet;
