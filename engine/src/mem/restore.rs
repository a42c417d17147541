//! Restore side of a process's mappings, in the new task before it hands
//! over to the restorer: every private mapping (and every shared
//! anonymous one) is made in a premap area, a range free both in the new
//! task and in the dumped layout, and filled there from the pages file
//! (chunks decompressed in parallel, each straight into its place when it
//! lands in one piece); the restorer moves each to its address with
//! mremap. Shared file mappings are mapped by the restorer itself from
//! descriptors opened here.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Mutex;

use cryo_image::proto::{PagemapEntry, Vma, VmaKind};
use cryo_image::PageReader;
use cryo_parasite::{
    RVma, RVMA_DONTDUMP, RVMA_DONTFORK, RVMA_HUGEPAGE, RVMA_MERGEABLE, RVMA_NOHUGEPAGE,
    RVMA_SEALED, RVMA_SYSV_SHM, RVMA_WIPEONFORK,
};

use super::PAGE;
use crate::restore::image::Image;
use crate::sys::mem::{Backing, Reservation};

pub fn kind(v: &Vma) -> VmaKind {
    VmaKind::try_from(v.kind).unwrap_or(VmaKind::VmaVsyscall)
}

/// Mappings made in the premap area and filled from the image.
pub fn needs_premap(v: &Vma) -> bool {
    matches!(
        kind(v),
        VmaKind::VmaAnonPrivate
            | VmaKind::VmaAnonShared
            | VmaKind::VmaFilePrivate
            | VmaKind::VmaHeap
            | VmaKind::VmaStack
    )
}

pub fn is_vdso(v: &Vma) -> bool {
    matches!(
        kind(v),
        VmaKind::VmaVdso | VmaKind::VmaVvar | VmaKind::VmaVvarVclock
    )
}

/// The premap area: the mappings of one process made at the start of a
/// reserved range, one after the other.
pub struct Premap {
    res: Reservation,
    /// (dumped start, dumped end, offset in the area), in dumped order.
    of: Vec<(u64, u64, u64)>,
    /// The mappings taken whole from the parent's premap area (dumped
    /// start, end): their pages in the parent are the parent's frames.
    adopted: Vec<(u64, u64)>,
}

impl Premap {
    /// Whether the page at dumped address `vaddr` lies in a mapping taken
    /// from the parent.
    pub fn adopted(&self, vaddr: u64) -> bool {
        self.adopted.iter().any(|&(s, e)| s <= vaddr && vaddr < e)
    }

    /// Where the mapping of dumped address `vaddr` is now, in this
    /// process (and in its children, which inherit the area).
    fn addr_of(&self, vaddr: u64) -> Option<u64> {
        Some(self.res.base() + self.offset_of(vaddr)? as u64)
    }

    /// Where the page at dumped address `vaddr` is in the area.
    pub fn offset_of(&self, vaddr: u64) -> Option<usize> {
        // The mappings are in address order (smaps order).
        let i = self.of.partition_point(|m| m.1 <= vaddr);
        let &(s, _, off) = self.of.get(i).filter(|m| m.0 <= vaddr)?;
        Some((off + (vaddr - s)) as usize)
    }

    /// The whole area's bytes (every page of it is mapped).
    pub fn bytes(&mut self) -> Result<&mut [u8], String> {
        self.res
            .bytes_mut()
            .ok_or_else(|| "the premap area is not fully mapped".to_string())
    }

    /// Leave the area to the restorer; returns (base, len).
    pub fn keep(self) -> (u64, u64) {
        self.res.keep()
    }
}

/// The total size of the mappings made in the premap area.
pub fn premap_len(vmas: &[Vma]) -> u64 {
    vmas.iter()
        .filter(|v| needs_premap(v))
        .map(|v| v.end - v.start)
        .sum()
}

/// The madvise advice of a mapping (smaps VmFlags), as the restorer sets it.
fn madv_of(v: &Vma) -> u32 {
    v.vm_flags.iter().fold(0u32, |m, f| {
        m | match f.as_str() {
            "dd" => RVMA_DONTDUMP,
            "dc" => RVMA_DONTFORK,
            "wf" => RVMA_WIPEONFORK,
            "hg" => RVMA_HUGEPAGE,
            "nh" => RVMA_NOHUGEPAGE,
            "mg" => RVMA_MERGEABLE,
            "sl" => RVMA_SEALED,
            _ => 0,
        }
    })
}

