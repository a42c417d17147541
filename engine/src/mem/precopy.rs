//! Pre-copy for dumps that stop the tasks (`dump --pre-copy`): the private
//! anonymous memory of each process is copied, and compressed into its
//! pages file, while it still runs. Asynchronous userfaultfd
//! write-protection tells which pages it writes afterwards (the kernel
//! lets each write through and only marks the page, so the task never
//! waits on cryo). Rounds copy again what was written since the previous
//! one while that shrinks; then the dump stops the tree as usual, and of
//! the tracked memory it captures only the pages written since the last
//! round: a chunk written before the stop is kept if none of its pages
//! changed since it was made. The tasks are stopped for the last dirty
//! pages and their state instead of all of their memory.
//!
//! Chunks that a later copy replaced stay in the pages file, unused (the
//! pagemap lists only the chunks in use, in page order, wherever they lie
//! in the file). If cryo dies, the kernel drops the tracking with the
//! descriptor and the tasks run on unaffected.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use cryo_image::proto::{PageChunk, PagemapEntry, Vma};
use cryo_image::{ImageError, PageWriter};
use nix::unistd::Pid;

use super::merge::is_zero;
use super::transfer::TransferStats;
use super::{Run, PAGE};
use crate::infect::guard::Guard;
use crate::infect::{InfectError, Victim};
use crate::sys::{self, uffd, ScanQuery, SysError};

#[derive(Debug, thiserror::Error)]
pub enum PreCopyError {
    #[error(transparent)]
    Infect(#[from] InfectError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("pre-copy of task {pid}: {what}")]
    Other { pid: i32, what: String },
}

type Result<T> = std::result::Result<T, PreCopyError>;

/// PAGEMAP_SCAN: write-protect the pages that match, in the same walk.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Pages per read from the task and most pages per chunk.
const READ_PAGES: u64 = 256;

/// The parts of [start, end) whose pages are mapped by this process only
/// (pagemap bit 56), as ranges.
fn exclusive(pagemap: &std::fs::File, start: u64, end: u64) -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut words = vec![0u8; 8 * 512];
    let mut at = start;
    while at < end {
        let n = ((end - at) / PAGE).min(512) as usize;
        let buf = &mut words[..8 * n];
        if pagemap.read_exact_at(buf, at / PAGE * 8).is_err() {
            return out;
        }
        for (i, w) in buf.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            if word & PM_MMAP_EXCLUSIVE == 0 {
                continue;
            }
            let p = at + i as u64 * PAGE;
            match out.last_mut() {
                Some(last) if last.1 == p => last.1 = p + PAGE,
                _ => out.push((p, p + PAGE)),
            }
        }
        at += n as u64 * PAGE;
    }
    out
}

/// A chunk written before the stop: its first page, its page count and
/// the round that copied it.
#[derive(Debug, Clone, Copy)]
pub struct PreChunk {
    start: u64,
    pages: u64,
    round: u32,
}

/// One process being pre-copied.
pub struct PreCopy {
    pid: Pid,
    /// Keeps the tracking alive; closing it ends it.
    uffd: Option<OwnedFd>,
    /// The registered mappings.
    ranges: Vec<(u64, u64)>,
    pw: Option<PageWriter>,
    /// Every chunk submitted, in submission order.
    chunks: Vec<PreChunk>,
    /// Pages found holding zeros, and the round that found them.
    zero: HashMap<u64, u32>,
    /// The last round that saw each page written (rounds from 1; the
    /// stop counts as one more).
    written: HashMap<u64, u32>,
    rounds: u32,
}

/// What the stop keeps from a pre-copy, for [`PreCopy::order`].
pub struct Kept {
    /// How many chunks the pages file holds before those of the stop.
    pre_chunks: usize,
    /// The chunks kept, by submission index, with their pages.
    valid: Vec<(usize, PreChunk)>,
    pub stats: TransferStats,
}

