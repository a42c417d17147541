//! Loading an image for restore: the inventory first (format version,
//! every file's size and checksum), then every metadata file, checked
//! against each other, so that a damaged image is refused before anything
//! is created.

#![forbid(unsafe_code)]

use crate::ns::pid::PidMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cryo_image::proto::{
    self, CoreEntry, FdEntry, FileEntry, FileKind, Inventory, MmEntry, PageChunk, PagemapEntry,
    PagemapHead, PagemapRecord, PstreeEntry, VmaKind,
};
use cryo_image::{ImageError, ImageReader, Kind, PageReader};

#[derive(Debug, thiserror::Error)]
pub enum ImageLoadError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
    #[error("{file}: listed in inventory.img but {what}")]
    Listing { file: String, what: String },
    #[error("{file}: owned by uid {owner}, not by uid {euid} that runs cryo; only root restores an image that another user wrote")]
    Foreign { file: String, owner: u32, euid: u32 },
}

/// Without root, every file of the image directory (and the directory)
/// must be the caller's own: an image is a program's memory, registers and
/// descriptors, and another user's image would run with what they chose.
fn check_owner(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 {
        return Ok(());
    }
    let foreign = |path: &Path, owner: u32| ImageLoadError::Foreign {
        file: path.display().to_string(),
        owner,
        euid,
    };
    // What cannot be read here is reported by the reads that follow.
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if meta.uid() != euid {
        return Err(foreign(dir, meta.uid()));
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.uid() != euid {
                return Err(foreign(&path, m.uid()));
            }
        }
    }
    Ok(())
}

type Result<T> = std::result::Result<T, ImageLoadError>;

fn invalid(file: &str, what: impl Into<String>) -> ImageLoadError {
    ImageLoadError::Invalid {
        file: file.to_string(),
        what: what.into(),
    }
}

/// A loaded and cross-checked single-process image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub inventory: Inventory,
    pub pstree: PstreeEntry,
    pub core: CoreEntry,
    /// The cores of the other threads, in pstree's order.
    pub threads: Vec<CoreEntry>,
    pub mm: MmEntry,
    pub pagemap_head: PagemapHead,
    pub runs: Vec<PagemapEntry>,
    pub chunks: Vec<PageChunk>,
    pub fds: Vec<FdEntry>,
    pub files: Vec<FileEntry>,
}

impl Image {
    pub fn pid(&self) -> i32 {
        self.pstree.pid as i32
    }

    /// Open the pages file (checks its header and that every chunk lies
    /// inside it).
    pub fn page_reader(&self) -> Result<PageReader> {
        let comp = proto::Compression::try_from(self.pagemap_head.compression).map_err(|_| {
            invalid(
                &cryo_image::pagemap_file(self.pstree.pid),
                "unknown compression",
            )
        })?;
        Ok(PageReader::open(
            &self.dir,
            &self.pagemap_head.pages_file,
            comp,
            self.chunks.clone(),
        )?)
    }

    /// Load a single-process image (the first process of the tree).
    pub fn load(dir: &Path) -> Result<Image> {
        let mut t = TreeImage::load(dir)?;
        Ok(t.procs.swap_remove(0))
    }
}

/// A loaded and cross-checked image of one or more process trees.
#[derive(Debug, Clone)]
pub struct TreeImage {
    pub inventory: Inventory,
    /// Live processes in pstree order (the root first, parents before
    /// their children).
    pub procs: Vec<Image>,
    /// Zombies: only their ids and wait status.
    pub zombies: Vec<PstreeEntry>,
    /// The namespaces that were not the dumping cryo's (namespaces.img).
    pub namespaces: Vec<cryo_image::proto::NamespaceEntry>,
    /// Every pid of the tree at each level of its pid namespaces.
    pub pids: PidMap,
    /// The tree's cgroups with their settings (cgroups.img).
    pub cgroups: Vec<cryo_image::proto::CgroupDir>,
}

