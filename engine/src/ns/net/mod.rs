//! Network namespaces: their devices (the loopback, veth pairs whose
//! other end is in another of the tree's namespaces or in cryo's own),
//! addresses, routes, nftables ruleset and sysctls.
//!
//! Dump: rtnetlink sockets opened inside the namespace list its devices
//! ([`links`]), addresses and routes ([`addrs`]); nfnetlink says whether
//! it has nftables tables, saved with `nft -j` ([`nft`]); a thread of
//! cryo's inside it reads every writable sysctl under /proc/sys/net, of
//! which those whose value differs from a new namespace's (read by a
//! second thread in one of its own, with a veth device for the
//! per-device ones) are kept. Restore: cryo makes each namespace before
//! any task, in a thread that unshares it and holds it; then the devices
//! of all of them (a veth pair once, its host end in cryo's own
//! namespace), then in each the sysctls, addresses, device flags, routes
//! and ruleset. The tree's sockets are made inside it and its first task
//! enters it (setns).

#![forbid(unsafe_code)]

pub mod addrs;
pub mod links;
pub mod nft;

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use cryo_image::proto::{NamespaceEntry, NetState, Sysctl};
use nix::sys::socket::SockProtocol;

use crate::sys::netlink::Netlink;

/// The device the new namespace comparing sysctls has.
const SAMPLE_VETH: &str = "cryo-sample0";

fn net_flag() -> nix::sched::CloneFlags {
    nix::sched::CloneFlags::CLONE_NEWNET
}

/// The namespace open at `ns`, whose inode is `this`; `others`: cryo's
/// own (inode 0) and the tree's other network namespaces, open, where the
/// other ends of its veth devices may be.
pub fn dump(ns: OwnedFd, this: u64, others: &[(u64, OwnedFd)]) -> Result<NetState, String> {
    let mut nl = Netlink::open_in(&ns, SockProtocol::NetlinkRoute)
        .map_err(|e| format!("a netlink socket in it: {e}"))?;
    let (lo, mut links) = links::dump(&mut nl, this, others)?;
    let lo = lo.ok_or("it has no loopback device")?;
    let addrs = addrs::list(&mut nl).map_err(|e| format!("listing its addresses: {e}"))?;
    if links
        .iter()
        .any(|l| l.peer.as_ref().is_some_and(|p| p.ns == 0))
    {
        let own = others.iter().find(|(i, _)| *i == 0).map(|(_, fd)| fd);
        let own = own.ok_or("cryo's own network namespace is not open")?;
        let mut host = Netlink::open_in(own, SockProtocol::NetlinkRoute)
            .and_then(|mut h| addrs::list(&mut h))
            .map_err(|e| format!("the addresses of cryo's own namespace: {e}"))?;
        for p in links.iter_mut().filter_map(|l| l.peer.as_mut()) {
            if p.ns == 0 {
                p.addrs = host.extract_if(.., |a| a.index == p.index).collect();
            }
        }
    }
    let routes = addrs::routes(&mut nl)?;
    let nft_ruleset = nft::dump(&ns)?;
    let devices: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
    let theirs = crate::sys::ns::in_namespace(ns, net_flag(), || Ok(sysctls()))
        .map_err(|e| format!("reading its sysctls: {e}"))?;
    let fresh = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(net_flag()).map_err(|e| e.to_string())?;
            if !devices.is_empty() {
                let mut nl = Netlink::route().map_err(|e| e.to_string())?;
                links::make_sample(&mut nl, SAMPLE_VETH)?;
            }
            Ok::<_, String>(sysctls())
        })
        .join()
    })
    .map_err(|_| "the thread reading a new namespace's sysctls panicked".to_string())?
    .map_err(|e| format!("a new namespace to compare its sysctls with: {e}"))?;
    let fresh: HashMap<&str, &str> = fresh
        .iter()
        .map(|f| (f.name.as_str(), f.value.as_str()))
        .collect();
    let sysctls = theirs
        .into_iter()
        .filter(|s| {
            let generic = sample_name(&s.name, &devices);
            fresh.get(generic.as_str()).is_some_and(|f| *f != s.value)
        })
        .collect();
    Ok(NetState {
        lo_flags: lo.flags,
        lo_mtu: lo.mtu,
        sysctls,
        links,
        addrs,
        routes,
        nft_ruleset,
    })
}

