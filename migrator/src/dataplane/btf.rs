//! Just enough of the BPF Type Format (the kernel's
//! Documentation/bpf/btf.rst) to find where named members of a kernel
//! struct sit, and what a BTF tracepoint's arguments are. The retransmit
//! counter reads `struct sock` fields whose offsets differ between kernel
//! builds; this is how it learns them without tracefs or kernel headers.

use std::{borrow::Cow, path::Path};

use migrator_common::SockLayout;

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source} (kernel without CONFIG_DEBUG_INFO_BTF?)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF data we can read: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
    #[error("{0}")]
    Unexpected(String),
}

const MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;

// Kinds (btf.rst, "Type encoding").
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type record: where its trailing data starts, and its fixed fields.
#[derive(Clone, Copy, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Offset of the kind-specific data in `Btf::data`.
    extra: usize,
}

/// A struct or union member found by name, offsets from the outer struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u32,
}

pub struct Btf {
    data: Vec<u8>,
    /// Type id N is `types[N - 1]`; id 0 is `void`.
    types: Vec<Type>,
    strings: std::ops::Range<usize>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    /// Parse little-endian BTF (what x86-64 and arm64 kernels carry).
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u32_at = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or(BtfError::Malformed("truncated header"))
        };
        if data.len() < HEADER_MIN || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("no little-endian BTF magic"));
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_at = header_len + type_off;
        let strings = header_len + str_off..header_len + str_off + str_len;
        if types_at + type_len > data.len() || strings.end > data.len() {
            return Err(BtfError::Malformed("sections run past the end"));
        }
        let mut types = Vec::new();
        let mut at = types_at;
        while at < types_at + type_len {
            let info = u32_at(at + 4)?;
            let ty = Type {
                name_off: u32_at(at)?,
                kind: (info >> 24) & 0x1f,
                vlen: info & 0xffff,
                kind_flag: info >> 31 == 1,
                size_or_type: u32_at(at + 8)?,
                extra: at + 12,
            };
            at = ty.extra + extra_len(ty.kind, ty.vlen)?;
            types.push(ty);
        }
        Ok(Self {
            data,
            types,
            strings,
        })
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn name(&self, offset: u32) -> Cow<'_, str> {
        let start = self.strings.start + offset as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end])
    }

    fn get(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// The id of the first type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|ty| ty.kind == kind && self.name(ty.name_off) == name)
            .map(|i| i as u32 + 1)
    }

    /// Follow typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<(u32, &Type)> {
        for _ in 0..32 {
            let ty = self.get(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Some((id, ty)),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        let (_, ty) = self.resolve(id)?;
        match ty.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Some(ty.size_or_type),
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let element = self.u32_at(ty.extra);
                let count = self.u32_at(ty.extra + 8);
                self.size_of(element)?.checked_mul(count)
            }
            _ => None,
        }
    }

    /// Members of a struct or union: (name, type id, bit offset).
    fn members(&self, ty: &Type) -> impl Iterator<Item = (Cow<'_, str>, u32, u32)> {
        (0..ty.vlen as usize).map(move |i| {
            let at = ty.extra + i * 12;
            let offset = self.u32_at(at + 8);
            // With kind_flag the top byte is a bitfield size.
            let bits = if ty.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            (self.name(self.u32_at(at)), self.u32_at(at + 4), bits)
        })
    }

    /// A member of `struct NAME`, looked for through anonymous struct and
    /// union members the way C resolves `s.field`.
    pub fn member(&self, struct_name: &str, member: &str) -> Result<Member, BtfError> {
        let id = self
            .find(KIND_STRUCT, struct_name)
            .ok_or_else(|| BtfError::Missing(format!("struct {struct_name}")))?;
        self.member_in(id, member, 0, 0)
            .ok_or_else(|| BtfError::Missing(format!("member {member} in struct {struct_name}")))
    }

    fn member_in(&self, id: u32, wanted: &str, base_bits: u32, depth: u32) -> Option<Member> {
        let (_, ty) = self.resolve(id)?;
        if depth > 8 || !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for (name, member_type, bits) in self.members(ty) {
            let bits = base_bits + bits;
            if name == wanted {
                // A bitfield is not a field we can read whole.
                if !bits.is_multiple_of(8) {
                    return None;
                }
                return Some(Member {
                    offset: bits / 8,
                    size: self.size_of(member_type)?,
                });
            }
            if name.is_empty()
                && let Some(found) = self.member_in(member_type, wanted, bits, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }

    /// The struct an argument of a BTF tracepoint points to: argument `n`
    /// of `btf_trace_NAME` (after the leading context pointer), e.g.
    /// `sock` for `tcp_retransmit_skb`'s first.
    pub fn tracepoint_arg_struct(&self, tracepoint: &str, n: u32) -> Result<String, BtfError> {
        let typedef = format!("btf_trace_{tracepoint}");
        let missing = || BtfError::Missing(format!("tracepoint {tracepoint} ({typedef})"));
        let id = self.find(KIND_TYPEDEF, &typedef).ok_or_else(missing)?;
        let (_, pointer) = self
            .resolve(self.get(id).ok_or_else(missing)?.size_or_type)
            .filter(|(_, ty)| ty.kind == KIND_PTR)
            .ok_or_else(missing)?;
        let (_, proto) = self
            .resolve(pointer.size_or_type)
            .filter(|(_, ty)| ty.kind == KIND_FUNC_PROTO)
            .ok_or_else(missing)?;
        // Parameters: {name_off, type}, 8 bytes each; the first is `void *`.
        let index = n + 1;
        if index >= proto.vlen {
            return Err(BtfError::Unexpected(format!(
                "tracepoint {tracepoint} has no argument {n}"
            )));
        }
        let param_type = self.u32_at(proto.extra + index as usize * 8 + 4);
        let target = self
            .resolve(param_type)
            .filter(|(_, ty)| ty.kind == KIND_PTR)
            .and_then(|(_, ptr)| self.resolve(ptr.size_or_type))
            .filter(|(_, ty)| ty.kind == KIND_STRUCT)
            .map(|(_, ty)| self.name(ty.name_off).into_owned());
        target.ok_or_else(|| {
            BtfError::Unexpected(format!(
                "argument {n} of tracepoint {tracepoint} is not a pointer to a struct"
            ))
        })
    }

    /// Where `struct sock` keeps a connection's addresses and ports, for
    /// the BTF retransmit counter; checks that `tcp_retransmit_skb` still
    /// passes the socket first.
    pub fn sock_layout(&self) -> Result<SockLayout, BtfError> {
        let arg = self.tracepoint_arg_struct("tcp_retransmit_skb", 0)?;
        if arg != "sock" {
            return Err(BtfError::Unexpected(format!(
                "tcp_retransmit_skb's first argument is struct {arg}, not struct sock"
            )));
        }
        let common = self.member("sock", "__sk_common")?.offset;
        let field = |name: &str, size: u32| -> Result<u32, BtfError> {
            let found = self.member("sock_common", name)?;
            if found.size != size {
                return Err(BtfError::Unexpected(format!(
                    "sock_common.{name} is {} bytes, expected {size}",
                    found.size
                )));
            }
            Ok(common + found.offset)
        };
        let v6 = field("skc_v6_rcv_saddr", 16).and_then(|l| Ok((l, field("skc_v6_daddr", 16)?)));
        Ok(SockLayout {
            family: field("skc_family", 2)?,
            local_port: field("skc_num", 2)?,
            remote_port: field("skc_dport", 2)?,
            local_v4: field("skc_rcv_saddr", 4)?,
            remote_v4: field("skc_daddr", 4)?,
            local_v6: v6.as_ref().map_or(0, |(l, _)| *l),
            remote_v6: v6.as_ref().map_or(0, |(_, r)| *r),
            ipv6: u32::from(v6.is_ok()),
            known: 1,
        })
    }
}

/// Bytes of kind-specific data after a type record.
fn extra_len(kind: u32, vlen: u32) -> Result<usize, BtfError> {
    let vlen = vlen as usize;
    Ok(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        _ => return Err(BtfError::Malformed("unknown type kind")),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A tiny BTF blob built by hand: `struct pair { int a; union { int
    /// b; char c; }; }` and a tracepoint typedef whose first argument is
    /// `const struct pair *`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0pair\0a\0b\0char\0c\0btf_trace_tp\0";
        let name = |s: &str| -> u32 {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u32> = Vec::new();
        let mut push = |words: &[u32]| types.extend_from_slice(words);
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int (4 bytes)
        push(&[name("int"), info(KIND_INT, 0), 4, 32]);
        // 2: char
        push(&[name("char"), info(KIND_INT, 0), 1, 8]);
        // 3: anonymous union { int b; char c; }
        push(&[0, info(KIND_UNION, 2), 4]);
        push(&[name("b"), 1, 0, name("c"), 2, 0]);
        // 4: struct pair { int a; <union 3> at 32 bits; }
        push(&[name("pair"), info(KIND_STRUCT, 2), 8]);
        push(&[name("a"), 1, 0, 0, 3, 32]);
        // 5: const struct pair; 6: pointer to it
        push(&[0, info(KIND_CONST, 0), 4]);
        push(&[0, info(KIND_PTR, 0), 5]);
        // 7: void *; 8: proto (void *, const struct pair *); 9: pointer; 10: typedef
        push(&[0, info(KIND_PTR, 0), 0]);
        push(&[0, info(KIND_FUNC_PROTO, 2), 0]);
        push(&[0, 7, 0, 6]);
        push(&[0, info(KIND_PTR, 0), 8]);
        push(&[name("btf_trace_tp"), info(KIND_TYPEDEF, 0), 9]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob.extend_from_slice(&type_bytes);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn members_are_found_through_anonymous_unions() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(
            btf.member("pair", "a").unwrap(),
            Member { offset: 0, size: 4 }
        );
        assert_eq!(
            btf.member("pair", "c").unwrap(),
            Member { offset: 4, size: 1 }
        );
        assert!(matches!(
            btf.member("pair", "zz"),
            Err(BtfError::Missing(_))
        ));
        assert_eq!(btf.tracepoint_arg_struct("tp", 0).unwrap(), "pair");
        assert!(btf.tracepoint_arg_struct("tp", 1).is_err());
        assert!(btf.tracepoint_arg_struct("nope", 0).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        let mut blob = sample();
        blob[16] = 0xff; // string section offset far past the end
        assert!(Btf::parse(blob).is_err());
    }

    /// The running kernel: the layout must agree with what every Linux
    /// since 4.x has (sock_common first in sock, the address pair at its
    /// start, ports after it).
    #[test]
    fn this_kernels_sock_layout_is_plausible() {
        let Ok(btf) = Btf::from_sys_fs() else {
            panic!("{VMLINUX_BTF} is missing: this kernel has no BTF, which the data plane needs");
        };
        let layout = btf.sock_layout().unwrap();
        assert_eq!(layout.known, 1);
        assert_eq!(layout.remote_v4, 0, "skc_daddr opens sock_common");
        assert_eq!(layout.local_v4, 4);
        assert_eq!(layout.remote_port, 12, "skc_dport after the hash");
        assert_eq!(layout.local_port, 14);
        assert_eq!(layout.family, 16);
        assert_eq!(layout.ipv6, 1);
        assert!(layout.local_v6 > layout.family && layout.remote_v6 > layout.family);
    }
}
