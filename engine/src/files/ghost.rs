//! Memfds and files deleted while open ("ghost" files): their contents
//! travel in the image.
//!
//! Dump: the file's bytes (up to --ghost-limit), owner, mode, access and
//! modification times and, for a memfd, its seals, read through a new
//! open of the task's descriptor; carried by the first open file of each
//! in the table. Restore: a memfd with the same name, or a file made next
//! to the deleted one's old path (a fresh name there, unlinked at once),
//! filled, given its owner, mode, times and seals; every open file
//! description of it is a new open of that one.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use cryo_image::proto::{Extent, FileEntry, FileKind};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::MFdFlags;
use nix::sys::stat::Mode;
use nix::unistd::Whence;

use super::{FdCtx, FilesError, OpenFile};

pub fn is_ghost(kind: FileKind) -> bool {
    matches!(kind, FileKind::FileMemfd | FileKind::FileDeleted)
}

/// Kinds other than regular files that the restore makes again when
/// their name was removed (`deleted` in the entry): directories and
/// device nodes here, FIFOs in `pipe`, hung-up pty slaves in `pty`.
pub fn remade_when_deleted(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::FileDirectory
            | FileKind::FileChardev
            | FileKind::FileFifo
            | FileKind::FilePtySlave
    )
}

/// The access and modification times of the file, which a remade one
/// gets back.
pub fn times(st: &nix::sys::stat::FileStat, e: &mut FileEntry) {
    let ns = |sec: i64, nsec: i64| sec.saturating_mul(1_000_000_000).saturating_add(nsec);
    e.atime_ns = Some(ns(st.st_atime, st.st_atime_nsec));
    e.mtime_ns = Some(ns(st.st_mtime, st.st_mtime_nsec));
}

/// The suffix of the name a deleted file is recreated under when its old
/// path is taken: `PATH.cryo-ghost-PID-N`.
const GHOST_SUFFIX: &str = ".cryo-ghost-";

/// What the image calls a file: a memfd by its name, a deleted file by
/// where it was (a name cryo gave it at an earlier restore, with
/// [`GHOST_SUFFIX`], loses that suffix: names do not grow over cycles);
/// any other file by its link.
pub fn name(kind: FileKind, link: &str) -> String {
    if !is_ghost(kind) {
        return link.to_string();
    }
    let name = link
        .strip_prefix("/memfd:")
        .unwrap_or(link)
        .trim_end_matches(" (deleted)");
    if kind != FileKind::FileDeleted {
        return name.to_string();
    }
    deleted_name(name)
}

/// Where a file whose name was removed was: its kernel name without
/// " (deleted)" and without the suffixes cryo gave it at earlier restores.
pub fn deleted_name(link: &str) -> String {
    // Only cryo's own suffix, PID-N in digits, goes.
    let mut base = link.trim_end_matches(" (deleted)");
    while let Some(i) = base.rfind(GHOST_SUFFIX) {
        let tail = &base[i + GHOST_SUFFIX.len()..];
        let ours = tail.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        });
        if !ours {
            break;
        }
        base = &base[..i];
    }
    base.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghost_names_do_not_grow() {
        let d = FileKind::FileDeleted;
        assert_eq!(name(d, "/t/a.txt (deleted)"), "/t/a.txt");
        assert_eq!(
            name(d, "/t/a.txt.cryo-ghost-12-0.cryo-ghost-13-4 (deleted)"),
            "/t/a.txt"
        );
        assert_eq!(name(d, "/t/a.cryo-ghost-x (deleted)"), "/t/a.cryo-ghost-x");
        assert_eq!(name(FileKind::FileMemfd, "/memfd:m (deleted)"), "m");
        assert_eq!(name(FileKind::FileRegular, "/t/a"), "/t/a");
    }
}

/// A ghost larger than the limit is refused (its contents would go into
/// the image).
pub fn dump(cx: &FdCtx, opts: &super::CollectOptions, e: &mut FileEntry) -> Result<(), FilesError> {
    times(cx.st, e);
    let size = data_size(cx.st);
    let limit = opts.ghost_limit;
    if kept_by_link(opts, e.kind, cx.st) {
        return Ok(()); // the link is made once the tree is stopped (contents)
    }
    if size > limit {
        return Err(FilesError::DeletedFile {
            pid: cx.pid,
            fd: cx.fd,
            link: cx.link.to_string(),
            size,
            limit,
        });
    }
    Ok(())
}

