//! Image file framing: `b"CRYO"` + 4-byte kind magic, then records
//! `[u32 LE length][protobuf bytes]`.

use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{FoundKind, ImageError, Magic};
use crate::proto;

/// First four bytes of every cryo image file.
pub const FORMAT_MAGIC: [u8; 4] = *b"CRYO";
/// Upper bound on one record's length; larger lengths mean corruption.
pub const MAX_RECORD_LEN: u32 = 64 << 20;

pub const INVENTORY_FILE: &str = "inventory.img";
pub const PSTREE_FILE: &str = "pstree.img";
pub const FILES_FILE: &str = "files.img";
pub const NAMESPACES_FILE: &str = "namespaces.img";
pub const CGROUPS_FILE: &str = "cgroups.img";

/// `core-<tid>.img`
pub fn core_file(tid: u32) -> String {
    format!("core-{tid}.img")
}
/// `mm-<pid>.img`
pub fn mm_file(pid: u32) -> String {
    format!("mm-{pid}.img")
}
/// `pagemap-<pid>.img`
pub fn pagemap_file(pid: u32) -> String {
    format!("pagemap-{pid}.img")
}
/// `pages-<pid>.img`
pub fn pages_file(pid: u32) -> String {
    format!("pages-{pid}.img")
}
/// `fdinfo-<pid>.img`
pub fn fdinfo_file(pid: u32) -> String {
    format!("fdinfo-{pid}.img")
}
/// `tmpfs-<mount id>.img`: the files of a tmpfs of a mount namespace.
pub fn tmpfs_file(mount: u32) -> String {
    format!("tmpfs-{mount}.img")
}

/// The kinds of image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Inventory,
    Pstree,
    Core,
    Mm,
    Pagemap,
    Pages,
    Fdinfo,
    Files,
    Namespaces,
    Cgroups,
    Tmpfs,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Inventory,
        Kind::Pstree,
        Kind::Core,
        Kind::Mm,
        Kind::Pagemap,
        Kind::Pages,
        Kind::Fdinfo,
        Kind::Files,
        Kind::Namespaces,
        Kind::Cgroups,
        Kind::Tmpfs,
    ];

    pub fn magic(self) -> [u8; 4] {
        match self {
            Kind::Inventory => *b"INVT",
            Kind::Pstree => *b"PSTR",
            Kind::Core => *b"CORE",
            Kind::Mm => *b"MMAP",
            Kind::Pagemap => *b"PGMP",
            Kind::Pages => *b"PAGE",
            Kind::Fdinfo => *b"FDIN",
            Kind::Files => *b"FILE",
            Kind::Namespaces => *b"NSPC",
            Kind::Cgroups => *b"CGRP",
            Kind::Tmpfs => *b"TMPF",
        }
    }

    pub fn from_magic(magic: [u8; 4]) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.magic() == magic)
    }

    /// Short lowercase name, also the file name prefix.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Inventory => "inventory",
            Kind::Pstree => "pstree",
            Kind::Core => "core",
            Kind::Mm => "mm",
            Kind::Pagemap => "pagemap",
            Kind::Pages => "pages",
            Kind::Fdinfo => "fdinfo",
            Kind::Files => "files",
            Kind::Namespaces => "namespaces",
            Kind::Cgroups => "cgroups",
            Kind::Tmpfs => "tmpfs",
        }
    }

    /// Whether files of this kind carry an id in their name: a pid or
    /// tid, or (tmpfs) a mount id.
    pub fn is_per_task(self) -> bool {
        matches!(
            self,
            Kind::Core | Kind::Mm | Kind::Pagemap | Kind::Pages | Kind::Fdinfo | Kind::Tmpfs
        )
    }

    /// File name of this kind for task `id`; `id` is ignored for shared tables.
    pub fn file_name(self, id: u32) -> String {
        if self.is_per_task() {
            format!("{}-{id}.img", self.name())
        } else {
            format!("{}.img", self.name())
        }
    }

    pub fn from_file_name(name: &str) -> Option<Kind> {
        parse_file_name(name).map(|(k, _)| k)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Splits an image file name into its kind and, for per-task files, the id.
pub fn parse_file_name(name: &str) -> Option<(Kind, Option<u32>)> {
    let stem = name.strip_suffix(".img")?;
    for kind in Kind::ALL {
        if kind.is_per_task() {
            if let Some(id) = stem
                .strip_prefix(kind.name())
                .and_then(|r| r.strip_prefix('-'))
            {
                if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
                    return id.parse().ok().map(|id| (kind, Some(id)));
                }
            }
        } else if stem == kind.name() {
            return Some((kind, None));
        }
    }
    None
}

