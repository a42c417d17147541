//! Incremental images (`cryo pre-dump`, then `dump --prev-images-dir`),
//! dump and restore side by side. An image may name a parent image (its
//! `parent` link); a run of its pagemap flagged PAGE_IN_PARENT_IMAGE
//! holds pages of the same process at the same addresses that were not
//! written since the parent was made: the parent's pages, or, if the
//! parent refers to its own parent for them, that one's, up the chain.
//!
//! Dump: the tracking the parent's command left (a userfaultfd per
//! process with asynchronous write-protection, kept by a holder, see
//! track) tells which pages were written since; a page not written, in a
//! mapping tracked all along, that the parent holds, is referred to
//! instead of stored. A mapping made since, moved, or registered with
//! another userfaultfd reads as written (stored whole); a process with
//! no tracking left (the holder ended, the process is new) is stored
//! whole.
//!
//! Restore: such pages are read from the chain, each chunk of each image
//! decompressed once, straight into the premapped memory.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use cryo_image::proto::{PageChunk, PagemapEntry, Vma};
use cryo_image::{PageReader, PAGE_IN_PARENT, PAGE_IN_PARENT_IMAGE, PARENT_LINK};
use nix::unistd::Pid;

use super::{Run, PAGE};
use crate::sys::{self, uffd, ScanQuery};

/// Page ranges [start, end), sorted and apart.
pub type Ranges = Vec<(u64, u64)>;

/// Push [s, e) onto sorted `out`, merged with the last if they touch.
fn push(out: &mut Ranges, s: u64, e: u64) {
    match out.last_mut() {
        Some(last) if last.1 >= s => last.1 = last.1.max(e),
        _ => out.push((s, e)),
    }
}

/// The pages in both `a` and `b`.
pub fn intersect(a: &Ranges, b: &Ranges) -> Ranges {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            push(&mut out, s, e);
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The pages of `a` not in `b`.
pub fn subtract(a: &Ranges, b: &Ranges) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut at = s;
        while j < b.len() && b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while at < e {
            match b.get(k) {
                Some(&(bs, be)) if bs < e => {
                    if bs > at {
                        push(&mut out, at, bs);
                    }
                    at = at.max(be);
                    k += 1;
                }
                _ => {
                    push(&mut out, at, e);
                    at = e;
                }
            }
        }
    }
    out
}

/// Sorted, merged ranges of `pages` (addresses).
pub fn of_pages(mut pages: Vec<u64>) -> Ranges {
    pages.sort_unstable();
    let mut out = Vec::new();
    for p in pages {
        push(&mut out, p, p + PAGE);
    }
    out
}

/// Dump side: the pages of process `pid` the parent image in `parent`
/// holds (stored there or in its parent; not those of its parent
/// process). Empty if the process is not in it.
pub fn held(parent: &Path, pid: i32) -> Result<Ranges, String> {
    // Its runs only: its pages may be elsewhere (sent to a page server).
    let Some((runs, _, _)) = crate::restore::image::load_pages_of(parent, pid as u32, false)
        .map_err(|e| format!("the parent image {}: {e}", parent.display()))?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for r in runs.iter().filter(|r| r.flags & PAGE_IN_PARENT == 0) {
        push(&mut out, r.vaddr, r.vaddr + u64::from(r.nr_pages) * PAGE);
    }
    Ok(out)
}

/// Dump side: the pages of the trackable mappings of `vmas` (process
/// `pid`) that `uffd` says were not written since it last protected them.
/// Each mapping is registered with it first: one registered for the first
/// time now reads as written all over, one another userfaultfd holds is
/// left out (not tracked). With `reprotect`, every page of the mappings
/// is write-protected again in the same walk, so that the next increment
/// starts from here.
pub fn unwritten(
    pid: i32,
    uffd: &OwnedFd,
    vmas: &[Vma],
    reprotect: bool,
) -> Result<Ranges, String> {
    let npid = Pid::from_raw(pid);
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| format!("opening its pagemap: {e}"))?;
    let mut out = Vec::new();
    for v in vmas.iter().filter(|v| super::trackable(v)) {
        if uffd::register_wp(uffd, npid, v.start, v.end - v.start).is_err() {
            continue;
        }
        let q = ScanQuery {
            flags: if reprotect { 1 } else { 0 }, // PM_SCAN_WP_MATCHING
            anyof: sys::PAGE_IS_WPALLOWED | sys::PAGE_IS_WRITTEN,
            ret: sys::PAGE_IS_WPALLOWED | sys::PAGE_IS_WRITTEN,
            ..Default::default()
        };
        let regions = sys::pagemap_scan(&pagemap, npid, v.start, v.end, &q)
            .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
        if regions
            .iter()
            .any(|&(_, _, c)| c & sys::PAGE_IS_WPALLOWED == 0)
        {
            continue;
        }
        for (s, e, c) in regions {
            if c & sys::PAGE_IS_WRITTEN == 0 {
                push(&mut out, s.max(v.start), e.min(v.end));
            }
        }
    }
    Ok(out)
}

