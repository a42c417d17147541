//! The memory files of one process: `pages-<pid>.img` and
//! `pagemap-<pid>.img`, finished once the process is captured.
//!
//! Pages captured raw into a scratch file while the task was stopped
//! (leave-running dumps) are compressed into the real pages file now, and
//! merged with the pages a leave-running snapshot reads from the running
//! task; a pre-copied process's chunks are put in page order. The
//! pagemap lists the runs of stored pages, then the chunks.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use cryo_image::proto::{self, Compression, PageChunk, PagemapEntry, PagemapHead, PagemapRecord};
use cryo_image::{ImageError, ImageFileInfo, ImageWriter, Kind, PageReader, PageWriter};

use super::precopy::{Kept, PreCopyError};
use super::snapshot::{Snapshot, SnapshotError};
use super::transfer::TransferStats;
use super::PAGE;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    PreCopy(#[from] PreCopyError),
    #[error("removing {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// How pages files are written.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub dir: PathBuf,
    pub compression: Compression,
    pub zstd_level: i32,
    pub threads: usize,
}

impl StoreOptions {
    /// A new pages file `name` in the image directory (`raw`: stored
    /// uncompressed whatever the options say).
    pub fn writer(&self, name: &str, raw: bool) -> Result<PageWriter> {
        let compression = if raw {
            Compression::None
        } else {
            self.compression
        };
        Ok(PageWriter::create(
            &self.dir,
            name,
            compression,
            self.zstd_level,
            self.threads,
        )?)
    }
}

/// The pages of one captured process, on their way to the image.
pub struct Pages {
    pub pid: i32,
    pub pw: PageWriter,
    /// Pages went raw into this scratch file, to compress afterwards.
    pub scratch: Option<String>,
    /// --leave-running: private anonymous memory write-protected, to be
    /// copied from the running task now.
    pub snapshot: Option<Snapshot>,
    /// --pre-copy: the chunks written before the stop that are kept.
    pub kept: Option<Kept>,
    pub runs: Vec<PagemapEntry>,
    pub stats: TransferStats,
}

/// Finish the pages file of `p` and write its pagemap; returns the two
/// files and the page counts.
pub fn finish(o: &StoreOptions, mut p: Pages) -> Result<(Vec<ImageFileInfo>, TransferStats)> {
    let pid = p.pid;
    let pages_name = cryo_image::pages_file(pid as u32);
    let mut pw = p.pw;
    if let Some(scratch) = &p.scratch {
        let (scratch_chunks, _) = pw.finish()?;
        let reader = PageReader::open(&o.dir, scratch, Compression::None, scratch_chunks)?;
        let mut out = o.writer(&pages_name, false)?;
        match &p.snapshot {
            // The pages captured while stopped and the tracked ones, read
            // from the running task now, in address order.
            Some(snap) => {
                let (runs, stats) = snap.copy(&reader, &p.runs, &mut out)?;
                p.runs = runs;
                p.stats.add(&stats);
            }
            None => recompress(&reader, &mut out)?,
        }
        drop(reader);
        remove(&o.dir, scratch)?;
        pw = out;
    }
    // The task's memory is copied: stop tracking it.
    drop(p.snapshot.take());
    let (mut chunks, pages_info) = pw.finish()?;
    if let Some(k) = &p.kept {
        let (runs, used) = k.order(pid, std::mem::take(&mut p.runs), chunks)?;
        p.runs = runs;
        chunks = used;
    }
    let pagemap = write_pagemap(o, pid, &p.runs, chunks, p.stats.pages_stored)?;
    Ok((vec![pages_info, pagemap], p.stats))
}

/// Compress every chunk of the raw scratch file into `out`.
fn recompress(reader: &PageReader, out: &mut PageWriter) -> Result<()> {
    for i in 0..reader.chunks().len() {
        let mut buf = out.take_buffer();
        buf.resize(reader.chunks()[i].nr_pages as usize * PAGE as usize, 0);
        reader.read_chunk(i, &mut buf)?;
        out.submit(buf)?;
    }
    Ok(())
}

fn remove(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::remove_file(&path).map_err(|source| StoreError::Remove { path, source })
}

pub fn write_pagemap(
    o: &StoreOptions,
    pid: i32,
    runs: &[PagemapEntry],
    chunks: Vec<PageChunk>,
    total_pages: u64,
) -> Result<ImageFileInfo> {
    let mut w = ImageWriter::create(&o.dir, &cryo_image::pagemap_file(pid as u32), Kind::Pagemap)?;
    w.write(&PagemapHead {
        pages_file: cryo_image::pages_file(pid as u32),
        compression: o.compression as i32,
        total_pages,
    })?;
    for e in runs {
        w.write(&PagemapRecord {
            record: Some(proto::pagemap_record::Record::Run(*e)),
        })?;
    }
    for ch in chunks {
        w.write(&PagemapRecord {
            record: Some(proto::pagemap_record::Record::Chunk(ch)),
        })?;
    }
    Ok(w.finish()?)
}
