//! Pages a child still shares copy-on-write with its parent.
//!
//! Dump: the same physical page at the same address in both processes'
//! /proc/PID/pagemap (which shows frame numbers to CAP_SYS_ADMIN: without
//! it nothing is shared) is stored once, by the parent, and the child's
//! pagemap marks it PAGE_IN_PARENT. Restore: such pages are filled from
//! the parent's image (or its parent's, up the tree).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;

use cryo_image::proto::{PagemapEntry, Vma, VmaKind};
use cryo_image::PageReader;

use super::restore::Premap;
use super::{MemError, Run, PAGE};
use crate::restore::image::{Image, TreeImage};

fn private_kind(kind: i32) -> bool {
    [
        VmaKind::VmaAnonPrivate,
        VmaKind::VmaHeap,
        VmaKind::VmaStack,
        VmaKind::VmaFilePrivate,
    ]
    .iter()
    .any(|k| *k as i32 == kind)
}

/// Split the private-memory runs of `pid` into the pages it still shares
/// copy-on-write with its parent `ppid` and the rest. Both tasks are
/// stopped.
pub fn split(
    pid: i32,
    ppid: i32,
    runs: Vec<Run>,
    vmas: &[Vma],
    pvmas: &[Vma],
) -> Result<(Vec<Run>, Vec<PagemapEntry>), MemError> {
    let open = |pid: i32| {
        std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|source| MemError::Pagemap { pid, source })
    };
    let (mine, theirs) = (open(pid)?, open(ppid)?);
    let read = |f: &std::fs::File, buf: &mut [u8], off: u64, pid: i32| {
        f.read_exact_at(buf, off)
            .map_err(|source| MemError::PagemapRead { pid, source })
    };
    let private = |vs: &[Vma], s: u64, e: u64| {
        vs.iter()
            .any(|v| v.start <= s && e <= v.end && private_kind(v.kind))
    };
    let mut kept = Vec::with_capacity(runs.len());
    let mut in_parent: Vec<PagemapEntry> = Vec::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in runs {
        let end = r.start + r.pages * PAGE;
        if !private(vmas, r.start, end) || !private(pvmas, r.start, end) {
            kept.push(r);
            continue;
        }
        let n = r.pages as usize;
        a.resize(n * 8, 0);
        b.resize(n * 8, 0);
        let off = r.start / PAGE * 8;
        read(&mine, &mut a, off, pid)?;
        read(&theirs, &mut b, off, ppid)?;
        split_run(&r, &a, &b, &mut kept, &mut in_parent);
    }
    Ok((kept, in_parent))
}

/// One run, by the pagemap words of the child (`a`) and parent (`b`).
fn split_run(r: &Run, a: &[u8], b: &[u8], kept: &mut Vec<Run>, in_parent: &mut Vec<PagemapEntry>) {
    const PRESENT: u64 = 1 << 63;
    const PFN: u64 = (1 << 55) - 1;
    let word = |buf: &[u8], i: usize| {
        u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default())
    };
    let same = |i: usize| {
        let (x, y) = (word(a, i), word(b, i));
        x & PRESENT != 0 && y & PRESENT != 0 && x & PFN != 0 && x & PFN == y & PFN
    };
    let n = r.pages as usize;
    let mut i = 0;
    while i < n {
        let s = same(i);
        let mut j = i + 1;
        while j < n && same(j) == s {
            j += 1;
        }
        let start = r.start + i as u64 * PAGE;
        let pages = (j - i) as u64;
        if s {
            in_parent.push(PagemapEntry {
                vaddr: start,
                nr_pages: pages as u32,
                flags: cryo_image::PAGE_IN_PARENT,
            });
        } else {
            kept.push(Run {
                start,
                pages,
                zero_ok: r.zero_ok,
            });
        }
        i = j;
    }
}

// ---- restore ----

/// Where a page of a process's image is.
/// The page number `run_index` gives a run in the parent image.
const IN_PARENT_IMAGE: u64 = u64::MAX;

enum PageAt {
    /// Stored page number `n` of its pages file.
    Stored(u64),
    /// The parent's page at the same address.
    Parent,
    /// Not in the image (it read as zero).
    Absent,
    /// In the parent image of this one (an incremental dump).
    ParentImage,
}

/// The runs of one image by address: (start, end, first stored page
/// number, or None for the parent's pages), for binary search.
fn run_index(img: &Image) -> Vec<(u64, u64, Option<u64>)> {
    let mut stored = 0u64;
    img.runs
        .iter()
        .map(|r| {
            let end = r.vaddr + r.nr_pages as u64 * PAGE;
            if r.flags & cryo_image::PAGE_IN_PARENT != 0 {
                (r.vaddr, end, None)
            } else if r.flags & cryo_image::PAGE_IN_PARENT_IMAGE != 0 {
                // In the parent image: a page number no chunk holds.
                (r.vaddr, end, Some(IN_PARENT_IMAGE))
            } else {
                stored += r.nr_pages as u64;
                (r.vaddr, end, Some(stored - r.nr_pages as u64))
            }
        })
        .collect()
}

fn page_at(index: &[(u64, u64, Option<u64>)], vaddr: u64) -> PageAt {
    let i = index.partition_point(|r| r.1 <= vaddr);
    match index.get(i) {
        Some(&(start, _, Some(IN_PARENT_IMAGE))) if start <= vaddr => PageAt::ParentImage,
        Some(&(start, _, Some(first))) if start <= vaddr => {
            PageAt::Stored(first + (vaddr - start) / PAGE)
        }
        Some(&(start, _, None)) if start <= vaddr => PageAt::Parent,
        _ => PageAt::Absent,
    }
}