/// A mapped file that shrank since the dump would make pages the task
/// could read raise SIGBUS: refuse that.
fn check_file_extent(fd: &impl AsFd, v: &Vma, mm_name: &str) -> Result<(), String> {
    let st = nix::sys::stat::fstat(fd.as_fd())
        .map_err(|e| format!("{mm_name}: fstat of {}: {e}", v.path))?;
    let covered = v.file_size.min(v.pgoff + (v.end - v.start));
    let now = st.st_size as u64;
    if now < covered {
        return Err(format!(
            "{mm_name}: {} is {now} bytes now but was {} at the dump; the mapping at {:#x} would lose pages",
            v.path, v.file_size, v.start
        ));
    }
    Ok(())
}

/// The file of a file mapping, opened by its path, or, for a memfd or a
/// deleted file (`file_id`), through the descriptor of the file cryo made
/// again (one of `files`, inherited).
fn open_file(
    v: &Vma,
    write: bool,
    files: &HashMap<u32, RawFd>,
    mm_name: &str,
    what: &str,
) -> Result<OwnedFd, String> {
    use nix::fcntl::OFlag;
    let acc = if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let path = match v.file_id {
        0 => v.path.clone(),
        id => {
            let fd = files.get(&id).ok_or_else(|| {
                format!(
                    "{mm_name}: no file {id} was made again for the {what} of {} at {:#x}",
                    v.path, v.start
                )
            })?;
            format!("/proc/self/fd/{fd}")
        }
    };
    let fd = nix::fcntl::open(
        path.as_str(),
        acc | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "{mm_name}: opening {} for the {what} at {:#x}: {}",
            v.path,
            v.start,
            std::io::Error::from(e)
        )
    })?;
    check_file_extent(&fd, v, mm_name)?;
    Ok(fd)
}

/// Make every mapping of `img` that is filled from the image in a new
/// premap area at `base` (shared anonymous ones from the tree's objects,
/// `shm`, by id), and list every mapping for the restorer. Shared file
/// mappings get their descriptor later ([`open_shared_files`]).
pub fn premap(
    img: &Image,
    base: u64,
    shm: &HashMap<u64, RawFd>,
    files: &HashMap<u32, RawFd>,
    parent: Option<(&Image, &Premap)>,
) -> Result<(Premap, Vec<RVma>), String> {
    let mm_name = cryo_image::mm_file(img.pstree.pid);
    let vmas = &img.mm.vmas;
    let res = Reservation::new(base, premap_len(vmas)).map_err(|e| {
        format!(
            "reserving memory for the mappings: {}",
            std::io::Error::from(e)
        )
    })?;
    let mut pm = Premap {
        res,
        of: Vec::new(),
        adopted: Vec::new(),
    };
    let mut rvmas = Vec::new();
    let mut off = 0u64;
    for v in vmas {
        let len = v.end - v.start;
        let mut rv = RVma {
            start: v.start,
            len,
            premap: 0,
            prot: v.prot,
            flags: 0,
            pgoff: 0,
            fd: -1,
            madv: madv_of(v),
        };
        match kind(v) {
            VmaKind::VmaFileShared => {
                rv.flags = libc::MAP_SHARED as u32;
                rv.pgoff = v.pgoff;
            }
            // The segment the task's IPC namespace has again, by its id.
            VmaKind::VmaSysvShm => {
                check_whole_attachment(v, &mm_name)?;
                rv.madv |= RVMA_SYSV_SHM;
                rv.pgoff = v.shmid;
            }
            _ if needs_premap(v) => {
                match parent.and_then(|(pimg, ppm)| from_parent(img, v, pimg, ppm)) {
                    Some(src) => {
                        adopt(&mut pm.res, img, v, off, src, &mm_name)?;
                        pm.adopted.push((v.start, v.end));
                    }
                    None => map_one(&mut pm.res, v, off, (shm, files), &mm_name)?,
                }
                pm.of.push((v.start, v.end, off));
                rv.premap = base + off;
                off += len;
            }
            _ => continue,
        }
        rvmas.push(rv);
    }
    Ok((pm, rvmas))
}

/// The page runs (stored or in the parent) of mapping `v`: the image
/// checked they are in address order, each inside one mapping.
fn runs_in<'a>(img: &'a Image, v: &Vma) -> &'a [PagemapEntry] {
    let from = img.runs.partition_point(|r| r.vaddr < v.start);
    let to = img.runs.partition_point(|r| r.vaddr < v.end);
    &img.runs[from..to.max(from)]
}

