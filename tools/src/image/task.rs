//! A whole image loaded task by task, and a stream over the stored pages of
//! one task in address order; shared by `core` and `diff`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use cryo_image::proto::{CoreEntry, FdEntry, FileEntry, MmEntry, PagemapEntry, PstreeEntry};
use cryo_image::{Kind, PageReader, PAGE_SIZE};

use super::load::{self, Pagemap};

const PAGE: u64 = PAGE_SIZE as u64;

/// One process of an image.
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

/// Everything `core` and `diff` need from an image directory.
pub struct LoadedImage {
    pub inventory: cryo_image::proto::Inventory,
    pub tasks: Vec<TaskImage>,
    pub files: HashMap<u32, FileEntry>,
}

/// Reads the inventory, pstree, files table and every task's files.
pub fn load_image(dir: &Path) -> anyhow::Result<LoadedImage> {
    let inventory = cryo_image::read_inventory(dir)?;
    let pstree: Vec<PstreeEntry> = load::read_all(dir, cryo_image::PSTREE_FILE, Kind::Pstree)?;
    let mut files = HashMap::new();
    for f in load::read_all::<FileEntry>(dir, cryo_image::FILES_FILE, Kind::Files)? {
        files.insert(f.id, f);
    }
    let mut tasks = Vec::with_capacity(pstree.len());
    for entry in pstree {
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
            entry,
            cores,
            mm,
            pagemap,
            fds,
        });
    }
    Ok(LoadedImage {
        inventory,
        tasks,
        files,
    })
}

/// The stored pages of one task, page by page in the order of the runs
/// (increasing addresses), one chunk decompressed at a time.
pub struct PageStream<'a> {
    reader: Option<PageReader>,
    runs: &'a [PagemapEntry],
    run: usize,
    page_in_run: u64,
    chunk: usize,
    /// Pages of `buf` already handed out.
    used: usize,
    /// Pages held by `buf`.
    held: usize,
    buf: Vec<u8>,
    cur: usize,
}

impl<'a> PageStream<'a> {
    /// Opens the pages file named by the pagemap of `dir`.
    pub fn open(dir: &Path, pm: &'a Pagemap) -> anyhow::Result<PageStream<'a>> {
        let compression = pm.compression().with_context(|| {
            format!(
                "{}: unknown compression {}",
                dir.join(&pm.head.pages_file).display(),
                pm.head.compression
            )
        })?;
        if pm.run_pages() != pm.chunk_pages() {
            anyhow::bail!(
                "{}: runs hold {} pages but chunks {} (run `cryo image verify`)",
                dir.join(&pm.head.pages_file).display(),
                pm.run_pages(),
                pm.chunk_pages()
            );
        }
        let reader = if pm.chunks.is_empty() {
            None
        } else {
            Some(PageReader::open(
                dir,
                &pm.head.pages_file,
                compression,
                pm.chunks.clone(),
            )?)
        };
        Ok(PageStream {
            reader,
            runs: &pm.runs,
            run: 0,
            page_in_run: 0,
            chunk: 0,
            used: 0,
            held: 0,
            buf: Vec::new(),
            cur: 0,
        })
    }

    /// Moves to the next stored page and returns its address; its bytes are
    /// then [`PageStream::page`]. None after the last page.
    pub fn next_page(&mut self) -> anyhow::Result<Option<u64>> {
        while let Some(r) = self.runs.get(self.run) {
            if self.page_in_run >= u64::from(r.nr_pages) {
                self.run += 1;
                self.page_in_run = 0;
                continue;
            }
            let addr = r.vaddr + self.page_in_run * PAGE;
            self.page_in_run += 1;
            if self.used == self.held {
                let reader = self
                    .reader
                    .as_ref()
                    .context("pagemap lists pages but no chunk")?;
                let c = reader.chunks().get(self.chunk).with_context(|| {
                    format!("{}: fewer chunks than pages", reader.path().display())
                })?;
                let len = c.nr_pages as usize * PAGE_SIZE;
                self.buf.resize(len, 0);
                reader.read_chunk(self.chunk, &mut self.buf)?;
                self.chunk += 1;
                self.held = c.nr_pages as usize;
                self.used = 0;
            }
            self.cur = self.used;
            self.used += 1;
            return Ok(Some(addr));
        }
        Ok(None)
    }

    /// The bytes of the page [`PageStream::next_page`] returned last.
    pub fn page(&self) -> &[u8] {
        &self.buf[self.cur * PAGE_SIZE..(self.cur + 1) * PAGE_SIZE]
    }
}