/// Dump side: the pages of `refs` taken out of `runs` (pages to store, in
/// order), as runs flagged PAGE_IN_PARENT_IMAGE.
pub fn split(runs: &mut Vec<Run>, refs: &Ranges) -> Vec<PagemapEntry> {
    let mut kept = Vec::with_capacity(runs.len());
    let mut out = Vec::new();
    for r in runs.drain(..) {
        let whole = vec![(r.start, r.start + r.pages * PAGE)];
        for (s, e) in intersect(&whole, refs) {
            out.push(PagemapEntry {
                vaddr: s,
                nr_pages: ((e - s) / PAGE) as u32,
                flags: PAGE_IN_PARENT_IMAGE,
            });
        }
        for (s, e) in subtract(&whole, refs) {
            kept.push(Run {
                start: s,
                pages: (e - s) / PAGE,
                zero_ok: r.zero_ok,
            });
        }
    }
    *runs = kept;
    out
}

/// The image directory `depth` parents above `base`.
fn up(base: &Path, depth: u32) -> PathBuf {
    let mut d = base.to_path_buf();
    for _ in 0..depth {
        d.push(PARENT_LINK);
    }
    d
}

/// One process's pages in one image of the chain.
struct Level {
    /// (start, end, first stored page number or None: in the next image).
    index: Vec<(u64, u64, Option<u64>)>,
    chunks: Vec<PageChunk>,
    starts: Vec<u64>,
    reader: PageReader,
}

/// Restore side: the chain of parent images above an image, read as
/// needed, or opened ahead by cryo ([`Chain::preload`]) for tasks that
/// cannot reach the image's path (in a mount namespace of the tree).
pub struct Chain {
    base: PathBuf,
    levels: HashMap<(u32, u32), Option<Level>>,
    /// The chunk decompressed last, by (depth, pid, chunk): a chunk that
    /// straddles two calls of [`Chain::fill`] is decompressed once.
    last: Option<((u32, u32, usize), Vec<u8>)>,
}

/// The longest chain followed.
const MAX_DEPTH: u32 = 4096;

impl Chain {
    /// The chain above the image in `base`.
    pub fn new(base: &Path) -> Chain {
        Chain {
            base: base.to_path_buf(),
            levels: HashMap::new(),
            last: None,
        }
    }

    /// Process `pid`'s pages in the image `depth` parents up.
    fn level(&mut self, depth: u32, pid: u32) -> Result<Option<&Level>, String> {
        if !self.levels.contains_key(&(depth, pid)) {
            let dir = up(&self.base, depth);
            let loaded = crate::restore::image::load_pages_of(&dir, pid, true)
                .map_err(|e| format!("parent image {}: {e}", dir.display()))?;
            let level = loaded.and_then(|(runs, chunks, reader)| {
                let reader = reader?;
                let mut stored = 0u64;
                let index = runs
                    .iter()
                    .filter(|r| r.flags & PAGE_IN_PARENT == 0)
                    .map(|r| {
                        let end = r.vaddr + u64::from(r.nr_pages) * PAGE;
                        if r.flags & PAGE_IN_PARENT_IMAGE != 0 {
                            (r.vaddr, end, None)
                        } else {
                            stored += u64::from(r.nr_pages);
                            (r.vaddr, end, Some(stored - u64::from(r.nr_pages)))
                        }
                    })
                    .collect();
                Some(Level {
                    index,
                    starts: reader.chunk_page_starts().to_vec(),
                    chunks,
                    reader,
                })
            });
            self.levels.insert((depth, pid), level);
        }
        Ok(self.levels.get(&(depth, pid)).and_then(Option::as_ref))
    }