/// Where, in the parent's premap area (inherited by the fork), the same
/// private mapping is, when this process still shared pages of it with
/// the parent copy-on-write at the dump: the parent's mapping of the same
/// range, kind, flags (and file) without guard regions. Taking it whole
/// keeps those pages one frame.
fn from_parent(img: &Image, v: &Vma, pimg: &Image, ppm: &Premap) -> Option<u64> {
    if !matches!(
        kind(v),
        VmaKind::VmaAnonPrivate | VmaKind::VmaHeap | VmaKind::VmaStack | VmaKind::VmaFilePrivate
    ) {
        return None;
    }
    let shares = runs_in(img, v)
        .iter()
        .any(|r| r.flags & cryo_image::PAGE_IN_PARENT != 0);
    let pv = pimg.mm.vmas.iter().find(|p| p.start == v.start)?;
    let same = (
        pv.end,
        pv.kind,
        &pv.vm_flags,
        &pv.path,
        pv.pgoff,
        pv.file_id,
    ) == (v.end, v.kind, &v.vm_flags, &v.path, v.pgoff, v.file_id);
    let guarded = pimg
        .mm
        .guards
        .iter()
        .any(|g| g.start < v.end && v.start < g.end);
    if !shares || !same || guarded {
        return None;
    }
    ppm.addr_of(v.start)
}

/// Take the parent's copy of mapping `v` (at `src`, inherited) into the
/// area at `off`; the pages this process had neither stored nor shared
/// with the parent are dropped from it (zeros again, or the file's).
fn adopt(
    res: &mut Reservation,
    img: &Image,
    v: &Vma,
    off: u64,
    src: u64,
    mm_name: &str,
) -> Result<(), String> {
    let len = v.end - v.start;
    let err = |what: &str, e: nix::errno::Errno| {
        format!(
            "{mm_name}: {what} the parent's copy of the mapping at {:#x}: {}",
            v.start,
            std::io::Error::from(e)
        )
    };
    res.adopt(off, len, src).map_err(|e| err("taking", e))?;
    // The runs of the process inside `v`, in address order.
    let covered = runs_in(img, v)
        .iter()
        .map(|r| (r.vaddr, r.vaddr + r.nr_pages as u64 * PAGE));
    let mut at = v.start;
    for (s, e) in covered.into_iter().chain(std::iter::once((v.end, v.end))) {
        if s > at {
            res.discard(off + (at - v.start), s - at)
                .map_err(|e| err("dropping pages of", e))?;
        }
        at = at.max(e);
    }
    Ok(())
}

/// One private or shared anonymous mapping, or a private file mapping,
/// at `off` in the area.
fn map_one(
    res: &mut Reservation,
    v: &Vma,
    off: u64,
    (shm, files): (&HashMap<u64, RawFd>, &HashMap<u32, RawFd>),
    mm_name: &str,
) -> Result<(), String> {
    let len = v.end - v.start;
    let growsdown = v.vm_flags.iter().any(|f| f == "gd");
    let made = match kind(v) {
        VmaKind::VmaFilePrivate => {
            let fd = open_file(v, false, files, mm_name, "mapping")?;
            let backing = Backing::File {
                fd: fd.as_fd(),
                offset: v.pgoff,
                shared: false,
            };
            res.map(off, len, backing, growsdown)
        }
        VmaKind::VmaAnonShared => {
            // The one object of the tree, made by cryo before it created
            // the tasks.
            let fd = *shm.get(&v.shmid).ok_or_else(|| {
                format!(
                    "{mm_name}: no shared object {} for the mapping at {:#x}",
                    v.shmid, v.start
                )
            })?;
            // Inherited from cryo, open until the task hands over.
            let fd = crate::sys::fd::borrow(fd);
            let backing = Backing::File {
                fd,
                offset: v.pgoff,
                shared: true,
            };
            res.map(off, len, backing, growsdown)
        }
        _ if v.vm_flags.iter().any(|f| f == "dp") => res.map(off, len, Backing::Droppable, false),
        _ => res.map(off, len, Backing::Anon { shared: false }, growsdown),
    };
    made.map_err(|e| {
        format!(
            "{mm_name}: preparing the mapping at {:#x}: {}",
            v.start,
            std::io::Error::from(e)
        )
    })
}