/// The bytes of a file that hold data (a sparse file's holes are not in
/// the image): its size, or less where fewer blocks are allocated.
pub fn data_size(st: &nix::sys::stat::FileStat) -> u64 {
    (st.st_size as u64).min(st.st_blocks as u64 * 512)
}

/// The data of a file, extent by extent (SEEK_DATA, SEEK_HOLE): the bytes
/// and the extents, or no extents when the file is one extent from its
/// start to its end.
fn read_extents(f: &std::fs::File, size: u64) -> std::io::Result<(Vec<u8>, Vec<Extent>)> {
    use std::os::unix::fs::FileExt;
    let mut data = Vec::new();
    let mut extents = Vec::new();
    let mut off = 0i64;
    while (off as u64) < size {
        let start = match nix::unistd::lseek(f, off, Whence::SeekData) {
            Ok(s) => s,
            Err(Errno::ENXIO) => break, // a hole up to the end
            Err(e) => return Err(e.into()),
        };
        let end = nix::unistd::lseek(f, start, Whence::SeekHole)?.min(size as i64);
        let len = (end - start).max(0) as usize;
        let at = data.len();
        data.resize(at + len, 0);
        f.read_exact_at(&mut data[at..], start as u64)?;
        extents.push(Extent {
            offset: start as u64,
            len: len as u64,
        });
        off = end;
    }
    if extents.len() == 1 && extents[0].offset == 0 && extents[0].len == size {
        extents.clear();
    }
    Ok((data, extents))
}

/// Whether a ghost is kept by a hard link instead of its contents
/// (--link-remap): a deleted file over the ghost limit that still has
/// another name.
fn kept_by_link(opts: &super::CollectOptions, kind: i32, st: &nix::sys::stat::FileStat) -> bool {
    opts.link_remap
        && kind == FileKind::FileDeleted as i32
        && st.st_nlink > 0
        && data_size(st) > opts.ghost_limit
}

/// The hard links --link-remap made during this dump.
static LINKS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Once the dump is over: the links it made stay for the restore (`keep`)
/// or are removed (a failed dump leaves nothing behind).
pub fn settle_links(keep: bool) {
    let mut links = LINKS.lock().unwrap_or_else(|e| e.into_inner());
    if !keep {
        for l in links.iter() {
            let _ = std::fs::remove_file(l);
        }
    }
    links.clear();
}

/// A hard link to the file behind `proc_path` (deleted from `path`, still
/// linked elsewhere), made next to `path` under a fresh name.
fn link_remap(proc_path: &str, path: &str) -> Result<String, FilesError> {
    let err = |source: std::io::Error| FilesError::Proc {
        path: format!("{proc_path} (a hard link to it next to {path}, --link-remap)"),
        source,
    };
    for n in 0..1000u32 {
        let name = format!("{path}.cryo-link-{}-{n}", std::process::id());
        match nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            proc_path,
            nix::fcntl::AT_FDCWD,
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        ) {
            Ok(()) => {
                LINKS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(name.clone());
                return Ok(name);
            }
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(err(e.into())),
        }
    }
    Err(err(std::io::Error::other("no free name")))
}

