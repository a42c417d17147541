//! Memory: the task's mappings (from /proc/PID/smaps), which pages of
//! each are worth storing (PAGEMAP_SCAN), and the page transfer.

#![forbid(unsafe_code)]

pub mod cow;
pub mod merge;
pub mod mm;
pub mod precopy;
pub mod restore;
pub mod shared;
pub mod snapshot;
pub mod store;
pub mod transfer;

use cryo_image::proto::{Vma, VmaKind};
use nix::unistd::Pid;
use procfs::process::{MMPermissions, MMapPath};

use crate::sys::{self, ScanQuery, SysError};

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("reading /proc/{pid}/smaps: {source}")]
    Smaps {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
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
    let maps = procfs::process::Process::new(pid.as_raw())
        .and_then(|p| if smaps { p.smaps() } else { p.maps() })
        .map_err(|source| MemError::Smaps {
            pid: pid.as_raw(),
            source,
        })?;
    let mut out = Vec::new();
    for m in maps {
        let (start, end) = m.address;
        if start >= 0x8000_0000_0000 {
            continue; // [vsyscall] lives above the user address space
        }
        let shared = m.perms.contains(MMPermissions::SHARED);
        let mut prot = 0u32;
        if m.perms.contains(MMPermissions::READ) {
            prot |= libc::PROT_READ as u32;
        }
        if m.perms.contains(MMPermissions::WRITE) {
            prot |= libc::PROT_WRITE as u32;
        }
        if m.perms.contains(MMPermissions::EXECUTE) {
            prot |= libc::PROT_EXEC as u32;
        }
        let flags: Vec<String> = m
            .extension
            .vm_flags
            .iter_names()
            .map(|(n, _)| vm_flag_name(n).to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let unsupported = |what: String| MemError::Unsupported {
            pid: pid.as_raw(),
            start,
            end,
            what,
        };
        let (kind, path) = match &m.pathname {
            MMapPath::Heap => (VmaKind::VmaHeap, String::new()),
            MMapPath::Stack => (VmaKind::VmaStack, String::new()),
            MMapPath::Vdso => (VmaKind::VmaVdso, String::new()),
            MMapPath::Vvar => (VmaKind::VmaVvar, String::new()),
            MMapPath::Vsyscall => continue,
            MMapPath::Anonymous => (
                if shared {
                    VmaKind::VmaAnonShared
                } else {
                    VmaKind::VmaAnonPrivate
                },
                String::new(),
            ),
            MMapPath::Other(s) if s == "vvar_vclock" || s == "[vvar_vclock]" => {
                (VmaKind::VmaVvarVclock, String::new())
            }
            MMapPath::Other(s) if s.starts_with("[anon:") || s.starts_with("anon:") => (
                if shared {
                    VmaKind::VmaAnonShared
                } else {
                    VmaKind::VmaAnonPrivate
                },
                String::new(),
            ),
            MMapPath::Path(p) => {
                let p = p.to_string_lossy().into_owned();
                if shared && p.starts_with("/dev/zero") {
                    (VmaKind::VmaAnonShared, String::new())
                } else if p.ends_with(" (deleted)") {
                    return Err(unsupported(format!("mapping of deleted file {p}")));
                } else if p.starts_with("/SYSV") || p.starts_with("/memfd:") {
                    return Err(unsupported(format!("SysV/memfd shared memory {p}")));
                } else if shared {
                    (VmaKind::VmaFileShared, p)
                } else {
                    (VmaKind::VmaFilePrivate, p)
                }
            }
            other => return Err(unsupported(format!("{other:?}"))),
        };
        let is_file = matches!(kind, VmaKind::VmaFilePrivate | VmaKind::VmaFileShared);
        let file_size = if is_file {
            std::fs::metadata(&path).map(|md| md.len()).unwrap_or(0)
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
            pgoff: if is_file || kind == VmaKind::VmaAnonShared {
                m.offset
            } else {
                0
            },
            path,
            dev: if is_file {
                ((m.dev.0 as u64) << 8) | m.dev.1 as u64
            } else {
                0
            },
            inode: if is_file { m.inode } else { 0 },
            vm_flags: flags,
            file_flags: if is_file && shared && may_write {
                libc::O_RDWR as u32
            } else {
                libc::O_RDONLY as u32
            },
            shmid: if kind == VmaKind::VmaAnonShared {
                m.inode
            } else {
                0
            },
            file_size,
        });
    }
    Ok(out)
}

/// The two-letter smaps name of a procfs VmFlags flag.
fn vm_flag_name(n: &str) -> &'static str {
    match n {
        "GD" => "gd",
        "DC" => "dc",
        "DD" => "dd",
        "WF" => "wf",
        "HG" => "hg",
        "NH" => "nh",
        "MG" => "mg",
        "MW" => "mw",
        "LO" => "lo",
        "SD" => "sd",
        _ => "",
    }
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

/// Which pages of each mapping go into the image.
pub fn page_runs(pid: Pid, vmas: &[Vma]) -> Result<Vec<Run>, MemError> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|source| {
        MemError::Pagemap {
            pid: pid.as_raw(),
            source,
        }
    })?;
    let mut runs = Vec::new();
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
                anyof: sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED,
                ret: sys::PAGE_IS_PRESENT,
                ..Default::default()
            },
            VmaKind::VmaAnonShared => ScanQuery {
                inverted: sys::PAGE_IS_PFNZERO,
                mask: sys::PAGE_IS_PFNZERO,
                anyof: sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED,
                ret: sys::PAGE_IS_PRESENT,
                ..Default::default()
            },
            _ => continue,
        };
        let zero_ok = v.kind != VmaKind::VmaFilePrivate as i32;
        for (s, e, _) in sys::pagemap_scan(&pagemap, pid, v.start, v.end, &q)? {
            let s = s.max(v.start);
            let e = e.min(v.end);
            if e > s {
                runs.push(Run {
                    start: s,
                    pages: (e - s) / PAGE,
                    zero_ok,
                });
            }
        }
    }
    Ok(runs)
}
