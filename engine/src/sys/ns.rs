//! Namespace system calls: the owner of a namespace (NS_GET_USERNS), a
//! UTS namespace's names read from inside it, and a new UTS namespace
//! with given names.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// The inode of the user namespace owning the namespace open at `ns`.
pub fn owner_inode(ns: &impl AsFd) -> io::Result<u64> {
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new
    // descriptor, which we own at once.
    let fd = unsafe { libc::ioctl(ns.as_fd().as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nothing else.
    let owner = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::File::from(owner).metadata()?.ino())
}

fn field(b: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The host and domain names of the UTS namespace open at `ns`, read by
/// a thread of ours that enters it (a thread's UTS namespace is its own;
/// the thread ends right after).
pub fn uts_names(ns: OwnedFd) -> io::Result<(String, String)> {
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUTS)
                .map_err(io::Error::from)?;
            // SAFETY: zeroed is a valid utsname; uname fills it.
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: uname writes into the local struct.
            if unsafe { libc::uname(&mut u) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((field(&u.nodename), field(&u.domainname)))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread reading the names panicked")))
    })
}

/// Put this process in a new UTS namespace named `host` and `domain`.
pub fn new_uts(host: &str, domain: &str) -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS).map_err(io::Error::from)?;
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