/// The bytes (and seals) of every memfd and deleted file of the table,
/// read through a new open of the task's descriptor; carried by the first
/// open file of each.
pub fn contents(table: &mut [OpenFile], opts: &super::CollectOptions) -> Result<(), FilesError> {
    let mut seen: Vec<(i32, u64, u64)> = Vec::new();
    // Links made (--link-remap), by file: every entry of the file names it.
    let mut links: Vec<((i32, u64, u64), String)> = Vec::new();
    for o in table.iter_mut() {
        let k = o.entry.kind;
        if !FileKind::try_from(k).is_ok_and(is_ghost) {
            continue;
        }
        let key = (k, o.entry.dev, o.entry.inode);
        if let Some((_, l)) = links.iter().find(|(lk, _)| *lk == key) {
            o.entry.link_remap = l.clone();
        }
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let path = o.proc_path();
        let st = nix::sys::stat::stat(path.as_str()).map_err(|e| FilesError::Proc {
            path: path.clone(),
            source: e.into(),
        })?;
        if kept_by_link(opts, k, &st) {
            o.entry.link_remap = link_remap(&path, &o.entry.path)?;
            links.push((key, o.entry.link_remap.clone()));
            continue;
        }
        // O_NOATIME: reading it for the image must not change the access
        // time the image records (nor, with --leave-running, the file's).
        let open = |extra: i32| {
            std::os::unix::fs::OpenOptionsExt::custom_flags(
                std::fs::OpenOptions::new().read(true),
                extra,
            )
            .open(&path)
        };
        let f = open(libc::O_NOATIME)
            .or_else(|_| open(0))
            .map_err(|source| FilesError::Proc {
                path: path.clone(),
                source,
            })?;
        let size = st.st_size as u64;
        let (data, extents) =
            read_extents(&f, size).map_err(|source| FilesError::Proc { path, source })?;
        o.entry.size = size;
        o.entry.contents = data;
        o.entry.extents = extents;
        if k == FileKind::FileMemfd as i32 {
            // A failure means no seals (not a sealable memfd).
            let seals = nix::fcntl::fcntl(&f, FcntlArg::F_GET_SEALS).unwrap_or(0);
            o.entry.seals = seals.max(0) as u32;
        }
    }
    Ok(())
}

/// The ghost files made so far, by (kind, dev, inode): one per file,
/// however many open file descriptions it has.
#[derive(Default)]
pub struct Ghosts(Vec<Ghost>);

struct Ghost {
    key: (i32, u64, u64),
    fd: OwnedFd,
    /// The open file description made with O_TMPFILE went to an entry
    /// that had been made so (it keeps the flag that lets it be linked
    /// in; a new open through /proc would not).
    tmpfile_given: bool,
}

impl Ghosts {
    /// A new open file description of the ghost behind `f`, made (from
    /// the entry of `files` that carries its contents) on first use.
    pub fn open(&mut self, files: &[FileEntry], f: &FileEntry) -> Result<OwnedFd, String> {
        let key = (f.kind, f.dev, f.inode);
        let i = match self.0.iter().position(|g| g.key == key) {
            Some(i) => i,
            None => {
                let holder = files
                    .iter()
                    .find(|x| (x.kind, x.dev, x.inode) == key && !x.contents.is_empty())
                    .unwrap_or(f);
                self.0.push(Ghost {
                    key,
                    fd: make(holder, made_as_tmpfile(files, key))?,
                    tmpfile_given: false,
                });
                self.0.len() - 1
            }
        };
        let g = &mut self.0[i];
        let tmpfile = f.flags as i32 & super::O_TMPFILE_BIT != 0;
        let fd = if tmpfile && !g.tmpfile_given {
            g.tmpfile_given = true;
            g.fd.try_clone()
                .map_err(|e| format!("duplicating the file: {e}"))?
        } else {
            super::reopen(&g.fd, super::open_flags(f))?
        };
        let regular = is_ghost(FileKind::try_from(f.kind).unwrap_or(FileKind::FileRegular));
        if regular && !OFlag::from_bits_retain(f.flags as i32).contains(OFlag::O_PATH) {
            let _ = nix::unistd::lseek(&fd, f.pos as i64, Whence::SeekSet);
        }
        Ok(fd)
    }
}

/// Whether the ghost `key` was made with O_TMPFILE (an open file
/// description of it still has the flag).
fn made_as_tmpfile(files: &[FileEntry], key: (i32, u64, u64)) -> bool {
    files
        .iter()
        .any(|x| (x.kind, x.dev, x.inode) == key && x.flags as i32 & super::O_TMPFILE_BIT != 0)
}

