//! Network namespaces with no device but their loopback.
//!
//! Dump: a thread of cryo's enters the namespace and lists its devices
//! (any but `lo` is refused by name, as is an address on `lo` other than
//! 127.0.0.1 and ::1), reads the loopback's flags and MTU, and every
//! writable sysctl under /proc/sys/net, of which it keeps those whose
//! value differs from a new namespace's (read by a second thread in one of
//! its own). Restore: cryo makes the namespace before any task, in a
//! thread that unshares it, sets the loopback and the sysctls, and holds
//! it; the tree's sockets are made inside it and its first task enters it
//! (setns).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{NetState, Sysctl};

/// The loopback flags the restore sets again (the rest the kernel keeps).
const LO_FLAGS: u32 =
    (libc::IFF_UP | libc::IFF_NOARP | libc::IFF_PROMISC | libc::IFF_ALLMULTI | libc::IFF_DEBUG)
        as u32;

fn other(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// The namespace open at `ns`.
pub fn dump(ns: OwnedFd) -> Result<NetState, String> {
    let mut st = crate::sys::ns::in_namespace(ns, nix::sched::CloneFlags::CLONE_NEWNET, read_state)
        .map_err(|e| format!("reading it: {e}"))?;
    let fresh = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok::<_, nix::errno::Errno>(sysctls())
        })
        .join()
    })
    .map_err(|_| "the thread reading a new namespace's sysctls panicked".to_string())?
    .map_err(|e| format!("a new namespace to compare its sysctls with: {e}"))?;
    st.sysctls
        .retain(|s| fresh.iter().any(|f| f.name == s.name && f.value != s.value));
    Ok(st)
}

fn read_state() -> std::io::Result<NetState> {
    let names = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
    for i in names.iter() {
        let name = i.name().to_string_lossy();
        if name != "lo" {
            return Err(other(format!(
                "it has network device {name}: devices other than its loopback are not kept yet"
            )));
        }
    }
    for a in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(addr) = a.address else { continue };
        let plain = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
            (Some(v4), _) => v4.ip() == std::net::Ipv4Addr::LOCALHOST,
            (_, Some(v6)) => v6.ip() == std::net::Ipv6Addr::LOCALHOST,
            _ => true,
        };
        if !plain {
            return Err(other(format!(
                "address {addr} on {}: addresses are not kept yet",
                a.interface_name
            )));
        }
    }
    let (lo_flags, lo_mtu) = crate::sys::net::device("lo")?;
    Ok(NetState {
        lo_flags,
        lo_mtu,
        sysctls: sysctls(),
    })
}

/// Every writable sysctl under /proc/sys/net of this thread's namespace
/// that reads, the namespace-wide ones (conf/all, conf/default) before
/// the per-device ones.
fn sysctls() -> Vec<Sysctl> {
    let mut out = Vec::new();
    walk(std::path::Path::new("/proc/sys/net"), &mut out);
    out.sort_by_key(|s| !(s.name.contains("/all/") || s.name.contains("/default/")));
    out
}

fn walk(dir: &std::path::Path, out: &mut Vec<Sysctl>) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            walk(&path, out);
        } else if md.permissions().mode() & 0o200 != 0 {
            if let Ok(v) = std::fs::read_to_string(&path) {
                let name = path.strip_prefix("/proc/sys").unwrap_or(&path);
                out.push(Sysctl {
                    name: name.display().to_string(),
                    value: v.trim_end().to_string(),
                });
            }
        }
    }
}

/// In cryo, before any task: a new namespace with the loopback and the
/// sysctls of `st`, held open.
pub fn make(st: &NetState) -> Result<OwnedFd, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare(CLONE_NEWNET): {}", std::io::Error::from(e)))?;
            let ns = std::fs::File::open("/proc/thread-self/ns/net")
                .map(OwnedFd::from)
                .map_err(|e| format!("opening the namespace it made: {e}"))?;
            crate::sys::net::set_device("lo", st.lo_flags, LO_FLAGS, st.lo_mtu).map_err(|e| {
                format!(
                    "its loopback (flags {:#x}, MTU {}): {e}",
                    st.lo_flags, st.lo_mtu
                )
            })?;
            for s in &st.sysctls {
                let bad = s.name.split('/').any(|c| c == "..") || !s.name.starts_with("net/");
                if bad {
                    return Err(format!(
                        "{:?} is not a sysctl of a network namespace",
                        s.name
                    ));
                }
                std::fs::write(format!("/proc/sys/{}", s.name), &s.value)
                    .map_err(|e| format!("setting {} to {:?}: {e}", s.name, s.value))?;
            }
            Ok(ns)
        })
        .join()
        .unwrap_or_else(|_| Err("the thread making it panicked".into()))
    })
}

/// In cryo, before any task: every network namespace of the image made,
/// by its inode at the dump.
pub fn make_all(
    entries: &[cryo_image::proto::NamespaceEntry],
) -> Result<std::collections::HashMap<u64, OwnedFd>, String> {
    super::make_each(entries, super::NsKind::Net, |_, e| {
        make(e.net.as_ref().ok_or("namespaces.img has no state for it")?)
    })
}
