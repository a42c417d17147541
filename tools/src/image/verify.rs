//! `cryo image verify`: checks an image directory thoroughly and reports
//! every problem found, one line each, naming the file.
//!
//! Checked: the framing of every file (magics; every record decodes), the
//! inventory (seal, format version, and each listed file's existence, size
//! and xxh3), files present but not listed, every page chunk's checksum, and
//! the cross-references between files (pstree -> per-task files, pagemap
//! runs -> mappings, page counts, fdinfo -> files.img).
//!
//! Trees: pstree.img lists the root first and parents before children;
//! zombies have an exit status a dead process can have, no children and no
//! per-process files. A run flagged `PAGE_IN_PARENT` takes no room in the
//! process's pages file: it needs a live parent in the image whose
//! mappings cover it, and the pages files it ends up being read from (the
//! parent's, or further up) must be sound.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Display;
use std::path::Path;

use anyhow::Context;
use cryo_image::proto::{CoreEntry, FdEntry, FileEntry, MmEntry, PstreeEntry, VmaKind};
use cryo_image::{
    core_file, fdinfo_file, mm_file, pagemap_file, pages_file, parse_file_name, ImageError, Kind,
    PageReader, FILES_FILE, FORMAT_MAJOR, INVENTORY_FILE, MAX_CHUNK_LEN, PAGE_IN_PARENT, PAGE_SIZE,
    PSTREE_FILE,
};

use super::load::{self, Pagemap};

const PAGE: u64 = PAGE_SIZE as u64;
/// Smallest XSAVE area (legacy region + header), largest we accept.
const XSAVE_MIN: usize = 576;
const XSAVE_MAX: usize = 64 * 1024;

struct Report<'a> {
    dir: &'a Path,
    problems: Vec<String>,
}

impl Report<'_> {
    /// A problem with file `name` of the image.
    fn file(&mut self, name: &str, msg: impl Display) {
        self.problems
            .push(format!("{}: {msg}", self.dir.join(name).display()));
    }

    /// An error that already names its file.
    fn error(&mut self, e: impl Display) {
        self.problems.push(e.to_string());
    }
}

fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Everything decoded from the directory's files.
#[derive(Default)]
struct Decoded {
    pstree: Option<Vec<PstreeEntry>>,
    files: Option<Vec<FileEntry>>,
    cores: BTreeMap<u32, CoreEntry>,
    mms: BTreeMap<u32, MmEntry>,
    pagemaps: BTreeMap<u32, Pagemap>,
    fdinfos: BTreeMap<u32, Vec<FdEntry>>,
    pages: BTreeSet<u32>,
}