impl TreeImage {
    pub fn load(dir: &Path) -> Result<TreeImage> {
        check_owner(dir)?;
        let inventory = cryo_image::read_inventory(dir)?;
        // Sizes of every file; full checksums of the metadata files (page
        // chunks carry their own checksums, checked as they are read).
        for f in &inventory.files {
            let path = dir.join(&f.name);
            if f.name.contains('/') || f.name.starts_with('.') {
                return Err(invalid(
                    "inventory.img",
                    format!("bad file name {:?}", f.name),
                ));
            }
            let kind = Kind::from_file_name(&f.name);
            if kind == Some(Kind::Pages) {
                let size = std::fs::metadata(&path).map(|m| m.len()).map_err(|e| {
                    ImageLoadError::Listing {
                        file: f.name.clone(),
                        what: format!("cannot be read: {e}"),
                    }
                })?;
                if size != f.size {
                    return Err(ImageLoadError::Listing {
                        file: f.name.clone(),
                        what: format!("its size is {size} bytes, the inventory says {}", f.size),
                    });
                }
            } else {
                let (size, hash) = cryo_image::hash_file(&path)?;
                if size != f.size {
                    return Err(ImageLoadError::Listing {
                        file: f.name.clone(),
                        what: format!("its size is {size} bytes, the inventory says {}", f.size),
                    });
                }
                if hash != f.xxh3 {
                    return Err(ImageLoadError::Listing {
                        file: f.name.clone(),
                        what: format!("its checksum is {hash:016x}, the inventory says {:016x} (the file was changed or damaged)", f.xxh3),
                    });
                }
            }
        }
        if inventory.pre_dump {
            return Err(invalid(
                "inventory.img",
                "the image is a pre-dump (memory only): restore the dump made after it with --prev-images-dir",
            ));
        }
        let listed: HashSet<&str> = inventory.files.iter().map(|f| f.name.as_str()).collect();
        let need = |name: &str| -> Result<()> {
            if listed.contains(name) {
                Ok(())
            } else {
                Err(invalid(
                    "inventory.img",
                    format!("does not list {name}; the image is incomplete"),
                ))
            }
        };
        need(cryo_image::PSTREE_FILE)?;
        need(cryo_image::FILES_FILE)?;
        let mut entries: Vec<PstreeEntry> = Vec::new();
        let mut r = ImageReader::open(dir, cryo_image::PSTREE_FILE, Kind::Pstree)?;
        while let Some(e) = r.next::<PstreeEntry>()? {
            entries.push(e);
        }
        let first = entries
            .first()
            .ok_or_else(|| invalid(cryo_image::PSTREE_FILE, "no process"))?;
        if first.pid != inventory.root_pid || first.zombie {
            return Err(invalid(
                cryo_image::PSTREE_FILE,
                format!(
                    "the first process {} is not the inventory's live root {}",
                    first.pid, inventory.root_pid
                ),
            ));
        }
        let mut ids = HashSet::new();
        for e in &entries {
            for &id in std::iter::once(&e.pid).chain(e.threads.iter().skip(1)) {
                if id == 0 || id > 4_194_304 || !ids.insert(id) {
                    return Err(invalid(
                        cryo_image::PSTREE_FILE,
                        format!("bad or repeated pid {id}"),
                    ));
                }
            }
        }
        let mut files = Vec::new();
        let mut r = ImageReader::open(dir, cryo_image::FILES_FILE, Kind::Files)?;
        while let Some(e) = r.next::<FileEntry>()? {
            files.push(e);
        }
        check_ptys(&entries, &files)?;
        let mut procs = Vec::new();
        let mut zombies = Vec::new();
        for pstree in entries {
            if pstree.zombie {
                zombies.push(pstree);
                continue;
            }
            procs.push(Image::load_process(dir, &inventory, &need, pstree, &files)?);
        }
        // Pages kept in a parent's image need that parent in the image.
        for p in &procs {
            let has_parent = procs.iter().any(|q| q.pstree.pid == p.pstree.ppid);
            if !has_parent
                && p.runs
                    .iter()
                    .any(|r| r.flags & cryo_image::PAGE_IN_PARENT != 0)
            {
                return Err(invalid(
                    &cryo_image::pagemap_file(p.pstree.pid),
                    format!(
                        "has pages of its parent {}, which is not in the image",
                        p.pstree.ppid
                    ),
                ));
            }
        }
        // Written only when a task was in a namespace of its own.
        let mut namespaces = Vec::new();
        if listed.contains(cryo_image::NAMESPACES_FILE) {
            let mut r = ImageReader::open(dir, cryo_image::NAMESPACES_FILE, Kind::Namespaces)?;
            while let Some(e) = r.next::<cryo_image::proto::NamespaceEntry>()? {
                namespaces.push(e);
            }
        }
        // Written only when a task was in a cgroup other than a root; the
        // paths and setting names must be plain.
        let mut cgroups = Vec::new();
        if listed.contains(cryo_image::CGROUPS_FILE) {
            let mut r = ImageReader::open(dir, cryo_image::CGROUPS_FILE, Kind::Cgroups)?;
            while let Some(c) = r.next::<cryo_image::proto::CgroupDir>()? {
                let plain = |s: &str| !s.is_empty() && !s.contains('/') && !s.starts_with('.');
                if !c.path.starts_with('/')
                    || c.path.split('/').any(|p| p == "..")
                    || !c.settings.iter().all(|s| plain(&s.name))
                    || !c.enabled.iter().all(|e| plain(e))
                {
                    return Err(invalid(
                        cryo_image::CGROUPS_FILE,
                        format!("cgroup {:?}: a path or setting that is not plain", c.path),
                    ));
                }
                cgroups.push(c);
            }
        }
        // Without namespaces.img every namespace was the dumping cryo's
        // (so are those of images made before it existed).
        if namespaces.is_empty() {
            for p in procs.iter_mut() {
                for id in p
                    .core
                    .process
                    .iter_mut()
                    .flat_map(|pc| pc.namespaces.iter_mut())
                {
                    id.host = true;
                }
            }
        }
        for p in &procs {
            let pc = p.core.process.as_ref();
            for id in pc
                .iter()
                .flat_map(|pc| pc.namespaces.iter())
                .filter(|i| !i.host)
            {
                if !namespaces
                    .iter()
                    .any(|e| e.kind == id.kind && e.inode == id.inode)
                {
                    return Err(invalid(
                        cryo_image::NAMESPACES_FILE,
                        format!(
                            "does not describe the {} namespace {} of process {}",
                            id.kind,
                            id.inode,
                            p.pid()
                        ),
                    ));
                }
            }
        }
        let pids = PidMap::new(
            procs.iter().map(|p| &p.pstree).chain(zombies.iter()),
            procs
                .iter()
                .flat_map(|p| p.threads.iter().map(|t| (t.tid, t.ns_tids.as_slice()))),
        );
        Ok(TreeImage {
            inventory,
            procs,
            zombies,
            namespaces,
            pids,
            cgroups,
        })
    }
}

