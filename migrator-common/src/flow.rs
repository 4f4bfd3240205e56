//! The flow table: which four-tuples the data plane tracks and what it does
//! with their packets.

/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// One TCP connection as seen from this host. "Local" is the side on the
/// host where the program runs, whatever the packet's direction: ingress
/// packets are keyed (dst, src), egress packets (src, dst).
///
/// IPv4 addresses occupy the first four bytes of the 16-byte fields, the
/// rest is zero. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub const fn v4(local: [u8; 4], local_port: u16, remote: [u8; 4], remote_port: u16) -> Self {
        let mut local_addr = [0u8; 16];
        let mut remote_addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            local_addr[i] = local[i];
            remote_addr[i] = remote[i];
            i += 1;
        }
        Self {
            local_addr,
            remote_addr,
            local_port,
            remote_port,
            family: FAMILY_IPV4,
            _pad: [0; 3],
        }
    }

    pub const fn v6(local: [u8; 16], local_port: u16, remote: [u8; 16], remote_port: u16) -> Self {
        Self {
            local_addr: local,
            remote_addr: remote,
            local_port,
            remote_port,
            family: FAMILY_IPV6,
            _pad: [0; 3],
        }
    }
}

/// What the data plane does with a tracked flow's packets.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowMode {
    /// Count only; every packet passes.
    Observe = 0,
    /// Drop every packet in both directions: nothing of the flow reaches or
    /// leaves the local stack (no ACK, no RST, no window update). With
    /// [`POLICY_OWN_SEGMENTS_PASS`] only the peer's packets and our RSTs.
    Freeze = 1,
    /// Like freeze, but incoming packets are also copied, with their arrival
    /// time, to the held-packet ring so they can be delivered later.
    Hold = 2,
}

impl FlowMode {
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Observe),
            1 => Some(Self::Freeze),
            2 => Some(Self::Hold),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::Freeze => "freeze",
            Self::Hold => "hold",
        }
    }

    /// Whether packets in this mode are kept from the stack.
    pub const fn blocks(self) -> bool {
        matches!(self, Self::Freeze | Self::Hold)
    }
}

/// While the flow is blocked, the local side's own segments still leave,
/// all but RSTs: on a source whose process still runs for the moment
/// between the lock and CRIU's freeze, a segment it sends then must reach
/// the peer (dropped, only its restored copy's retransmit timer could
/// send it again). Peer packets stay blocked.
pub const POLICY_OWN_SEGMENTS_PASS: u32 = 1;

/// Value of the flow table, written by userspace only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowPolicy {
    /// A [`FlowMode`] as u32 (enums are not safe to read from map memory).
    pub mode: u32,
    /// `POLICY_*` bits.
    pub flags: u32,
    /// CLOCK_BOOTTIME nanoseconds after which a frozen flow passes again
    /// even if userspace never releases it (fail-open). 0: no deadline.
    pub deadline_ns: u64,
    /// CLOCK_BOOTTIME nanoseconds when userspace set this mode (0: not
    /// recorded), for "frozen for" and "released" in the live view.
    pub since_ns: u64,
}

impl FlowPolicy {
    pub const fn observe() -> Self {
        Self {
            mode: FlowMode::Observe as u32,
            flags: 0,
            deadline_ns: 0,
            since_ns: 0,
        }
    }

    pub const fn freeze(deadline_ns: u64) -> Self {
        Self {
            mode: FlowMode::Freeze as u32,
            flags: 0,
            deadline_ns,
            since_ns: 0,
        }
    }

    pub const fn hold(deadline_ns: u64) -> Self {
        Self {
            mode: FlowMode::Hold as u32,
            flags: 0,
            deadline_ns,
            since_ns: 0,
        }
    }

    /// The same policy, letting the local side's own segments out
    /// ([`POLICY_OWN_SEGMENTS_PASS`]).
    pub const fn own_segments_passing(mut self) -> Self {
        self.flags |= POLICY_OWN_SEGMENTS_PASS;
        self
    }

    /// Whether an outgoing segment (`rst`: an RST) leaves although the
    /// flow is blocked.
    pub const fn lets_out(&self, rst: bool) -> bool {
        self.flags & POLICY_OWN_SEGMENTS_PASS != 0 && !rst
    }

