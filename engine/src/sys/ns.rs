//! Namespace system calls: the owner of a namespace (NS_GET_USERNS), a
//! UTS namespace's names read from inside it, and a new UTS namespace
//! with given names.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// The inode of the namespace an nsfs ioctl (NS_GET_USERNS,
/// NS_GET_PARENT) on the namespace open at `ns` gives.
fn related_inode(ns: &impl AsFd, req: libc::c_ulong) -> io::Result<u64> {
    // SAFETY: both requests take no argument and return a new descriptor,
    // which we own at once.
    let fd = unsafe { libc::ioctl(ns.as_fd().as_raw_fd(), req) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nothing else.
    let related = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::File::from(related).metadata()?.ino())
}

/// The inode of the user namespace owning the namespace open at `ns`.
pub fn owner_inode(ns: &impl AsFd) -> io::Result<u64> {
    related_inode(ns, 0xb701) // NS_GET_USERNS
}

/// The inode of the parent of the user namespace open at `ns`.
pub fn parent_inode(ns: &impl AsFd) -> io::Result<u64> {
    related_inode(ns, 0xb702) // NS_GET_PARENT
}

fn field(b: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `f`, run by a thread of ours that enters the namespace open at `ns`
/// first (`kind`: CLONE_NEWUTS, CLONE_NEWIPC: kinds a thread has of its
/// own); the thread ends right after.
pub fn in_namespace<T: Send>(
    ns: OwnedFd,
    kind: nix::sched::CloneFlags,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, kind).map_err(io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread in the namespace panicked")))
    })
}

/// The host and domain names of the UTS namespace open at `ns`, read by
/// a thread of ours that enters it.
pub fn uts_names(ns: OwnedFd) -> io::Result<(String, String)> {
    in_namespace(ns, nix::sched::CloneFlags::CLONE_NEWUTS, || {
        // SAFETY: zeroed is a valid utsname; uname fills it.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: uname writes into the local struct.
        if unsafe { libc::uname(&mut u) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((field(&u.nodename), field(&u.domainname)))
    })
}

/// Put this process in a new UTS namespace named `host` and `domain`.
pub fn new_uts(host: &str, domain: &str) -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS).map_err(io::Error::from)?;
    set_uts_names(host, domain)
}

/// CLOCK_MONOTONIC and CLOCK_BOOTTIME of this process's time namespace,
/// in nanoseconds.
pub fn clocks_ns() -> io::Result<(i64, i64)> {
    let read = |id| {
        nix::time::clock_gettime(id)
            .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
            .map_err(io::Error::from)
    };
    Ok((
        read(nix::time::ClockId::CLOCK_MONOTONIC)?,
        read(nix::time::ClockId::CLOCK_BOOTTIME)?,
    ))
}

/// Put this (single-threaded) process in a new time namespace whose
/// CLOCK_MONOTONIC and CLOCK_BOOTTIME are these many nanoseconds ahead of
/// the host's: unshare makes it for the children, its offsets are set
/// before any task is in it, and setns enters it.
pub fn new_time(monotonic_ns: i64, boottime_ns: i64) -> io::Result<()> {
    use std::io::Write;
    // SAFETY: unshare takes a flag; CLONE_NEWTIME only changes the time
    // namespace this process's next children are made in.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/timens_offsets")?
        .write_all(offsets_text(monotonic_ns, boottime_ns).as_bytes())?;
    let ns = std::fs::File::open("/proc/self/ns/time_for_children")?;
    // SAFETY: setns takes a descriptor we hold open and a flag; entering
    // the time namespace changes only this process's clocks (and vdso
    // data), which is the point.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWTIME) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What /proc/PID/timens_offsets takes: "CLOCKID SECONDS NANOSECONDS"
/// lines, the nanoseconds in [0, 1e9).
pub fn offsets_text(monotonic_ns: i64, boottime_ns: i64) -> String {
    let line = |clock: i32, ns: i64| {
        format!(
            "{clock} {} {}\n",
            ns.div_euclid(1_000_000_000),
            ns.rem_euclid(1_000_000_000)
        )
    };
    line(libc::CLOCK_MONOTONIC, monotonic_ns) + &line(libc::CLOCK_BOOTTIME, boottime_ns)
}

/// Put this thread in a mount namespace of its own (unshare CLONE_FS and
/// CLONE_NEWNS), a copy of its old one with every mount made private, so
/// that nothing mounted in it reaches the old one.
pub fn private_mounts(ns: Option<&OwnedFd>) -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::CloneFlags;
    match ns {
        Some(ns) => {
            nix::sched::unshare(CloneFlags::CLONE_FS).map_err(io::Error::from)?;
            nix::sched::setns(ns, CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
        }
        None => nix::sched::unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS)
            .map_err(io::Error::from)?,
    }
    let flags = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).map_err(io::Error::from)
}

/// A POSIX message queue as its IPC namespace's mqueue filesystem shows
/// it: its name, mode, owner and the file's text (QSIZE, NOTIFY_PID, ...).
pub struct MqFile {
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub info: String,
}

