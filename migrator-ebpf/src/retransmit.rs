//! Our own side's retransmits, counted for tracked flows only.
//!
//! Two ways in, the same count: the BTF tracepoint `tp_btf/
//! tcp_retransmit_skb` (attached through a BPF link, no tracefs needed;
//! the socket's fields are read at offsets userspace found in the kernel's
//! BTF), and the classic `tcp:tcp_retransmit_skb` tracepoint as a fallback
//! for kernels without BTF (it needs tracefs to attach).

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, map, tracepoint},
    maps::Array,
    programs::{BtfTracePointContext, TracePointContext},
};
use migrator_common::{FlowKey, SockLayout};

use crate::STATS;

/// One entry, written by userspace from the kernel's BTF when it attaches
/// this counter (left zeroed, `known == 0`: nothing is counted). Not
/// pinned: each process that attaches the counter has its own.
#[map(name = "SOCK_LAYOUT")]
static SOCK_LAYOUT: Array<SockLayout> = Array::with_max_entries(1, 0);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The tracepoint's first argument is the socket (`const struct sock *`);
/// userspace checks that in the BTF before it loads this program.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn migrator_tcp_retransmit_btf(ctx: BtfTracePointContext) -> i32 {
    let sock: *const u8 = ctx.arg(0);
    if let Ok(Some(key)) = key_of_sock(sock) {
        count(key);
    }
    0
}

/// Fallback through tracefs. Offsets of the record fields, from the
/// tracepoint's format file (stable since Linux 4.16).
mod record {
    pub const SPORT: usize = 28;
    pub const DPORT: usize = 30;
    pub const FAMILY: usize = 32;
    pub const SADDR: usize = 34;
    pub const DADDR: usize = 38;
    pub const SADDR_V6: usize = 42;
    pub const DADDR_V6: usize = 58;
}

#[tracepoint]
pub fn migrator_tcp_retransmit(ctx: TracePointContext) -> u32 {
    if let Ok(Some(key)) = key_of_record(&ctx) {
        count(key);
    }
    0
}

#[inline(always)]
fn count(key: FlowKey) {
    if let Some(stats) = STATS.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid for this run; a
        // lost increment between CPUs costs a diagnostic count only.
        unsafe { (*stats).local_retransmits += 1 };
    }
}

#[inline(always)]
fn key_of_sock(sock: *const u8) -> Result<Option<FlowKey>, i32> {
    let Some(layout) = SOCK_LAYOUT.get(0) else {
        return Ok(None);
    };
    if layout.known == 0 || sock.is_null() {
        return Ok(None);
    }
    let read = |offset: u32| sock.wrapping_add(offset as usize);
    // SAFETY: bpf_probe_read_kernel checks every address itself and fails
    // instead of faulting; the offsets come from this kernel's BTF.
    let family: u16 = unsafe { bpf_probe_read_kernel(read(layout.family).cast())? };
    // SAFETY: as above.
    let local_port: u16 = unsafe { bpf_probe_read_kernel(read(layout.local_port).cast())? };
    // SAFETY: as above.
    let remote_port: u16 =
        u16::from_be(unsafe { bpf_probe_read_kernel(read(layout.remote_port).cast())? });
    match family {
        AF_INET => {
            // SAFETY: as above.
            let (local, remote): ([u8; 4], [u8; 4]) = unsafe {
                (
                    bpf_probe_read_kernel(read(layout.local_v4).cast())?,
                    bpf_probe_read_kernel(read(layout.remote_v4).cast())?,
                )
            };
            Ok(Some(FlowKey::v4(local, local_port, remote, remote_port)))
        }
        AF_INET6 if layout.ipv6 != 0 => {
            // SAFETY: as above.
            let (local, remote): ([u8; 16], [u8; 16]) = unsafe {
                (
                    bpf_probe_read_kernel(read(layout.local_v6).cast())?,
                    bpf_probe_read_kernel(read(layout.remote_v6).cast())?,
                )
            };
            Ok(Some(v6_or_mapped(local, local_port, remote, remote_port)))
        }
        _ => Ok(None),
    }
}

#[inline(always)]
fn key_of_record(ctx: &TracePointContext) -> Result<Option<FlowKey>, i64> {
    // SAFETY: reads at the offsets the tracepoint's format declares; the
    // helper checks the bounds of the record.
    let (sport, dport, family) = unsafe {
        (
            ctx.read_at::<u16>(record::SPORT)?,
            ctx.read_at::<u16>(record::DPORT)?,
            ctx.read_at::<u16>(record::FAMILY)?,
        )
    };
    match family {
        AF_INET => {
            // SAFETY: as above.
            let (saddr, daddr) = unsafe {
                (
                    ctx.read_at::<[u8; 4]>(record::SADDR)?,
                    ctx.read_at::<[u8; 4]>(record::DADDR)?,
                )
            };
            Ok(Some(FlowKey::v4(saddr, sport, daddr, dport)))
        }
        AF_INET6 => {
            // SAFETY: as above.
            let (saddr, daddr) = unsafe {
                (
                    ctx.read_at::<[u8; 16]>(record::SADDR_V6)?,
                    ctx.read_at::<[u8; 16]>(record::DADDR_V6)?,
                )
            };
            Ok(Some(v6_or_mapped(saddr, sport, daddr, dport)))
        }
        _ => Ok(None),
    }
}

/// A dual-stack socket talking IPv4 has v4-mapped addresses; the data
/// plane keys that traffic as IPv4.
#[inline(always)]
fn v6_or_mapped(local: [u8; 16], local_port: u16, remote: [u8; 16], remote_port: u16) -> FlowKey {
    if is_v4_mapped(&local) && is_v4_mapped(&remote) {
        FlowKey::v4(
            [local[12], local[13], local[14], local[15]],
            local_port,
            [remote[12], remote[13], remote[14], remote[15]],
            remote_port,
        )
    } else {
        FlowKey::v6(local, local_port, remote, remote_port)
    }
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}
