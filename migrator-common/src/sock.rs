//! Where the fields of the kernel's `struct sock` that name a connection
//! sit. They move between kernel builds, and Rust eBPF has no CO-RE field
//! relocations yet, so userspace reads them from the running kernel's BTF
//! and writes them into the retransmit counter's one-entry map when it
//! attaches the counter.

/// Byte offsets within `struct sock` (its first member is `struct
/// sock_common`). All zero with `known == 0` (the map's initial state):
/// the counter stays idle rather than read the wrong bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockLayout {
    /// `skc_family` (u16).
    pub family: u32,
    /// `skc_num` (u16, host byte order): the local port.
    pub local_port: u32,
    /// `skc_dport` (u16, network byte order): the remote port.
    pub remote_port: u32,
    /// `skc_rcv_saddr` (4 bytes).
    pub local_v4: u32,
    /// `skc_daddr` (4 bytes).
    pub remote_v4: u32,
    /// `skc_v6_rcv_saddr` (16 bytes); meaningful only with `ipv6 != 0`.
    pub local_v6: u32,
    /// `skc_v6_daddr` (16 bytes); meaningful only with `ipv6 != 0`.
    pub remote_v6: u32,
    /// Non-zero when the IPv6 fields exist (CONFIG_IPV6).
    pub ipv6: u32,
    /// Non-zero once userspace filled the offsets in.
    pub known: u32,
}
