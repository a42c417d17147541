//! Pipes and FIFOs, with the bytes in flight and the buffer size.
//!
//! Dump: a pipe with only one end in the tree whose other end is held by
//! a process outside it is refused (the two could not be joined again).
//! The bytes queued in each pipe are copied with tee(2) through a second
//! read end opened via /proc, which does not consume them, and go with
//! the first open file of the pipe in the table. Restore: one pipe (or
//! one O_RDWR open of the FIFO, made again first if its name was
//! removed) per inode, given its size and refilled;
//! the first open file description of each end is that end, any other
//! one a new open of it through /proc/self/fd.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;

use cryo_image::proto::{FileEntry, FileKind};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag, SpliceFFlags};

use super::{FilesError, OpenFile};
use crate::sys;

fn is_pipe(kind: i32) -> bool {
    kind == FileKind::FilePipe as i32 || kind == FileKind::FileFifo as i32
}

/// The bytes in flight and buffer size of every pipe and FIFO of the
/// table, on its first open file; a pipe whose missing end is open
/// outside `tree` is refused, unless it is one of the external ones
/// (set_external): then it is marked so, its bytes staying in it.
pub fn contents(table: &mut [OpenFile], tree: &BTreeSet<i32>) -> Result<(), FilesError> {
    let (external, all) = EXTERNAL.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut done: Vec<u64> = Vec::new();
    for i in 0..table.len() {
        let kind = table[i].entry.kind;
        let ino = table[i].entry.inode;
        if !is_pipe(kind) || done.contains(&ino) {
            continue;
        }
        done.push(ino);
        let ends: Vec<u32> = table
            .iter()
            .filter(|o| o.entry.inode == ino && o.entry.kind == kind)
            .map(|o| o.entry.flags & libc::O_ACCMODE as u32)
            .collect();
        let has_read = ends.iter().any(|&a| a != libc::O_WRONLY as u32);
        let has_write = ends.iter().any(|&a| a != libc::O_RDONLY as u32);
        let half = kind == FileKind::FilePipe as i32 && !(has_read && has_write);
        let want = format!("pipe:[{ino}]");
        // Who holds the other end outside the tree (one walk of /proc).
        let holder = match half && !external.contains(&ino) {
            true => super::outside_holder(tree, |l| (l == want).then_some(())),
            false => None,
        };
        if half && (external.contains(&ino) || (all && holder.is_some())) {
            for o in table
                .iter_mut()
                .filter(|o| o.entry.inode == ino && o.entry.kind == kind)
            {
                o.entry.external_pipe = true;
            }
            continue;
        }
        if half {
            if let Some((holder, ())) = holder {
                let o = &table[i];
                return Err(FilesError::ExternalPipe {
                    pid: o.pid,
                    fd: o.fd,
                    link: o.entry.path.clone(),
                    holder,
                });
            }
        }
        let (data, size) = queued(table[i].pid, table[i].fd)?;
        table[i].entry.pipe_data = data;
        table[i].entry.pipe_size = size;
    }
    Ok(())
}

/// The bytes queued in the pipe behind `pid`'s descriptor `fd` and its
/// buffer size, read through a second read end (opened via /proc) with
/// tee(2), which copies them without consuming them.
fn queued(pid: i32, fd: i32) -> Result<(Vec<u8>, u32), FilesError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let err = |what: &str, e: std::io::Error| FilesError::Proc {
        path: format!("{path} ({what})"),
        source: e,
    };
    // A new read end of the same pipe.
    let r = nix::fcntl::open(
        path.as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| err("opening a read end", e.into()))?;
    let size = fcntl(&r, FcntlArg::F_GETPIPE_SZ).unwrap_or(-1);
    let queued = sys::fs::bytes_queued(&r).unwrap_or(0);
    if size < 0 || queued <= 0 {
        return Ok((Vec::new(), size.max(0) as u32));
    }
    let (sr, sw) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| err("scratch pipe", e.into()))?;
    let _ = fcntl(&sw, FcntlArg::F_SETPIPE_SZ(size));
    // tee copies up to `queued` bytes without consuming them from `r`.
    let n = nix::fcntl::tee(&r, &sw, queued as usize, SpliceFFlags::SPLICE_F_NONBLOCK)
        .map_or(-1, |n| n as isize);
    if n != queued as isize {
        return Err(err(
            "copying the bytes in flight",
            std::io::Error::other(format!("tee copied {n} of {queued} bytes")),
        ));
    }
    drop(sw);
    let mut data = Vec::with_capacity(queued as usize);
    std::io::Read::read_to_end(&mut std::fs::File::from(sr), &mut data)
        .map_err(|e| err("reading the copy", e))?;
    Ok((data, size as u32))
}

