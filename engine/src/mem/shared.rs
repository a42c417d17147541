//! Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS): one shmem object
//! however many processes map it.
//!
//! Dump: the object is known by its inode (`shmid`); its pages are stored
//! by the first process of the tree that maps a range of it, and left out
//! of the others. Restore: cryo makes every object once, before it
//! creates the tasks, so they all inherit it and map the same one; the
//! process whose image holds the pages fills it.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use cryo_image::proto::{Vma, VmaKind};

use super::Run;
use crate::restore::image::TreeImage;

/// The ranges of each shared anonymous object (by shmem inode) whose
/// pages a process captured earlier already stored.
pub type SharedStored = HashMap<u64, Vec<(u64, u64)>>;

/// Leave out of `runs` the pages of shared objects an earlier process of
/// the tree stores, and note the ranges this one stores.
pub fn skip_stored(stored: &mut SharedStored, vmas: &[Vma], runs: &mut Vec<Run>) {
    for v in vmas
        .iter()
        .filter(|v| v.kind == VmaKind::VmaAnonShared as i32)
    {
        let range = (v.pgoff, v.pgoff + (v.end - v.start));
        let known = stored.entry(v.shmid).or_default();
        if known.iter().any(|r| r.0 <= range.0 && range.1 <= r.1) {
            runs.retain(|r| r.start < v.start || r.start >= v.end);
        } else {
            known.push(range);
        }
    }
}

/// Every shared anonymous object of the image, by its dumped id, made
/// here (its size the largest extent any process maps).
pub fn make_objects(tree: &TreeImage) -> std::io::Result<HashMap<u64, OwnedFd>> {
    let mut sizes: HashMap<u64, u64> = HashMap::new();
    for p in &tree.procs {
        for v in
            p.mm.vmas
                .iter()
                .filter(|v| v.kind == VmaKind::VmaAnonShared as i32)
        {
            let end = v.pgoff + (v.end - v.start);
            let e = sizes.entry(v.shmid).or_insert(0);
            *e = (*e).max(end);
        }
    }
    let mut out = HashMap::new();
    for (id, size) in sizes {
        out.insert(id, crate::sys::mem::shared_anon_object(size)?);
    }
    Ok(out)
}