/// A memfd with its name, contents and seals, or a file deleted while
/// open: made next to where it was (a fresh name there), filled, given
/// its mode and unlinked again. The descriptor returned reads and writes.
/// A removed directory or device node: see [`make_node`].
fn make(f: &FileEntry, tmpfile: bool) -> Result<OwnedFd, String> {
    let io = std::io::Error::from;
    if f.deleted {
        return make_node(f);
    }
    if !f.link_remap.is_empty() {
        // The file itself, through the link made at the dump.
        let fd = nix::fcntl::open(
            f.link_remap.as_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening its link {}: {}", f.link_remap, io(e)))?;
        let _ = nix::unistd::unlink(f.link_remap.as_str());
        return Ok(fd);
    }
    let fd = if f.kind == FileKind::FileMemfd as i32 {
        let mut flags = MFdFlags::MFD_CLOEXEC;
        if f.seals != 0 {
            flags |= MFdFlags::MFD_ALLOW_SEALING;
        }
        nix::sys::memfd::memfd_create(f.path.as_str(), flags)
            .map_err(|e| format!("memfd_create: {}", io(e)))?
    } else if tmpfile {
        tmpfile_in(&f.path)?
    } else {
        recreate(&f.path)?
    };
    fill(&fd, f)?;
    // The owner first: chown drops the set-id bits that the mode puts back.
    if f.uid.is_some() || f.gid.is_some() {
        nix::unistd::fchown(
            &fd,
            f.uid.map(nix::unistd::Uid::from_raw),
            f.gid.map(nix::unistd::Gid::from_raw),
        )
        .map_err(|e| {
            format!(
                "giving it its owner {}:{}: {}",
                f.uid.unwrap_or(0),
                f.gid.unwrap_or(0),
                io(e)
            )
        })?;
    }
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(f.mode))
        .map_err(|e| format!("giving it its mode {:o}: {}", f.mode, io(e)))?;
    // The times last: writing the contents set them to now.
    if let Some((a, m)) = timespecs(f) {
        nix::sys::stat::futimens(&fd, &a, &m)
            .map_err(|e| format!("setting its access and modification times: {}", io(e)))?;
    }
    if f.seals != 0 {
        let seals = SealFlag::from_bits_retain(f.seals as i32);
        nix::fcntl::fcntl(&fd, FcntlArg::F_ADD_SEALS(seals))
            .map_err(|e| format!("adding seals {:#x}: {}", f.seals, io(e)))?;
    }
    Ok(fd)
}

/// Write the file's data back: its contents at 0, or extent by extent
/// (the holes stay holes), then its size.
fn fill(fd: &OwnedFd, f: &FileEntry) -> Result<(), String> {
    let whole = [Extent {
        offset: 0,
        len: f.contents.len() as u64,
    }];
    let extents: &[Extent] = if f.extents.is_empty() {
        &whole
    } else {
        &f.extents
    };
    let mut from = 0usize;
    for x in extents {
        let end = from.saturating_add(x.len as usize);
        let mut data = f
            .contents
            .get(from..end)
            .ok_or("its extents hold more bytes than its contents")?;
        let mut at = x.offset as i64;
        while !data.is_empty() {
            match nix::sys::uio::pwrite(fd, data, at) {
                Ok(n) => {
                    data = &data[n..];
                    at += n as i64;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("writing its {} bytes: {e}", f.contents.len())),
            }
        }
        from = end;
    }
    if f.size != f.contents.len() as u64 || !f.extents.is_empty() {
        nix::unistd::ftruncate(fd, f.size as i64)
            .map_err(|e| format!("giving it its size {}: {e}", f.size))?;
    }
    Ok(())
}

/// A new file without a name in the directory of `path` (O_TMPFILE, as
/// the dumped one was made: it may still be linked in).
fn tmpfile_in(path: &str) -> Result<OwnedFd, String> {
    let dir = std::path::Path::new(path)
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    nix::fcntl::open(
        dir,
        OFlag::from_bits_retain(super::O_TMPFILE_BIT)
            | OFlag::O_DIRECTORY
            | OFlag::O_RDWR
            | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| {
        format!(
            "making a file without a name in {} (O_TMPFILE): {}",
            dir.display(),
            std::io::Error::from(e)
        )
    })
}