/// One restored pipe: its two ends, and whether each was handed out once.
struct Ends {
    read: OwnedFd,
    write: OwnedFd,
    read_given: bool,
    write_given: bool,
}

/// The pipes and FIFOs made so far, by inode.
#[derive(Default)]
pub struct Pipes(HashMap<u64, Ends>);

impl Pipes {
    /// The open file description of the pipe end `f`: the pipe is made on
    /// first use (from the entry of `files` that carries its bytes).
    pub fn open(
        &mut self,
        files: &[FileEntry],
        f: &FileEntry,
        kind: FileKind,
    ) -> Result<OwnedFd, String> {
        if f.external_pipe {
            return inherited(f);
        }
        let p = match self.0.entry(f.inode) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let holder = files
                    .iter()
                    .find(|x| x.inode == f.inode && x.kind == f.kind && x.pipe_size > 0)
                    .unwrap_or(f);
                e.insert(make(f, holder, kind)?)
            }
        };
        let write_end = f.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY;
        let (end, given) = if write_end {
            (&p.write, &mut p.write_given)
        } else {
            (&p.read, &mut p.read_given)
        };
        if !*given && kind == FileKind::FilePipe {
            // This open file description becomes the dumped one.
            *given = true;
            return end
                .try_clone()
                .map_err(|e| format!("duplicating the pipe end: {e}"));
        }
        // Another open file description of the same pipe.
        let acc = OFlag::from_bits_truncate(f.flags as i32 & libc::O_ACCMODE);
        super::reopen(end, acc | OFlag::O_NONBLOCK)
    }
}

/// A pipe (or an O_RDWR open of the FIFO, which never blocks, with both
/// ends reopened from it) with the buffer size and bytes of `holder`.
fn make(f: &FileEntry, holder: &FileEntry, kind: FileKind) -> Result<Ends, String> {
    let (read, write) = if kind == FileKind::FilePipe {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe2: {e}"))?
    } else if f.deleted {
        // A FIFO whose name was removed: made again, opened and removed.
        let a = super::ghost::make_node(f)?;
        let b = a
            .try_clone()
            .map_err(|e| format!("duplicating the FIFO: {e}"))?;
        (a, b)
    } else {
        let a = nix::fcntl::open(
            f.path.as_str(),
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("opening the FIFO: {}", std::io::Error::from(e)))?;
        let b = a
            .try_clone()
            .map_err(|e| format!("duplicating the FIFO: {e}"))?;
        (a, b)
    };
    if holder.pipe_size > 0 {
        fcntl(&write, FcntlArg::F_SETPIPE_SZ(holder.pipe_size as i32)).map_err(|e| {
            format!(
                "setting the pipe size to {}: {}",
                holder.pipe_size,
                std::io::Error::from(e)
            )
        })?;
    }
    let mut data: &[u8] = &holder.pipe_data;
    while !data.is_empty() {
        match nix::unistd::write(&write, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("refilling the pipe: {e}")),
        }
    }
    Ok(Ends {
        read,
        write,
        read_given: false,
        write_given: false,
    })
}

/// The pipes (by inode) a dump was told lead outside the tree
/// (--external-pipe).
static EXTERNAL: std::sync::Mutex<(Vec<u64>, bool)> = std::sync::Mutex::new((Vec::new(), false));

/// Dump side: the pipes (inodes) that may lead outside the tree, or
/// (`all`) every pipe that does, as CRIU's RPC service takes them.
pub fn set_external(inodes: &[u64], all: bool) {
    *EXTERNAL.lock().unwrap_or_else(|p| p.into_inner()) = (inodes.to_vec(), all);
}

/// The end `f` of a pipe leading outside the tree: a duplicate of the
/// descriptor the restore was given for it, which must be an end of the
/// same kind.
fn inherited(f: &FileEntry) -> Result<OwnedFd, String> {
    let Some(fd) = super::inherited(&format!("pipe:[{}]", f.inode)) else {
        return Err(format!(
            "pipe:[{}] led outside the tree at the dump: restore with --inherit-fd fd[N]:pipe:[{}], N a descriptor of that pipe's {} end",
            f.inode,
            f.inode,
            if f.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY { "write" } else { "read" }
        ));
    };
    let (dup, flags) = sys::fs::dup_given(fd).map_err(|e| format!("--inherit-fd fd[{fd}]: {e}"))?;
    let acc = flags & libc::O_ACCMODE;
    if acc != f.flags as i32 & libc::O_ACCMODE {
        return Err(format!(
            "--inherit-fd fd[{fd}]: not an end of the same kind as pipe:[{}]'s (access mode {acc}, expected {})",
            f.inode,
            f.flags as i32 & libc::O_ACCMODE
        ));
    }
    Ok(dup)
}