impl PreCopy {
    /// Start tracking process `pid` (running): stop it just long enough
    /// to make a userfaultfd inside it, register its private anonymous
    /// memory for asynchronous write-protection, let it go. None when
    /// there is nothing to track or the kernel or the task cannot (an
    /// error only when the task could not be let go as it was).
    pub fn start(
        pid: i32,
        guard: &Guard,
        store: &super::store::StoreOptions,
    ) -> Result<Option<PreCopy>> {
        let npid = Pid::from_raw(pid);
        let mut v = match Victim::seize(npid) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(pid, "no pre-copy: {e}");
                return Ok(None);
            }
        };
        let made = (|| -> std::result::Result<OwnedFd, InfectError> {
            v.set_notifier(guard.notifier());
            let site = v.injection_site()?;
            guard.arm_state(v.pid, v.regs(), v.xstate(), v.sigmask(), site);
            v.userfaultfd(true)
        })();
        let cured = v.cure();
        guard.release(npid);
        cured?;
        let uffd = match made {
            Ok(fd) => fd,
            // The task is as it was: the dump goes on without a pre-copy
            // of it (and the seize finds out what is wrong, if anything).
            Err(e) => {
                tracing::info!(pid, "no pre-copy: {e}");
                return Ok(None);
            }
        };
        if let Err(e) = uffd::api(&uffd, npid, uffd::FEATURE_WP_ASYNC) {
            tracing::info!(pid, "{e}: no pre-copy");
            return Ok(None);
        }
        Self::tracking(pid, uffd, store, 0)
    }

    /// Go on tracking process `pid` with `uffd`, the tracking an earlier
    /// command started (a pre-dump's, from its holder), into a new pages
    /// file: its rounds copy only what was written since that command's
    /// last one. Mappings made since are registered now (they read as
    /// written all over); those another userfaultfd holds are left out.
    pub fn resume(
        pid: i32,
        uffd: OwnedFd,
        store: &super::store::StoreOptions,
    ) -> Result<Option<PreCopy>> {
        Self::tracking(pid, uffd, store, 1)
    }

    /// Track process `pid` with `uffd` (its API done): its trackable
    /// mappings registered (those another userfaultfd holds left out),
    /// into a new pages file; `rounds` done already (0: the first copies
    /// every page). None when nothing could be registered.
    fn tracking(
        pid: i32,
        uffd: OwnedFd,
        store: &super::store::StoreOptions,
        rounds: u32,
    ) -> Result<Option<PreCopy>> {
        let npid = Pid::from_raw(pid);
        let vmas = super::read_layout(npid).map_err(|e| PreCopyError::Other {
            pid,
            what: e.to_string(),
        })?;
        let ranges: Vec<(u64, u64)> = vmas
            .iter()
            .filter(|v| super::trackable(v))
            .filter(|v| uffd::register_wp(&uffd, npid, v.start, v.end - v.start).is_ok())
            .map(|v| (v.start, v.end))
            .collect();
        if ranges.is_empty() {
            return Ok(None);
        }
        let pw = PageWriter::create(
            &store.dir,
            &cryo_image::pages_file(pid as u32),
            store.compression,
            store.zstd_level,
            store.threads,
        )?;
        Ok(Some(PreCopy {
            pid: npid,
            uffd: Some(uffd),
            ranges,
            pw: Some(pw),
            chunks: Vec::new(),
            zero: HashMap::new(),
            written: HashMap::new(),
            rounds,
        }))
    }

    /// The userfaultfd, taken: the tracking goes on while it is open.
    pub fn take_uffd(&mut self) -> Option<OwnedFd> {
        self.uffd.take()
    }

    /// The pages the last round saw written (none after a first round).
    pub fn written_last(&self) -> Vec<u64> {
        let last = self.rounds.saturating_sub(1);
        self.written
            .iter()
            .filter(|&(_, &r)| r == last)
            .map(|(&p, _)| p)
            .collect()
    }

    /// The runs of the chunks copied so far, in submission order (one
    /// round copies in address order).
    pub fn copied_runs(&self) -> Vec<PagemapEntry> {
        self.chunks
            .iter()
            .map(|c| PagemapEntry {
                vaddr: c.start,
                nr_pages: c.pages as u32,
                flags: 0,
            })
            .collect()
    }

    fn pagemap(&self) -> Result<std::fs::File> {
        std::fs::File::open(format!("/proc/{}/pagemap", self.pid)).map_err(|e| {
            PreCopyError::Other {
                pid: self.pid.as_raw(),
                what: format!("opening its pagemap: {e}"),
            }
        })
    }

    /// One round: write-protect and list the pages written since the last
    /// round (every page on the first), then copy them into new chunks.
    /// Returns how many pages it copied.
    pub fn round(&mut self) -> Result<u64> {
        let pid = self.pid;
        let pagemap = self.pagemap()?;
        let first = self.rounds == 0;
        let q = ScanQuery {
            flags: PM_SCAN_WP_MATCHING,
            mask: if first {
                sys::PAGE_IS_WPALLOWED
            } else {
                sys::PAGE_IS_WRITTEN
            },
            ret: sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED | sys::PAGE_IS_PFNZERO,
            ..Default::default()
        };
        let round = self.rounds;
        let mut copied = 0;
        for (s, e) in self.ranges.clone() {
            for (rs, re, cat) in sys::pagemap_scan(&pagemap, pid, s, e, &q)? {
                let (rs, re) = (rs.max(s), re.min(e));
                if !first {
                    for p in (rs..re).step_by(PAGE as usize) {
                        self.written.insert(p, round);
                    }
                }
                if cat & sys::PAGE_IS_PRESENT == 0 || cat & sys::PAGE_IS_PFNZERO != 0 {
                    continue;
                }
                // Only pages this process alone maps: one it still shares
                // copy-on-write with its parent is stored as the parent's
                // at the stop, and a copy here would be wasted.
                for (xs, xe) in exclusive(&pagemap, rs, re) {
                    let mut at = xs;
                    while at < xe {
                        let n = ((xe - at) / PAGE).min(READ_PAGES);
                        copied += self.copy(at, n, round)?;
                        at += n * PAGE;
                    }
                }
            }
        }
        // The copies compressed and written before the next round (and
        // the stop, which must not wait on them).
        if let Some(pw) = &self.pw {
            pw.wait_written();
        }
        self.rounds += 1;
        tracing::debug!(pid = pid.as_raw(), round, copied, "pre-copy round");
        Ok(copied)
    }

    /// Read the pages at `at` from the task and submit the runs of them
    /// that are not all zeros as chunks (pages the task unmapped meanwhile
    /// are left out: they get no chunk).
    fn copy(&mut self, at: u64, pages: u64, round: u32) -> Result<u64> {
        let Some(pw) = self.pw.as_mut() else {
            return Ok(0);
        };
        // Read into a buffer of the writer: a batch without zero pages (the
        // common case) is submitted as it is, without another copy.
        let mut buf = pw.take_buffer();
        buf.resize((pages * PAGE) as usize, 0);
        let n = {
            let len = buf.len();
            let mut iov = [std::io::IoSliceMut::new(&mut buf[..])];
            let remote = [nix::sys::uio::RemoteIoVec {
                base: at as usize,
                len,
            }];
            match nix::sys::uio::process_vm_readv(self.pid, &mut iov, &remote) {
                Ok(n) => n / PAGE as usize,
                Err(_) => 0,
            }
        };
        let zero = |i: usize| is_zero(&buf[i * PAGE as usize..(i + 1) * PAGE as usize]);
        let mut i = 0;
        while i < n {
            if zero(i) {
                self.zero.insert(at + i as u64 * PAGE, round);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && !zero(j) {
                j += 1;
            }
            self.chunks.push(PreChunk {
                start: at + i as u64 * PAGE,
                pages: (j - i) as u64,
                round,
            });
            if i == 0 && j == buf.len() / PAGE as usize {
                pw.submit(std::mem::take(&mut buf))?;
                break;
            }
            let mut data = pw.take_buffer();
            data.extend_from_slice(&buf[i * PAGE as usize..j * PAGE as usize]);
            pw.submit(data)?;
            i = j;
        }
        Ok(n as u64)
    }

    /// Drop a pre-copy the dump has no use for, with its pages file.
    pub fn discard(mut self, dir: &Path) {
        drop(self.pw.take());
        let _ = std::fs::remove_file(dir.join(cryo_image::pages_file(self.pid.as_raw() as u32)));
    }

    /// With the task stopped: take out of `runs` (the pages to store, in
    /// order) those a chunk or a zero page of the pre-copy still holds,
    /// and end the tracking. Returns what is kept and the addresses a
    /// chunk of the stop must not span (the edges of the kept chunks).
    pub fn keep(&mut self, vmas: &[Vma], runs: &mut Vec<Run>) -> Result<(Kept, Vec<u64>)> {
        let pid = self.pid;
        let pagemap = self.pagemap()?;
        let stop = self.rounds;
        // The mappings still tracked, and what was written in them since
        // the last round.
        let mut tracked: Vec<(u64, u64)> = Vec::new();
        for v in vmas.iter().filter(|v| super::trackable(v)) {
            if !self.ranges.iter().any(|&(s, e)| s < v.end && v.start < e) {
                continue;
            }
            // One walk: a mapping made anew or moved is not
            // write-protect-allowed; in a tracked one, the pages written
            // since the last round.
            let q = ScanQuery {
                anyof: sys::PAGE_IS_WPALLOWED | sys::PAGE_IS_WRITTEN,
                ret: sys::PAGE_IS_WPALLOWED | sys::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            let regions = sys::pagemap_scan(&pagemap, pid, v.start, v.end, &q)?;
            if regions
                .iter()
                .any(|&(_, _, cat)| cat & sys::PAGE_IS_WPALLOWED == 0)
            {
                continue;
            }
            for (s, e, cat) in regions {
                if cat & sys::PAGE_IS_WRITTEN == 0 {
                    continue;
                }
                for p in (s.max(v.start)..e.min(v.end)).step_by(PAGE as usize) {
                    self.written.insert(p, stop);
                }
            }
            tracked.push((v.start, v.end));
        }
        // The tracking is over.
        self.uffd = None;
        let in_runs = |p: u64| {
            let i = runs.partition_point(|r| r.start + r.pages * PAGE <= p);
            runs.get(i).is_some_and(|r| r.start <= p)
        };
        // The whole of [start, end) in one run.
        let within_run = |start: u64, end: u64| {
            let i = runs.partition_point(|r| r.start + r.pages * PAGE <= start);
            runs.get(i)
                .is_some_and(|r| r.start <= start && end <= r.start + r.pages * PAGE)
        };
        let vma_of = |p: u64| tracked.iter().position(|&(s, e)| s <= p && p < e);
        let mut written: Vec<(u64, u32)> = self.written.iter().map(|(&p, &r)| (p, r)).collect();
        written.sort_unstable();
        // No page of [start, end) written after `round`.
        let unchanged = |start: u64, end: u64, round: u32| {
            let i = written.partition_point(|&(p, _)| p < start);
            written[i..]
                .iter()
                .take_while(|&&(p, _)| p < end)
                .all(|&(_, w)| w <= round)
        };
        let mut valid: Vec<(usize, PreChunk)> = self
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                let end = c.start + c.pages * PAGE;
                // Inside one mapping still tracked (an entry never spans
                // two mappings), unchanged, all its pages to be stored.
                vma_of(c.start).is_some()
                    && vma_of(c.start) == vma_of(end - PAGE)
                    && unchanged(c.start, end, c.round)
                    && within_run(c.start, end)
            })
            .map(|(i, c)| (i, *c))
            .collect();
        valid.sort_by_key(|(_, c)| c.start);
        let mut zeros: Vec<u64> = self
            .zero
            .iter()
            .filter(|&(&p, &round)| {
                unchanged(p, p + PAGE, round) && vma_of(p).is_some() && in_runs(p)
            })
            .map(|(&p, _)| p)
            .collect();
        zeros.sort_unstable();
        // What is left to capture now (runs, chunks and zeros are sorted:
        // one walk).
        let mut kept_at = valid.iter().map(|(_, c)| (c.start, c.pages)).peekable();
        let mut zi = 0;
        let mut is_zero = |p: u64| {
            while zi < zeros.len() && zeros[zi] < p {
                zi += 1;
            }
            zeros.get(zi) == Some(&p)
        };
        let mut now = Vec::with_capacity(runs.len());
        let mut kept_pages = 0;
        for r in runs.iter() {
            let mut p = r.start;
            let end = r.start + r.pages * PAGE;
            while p < end {
                while kept_at.peek().is_some_and(|&(s, n)| s + n * PAGE <= p) {
                    kept_at.next();
                }
                if let Some(&(s, n)) = kept_at.peek() {
                    if s <= p {
                        kept_pages += (s + n * PAGE).min(end) - p;
                        p = (s + n * PAGE).min(end);
                        continue;
                    }
                }
                if is_zero(p) {
                    p += PAGE;
                    continue;
                }
                // A piece to capture: up to the next kept chunk or zero.
                let limit = kept_at.peek().map_or(end, |&(s, _)| s.min(end));
                let mut q = p + PAGE;
                while q < limit && !is_zero(q) {
                    q += PAGE;
                }
                now.push(Run {
                    start: p,
                    pages: (q - p) / PAGE,
                    zero_ok: r.zero_ok,
                });
                p = q;
            }
        }
        *runs = now;
        let kept_pages = kept_pages / PAGE;
        let zero_pages = zeros.len() as u64;
        let breaks = valid
            .iter()
            .flat_map(|(_, c)| [c.start, c.start + c.pages * PAGE])
            .collect();
        let kept = Kept {
            pre_chunks: self.chunks.len(),
            valid,
            stats: TransferStats {
                pages_scanned: kept_pages + zero_pages,
                pages_stored: kept_pages,
                zero_pages,
                pages_precopied: kept_pages,
                ..Default::default()
            },
        };
        Ok((kept, breaks))
    }

    /// The pages file writer (the stop's chunks go after the pre-copy's).
    pub fn writer(&mut self) -> Option<PageWriter> {
        self.pw.take()
    }
}

