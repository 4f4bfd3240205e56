//! Header parsing: direct packet access for headers in the linear part of
//! the skb, `ctx.load` for the rest, so non-linear skbs and GRO/GSO
//! super-packets parse the same as small linear ones.

use aya_ebpf::programs::TcContext;
use migrator_common::{
    FlowKey,
    flow::{FAMILY_IPV4, FAMILY_IPV6},
};

#[derive(Clone, Copy)]
pub enum Direction {
    Ingress,
    Egress,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The parts of a TCP segment the data plane needs.
pub struct TcpSegment {
    pub key: FlowKey,
    pub seq: u32,
    pub payload_len: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub ack: bool,
    /// Raw (unscaled) window field.
    pub window: u16,
    /// skb length (all segments of a GSO packet).
    pub wire_len: u32,
    /// Segments this skb stands for (GSO/GRO aggregates count each).
    pub segments: u32,
}

/// Read a header at `offset`: straight from the linear part of the skb when
/// it is there (the common case, and several times cheaper than a helper
/// call), through `bpf_skb_load_bytes` otherwise (non-linear skbs).
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() <= end {
        // SAFETY: the bytes lie between data and data_end (checked above,
        // and again by the verifier); T is plain bytes, read unaligned.
        Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
    } else {
        ctx.load(offset).map_err(|_| ())
    }
}

impl TcpSegment {
    /// `Ok(None)` for anything that is not a first-fragment TCP segment over
    /// Ethernet + IPv4/IPv6 without extension headers: such packets are not
    /// ours and pass untouched. So is a segment whose local port
    /// `may_be_tracked` rejects: the key is not even built for it.
    #[inline(always)]
    pub fn parse(
        ctx: &TcContext,
        direction: Direction,
        may_be_tracked: impl Fn(u16) -> bool,
    ) -> Result<Option<Self>, ()> {
        let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
        let wire_len = ctx.len();
        // Only the fields that decide whether this is ours are read before
        // the port prefilter; addresses are read once it passed.
        let (family, l4, ip_payload_end) = match ethertype {
            ETH_P_IP => {
                let ip: [u8; 10] = read(ctx, ETH_HLEN)?;
                let ihl = ((ip[0] & 0x0f) as usize) * 4;
                if ip[0] >> 4 != 4 || ihl < 20 {
                    return Ok(None);
                }
                if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                    return Ok(None); // later fragment: no TCP header
                }
                if ip[9] != IPPROTO_TCP {
                    return Ok(None);
                }
                let total = u16::from_be_bytes([ip[2], ip[3]]) as u32;
                // tot_len 0 is BIG TCP: fall back to the skb length.
                let end = if total == 0 {
                    wire_len
                } else {
                    ETH_HLEN as u32 + total
                };
                (FAMILY_IPV4, ETH_HLEN + ihl, end)
            }
            ETH_P_IPV6 => {
                let ip: [u8; 8] = read(ctx, ETH_HLEN)?;
                if ip[6] != IPPROTO_TCP {
                    return Ok(None); // extension headers and non-TCP pass
                }
                let payload = u16::from_be_bytes([ip[4], ip[5]]) as u32;
                let end = if payload == 0 {
                    wire_len
                } else {
                    (ETH_HLEN + IPV6_HLEN) as u32 + payload
                };
                (FAMILY_IPV6, ETH_HLEN + IPV6_HLEN, end)
            }
            _ => return Ok(None),
        };

        let tcp: [u8; 16] = read(ctx, l4)?;
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let local_port = match direction {
            Direction::Ingress => dport,
            Direction::Egress => sport,
        };
        if !may_be_tracked(local_port) {
            return Ok(None);
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let doff = ((tcp[12] >> 4) as u32) * 4;
        let flags = tcp[13];
        let window = u16::from_be_bytes([tcp[14], tcp[15]]);
        // Ethernet padding of tiny frames is still in the skb at TC ingress,
        // so the IP length, not the skb length, bounds the payload.
        let end = if ip_payload_end < wire_len {
            ip_payload_end
        } else {
            wire_len
        };
        let payload_len = end.saturating_sub(l4 as u32 + doff);

        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        if family == FAMILY_IPV4 {
            let addrs: [u8; 8] = read(ctx, ETH_HLEN + 12)?;
            src[..4].copy_from_slice(&addrs[..4]);
            dst[..4].copy_from_slice(&addrs[4..]);
        } else {
            let addrs: [u8; 32] = read(ctx, ETH_HLEN + 8)?;
            src.copy_from_slice(&addrs[..16]);
            dst.copy_from_slice(&addrs[16..]);
        }

        let key = match direction {
            Direction::Ingress => FlowKey {
                local_addr: dst,
                remote_addr: src,
                local_port: dport,
                remote_port: sport,
                family,
                _pad: [0; 3],
            },
            Direction::Egress => FlowKey {
                local_addr: src,
                remote_addr: dst,
                local_port: sport,
                remote_port: dport,
                family,
                _pad: [0; 3],
            },
        };
        // SAFETY: reading a plain field of the context the kernel passed us.
        let gso_segs = unsafe { (*ctx.skb.skb).gso_segs };
        Ok(Some(Self {
            key,
            seq,
            payload_len,
            syn: flags & TCP_SYN != 0,
            fin: flags & TCP_FIN != 0,
            rst: flags & TCP_RST != 0,
            ack: flags & TCP_ACK != 0,
            window,
            wire_len,
            segments: if gso_segs > 1 { gso_segs } else { 1 },
        }))
    }
}