/// The guard regions of the process, installed in the premap area once
/// every page is filled (the restorer's mremap moves them along).
pub fn install_guards(img: &Image, premap: &mut Premap) -> Result<(), String> {
    for g in &img.mm.guards {
        let off = premap.offset_of(g.start).ok_or_else(|| {
            format!(
                "{}: the guard region at {:#x} is in no premapped mapping",
                cryo_image::mm_file(img.pstree.pid),
                g.start
            )
        })?;
        premap.res.guard(off as u64, g.end - g.start).map_err(|e| {
            format!(
                "installing the guard region {:#x}-{:#x} (MADV_GUARD_INSTALL, Linux 6.13): {}",
                g.start,
                g.end,
                std::io::Error::from(e)
            )
        })?;
    }
    Ok(())
}

/// Open the file of every shared file mapping for the restorer, in the
/// order of their entries in `rvmas` (see [`give_shared_files`]); the
/// restorer closes them once it has mapped them.
pub fn open_shared_files(
    img: &Image,
    rvmas: &[RVma],
    files: &HashMap<u32, RawFd>,
) -> Result<Vec<OwnedFd>, String> {
    let mm_name = cryo_image::mm_file(img.pstree.pid);
    let shared = img
        .mm
        .vmas
        .iter()
        .filter(|v| kind(v) == VmaKind::VmaFileShared);
    let mut out = Vec::new();
    for (_, v) in rvmas.iter().filter(|r| maps_a_file(r)).zip(shared) {
        let write = v.file_flags as i32 & libc::O_ACCMODE == libc::O_RDWR;
        out.push(open_file(v, write, files, &mm_name, "shared mapping")?);
    }
    Ok(out)
}

/// Each shared file mapping of `rvmas` gets its descriptor, opened by
/// [`open_shared_files`] (and maybe moved since).
pub fn give_shared_files(rvmas: &mut [RVma], fds: &[RawFd]) {
    for (rv, &fd) in rvmas.iter_mut().filter(|r| maps_a_file(r)).zip(fds) {
        rv.fd = fd;
    }
}

/// Whether the restorer maps `r` from a file (a shared file mapping):
/// not premapped, not a System V attachment.
fn maps_a_file(r: &RVma) -> bool {
    r.premap == 0 && r.madv & RVMA_SYSV_SHM == 0
}

/// A System V attachment is made again whole (shmat): a part of a
/// segment (split by mprotect or munmap) is not supported yet.
fn check_whole_attachment(v: &Vma, mm_name: &str) -> Result<(), String> {
    let size = crate::sys::ipc::shm_size(v.shmid as i32).map_err(|e| {
        format!(
            "{mm_name}: System V segment {} attached at {:#x}: {e}",
            v.shmid, v.start
        )
    })?;
    let whole = size.div_ceil(PAGE) * PAGE;
    if v.pgoff != 0 || v.end - v.start != whole {
        return Err(format!(
            "{mm_name}: the mapping at {:#x} is a part of System V segment {} ({} bytes at offset {} of {size}): only whole attachments are kept yet",
            v.start,
            v.shmid,
            v.end - v.start,
            v.pgoff
        ));
    }
    Ok(())
}

/// One piece of a chunk: `len` bytes at `offset` in the chunk go to
/// `dst` in the premap area.
#[derive(Clone, Copy)]
struct Piece {
    chunk: usize,
    offset: usize,
    dst: usize,
    len: usize,
}

