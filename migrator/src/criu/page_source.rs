//! Post-copy's two ends of the page traffic (`migrate --post-copy`).
//!
//! The source dumps into its own images (tmpfs, as CRIU by hand does) and
//! sends every image but the lazy pages' bytes: a pages image crosses as
//! a sparse file holding only what the restore itself reads (stacks and
//! the like, shared memory), the rest left as holes. The destination's
//! `criu lazy-pages` daemon then asks for the lazy pages it needs with
//! CRIU's page-server protocol (GET records), and [`PageSource`] reads
//! them from the source's images.
//!
//! Page maps are CRIU's images: magics, then protobuf entries after their
//! 32-bit length; a head naming the pages image, then one entry per run
//! of pages, whose bytes lie one after another in that pages image (a
//! present entry's pages follow the previous present entry's).

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use super::page_stream::{PAGE, PE_LAZY, PE_PARENT, PE_PRESENT};

#[derive(Debug, thiserror::Error)]
pub enum PageSourceError {
    #[error("{path}: {what}")]
    Image { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no pages at {vaddr:#x} (+{pages} pages) in the page map of {id}")]
    NotDumped { id: u64, vaddr: u64, pages: u64 },
}

/// One run of pages of a page map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagemapEntry {
    pub vaddr: u64,
    pub pages: u64,
    pub flags: u32,
    /// Where its bytes start in the pages image (present entries only).
    pub offset: u64,
}

impl PagemapEntry {
    pub fn present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }

    /// Filled after the release, by the lazy-pages daemon.
    pub fn lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }

    fn end(&self) -> u64 {
        self.vaddr + self.pages * PAGE
    }
}

/// A page map image, read.
#[derive(Debug)]
pub struct Pagemap {
    pub pages_id: u64,
    pub entries: Vec<PagemapEntry>,
}

impl Pagemap {
    pub fn read(path: &Path) -> Result<Self, PageSourceError> {
        let bytes = std::fs::read(path).map_err(|source| PageSourceError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes).map_err(|what| PageSourceError::Image {
            path: path.to_owned(),
            what,
        })
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let magics = bytes.get(..8).ok_or("shorter than its magics")?;
        if magics[..4] != super::page_stream::IMG_COMMON_MAGIC.to_le_bytes()
            || magics[4..] != super::page_stream::PAGEMAP_MAGIC.to_le_bytes()
        {
            return Err("not a page map (its magics differ)".to_owned());
        }
        let mut messages = Messages(&bytes[8..]);
        let head = messages.next().ok_or("no head")??;
        let pages_id = fields(head)?
            .into_iter()
            .find_map(|(field, value)| (field == 1).then_some(value))
            .ok_or("the head names no pages image")?;
        let (mut entries, mut offset) = (Vec::new(), 0u64);
        for message in messages {
            let (mut vaddr, mut compat, mut pages, mut in_parent, mut flags) =
                (None, 0, None, false, None);
            for (field, value) in fields(message?)? {
                match field {
                    1 => vaddr = Some(value),
                    2 => compat = value,
                    3 => in_parent = value != 0,
                    4 => flags = Some(u32::try_from(value).map_err(|_| "flags overflow")?),
                    5 => pages = Some(value),
                    _ => {}
                }
            }
            // Old images: no flags means present unless in the parent;
            // no nr_pages means the 32-bit count.
            let flags = flags.unwrap_or(if in_parent { PE_PARENT } else { PE_PRESENT });
            let entry = PagemapEntry {
                vaddr: vaddr.ok_or("an entry without its address")?,
                pages: pages.unwrap_or(compat),
                flags,
                offset,
            };
            if entry.present() {
                offset = entry
                    .pages
                    .checked_mul(PAGE)
                    .and_then(|len| offset.checked_add(len))
                    .ok_or("page counts overflow")?;
            }
            entries.push(entry);
        }
        Ok(Self { pages_id, entries })
    }

