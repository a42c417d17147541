//! The filesystem context of a process: its working directory, root and
//! umask.
//!
//! Dump: /proc/PID/cwd and /proc/PID/root, and the umask from
//! /proc/PID/status; a working directory or root that was deleted, and a
//! root other than `/` (a chrooted task), are refused. Restore: the new
//! task changes to the directory and sets the umask before it hands over
//! to the restorer.

#![forbid(unsafe_code)]

use std::collections::HashMap;

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
    #[error(
        "task {pid}: its {what} {path} was deleted; cryo does not recreate deleted directories yet"
    )]
    Deleted {
        pid: i32,
        what: &'static str,
        path: String,
    },
    #[error("task {pid}: its root is {root} (chrooted); cryo restores only tasks whose root is /")]
    Chroot { pid: i32, root: String },
}

/// The process's working directory, root and umask.
pub struct FsInfo {
    pub cwd: String,
    pub root: String,
    pub umask: u32,
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
    for (what, name, path) in [("working directory", "cwd", &cwd), ("root", "root", &root)] {
        let proc_path = format!("/proc/{pid}/{name}");
        let meta = std::fs::metadata(&proc_path).map_err(|source| FsInfoError::Proc {
            path: proc_path,
            source,
        })?;
        // A removed directory has no links left.
        if std::os::unix::fs::MetadataExt::nlink(&meta) == 0 {
            let path = path.trim_end_matches(" (deleted)").to_string();
            return Err(FsInfoError::Deleted { pid, what, path });
        }
    }
    if root != "/" {
        return Err(FsInfoError::Chroot { pid, root });
    }
    Ok(FsInfo { cwd, root, umask })
}

/// In the new task: its working directory and umask.
pub fn restore(pc: &ProcessCore) -> Result<(), String> {
    if pc.root != "/" {
        return Err(format!(
            "the task's root was {}; restoring a chrooted task is not supported yet",
            pc.root
        ));
    }
    nix::unistd::chdir(pc.cwd.as_str()).map_err(|e| {
        format!(
            "changing to the working directory {}: {}",
            pc.cwd,
            std::io::Error::from(e)
        )
    })?;
    nix::sys::stat::umask(Mode::from_bits_truncate(pc.umask));
    Ok(())
}
