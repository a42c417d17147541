//! The page store: raw page contents, outside protobuf.
//!
//! A pages file is an 8-byte header (`b"CRYO"` + `b"PAGE"`) padded with
//! zeros to 4096 bytes, then chunks. A chunk holds whole pages, stored raw
//! (offsets stay page aligned, so raw pages can be mapped straight from the
//! file) or as one independent zstd frame. Chunks are described by
//! `proto::PageChunk` records kept in the pagemap file.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{bounded, Receiver, Sender};
use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::ImageError;
use crate::framing::{create_file, open_file, ImageFileInfo, FORMAT_MAGIC};
use crate::proto::{Compression, PageChunk};
use crate::stride;
use crate::PAGE_SIZE;

mod read;
mod write;

pub use read::*;
pub use write::*;

/// Size of the pages file header (magic + zero padding).
pub const PAGES_HEADER_LEN: u64 = 4096;
/// Capacity of the buffers handed out by [`PageWriter::take_buffer`].
pub const PAGE_BUFFER_CAPACITY: usize = 1 << 20;
/// Largest chunk accepted by [`PageWriter::submit`] (stored_len is a u32).
pub const MAX_CHUNK_LEN: usize = 1 << 30;

const READBACK_LEN: usize = 1 << 20;
const POOL_LEN: usize = 8;

fn pages_header() -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&FORMAT_MAGIC);
    h[4..].copy_from_slice(b"PAGE");
    h
}

fn check_len(path: &Path, len: usize) -> Result<u32, ImageError> {
    // Not is_multiple_of(): the workspace MSRV (1.85) predates it.
    #[allow(clippy::manual_is_multiple_of)]
    let unaligned = len % PAGE_SIZE != 0;
    if len == 0 || unaligned {
        return Err(ImageError::BadPageData {
            path: path.to_path_buf(),
            len: len as u64,
        });
    }
    if len > MAX_CHUNK_LEN {
        return Err(ImageError::ChunkTooLarge {
            path: path.to_path_buf(),
            len: len as u64,
        });
    }
    // MAX_CHUNK_LEN / PAGE_SIZE fits in u32.
    Ok((len / PAGE_SIZE) as u32)
}