    /// The bytes of the pages image the restore itself reads (present,
    /// not lazy), as (offset, length), adjacent runs merged.
    pub fn eager_extents(&self) -> Vec<(u64, u64)> {
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for entry in self.entries.iter().filter(|e| e.present() && !e.lazy()) {
            let len = entry.pages * PAGE;
            match extents.last_mut() {
                Some((at, n)) if *at + *n == entry.offset => *n += len,
                _ => extents.push((entry.offset, len)),
            }
        }
        extents
    }

    /// Where `pages` pages from `vaddr` lie in the pages image: one run of
    /// present entries, each starting where the one before ended.
    fn locate(&self, vaddr: u64, pages: u64) -> Option<u64> {
        let first = self
            .entries
            .iter()
            .position(|e| e.present() && e.vaddr <= vaddr && vaddr < e.end())?;
        let start = self.entries[first].offset + (vaddr - self.entries[first].vaddr);
        let end = vaddr.checked_add(pages.checked_mul(PAGE)?)?;
        let mut covered = self.entries[first].end();
        for entry in &self.entries[first + 1..] {
            if covered >= end {
                break;
            }
            if !entry.present() || entry.vaddr != covered {
                return None;
            }
            covered = entry.end();
        }
        (covered >= end).then_some(start)
    }
}

/// CRIU's entries: each a 32-bit little-endian length, then the message.
struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = Result<&'a [u8], String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let Some(len) = self.0.get(..4) else {
            return Some(Err("an entry's length cut short".to_owned()));
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(message) = self.0.get(4..4 + len) else {
            return Some(Err("an entry cut short".to_owned()));
        };
        self.0 = &self.0[4 + len..];
        Some(Ok(message))
    }
}

/// A protobuf message's varint fields (the only wire type page maps use).
fn fields(mut message: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let varint = |message: &mut &[u8]| -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = message.split_first().ok_or("a field cut short")?;
            *message = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 64 bits".to_owned())
    };
    let mut out = Vec::new();
    while !message.is_empty() {
        let key = varint(&mut message)?;
        if key & 7 != 0 {
            return Err(format!("field {} is not a varint", key >> 3));
        }
        out.push((key >> 3, varint(&mut message)?));
    }
    Ok(out)
}

/// Reads what the destination's daemon asks for from the dump's images.
pub struct PageSource {
    dir: PathBuf,
    /// By page map id (the process's PID in the dump): its map and its
    /// pages image.
    open: HashMap<u64, (Pagemap, File)>,
}

impl PageSource {
    pub fn new(images: &Path) -> Self {
        Self {
            dir: images.to_owned(),
            open: HashMap::new(),
        }
    }

