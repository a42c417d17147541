//! inotify instances, dump and restore side by side.
//!
//! Dump: /proc/PID/fdinfo lists each watch with its descriptor number,
//! mask and a file handle of the watched inode; the handle is opened with
//! open_by_handle_at (on a mount of the same device) to learn its path.
//! Restore: a new instance watches every path again with its mask, in
//! descriptor order, so the kernel hands out the same watch descriptors
//! (gaps left by removed watches are filled with watches on scratch files,
//! removed afterwards). A watched file whose names were all removed is
//! found among the tree's open files by its inode (it is one of them, or
//! the watch would be gone) and watched again through its restored
//! descriptor. Events queued at the dump are not kept.

#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};

use cryo_image::proto::{InotifyState, InotifyWatch};

use crate::sys::fs;

#[derive(Debug, thiserror::Error)]
pub enum InotifyError {
    #[error("task {pid}: fd {fd}: inotify watch {wd}: {what}")]
    Watch {
        pid: i32,
        fd: i32,
        wd: i32,
        what: String,
    },
}

/// One watch line of an inotify fdinfo: (wd, ino, mask, sdev, handle
/// type, handle bytes). The kernel prints every number of it in hexadecimal
/// (`inotify wd:%x ino:%lx sdev:%x mask:%x ignored_mask:%x
/// fhandle-bytes:%x fhandle-type:%x f_handle:%02x...`, fs/notify/fdinfo.c):
/// watch 10 is `wd:a`.
fn parse_line(l: &str) -> Option<(i32, u64, u32, u64, i32, Vec<u8>)> {
    let l = l.strip_prefix("inotify ")?;
    let field = |k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix(':')))
    };
    let hex = |k: &str| u64::from_str_radix(field(k)?, 16).ok();
    let wd = i32::try_from(hex("wd")?).ok()?;
    let ino = hex("ino")?;
    let mask = u32::try_from(hex("mask")?).ok()?;
    let sdev = hex("sdev")?;
    let htype = i32::try_from(hex("fhandle-type")?).ok()?;
    let handle = field("f_handle")?;
    let bytes = (0..handle.len() / 2)
        .map(|i| u8::from_str_radix(handle.get(i * 2..i * 2 + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((wd, ino, mask, sdev, htype, bytes))
}

/// The mount point of a mount of device `sdev` (the kernel's
/// major << 20 | minor) in this process's mount namespace.
fn mount_of(sdev: u64) -> Option<String> {
    let want = format!("{}:{}", sdev >> 20, sdev & 0xf_ffff);
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.get(2) == Some(&want.as_str()) && w.get(3) == Some(&"/"))
            .then(|| w.get(4).map(|s| s.to_string()))
            .flatten()
    })
}

