//! `cryo image verify`: checks an image directory thoroughly and reports
//! every problem found, one line each, naming the file.
//!
//! Checked: the framing of every file (magics; every record decodes), the
//! inventory (seal, format version, and each listed file's existence, size
//! and xxh3), files present but not listed, every page chunk's checksum, and
//! the cross-references between files (pstree -> per-task files, pagemap
//! runs -> mappings, page counts, fdinfo -> files.img).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Display;
use std::path::Path;

use anyhow::Context;
use cryo_image::proto::{CoreEntry, FdEntry, FileEntry, MmEntry, PstreeEntry, VmaKind};
use cryo_image::{
    core_file, fdinfo_file, mm_file, pagemap_file, pages_file, parse_file_name, ImageError, Kind,
    PageReader, FILES_FILE, FORMAT_MAJOR, INVENTORY_FILE, MAX_CHUNK_LEN, PAGE_SIZE, PSTREE_FILE,
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
    let pages_checked = check_pagemaps(&mut rep, &d);
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
    for e in pstree {
        if !pids.insert(e.pid) {
            rep.file(PSTREE_FILE, format!("process {} appears twice", e.pid));
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
    for e in pstree {
        let why = format!("process {} of pstree.img", e.pid);
        for &tid in &e.threads {
            need(rep, core_file(tid), format!("thread {tid} of {why}"));
        }
        need(rep, mm_file(e.pid), why.clone());
        need(rep, pagemap_file(e.pid), why.clone());
        need(rep, fdinfo_file(e.pid), why.clone());
        need(rep, pages_file(e.pid), why);
    }
    let orphan = "belongs to no process of pstree.img";
    for &tid in d.cores.keys() {
        if !tids.contains(&tid) {
            rep.file(&core_file(tid), "belongs to no thread of pstree.img");
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
            if !pids.contains(&pid) {
                rep.file(&name(pid), orphan);
            }
        }
    }
}

fn check_cores(rep: &mut Report<'_>, d: &Decoded) {
    let leaders: BTreeSet<u32> = d.pstree.iter().flatten().map(|e| e.pid).collect();
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

/// Runs against mappings, page counts, and every chunk's checksum.
/// Returns the number of pages read back and verified.
fn check_pagemaps(rep: &mut Report<'_>, d: &Decoded) -> u64 {
    let mut checked = 0u64;
    let mut buf = Vec::new();
    for (&pid, pm) in &d.pagemaps {
        let name = pagemap_file(pid);
        let mm_name = mm_file(pid);
        for &i in &pm.empty_records {
            rep.file(&name, format!("record {i} holds neither a run nor a chunk"));
        }
        let mut prev_end = 0u64;
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
            let Some(mm) = d.mms.get(&pid) else {
                continue; // its own problem, reported already
            };
            match mm
                .vmas
                .iter()
                .find(|v| v.start <= e.vaddr && end <= v.end)
            {
                None => rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}-{end:#x}, {} pages) lies outside every mapping of {mm_name}",
                        e.vaddr, e.nr_pages
                    ),
                ),
                Some(v) if !load::kind_stores_pages(v.kind) => rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}-{end:#x}) lies in the {} mapping {:#x}-{:#x} of {mm_name}, whose pages are not stored",
                        e.vaddr,
                        load::vma_kind_name(v.kind),
                        v.start,
                        v.end
                    ),
                ),
                Some(_) => {}
            }
        }
        let (runs, chunks) = (pm.run_pages(), pm.chunk_pages());
        if runs != chunks || runs != pm.head.total_pages {
            rep.file(
                &name,
                format!(
                    "page counts disagree: runs hold {runs} pages, chunks {chunks}, the head says {}",
                    pm.head.total_pages
                ),
            );
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
            continue;
        }
        let Some(compression) = pm.compression() else {
            rep.file(
                &name,
                format!("unknown compression {}", pm.head.compression),
            );
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
            continue;
        }
        let reader = match PageReader::open(rep.dir, &expected, compression, pm.chunks.clone()) {
            Ok(r) => r,
            Err(ImageError::Missing { .. }) => continue, // reported with the files
            Err(e) => {
                rep.error(e);
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
                    continue;
                }
            }
            buf.resize(len, 0);
            match reader.read_chunk(i, &mut buf) {
                Ok(()) => checked += u64::from(c.nr_pages),
                Err(e) => rep.error(e),
            }
        }
    }
    checked
}

fn check_fds(rep: &mut Report<'_>, d: &Decoded) {
    let mut ids = BTreeSet::new();
    if let Some(files) = &d.files {
        for f in files {
            if !ids.insert(f.id) {
                rep.file(FILES_FILE, format!("file id {} appears twice", f.id));
            }
            if cryo_image::proto::FileKind::try_from(f.kind).is_err() {
                rep.file(
                    FILES_FILE,
                    format!("file id {} has unknown kind {}", f.id, f.kind),
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