    /// Where `pages` pages from `vaddr` of process `id`'s memory, as
    /// dumped, lie: its pages image and the offset in it.
    pub fn locate(
        &mut self,
        id: u64,
        vaddr: u64,
        pages: u64,
    ) -> Result<(&File, u64), PageSourceError> {
        if !self.open.contains_key(&id) {
            let pagemap = Pagemap::read(&self.dir.join(format!("pagemap-{id}.img")))?;
            let path = self.dir.join(format!("pages-{}.img", pagemap.pages_id));
            let file = File::open(&path).map_err(|source| PageSourceError::Io { path, source })?;
            self.open.insert(id, (pagemap, file));
        }
        let (pagemap, file) = &self.open[&id];
        let offset = pagemap
            .locate(vaddr, pages)
            .ok_or(PageSourceError::NotDumped { id, vaddr, pages })?;
        Ok((file, offset))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::FileExt as _;

    use super::*;
    use crate::criu::page_stream::{IMG_COMMON_MAGIC, PAGEMAP_MAGIC};

    fn varint_field(out: &mut Vec<u8>, field: u8, mut value: u64) {
        out.push(field << 3);
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn image(pages_id: u64, entries: &[(u64, u64, Option<u32>)]) -> Vec<u8> {
        let mut out = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        out.extend(PAGEMAP_MAGIC.to_le_bytes());
        let mut push = |message: Vec<u8>| {
            out.extend((message.len() as u32).to_le_bytes());
            out.extend(message);
        };
        let mut head = Vec::new();
        varint_field(&mut head, 1, pages_id);
        push(head);
        for &(vaddr, pages, flags) in entries {
            let mut entry = Vec::new();
            varint_field(&mut entry, 1, vaddr);
            varint_field(&mut entry, 2, 0);
            if let Some(flags) = flags {
                varint_field(&mut entry, 4, u64::from(flags));
            }
            varint_field(&mut entry, 5, pages);
            push(entry);
        }
        out
    }

    const LAZY: u32 = PE_PRESENT | PE_LAZY;

    #[test]
    fn entries_find_their_bytes_in_the_pages_image() {
        let bytes = image(
            0x10000,
            &[
                (0x1000, 2, Some(PE_PRESENT)), // offset 0: stack-like, eager
                (0x3000, 3, Some(LAZY)),       // offset 2 pages
                (0x6000, 1, Some(LAZY)),       // adjacent: offset 5 pages
                (0x9000, 4, Some(PE_PARENT)),  // no bytes here
                (0x20000, 1, None),            // old image: present
            ],
        );
        let map = Pagemap::parse(&bytes).unwrap();
        assert_eq!(map.pages_id, 0x10000);
        let offsets: Vec<u64> = map.entries.iter().map(|e| e.offset / PAGE).collect();
        assert_eq!(offsets, [0, 2, 5, 6, 6]);
        assert_eq!(map.eager_extents(), [(0, 2 * PAGE), (6 * PAGE, PAGE)]);
        // Within one entry, across two adjacent ones, and what is not
        // there (a hole between entries, pages of the parent, past the end).
        assert_eq!(map.locate(0x4000, 1), Some(3 * PAGE));
        assert_eq!(map.locate(0x5000, 2), Some(4 * PAGE));
        assert_eq!(map.locate(0x8000, 1), None);
        assert_eq!(map.locate(0x6000, 2), None);
        assert_eq!(map.locate(0x9000, 1), None);
        assert_eq!(map.locate(0x20000, 2), None);
    }

    #[test]
    fn damaged_page_maps_are_refused() {
        let good = image(1, &[(0x1000, 1, Some(LAZY))]);
        for (bad, why) in [
            (good[..6].to_vec(), "magics"),
            ([&[0u8; 8][..], &good[8..]].concat(), "magics"),
            (good[..good.len() - 1].to_vec(), "cut short"),
            (good[..8].to_vec(), "no head"),
        ] {
            let err = Pagemap::parse(&bad).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn pages_are_read_where_the_map_says() {
        let dir = std::env::temp_dir().join(format!("migrator-page-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("pagemap-7.img"),
            image(
                0x10001,
                &[(0x1000, 1, Some(PE_PRESENT)), (0x5000, 2, Some(LAZY))],
            ),
        )
        .unwrap();
        let pages: Vec<u8> = (0..3 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        std::fs::write(dir.join("pages-65537.img"), &pages).unwrap();
        let mut source = PageSource::new(&dir);
        let mut read = |vaddr: u64, pages: u64| {
            source.locate(7, vaddr, pages).map(|(file, offset)| {
                let mut out = vec![0u8; (pages * PAGE) as usize];
                file.read_exact_at(&mut out, offset).unwrap();
                out
            })
        };
        assert_eq!(read(0x6000, 1).unwrap(), vec![3u8; PAGE as usize]);
        assert_eq!(read(0x5000, 2).unwrap(), pages[PAGE as usize..]);
        assert!(matches!(
            read(0x2000, 1),
            Err(PageSourceError::NotDumped { .. })
        ));
        assert!(matches!(
            source.locate(8, 0x1000, 1),
            Err(PageSourceError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