pub fn run(dir: &Path) -> anyhow::Result<i32> {
    let meta = std::fs::metadata(dir).with_context(|| format!("{}: cannot stat", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{}: not a directory", dir.display());
    }
    let mut rep = Report {
        dir,
        problems: Vec::new(),
    };
    let mut regular = BTreeSet::new();
    for (name, m) in load::dir_entries(dir)? {
        if m.is_file() {
            regular.insert(name);
        } else {
            rep.file(&name, "not a regular file");
        }
    }
    // Files already reported missing, so that they are not reported twice.
    let mut missing = HashSet::new();

    let root_pid = check_inventory(&mut rep, &regular, &mut missing);
    let d = decode_all(&mut rep, &regular);
    check_tasks(&mut rep, &d, &regular, &mut missing, root_pid);
    check_cores(&mut rep, &d);
    check_mms(&mut rep, &d);
    let (pages_checked, unreadable) = check_pagemaps(&mut rep, &d);
    check_parent_pages(&mut rep, &d, &unreadable);
    check_fds(&mut rep, &d);

    if rep.problems.is_empty() {
        println!("ok: {} files, {pages_checked} pages checked", regular.len());
        Ok(0)
    } else {
        for p in &rep.problems {
            println!("{p}");
        }
        eprintln!(
            "cryo: image {}: {} problem{} found",
            dir.display(),
            rep.problems.len(),
            if rep.problems.len() == 1 { "" } else { "s" }
        );
        Ok(1)
    }
}

/// Seal, version, every listed file's size and checksum, unlisted files.
/// Returns the root pid when the inventory could be read.
fn check_inventory(
    rep: &mut Report<'_>,
    regular: &BTreeSet<String>,
    missing: &mut HashSet<String>,
) -> Option<u32> {
    let inv = match cryo_image::read_inventory(rep.dir) {
        Ok(inv) => inv,
        Err(e) => {
            if matches!(e, ImageError::NoImage { .. }) {
                missing.insert(INVENTORY_FILE.to_string());
            }
            rep.error(e);
            // Without the inventory, only file names can be judged.
            for name in regular {
                if name != INVENTORY_FILE && parse_file_name(name).is_none() {
                    rep.file(name, "not a cryo image file name");
                }
            }
            return None;
        }
    };
    if inv.format_major == 0 || inv.format_major > FORMAT_MAJOR {
        rep.file(
            INVENTORY_FILE,
            format!(
                "format version {}.{} is not supported (expected {FORMAT_MAJOR}.x)",
                inv.format_major, inv.format_minor
            ),
        );
    }
    let mut listed = BTreeSet::new();
    for (i, f) in inv.files.iter().enumerate() {
        if !plain_name(&f.name) {
            rep.file(
                INVENTORY_FILE,
                format!("entry {i}: invalid file name {:?}", f.name),
            );
            continue;
        }
        if f.name == INVENTORY_FILE {
            rep.file(INVENTORY_FILE, "lists itself");
            continue;
        }
        if !listed.insert(f.name.clone()) {
            rep.file(INVENTORY_FILE, format!("lists {} twice", f.name));
            continue;
        }
        if parse_file_name(&f.name).is_none() {
            rep.file(&f.name, "not a cryo image file name");
        }
        match cryo_image::hash_file(&rep.dir.join(&f.name)) {
            Err(ImageError::Missing { .. }) => {
                missing.insert(f.name.clone());
                rep.file(&f.name, "listed in the inventory but missing");
            }
            Err(e) => rep.error(e),
            Ok((size, hash)) => {
                if size != f.size {
                    rep.file(
                        &f.name,
                        format!(
                            "size is {size} bytes, the inventory says {} (truncated or extended)",
                            f.size
                        ),
                    );
                } else if hash != f.xxh3 {
                    rep.file(
                        &f.name,
                        format!(
                            "content checksum {hash:#018x} differs from the inventory's {:#018x} (modified)",
                            f.xxh3
                        ),
                    );
                }
            }
        }
    }
    for name in regular {
        if name != INVENTORY_FILE && !listed.contains(name) {
            rep.file(name, "present but not listed in the inventory");
        }
    }
    Some(inv.root_pid)
}

/// Reads and decodes every image file of the directory (pages files are
/// checked through their pagemaps).
fn decode_all(rep: &mut Report<'_>, regular: &BTreeSet<String>) -> Decoded {
    let dir = rep.dir;
    let mut d = Decoded::default();
    for name in regular {
        let Some((kind, id)) = parse_file_name(name) else {
            continue;
        };
        let id = id.unwrap_or(0);
        match kind {
            Kind::Inventory => {} // read_inventory checked it
            Kind::Pstree => match load::read_all(dir, name, kind) {
                Ok(v) => d.pstree = Some(v),
                Err(e) => rep.error(e),
            },
            Kind::Files => match load::read_all(dir, name, kind) {
                Ok(v) => d.files = Some(v),
                Err(e) => rep.error(e),
            },
            Kind::Core => match cryo_image::read_one::<CoreEntry>(dir, name, kind) {
                Ok(c) => {
                    d.cores.insert(id, c);
                }
                Err(e) => rep.error(e),
            },
            Kind::Mm => match cryo_image::read_one::<MmEntry>(dir, name, kind) {
                Ok(m) => {
                    d.mms.insert(id, m);
                }
                Err(e) => rep.error(e),
            },
            Kind::Pagemap => match load::read_pagemap(dir, name) {
                Ok(Some(pm)) => {
                    d.pagemaps.insert(id, pm);
                }
                Ok(None) => rep.file(name, "no head record"),
                Err(e) => rep.error(e),
            },
            Kind::Fdinfo => match load::read_all(dir, name, kind) {
                Ok(v) => {
                    d.fdinfos.insert(id, v);
                }
                Err(e) => rep.error(e),
            },
            Kind::Pages => {
                d.pages.insert(id);
            }
        }
    }
    d
}

/// pstree.img itself, and that every process has its files and every
/// per-task file its process.
fn check_tasks(
    rep: &mut Report<'_>,
    d: &Decoded,
    regular: &BTreeSet<String>,
    missing: &mut HashSet<String>,
    root_pid: Option<u32>,
) {
    let mut need = |rep: &mut Report<'_>, name: String, why: String| {
        if !regular.contains(&name) && missing.insert(name.clone()) {
            rep.file(&name, format!("missing ({why})"));
        }
    };
    if !regular.contains(FILES_FILE) {
        need(rep, FILES_FILE.to_string(), "every image has one".into());
    }
    let Some(pstree) = &d.pstree else {
        if !regular.contains(PSTREE_FILE) {
            need(rep, PSTREE_FILE.to_string(), "every image has one".into());
        }
        return;
    };
    if pstree.is_empty() {
        rep.file(PSTREE_FILE, "holds no process");
    }
    let mut pids = BTreeSet::new();
    let mut tids = BTreeSet::new();
    // Live processes and their threads: those have per-process files.
    let mut live = BTreeSet::new();
    let mut live_tids = BTreeSet::new();
    for e in pstree {
        if !pids.insert(e.pid) {
            rep.file(PSTREE_FILE, format!("process {} appears twice", e.pid));
        }
        if !e.zombie {
            live.insert(e.pid);
            live_tids.extend(e.threads.iter().copied());
        } else {
            check_zombie(rep, e);
        }
        if !e.threads.contains(&e.pid) {
            rep.file(
                PSTREE_FILE,
                format!(
                    "process {}: its threads {:?} do not include its pid",
                    e.pid, e.threads
                ),
            );
        }
        for &tid in &e.threads {
            if !tids.insert(tid) {
                rep.file(PSTREE_FILE, format!("thread {tid} appears twice"));
            }
        }
    }
    if let Some(root) = root_pid {
        if !pids.contains(&root) {
            rep.file(
                INVENTORY_FILE,
                format!("root pid {root} is not a process of pstree.img"),
            );
        } else if pstree.first().map(|e| e.pid) != Some(root) {
            rep.file(
                PSTREE_FILE,
                format!("the root process {root} is not the first entry"),
            );
        }
        if pstree.iter().any(|e| e.pid == root && e.zombie) {
            rep.file(PSTREE_FILE, format!("the root process {root} is a zombie"));
        }
        for e in pstree {
            if e.pid != root && !pids.contains(&e.ppid) {
                rep.file(
                    PSTREE_FILE,
                    format!("process {}: parent {} is not in the image", e.pid, e.ppid),
                );
            }
        }
    }
    // Parents come before their children; a zombie has no children (the
    // kernel hands them over when it exits).
    let mut seen = BTreeSet::new();
    for e in pstree {
        if pids.contains(&e.ppid) && !seen.contains(&e.ppid) && e.ppid != e.pid {
            rep.file(
                PSTREE_FILE,
                format!("process {} comes before its parent {}", e.pid, e.ppid),
            );
        }
        if pstree.iter().any(|p| p.pid == e.ppid && p.zombie) {
            rep.file(
                PSTREE_FILE,
                format!(
                    "process {}: its parent {} is a zombie, which cannot have children",
                    e.pid, e.ppid
                ),
            );
        }
        seen.insert(e.pid);
    }
    for e in pstree.iter().filter(|e| !e.zombie) {
        let why = format!("process {} of pstree.img", e.pid);
        for &tid in &e.threads {
            need(rep, core_file(tid), format!("thread {tid} of {why}"));
        }
        need(rep, mm_file(e.pid), why.clone());
        need(rep, pagemap_file(e.pid), why.clone());
        need(rep, fdinfo_file(e.pid), why.clone());
        need(rep, pages_file(e.pid), why);
    }
    let orphan = |pid: u32| {
        if pids.contains(&pid) {
            format!("belongs to process {pid}, a zombie of pstree.img (zombies have no such file)")
        } else {
            "belongs to no process of pstree.img".to_string()
        }
    };
    for &tid in d.cores.keys() {
        if !live_tids.contains(&tid) {
            let msg = if tids.contains(&tid) {
                format!(
                    "belongs to thread {tid} of a zombie of pstree.img (zombies have no such file)"
                )
            } else {
                "belongs to no thread of pstree.img".to_string()
            };
            rep.file(&core_file(tid), msg);
        }
    }
    for (ids, name) in [
        (
            d.mms.keys().copied().collect::<Vec<_>>(),
            mm_file as fn(u32) -> String,
        ),
        (d.pagemaps.keys().copied().collect(), pagemap_file),
        (d.fdinfos.keys().copied().collect(), fdinfo_file),
        (d.pages.iter().copied().collect(), pages_file),
    ] {
        for pid in ids {
            if !live.contains(&pid) {
                rep.file(&name(pid), orphan(pid));
            }
        }
    }
}