/// The entry's access and modification times, for futimens/utimensat.
fn timespecs(f: &FileEntry) -> Option<(nix::sys::time::TimeSpec, nix::sys::time::TimeSpec)> {
    let ts = |ns: i64| {
        nix::sys::time::TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
    };
    Some((ts(f.atime_ns?), ts(f.mtime_ns?)))
}

/// A new empty file where the deleted one was, unlinked at once, so that
/// its /proc link names the same deleted path as at the dump; if that
/// path is taken now, next to it under a fresh name.
fn recreate(path: &str) -> Result<OwnedFd, String> {
    let (name, fd) = at_free_name(path, "file", |p| {
        nix::fcntl::open(
            p,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
    })?;
    let _ = nix::unistd::unlink(name.as_str());
    Ok(fd)
}

/// `make` run at `path`, or, while it fails with EEXIST, next to it under
/// fresh names; returns the name it succeeded at and what it made.
fn at_free_name<T>(
    path: &str,
    what: &str,
    mut make: impl FnMut(&str) -> nix::Result<T>,
) -> Result<(String, T), String> {
    let names = std::iter::once(path.to_string())
        .chain((0..1000u32).map(|n| format!("{path}{GHOST_SUFFIX}{}-{n}", std::process::id())));
    for p in names {
        match make(p.as_str()) {
            Ok(t) => return Ok((p, t)),
            Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(format!(
                    "recreating the deleted {what} next to its old path: {}",
                    std::io::Error::from(e)
                ))
            }
        }
    }
    Err(format!("no free name to recreate the deleted {what}"))
}

/// A directory, device node or FIFO whose name was removed: a new one at
/// its old path (or next to it), with its owner, mode, times (and device
/// number), removed again once a descriptor holds it. Directories and
/// FIFOs come back open for reading (a FIFO without blocking: read and
/// write), device nodes as O_PATH (each open file description opens the
/// device through it).
pub fn make_node(f: &FileEntry) -> Result<OwnedFd, String> {
    use nix::sys::stat::{mknod, SFlag};
    let io = std::io::Error::from;
    let kind = FileKind::try_from(f.kind).unwrap_or(FileKind::FileRegular);
    let perm = Mode::from_bits_truncate(f.mode);
    let (what, open_flags) = match kind {
        FileKind::FileDirectory => ("directory", OFlag::O_RDONLY | OFlag::O_DIRECTORY),
        FileKind::FileFifo => ("FIFO", OFlag::O_RDWR | OFlag::O_NONBLOCK),
        _ => ("device node", OFlag::O_PATH),
    };
    let (name, ()) = at_free_name(&f.path, what, |p| match kind {
        FileKind::FileDirectory => nix::unistd::mkdir(p, Mode::from_bits_truncate(0o700)),
        FileKind::FileFifo => nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600)),
        _ => mknod(
            p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            f.rdev as libc::dev_t,
        ),
    })?;
    let remove = || {
        let _ = if kind == FileKind::FileDirectory {
            nix::unistd::unlinkat(
                nix::fcntl::AT_FDCWD,
                name.as_str(),
                nix::unistd::UnlinkatFlags::RemoveDir,
            )
        } else {
            nix::unistd::unlink(name.as_str())
        };
    };
    let made = (|| {
        let no_follow = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
        // The owner first: chown drops the set-id bits that the mode puts
        // back; the times last.
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            name.as_str(),
            f.uid.map(nix::unistd::Uid::from_raw),
            f.gid.map(nix::unistd::Gid::from_raw),
            no_follow,
        )
        .map_err(|e| format!("giving the {what} its owner: {}", io(e)))?;
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            name.as_str(),
            perm,
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| format!("giving the {what} its mode {:o}: {}", f.mode, io(e)))?;
        let fd = nix::fcntl::open(
            name.as_str(),
            open_flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening the recreated {what}: {}", io(e)))?;
        if let Some((a, m)) = timespecs(f) {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                name.as_str(),
                &a,
                &m,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| format!("setting the {what}'s times: {}", io(e)))?;
        }
        Ok(fd)
    })();
    remove();
    made
}