    /// Where page `vaddr` of process `pid` is stored, from the image
    /// `depth` parents up: (depth, chunk, page in chunk).
    fn locate(&mut self, pid: u32, vaddr: u64, depth: u32) -> Result<(u32, usize, usize), String> {
        let mut d = depth;
        loop {
            if d > MAX_DEPTH {
                return Err(format!("a chain of more than {MAX_DEPTH} parent images"));
            }
            // (The level's path is built for a message only.)
            let Some(level) = self.level(d, pid)? else {
                return Err(format!(
                    "process {pid}'s page {vaddr:#x} is in the parent image {}, which does not hold the process",
                    up(&self.base, d).display()
                ));
            };
            let i = level.index.partition_point(|r| r.1 <= vaddr);
            match level.index.get(i) {
                Some(&(s, _, Some(first))) if s <= vaddr => {
                    let n = first + (vaddr - s) / PAGE;
                    let ci = level.starts.partition_point(|&st| st <= n).wrapping_sub(1);
                    let inside = level.chunks.get(ci).is_some_and(|c| {
                        n < level.starts[ci] + u64::from(c.nr_pages)
                    });
                    if !inside {
                        return Err(format!(
                            "{}: page {n} is beyond its chunks",
                            up(&self.base, d).display()
                        ));
                    }
                    return Ok((d, ci, (n - level.starts[ci]) as usize));
                }
                Some(&(s, _, None)) if s <= vaddr => d += 1,
                _ => {
                    return Err(format!(
                        "process {pid}'s page {vaddr:#x} is in the parent image {}, which does not hold it",
                        up(&self.base, d).display()
                    ))
                }
            }
        }
    }

    /// Whether every page of `pages` of process `pid` is found up the
    /// chain (one parent up on).
    pub fn check(&mut self, pid: u32, pages: &[u64]) -> Result<(), String> {
        for &p in pages {
            self.locate(pid, p, 1)?;
        }
        Ok(())
    }

    /// Fill `mem` with pages of process `pid` from the chain from `depth`
    /// parents up: each (address, offset in `mem`) of `pages`.
    pub fn fill(
        &mut self,
        pid: u32,
        depth: u32,
        pages: &[(u64, usize)],
        mem: &mut [u8],
    ) -> Result<(), String> {
        let mut by_chunk: BTreeMap<(u32, usize), Vec<(usize, usize)>> = BTreeMap::new();
        for &(vaddr, dst) in pages {
            let (d, ci, k) = self.locate(pid, vaddr, depth)?;
            by_chunk.entry((d, ci)).or_default().push((k, dst));
        }
        let page = PAGE as usize;
        for ((d, ci), want) in by_chunk {
            let key = (d, pid, ci);
            let buf = match self.last.take() {
                Some((k, buf)) if k == key => buf,
                old => {
                    // The old buffer is reused for the new chunk.
                    let mut buf = old.map(|(_, b)| b).unwrap_or_default();
                    let level = self
                        .level(d, pid)?
                        .ok_or("a parent image went away while it was read")?;
                    buf.resize(level.chunks[ci].nr_pages as usize * page, 0);
                    level
                        .reader
                        .read_chunk(ci, &mut buf)
                        .map_err(|e| e.to_string())?;
                    buf
                }
            };
            let buf = &self.last.insert((key, buf)).1;
            for (k, dst) in want {
                mem.get_mut(dst..dst + page)
                    .ok_or("a page beyond the premapped memory")?
                    .copy_from_slice(&buf[k * page..(k + 1) * page]);
            }
        }
        Ok(())
    }
}

/// The pages of `img` stored in its parent images (PAGE_IN_PARENT_IMAGE).
fn in_parents(img: &crate::restore::image::Image) -> impl Iterator<Item = u64> + '_ {
    img.runs
        .iter()
        .filter(|r| r.flags & PAGE_IN_PARENT_IMAGE != 0)
        .flat_map(|r| (0..u64::from(r.nr_pages)).map(move |k| r.vaddr + k * PAGE))
}

impl Chain {
    /// The chain above the image of `procs`, every level their pages need
    /// opened (by cryo, before any task: the tasks find each page in it
    /// without a path). A page missing from the chain fails here.
    pub fn preload(base: &Path, procs: &[crate::restore::image::Image]) -> Result<Chain, String> {
        let mut chain = Chain::new(base);
        for img in procs {
            let pages: Vec<u64> = in_parents(img).collect();
            chain
                .check(img.pstree.pid, &pages)
                .map_err(|e| format!("{}: {e}", cryo_image::pagemap_file(img.pstree.pid)))?;
        }
        Ok(chain)
    }
}

