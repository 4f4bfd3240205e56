//! The host's network as a migration sees it: which connections a process
//! tree holds ([`discover`]), the service addresses ([`address`], over
//! rtnetlink) and announcing them on the link ([`announce`], GARP and
//! unsolicited NA built with pnet) and delivering held packets
//! ([`inject`]), and proving by an ICMP round trip that a peer's packets
//! for the service address reach this host ([`roundtrip`]).

pub mod address;
pub mod announce;
pub mod bird;
pub mod discover;
pub mod inject;
pub mod roundtrip;