/// Every watch of the inotify instance behind `pid`'s descriptor `fd`,
/// from its fdinfo text. A watched file whose names were all removed has
/// no path: [`link_removed`] finds it among the tree's open files.
pub fn dump(pid: i32, fd: i32, fdinfo: &str) -> Result<InotifyState, InotifyError> {
    let mut watches = Vec::new();
    for l in fdinfo.lines().filter(|l| l.starts_with("inotify ")) {
        // A watch line that does not read is an error, never a watch
        // silently left out of the image.
        let Some((wd, ino, mask, sdev, htype, handle)) = parse_line(l) else {
            return Err(InotifyError::Watch {
                pid,
                fd,
                wd: -1,
                what: format!("cannot read its fdinfo line {l:?}"),
            });
        };
        let err = |what: String| InotifyError::Watch { pid, fd, wd, what };
        let mnt =
            mount_of(sdev).ok_or_else(|| err(format!("no mount of device {sdev:#x} here")))?;
        let mfd = std::fs::File::open(&mnt).map_err(|e| err(format!("opening {mnt}: {e}")))?;
        let path = match fs::open_by_handle_at(&mfd, htype, &handle, libc::O_PATH | libc::O_CLOEXEC)
        {
            Ok(f) => std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .map_err(|e| err(format!("the watched file's path: {e}")))?
                .to_string_lossy()
                .into_owned(),
            // The inode has no name left (ext4 refuses its handle).
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => String::new(),
            Err(e) => {
                return Err(err(format!(
                    "opening the watched file by its handle (needs CAP_DAC_READ_SEARCH): {e}"
                )))
            }
        };
        let removed = path.is_empty() || path.ends_with(" (deleted)");
        watches.push(InotifyWatch {
            wd: wd as u32,
            mask,
            path: if removed { String::new() } else { path },
            file_id: None,
            ino,
            dev: libc::makedev((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32),
        });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(InotifyState { watches })
}

/// Each watch of a removed file in `table` names the tree's open file
/// of that inode (a deleted file or directory, made again by the
/// restore); one that no task holds open is refused.
pub fn link_removed(table: &mut [super::OpenFile]) -> Result<(), InotifyError> {
    let inodes: Vec<(u64, u64, u32)> = table
        .iter()
        .map(|o| (o.entry.dev, o.entry.inode, o.entry.id))
        .collect();
    for o in table.iter_mut() {
        let (pid, fd) = (o.pid, o.fd);
        let Some(st) = o.entry.inotify.as_mut() else {
            continue;
        };
        for w in st.watches.iter_mut().filter(|w| w.path.is_empty()) {
            let id = inodes
                .iter()
                .find(|&&(dev, ino, _)| (dev, ino) == (w.dev, w.ino))
                .map(|x| x.2)
                .ok_or_else(|| InotifyError::Watch {
                    pid,
                    fd,
                    wd: w.wd as i32,
                    what: format!(
                        "the watched inode {} was removed and no task of the tree holds it open",
                        w.ino
                    ),
                })?;
            w.file_id = Some(id);
        }
    }
    Ok(())
}

/// A new inotify instance watching what `st` lists, with the same watch
/// descriptors; a removed file is watched through its restored open file
/// (in `files`, by id).
pub fn restore(
    st: &InotifyState,
    files: &std::collections::HashMap<u32, OwnedFd>,
) -> Result<OwnedFd, String> {
    let fd = fs::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK)
        .map_err(|e| format!("inotify_init1: {e}"))?;
    let mut scratch: Option<std::path::PathBuf> = None;
    let mut fillers: Vec<i32> = Vec::new();
    let add = |path: &str, mask: u32| -> Result<i32, String> {
        let c = std::ffi::CString::new(path).map_err(|_| format!("NUL in {path:?}"))?;
        fs::inotify_add_watch(&fd, &c, mask).map_err(|e| format!("watching {path}: {e}"))
    };
    // The kernel hands out watch descriptors 1, 2, ... in order: the
    // ones below a wanted descriptor go to scratch files.
    let mut handed = 0u32;
    for w in &st.watches {
        while handed + 1 < w.wd {
            let dir = match &scratch {
                Some(d) => d.clone(),
                None => {
                    let d =
                        std::env::temp_dir().join(format!("cryo-inotify-{}", std::process::id()));
                    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
                    scratch = Some(d.clone());
                    d
                }
            };
            let p = dir.join(format!("gap-{}", fillers.len()));
            std::fs::write(&p, b"").map_err(|e| e.to_string())?;
            fillers.push(add(&p.to_string_lossy(), libc::IN_ACCESS)?);
            handed += 1;
        }
        let path = match w.file_id {
            Some(id) => {
                let f = files
                    .get(&id)
                    .ok_or_else(|| format!("the removed file {id} watched is not open"))?;
                format!("/proc/self/fd/{}", f.as_raw_fd())
            }
            None => w.path.clone(),
        };
        let wd = add(&path, w.mask)?;
        handed += 1;
        if wd != w.wd as i32 {
            return Err(format!(
                "watching {} again gave watch descriptor {wd}, not {}",
                w.path, w.wd
            ));
        }
    }
    for wd in fillers {
        let _ = fs::inotify_rm_watch(&fd, wd);
    }
    if let Some(d) = scratch {
        let _ = std::fs::remove_dir_all(d);
    }
    // Drop the events the scratch watches made (IN_IGNORED, ...).
    let mut buf = [0u8; 4096];
    // Non-blocking reads until it is empty.
    while matches!(nix::unistd::read(&fd, &mut buf), Ok(n) if n > 0) {}
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_line() {
        let l = "inotify wd:2 ino:263 sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:6302000000000000";
        assert_eq!(
            parse_line(l),
            Some((2, 0x263, 2, 0xfe0_0000, 1, vec![0x63, 2, 0, 0, 0, 0, 0, 0]))
        );
        assert_eq!(parse_line("pos:\t0"), None);
        // Watch 10 and up, as Linux 6.18 prints them.
        let l = "inotify wd:1f ino:98e0e1 sdev:fe00000 mask:fff ignored_mask:0 fhandle-bytes:8 fhandle-type:4d f_handle:e1e09800b9c7687b";
        assert_eq!(
            parse_line(l),
            Some((
                31,
                0x98e0e1,
                0xfff,
                0xfe0_0000,
                0x4d,
                vec![0xe1, 0xe0, 0x98, 0, 0xb9, 0xc7, 0x68, 0x7b]
            ))
        );
    }
}