/// Pty pairs: one master per index of each devpts instance, and the
/// master of every slave and of every controlling terminal (of cryo's
/// devpts) in the image.
fn check_ptys(entries: &[PstreeEntry], files: &[FileEntry]) -> Result<()> {
    let files_img = cryo_image::FILES_FILE;
    let mut masters = HashSet::new();
    for f in files {
        let master = f.kind == FileKind::FilePtyMaster as i32;
        if !master && f.kind != FileKind::FilePtySlave as i32 {
            continue;
        }
        let Some(pty) = &f.pty else {
            return Err(invalid(
                files_img,
                format!("file {}: a pty end without its pty state", f.id),
            ));
        };
        if master && !masters.insert((pty.devpts, pty.index)) {
            return Err(invalid(
                files_img,
                format!("file {}: a second master of pty {}", f.id, pty.index),
            ));
        }
    }
    // (A hung-up slave, whose master was closed, has none.)
    for f in files
        .iter()
        .filter(|f| f.kind == FileKind::FilePtySlave as i32 && !f.deleted)
    {
        let key = f
            .pty
            .as_ref()
            .map(|p| (p.devpts, p.index))
            .unwrap_or_default();
        let index = key.1;
        if !masters.contains(&key) {
            return Err(invalid(
                files_img,
                format!(
                    "file {}: a slave of pty {index}, whose master is not in the image",
                    f.id
                ),
            ));
        }
    }
    for e in entries {
        if let Some(index) = e.pty_ctty.filter(|i| !masters.contains(&(0, *i))) {
            return Err(invalid(
                cryo_image::PSTREE_FILE,
                format!(
                    "process {}: its controlling terminal is pty {index}, whose master is not in {files_img}",
                    e.pid
                ),
            ));
        }
    }
    Ok(())
}

