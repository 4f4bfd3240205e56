//! CRIU's own timing of a dump or restore, read from the `stats-dump` and
//! `stats-restore` images it leaves in the images directory.
//!
//! The images are CRIU's format: one or two magic words, then entries of
//! (u32 length, protobuf message). `StatsEntry` is small and stable
//! (`images/stats.proto`), so it is decoded here by field number instead
//! of pulling in CRIU's whole image schema. Whether the restore had its
//! kernel probes cached is in its log, not its stats.

use std::path::Path;

pub const DUMP_STATS_FILE: &str = "stats-dump";
pub const RESTORE_STATS_FILE: &str = "stats-restore";

/// Magic words that prefix the image-specific one.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;

/// Dump statistics (times in ms; CRIU records microseconds).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DumpStats {
    pub freezing_ms: f64,
    pub frozen_ms: f64,
    pub memdump_ms: f64,
    pub memwrite_ms: f64,
    pub pages_scanned: u64,
    pub pages_written: u64,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestoreStats {
    pub forking_ms: f64,
    pub restore_ms: f64,
    pub pages_restored: u64,
    /// CRIU read its kernel probes from `/run/criu.kdat` instead of
    /// running them (25-30 ms here) inside the freeze window.
    #[serde(default)]
    pub kernel_probes_cached: bool,
}

/// What CRIU logs when it found its cache of kernel probes.
const KDAT_LOADED: &str = "Loaded kdat cache from";

pub fn read_dump_stats(images_dir: &Path) -> Option<DumpStats> {
    let entry = stats_entry(&images_dir.join(DUMP_STATS_FILE))?;
    let dump = fields(field_bytes(&entry, 1)?)?;
    let ms = |n| get(&dump, n) as f64 / 1e3;
    Some(DumpStats {
        freezing_ms: ms(1),
        frozen_ms: ms(2),
        memdump_ms: ms(3),
        memwrite_ms: ms(4),
        pages_scanned: get(&dump, 5),
        pages_written: get(&dump, 7),
    })
}

pub fn read_restore_stats(images_dir: &Path) -> Option<RestoreStats> {
    let entry = stats_entry(&images_dir.join(RESTORE_STATS_FILE))?;
    let restore = fields(field_bytes(&entry, 2)?)?;
    Some(RestoreStats {
        forking_ms: get(&restore, 3) as f64 / 1e3,
        restore_ms: get(&restore, 4) as f64 / 1e3,
        pages_restored: get(&restore, 5),
        kernel_probes_cached: std::fs::read_to_string(images_dir.join(super::swrk::RESTORE_LOG))
            .is_ok_and(|log| log.contains(KDAT_LOADED)),
    })
}

/// The first entry of an image file, past its magic words.
fn stats_entry(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let mut at = 4;
    if matches!(word(0)?, IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC) {
        at += 4;
    }
    let len = word(at)? as usize;
    bytes.get(at + 4..at + 4 + len).map(<[u8]>::to_vec)
}

/// A decoded message: (field number, varint value or bytes).
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn fields(mut data: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = varint(&mut data)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut data)?),
            2 => {
                let len = varint(&mut data)? as usize;
                let (bytes, rest) = (data.get(..len)?, data.get(len..)?);
                data = rest;
                Value::Bytes(bytes)
            }
            5 => {
                data = data.get(4..)?;
                continue;
            }
            1 => {
                data = data.get(8..)?;
                continue;
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

fn field_bytes(data: &[u8], number: u64) -> Option<&[u8]> {
    let fields = fields(data)?;
    fields.into_iter().find_map(|(n, value)| match value {
        Value::Bytes(bytes) if n == number => Some(bytes),
        _ => None,
    })
}

fn get(fields: &[(u64, Value<'_>)], number: u64) -> u64 {
    fields
        .iter()
        .find_map(|(n, value)| match value {
            Value::Varint(v) if *n == number => Some(*v),
            _ => None,
        })
        .unwrap_or(0)
}

fn varint(data: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = data.split_first()?;
        *data = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_bytes(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn decodes_a_dump_stats_image() {
        // dump_stats_entry { freezing 1500 us, frozen 42000, memdump 900,
        // memwrite 1200, pages_scanned 300, skipped 0, written 250 }
        let mut dump = Vec::new();
        for (field, value) in [
            (1, 1500),
            (2, 42_000),
            (3, 900),
            (4, 1200),
            (5, 300),
            (6, 0),
            (7, 250),
        ] {
            dump.extend(varint_bytes(field << 3));
            dump.extend(varint_bytes(value));
        }
        let mut entry = vec![0x0a];
        entry.extend(varint_bytes(dump.len() as u64));
        entry.extend(dump);
        let mut image = IMG_SERVICE_MAGIC.to_le_bytes().to_vec();
        image.extend(0x5709_3306u32.to_le_bytes());
        image.extend((entry.len() as u32).to_le_bytes());
        image.extend(entry);
        let dir = std::env::temp_dir().join(format!("migrator-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DUMP_STATS_FILE), image).unwrap();
        let stats = read_dump_stats(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(stats.frozen_ms, 42.0);
        assert_eq!(stats.memwrite_ms, 1.2);
        assert_eq!((stats.pages_scanned, stats.pages_written), (300, 250));
    }
}
