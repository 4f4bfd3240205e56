//! TC classifiers for the migrator network lock.
//!
//! One program body serves ingress and egress; only the direction differs
//! (which address is "local"). Untracked packets leave with TC_ACT_UNSPEC,
//! which is TCX_NEXT under TCX and "continue" under clsact, so other TC
//! programs keep working and the cost for them is one header parse and one
//! hash lookup.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_boot_ns,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use migrator_common::{
    FlowKey, FlowMode, FlowPolicy, FlowStats,
    seq::{PeerSegment, classify_peer_segment},
};
use packet::{Direction, TcpSegment};

/// Flows we track, written by userspace.
#[map(name = "FLOWS")]
static FLOWS: HashMap<FlowKey, FlowPolicy> = HashMap::with_max_entries(65_536, 0);

/// Per-flow counters, created zeroed by userspace, updated here.
#[map(name = "STATS")]
static STATS: HashMap<FlowKey, FlowStats> = HashMap::with_max_entries(65_536, 0);

#[classifier]
pub fn migrator_ingress(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Ingress)
}

#[classifier]
pub fn migrator_egress(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Egress)
}

/// Verdicts: no opinion (pass to the next program / the stack) or drop.
const NO_OPINION: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;

#[inline(always)]
fn classify(ctx: &TcContext, direction: Direction) -> i32 {
    match try_classify(ctx, direction) {
        Ok(verdict) => verdict,
        // A packet we cannot parse is not one of ours.
        Err(()) => NO_OPINION,
    }
}

#[inline(always)]
fn try_classify(ctx: &TcContext, direction: Direction) -> Result<i32, ()> {
    let Some(segment) = TcpSegment::parse(ctx, direction)? else {
        return Ok(NO_OPINION);
    };
    // SAFETY: the map value is only read; userspace replaces it whole.
    let Some(policy) = (unsafe { FLOWS.get(segment.key) }) else {
        return Ok(NO_OPINION);
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mode = policy.effective_mode(now);
    let drop = matches!(mode, FlowMode::Freeze);

    if let Some(stats) = STATS.get_ptr_mut(segment.key) {
        // SAFETY: the pointer comes from a successful lookup and stays valid
        // for this program run. Counter races between CPUs lose at worst an
        // increment; the counters are diagnostics, not accounting.
        let stats = unsafe { &mut *stats };
        count(stats, &segment, direction, drop, now);
    }

    Ok(if drop { DROP } else { NO_OPINION })
}

#[inline(always)]
fn count(
    stats: &mut FlowStats,
    segment: &TcpSegment,
    direction: Direction,
    dropped: bool,
    now: u64,
) {
    let segments = segment.segments as u64;
    match direction {
        Direction::Ingress => {
            stats.packets_in += segments;
            stats.bytes_in += segment.wire_len as u64;
            let highest = if stats.peer_seq_valid != 0 {
                Some(stats.peer_seq_end)
            } else {
                None
            };
            match classify_peer_segment(
                highest,
                segment.seq,
                segment.payload_len,
                segment.syn,
                segment.fin,
            ) {
                PeerSegment::Empty => {}
                PeerSegment::New { end } => {
                    stats.peer_seq_end = end;
                    stats.peer_seq_valid = 1;
                }
                PeerSegment::Retransmit => {
                    stats.peer_retransmits += 1;
                    if stats.first_peer_retransmit_ns == 0 {
                        stats.first_peer_retransmit_ns = now;
                    }
                    stats.last_peer_retransmit_ns = now;
                }
            }
        }
        Direction::Egress => {
            stats.packets_out += segments;
            stats.bytes_out += segment.wire_len as u64;
        }
    }
    if dropped {
        stats.dropped += segments;
    }
    stats.last_packet_ns = now;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
