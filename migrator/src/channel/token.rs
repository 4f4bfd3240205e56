//! The shared token: read from a file only root can read, decoded, at
//! least 128 bits; and the proofs of it, bound to one TLS session.
//!
//! Each side proves the token by HMAC-SHA256(token, role || exporter),
//! where the exporter is a value both ends of this TLS session derive
//! from its keys (RFC 8446 §7.5). A relay that terminates TLS towards
//! both hosts has two sessions with two different exporters, so a proof
//! it passes along is worthless on the other side. The token itself never
//! crosses the wire.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The least a token may hold after decoding: 128 bits.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Label of the TLS exporter the proofs are bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-migrator-token-proof-v1";
pub const EXPORTER_LEN: usize = 32;

/// Who proves: the roles differ so one side's proof never serves as the
/// other's.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Agent,
    Source,
}

impl Role {
    const fn label(self) -> &'static [u8] {
        match self {
            Self::Agent => b"migrator agent",
            Self::Source => b"migrator source",
        }
    }
}

pub struct Token {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Read and check a token file: a regular file owned by root that no
    /// group or other user can read or write, holding hex, base64 or raw
    /// text of at least 128 bits once decoded.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let how = "create one on both hosts with `head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE`";
        let meta = std::fs::symlink_metadata(path)
            .map_err(|err| format!("token file {}: {err}; {how}", path.display()))?;
        if !meta.file_type().is_file() {
            return Err(format!(
                "token file {} is not a regular file (a symlink or a directory); {how}",
                path.display()
            ));
        }
        if meta.uid() != 0 {
            return Err(format!(
                "token file {} is owned by uid {}, not root: another user could have written it; `chown root: {}`",
                path.display(),
                meta.uid(),
                path.display()
            ));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "token file {} has mode {:o}: group or others can read it, and whoever holds the token can run code as root on the agent; `chmod 600 {}`",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("token file {}: {err}; {how}", path.display()))?;
        let secret = decode(text.trim());
        if secret.len() < MIN_TOKEN_BYTES {
            return Err(format!(
                "token file {}: the token holds {} bytes once decoded, need at least {MIN_TOKEN_BYTES} (128 bits); {how}",
                path.display(),
                secret.len()
            ));
        }
        Ok(Self { secret })
    }

    #[cfg(test)]
    pub fn from_bytes(secret: &[u8]) -> Self {
        Self {
            secret: secret.to_vec(),
        }
    }

    /// HMAC takes keys of any length, so this is always Some.
    fn mac(&self, role: Role, exporter: &[u8]) -> Option<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).ok()?;
        mac.update(role.label());
        mac.update(exporter);
        Some(mac)
    }

    /// Our proof, as `role`, for the session with this exporter value.
    pub fn prove(&self, role: Role, exporter: &[u8]) -> Vec<u8> {
        self.mac(role, exporter)
            .map(|mac| mac.finalize().into_bytes().to_vec())
            .unwrap_or_default()
    }

    /// Check the peer's proof (constant time, by the hmac crate).
    pub fn verify(&self, role: Role, exporter: &[u8], proof: &[u8]) -> bool {
        self.mac(role, exporter)
            .is_some_and(|mac| mac.verify_slice(proof).is_ok())
    }
}

/// Hex if it is all hex digits (even length), else base64 if it decodes
/// as such, else the raw bytes.
fn decode(text: &str) -> Vec<u8> {
    from_hex(text)
        .filter(|bytes| !bytes.is_empty())
        .or_else(|| base64(text))
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex digits; None for anything else.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect()
}

/// Standard or URL-safe base64, padding optional.
fn base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let body = text.trim_end_matches('=');
    if body.len() % 4 == 1 || text.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn tokens_decode_as_hex_base64_or_raw() {
        assert_eq!(decode("00ff10"), [0, 255, 16]);
        assert_eq!(decode("aGVsbG8gd29ybGQ="), b"hello world");
        assert_eq!(decode("aGVsbG8gd29ybGQ"), b"hello world");
        assert_eq!(decode("not base64!"), b"not base64!");
        // 32 random bytes as `base64` writes them: 44 characters.
        assert_eq!(
            decode("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").len(),
            32
        );
    }

    #[test]
    fn proofs_are_bound_to_role_exporter_and_token() {
        let token = Token::from_bytes(&[7; 32]);
        let proof = token.prove(Role::Agent, b"session-a");
        assert!(token.verify(Role::Agent, b"session-a", &proof));
        assert!(!token.verify(Role::Source, b"session-a", &proof), "role");
        assert!(!token.verify(Role::Agent, b"session-b", &proof), "session");
        assert!(!Token::from_bytes(&[8; 32]).verify(Role::Agent, b"session-a", &proof));
        assert!(!token.verify(Role::Agent, b"session-a", &proof[..31]));
    }

    #[test]
    fn loose_modes_and_short_tokens_are_refused() {
        let dir = std::env::temp_dir().join(format!("migrator-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Token::from_file(&path).unwrap_err();
        assert!(
            err.contains("mode 644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(Token::from_file(&path).is_ok());
        }
        std::fs::write(&path, "0123456789abcdef").unwrap(); // hex: 8 bytes
        let err = Token::from_file(&path).unwrap_err();
        assert!(err.contains("8 bytes once decoded"), "{err}");
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(
            Token::from_file(&link)
                .unwrap_err()
                .contains("not a regular file")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
