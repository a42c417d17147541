//! Pseudo-terminal pairs, dump and restore side by side.
//!
//! Dump: a master (/dev/ptmx) is taken from the stopped task with
//! pidfd_getfd and asked for its index (TIOCGPTN), its lock and packet
//! mode, and the slave's line settings and window size (TCGETS2 and
//! TIOCGWINSZ on a master act on the slave). A slave (/dev/pts/N) only
//! records N: whether its master is in the dumped tree is decided once
//! every process's descriptors are known ([`pair`]); the sessions whose
//! controlling terminal is a pty of the tree are `sessions::pty_cttys`.
//!
//! Restore: /dev/ptmx is opened until the kernel, which hands out the
//! lowest free index, gives the dumped one (the masters opened on the way
//! are closed once every pty is made); the pair is unlocked, its settings
//! and window size put back, then its slaves opened, and it is locked
//! again at the end if it was. Bytes queued in either direction at the
//! dump are not kept: the restored pair starts empty. A slave whose
//! master had been closed (hung up, its node gone) comes back as the slave
//! of a new pair whose master is closed at once.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use cryo_image::proto::{FileEntry, FileKind, PtyState, Termios, Winsize};
use nix::errno::Errno;

use super::{FdCtx, FilesError, ProcFds, ProcHandles};
use crate::sys::tty;

#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("task {pid}: fd {fd} (a pty master): {what}: {errno}")]
    Master {
        pid: i32,
        fd: i32,
        what: &'static str,
        #[source]
        errno: Errno,
    },
}

/// Dump side: a master's index and state (read through a duplicate of the
/// task's descriptor), a slave's index.
pub fn dump(
    kind: FileKind,
    cx: &FdCtx,
    h: &mut ProcHandles,
    e: &mut FileEntry,
) -> Result<(), FilesError> {
    use std::os::unix::fs::MetadataExt;
    // A pty of a devpts cryo does not see (mounted in the tree's own mount
    // namespace) is of an instance the restore mounts anew there: its
    // index space is its own. (The entry's mnt_id is fdinfo's, read by
    // describe.)
    let own = e.mnt_id == 0 || crate::ns::mnt::own_mount_ids().contains(&e.mnt_id);
    e.pty = if kind == FileKind::FilePtyMaster {
        let master = h.getfd(cx.pid, cx.fd)?;
        let mut st = dump_master(cx.pid, cx.fd, master.as_raw_fd())?;
        // The slave node's owner and mode: by its path where cryo sees
        // it, else through the slave the master opens.
        let node = if own {
            std::fs::metadata(pts_dir(cx.link).join(st.index.to_string())).ok()
        } else {
            let peer = tty::pty_peer(master.as_raw_fd(), libc::O_RDONLY | libc::O_CLOEXEC)
                .map_err(|errno| PtyError::Master {
                    pid: cx.pid,
                    fd: cx.fd,
                    what: "TIOCGPTPEER (its slave, in the tree's own devpts)",
                    errno,
                })?;
            let m = std::fs::File::from(peer).metadata().ok();
            st.devpts = m.as_ref().map_or(0, |m| m.dev());
            m
        };
        if let Some(m) = node {
            st.slave_uid = Some(m.uid());
            st.slave_gid = Some(m.gid());
            st.slave_mode = Some(m.mode() & 0o7777);
        }
        Some(st)
    } else {
        tty::pty_slave_index(cx.st.st_rdev).map(|i| PtyState {
            devpts: if own { 0 } else { cx.st.st_dev },
            ..slave_state(i)
        })
    };
    Ok(())
}

/// A pty's devpts instance and index: what pairs a master with its slaves.
fn key_of(f: &FileEntry) -> Option<(u64, u32)> {
    f.pty.as_ref().map(|p| (p.devpts, p.index))
}

fn is(f: &FileEntry, k: FileKind) -> bool {
    f.kind == k as i32
}