impl Image {
    /// Load and check the files of one live process.
    fn load_process(
        dir: &Path,
        inventory: &Inventory,
        need: &dyn Fn(&str) -> Result<()>,
        pstree: PstreeEntry,
        files: &[FileEntry],
    ) -> Result<Image> {
        let pid = pstree.pid;
        let core_name = cryo_image::core_file(pid);
        let mm_name = cryo_image::mm_file(pid);
        let pm_name = cryo_image::pagemap_file(pid);
        let fd_name = cryo_image::fdinfo_file(pid);
        for n in [&core_name, &mm_name, &pm_name, &fd_name] {
            need(n)?;
        }
        let core: CoreEntry = cryo_image::read_one(dir, &core_name, Kind::Core)?;
        let core = check_leader_core(&core_name, pid, core)?;
        let threads = load_threads(dir, need, &pstree, &core)?;
        let mm: MmEntry = cryo_image::read_one(dir, &mm_name, Kind::Mm)?;
        check_vmas(&mm_name, &mm)?;
        check_held(&mm_name, &core_name, &mm, &core, files)?;
        let (pagemap_head, runs, chunks) = load_pagemap(dir, need, pid, &mm)?;
        let fds = load_fds(dir, &fd_name, files)?;
        Ok(Image {
            dir: dir.to_path_buf(),
            inventory: inventory.clone(),
            pstree,
            core,
            threads,
            mm,
            pagemap_head,
            runs,
            chunks,
            fds,
            files: files.to_vec(),
        })
    }
}

/// The leader's core must have its registers, its process state and a
/// sane XSAVE area.
fn check_leader_core(core_name: &str, pid: u32, core: CoreEntry) -> Result<CoreEntry> {
    if core.tid != pid || core.regs.is_none() || core.process.is_none() {
        return Err(invalid(core_name, "missing registers or process state"));
    }
    if core.xsave.len() < 576 || core.xsave.len() > 64 * 1024 {
        return Err(invalid(
            core_name,
            format!("XSAVE area of {} bytes", core.xsave.len()),
        ));
    }
    Ok(core)
}

/// The cores of the threads other than the leader, each checked against
/// the leader's.
fn load_threads(
    dir: &Path,
    need: &dyn Fn(&str) -> Result<()>,
    pstree: &PstreeEntry,
    core: &CoreEntry,
) -> Result<Vec<CoreEntry>> {
    let pid = pstree.pid;
    if pstree.threads.first() != Some(&pid) {
        return Err(invalid(
            cryo_image::PSTREE_FILE,
            format!("process {pid}: its thread list does not start with the leader"),
        ));
    }
    let depth = pstree.ns_pids.len();
    let bad_levels = |l: &[u32], id: u32| l.len() > 32 || l.first().is_some_and(|&f| f != id);
    if bad_levels(&pstree.ns_pids, pid) {
        return Err(invalid(
            cryo_image::PSTREE_FILE,
            format!("process {pid}: its pids in its pid namespaces do not start with it"),
        ));
    }
    let mut threads = Vec::new();
    let mut seen = HashSet::new();
    for &tid in pstree.threads.iter().skip(1) {
        let name = cryo_image::core_file(tid);
        if tid == 0 || tid > 4_194_304 || !seen.insert(tid) || tid == pid {
            return Err(invalid(
                cryo_image::PSTREE_FILE,
                format!("process {pid}: bad or repeated thread id {tid}"),
            ));
        }
        need(&name)?;
        let c: CoreEntry = cryo_image::read_one(dir, &name, Kind::Core)?;
        if c.tid != tid || c.regs.is_none() || c.process.is_some() {
            return Err(invalid(
                &name,
                "not the core of a non-leader thread (tid, registers)",
            ));
        }
        if bad_levels(&c.ns_tids, tid) || (depth > 1 && c.ns_tids.len() != depth) {
            return Err(invalid(
                &name,
                format!("its tids in {depth} pid namespaces do not match its process's"),
            ));
        }
        if c.xsave.len() != core.xsave.len() {
            return Err(invalid(
                &name,
                format!(
                    "XSAVE area of {} bytes, the leader's has {}",
                    c.xsave.len(),
                    core.xsave.len()
                ),
            ));
        }
        threads.push(c);
    }
    Ok(threads)
}