/// A zombie's wait status and exit signal.
fn check_zombie(rep: &mut Report<'_>, e: &PstreeEntry) {
    if load::WaitStatus::of(e.exit_status) == load::WaitStatus::Invalid {
        rep.file(
            PSTREE_FILE,
            format!(
                "zombie {}: exit status {:#x} is neither an exit code nor a fatal signal",
                e.pid, e.exit_status
            ),
        );
    }
    if e.exit_signal > 64 {
        rep.file(
            PSTREE_FILE,
            format!(
                "zombie {}: exit signal {} is not a signal",
                e.pid, e.exit_signal
            ),
        );
    }
}

fn check_cores(rep: &mut Report<'_>, d: &Decoded) {
    let leaders: BTreeSet<u32> = d
        .pstree
        .iter()
        .flatten()
        .filter(|e| !e.zombie)
        .map(|e| e.pid)
        .collect();
    for (&tid, core) in &d.cores {
        let name = core_file(tid);
        if core.tid != tid {
            rep.file(&name, format!("holds thread {}, expected {tid}", core.tid));
        }
        if core.regs.is_none() {
            rep.file(&name, "no registers");
        }
        if core.xsave.len() < XSAVE_MIN || core.xsave.len() > XSAVE_MAX {
            rep.file(
                &name,
                format!(
                    "XSAVE area of {} bytes (expected {XSAVE_MIN}..={XSAVE_MAX})",
                    core.xsave.len()
                ),
            );
        }
        if leaders.contains(&tid) && core.process.is_none() {
            rep.file(&name, "the leader's core lacks the process-wide state");
        }
    }
}

