//! The filesystem context of a process: its working directory, root and
//! umask.
//!
//! Dump: /proc/PID/cwd and /proc/PID/root, and the umask from
//! /proc/PID/status. Restore: the new task changes to the directory and
//! sets the umask before it hands over to the restorer; a root other
//! than `/` (a chrooted task) is refused.

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
    Ok(FsInfo {
        cwd: link("cwd")?,
        root: link("root")?,
        umask,
    })
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
