//! `cryo pre-dump`: the memory of a running tree into an image that a
//! later dump (or pre-dump) takes as its parent (--prev-images-dir), the
//! tree left running. Each process is stopped only long enough to make a
//! userfaultfd in it (see precopy), its private memory write-protected
//! and copied while it runs: a page written after its protection is
//! copied again by the next command, which learns so from the tracking a
//! holder process keeps meanwhile (see track). With a parent of its own,
//! a pre-dump copies only what was written since that one and refers to
//! it for the rest.
//!
//! The image holds, for each process, its mappings (mm), pagemap and
//! pages, and an inventory that says it is a pre-dump: not restorable
//! alone.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryo_image::proto::{Compression, MmEntry, PagemapEntry};
use nix::unistd::Pid;

use super::{check_parent, link_parent, DumpError, DumpOptions, Result};
use crate::infect::guard::Guard;
use crate::mem::incremental::{self as inc};
use crate::mem::precopy::PreCopy;
use crate::pstree;

/// What `cryo pre-dump` is given.
#[derive(Debug, Clone)]
pub struct PreDumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    /// The parent image (a pre-dump), relative to `dir` unless absolute.
    pub prev_images_dir: Option<PathBuf>,
    pub compression: Compression,
    pub zstd_level: i32,
    pub threads: usize,
    /// How long the holder keeps the tracking for the next command.
    pub track_limit: Duration,
}

/// What a pre-dump did.
#[derive(Debug, Default, Clone)]
pub struct PreDumpStats {
    pub processes: usize,
    /// Pages copied, and pages left to the parent image.
    pub pages_stored: u64,
    pub pages_in_parent: u64,
    /// Processes whose tracking goes on for the next command.
    pub tracked: usize,
    pub total: Duration,
}

impl PreDumpOptions {
    /// The same, as the options of a dump (for what the two share).
    fn as_dump(&self) -> DumpOptions {
        let mut o = DumpOptions::new(self.pid, self.dir.clone());
        o.leave_running = true;
        o.compression = self.compression;
        o.zstd_level = self.zstd_level;
        o.threads = self.threads;
        o.network_lock = None;
        o.prev_images_dir = self.prev_images_dir.clone();
        o
    }
}

/// The pids of the trees under `roots`.
pub(super) fn tree_pids(roots: &[i32]) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut todo = roots.to_vec();
    while let Some(p) = todo.pop() {
        if !pids.contains(&p) {
            pids.push(p);
            todo.extend(pstree::children(p));
        }
    }
    pids
}

/// Pre-dump the tree under `o.pid` into `o.dir`; it runs on throughout.
pub fn pre_dump(o: &PreDumpOptions) -> Result<PreDumpStats> {
    let t0 = Instant::now();
    let opts = o.as_dump();
    super::make_image_dir(&o.dir)?;
    if pstree::stat(o.pid).is_none() {
        return Err(DumpError::NoTask { pid: o.pid });
    }
    let parent = opts.parent_image();
    if let Some(p) = &parent {
        check_parent(p)?;
        inc::take_trackers(p);
    }
    let r = pre_dump_tree(o, &opts, parent.as_deref());
    // The tracking the parent's holder gave that no process took ends.
    inc::settle_trackers(None);
    let mut stats = r?;
    stats.total = t0.elapsed();
    Ok(stats)
}

fn pre_dump_tree(
    o: &PreDumpOptions,
    opts: &DumpOptions,
    parent: Option<&std::path::Path>,
) -> Result<PreDumpStats> {
    let guard = Guard::spawn(Pid::from_raw(o.pid))?;
    let store = opts.store();
    let mut stats = PreDumpStats::default();
    let mut files = Vec::new();
    let mut keep = Vec::new();
    for pid in tree_pids(&[o.pid]) {
        // Zombies have no memory left.
        if pstree::stat(pid).is_none_or(|s| s.state == 'Z') {
            continue;
        }
        let fail = |what: String| DumpError::Incremental {
            pid,
            parent: parent.map(|p| p.to_path_buf()).unwrap_or_default(),
            what,
        };
        let vmas = crate::mem::read_layout(Pid::from_raw(pid))?;
        // What the parent holds that was not written since, read before
        // this round protects again (a page written after this read is
        // seen written by the round, and copied).
        let (pc, mut refs) = match (inc::tracker(pid), parent) {
            (Some(uffd), Some(p)) => {
                let held = inc::held(p, pid).map_err(fail)?;
                let unwritten = inc::unwritten(pid, &uffd, &vmas, false).map_err(fail)?;
                let refs = inc::intersect(&unwritten, &held);
                (PreCopy::resume(pid, uffd, &store)?, refs)
            }
            _ => (PreCopy::start(pid, &guard, &store)?, Vec::new()),
        };
        let Some(mut pc) = pc else {
            // Nothing to track (or the task cannot be): its memory is the
            // final dump's to store.
            continue;
        };
        pc.round()?;
        refs = inc::subtract(&refs, &inc::of_pages(pc.written_last()));
        let mut runs = pc.copied_runs();
        let stored: u64 = runs.iter().map(|r| u64::from(r.nr_pages)).sum();
        // A run never spans two mappings.
        let refs: inc::Ranges = vmas
            .iter()
            .flat_map(|v| inc::intersect(&refs, &vec![(v.start, v.end)]))
            .collect();
        runs.extend(refs.iter().map(|&(s, e)| PagemapEntry {
            vaddr: s,
            nr_pages: ((e - s) / crate::mem::PAGE) as u32,
            flags: cryo_image::PAGE_IN_PARENT_IMAGE,
        }));
        let in_parent: u64 = refs.iter().map(|(s, e)| (e - s) / crate::mem::PAGE).sum();
        runs.sort_by_key(|r| r.vaddr);
        let Some(pw) = pc.writer() else {
            continue;
        };
        let (chunks, pages_info) = pw.finish()?;
        let pagemap = crate::mem::store::write_pagemap(&store, pid, &runs, chunks, stored)?;
        let mm = cryo_image::write_one(
            &o.dir,
            &cryo_image::mm_file(pid as u32),
            cryo_image::Kind::Mm,
            &MmEntry {
                vmas,
                ..Default::default()
            },
        )?;
        files.extend([pages_info, pagemap, mm]);
        if let Some(uffd) = pc.take_uffd() {
            keep.push((pid, uffd));
        }
        stats.processes += 1;
        stats.pages_stored += stored;
        stats.pages_in_parent += in_parent;
    }
    stats.tracked = keep.len();
    if !keep.is_empty() {
        crate::mem::track::hold(&o.dir, keep, o.track_limit).map_err(|what| DumpError::Parent {
            parent: o.dir.clone(),
            what: format!("keeping the tracking for the next dump: {what}"),
        })?;
    }
    link_parent(opts)?;
    let inv = super::inventory(o.pid, files, true, parent.is_some(), true);
    cryo_image::write_inventory(&o.dir, &inv)?;
    Ok(stats)
}
