//! TC classifiers for the migrator network lock.
//!
//! One program body serves ingress and egress; only the direction differs
//! (which address is "local"). Untracked packets leave with TC_ACT_UNSPEC,
//! which is TCX_NEXT under TCX and "continue" under clsact, so other TC
//! programs keep working and their cost is one header parse and a hash
//! lookup or three.
//!
//! Userspace pins the maps when it attaches, so a second `migrator`
//! process sees the same flows and counters. Our own side's retransmits
//! are counted by tracepoint programs in `retransmit`.
//!
//! The rare events an investigator needs go out through aya-log (a
//! packet the parser gave up on, a lock that passed its deadline, a
//! packet that could not be held), each only on its own cold branch, at
//! most once per flow where a flow could repeat it: the path of an
//! untracked packet does not change.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomics lack
// `fetch_add`; the intrinsic lowers to the BPF atomic add (as C's
// `__sync_fetch_and_add` does).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod packet;
mod retransmit;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_boot_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use migrator_common::{
    ANY_LOCAL_PORT_SLOT, EVENT_DROP, EVENT_HOLD, EVENT_PEER_RETRANSMIT, Event, FlowKey, FlowMode,
    FlowPolicy, FlowStats, HELD_CAPTURE_MAX, HeldPacket, LOCAL_PORT_SLOTS, ServiceKey,
    event::{DIRECTION_EGRESS, DIRECTION_INGRESS},
    seq::{PeerSegment, classify_peer_segment, segment_len},
};
use packet::{Direction, TcpSegment};

/// Flows we track, written by userspace.
#[map(name = "FLOWS")]
static FLOWS: HashMap<FlowKey, FlowPolicy> = HashMap::with_max_entries(65_536, 0);

/// Per-flow counters, created zeroed by userspace, updated here.
#[map(name = "STATS")]
static STATS: HashMap<FlowKey, FlowStats> = HashMap::with_max_entries(65_536, 0);

/// Service-IP rules (address, optional port), written by userspace.
#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, FlowPolicy> = HashMap::with_max_entries(1_024, 0);

/// Counters per service rule (flows not in FLOWS that a rule caught).
#[map(name = "SERVICE_STATS")]
static SERVICE_STATS: HashMap<ServiceKey, FlowStats> = HashMap::with_max_entries(1_024, 0);

/// Prefilter: local ports some flow or rule may use (see LOCAL_PORT_SLOTS).
/// Array lookups are inlined by the verifier, so this check costs a few
/// instructions, against a hash of a 40-byte key per table otherwise.
#[map(name = "LOCAL_PORTS")]
static LOCAL_PORTS: Array<u8> = Array::with_max_entries(LOCAL_PORT_SLOTS, 0);

/// One record per peer retransmit, drop and hold, for timelines.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Held packets with their original bytes, in arrival order per CPU.
#[map(name = "HELD")]
static HELD: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

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
        Err(()) => {
            warn!(
                ctx,
                "passed a packet the parser gave up on ({} bytes: a header runs past its end)",
                ctx.len()
            );
            NO_OPINION
        }
    }
}

/// Which table matched a packet, and so where its counters go.
enum Match {
    Flow,
    Service(ServiceKey),
}

#[inline(always)]
fn port_may_be_tracked(local_port: u16) -> bool {
    let marked = |slot: u32| LOCAL_PORTS.get(slot).is_some_and(|mark| *mark != 0);
    marked(local_port as u32) || marked(ANY_LOCAL_PORT_SLOT)
}

#[inline(always)]
fn lookup(key: &FlowKey) -> Option<(FlowPolicy, Match)> {
    // SAFETY: map values are only read; userspace replaces them whole.
    if let Some(policy) = unsafe { FLOWS.get(*key) } {
        return Some((*policy, Match::Flow));
    }
    for with_port in [true, false] {
        let service = ServiceKey::for_flow(key, with_port);
        if let Some(policy) = unsafe { SERVICES.get(service) } {
            return Some((*policy, Match::Service(service)));
        }
    }
    None
}

