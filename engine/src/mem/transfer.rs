//! Page transfer: the parasite vmsplices the task's pages into pipes and
//! cryo drains them into the pages file, splicing straight into it when
//! the image is raw, or reading them once to drop zero pages and hand them
//! to the zstd workers. Two pipes alternate so the parasite fills one
//! while cryo drains the other.

#![forbid(unsafe_code)]

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use cryo_image::proto::PagemapEntry;
use cryo_image::{ImageError, PageWriter};
use cryo_parasite::{Iov, IOV_SKIP_ZERO, MAX_BATCH_PAGES, MAX_IOVS};
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::{Run, PAGE};
use crate::infect::{InfectError, Victim};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Infect(#[from] InfectError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("page pipe for task {pid}: {errno}")]
    Pipe { pid: i32, errno: nix::errno::Errno },
    #[error("draining pages of task {pid}: {source}")]
    Drain {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("parasite in task {pid} spliced {got} bytes, expected {want}")]
    Short { pid: i32, got: u64, want: u64 },
}

/// Part of a run that went into one batch; `cont` when it continues the
/// same run as the previous piece.
struct Piece {
    start: u64,
    pages: u64,
    cont: bool,
}

/// Pipes in flight between the parasite and cryo.
const PIPES: usize = 2;

/// One batch: iovecs for the parasite and the run pieces they came from.
#[derive(Default)]
struct Batch {
    iovs: Vec<Iov>,
    runs: Vec<Piece>,
    bytes: u64,
}

/// Batches of at most `max_bytes`; none holds pages on both sides of an
/// address of `breaks` (sorted).
fn batches(runs: &[Run], max_bytes: u64, breaks: &[u64]) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut cur = Batch::default();
    let mut prev_end = 0u64;
    for r in runs {
        let mut start = r.start;
        let mut left = r.pages;
        // A break between the batch so far and this run: a new batch.
        let i = breaks.partition_point(|&b| b < prev_end);
        if cur.bytes > 0 && breaks.get(i).is_some_and(|&b| b <= r.start) {
            out.push(std::mem::take(&mut cur));
        }
        prev_end = r.start + r.pages * PAGE;
        while left > 0 {
            let room = (max_bytes - cur.bytes) / PAGE;
            let n = left.min(room);
            cur.iovs.push(Iov {
                base: start,
                len: (n * PAGE) | if r.zero_ok { IOV_SKIP_ZERO } else { 0 },
            });
            cur.runs.push(Piece {
                start,
                pages: n,
                cont: start != r.start,
            });
            cur.bytes += n * PAGE;
            start += n * PAGE;
            left -= n;
            if cur.bytes >= max_bytes || cur.iovs.len() >= MAX_IOVS {
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    if cur.bytes > 0 {
        out.push(cur);
    }
    out
}

/// Appends page runs to `out`, merging with the previous one when adjacent.
/// `join` says whether the pages come from the same mapping as the
/// previous ones (runs never span two mappings).
pub(super) fn push_entry(out: &mut Vec<PagemapEntry>, vaddr: u64, pages: u64, join: bool) {
    if let (true, Some(last)) = (join, out.last_mut()) {
        if last.vaddr + last.nr_pages as u64 * PAGE == vaddr
            && (last.nr_pages as u64 + pages) <= u32::MAX as u64
        {
            last.nr_pages += pages as u32;
            return;
        }
    }
    out.push(PagemapEntry {
        vaddr,
        nr_pages: pages as u32,
        flags: 0,
    });
}

/// Statistics of one transfer.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransferStats {
    pub pages_scanned: u64,
    pub pages_stored: u64,
    pub zero_pages: u64,
    /// Pages read from the task after it ran again (--leave-running with
    /// write-protection), stored or zero.
    pub pages_copied_running: u64,
    /// Pages the fault handler saved before letting a write through.
    pub pages_saved_on_write: u64,
    /// Pages kept from the copy made before the stop (--pre-copy).
    pub pages_precopied: u64,
    /// Pages left to the parent image (an incremental dump).
    pub pages_in_parent_image: u64,
}

impl TransferStats {
    /// Add another process's figures.
    pub fn add(&mut self, o: &TransferStats) {
        self.pages_scanned += o.pages_scanned;
        self.pages_stored += o.pages_stored;
        self.zero_pages += o.zero_pages;
        self.pages_copied_running += o.pages_copied_running;
        self.pages_saved_on_write += o.pages_saved_on_write;
        self.pages_precopied += o.pages_precopied;
        self.pages_in_parent_image += o.pages_in_parent_image;
    }
}

/// Move the pages of `runs` from the task into `writer`; returns the
/// pagemap entries describing what was stored, in order. No chunk holds
/// pages on both sides of an address of `breaks` (sorted).
pub fn transfer(
    victim: &mut Victim,
    runs: &[Run],
    breaks: &[u64],
    writer: &mut PageWriter,
    raw: bool,
    progress: &dyn Fn(u64),
) -> Result<(Vec<PagemapEntry>, TransferStats), TransferError> {
    let pid = victim.pid.as_raw();
    let pipe_err = |errno| TransferError::Pipe { pid, errno };
    let mut pipes: Vec<(OwnedFd, OwnedFd)> = Vec::new();
    let mut cap = u64::MAX;
    for _ in 0..PIPES {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(pipe_err)?;
        // 1 MiB is fs.pipe-max-size by default; take what we get.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(1 << 20));
        let size = fcntl(&w, FcntlArg::F_GETPIPE_SZ).map_err(pipe_err)? as u64;
        cap = cap.min(size);
        pipes.push((r, w));
    }
    let write_ends: Vec<i32> = pipes.iter().map(|p| p.1.as_raw_fd()).collect();
    let first = victim.send_fds(&write_ends)?;
    // The parasite holds the write ends now.
    let readers: Vec<OwnedFd> = pipes.into_iter().map(|(r, _w)| r).collect();

    // Keep up to PIPES commands queued: the parasite fills the next pipes
    // while cryo drains this one, and each pipe holds one batch at a time,
    // so a vmsplice never blocks.
    let batches = batches(runs, cap.min((MAX_BATCH_PAGES as u64) * PAGE), breaks);
    let mut entries = Vec::new();
    let mut stats = TransferStats::default();
    let mut done_bytes = 0u64;
    let n = readers.len();
    for (k, b) in batches.iter().enumerate().take(n) {
        victim.splice_pages_start(first + k as u32, &b.iovs)?;
    }
    for (k, b) in batches.iter().enumerate() {
        let (got, skipped) = victim.splice_pages_finish()?;
        let zero: u64 = skipped.iter().map(|w| w.count_ones() as u64).sum();
        let want = b.bytes - zero * PAGE;
        if got != want {
            return Err(TransferError::Short { pid, got, want });
        }
        let out = Drained {
            entries: &mut entries,
            stats: &mut stats,
        };
        drain((pid, &readers[k % n]), b, &skipped, writer, raw, out)?;
        if let Some(next) = batches.get(k + n) {
            victim.splice_pages_start(first + (k % n) as u32, &next.iovs)?;
        }
        done_bytes += b.bytes;
        progress(done_bytes);
    }
    Ok((entries, stats))
}

/// What the batches drained so far stored: their pagemap entries and
/// page counts.
struct Drained<'a> {
    entries: &'a mut Vec<PagemapEntry>,
    stats: &'a mut TransferStats,
}

