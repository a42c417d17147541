//! A whole image loaded process by process, and the memory of each live
//! process page by page, pages kept in a parent's image (`PAGE_IN_PARENT`)
//! included; shared by `show`, `core` and `diff`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use cryo_image::proto::{CoreEntry, FdEntry, FileEntry, MmEntry, PagemapEntry, PstreeEntry};
use cryo_image::{Kind, PageReader, PAGE_SIZE};

use super::load::{self, Pagemap};

const PAGE: u64 = PAGE_SIZE as u64;

/// One live process of an image.
pub struct TaskImage {
    pub entry: PstreeEntry,
    /// One core per thread, in pstree's `threads` order.
    pub cores: Vec<(u32, CoreEntry)>,
    pub mm: MmEntry,
    pub pagemap: Pagemap,
    pub fds: Vec<FdEntry>,
}

impl TaskImage {
    /// The core of the thread group leader (the one holding the
    /// process-wide state), else the first thread's.
    pub fn leader(&self) -> Option<&CoreEntry> {
        self.cores
            .iter()
            .find(|(tid, _)| *tid == self.entry.pid)
            .or_else(|| self.cores.first())
            .map(|(_, c)| c)
    }
}

/// Everything the tools need from an image directory.
pub struct LoadedImage {
    pub dir: PathBuf,
    pub inventory: cryo_image::proto::Inventory,
    /// Every process of pstree.img, zombies included, in its order
    /// (parents before children).
    pub pstree: Vec<PstreeEntry>,
    /// The live processes, in pstree order.
    pub tasks: Vec<TaskImage>,
    pub files: HashMap<u32, FileEntry>,
}

impl LoadedImage {
    /// The zombies of pstree.img, in its order.
    pub fn zombies(&self) -> impl Iterator<Item = &PstreeEntry> {
        self.pstree.iter().filter(|e| e.zombie)
    }

    /// Index in `tasks` of the live process `pid`.
    pub fn task_index(&self, pid: u32) -> Option<usize> {
        self.tasks.iter().position(|t| t.entry.pid == pid)
    }
}

/// Reads the inventory, pstree, files table and every live process's
/// files (zombies have none).
pub fn load_image(dir: &Path) -> anyhow::Result<LoadedImage> {
    let inventory = cryo_image::read_inventory(dir)?;
    let pstree: Vec<PstreeEntry> = load::read_all(dir, cryo_image::PSTREE_FILE, Kind::Pstree)?;
    let mut files = HashMap::new();
    for f in load::read_all::<FileEntry>(dir, cryo_image::FILES_FILE, Kind::Files)? {
        files.insert(f.id, f);
    }
    let mut tasks = Vec::with_capacity(pstree.len());
    for entry in pstree.iter().filter(|e| !e.zombie) {
        let pid = entry.pid;
        let mut cores = Vec::with_capacity(entry.threads.len());
        for &tid in &entry.threads {
            let core: CoreEntry =
                cryo_image::read_one(dir, &cryo_image::core_file(tid), Kind::Core)?;
            cores.push((tid, core));
        }
        let mm: MmEntry = cryo_image::read_one(dir, &cryo_image::mm_file(pid), Kind::Mm)?;
        let pm_name = cryo_image::pagemap_file(pid);
        let pagemap = load::read_pagemap(dir, &pm_name)?
            .with_context(|| format!("{}: no head record", dir.join(&pm_name).display()))?;
        let fds: Vec<FdEntry> = load::read_all(dir, &cryo_image::fdinfo_file(pid), Kind::Fdinfo)?;
        tasks.push(TaskImage {
            entry: entry.clone(),
            cores,
            mm,
            pagemap,
            fds,
        });
    }
    Ok(LoadedImage {
        dir: dir.to_path_buf(),
        inventory,
        pstree,
        tasks,
        files,
    })
}

/// Where the in-parent pages of live task `i` are stored: pages per
/// ancestor pid whose pages file holds them, and under None those no
/// ancestor stored (they read as zeros) or that have no live parent.
pub fn parent_sources(img: &LoadedImage, i: usize) -> BTreeMap<Option<u32>, u64> {
    fn walk(
        img: &LoadedImage,
        i: usize,
        start: u64,
        end: u64,
        depth: usize,
        out: &mut BTreeMap<Option<u32>, u64>,
    ) {
        let parent = img.task_index(img.tasks[i].entry.ppid);
        let Some(p) = parent.filter(|_| depth <= img.tasks.len()) else {
            *out.entry(None).or_default() += (end - start) / PAGE;
            return;
        };
        let mut covered = 0;
        for r in &img.tasks[p].pagemap.runs {
            let r_end = r
                .vaddr
                .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
            let (lo, hi) = (r.vaddr.max(start), r_end.min(end));
            if lo >= hi {
                continue;
            }
            covered += (hi - lo) / PAGE;
            if load::in_parent(r) {
                walk(img, p, lo, hi, depth + 1, out);
            } else {
                *out.entry(Some(img.tasks[p].entry.pid)).or_default() += (hi - lo) / PAGE;
            }
        }
        let gap = ((end - start) / PAGE).saturating_sub(covered);
        if gap > 0 {
            *out.entry(None).or_default() += gap;
        }
    }
    let mut out = BTreeMap::new();
    for r in img.tasks[i]
        .pagemap
        .runs
        .iter()
        .filter(|r| load::in_parent(r))
    {
        let end = r
            .vaddr
            .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
        walk(img, i, r.vaddr, end, 0, &mut out);
    }
    out
}