/// Name, size and whole-content xxh3-64 of a finished image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFileInfo {
    pub name: String,
    pub size: u64,
    pub xxh3: u64,
}

impl From<ImageFileInfo> for proto::ImageFile {
    fn from(i: ImageFileInfo) -> Self {
        proto::ImageFile {
            name: i.name,
            size: i.size,
            xxh3: i.xxh3,
        }
    }
}

/// Creates (truncating) a file with mode 0600.
pub(crate) fn create_file(path: &Path) -> Result<File, ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ImageError::io(path, "create", e))?;
    // An existing file keeps its old mode on truncation; force 0600.
    file.set_permissions(Permissions::from_mode(0o600))
        .map_err(|e| ImageError::io(path, "chmod", e))?;
    Ok(file)
}

/// Opens a file for reading, mapping ENOENT to [`ImageError::Missing`].
pub(crate) fn open_file(path: &Path) -> Result<File, ImageError> {
    File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImageError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            ImageError::io(path, "open", e)
        }
    })
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes one image file record by record.
pub struct ImageWriter {
    path: PathBuf,
    name: String,
    out: BufWriter<File>,
    hasher: Xxh3,
    size: u64,
    records: usize,
}

impl ImageWriter {
    pub fn create(dir: &Path, name: &str, kind: Kind) -> Result<ImageWriter, ImageError> {
        let path = dir.join(name);
        let file = create_file(&path)?;
        let mut w = ImageWriter {
            path,
            name: name.to_string(),
            out: BufWriter::with_capacity(256 << 10, file),
            hasher: Xxh3::new(),
            size: 0,
            records: 0,
        };
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&FORMAT_MAGIC);
        header[4..].copy_from_slice(&kind.magic());
        w.put(&header)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.out
            .write_all(bytes)
            .map_err(|e| ImageError::io(&self.path, "write", e))?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Encodes and appends one record.
    pub fn write<M: prost::Message>(&mut self, msg: &M) -> Result<(), ImageError> {
        self.write_raw(&msg.encode_to_vec())
    }

    /// Appends one record whose body is already encoded.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|&l| l <= MAX_RECORD_LEN)
            .ok_or_else(|| ImageError::RecordTooLarge {
                path: self.path.clone(),
                record: self.records,
                len: bytes.len() as u64,
                max: u64::from(MAX_RECORD_LEN),
            })?;
        self.put(&len.to_le_bytes())?;
        self.put(bytes)?;
        self.records += 1;
        Ok(())
    }

    /// Flushes the file and returns its name, size and xxh3-64.
    pub fn finish(mut self) -> Result<ImageFileInfo, ImageError> {
        self.out
            .flush()
            .map_err(|e| ImageError::io(&self.path, "write", e))?;
        Ok(ImageFileInfo {
            name: self.name,
            size: self.size,
            xxh3: self.hasher.digest(),
        })
    }
}

/// Reads one image file record by record, streaming.
pub struct ImageReader {
    path: PathBuf,
    input: BufReader<File>,
    record: usize,
}

