//! CRIU's image directories, recognised (not imported): enough of
//! inventory.img and pstree.img to say that a directory holds a CRIU
//! image, which format version, and its processes.
//!
//! CRIU's files are little-endian: inventory.img starts with its own
//! magic, every other file with a common magic and then the file's; then
//! each record is a length (u32) and a protobuf message.

use std::path::Path;

/// inventory.img's first word.
const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// The first word of the other files, then each file's own.
const COMMON_MAGIC: u32 = 0x5456_4319;
const PSTREE_MAGIC: u32 = 0x5027_3030;
/// The largest record read.
const MAX_RECORD: usize = 1 << 20;

/// What a CRIU image directory says of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriuImage {
    /// The inventory's img_version (2: CRIU's images v1.1).
    pub img_version: u64,
    /// Whether it is a pre-dump's.
    pub pre_dump: bool,
    /// The processes of pstree.img: (pid, ppid), the root first.
    pub processes: Vec<(u32, u32)>,
}

impl CriuImage {
    /// How people name its format.
    pub fn version_text(&self) -> String {
        match self.img_version {
            1 => "CRIU images v1".into(),
            2 => "CRIU images v1.1".into(),
            n => format!("CRIU image version {n}"),
        }
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        let root = self
            .processes
            .first()
            .map_or_else(|| "no process".into(), |p| format!("root pid {}", p.0));
        format!(
            "a CRIU image ({}{}), {} process(es), {root}",
            self.version_text(),
            if self.pre_dump { ", a pre-dump" } else { "" },
            self.processes.len()
        )
    }
}

/// A protobuf varint at the head of `b`: (value, bytes taken).
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The varint fields of protobuf message `m` (field number, value); other
/// wire types are skipped.
fn varint_fields(m: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < m.len() {
        let (key, n) = varint(&m[at..])?;
        at += n;
        match key & 7 {
            0 => {
                let (v, n) = varint(&m[at..])?;
                at += n;
                out.push((key >> 3, v));
            }
            1 => at += 8,
            2 => {
                let (len, n) = varint(&m[at..])?;
                at = at.checked_add(n)?.checked_add(usize::try_from(len).ok()?)?;
            }
            5 => at += 4,
            _ => return None,
        }
    }
    (at == m.len()).then_some(out)
}

/// The records of a CRIU file's bytes after its magic.
fn records(mut b: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        if len > MAX_RECORD {
            return None;
        }
        out.push(b.get(4..4 + len)?);
        b = &b[4 + len..];
    }
    Some(out)
}

fn word(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Whether the directory `dir` holds a CRIU image, and what it says.
pub fn criu_image(dir: &Path) -> Option<CriuImage> {
    let read = |name: &str| -> Option<Vec<u8>> {
        let f = std::fs::File::open(dir.join(name)).ok()?;
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, 16 << 20), &mut b).ok()?;
        Some(b)
    };
    let inv = read("inventory.img")?;
    if word(&inv, 0)? != INVENTORY_MAGIC {
        return None;
    }
    let mut out = CriuImage::default();
    let first = records(&inv[4..])?.into_iter().next()?;
    for (field, v) in varint_fields(first)? {
        match field {
            1 => out.img_version = v,
            9 => out.pre_dump = v != 0,
            _ => {}
        }
    }
    if let Some(p) = read("pstree.img") {
        if word(&p, 0) == Some(COMMON_MAGIC) && word(&p, 4) == Some(PSTREE_MAGIC) {
            for r in records(&p[8..]).unwrap_or_default() {
                let f = varint_fields(r).unwrap_or_default();
                let get = |n: u64| f.iter().find(|x| x.0 == n).map_or(0, |x| x.1 as u32);
                out.processes.push((get(1), get(2)));
            }
        }
    }
    Some(out)
}
