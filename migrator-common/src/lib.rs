//! Types and pure logic shared by the eBPF data plane and userspace.
//!
//! Every map type here is `#[repr(C)]` and padding-free: BPF hash maps
//! compare every key byte, and stray padding would make equal keys differ.
//! Sequence-space arithmetic lives in [`seq`] as pure functions so it is
//! unit-tested on the host and called unchanged by the kernel program.
#![no_std]

pub mod event;
pub mod flow;
pub mod paths;
pub mod seq;
pub mod sock;

#[cfg(feature = "user")]
mod user;

pub use event::{
    EVENT_DROP, EVENT_HOLD, EVENT_PEER_RETRANSMIT, Event, HELD_CAPTURE_MAX, HeldPacket,
};
pub use flow::{
    ANY_LOCAL_PORT_SLOT, FlowKey, FlowMode, FlowPolicy, FlowStats, LOCAL_PORT_SLOTS, ServiceKey,
};
pub use sock::SockLayout;
