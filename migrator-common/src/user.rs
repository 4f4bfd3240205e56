//! Userspace-only glue: lets the shared types live in aya maps.

use crate::{FlowKey, FlowPolicy, FlowStats, ServiceKey, SockLayout};

// SAFETY: all of them are #[repr(C)], Copy, padding-free (explicit pad
// fields), and every bit pattern is a valid value.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowPolicy {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowStats {}
// SAFETY: as above.
unsafe impl aya::Pod for ServiceKey {}
// SAFETY: as above (nine u32 fields).
unsafe impl aya::Pod for SockLayout {}