impl ImageReader {
    pub fn open(dir: &Path, name: &str, kind: Kind) -> Result<ImageReader, ImageError> {
        let path = dir.join(name);
        let file = open_file(&path)?;
        let mut input = BufReader::with_capacity(128 << 10, file);
        let mut header = [0u8; 8];
        let n = read_full(&mut input, &mut header).map_err(|e| ImageError::io(&path, "read", e))?;
        if n == 0 {
            return Err(ImageError::EmptyFile { path });
        }
        if n < header.len() {
            return Err(ImageError::TruncatedHeader {
                path,
                expected: header.len() as u64,
                found: n as u64,
            });
        }
        let fmt_magic = [header[0], header[1], header[2], header[3]];
        if fmt_magic != FORMAT_MAGIC {
            return Err(ImageError::NotCryoImage {
                path,
                found: Magic(fmt_magic),
            });
        }
        let kind_magic = [header[4], header[5], header[6], header[7]];
        if kind_magic != kind.magic() {
            let found = match Kind::from_magic(kind_magic) {
                Some(k) => FoundKind::Known(k),
                None => FoundKind::Unknown(Magic(kind_magic)),
            };
            return Err(ImageError::WrongKind {
                path,
                expected: kind,
                found,
            });
        }
        Ok(ImageReader {
            path,
            input,
            record: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Index of the next record to be read.
    pub fn record_index(&self) -> usize {
        self.record
    }

    /// Next record's raw body; `None` at a clean end of file.
    pub fn next_raw(&mut self) -> Result<Option<Vec<u8>>, ImageError> {
        let mut len_buf = [0u8; 4];
        let n = read_full(&mut self.input, &mut len_buf)
            .map_err(|e| ImageError::io(&self.path, "read", e))?;
        if n == 0 {
            return Ok(None);
        }
        if n < len_buf.len() {
            return Err(ImageError::TruncatedLength {
                path: self.path.clone(),
                record: self.record,
                found: n,
            });
        }
        let len = u32::from_le_bytes(len_buf);
        if len > MAX_RECORD_LEN {
            return Err(ImageError::RecordTooLarge {
                path: self.path.clone(),
                record: self.record,
                len: u64::from(len),
                max: u64::from(MAX_RECORD_LEN),
            });
        }
        let mut body = Vec::new();
        let got = (&mut self.input)
            .take(u64::from(len))
            .read_to_end(&mut body)
            .map_err(|e| ImageError::io(&self.path, "read", e))?;
        if got as u64 != u64::from(len) {
            return Err(ImageError::TruncatedBody {
                path: self.path.clone(),
                record: self.record,
                expected: u64::from(len),
                found: got as u64,
            });
        }
        self.record += 1;
        Ok(Some(body))
    }

    /// Next record decoded as `M`; `None` at a clean end of file.
    // Not an Iterator: each call picks the message type.
    #[allow(clippy::should_implement_trait)]
    pub fn next<M: prost::Message + Default>(&mut self) -> Result<Option<M>, ImageError> {
        let record = self.record;
        match self.next_raw()? {
            None => Ok(None),
            Some(body) => decode::<M>(&self.path, record, &body).map(Some),
        }
    }

    /// Fails with [`ImageError::ExtraRecord`] unless the file has no more records.
    pub fn expect_end(&mut self) -> Result<(), ImageError> {
        let record = self.record;
        match self.next_raw()? {
            None => Ok(()),
            Some(_) => Err(ImageError::ExtraRecord {
                path: self.path.clone(),
                record,
                expected: record,
            }),
        }
    }
}

pub(crate) fn decode<M: prost::Message + Default>(
    path: &Path,
    record: usize,
    body: &[u8],
) -> Result<M, ImageError> {
    M::decode(body).map_err(|source| ImageError::Decode {
        path: path.to_path_buf(),
        record,
        message: std::any::type_name::<M>()
            .rsplit("::")
            .next()
            .unwrap_or("message"),
        source,
    })
}

/// Reads a file that must hold exactly one record.
pub fn read_one<M: prost::Message + Default>(
    dir: &Path,
    name: &str,
    kind: Kind,
) -> Result<M, ImageError> {
    let mut r = ImageReader::open(dir, name, kind)?;
    let msg = r.next::<M>()?.ok_or_else(|| ImageError::NoRecord {
        path: r.path.clone(),
    })?;
    r.expect_end()?;
    Ok(msg)
}

/// Writes a file holding exactly one record.
pub fn write_one<M: prost::Message>(
    dir: &Path,
    name: &str,
    kind: Kind,
    msg: &M,
) -> Result<ImageFileInfo, ImageError> {
    let mut w = ImageWriter::create(dir, name, kind)?;
    w.write(msg)?;
    w.finish()
}