/// Where every page of every chunk goes, checked against the premapped
/// mappings (pages kept in a parent's image are not in the chunks).
fn plan_pieces(img: &Image, premap: &Premap) -> Result<Vec<Piece>, String> {
    let pm_name = cryo_image::pagemap_file(img.pstree.pid);
    let runs: Vec<&PagemapEntry> = img
        .runs
        .iter()
        .filter(|r| !cryo_image::stored_elsewhere(r.flags))
        .collect();
    let mut pieces: Vec<Piece> = Vec::with_capacity(img.chunks.len());
    let (mut run_idx, mut run_off) = (0usize, 0u64); // pages consumed from runs[run_idx]
    let mut vma_hint = 0usize;
    let of = &premap.of;
    for (ci, c) in img.chunks.iter().enumerate() {
        let len = c.nr_pages as usize * PAGE as usize;
        let mut pos = 0usize;
        while pos < len {
            let run = runs
                .get(run_idx)
                .ok_or_else(|| format!("{pm_name}: more pages than runs"))?;
            let n = ((run.nr_pages as u64 - run_off) as usize).min((len - pos) / PAGE as usize);
            let vaddr = run.vaddr + run_off * PAGE;
            if !of
                .get(vma_hint)
                .is_some_and(|m| m.0 <= vaddr && vaddr < m.1)
            {
                vma_hint = of
                    .iter()
                    .position(|m| m.0 <= vaddr && vaddr < m.1)
                    .ok_or_else(|| format!("{pm_name}: page {vaddr:#x} outside any mapping"))?;
            }
            let (vs, ve, base) = of[vma_hint];
            let bytes = n * PAGE as usize;
            if vaddr + bytes as u64 > ve {
                return Err(format!(
                    "{pm_name}: run at {vaddr:#x} crosses the end of its mapping"
                ));
            }
            let dst = (base + (vaddr - vs)) as usize;
            match pieces.last_mut() {
                Some(p) if p.chunk == ci && p.offset + p.len == pos && p.dst + p.len == dst => {
                    p.len += bytes
                }
                _ => pieces.push(Piece {
                    chunk: ci,
                    offset: pos,
                    dst,
                    len: bytes,
                }),
            }
            pos += bytes;
            run_off += n as u64;
            if run_off == run.nr_pages as u64 {
                run_idx += 1;
                run_off = 0;
            }
        }
    }
    Ok(pieces)
}

/// One chunk to decompress and where its pieces go: (chunk, [(offset in
/// the chunk, destination)]).
type ChunkWork<'m> = (usize, Vec<(usize, &'m mut [u8])>);

/// The destination of each piece as its own slice of `mem`, grouped by
/// chunk: (chunk, [(offset in chunk, destination)]). Pieces that overlap
/// (a damaged image) are refused.
fn split_pieces<'m>(
    mut pieces: Vec<Piece>,
    mem: &'m mut [u8],
    pm_name: &str,
) -> Result<Vec<ChunkWork<'m>>, String> {
    pieces.sort_unstable_by_key(|p| p.dst);
    let mut by_chunk: std::collections::BTreeMap<usize, Vec<(usize, &'m mut [u8])>> =
        std::collections::BTreeMap::new();
    let mut rest = mem;
    let mut at = 0usize;
    for p in pieces {
        if p.dst < at {
            return Err(format!("{pm_name}: two runs store the same page"));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(p.dst - at);
        if tail.len() < p.len {
            return Err(format!("{pm_name}: a run lies beyond its mapping"));
        }
        let (dst, tail) = tail.split_at_mut(p.len);
        by_chunk.entry(p.chunk).or_default().push((p.offset, dst));
        rest = tail;
        at = p.dst + p.len;
    }
    Ok(by_chunk.into_iter().collect())
}

/// Fill the premapped memory from the pages file: the chunks are
/// decompressed on several threads, each straight into its place when it
/// lands there in one piece.
pub fn fill_pages(img: &Image, pages: &PageReader, premap: &mut Premap) -> Result<(), String> {
    let pm_name = cryo_image::pagemap_file(img.pstree.pid);
    let pieces = plan_pieces(img, premap)?;
    if pieces.is_empty() {
        return Ok(());
    }
    let work = split_pieces(pieces, premap.bytes()?, &pm_name)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(work.len().max(1));
    let queue = Mutex::new(work.into_iter());
    let run = || -> Result<(), String> {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let next = queue.lock().map_err(|_| "a page worker panicked")?.next();
            let Some((ci, mut dsts)) = next else {
                return Ok(());
            };
            let len = img.chunks[ci].nr_pages as usize * PAGE as usize;
            if let [(0, out)] = dsts.as_mut_slice() {
                if out.len() == len {
                    // The whole chunk lands in one place: decompress there.
                    pages.read_chunk(ci, out).map_err(|e| e.to_string())?;
                    continue;
                }
            }
            buf.resize(len, 0);
            pages.read_chunk(ci, &mut buf).map_err(|e| e.to_string())?;
            for (offset, out) in dsts {
                let n = out.len();
                out.copy_from_slice(&buf[offset..offset + n]);
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(run)).collect();
        let mut res = run();
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err("a page worker panicked".into()));
            if res.is_ok() {
                res = r;
            }
        }
        res
    })
}