/// Match pty slaves with the masters of the tree (once every process's
/// descriptors are known: the master may be in another process than the
/// slave). A slave whose master is held outside the tree is the
/// controlling terminal of a --shell-job (it becomes FILE_SHELL_TTY) or is
/// refused; so is a master whose slave is open outside the tree. `cttys`
/// gives each process's controlling terminal (device number). Returns the
/// indices of the tree's masters.
pub fn pair(
    procs: &mut [ProcFds],
    cttys: &BTreeMap<i32, u64>,
    tree: &BTreeSet<i32>,
    shell_job: bool,
) -> Result<BTreeSet<u32>, FilesError> {
    let masters: BTreeSet<(u64, u32)> = procs
        .iter()
        .flat_map(|p| p.files.iter())
        .filter(|f| is(f, FileKind::FilePtyMaster))
        .filter_map(key_of)
        .collect();
    // A controlling terminal is known by its device number only, which a
    // pty of the tree's own devpts shares with cryo's of the same index.
    let own_devpts: BTreeSet<u32> = procs
        .iter()
        .flat_map(|p| p.files.iter())
        .filter_map(key_of)
        .filter(|(d, _)| *d != 0)
        .map(|(_, i)| i)
        .collect();
    for p in procs.iter() {
        let ctty = cttys.get(&p.pid).copied().unwrap_or(0);
        let ctty_index = tty::pty_slave_index(ctty).filter(|_| ctty != 0);
        if let Some(i) = ctty_index.filter(|i| own_devpts.contains(i)) {
            return Err(FilesError::UnsupportedFd {
                pid: p.pid,
                fd: -1,
                what: "its controlling terminal is pty N of a devpts, and the tree has a pty N of its own devpts: which one it is cannot be told (not supported yet)",
                link: format!("pty {i}"),
            });
        }
    }
    for p in procs.iter_mut() {
        let ctty = cttys.get(&p.pid).copied().unwrap_or(0);
        let ctty_index = tty::pty_slave_index(ctty).filter(|_| ctty != 0);
        let ProcFds {
            pid,
            fd_entries,
            files,
            ..
        } = p;
        for f in files.iter_mut() {
            let Some((devpts, index)) = key_of(f).filter(|_| is(f, FileKind::FilePtySlave)) else {
                continue;
            };
            // A slave whose master was closed has none to pair with.
            if masters.contains(&(devpts, index)) || f.deleted {
                continue;
            }
            let is_ctty = devpts == 0 && ctty_index == Some(index);
            if shell_job && is_ctty {
                f.kind = FileKind::FileShellTty as i32;
                f.pty = None;
                continue;
            }
            let fd = fd_entries
                .iter()
                .find(|e| e.id == f.id)
                .map(|e| e.fd as i32)
                .unwrap_or(-1);
            return Err(FilesError::UnsupportedFd {
                pid: *pid,
                fd,
                what: if is_ctty {
                    "its controlling terminal, a pty whose master is held outside the dumped tree (a shell job: dump it with --shell-job)"
                } else {
                    "the slave of a pseudo-terminal whose master is held outside the dumped tree (not supported)"
                },
                link: f.path.clone(),
            });
        }
    }
    // The masters of cryo's devpts: those the sessions know by index.
    let masters: BTreeSet<u32> = masters
        .into_iter()
        .filter(|(d, _)| *d == 0)
        .map(|(_, i)| i)
        .collect();
    if masters.is_empty() {
        return Ok(masters);
    }
    // A slave open outside the tree would be cut off from its restored
    // master: refused, as for pipes.
    let wanted: BTreeMap<String, u32> = masters
        .iter()
        .map(|&i| (format!("/dev/pts/{i}"), i))
        .collect();
    if let Some((holder, index)) = super::outside_holder(tree, |l| wanted.get(l).copied()) {
        let (pid, fd, link) = procs
            .iter()
            .find_map(|p| {
                let f = p
                    .files
                    .iter()
                    .find(|f| is(f, FileKind::FilePtyMaster) && key_of(f) == Some((0, index)))?;
                Some((p.pid, p.fd_of(f.id), f.path.clone()))
            })
            .unwrap_or_default();
        return Err(FilesError::ExternalPtySlave {
            pid,
            fd,
            link,
            index,
            holder,
        });
    }
    Ok(masters)
}

