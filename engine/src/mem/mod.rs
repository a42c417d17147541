//! Memory: the task's mappings (from /proc/PID/smaps), which pages of
//! each are worth storing (PAGEMAP_SCAN), and the page transfer.

#![forbid(unsafe_code)]

pub mod cow;
pub mod incremental;
pub mod merge;
pub mod mm;
pub mod precopy;
pub mod restore;
pub mod shared;
pub mod snapshot;
pub mod store;
pub mod track;
pub mod transfer;

use cryo_image::proto::{PageRange, Vma, VmaKind};
use nix::unistd::Pid;

use crate::sys::{self, ScanQuery, SysError};

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("opening /proc/{pid}/pagemap: {source}")]
    Pagemap {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading /proc/{pid}/pagemap: {source}")]
    PagemapRead {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("task {pid}: mapping {start:#x}-{end:#x} ({what}) is not supported yet")]
    Unsupported {
        pid: i32,
        start: u64,
        end: u64,
        what: String,
    },
}

pub const PAGE: u64 = 4096;

/// Memory whose writes userfaultfd can track for cryo (write-protection
/// of anonymous memory works in both modes): private anonymous memory the
/// task can read.
pub(crate) fn trackable(v: &Vma) -> bool {
    matches!(
        VmaKind::try_from(v.kind),
        Ok(VmaKind::VmaAnonPrivate | VmaKind::VmaHeap | VmaKind::VmaStack)
    ) && v.prot & libc::PROT_READ as u32 != 0
}

/// Read the task's mappings with the flags restore needs.
pub fn read_vmas(pid: Pid) -> Result<Vec<Vma>, MemError> {
    vmas_of(pid, true)
}

/// The mappings as /proc/PID/maps shows them: no VmFlags (so no
/// `vm_flags`, and `file_flags` read-only), without the page walk smaps
/// makes. Enough to find and protect pages while smaps is read.
pub fn read_layout(pid: Pid) -> Result<Vec<Vma>, MemError> {
    vmas_of(pid, false)
}

/// Whether two readings show the same mappings.
pub fn same_layout(a: &[Vma], b: &[Vma]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (x.start, x.end, x.prot, x.kind, x.pgoff, x.inode)
                == (y.start, y.end, y.prot, y.kind, y.pgoff, y.inode)
        })
}