/// Sysctl `name` with the device it is of (net/ipv4/conf/DEV/...,
/// net/ipv6/neigh/DEV/...), if one of `devices`, replaced by the sample
/// device of the new namespace.
fn sample_name(name: &str, devices: &[String]) -> String {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["net", family, table @ ("conf" | "neigh"), dev, rest @ ..]
            if devices.iter().any(|d| d == dev) =>
        {
            let mut v = vec!["net", family, table, SAMPLE_VETH];
            v.extend_from_slice(rest);
            v.join("/")
        }
        _ => name.to_string(),
    }
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

/// A new network namespace of a thread of cryo's, held open, and a
/// netlink socket in it (`premade`: one a user namespace of the tree
/// owns, made already).
fn make_one(premade: Option<&OwnedFd>) -> Result<(OwnedFd, Netlink), String> {
    if let Some(ns) = premade {
        let nl = Netlink::open_in(ns, SockProtocol::NetlinkRoute)
            .map_err(|e| format!("a netlink socket in it: {e}"))?;
        return Ok((ns.try_clone().map_err(|e| e.to_string())?, nl));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(net_flag())
                .map_err(|e| format!("unshare(CLONE_NEWNET): {}", std::io::Error::from(e)))?;
            let ns = std::fs::File::open("/proc/thread-self/ns/net")
                .map(OwnedFd::from)
                .map_err(|e| format!("opening the namespace it made: {e}"))?;
            let nl = Netlink::route().map_err(|e| format!("a netlink socket in it: {e}"))?;
            Ok((ns, nl))
        })
        .join()
        .unwrap_or_else(|_| Err("the thread making it panicked".into()))
    })
}

/// Set the sysctls of `st` in the namespace open at `ns`.
fn set_sysctls(ns: &OwnedFd, st: &NetState) -> Result<(), String> {
    let ns = ns.try_clone().map_err(|e| e.to_string())?;
    crate::sys::ns::in_namespace(ns, net_flag(), || {
        for s in &st.sysctls {
            let bad = s.name.split('/').any(|c| c == "..") || !s.name.starts_with("net/");
            if bad {
                return Err(std::io::Error::other(format!(
                    "{:?} is not a sysctl of a network namespace",
                    s.name
                )));
            }
            std::fs::write(format!("/proc/sys/{}", s.name), &s.value).map_err(|e| {
                std::io::Error::other(format!("setting {} to {:?}: {e}", s.name, s.value))
            })?;
        }
        Ok(())
    })
    .map_err(|e| e.to_string())
}

/// The addresses, device flags and routes of `st`, by `nl`.
fn configure(nl: &mut Netlink, st: &NetState) -> Result<(), String> {
    let name = |index: i32| {
        st.links
            .iter()
            .find(|l| l.index == index)
            .map_or_else(|| format!("#{index}"), |l| l.name.clone())
    };
    for a in &st.addrs {
        addrs::add(nl, a, a.index)
            .map_err(|e| format!("address {} on {}: {e}", addrs::text(a), name(a.index)))?;
    }
    let lo = links::index_of(nl, "lo").map_err(|e| format!("its loopback: {e}"))?;
    links::set_state(nl, lo, st.lo_flags, st.lo_mtu).map_err(|e| {
        format!(
            "its loopback (flags {:#x}, MTU {}): {e}",
            st.lo_flags, st.lo_mtu
        )
    })?;
    for l in &st.links {
        links::set_state(nl, l.index, l.flags, 0)
            .map_err(|e| format!("the flags {:#x} of {}: {e}", l.flags, l.name))?;
    }
    for r in &st.routes {
        addrs::add_route(nl, r).map_err(|e| format!("route {}: {e}", addrs::route_text(r)))?;
    }
    Ok(())
}