/// Every mapping page aligned, in order, below the top of user memory,
/// of a known kind.
fn check_vmas(mm_name: &str, mm: &MmEntry) -> Result<()> {
    let mut prev_end = 0;
    for (i, v) in mm.vmas.iter().enumerate() {
        if v.start % 4096 != 0
            || v.end % 4096 != 0
            || v.end <= v.start
            || v.start < prev_end
            || v.end > 0x7fff_ffff_f000
        {
            return Err(invalid(
                mm_name,
                format!(
                    "mapping {i} ({:#x}-{:#x}) is malformed or out of order",
                    v.start, v.end
                ),
            ));
        }
        if VmaKind::try_from(v.kind).is_err() {
            return Err(invalid(
                mm_name,
                format!("mapping {i} has unknown kind {}", v.kind),
            ));
        }
        prev_end = v.end;
    }
    // Each guard region lies inside one premapped mapping, in order.
    let mut prev_end = 0;
    for g in &mm.guards {
        let inside = mm
            .vmas
            .iter()
            .any(|v| v.start <= g.start && g.end <= v.end && crate::mem::restore::needs_premap(v));
        if !inside
            || g.start % 4096 != 0
            || g.end % 4096 != 0
            || g.end <= g.start
            || g.start < prev_end
        {
            return Err(invalid(
                mm_name,
                format!(
                    "guard region {:#x}-{:#x} is malformed or not inside a premapped mapping",
                    g.start, g.end
                ),
            ));
        }
        prev_end = g.end;
    }
    Ok(())
}

/// A mapping of a file with no name left names a memfd or deleted file of
/// files.img; a removed working directory names a removed directory.
fn check_held(
    mm_name: &str,
    core_name: &str,
    mm: &MmEntry,
    core: &CoreEntry,
    files: &[FileEntry],
) -> Result<()> {
    let kind_of = |id: u32| {
        files
            .iter()
            .find(|f| f.id == id)
            .map(|f| (f.kind, f.deleted))
    };
    for v in mm.vmas.iter().filter(|v| v.file_id != 0) {
        let ghost = matches!(
            kind_of(v.file_id),
            Some((k, _)) if k == FileKind::FileMemfd as i32 || k == FileKind::FileDeleted as i32
        );
        let file_map = matches!(
            VmaKind::try_from(v.kind),
            Ok(VmaKind::VmaFilePrivate | VmaKind::VmaFileShared)
        );
        if !ghost || !file_map {
            return Err(invalid(
                mm_name,
                format!(
                    "the mapping at {:#x} names file {}, which is not a memfd or deleted file of {}",
                    v.start,
                    v.file_id,
                    cryo_image::FILES_FILE
                ),
            ));
        }
    }
    let p = core.process.as_ref();
    for (what, id) in [
        ("working directory", p.and_then(|p| p.cwd_file)),
        ("root", p.and_then(|p| p.root_file)),
    ] {
        let Some(id) = id else { continue };
        if kind_of(id) != Some((FileKind::FileDirectory as i32, true)) {
            return Err(invalid(
                core_name,
                format!(
                    "the {what} names file {id}, which is not a removed directory of {}",
                    cryo_image::FILES_FILE
                ),
            ));
        }
    }
    Ok(())
}

impl Image {
    /// The files of files.img this process uses without a descriptor
    /// (mapped memfds and deleted files, a removed working directory or
    /// root).
    pub fn held_files(&self) -> impl Iterator<Item = u32> + '_ {
        let p = self.core.process.as_ref();
        let dirs = [p.and_then(|p| p.cwd_file), p.and_then(|p| p.root_file)];
        self.mm
            .vmas
            .iter()
            .map(|v| v.file_id)
            .filter(|&id| id != 0)
            .chain(dirs.into_iter().flatten())
    }
}

/// A process's runs, chunks and pages file (if asked for).
pub type ProcPages = (Vec<PagemapEntry>, Vec<PageChunk>, Option<PageReader>);

/// The pages of process `pid` in the image in `dir` (a parent image of
/// an incremental one): its runs, chunks and pages file, checked as a
/// restore checks its own; None if the image does not hold the process.
pub fn load_pages_of(dir: &Path, pid: u32, pages: bool) -> Result<Option<ProcPages>> {
    let inventory = cryo_image::read_inventory(dir)?;
    let listed: HashSet<&str> = inventory.files.iter().map(|f| f.name.as_str()).collect();
    if !listed.contains(cryo_image::pagemap_file(pid).as_str()) {
        return Ok(None);
    }
    let need = |name: &str| -> Result<()> {
        match listed.contains(name) {
            true => Ok(()),
            false => Err(invalid(
                "inventory.img",
                format!("does not list {name}; the image is incomplete"),
            )),
        }
    };
    let mm_name = cryo_image::mm_file(pid);
    need(&mm_name)?;
    let mm: MmEntry = cryo_image::read_one(dir, &mm_name, Kind::Mm)?;
    let (head, runs, chunks) = load_pagemap(dir, &need, pid, &mm)?;
    let comp = proto::Compression::try_from(head.compression)
        .map_err(|_| invalid(&cryo_image::pagemap_file(pid), "unknown compression"))?;
    let reader = match pages {
        true => Some(PageReader::open(
            dir,
            &head.pages_file,
            comp,
            chunks.clone(),
        )?),
        false => None,
    };
    Ok(Some((runs, chunks, reader)))
}

