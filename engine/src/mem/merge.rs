//! The final pages file of a process whose pages come from two places:
//! those captured while it was stopped (a raw scratch pages file, with
//! their entries) and runs read afterwards from elsewhere (the running
//! task under write-protection, or a copy made before the stop). Both are
//! merged in address order, zero pages of the later runs left out.

#![forbid(unsafe_code)]

use cryo_image::proto::PagemapEntry;
use cryo_image::{ImageError, PageReader, PageWriter};

use super::transfer::{push_entry, TransferStats};
use super::{Run, PAGE};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Image(#[from] ImageError),
    /// What the page source said.
    #[error("{0}")]
    Fetch(String),
}

/// A page source: fills a buffer with the pages at an address.
pub type Fetch<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a;

/// Pages per fetch and per chunk of the pages file.
pub const BATCH_PAGES: u64 = 256;

/// Write `out`: the pages of `entries` (in address order; pages kept in a
/// parent have none) from `stopped`, and the pages of `later` (sorted,
/// not overlapping them) from `fetch`, which fills a buffer with the
/// pages at an address, up to [`BATCH_PAGES`] at a time. Returns the merged
/// entries and the figures of the `later` pages.
pub fn merge(
    stopped: &PageReader,
    entries: &[PagemapEntry],
    later: &[Run],
    out: &mut PageWriter,
    fetch: &mut Fetch,
) -> Result<(Vec<PagemapEntry>, TransferStats), MergeError> {
    let mut merged = Vec::with_capacity(entries.len() + later.len());
    let mut stats = TransferStats::default();
    let mut w = ChunkOut {
        buf: out.take_buffer(),
        out,
    };
    let mut cursor = Cursor {
        reader: stopped,
        chunk: usize::MAX,
        next_chunk: 0,
        buf: Vec::new(),
        at: 0,
    };
    let mut buf = vec![0u8; (BATCH_PAGES * PAGE) as usize];
    let mut li = 0;
    for e in entries {
        while li < later.len() && later[li].start < e.vaddr {
            copy_run(&later[li], &mut buf, fetch, &mut merged, &mut stats, &mut w)?;
            li += 1;
        }
        merged.push(*e);
        if !cryo_image::stored_elsewhere(e.flags) {
            for _ in 0..e.nr_pages {
                w.push(cursor.next_page()?)?;
            }
        }
    }
    for r in &later[li..] {
        copy_run(r, &mut buf, fetch, &mut merged, &mut stats, &mut w)?;
    }
    w.flush()?;
    Ok((merged, stats))
}

fn copy_run(
    r: &Run,
    buf: &mut [u8],
    fetch: &mut Fetch,
    merged: &mut Vec<PagemapEntry>,
    stats: &mut TransferStats,
    w: &mut ChunkOut,
) -> Result<(), MergeError> {
    let mut first = true;
    let mut off = 0;
    while off < r.pages {
        let n = (r.pages - off).min(BATCH_PAGES);
        let start = r.start + off * PAGE;
        let len = (n * PAGE) as usize;
        fetch(start, &mut buf[..len]).map_err(MergeError::Fetch)?;
        for i in 0..n as usize {
            let p = &buf[i * PAGE as usize..(i + 1) * PAGE as usize];
            stats.pages_scanned += 1;
            if r.zero_ok && is_zero(p) {
                stats.zero_pages += 1;
                continue;
            }
            push_entry(merged, start + i as u64 * PAGE, 1, !first);
            first = false;
            stats.pages_stored += 1;
            w.push(p)?;
        }
        off += n;
    }
    Ok(())
}

/// Whether a page holds only zeros.
pub(super) fn is_zero(p: &[u8]) -> bool {
    p.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

/// The final pages file, written one chunk of up to [`BATCH_PAGES`] at a
/// time.
struct ChunkOut<'a> {
    buf: Vec<u8>,
    out: &'a mut PageWriter,
}

impl ChunkOut<'_> {
    fn push(&mut self, page: &[u8]) -> Result<(), MergeError> {
        self.buf.extend_from_slice(page);
        if self.buf.len() as u64 >= BATCH_PAGES * PAGE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MergeError> {
        if !self.buf.is_empty() {
            let next = self.out.take_buffer();
            self.out.submit(std::mem::replace(&mut self.buf, next))?;
        }
        Ok(())
    }
}

/// Reads the pages captured while stopped, in order.
struct Cursor<'a> {
    reader: &'a PageReader,
    chunk: usize,
    next_chunk: usize,
    buf: Vec<u8>,
    at: usize,
}

impl Cursor<'_> {
    fn next_page(&mut self) -> Result<&[u8], MergeError> {
        if self.chunk == usize::MAX || self.at >= self.buf.len() {
            let i = self.next_chunk;
            let c = self.reader.chunks().get(i).ok_or_else(|| {
                MergeError::Fetch(format!(
                    "{} holds fewer pages than its entries",
                    self.reader.path().display()
                ))
            })?;
            self.buf.resize(c.nr_pages as usize * PAGE as usize, 0);
            self.reader.read_chunk(i, &mut self.buf)?;
            self.chunk = i;
            self.next_chunk = i + 1;
            self.at = 0;
        }
        let p = &self.buf[self.at..self.at + PAGE as usize];
        self.at += PAGE as usize;
        Ok(p)
    }
}