/// The host ends of the veth devices of `st` (by `nl`, of cryo's own
/// namespace): their addresses and flags as at the dump, and the bridge
/// --veth-pair names.
fn host_ends(
    nl: &mut Netlink,
    st: &NetState,
    veth_pairs: &HashMap<String, String>,
) -> Result<(), String> {
    for l in &st.links {
        let Some(p) = l.peer.as_ref().filter(|p| p.ns == 0) else {
            continue;
        };
        let (name, bridge) = links::host_name(veth_pairs, &l.name, &p.name);
        let index = links::index_of(nl, &name).map_err(|e| format!("host end {name}: {e}"))?;
        if let Some(br) = bridge {
            links::index_of(nl, &br)
                .and_then(|b| links::set_master(nl, index, b))
                .map_err(|e| format!("putting host end {name} in bridge {br}: {e}"))?;
        }
        for a in &p.addrs {
            addrs::add(nl, a, index)
                .map_err(|e| format!("address {} on host end {name}: {e}", addrs::text(a)))?;
        }
        links::set_state(nl, index, p.flags, 0)
            .map_err(|e| format!("the flags {:#x} of host end {name}: {e}", p.flags))?;
    }
    Ok(())
}

/// The network namespaces a restore made, by their inode at the dump;
/// dropped before [`Made::keep`], it removes the host ends of veth pairs
/// it made (the namespaces go with their last descriptor and task).
pub struct Made {
    pub fds: HashMap<u64, OwnedFd>,
    host: links::HostEnds,
}

impl Made {
    /// The restore succeeded: what it made stays.
    pub fn keep(mut self) {
        self.host = links::HostEnds::default();
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        self.host.remove();
    }
}

/// In cryo, before any task: every network namespace of the image made,
/// by its inode at the dump, with its devices (`veth_pairs`: the names
/// the host ends of veth devices take, by the device's, in place of
/// theirs at the dump), addresses, routes, rules and sysctls.
pub fn make_all(
    entries: &[NamespaceEntry],
    veth_pairs: &HashMap<String, String>,
    owned: &HashMap<u64, OwnedFd>,
) -> Result<Made, String> {
    let nets: Vec<(&NamespaceEntry, &NetState)> = entries
        .iter()
        .filter(|e| e.kind == super::NsKind::Net.name())
        .map(|e| {
            let st = e.net.as_ref().ok_or_else(|| {
                format!(
                    "net namespace {}: namespaces.img has no state for it",
                    e.inode
                )
            })?;
            Ok((e, st))
        })
        .collect::<Result<_, String>>()?;
    let mut made = Made {
        fds: HashMap::new(),
        host: links::HostEnds::default(),
    };
    let mut sockets = Vec::new();
    for (e, _) in &nets {
        let (fd, nl) =
            make_one(owned.get(&e.inode)).map_err(|w| format!("net namespace {}: {w}", e.inode))?;
        made.fds.insert(e.inode, fd);
        sockets.push(nl);
    }
    let own = std::fs::File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|e| format!("opening cryo's own network namespace: {e}"))?;
    let at = links::Places {
        made: &made.fds,
        own: &own,
        veth_pairs,
    };
    let mut host = links::HostEnds::default();
    let mut built = Ok(());
    for ((e, st), nl) in nets.iter().zip(sockets.iter_mut()) {
        built = links::make(nl, e.inode, &st.links, &at, &mut host)
            .map_err(|w| format!("net namespace {}: {w}", e.inode));
        if built.is_err() {
            break;
        }
    }
    made.host = host;
    built?;
    let mut own_nl = Netlink::route().map_err(|e| format!("a netlink socket of cryo's: {e}"))?;
    for ((e, st), nl) in nets.iter().zip(sockets.iter_mut()) {
        let fd = &made.fds[&e.inode];
        set_sysctls(fd, st)
            .and_then(|()| configure(nl, st))
            .and_then(|()| host_ends(&mut own_nl, st, veth_pairs))
            .and_then(|()| match st.nft_ruleset.is_empty() {
                true => Ok(()),
                false => nft::load(fd, &st.nft_ruleset).map(|()| {
                    // A lock the dump made there goes: the tree's peers
                    // in it are the tree's.
                    crate::files::inet::remove_saved_locks(fd, &st.nft_ruleset)
                }),
            })
            .map_err(|w| format!("net namespace {}: {w}", e.inode))?;
    }
    Ok(made)
}