impl Kept {
    /// The pagemap of a process whose stop captured `entries` (in address
    /// order, into chunks that follow the pre-copy's in `chunks`, the
    /// chunks of the whole file in submission order): the kept chunks'
    /// runs added, and the chunks in use in page order.
    pub fn order(
        &self,
        pid: i32,
        entries: Vec<PagemapEntry>,
        chunks: Vec<PageChunk>,
    ) -> std::result::Result<(Vec<PagemapEntry>, Vec<PageChunk>), PreCopyError> {
        let bad = |what: &str| PreCopyError::Other {
            pid,
            what: what.to_string(),
        };
        if chunks.len() < self.pre_chunks {
            return Err(bad("the pages file lost chunks of the pre-copy"));
        }
        let mut fresh = chunks[self.pre_chunks..].iter().copied();
        let mut all: Vec<(PagemapEntry, Option<usize>)> =
            entries.into_iter().map(|e| (e, None)).collect();
        all.extend(self.valid.iter().map(|&(i, c)| {
            (
                PagemapEntry {
                    vaddr: c.start,
                    nr_pages: c.pages as u32,
                    flags: 0,
                },
                Some(i),
            )
        }));
        all.sort_by_key(|(e, _)| e.vaddr);
        let mut out_entries = Vec::with_capacity(all.len());
        let mut out_chunks = Vec::with_capacity(self.valid.len() + chunks.len() - self.pre_chunks);
        // Pages of the stop's entries not yet matched by its chunks.
        let mut pending = 0u64;
        for (e, pre) in all {
            match pre {
                Some(i) => {
                    // The stop's chunks so far must end exactly here.
                    while pending > 0 {
                        let c = fresh
                            .next()
                            .ok_or_else(|| bad("fewer chunks than pages captured at the stop"))?;
                        if u64::from(c.nr_pages) > pending {
                            return Err(bad("a chunk of the stop spans a pre-copied one"));
                        }
                        pending -= u64::from(c.nr_pages);
                        out_chunks.push(c);
                    }
                    out_chunks.push(chunks[i]);
                }
                None if !cryo_image::stored_elsewhere(e.flags) => {
                    pending += u64::from(e.nr_pages);
                }
                None => {}
            }
            out_entries.push(e);
        }
        while pending > 0 {
            let c = fresh
                .next()
                .ok_or_else(|| bad("fewer chunks than pages captured at the stop"))?;
            pending = pending
                .checked_sub(u64::from(c.nr_pages))
                .ok_or_else(|| bad("more pages in the chunks than captured at the stop"))?;
            out_chunks.push(c);
        }
        if fresh.next().is_some() {
            return Err(bad("more chunks than pages captured at the stop"));
        }
        Ok((out_entries, out_chunks))
    }
}
