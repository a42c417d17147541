//! The one error type of the image crate. Every variant names the image
//! file it concerns (full path), and where it matters the record or chunk
//! index and what was expected versus found.

use std::fmt;
use std::path::PathBuf;

use crate::framing::Kind;

/// Four raw bytes shown as text when printable, as hex otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Magic(pub [u8; 4]);

impl fmt::Display for Magic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.iter().all(|b| b.is_ascii_graphic()) {
            write!(f, "\"{}\"", String::from_utf8_lossy(&self.0))
        } else {
            write!(
                f,
                "{:02x} {:02x} {:02x} {:02x}",
                self.0[0], self.0[1], self.0[2], self.0[3]
            )
        }
    }
}

/// What a file's kind magic turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundKind {
    Known(Kind),
    Unknown(Magic),
}

impl fmt::Display for FoundKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FoundKind::Known(k) => write!(f, "{k}"),
            FoundKind::Unknown(m) => write!(f, "unknown-kind ({m})"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is missing")]
    Missing { path: PathBuf },
    #[error(
        "{dir}: directory holds no cryo image, or an incomplete one (inventory.img is missing)"
    )]
    NoImage { dir: PathBuf },
    #[error("{dir}: {what}, not a cryo image; cryo reads CRIU images only far enough to say so (importing them is not done yet)")]
    CriuImage { dir: PathBuf, what: String },
    #[error("{path}: file is empty (no cryo image header)")]
    EmptyFile { path: PathBuf },
    #[error("{path}: truncated header: {found} of {expected} bytes")]
    TruncatedHeader {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: not a cryo image (format magic {found}, expected \"CRYO\")")]
    NotCryoImage { path: PathBuf, found: Magic },
    #[error("{path}: is a {found} file, expected {expected}")]
    WrongKind {
        path: PathBuf,
        expected: Kind,
        found: FoundKind,
    },
    #[error("{path}: record {record}: truncated length prefix ({found} of 4 bytes)")]
    TruncatedLength {
        path: PathBuf,
        record: usize,
        found: usize,
    },
    #[error("{path}: record {record}: truncated body ({found} of {expected} bytes)")]
    TruncatedBody {
        path: PathBuf,
        record: usize,
        expected: u64,
        found: u64,
    },
    #[error("{path}: record {record}: length {len} exceeds the limit of {max} bytes")]
    RecordTooLarge {
        path: PathBuf,
        record: usize,
        len: u64,
        max: u64,
    },
    #[error("{path}: record {record}: cannot decode {message}: {source}")]
    Decode {
        path: PathBuf,
        record: usize,
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: expected exactly one record, found none")]
    NoRecord { path: PathBuf },
    #[error("{path}: record {record}: unexpected extra record (expected {expected} records)")]
    ExtraRecord {
        path: PathBuf,
        record: usize,
        expected: usize,
    },
    #[error("{path}: checksum mismatch (expected {expected:#018x}, found {found:#018x})")]
    ChecksumMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: seal record is missing (image incomplete)")]
    MissingSeal { path: PathBuf },
    #[error("{file}: image format {found}.x is newer than the supported {supported}.x; use a newer cryo")]
    NewerFormat {
        file: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{file}: invalid file name in inventory (must be a plain name in the image directory)"
    )]
    BadFileName { file: String },
    #[error("{path}: size mismatch (expected {expected} bytes, found {found})")]
    FileSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: content checksum mismatch (expected {expected:#018x}, found {found:#018x})")]
    FileChecksum {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: not a cryo pages file (header {found:02x?}, expected \"CRYOPAGE\")")]
    BadPagesHeader { path: PathBuf, found: Vec<u8> },
    #[error("{path}: page data of {len} bytes is not a non-zero multiple of 4096")]
    BadPageData { path: PathBuf, len: u64 },
    #[error("{path}: chunk of {len} bytes is too large for one chunk record")]
    ChunkTooLarge { path: PathBuf, len: u64 },
    #[error("{path}: splice into a pages file needs Compression::None")]
    SpliceNeedsRaw { path: PathBuf },
    #[error("{path}: pipe closed after {done} of {len} bytes were spliced")]
    PipeClosed { path: PathBuf, done: u64, len: u64 },
    #[error("{path}: the page writer was closed by an earlier error")]
    WriterClosed { path: PathBuf },
    #[error("{path}: a page compression worker panicked")]
    WorkerPanicked { path: PathBuf },
    #[error("{path}: compression of chunk {chunk} failed: {source}")]
    ChunkCompress {
        path: PathBuf,
        chunk: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: chunk {chunk}: no such chunk (file has {count})")]
    NoSuchChunk {
        path: PathBuf,
        chunk: usize,
        count: usize,
    },
    #[error("{path}: chunk {chunk}: has no pages")]
    ChunkEmpty { path: PathBuf, chunk: usize },
    #[error("{path}: chunk {chunk}: bytes {offset}..{end} lie outside the file ({file_size} bytes; truncated?)")]
    ChunkOutOfFile {
        path: PathBuf,
        chunk: usize,
        offset: u64,
        end: u64,
        file_size: u64,
    },
    #[error("{path}: chunk {chunk}: offset {offset} overlaps or precedes the previous chunk (which ends at {prev_end})")]
    ChunkOverlap {
        path: PathBuf,
        chunk: usize,
        offset: u64,
        prev_end: u64,
    },
    #[error("{path}: chunk {chunk}: raw chunk stores {stored_len} bytes for {nr_pages} pages")]
    ChunkBadLength {
        path: PathBuf,
        chunk: usize,
        stored_len: u64,
        nr_pages: u64,
    },
    #[error("{path}: chunk {chunk}: output buffer is {found} bytes, chunk holds {expected}")]
    ChunkBufferSize {
        path: PathBuf,
        chunk: usize,
        expected: u64,
        found: u64,
    },
    #[error("{path}: chunk {chunk}: decompression failed: {source}")]
    ChunkDecompress {
        path: PathBuf,
        chunk: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: chunk {chunk}: decompressed to {found} bytes, expected {expected}")]
    ChunkTruncated {
        path: PathBuf,
        chunk: usize,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path}: chunk {chunk}: checksum mismatch (expected {expected:#018x}, found {found:#018x})"
    )]
    ChunkChecksum {
        path: PathBuf,
        chunk: usize,
        expected: u64,
        found: u64,
    },
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