/// The index and state of the pty whose master is `master`, a duplicate
/// of descriptor `fd` of task `pid`.
pub fn dump_master(pid: i32, fd: i32, master: RawFd) -> Result<PtyState, PtyError> {
    let err = |what: &'static str| {
        move |errno: Errno| PtyError::Master {
            pid,
            fd,
            what,
            errno,
        }
    };
    let index = tty::pty_number(master).map_err(err("TIOCGPTN (its index)"))?;
    let t = tty::get_termios(master).map_err(err("TCGETS2 (line settings)"))?;
    let w = tty::get_winsize(master).map_err(err("TIOCGWINSZ (window size)"))?;
    let locked = tty::pty_locked(master).map_err(err("TIOCGPTLCK (lock)"))?;
    let packet = tty::packet_mode(master).map_err(err("TIOCGPKT (packet mode)"))?;
    Ok(PtyState {
        index,
        termios: Some(Termios {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line as u32,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }),
        winsize: Some(Winsize {
            rows: w.ws_row as u32,
            cols: w.ws_col as u32,
            xpixel: w.ws_xpixel as u32,
            ypixel: w.ws_ypixel as u32,
        }),
        locked,
        packet,
        ..Default::default()
    })
}

/// What a slave records: its index.
pub fn slave_state(index: u32) -> PtyState {
    PtyState {
        index,
        ..Default::default()
    }
}

/// The directory of the slaves of the devpts instance a master was opened
/// through: /dev/pts for /dev/ptmx and for /dev/pts/ptmx.
fn pts_dir(master_path: &str) -> PathBuf {
    let parent = Path::new(master_path).parent().unwrap_or(Path::new("/dev"));
    if parent.file_name().is_some_and(|n| n == "pts") {
        parent.to_path_buf()
    } else {
        parent.join("pts")
    }
}

/// Open a terminal device that never becomes the caller's controlling
/// terminal by this open.
fn open_raw(path: &str, flags: i32) -> Result<OwnedFd, Errno> {
    use nix::fcntl::OFlag;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty())
}

/// A new master of pty `st.index` (the master entry `f`), opened through
/// its dumped path with its access mode, unlocked, with the dumped line
/// settings, window size and packet mode. Masters the kernel hands out on
/// the way (lower indices) go to `spare`, to be closed once every pty is
/// made (closing one earlier would free its index for the next open).
fn open_master(f: &FileEntry, st: &PtyState, spare: &mut Vec<OwnedFd>) -> Result<OwnedFd, String> {
    let index = st.index;
    let slave = pts_dir(&f.path).join(index.to_string());
    if slave.exists() {
        return Err(format!(
            "pty {index} is in use ({} exists)",
            slave.display()
        ));
    }
    let acc = f.flags as i32 & libc::O_ACCMODE;
    // At most index + 1 opens reach it when nothing else allocates ptys.
    for _ in 0..=index as u64 + 64 {
        let fd = open_raw(&f.path, acc).map_err(|e| format!("opening {}: {e}", f.path))?;
        let got = tty::pty_number(fd.as_raw_fd()).map_err(|e| format!("TIOCGPTN: {e}"))?;
        if got == index {
            set_state(fd.as_raw_fd(), st)?;
            set_slave_owner(&slave, st)?;
            return Ok(fd);
        }
        if got > index {
            return Err(format!(
                "pty {index} is in use (the kernel handed out pty {got} instead)"
            ));
        }
        spare.push(fd);
    }
    Err(format!(
        "pty {index} is in use (other ptys keep being made)"
    ))
}

