//! The filesystem context of a process: its working directory, root and
//! umask.
//!
//! Dump: /proc/PID/cwd and /proc/PID/root, and the umask from
//! /proc/PID/status; a root that was deleted, and a root other than `/`
//! (a chrooted task), are refused. A working directory removed while the
//! process sat in it goes into files.img (`cwd_file`, made again and
//! removed again by the restore, see files::ghost). Restore: the new task
//! changes to the directory (or into the remade one, through the
//! descriptor cryo made) and sets the umask before it hands over to the
//! restorer.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::RawFd;

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
    #[error("task {pid}: its root {path} was deleted; cryo does not restore a removed root")]
    DeletedRoot { pid: i32, path: String },
    #[error("task {pid}: its root is {root} (chrooted); cryo restores only tasks whose root is /")]
    Chroot { pid: i32, root: String },
}

/// The process's working directory, root and umask.
pub struct FsInfo {
    /// The kernel's link (ending in " (deleted)" when it was removed).
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub cwd_deleted: bool,
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
    if removed("root")? {
        let path = root.trim_end_matches(" (deleted)").to_string();
        return Err(FsInfoError::DeletedRoot { pid, path });
    }
    if root != "/" {
        return Err(FsInfoError::Chroot { pid, root });
    }
    let cwd_deleted = removed("cwd")?;
    Ok(FsInfo {
        cwd,
        root,
        umask,
        cwd_deleted,
    })
}

/// In the new task: its working directory and umask. `files` are the
/// open file descriptions cryo made, by id (a removed working directory
/// is one of them).
pub fn restore(pc: &ProcessCore, files: &HashMap<u32, RawFd>) -> Result<(), String> {
    if pc.root != "/" {
        return Err(format!(
            "the task's root was {}; restoring a chrooted task is not supported yet",
            pc.root
        ));
    }
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
