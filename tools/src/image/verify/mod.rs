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

mod pages;
mod tasks;

use pages::*;
use tasks::*;

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
    namespaces: Vec<cryo_image::proto::NamespaceEntry>,
    cgroups: Vec<cryo_image::proto::CgroupDir>,
    /// The mount ids of the tmpfs-ID.img files that read whole.
    tmpfs: BTreeSet<u32>,
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
        let holder = [
            cryo_engine::mem::track::SOCKET,
            cryo_engine::mem::track::PID_FILE,
        ];
        if m.is_file() && !holder.contains(&name.as_str()) {
            regular.insert(name);
        } else if (name == cryo_image::PARENT_LINK && m.file_type().is_symlink())
            || holder.contains(&name.as_str())
        {
            // The parent image's link (checked with the pages that refer
            // to it), a pre-dump's holder.
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
    tasks::check_namespaces(&mut rep, &d);
    tasks::check_mounts(&mut rep, &d);
    tasks::check_cgroups(&mut rep, &d);
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
            Kind::Namespaces => match load::read_all(dir, name, kind) {
                Ok(v) => d.namespaces = v,
                Err(e) => rep.error(e),
            },
            Kind::Cgroups => match load::read_all(dir, name, kind) {
                Ok(v) => d.cgroups = v,
                Err(e) => rep.error(e),
            },
            Kind::Tmpfs => match tasks::read_tmpfs(dir, name) {
                Ok(()) => {
                    d.tmpfs.insert(id);
                }
                Err(e) => rep.error(e),
            },
        }
    }
    d
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
                if !masters.insert((p.devpts, p.index)) {
                    rep.file(
                        FILES_FILE,
                        format!("file id {}: a second master of pty {}", f.id, p.index),
                    );
                }
            }
        }
        // (A hung-up slave, whose master was closed, has none.)
        for f in files
            .iter()
            .filter(|f| f.kind == FileKind::FilePtySlave as i32 && !f.deleted)
        {
            if let Some(p) = f
                .pty
                .as_ref()
                .filter(|p| !masters.contains(&(p.devpts, p.index)))
            {
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
            if let Some(index) = e.pty_ctty.filter(|i| !masters.contains(&(0, *i))) {
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