/// Every master of `masters` (of one devpts instance, opened in the mount
/// namespace the caller is in), by file id, opened in index order (each
/// is its pair's only open file description), unlocked until the slaves
/// are open. The masters handed out on the way are closed at the end.
pub fn open_masters<'a>(
    masters: &[&'a FileEntry],
) -> Result<HashMap<u32, OwnedFd>, (&'a FileEntry, String)> {
    let mut sorted = masters.to_vec();
    sorted.sort_by_key(|f| key_of(f));
    let mut spare: Vec<OwnedFd> = Vec::new();
    let mut out = HashMap::new();
    for f in sorted {
        let Some(st) = &f.pty else {
            return Err((f, "a pty master without its pty state".into()));
        };
        let m = open_master(f, st, &mut spare).map_err(|e| (f, e))?;
        out.insert(f.id, m);
    }
    Ok(out)
}

/// The slave node's dumped owner and mode, given back (the kernel made
/// it the opener's).
fn set_slave_owner(slave: &Path, st: &PtyState) -> Result<(), String> {
    let io = std::io::Error::from;
    if st.slave_uid.is_some() || st.slave_gid.is_some() {
        nix::unistd::chown(
            slave,
            st.slave_uid.map(nix::unistd::Uid::from_raw),
            st.slave_gid.map(nix::unistd::Gid::from_raw),
        )
        .map_err(|e| format!("giving {} its owner: {}", slave.display(), io(e)))?;
    }
    if let Some(mode) = st.slave_mode {
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            slave,
            nix::sys::stat::Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| format!("giving {} its mode {mode:o}: {}", slave.display(), io(e)))?;
    }
    Ok(())
}

/// Unlock the master `fd` and give the pair the dumped settings.
fn set_state(fd: RawFd, st: &PtyState) -> Result<(), String> {
    let index = st.index;
    tty::set_pty_locked(fd, false).map_err(|e| format!("unlocking pty {index}: {e}"))?;
    if let Some(t) = &st.termios {
        let mut cc = [0u8; 19];
        let n = t.cc.len().min(cc.len());
        cc[..n].copy_from_slice(&t.cc[..n]);
        let t2 = libc::termios2 {
            c_iflag: t.iflag,
            c_oflag: t.oflag,
            c_cflag: t.cflag,
            c_lflag: t.lflag,
            c_line: t.line as libc::cc_t,
            c_cc: cc,
            c_ispeed: t.ispeed,
            c_ospeed: t.ospeed,
        };
        tty::set_termios(fd, &t2)
            .map_err(|e| format!("setting the line settings of pty {index}: {e}"))?;
    }
    if let Some(w) = &st.winsize {
        let ws = libc::winsize {
            ws_row: w.rows as u16,
            ws_col: w.cols as u16,
            ws_xpixel: w.xpixel as u16,
            ws_ypixel: w.ypixel as u16,
        };
        tty::set_winsize(fd, &ws)
            .map_err(|e| format!("setting the window size of pty {index}: {e}"))?;
    }
    tty::set_packet_mode(fd, st.packet)
        .map_err(|e| format!("setting packet mode of pty {index}: {e}"))
}

/// Lock the master again if it was locked at the dump (once its slaves,
/// if any, are open).
pub fn relock(fd: RawFd, st: &PtyState) -> Result<(), String> {
    if st.locked {
        tty::set_pty_locked(fd, true).map_err(|e| format!("locking pty {}: {e}", st.index))?;
    }
    Ok(())
}

/// A new open file description of the slave entry `f`, with its dumped
/// flags (never becoming anyone's controlling terminal by this open).
pub fn open_slave(f: &FileEntry) -> Result<OwnedFd, String> {
    let flags = f.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL);
    if f.deleted {
        return open_hung_up(f, flags);
    }
    open_raw(&f.path, flags).map_err(|e| format!("opening the pty slave: {e}"))
}