/// The pagemap: its header, runs and chunks, which must agree with each
/// other and lie inside restorable mappings of `mm`.
fn load_pagemap(
    dir: &Path,
    need: &dyn Fn(&str) -> Result<()>,
    pid: u32,
    mm: &MmEntry,
) -> Result<(PagemapHead, Vec<PagemapEntry>, Vec<PageChunk>)> {
    let pm_name = cryo_image::pagemap_file(pid);
    let mm_name = cryo_image::mm_file(pid);
    let mut r = ImageReader::open(dir, &pm_name, Kind::Pagemap)?;
    let pagemap_head: PagemapHead = r
        .next()?
        .ok_or_else(|| invalid(&pm_name, "no header record"))?;
    let mut runs = Vec::new();
    let mut chunks = Vec::new();
    while let Some(rec) = r.next::<PagemapRecord>()? {
        match rec.record {
            Some(proto::pagemap_record::Record::Run(e)) => runs.push(e),
            Some(proto::pagemap_record::Record::Chunk(c)) => chunks.push(c),
            None => {
                return Err(invalid(
                    &pm_name,
                    format!("empty record {}", r.record_index()),
                ))
            }
        }
    }
    if pagemap_head.pages_file != cryo_image::pages_file(pid) {
        return Err(invalid(
            &pm_name,
            format!("names pages file {:?}", pagemap_head.pages_file),
        ));
    }
    need(&pagemap_head.pages_file)?;
    let run_pages: u64 = runs
        .iter()
        .filter(|e| !cryo_image::stored_elsewhere(e.flags))
        .map(|e| e.nr_pages as u64)
        .sum();
    let chunk_pages: u64 = chunks.iter().map(|c| c.nr_pages as u64).sum();
    if run_pages != chunk_pages || run_pages != pagemap_head.total_pages {
        return Err(invalid(
            &pm_name,
            format!(
                "runs hold {run_pages} pages, chunks {chunk_pages}, header says {}",
                pagemap_head.total_pages
            ),
        ));
    }
    // Every run lies inside one mapping whose pages are stored.
    let mut prev = 0u64;
    for (i, e) in runs.iter().enumerate() {
        let end = e.vaddr + e.nr_pages as u64 * 4096;
        let ok = e.vaddr % 4096 == 0
            && e.nr_pages > 0
            && e.vaddr >= prev
            && mm.vmas.iter().any(|v| {
                v.start <= e.vaddr
                    && end <= v.end
                    && matches!(
                        VmaKind::try_from(v.kind),
                        Ok(VmaKind::VmaAnonPrivate
                            | VmaKind::VmaAnonShared
                            | VmaKind::VmaFilePrivate
                            | VmaKind::VmaHeap
                            | VmaKind::VmaStack)
                    )
            });
        if !ok {
            return Err(invalid(&pm_name, format!("page run {i} ({:#x}, {} pages) is not inside a restorable mapping of {mm_name}", e.vaddr, e.nr_pages)));
        }
        prev = end;
    }

    Ok((pagemap_head, runs, chunks))
}

/// The descriptors of one process, each naming a file of files.img.
fn load_fds(dir: &Path, fd_name: &str, files: &[FileEntry]) -> Result<Vec<FdEntry>> {
    let mut fds = Vec::new();
    let mut r = ImageReader::open(dir, fd_name, Kind::Fdinfo)?;
    while let Some(e) = r.next::<FdEntry>()? {
        fds.push(e);
    }
    for f in &fds {
        if !files.iter().any(|x| x.id == f.id) {
            return Err(invalid(
                fd_name,
                format!(
                    "fd {} refers to file id {} missing from files.img",
                    f.fd, f.id
                ),
            ));
        }
        if f.fd > 1 << 20 {
            return Err(invalid(
                fd_name,
                format!("fd number {} is out of range", f.fd),
            ));
        }
    }
    Ok(fds)
}