/// Restore side: the pages of `img` in its parent images, into the
/// premapped memory, from `chain` (preloaded).
pub fn fill_from_chain(
    img: &crate::restore::image::Image,
    chain: &std::cell::RefCell<Chain>,
    premap: &mut super::restore::Premap,
) -> Result<(), String> {
    let pm_name = cryo_image::pagemap_file(img.pstree.pid);
    let mut pages = Vec::new();
    for vaddr in in_parents(img) {
        let dst = premap
            .offset_of(vaddr)
            .ok_or_else(|| format!("{pm_name}: page {vaddr:#x} outside any mapping"))?;
        pages.push((vaddr, dst));
    }
    if pages.is_empty() {
        return Ok(());
    }
    chain
        .borrow_mut()
        .fill(img.pstree.pid, 1, &pages, premap.bytes()?)
        .map_err(|e| format!("{pm_name}: {e}"))
}

/// The dirty tracking an incremental dump took from its parent's holder,
/// by pid, until it ends.
static TRACKERS: std::sync::Mutex<Vec<(i32, OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// Dump side: take the tracking the holder of image `parent` keeps (none:
/// every process is stored whole).
pub fn take_trackers(parent: &Path) {
    let got = super::track::take(parent);
    tracing::debug!(
        processes = got.len(),
        "dirty tracking taken from the parent's holder"
    );
    *TRACKERS.lock().unwrap_or_else(|p| p.into_inner()) = got.into_iter().collect();
}

/// A duplicate of the tracking of process `pid`, if it has one.
pub fn tracker(pid: i32) -> Option<OwnedFd> {
    let t = TRACKERS.lock().unwrap_or_else(|p| p.into_inner());
    t.iter()
        .find(|(p, _)| *p == pid)
        .and_then(|(_, fd)| fd.try_clone().ok())
}

/// At the end of a dump: with `keep` (a tree left running, the image's
/// directory) the tracking goes to a holder for the next increment;
/// otherwise it ends.
pub fn settle_trackers(keep: Option<&Path>) {
    let all = std::mem::take(&mut *TRACKERS.lock().unwrap_or_else(|p| p.into_inner()));
    if let (Some(dir), false) = (keep, all.is_empty()) {
        if let Err(e) = super::track::hold(dir, all, HOLD_LIMIT) {
            tracing::warn!("the dirty tracking ends here ({e}): the next increment stores all");
        }
    }
}

/// How long a holder keeps the tracking of a dump left running.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Dump side, when the tracking was lost (the holder ended, or the
/// process was not tracked): the pages of `candidates` (pages the parent
/// holds, in the runs to store) whose contents in the stopped process
/// `pid` are those the parent image holds, found by comparing them page
/// by page (each of the parent's chunks decompressed once: one that straddles two batches is kept from the first). An error (a parent
/// whose pages are not here, sent to a page server) means none.
pub fn unchanged_by_content(pid: i32, base: &Path, candidates: &Ranges) -> Result<Ranges, String> {
    const BATCH: u64 = 256;
    let page = PAGE as usize;
    let mut chain = Chain::new(base);
    let mut mine = vec![0u8; BATCH as usize * page];
    let mut theirs = vec![0u8; BATCH as usize * page];
    let mut same = Vec::new();
    for &(s, e) in candidates {
        let mut at = s;
        while at < e {
            let n = ((e - at) / PAGE).min(BATCH) as usize;
            let len = n * page;
            let got = {
                let mut iov = [std::io::IoSliceMut::new(&mut mine[..len])];
                let remote = [nix::sys::uio::RemoteIoVec {
                    base: at as usize,
                    len,
                }];
                nix::sys::uio::process_vm_readv(Pid::from_raw(pid), &mut iov, &remote)
                    .map_err(|e| format!("reading its memory at {at:#x}: {e}"))?
            };
            if got != len {
                return Err(format!("read {got} of {len} bytes at {at:#x}"));
            }
            let pages: Vec<(u64, usize)> =
                (0..n).map(|k| (at + (k * page) as u64, k * page)).collect();
            chain.fill(pid as u32, 1, &pages, &mut theirs[..len])?;
            for k in 0..n {
                let r = k * page..(k + 1) * page;
                if mine[r.clone()] == theirs[r] {
                    let p = at + (k * page) as u64;
                    push(&mut same, p, p + PAGE);
                }
            }
            at += len as u64;
        }
    }
    Ok(same)
}