/// Move one batch from its pipe (of task `pid`) into the pages file. The
/// parasite has left out the zero pages marked in `skipped`; the pipe
/// holds the others in order.
fn drain(
    (pid, pipe): (i32, &OwnedFd),
    b: &Batch,
    skipped: &[u64],
    writer: &mut PageWriter,
    raw: bool,
    out: Drained,
) -> Result<(), TransferError> {
    let Drained { entries, stats } = out;
    stats.pages_scanned += b.bytes / PAGE;
    let mut stored = 0u64;
    let mut page = 0usize;
    for r in &b.runs {
        for i in 0..r.pages {
            if skipped[page / 64] & (1 << (page % 64)) != 0 {
                stats.zero_pages += 1;
            } else {
                push_entry(entries, r.start + i * PAGE, 1, i > 0 || r.cont);
                stored += 1;
            }
            page += 1;
        }
    }
    stats.pages_stored += stored;
    let bytes = (stored * PAGE) as usize;
    if bytes == 0 {
        return Ok(());
    }
    if raw {
        writer.splice_from_pipe(pipe.as_fd(), bytes)?;
        return Ok(());
    }
    let mut buf = writer.take_buffer();
    buf.resize(bytes, 0);
    let mut f = std::fs::File::from(
        pipe.try_clone()
            .map_err(|source| TransferError::Drain { pid, source })?,
    );
    f.read_exact(&mut buf)
        .map_err(|source| TransferError::Drain { pid, source })?;
    writer.submit(buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batching_respects_limits() {
        let runs = [
            Run {
                start: 0x10000,
                pages: 300,
                zero_ok: true,
            },
            Run {
                start: 0x900000,
                pages: 10,
                zero_ok: false,
            },
        ];
        let b = batches(&runs, 256 * PAGE, &[]);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].bytes, 256 * PAGE);
        assert_eq!(b[1].bytes, 54 * PAGE);
        assert_eq!(b[1].runs.len(), 2);
        // A break between the two runs ends the batch there.
        let b = batches(&runs, 512 * PAGE, &[0x800000]);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].bytes, 300 * PAGE);
        let mut e = Vec::new();
        push_entry(&mut e, 0x1000, 1, false);
        push_entry(&mut e, 0x2000, 2, true);
        push_entry(&mut e, 0x8000, 1, true);
        push_entry(&mut e, 0x9000, 1, false);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].nr_pages, 3);
    }
}