fn check_mms(rep: &mut Report<'_>, d: &Decoded) {
    for (&pid, mm) in &d.mms {
        let name = mm_file(pid);
        let mut prev_end = 0u64;
        for (i, v) in mm.vmas.iter().enumerate() {
            if v.start % PAGE != 0 || v.end % PAGE != 0 || v.end <= v.start {
                rep.file(
                    &name,
                    format!("mapping {i} ({:#x}-{:#x}) is malformed", v.start, v.end),
                );
            } else if v.start < prev_end {
                rep.file(
                    &name,
                    format!(
                        "mapping {i} ({:#x}-{:#x}) overlaps or precedes the previous one",
                        v.start, v.end
                    ),
                );
            }
            if VmaKind::try_from(v.kind).is_err() {
                rep.file(&name, format!("mapping {i} has unknown kind {}", v.kind));
            }
            prev_end = prev_end.max(v.end);
        }
    }
}

/// The first address of `[start, end)` that no mapping of `vmas` whose
/// pages are stored covers (mappings sorted or not); None if all of it is.
fn uncovered(vmas: &[cryo_image::proto::Vma], start: u64, end: u64) -> Option<u64> {
    let mut at = start;
    while at < end {
        match vmas
            .iter()
            .find(|v| v.start <= at && at < v.end && load::kind_stores_pages(v.kind))
        {
            Some(v) => at = v.end,
            None => return Some(at),
        }
    }
    None
}