    /// The same policy, stamped with when it was set.
    pub const fn since(mut self, now_ns: u64) -> Self {
        self.since_ns = now_ns;
        self
    }

    /// The mode in force at `now_ns`: a frozen flow whose deadline has
    /// passed behaves as observed. Unknown modes fail open too.
    pub const fn effective_mode(&self, now_ns: u64) -> FlowMode {
        match FlowMode::from_u32(self.mode) {
            Some(FlowMode::Freeze | FlowMode::Hold)
                if self.deadline_ns != 0 && now_ns >= self.deadline_ns =>
            {
                FlowMode::Observe
            }
            Some(mode) => mode,
            None => FlowMode::Observe,
        }
    }
}

/// Per-flow counters, written by the kernel program. Userspace creates the
/// entry (zeroed) when it starts tracking a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Segments (GSO super-packets count as their segment count).
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Segments dropped by the lock, both directions (held ones included).
    pub dropped: u64,
    /// Incoming packets copied to the held-packet ring.
    pub held: u64,
    /// Packets that should have been held but were only dropped (ring full
    /// or larger than [`crate::HELD_CAPTURE_MAX`]); the peer resends them.
    pub hold_failed: u64,
    /// RST segments the lock kept from leaving or arriving.
    pub rst_blocked: u64,
    /// Peer segments whose sequence range ended at or before the highest
    /// end already seen.
    pub peer_retransmits: u64,
    /// Peer keepalives (seq one below the highest end, at most one byte).
    pub peer_keepalives: u64,
    /// The same shape while our advertised window was zero.
    pub peer_window_probes: u64,
    /// CLOCK_BOOTTIME ns of the first and latest peer retransmit, 0 if none.
    pub first_peer_retransmit_ns: u64,
    pub last_peer_retransmit_ns: u64,
    /// CLOCK_BOOTTIME ns of the latest packet in either direction.
    pub last_packet_ns: u64,
    /// Highest peer sequence end seen (valid when `peer_seq_valid` != 0).
    pub peer_seq_end: u32,
    pub peer_seq_valid: u32,
    /// 1 when the latest window we advertised was zero.
    pub local_window_zero: u32,
    /// 1 once the kernel program logged that this flow's lock passed its
    /// deadline (said once per flow, not per packet).
    pub deadline_logged: u32,
    /// CLOCK_BOOTTIME ns of the peer retransmit before the latest one (0
    /// if fewer than two): with the latest, the peer's current backoff.
    pub prev_peer_retransmit_ns: u64,
    /// Our own side's retransmits (the tcp:tcp_retransmit_skb tracepoint,
    /// counted while a watcher has it attached).
    pub local_retransmits: u64,
    /// Incoming SYNs without ACK: new clients' connection attempts
    /// (meaningful on service rules, which see them).
    pub syns_in: u64,
    /// Of those, the ones that arrived while the lock blocked (held or
    /// dropped): new clients waiting on the freeze.
    pub syns_blocked: u64,
}

/// A service-IP rule: all TCP to/from a local address, optionally only one
/// local port (0: every port). Catches SYNs of new connections and flows
/// nobody listed while the process is frozen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(addr: [u8; 16], family: u8, port: u16) -> Self {
        Self {
            addr,
            port,
            family,
            _pad: 0,
        }
    }

    /// The rule key for a flow's local end: with the port, or the wildcard.
    pub const fn for_flow(key: &FlowKey, with_port: bool) -> Self {
        Self::new(
            key.local_addr,
            key.family,
            if with_port { key.local_port } else { 0 },
        )
    }
}

/// Entries of the LOCAL_PORTS prefilter: one byte per local TCP port,
/// non-zero when some flow or service rule may use that port. The kernel
/// program skips the hash lookups for packets on unmarked ports, which is
/// what keeps untracked traffic cheap.
pub const LOCAL_PORT_SLOTS: u32 = 65_536;

/// Port 0 is never a TCP port on the wire, so its slot marks "a service
/// rule covers every port of an address": then every port is a candidate.
pub const ANY_LOCAL_PORT_SLOT: u32 = 0;