/// The pages of process `me` found in its ancestors' images.
struct Needs {
    /// (source process, chunk) -> [(page in chunk, destination offset)]
    chunks: BTreeMap<(usize, usize), Vec<(usize, usize)>>,
    /// Destination offsets of pages that read as zero.
    zero: Vec<usize>,
    /// Pages an ancestor's run leaves to the parent image: by that
    /// ancestor's pid, (address, destination offset).
    chain: BTreeMap<u32, Vec<(u64, usize)>>,
}

/// Where each page `me` kept in a parent is, up the tree.
fn find_needs(
    tree: &TreeImage,
    readers: &[PageReader],
    me: usize,
    premap: &Premap,
) -> Result<Needs, String> {
    let img = &tree.procs[me];
    let pm_name = cryo_image::pagemap_file(img.pstree.pid);
    let parent_of = |i: usize| {
        let ppid = tree.procs[i].pstree.ppid;
        tree.procs.iter().position(|p| p.pstree.pid == ppid)
    };
    let mut needs = Needs {
        chunks: BTreeMap::new(),
        zero: Vec::new(),
        chain: BTreeMap::new(),
    };
    // Run indexes of the ancestors, made when first needed.
    let mut indexes: HashMap<usize, Vec<(u64, u64, Option<u64>)>> = HashMap::new();
    let parents = img
        .runs
        .iter()
        .filter(|r| r.flags & cryo_image::PAGE_IN_PARENT != 0);
    for r in parents {
        for k in 0..r.nr_pages as u64 {
            let vaddr = r.vaddr + k * PAGE;
            if premap.adopted(vaddr) {
                continue; // the parent's own frame already
            }
            let dst = premap
                .offset_of(vaddr)
                .ok_or_else(|| format!("{pm_name}: page {vaddr:#x} outside any mapping"))?;
            let mut cur = me;
            for hops in 1.. {
                cur = parent_of(cur).ok_or_else(|| {
                    format!("{pm_name}: page {vaddr:#x} is the parent's, but the image has no parent process")
                })?;
                let index = indexes
                    .entry(cur)
                    .or_insert_with(|| run_index(&tree.procs[cur]));
                match page_at(index, vaddr) {
                    PageAt::Stored(n) => {
                        let (ci, k) = chunk_of(&tree.procs[cur], &readers[cur], n)?;
                        needs.chunks.entry((cur, ci)).or_default().push((k, dst));
                        break;
                    }
                    PageAt::Absent => {
                        needs.zero.push(dst);
                        break;
                    }
                    PageAt::ParentImage => {
                        let pid = tree.procs[cur].pstree.pid;
                        needs.chain.entry(pid).or_default().push((vaddr, dst));
                        break;
                    }
                    PageAt::Parent if hops < 4096 => {}
                    PageAt::Parent => return Err(format!("{pm_name}: a loop of parents")),
                }
            }
        }
    }
    Ok(needs)
}

/// The chunk holding stored page `n` of `src`, and the page's index in it.
fn chunk_of(src: &Image, reader: &PageReader, n: u64) -> Result<(usize, usize), String> {
    let starts = reader.chunk_page_starts();
    let ci = starts.partition_point(|&s| s <= n).wrapping_sub(1);
    let first = starts.get(ci).copied().unwrap_or(0);
    let inside = src
        .chunks
        .get(ci)
        .is_some_and(|c| n < first + c.nr_pages as u64);
    if !inside {
        return Err(format!(
            "{}: page {n} is beyond its chunks",
            cryo_image::pagemap_file(src.pstree.pid)
        ));
    }
    Ok((ci, (n - first) as usize))
}

/// Fill the pages process `me` still shared copy-on-write with its parent
/// at the dump from the parent's image (or its parent's, up the tree),
/// decompressing each needed chunk once.
pub fn fill_from_parents(
    tree: &TreeImage,
    readers: &[PageReader],
    chain: &std::cell::RefCell<super::incremental::Chain>,
    me: usize,
    premap: &mut Premap,
) -> Result<(), String> {
    let needs = find_needs(tree, readers, me, premap)?;
    if needs.chunks.is_empty() && needs.zero.is_empty() && needs.chain.is_empty() {
        return Ok(());
    }
    let page = PAGE as usize;
    let mem = premap.bytes()?;
    let mut buf: Vec<u8> = Vec::new();
    for ((src, ci), pages) in needs.chunks {
        let c = &tree.procs[src].chunks[ci];
        buf.resize(c.nr_pages as usize * page, 0);
        readers[src]
            .read_chunk(ci, &mut buf)
            .map_err(|e| e.to_string())?;
        for (k, dst) in pages {
            let from = buf
                .get(k * page..(k + 1) * page)
                .ok_or("a page beyond its chunk")?;
            mem.get_mut(dst..dst + page)
                .ok_or("a page beyond the premapped memory")?
                .copy_from_slice(from);
        }
    }
    for dst in needs.zero {
        if let Some(p) = mem.get_mut(dst..dst + page) {
            p.fill(0);
        }
    }
    let mut chain = chain.borrow_mut();
    for (pid, pages) in needs.chain {
        chain.fill(pid, 1, &pages, mem)?;
    }
    Ok(())
}
