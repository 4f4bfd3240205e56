//! Records the kernel program writes to its ring buffers: one event per
//! peer retransmit, drop or hold (for timelines), and held packets with
//! their original bytes (for later delivery).

use crate::FlowKey;

pub const EVENT_PEER_RETRANSMIT: u32 = 1;
pub const EVENT_DROP: u32 = 2;
pub const EVENT_HOLD: u32 = 3;

/// Ingress/egress tag in [`Event::direction`] and [`HeldPacket::direction`].
pub const DIRECTION_INGRESS: u32 = 0;
pub const DIRECTION_EGRESS: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// CLOCK_BOOTTIME ns.
    pub timestamp_ns: u64,
    pub key: FlowKey,
    /// One of the `EVENT_*` constants.
    pub kind: u32,
    pub direction: u32,
    /// TCP sequence number and sequence length of the segment.
    pub seq: u32,
    pub seq_len: u32,
}

/// Largest packet the hold ring copies whole. Larger ones (GSO/GRO
/// aggregates) are only dropped and counted in `hold_failed`; the peer
/// retransmits them at MSS size.
pub const HELD_CAPTURE_MAX: usize = 2048;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldPacket {
    /// CLOCK_BOOTTIME ns of arrival.
    pub timestamp_ns: u64,
    pub key: FlowKey,
    /// Bytes of `data` that are the packet, from its Ethernet header on.
    pub len: u32,
    pub direction: u32,
    pub data: [u8; HELD_CAPTURE_MAX],
}
