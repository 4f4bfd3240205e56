//! TCP sequence-space arithmetic (RFC 1982 serial numbers, 32 bits) and the
//! classification of a peer segment against what we have already seen.

/// `a` is before `b` in sequence space, across wraparound.
#[inline(always)]
pub const fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` is before or equal to `b` in sequence space.
#[inline(always)]
pub const fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// Sequence space a segment consumes: payload plus one for SYN and FIN.
#[inline(always)]
pub const fn segment_len(payload_len: u32, syn: bool, fin: bool) -> u32 {
    payload_len + syn as u32 + fin as u32
}

/// What a peer's segment is, relative to the highest sequence end seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerSegment {
    /// Consumes no sequence space (pure ACK, window update, keepalive or
    /// zero-window probe of length 0): not a retransmit.
    Empty,
    /// Carries new sequence space (possibly overlapping old).
    New { end: u32 },
    /// Ends at or before the highest end seen: everything in it was sent
    /// before.
    Retransmit,
    /// Sits one below the highest end with at most one byte: a keepalive,
    /// or a zero-window probe when our advertised window is zero. Not a
    /// retransmit, whatever its length.
    Probe,
}

/// Classify a peer segment. `highest_end` is `None` until the first segment
/// with sequence space has been seen.
#[inline(always)]
pub const fn classify_peer_segment(
    highest_end: Option<u32>,
    seq: u32,
    payload_len: u32,
    syn: bool,
    fin: bool,
) -> PeerSegment {
    let len = segment_len(payload_len, syn, fin);
    if let Some(highest) = highest_end
        && !syn
        && !fin
        && payload_len <= 1
        && seq == highest.wrapping_sub(1)
    {
        return PeerSegment::Probe;
    }
    if len == 0 {
        return PeerSegment::Empty;
    }
    let end = seq.wrapping_add(len);
    match highest_end {
        Some(highest) if seq_le(end, highest) => PeerSegment::Retransmit,
        _ => PeerSegment::New { end },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_across_wraparound() {
        assert!(seq_lt(1, 2));
        assert!(!seq_lt(2, 1));
        assert!(seq_lt(u32::MAX - 5, 3));
        assert!(!seq_lt(3, u32::MAX - 5));
        assert!(seq_le(7, 7));
        assert!(!seq_lt(7, 7));
        assert!(seq_le(u32::MAX, 0));
    }

    #[test]
    fn first_segment_is_new() {
        assert_eq!(
            classify_peer_segment(None, 1000, 100, false, false),
            PeerSegment::New { end: 1100 }
        );
    }

    #[test]
    fn pure_ack_is_empty() {
        assert_eq!(
            classify_peer_segment(Some(1100), 1100, 0, false, false),
            PeerSegment::Empty
        );
        // Before any data, nothing is a probe.
        assert_eq!(
            classify_peer_segment(None, 1099, 0, false, false),
            PeerSegment::Empty
        );
    }

    #[test]
    fn keepalives_and_window_probes_are_probes_not_retransmits() {
        // Zero-length, one below the highest end (Linux keepalive / probe).
        assert_eq!(
            classify_peer_segment(Some(1100), 1099, 0, false, false),
            PeerSegment::Probe
        );
        // One garbage byte at the same place (BSD-style keepalive).
        assert_eq!(
            classify_peer_segment(Some(1100), 1099, 1, false, false),
            PeerSegment::Probe
        );
        // Across wraparound.
        assert_eq!(
            classify_peer_segment(Some(0), u32::MAX, 0, false, false),
            PeerSegment::Probe
        );
        // Two bytes ending at the highest end are a real retransmit.
        assert_eq!(
            classify_peer_segment(Some(1100), 1098, 2, false, false),
            PeerSegment::Retransmit
        );
    }

    #[test]
    fn resend_of_old_data_is_retransmit() {
        assert_eq!(
            classify_peer_segment(Some(1100), 1000, 100, false, false),
            PeerSegment::Retransmit
        );
        assert_eq!(
            classify_peer_segment(Some(1100), 1050, 50, false, false),
            PeerSegment::Retransmit
        );
    }

    #[test]
    fn partial_overlap_with_new_data_is_new() {
        assert_eq!(
            classify_peer_segment(Some(1100), 1050, 100, false, false),
            PeerSegment::New { end: 1150 }
        );
    }

    #[test]
    fn syn_and_fin_consume_sequence_space() {
        assert_eq!(
            classify_peer_segment(None, 41, 0, true, false),
            PeerSegment::New { end: 42 }
        );
        assert_eq!(
            classify_peer_segment(Some(42), 41, 0, true, false),
            PeerSegment::Retransmit
        );
        assert_eq!(
            classify_peer_segment(Some(500), 500, 0, false, true),
            PeerSegment::New { end: 501 }
        );
        assert_eq!(
            classify_peer_segment(Some(501), 500, 0, false, true),
            PeerSegment::Retransmit
        );
    }

    #[test]
    fn retransmit_detected_across_wraparound() {
        let highest = 10u32; // wrapped past u32::MAX
        let seq = u32::MAX - 89; // 90 bytes before the wrap ...
        assert_eq!(
            classify_peer_segment(Some(highest), seq, 100, false, false),
            PeerSegment::Retransmit // ... ends exactly at 10
        );
        assert_eq!(
            classify_peer_segment(Some(highest), seq, 101, false, false),
            PeerSegment::New { end: 11 }
        );
        assert_eq!(
            classify_peer_segment(Some(u32::MAX - 10), u32::MAX - 10, 100, false, false),
            PeerSegment::New { end: 89 }
        );
    }
}