/// Where the bytes of a page handed out by [`Memory::read_page`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The process's own pages file.
    Own,
    /// The pages file of the ancestor with this pid.
    Ancestor(u32),
    /// A page of the parent's that no ancestor stored: zeros.
    ParentZero,
    /// The process has no run at this address: not in the image.
    NotStored,
}

/// The page index of one live process: its runs by address, and for each
/// stored run the number of its first page in the pages file.
struct TaskPages {
    pid: u32,
    runs: Vec<PagemapEntry>,
    first: Vec<u64>,
    reader: Option<PageReader>,
    opened: bool,
}

/// Decompressed chunks kept for reuse, most recently used last.
struct ChunkCache {
    entries: Vec<((usize, usize), Vec<u8>)>,
    bytes: usize,
}

const CACHE_BYTES: usize = 64 << 20;

impl ChunkCache {
    /// Index of chunk `key` in `entries`, after moving it to the end.
    fn get(&mut self, key: (usize, usize)) -> Option<usize> {
        let i = self.entries.iter().position(|(k, _)| *k == key)?;
        let e = self.entries.remove(i);
        self.entries.push(e);
        Some(self.entries.len() - 1)
    }

    fn insert(&mut self, key: (usize, usize), data: Vec<u8>) -> usize {
        self.bytes += data.len();
        self.entries.push((key, data));
        while self.bytes > CACHE_BYTES && self.entries.len() > 1 {
            let (_, old) = self.entries.remove(0);
            self.bytes -= old.len();
        }
        self.entries.len() - 1
    }
}

/// The memory of every live process of an image, as the restore would
/// rebuild it: a page of a `PAGE_IN_PARENT` run is read from the parent
/// (the live process whose pid is the ppid), and up again while it is
/// the parent's own parent's; an ancestor with no run there gives zeros.
pub struct Memory<'a> {
    img: &'a LoadedImage,
    tasks: Vec<TaskPages>,
    /// Index of each task's parent among the live tasks.
    parent: Vec<Option<usize>>,
    cache: ChunkCache,
}

enum Located {
    Stored(u64),
    Parent,
    None,
}