fn vmas_of(pid: Pid, smaps: bool) -> Result<Vec<Vma>, MemError> {
    let path = format!("/proc/{pid}/{}", if smaps { "smaps" } else { "maps" });
    let text = std::fs::read_to_string(&path).map_err(|source| MemError::Proc {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for m in crate::proc::parse_maps(&text) {
        let (start, end) = (m.start, m.end);
        if start >= 0x8000_0000_0000 {
            continue; // [vsyscall] lives above the user address space
        }
        let perm = |i: usize| m.perms.as_bytes().get(i).copied();
        let shared = perm(3) == Some(b's');
        let mut prot = 0u32;
        for (i, c, p) in [
            (0, b'r', libc::PROT_READ),
            (1, b'w', libc::PROT_WRITE),
            (2, b'x', libc::PROT_EXEC),
        ] {
            if perm(i) == Some(c) {
                prot |= p as u32;
            }
        }
        let flags: Vec<String> = m
            .vm_flags
            .iter()
            .filter(|f| KEPT_VM_FLAGS.contains(&f.as_str()))
            .cloned()
            .collect();
        let unsupported = |what: String| MemError::Unsupported {
            pid: pid.as_raw(),
            start,
            end,
            what,
        };
        let anon = if shared {
            VmaKind::VmaAnonShared
        } else {
            VmaKind::VmaAnonPrivate
        };
        let name = m.name.as_str();
        let (kind, path) = match name {
            "" => (anon, String::new()),
            "[heap]" => (VmaKind::VmaHeap, String::new()),
            "[stack]" => (VmaKind::VmaStack, String::new()),
            "[vdso]" => (VmaKind::VmaVdso, String::new()),
            "[vvar]" => (VmaKind::VmaVvar, String::new()),
            "[vvar_vclock]" => (VmaKind::VmaVvarVclock, String::new()),
            "[vsyscall]" => continue,
            // Named with PR_SET_VMA_ANON_NAME.
            _ if name.starts_with("[anon:") || name.starts_with("[anon_shmem:") => {
                (anon, String::new())
            }
            _ if shared && name.starts_with("/dev/zero") => (VmaKind::VmaAnonShared, String::new()),
            // Its segment comes with the task's IPC namespace, if that is
            // not cryo's.
            _ if name.starts_with("/SYSV")
                && crate::ns::is_own(pid.as_raw(), crate::ns::NsKind::Ipc) =>
            {
                return Err(unsupported(format!(
                    "System V shared memory {name} of cryo's own IPC namespace (only a segment of an IPC namespace of the tree's own is kept)"
                )));
            }
            _ if name.starts_with("/SYSV") => {
                // Made again whole (shmat): a part of a segment (split by
                // mprotect or munmap) is refused here, not at the restore.
                let size = std::fs::metadata(map_files(pid.as_raw(), start, end))
                    .map(|md| md.len())
                    .unwrap_or(0);
                let whole = size.div_ceil(4096) * 4096;
                if m.offset != 0 || end - start != whole {
                    return Err(unsupported(format!(
                        "the mapping at {start:#x} is a part of System V segment {} ({} bytes at offset {} of {size}): only whole attachments are kept yet",
                        m.inode,
                        end - start,
                        m.offset
                    )));
                }
                (VmaKind::VmaSysvShm, name.to_string())
            }
            _ if name.starts_with('/') && shared => (VmaKind::VmaFileShared, name.to_string()),
            _ if name.starts_with('/') => (VmaKind::VmaFilePrivate, name.to_string()),
            _ => return Err(unsupported(format!("a mapping of kind {name}"))),
        };
        let is_file = matches!(kind, VmaKind::VmaFilePrivate | VmaKind::VmaFileShared);
        // A memfd or a deleted file is measured through map_files (its
        // old path may name another file now).
        let size_at = if is_file && is_unnamed(&path) {
            map_files(pid.as_raw(), start, end)
        } else {
            path.clone()
        };
        let file_size = if is_file {
            std::fs::metadata(&size_at).map(|md| md.len()).unwrap_or(0)
        } else {
            0
        };
        let may_write = flags.iter().any(|f| f == "mw");
        out.push(Vma {
            start,
            end,
            prot,
            kind: kind as i32,
            // Shared anonymous memory: the offset into its shmem object.
            pgoff: if is_file || matches!(kind, VmaKind::VmaAnonShared | VmaKind::VmaSysvShm) {
                m.offset
            } else {
                0
            },
            path,
            dev: if is_file {
                (u64::from(m.dev.0) << 8) | u64::from(m.dev.1)
            } else {
                0
            },
            inode: if is_file { m.inode } else { 0 },
            vm_flags: flags,
            file_flags: if (is_file || kind == VmaKind::VmaSysvShm) && shared && may_write {
                libc::O_RDWR as u32
            } else {
                libc::O_RDONLY as u32
            },
            // The shmem object's inode; of a System V segment, its id.
            shmid: if matches!(kind, VmaKind::VmaAnonShared | VmaKind::VmaSysvShm) {
                m.inode
            } else {
                0
            },
            file_size,
            file_id: 0,
        });
    }
    Ok(out)
}

/// The smaps VmFlags the image keeps: what restore sets again (gd
/// growsdown, dc dontcopy, dd dontdump, wf wipeonfork, hg/nh huge page
/// advice, mg mergeable, dp droppable, sl sealed) or needs to know (mw
/// may write, lo locked, sd soft-dirty).
const KEPT_VM_FLAGS: [&str; 12] = [
    "gd", "dc", "dd", "wf", "hg", "nh", "mg", "mw", "lo", "sd", "dp", "sl",
];

/// Whether a mapped file's kernel name says it has no name left: a memfd,
/// or a file deleted while mapped (its contents go into the image).
pub fn is_unnamed(path: &str) -> bool {
    path.ends_with(" (deleted)")
}

/// The /proc link that opens the file mapped at `start`-`end` of `pid`
/// (root only: CAP_SYS_ADMIN).
pub fn map_files(pid: i32, start: u64, end: u64) -> String {
    format!("/proc/{pid}/map_files/{start:x}-{end:x}")
}

/// A run of pages to store: start address, page count, and whether pages
/// that turn out to hold only zeros may be left out of the image (true for
/// anonymous memory, where a missing page reads as zero after restore).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub pages: u64,
    pub zero_ok: bool,
}

/// Which pages of each mapping go into the image, and the guard regions
/// (MADV_GUARD_INSTALL) of the mappings restore premaps (one in a shared
/// file mapping is refused).
pub fn page_runs(pid: Pid, vmas: &[Vma]) -> Result<(Vec<Run>, Vec<PageRange>), MemError> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|source| {
        MemError::Pagemap {
            pid: pid.as_raw(),
            source,
        }
    })?;
    // A guard page reads as swapped: it is told apart by its own bit.
    let guard = if sys::scan_knows_guards() {
        sys::PAGE_IS_GUARD
    } else {
        0
    };
    let mut runs = Vec::new();
    let mut guards = Vec::new();
    for v in vmas {
        let q = match VmaKind::try_from(v.kind).unwrap_or(VmaKind::VmaVdso) {
            // Private memory: pages the task has (not the shared zero page,
            // not page-cache pages of a file it never wrote to).
            VmaKind::VmaAnonPrivate
            | VmaKind::VmaHeap
            | VmaKind::VmaStack
            | VmaKind::VmaFilePrivate => ScanQuery {
                inverted: sys::PAGE_IS_PFNZERO | sys::PAGE_IS_FILE,
                mask: sys::PAGE_IS_PFNZERO | sys::PAGE_IS_FILE,
                anyof: sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED | guard,
                ret: sys::PAGE_IS_PRESENT | guard,
                ..Default::default()
            },
            VmaKind::VmaAnonShared => ScanQuery {
                inverted: sys::PAGE_IS_PFNZERO,
                mask: sys::PAGE_IS_PFNZERO,
                anyof: sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED | guard,
                ret: sys::PAGE_IS_PRESENT | guard,
                ..Default::default()
            },
            VmaKind::VmaFileShared if guard != 0 => {
                let q = ScanQuery {
                    mask: guard,
                    ret: guard,
                    ..Default::default()
                };
                if let Some(&(s, e, _)) =
                    sys::pagemap_scan(&pagemap, pid, v.start, v.end, &q)?.first()
                {
                    return Err(MemError::Unsupported {
                        pid: pid.as_raw(),
                        start: v.start,
                        end: v.end,
                        what: format!(
                            "a guard region ({s:#x}-{e:#x}, MADV_GUARD_INSTALL) in a shared mapping of {}",
                            v.path
                        ),
                    });
                }
                continue;
            }
            _ => continue,
        };
        let zero_ok = v.kind != VmaKind::VmaFilePrivate as i32;
        for (s, e, cat) in sys::pagemap_scan(&pagemap, pid, v.start, v.end, &q)? {
            let s = s.max(v.start);
            let e = e.min(v.end);
            if e <= s {
                continue;
            }
            if cat & guard != 0 {
                guards.push(PageRange { start: s, end: e });
            } else {
                runs.push(Run {
                    start: s,
                    pages: (e - s) / PAGE,
                    zero_ok,
                });
            }
        }
    }
    Ok((runs, guards))
}