/// The POSIX message queues of this thread's IPC namespace: the thread
/// takes a mount namespace of its own (unshare, every mount made private
/// so nothing reaches cryo's) and mounts the namespace's mqueue
/// filesystem on a fresh directory, removed after. Call it on a thread
/// that ends soon (its mount namespace goes with it).
pub fn mqueue_files() -> io::Result<Vec<MqFile>> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    private_mounts(None)?;
    let dir = std::env::temp_dir().join(format!(
        "cryo-mqueue-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir(&dir)?;
    let listed = mount(
        Some("mqueue"),
        &dir,
        Some("mqueue"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
    .and_then(|_| {
        let files = std::fs::read_dir(&dir).and_then(|entries| {
            entries
                .map(|e| {
                    use std::os::unix::fs::MetadataExt;
                    let e = e?;
                    let md = e.metadata()?;
                    Ok(MqFile {
                        name: e.file_name().to_string_lossy().into_owned(),
                        mode: md.mode() & 0o7777,
                        uid: md.uid(),
                        gid: md.gid(),
                        info: std::fs::read_to_string(e.path())?,
                    })
                })
                .collect::<io::Result<Vec<MqFile>>>()
        });
        let _ = umount2(&dir, MntFlags::MNT_DETACH);
        files
    });
    let _ = std::fs::remove_dir(&dir);
    listed
}

/// Make `cmd` run in the network namespace open at `ns` (the child enters
/// it between fork and exec). `ns` must stay open until the command is
/// spawned.
pub fn command_in_net(cmd: &mut std::process::Command, ns: &OwnedFd) {
    use std::os::unix::process::CommandExt;
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and makes
    // one system call (setns), which is async-signal-safe; it touches no
    // lock or allocation. `fd` is open in the child: the fork copied the
    // table while the caller held `ns` open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process of cryo's that makes namespaces for it: each
/// [`NsHelper::unshare`] has it unshare some (a user namespace first,
/// then, inside it, the namespaces it is to own), and cryo opens them
/// through /proc/PID/ns. It ends when dropped.
pub struct NsHelper {
    pub pid: i32,
    to: Option<OwnedFd>,
    from: OwnedFd,
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

impl NsHelper {
    /// Fork the helper; cryo must be single-threaded (as for
    /// [`super::proc::fork_with_pid`]).
    pub fn start() -> io::Result<NsHelper> {
        let (c_r, c_w) = pipe_pair()?;
        let (s_r, s_w) = pipe_pair()?;
        if !super::proc::wait_single_threaded() {
            return Err(io::Error::other("cryo is not single-threaded"));
        }
        // SAFETY: this process is single-threaded (checked just above; only
        // this thread could make another), so the child is a whole copy.
        // The child only makes system calls on descriptors it owns
        // (read, write, unshare, prctl) and ends with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let (r, w) = (c_r.as_raw_fd(), s_w.as_raw_fd());
            // SAFETY: plain system calls on this process's own pipes and
            // flags (cryo's ends closed first, so that cryo closing its own
            // ends is seen); the loop ends the process with _exit.
            unsafe {
                libc::close(c_w.as_raw_fd());
                libc::close(s_r.as_raw_fd());
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                loop {
                    let mut cmd = [0u8; 4];
                    if libc::read(r, cmd.as_mut_ptr().cast(), 4) != 4 {
                        libc::_exit(0);
                    }
                    let flags = i32::from_ne_bytes(cmd);
                    let rc = if libc::unshare(flags) == 0 {
                        0
                    } else {
                        *libc::__errno_location()
                    };
                    let out = rc.to_ne_bytes();
                    if libc::write(w, out.as_ptr().cast(), 4) != 4 {
                        libc::_exit(1);
                    }
                }
            }
        }
        drop((c_r, s_w));
        let mut h = NsHelper {
            pid,
            to: Some(c_w),
            from: s_r,
        };
        h.unshare(libc::CLONE_NEWUSER)?;
        Ok(h)
    }

    /// Have the helper unshare the namespaces of `flags`.
    pub fn unshare(&mut self, flags: libc::c_int) -> io::Result<()> {
        use std::io::{Read, Write};
        let to = self
            .to
            .as_ref()
            .ok_or_else(|| io::Error::other("the helper ended"))?;
        let mut to = std::fs::File::from(to.try_clone()?);
        to.write_all(&flags.to_ne_bytes())?;
        let mut back = [0u8; 4];
        std::fs::File::from(self.from.try_clone()?).read_exact(&mut back)?;
        match i32::from_ne_bytes(back) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// The helper's namespace `name` (`user`, `mnt`, `pid_for_children`...).
    pub fn open(&self, name: &str) -> io::Result<OwnedFd> {
        std::fs::File::open(format!("/proc/{}/ns/{name}", self.pid)).map(OwnedFd::from)
    }

    /// Write `text` to the helper's /proc file `name` (uid_map, gid_map,
    /// setgroups).
    pub fn write_proc(&self, name: &str, text: &str) -> io::Result<()> {
        std::fs::write(format!("/proc/{}/{name}", self.pid), text)
    }
}

impl Drop for NsHelper {
    fn drop(&mut self) {
        // Its command pipe closed, the helper ends.
        drop(self.to.take());
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None);
    }
}

/// Set this thread's UTS namespace's host and domain names.
pub fn set_uts_names(host: &str, domain: &str) -> io::Result<()> {
    // SAFETY: each call reads exactly `len` bytes of a live &str.
    let r = unsafe {
        libc::sethostname(host.as_ptr().cast(), host.len())
            | libc::setdomainname(domain.as_ptr().cast(), domain.len())
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `f` run by this thread with effective uid `uid` (its own, not the
/// process's: the raw system call, which glibc would make every thread's),
/// then back to its own. Its capabilities come back with uid 0.
pub fn as_euid<T>(uid: u32, f: impl FnOnce() -> T) -> io::Result<T> {
    // SAFETY: geteuid takes nothing and cannot fail.
    let was = unsafe { libc::geteuid() };
    // SAFETY: the raw setresuid with -1 keeps the real and saved ids; it
    // changes this thread's credentials only (not the process's, as
    // glibc's wrapper would).
    if unsafe { libc::syscall(libc::SYS_setresuid, -1i32, uid, -1i32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: as above; going back is allowed, the saved id being `was`'s.
    if unsafe { libc::syscall(libc::SYS_setresuid, -1i32, was, -1i32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(out)
}