impl<'a> Memory<'a> {
    pub fn new(img: &'a LoadedImage) -> Memory<'a> {
        let tasks = img
            .tasks
            .iter()
            .map(|t| {
                // Stored pages are numbered in the runs' record order;
                // lookups go by address.
                let mut n = 0u64;
                let mut indexed: Vec<(PagemapEntry, u64)> = t
                    .pagemap
                    .runs
                    .iter()
                    .map(|r| {
                        let first = n;
                        if !load::in_parent(r) {
                            n += u64::from(r.nr_pages);
                        }
                        (*r, first)
                    })
                    .collect();
                indexed.sort_by_key(|(r, _)| r.vaddr);
                let (runs, first) = indexed.into_iter().unzip();
                TaskPages {
                    pid: t.entry.pid,
                    runs,
                    first,
                    reader: None,
                    opened: false,
                }
            })
            .collect();
        let parent = img
            .tasks
            .iter()
            .map(|t| img.task_index(t.entry.ppid))
            .collect();
        Memory {
            img,
            tasks,
            parent,
            cache: ChunkCache {
                entries: Vec::new(),
                bytes: 0,
            },
        }
    }

    /// The runs (stored and in-parent) of task `i`, by address.
    pub fn runs(&self, i: usize) -> &[PagemapEntry] {
        &self.tasks[i].runs
    }

    fn locate(&self, i: usize, addr: u64) -> Located {
        let t = &self.tasks[i];
        let k = t
            .runs
            .partition_point(|r| r.vaddr + u64::from(r.nr_pages) * PAGE <= addr);
        match t.runs.get(k) {
            Some(r) if r.vaddr <= addr => {
                if load::in_parent(r) {
                    Located::Parent
                } else {
                    Located::Stored(t.first[k] + (addr - r.vaddr) / PAGE)
                }
            }
            _ => Located::None,
        }
    }

    /// Opens task `i`'s pages file the first time it is needed.
    fn open(&mut self, i: usize) -> anyhow::Result<()> {
        if !self.tasks[i].opened {
            let t = &self.img.tasks[i];
            let pm = &t.pagemap;
            let path = self.img.dir.join(&pm.head.pages_file);
            let compression = pm.compression().with_context(|| {
                format!(
                    "{}: unknown compression {}",
                    path.display(),
                    pm.head.compression
                )
            })?;
            if pm.stored_pages() != pm.chunk_pages() {
                anyhow::bail!(
                    "{}: runs hold {} stored pages but chunks {} (run `cryo image verify`)",
                    path.display(),
                    pm.stored_pages(),
                    pm.chunk_pages()
                );
            }
            let reader = if pm.chunks.is_empty() {
                None
            } else {
                Some(PageReader::open(
                    &self.img.dir,
                    &pm.head.pages_file,
                    compression,
                    pm.chunks.clone(),
                )?)
            };
            self.tasks[i].reader = reader;
            self.tasks[i].opened = true;
        }
        Ok(())
    }

    /// Copies stored page `n` of task `i` into `out`.
    fn read_stored(&mut self, i: usize, n: u64, out: &mut [u8]) -> anyhow::Result<()> {
        self.open(i)?;
        let Memory {
            img, tasks, cache, ..
        } = self;
        let pid = tasks[i].pid;
        let reader = tasks[i].reader.as_ref().with_context(|| {
            format!(
                "{}: stored pages but no chunk",
                img.dir.join(cryo_image::pagemap_file(pid)).display()
            )
        })?;
        let k = reader.chunk_page_starts().partition_point(|&s| s <= n);
        let chunk = k
            .checked_sub(1)
            .with_context(|| format!("{}: no chunk holds page {n}", reader.path().display()))?;
        let start = reader.chunk_page_starts()[chunk];
        let slot = match cache.get((i, chunk)) {
            Some(s) => s,
            None => {
                let data = reader.read_chunk_vec(chunk)?;
                cache.insert((i, chunk), data)
            }
        };
        let data = &cache.entries[slot].1;
        let off = ((n - start) as usize) * PAGE_SIZE;
        let page = data.get(off..off + PAGE_SIZE).with_context(|| {
            format!(
                "{}: chunk {chunk} holds fewer pages than the runs",
                reader.path().display()
            )
        })?;
        out.copy_from_slice(page);
        Ok(())
    }

    /// The page of task `i` at `addr` into `out` (4096 bytes), and where
    /// it came from; `out` is left alone for [`Origin::NotStored`].
    pub fn read_page(&mut self, i: usize, addr: u64, out: &mut [u8]) -> anyhow::Result<Origin> {
        let mut cur = i;
        let mut hops = 0;
        loop {
            match self.locate(cur, addr) {
                Located::Stored(n) => {
                    self.read_stored(cur, n, out)?;
                    return Ok(if cur == i {
                        Origin::Own
                    } else {
                        Origin::Ancestor(self.tasks[cur].pid)
                    });
                }
                Located::None if cur == i => return Ok(Origin::NotStored),
                Located::None => {
                    out.fill(0);
                    return Ok(Origin::ParentZero);
                }
                Located::Parent => {
                    let t = &self.img.tasks[cur].entry;
                    let name = self.img.dir.join(cryo_image::pagemap_file(t.pid));
                    cur = self.parent[cur].with_context(|| {
                        format!(
                            "{}: page {addr:#x} is its parent's, but the parent {} is not a live process of the image (run `cryo image verify`)",
                            name.display(),
                            t.ppid
                        )
                    })?;
                    hops += 1;
                    if hops > self.tasks.len() {
                        anyhow::bail!(
                            "{}: the parents of process {} form a cycle (run `cryo image verify`)",
                            self.img.dir.join(cryo_image::PSTREE_FILE).display(),
                            self.tasks[i].pid
                        );
                    }
                }
            }
        }
    }
}

/// Every page of one live process that the image holds (its stored runs
/// and its parent's), in address order, with the resolved bytes.
pub struct MemStream {
    task: usize,
    run: usize,
    page_in_run: u64,
    buf: Vec<u8>,
}

impl MemStream {
    pub fn new(task: usize) -> MemStream {
        MemStream {
            task,
            run: 0,
            page_in_run: 0,
            buf: vec![0u8; PAGE_SIZE],
        }
    }

    /// Moves to the next page and returns its address and origin; its
    /// bytes are then [`MemStream::page`]. In-parent pages that no ancestor
    /// stored come as zeros ([`Origin::ParentZero`]). None after the last.
    pub fn next_page(&mut self, mem: &mut Memory<'_>) -> anyhow::Result<Option<(u64, Origin)>> {
        loop {
            let Some(r) = mem.runs(self.task).get(self.run) else {
                return Ok(None);
            };
            if self.page_in_run >= u64::from(r.nr_pages) {
                self.run += 1;
                self.page_in_run = 0;
                continue;
            }
            let addr = r.vaddr + self.page_in_run * PAGE;
            self.page_in_run += 1;
            let origin = mem.read_page(self.task, addr, &mut self.buf)?;
            if origin == Origin::NotStored {
                continue; // cannot happen: addr lies in one of the runs
            }
            return Ok(Some((addr, origin)));
        }
    }

    /// The bytes of the page [`MemStream::next_page`] returned last.
    pub fn page(&self) -> &[u8] {
        &self.buf
    }
}