#[inline(always)]
fn try_classify(ctx: &TcContext, direction: Direction) -> Result<i32, ()> {
    let Some(segment) = TcpSegment::parse(ctx, direction, port_may_be_tracked)? else {
        return Ok(NO_OPINION);
    };
    let Some((policy, matched)) = lookup(&segment.key) else {
        return Ok(NO_OPINION);
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mode = policy.effective_mode(now);
    let blocked =
        mode.blocks() && !(matches!(direction, Direction::Egress) && policy.lets_out(segment.rst));
    let expired = !mode.blocks() && FlowMode::from_u32(policy.mode).is_some_and(FlowMode::blocks);
    // Only peer packets need delivering later: ours are regenerated by
    // the restored socket. None: not a packet to hold.
    let held = (matches!(mode, FlowMode::Hold) && matches!(direction, Direction::Ingress))
        .then(|| hold(ctx, &segment, now));

    let stats = match matched {
        Match::Flow => STATS.get_ptr_mut(segment.key),
        Match::Service(service) => SERVICE_STATS.get_ptr_mut(service),
    };
    if let Some(stats) = stats {
        // SAFETY: the pointer comes from a successful lookup and stays valid
        // for this program run. Other CPUs update the same entry at once
        // (a service's new clients do, all on one entry): `count` adds
        // atomically, the rest are flags and positions where the last
        // writer winning is fine.
        let stats = unsafe { &mut *stats };
        let per_flow = matches!(matched, Match::Flow);
        if expired && stats.deadline_logged == 0 {
            stats.deadline_logged = 1;
            warn!(
                ctx,
                "the lock on local port {} (peer port {}) passed its deadline: traffic flows again (fail-open)",
                segment.key.local_port,
                segment.key.remote_port
            );
        }
        if held == Some(false) && stats.hold_failed == 0 {
            warn!(
                ctx,
                "could not hold a packet of local port {} ({} bytes; ring full or over {}): only dropped, the peer resends it",
                segment.key.local_port,
                ctx.len(),
                HELD_CAPTURE_MAX as u32
            );
        }
        count(stats, &segment, direction, per_flow, blocked, held, now);
    }

    if blocked {
        event(
            &segment,
            direction,
            if held == Some(true) {
                EVENT_HOLD
            } else {
                EVENT_DROP
            },
            now,
        );
        Ok(DROP)
    } else {
        Ok(NO_OPINION)
    }
}

/// Copy a packet whole into the hold ring. False if it could not be kept.
#[inline(always)]
fn hold(ctx: &TcContext, segment: &TcpSegment, now: u64) -> bool {
    let len = ctx.len();
    if len == 0 || len > HELD_CAPTURE_MAX as u32 {
        return false;
    }
    // Identity for 1..=HELD_CAPTURE_MAX (a power of two), but spelled so the
    // verifier sees a non-zero length bounded by the buffer.
    let len = ((len - 1) & (HELD_CAPTURE_MAX as u32 - 1)) + 1;
    let Some(mut entry) = HELD.reserve::<HeldPacket>(0) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved, exclusively owned ring slot of
    // the right size; every field read later is written here.
    let copied = unsafe {
        (*record).timestamp_ns = now;
        (*record).key = segment.key;
        (*record).direction = DIRECTION_INGRESS;
        (*record).len = len;
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            0,
            (*record).data.as_mut_ptr().cast(),
            len,
        )
    };
    if copied == 0 {
        entry.submit(0);
        true
    } else {
        entry.discard(0);
        false
    }
}

#[inline(always)]
fn event(segment: &TcpSegment, direction: Direction, kind: u32, now: u64) {
    if let Some(mut entry) = EVENTS.reserve::<Event>(0) {
        entry.write(Event {
            timestamp_ns: now,
            key: segment.key,
            kind,
            direction: match direction {
                Direction::Ingress => DIRECTION_INGRESS,
                Direction::Egress => DIRECTION_EGRESS,
            },
            seq: segment.seq,
            seq_len: segment_len(segment.payload_len, segment.syn, segment.fin),
        });
        entry.submit(0);
    }
    // A full ring loses timeline detail only; the counters stay exact.
}

/// `counter += n`, atomically: two CPUs counting on one entry at once
/// (concurrent new clients of a service, seen losing one SYN in 24 with
/// a plain add) both count. The result is not read, so this is the plain
/// atomic add every kernel with BPF has (no BPF_FETCH).
#[inline(always)]
fn add(counter: &mut u64, n: u64) {
    // SAFETY: `counter` is a valid, aligned u64 inside a map value; other
    // CPUs only add to it the same way, userspace only reads it whole.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// `held`: for packets the mode wanted held, whether that worked.
#[inline(always)]
fn count(
    stats: &mut FlowStats,
    segment: &TcpSegment,
    direction: Direction,
    per_flow: bool,
    blocked: bool,
    held: Option<bool>,
    now: u64,
) {
    let segments = segment.segments as u64;
    match direction {
        Direction::Ingress => {
            add(&mut stats.packets_in, segments);
            add(&mut stats.bytes_in, segment.wire_len as u64);
            // Sequence tracking only makes sense for one connection.
            if per_flow {
                track_peer_sequence(stats, segment, now);
            }
        }
        Direction::Egress => {
            add(&mut stats.packets_out, segments);
            add(&mut stats.bytes_out, segment.wire_len as u64);
            stats.local_window_zero = (segment.window == 0) as u32;
        }
    }
    // A new client's first packet.
    let syn = matches!(direction, Direction::Ingress) && segment.syn && !segment.ack;
    if syn {
        add(&mut stats.syns_in, 1);
    }
    if blocked {
        add(&mut stats.dropped, segments);
        if syn {
            add(&mut stats.syns_blocked, 1);
        }
        if segment.rst {
            add(&mut stats.rst_blocked, 1);
        }
        match held {
            Some(true) => add(&mut stats.held, 1),
            Some(false) => add(&mut stats.hold_failed, 1),
            None => {}
        }
    }
    stats.last_packet_ns = now;
}

#[inline(always)]
fn track_peer_sequence(stats: &mut FlowStats, segment: &TcpSegment, now: u64) {
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
        PeerSegment::Probe => {
            if stats.local_window_zero != 0 {
                add(&mut stats.peer_window_probes, 1);
            } else {
                add(&mut stats.peer_keepalives, 1);
            }
        }
        PeerSegment::Retransmit => {
            add(&mut stats.peer_retransmits, 1);
            if stats.first_peer_retransmit_ns == 0 {
                stats.first_peer_retransmit_ns = now;
            }
            stats.prev_peer_retransmit_ns = stats.last_peer_retransmit_ns;
            stats.last_peer_retransmit_ns = now;
            event(segment, Direction::Ingress, EVENT_PEER_RETRANSMIT, now);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