/// A slave whose master had been closed (its /dev/pts node gone: reads
/// give end of file, writes EIO): the slave of a new pair, whose master
/// is closed at once.
fn open_hung_up(f: &FileEntry, flags: i32) -> Result<OwnedFd, String> {
    let dir = pts_dir(&f.path);
    let ptmx = dir
        .parent()
        .map(|d| d.join("ptmx"))
        .unwrap_or_else(|| PathBuf::from("/dev/ptmx"));
    let m = open_raw(&ptmx.to_string_lossy(), libc::O_RDWR)
        .map_err(|e| format!("opening {} for a hung-up slave: {e}", ptmx.display()))?;
    let index = tty::pty_number(m.as_raw_fd()).map_err(|e| format!("TIOCGPTN: {e}"))?;
    tty::set_pty_locked(m.as_raw_fd(), false).map_err(|e| format!("unlocking: {e}"))?;
    let slave = dir.join(index.to_string());
    let s = open_raw(&slave.to_string_lossy(), flags)
        .map_err(|e| format!("opening {}: {e}", slave.display()))?;
    // Closing the only master hangs the slave up.
    drop(m);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slaves_live_next_to_the_master() {
        assert_eq!(pts_dir("/dev/ptmx"), PathBuf::from("/dev/pts"));
        assert_eq!(pts_dir("/dev/pts/ptmx"), PathBuf::from("/dev/pts"));
        assert_eq!(
            pts_dir("/chroot/dev/ptmx"),
            PathBuf::from("/chroot/dev/pts")
        );
    }

    /// A pty made here goes through dump_master and back through
    /// open_master on a fresh index: same settings, size and modes.
    #[test]
    fn master_state_round_trips() {
        let ptmx = "/dev/ptmx";
        let Ok(m) = open_raw(ptmx, libc::O_RDWR) else {
            return; // no ptys in this environment
        };
        let fd = m.as_raw_fd();
        tty::set_pty_locked(fd, false).expect("unlock");
        let mut t = tty::get_termios(fd).expect("TCGETS2");
        t.c_lflag &= !(libc::ECHO | libc::ICANON);
        t.c_cc[libc::VMIN] = 3;
        t.c_cc[libc::VTIME] = 7;
        tty::set_termios(fd, &t).expect("TCSETS2");
        let ws = libc::winsize {
            ws_row: 37,
            ws_col: 101,
            ws_xpixel: 5,
            ws_ypixel: 6,
        };
        tty::set_winsize(fd, &ws).expect("TIOCSWINSZ");
        tty::set_packet_mode(fd, true).expect("TIOCPKT");
        let st = dump_master(std::process::id() as i32, fd, fd).expect("dump");
        assert!(!st.locked && st.packet);
        assert_eq!(st.winsize.map(|w| (w.rows, w.cols)), Some((37, 101)));
        // Another pty with that state (any free index).
        let n = open_raw(ptmx, libc::O_RDWR).expect("second master");
        let st2 = PtyState {
            index: tty::pty_number(n.as_raw_fd()).expect("TIOCGPTN"),
            ..st.clone()
        };
        set_state(n.as_raw_fd(), &st2).expect("set_state");
        let back = dump_master(std::process::id() as i32, n.as_raw_fd(), n.as_raw_fd())
            .expect("dump again");
        assert_eq!(back.termios, st.termios);
        assert_eq!(back.winsize, st.winsize);
        assert_eq!((back.locked, back.packet), (false, true));
        let mut spare = Vec::new();
        let f = FileEntry {
            path: "/dev/ptmx".into(),
            flags: libc::O_RDWR as u32,
            ..Default::default()
        };
        // Its index is taken: refused by name.
        let e = open_master(&f, &st2, &mut spare).expect_err("index in use");
        assert!(e.contains(&format!("pty {} is in use", st2.index)), "{e}");
    }
}
