//! Files a process holds without a descriptor and with no name left to
//! open them by at restore (mapped memfds and deleted files, a removed
//! working directory or root): described at dump like open files and
//! given a files.img entry of their own, or the one of an open file of the
//! same inode.

#![forbid(unsafe_code)]

use cryo_image::proto::{FileEntry, FileKind};

use super::{entry_of, ghost, CollectOptions, FilesError, OpenFile, ProcFds, Result};

/// A file a process uses without a descriptor, with no name left to open
/// it by at restore: a mapping of a memfd or of a file deleted while
/// mapped, a working directory removed while the process sat in it. It
/// goes into files.img like an open file (its id filled in by [`link`]).
#[derive(Debug)]
pub struct HeldFile {
    /// Where cryo opens it at the dump (/proc/PID/map_files/START-END,
    /// /proc/PID/cwd).
    pub via: String,
    pub entry: FileEntry,
    pub user: HeldBy,
}

/// What holds a [`HeldFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBy {
    /// The mapping that starts at this address.
    Mapping(u64),
    WorkingDir,
    Root,
}

impl HeldFile {
    /// The file behind `via` (its kernel name `link`), of `kind`: a memfd
    /// or deleted regular file (contents, read by [`link`], up to the
    /// ghost limit), or a removed directory.
    pub fn new(
        pid: i32,
        via: String,
        link: &str,
        kind: FileKind,
        user: HeldBy,
        opts: &CollectOptions,
    ) -> Result<HeldFile> {
        let st = nix::sys::stat::stat(via.as_str()).map_err(|e| FilesError::Proc {
            path: via.clone(),
            source: e.into(),
        })?;
        let mut entry = FileEntry {
            kind: kind as i32,
            path: if kind == FileKind::FileDirectory {
                ghost::deleted_name(link)
            } else {
                ghost::name(kind, link)
            },
            flags: if kind == FileKind::FileDirectory {
                (libc::O_RDONLY | libc::O_DIRECTORY) as u32
            } else {
                libc::O_RDWR as u32
            },
            deleted: kind == FileKind::FileDirectory,
            ..entry_of(&st)
        };
        let data = ghost::data_size(&st);
        if ghost::is_ghost(kind) && data > opts.ghost_limit {
            return Err(FilesError::DeletedMapping {
                pid,
                link: link.to_string(),
                size: data,
                limit: opts.ghost_limit,
            });
        }
        ghost::times(&st, &mut entry);
        Ok(HeldFile { via, entry, user })
    }
}

/// Each file held without a descriptor is the file of the table with the
/// same inode (any open file description of it will do to map it or
/// change into it), or a new entry of its own.
pub(super) fn link_held(procs: &mut [&mut ProcFds], table: &mut Vec<OpenFile>) {
    let mut next = table.iter().map(|o| o.entry.id).max().unwrap_or(0) + 1;
    for p in procs.iter_mut() {
        for h in p.held.iter_mut() {
            let e = &h.entry;
            let same = table.iter().find(|o| {
                (o.entry.kind, o.entry.dev, o.entry.inode, o.entry.deleted)
                    == (e.kind, e.dev, e.inode, e.deleted)
            });
            h.entry.id = match same {
                Some(o) => o.entry.id,
                None => {
                    h.entry.id = next;
                    next += 1;
                    table.push(OpenFile {
                        pid: p.pid,
                        fd: -1,
                        entry: h.entry.clone(),
                        via: Some(h.via.clone()),
                    });
                    h.entry.id
                }
            };
        }
    }
}