/// The live parent of `pid` in pstree.img, if there is one.
fn live_parent(d: &Decoded, pid: u32) -> Result<u32, Option<u32>> {
    let pstree = d.pstree.as_deref().unwrap_or_default();
    let Some(e) = pstree.iter().find(|e| e.pid == pid) else {
        return Err(None);
    };
    match pstree.iter().find(|p| p.pid == e.ppid) {
        Some(p) if !p.zombie => Ok(p.pid),
        _ => Err(Some(e.ppid)),
    }
}

/// Runs against mappings (in-parent runs against the parent's too), page
/// counts, and every chunk's checksum. Returns the number of pages read
/// back and verified, and the processes whose stored pages cannot all be
/// read (pages file missing, unreadable or damaged).
fn check_pagemaps(rep: &mut Report<'_>, d: &Decoded) -> (u64, BTreeSet<u32>) {
    let mut checked = 0u64;
    let mut unreadable = BTreeSet::new();
    let mut buf = Vec::new();
    for (&pid, pm) in &d.pagemaps {
        let name = pagemap_file(pid);
        let mm_name = mm_file(pid);
        for &i in &pm.empty_records {
            rep.file(&name, format!("record {i} holds neither a run nor a chunk"));
        }
        let mut prev_end = 0u64;
        // In-parent runs with no live parent: (ppid, runs, pages).
        let mut orphaned: Option<(u32, u64, u64)> = None;
        for (i, e) in pm.runs.iter().enumerate() {
            let end = u64::from(e.nr_pages)
                .checked_mul(PAGE)
                .and_then(|len| e.vaddr.checked_add(len));
            let Some(end) = end.filter(|_| e.vaddr % PAGE == 0 && e.nr_pages > 0) else {
                rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}, {} pages) is malformed",
                        e.vaddr, e.nr_pages
                    ),
                );
                continue;
            };
            if e.flags & !PAGE_IN_PARENT != 0 {
                rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}-{end:#x}) has unknown flags {:#x}",
                        e.vaddr,
                        e.flags & !PAGE_IN_PARENT
                    ),
                );
            }
            if e.vaddr < prev_end {
                rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}-{end:#x}) overlaps or precedes the previous run",
                        e.vaddr
                    ),
                );
            }
            prev_end = prev_end.max(end);
            if let Some(mm) = d.mms.get(&pid) {
                // Else its own problem, reported already.
                check_run_in_mm(rep, &name, &mm_name, mm, i, e.vaddr, end, e.nr_pages);
            }
            if load::in_parent(e) {
                match live_parent(d, pid) {
                    Err(None) => {} // no pstree entry: reported with the files
                    Err(Some(ppid)) => {
                        let o = orphaned.get_or_insert((ppid, 0, 0));
                        o.1 += 1;
                        o.2 += u64::from(e.nr_pages);
                    }
                    Ok(ppid) => {
                        if let Some(pmm) = d.mms.get(&ppid) {
                            if let Some(at) = uncovered(&pmm.vmas, e.vaddr, end) {
                                rep.file(
                                    &name,
                                    format!(
                                        "run {i} ({:#x}-{end:#x}) is its parent's pages, but no mapping of {} with stored pages covers {at:#x}",
                                        e.vaddr,
                                        mm_file(ppid)
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        if let Some((ppid, runs, pages)) = orphaned {
            rep.file(
                &name,
                format!(
                    "{runs} runs ({pages} pages) are its parent's pages, but its parent {ppid} is not a live process of the image"
                ),
            );
        }
        let (runs, chunks) = (pm.stored_pages(), pm.chunk_pages());
        if runs != chunks || runs != pm.head.total_pages {
            rep.file(
                &name,
                format!(
                    "page counts disagree: stored runs hold {runs} pages, chunks {chunks}, the head says {}",
                    pm.head.total_pages
                ),
            );
            unreadable.insert(pid);
        }

        // The pages file, chunk by chunk.
        let expected = pages_file(pid);
        if pm.head.pages_file != expected {
            rep.file(
                &name,
                format!(
                    "names pages file {:?}, expected {expected}",
                    pm.head.pages_file
                ),
            );
            unreadable.insert(pid);
            continue;
        }
        let Some(compression) = pm.compression() else {
            rep.file(
                &name,
                format!("unknown compression {}", pm.head.compression),
            );
            unreadable.insert(pid);
            continue;
        };
        let mut sane = true;
        for (i, c) in pm.chunks.iter().enumerate() {
            if u64::from(c.nr_pages) * PAGE > MAX_CHUNK_LEN as u64 {
                rep.file(
                    &name,
                    format!(
                        "chunk {i} claims {} pages, more than a chunk can hold",
                        c.nr_pages
                    ),
                );
                sane = false;
            }
        }
        if !sane {
            unreadable.insert(pid);
            continue;
        }
        let reader = match PageReader::open(rep.dir, &expected, compression, pm.chunks.clone()) {
            Ok(r) => r,
            Err(ImageError::Missing { .. }) => {
                // Reported with the files.
                unreadable.insert(pid);
                continue;
            }
            Err(e) => {
                rep.error(e);
                unreadable.insert(pid);
                continue;
            }
        };
        for (i, c) in pm.chunks.iter().enumerate() {
            let len = c.nr_pages as usize * PAGE_SIZE;
            if buf.len() < len {
                // Bounded by MAX_CHUNK_LEN above; still, no abort on OOM.
                if buf.try_reserve_exact(len - buf.len()).is_err() {
                    rep.file(
                        &expected,
                        format!("chunk {i}: cannot allocate {len} bytes to check it"),
                    );
                    unreadable.insert(pid);
                    continue;
                }
            }
            buf.resize(len, 0);
            match reader.read_chunk(i, &mut buf) {
                Ok(()) => checked += u64::from(c.nr_pages),
                Err(e) => {
                    rep.error(e);
                    unreadable.insert(pid);
                }
            }
        }
    }
    (checked, unreadable)
}

/// A run of `pagemap` (`start..end`) against the process's own mappings.
#[allow(clippy::too_many_arguments)]
fn check_run_in_mm(
    rep: &mut Report<'_>,
    name: &str,
    mm_name: &str,
    mm: &MmEntry,
    i: usize,
    start: u64,
    end: u64,
    nr_pages: u32,
) {
    match mm.vmas.iter().find(|v| v.start <= start && end <= v.end) {
        None => rep.file(
            name,
            format!(
                "run {i} ({start:#x}-{end:#x}, {nr_pages} pages) lies outside every mapping of {mm_name}"
            ),
        ),
        Some(v) if !load::kind_stores_pages(v.kind) => rep.file(
            name,
            format!(
                "run {i} ({start:#x}-{end:#x}) lies in the {} mapping {:#x}-{:#x} of {mm_name}, whose pages are not stored",
                load::vma_kind_name(v.kind),
                v.start,
                v.end
            ),
        ),
        Some(_) => {}
    }
}

/// Counts, per process, the pages of `[start, end)` of `pid`'s parent
/// chain that end up read from that process's pages file.
fn suppliers(
    d: &Decoded,
    pid: u32,
    start: u64,
    end: u64,
    depth: usize,
    out: &mut BTreeMap<u32, u64>,
) {
    let Ok(parent) = live_parent(d, pid) else {
        return; // reported by check_pagemaps
    };
    let Some(pm) = d.pagemaps.get(&parent) else {
        return; // reported with the files
    };
    for r in &pm.runs {
        let r_end = r
            .vaddr
            .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
        let (lo, hi) = (r.vaddr.max(start), r_end.min(end));
        if lo >= hi {
            continue;
        }
        if !load::in_parent(r) {
            *out.entry(parent).or_default() += (hi - lo) / PAGE;
        } else if depth < d.pagemaps.len() {
            suppliers(d, parent, lo, hi, depth + 1, out);
        }
    }
}

/// A process's in-parent pages must be readable where they are stored: in
/// the parent's pages file, or an ancestor's further up.
fn check_parent_pages(rep: &mut Report<'_>, d: &Decoded, unreadable: &BTreeSet<u32>) {
    if unreadable.is_empty() {
        return;
    }
    for (&pid, pm) in &d.pagemaps {
        let mut from = BTreeMap::new();
        for r in pm.runs.iter().filter(|r| load::in_parent(r)) {
            let end = r
                .vaddr
                .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
            suppliers(d, pid, r.vaddr, end, 0, &mut from);
        }
        for (owner, n) in from {
            if unreadable.contains(&owner) {
                rep.file(
                    &pagemap_file(pid),
                    format!(
                        "{n} pages it shares with its parent are stored in {} (process {owner}), which cannot be read",
                        pages_file(owner)
                    ),
                );
            }
        }
    }
}

fn check_fds(rep: &mut Report<'_>, d: &Decoded) {
    use cryo_image::proto::FileKind;
    let mut ids = BTreeSet::new();
    // Pty pairs: one master per index; every slave's and every
    // controlling terminal's master in the image.
    let mut masters = BTreeSet::new();
    if let Some(files) = &d.files {
        for f in files {
            if !ids.insert(f.id) {
                rep.file(FILES_FILE, format!("file id {} appears twice", f.id));
            }
            let kind = FileKind::try_from(f.kind);
            if kind.is_err() {
                rep.file(
                    FILES_FILE,
                    format!("file id {} has unknown kind {}", f.id, f.kind),
                );
            }
            let pty_end = matches!(kind, Ok(FileKind::FilePtyMaster | FileKind::FilePtySlave));
            if pty_end && f.pty.is_none() {
                rep.file(
                    FILES_FILE,
                    format!("file id {}: a pty end without its pty state", f.id),
                );
            }
            if let (Ok(FileKind::FilePtyMaster), Some(p)) = (kind, &f.pty) {
                if !masters.insert(p.index) {
                    rep.file(
                        FILES_FILE,
                        format!("file id {}: a second master of pty {}", f.id, p.index),
                    );
                }
            }
        }
        for f in files
            .iter()
            .filter(|f| f.kind == FileKind::FilePtySlave as i32)
        {
            if let Some(p) = f.pty.as_ref().filter(|p| !masters.contains(&p.index)) {
                rep.file(
                    FILES_FILE,
                    format!(
                        "file id {}: a slave of pty {}, whose master is not in the image",
                        f.id, p.index
                    ),
                );
            }
        }
        for e in d.pstree.iter().flatten() {
            if let Some(index) = e.pty_ctty.filter(|i| !masters.contains(i)) {
                rep.file(
                    PSTREE_FILE,
                    format!(
                        "process {}: its controlling terminal is pty {index}, whose master is not in {FILES_FILE}",
                        e.pid
                    ),
                );
            }
        }
    }
    for (&pid, fds) in &d.fdinfos {
        let name = fdinfo_file(pid);
        let mut seen = BTreeSet::new();
        for e in fds {
            if !seen.insert(e.fd) {
                rep.file(&name, format!("fd {} appears twice", e.fd));
            }
            if d.files.is_some() && !ids.contains(&e.id) {
                rep.file(
                    &name,
                    format!(
                        "fd {} refers to file id {}, which {FILES_FILE} does not hold",
                        e.fd, e.id
                    ),
                );
            }
        }
    }
}
