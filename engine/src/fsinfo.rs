//! The filesystem context of a process: its working directory, root and
//! umask.
//!
//! Dump: /proc/PID/cwd and /proc/PID/root (a chrooted task's root is a
//! directory other than `/`), and the umask from /proc/PID/status. A
//! working directory or root removed while the process had it goes into
//! files.img (`cwd_file`, `root_file`: made again and removed again by the
//! restore, see files::ghost). Restore: the new task changes to its
//! working directory (or into the remade one, through the descriptor cryo
//! made) and sets the umask; last, once it needs no more paths of cryo's,
//! it changes its root ([`open_root`], [`enter_root`]).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};

use cryo_image::proto::ProcessCore;
use nix::sys::stat::Mode;

#[derive(Debug, thiserror::Error)]
pub enum FsInfoError {
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The process's working directory, root and umask.
pub struct FsInfo {
    /// The kernel's link (ending in " (deleted)" when it was removed).
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub cwd_deleted: bool,
    pub root_deleted: bool,
}

/// Read from /proc; `status` is /proc/PID/status, parsed.
pub fn dump(pid: i32, status: &HashMap<String, String>) -> Result<FsInfo, FsInfoError> {
    let link = |what: &str| {
        let path = format!("/proc/{pid}/{what}");
        std::fs::read_link(&path)
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|source| FsInfoError::Proc { path, source })
    };
    let umask = status
        .get("Umask")
        .and_then(|u| u32::from_str_radix(u, 8).ok())
        .unwrap_or(0o022);
    let cwd = link("cwd")?;
    let root = link("root")?;
    // A removed directory has no links left.
    let removed = |name: &str| {
        let path = format!("/proc/{pid}/{name}");
        std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
            .map_err(|source| FsInfoError::Proc { path, source })
    };
    Ok(FsInfo {
        cwd,
        root,
        umask,
        cwd_deleted: removed("cwd")?,
        root_deleted: removed("root")?,
    })
}

/// In the new task: its working directory and umask. `files` are the
/// open file descriptions cryo made, by id (a removed working directory
/// is one of them).
pub fn restore(pc: &ProcessCore, files: &HashMap<u32, RawFd>) -> Result<(), String> {
    let io = std::io::Error::from;
    match pc.cwd_file {
        Some(id) => {
            let fd = *files.get(&id).ok_or_else(|| {
                format!(
                    "no directory was made again for the working directory {}",
                    pc.cwd
                )
            })?;
            nix::unistd::fchdir(crate::sys::fd::borrow(fd)).map_err(|e| {
                format!(
                    "changing into the working directory {} (made again): {}",
                    pc.cwd,
                    io(e)
                )
            })?
        }
        None => nix::unistd::chdir(pc.cwd.as_str())
            .map_err(|e| format!("changing to the working directory {}: {}", pc.cwd, io(e)))?,
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(pc.umask));
    Ok(())
}

/// The task's root, other than `/` (a chrooted task), opened while cryo's
/// paths still resolve: the directory by its path, or the remade one
/// (`root_file`, one of `files`). None: its root is `/`.
pub fn open_root(pc: &ProcessCore, files: &HashMap<u32, RawFd>) -> Result<Option<OwnedFd>, String> {
    use nix::fcntl::OFlag;
    let path = match pc.root_file {
        Some(id) => {
            let fd = files
                .get(&id)
                .ok_or_else(|| format!("no directory was made again for the root {}", pc.root))?;
            format!("/proc/self/fd/{fd}")
        }
        None if pc.root == "/" => return Ok(None),
        None => pc.root.clone(),
    };
    nix::fcntl::open(
        path.as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(Some)
    .map_err(|e| format!("opening the root {}: {}", pc.root, std::io::Error::from(e)))
}

/// Change the task's root to the directory `root` holds (see
/// [`open_root`]) and close it; the working directory stays.
pub fn enter_root(root: RawFd, pc: &ProcessCore) -> Result<(), String> {
    let path = format!("/proc/self/fd/{root}");
    let r = nix::unistd::chroot(path.as_str()).map_err(|e| {
        format!(
            "changing the root to {} (chroot): {}",
            pc.root,
            std::io::Error::from(e)
        )
    });
    crate::sys::fd::close(root);
    r
}
