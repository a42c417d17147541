//! Network devices of a namespace through rtnetlink: read at the dump
//! (the loopback and veth devices; any other kind, or a device
//! enslaved to another, is refused by name), made again at the restore
//! with their index, name, hardware address and MTU, then their flags
//! set once their addresses are on.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use cryo_image::proto::{NetLink, VethPeer};

use crate::sys::netlink::{attr, attrs, str_of, u32_of, Builder, Netlink};
use crate::sys::netlink::{NLM_F_CREATE, NLM_F_EXCL};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_TXQLEN: u16 = 13;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;

/// The flags the restore sets again (the others are the kernel's).
pub const SETTABLE: u32 = (libc::IFF_UP
    | libc::IFF_NOARP
    | libc::IFF_PROMISC
    | libc::IFF_ALLMULTI
    | libc::IFF_DEBUG
    | libc::IFF_MULTICAST) as u32;

/// A device as RTM_GETLINK gave it.
pub struct Link {
    pub entry: NetLink,
    /// A veth: its peer's index, and the id its namespace has in this one
    /// (None: this one).
    pub peer: Option<(i32, Option<i32>)>,
    pub master: Option<u32>,
    pub loopback: bool,
}

fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

fn parse(body: &[u8]) -> Option<Link> {
    let index = i32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
    let flags = u32::from_ne_bytes(body.get(8..12)?.try_into().ok()?);
    let a = attrs(body.get(16..)?);
    let info = attr(&a, IFLA_LINKINFO).map(attrs).unwrap_or_default();
    let kind = attr(&info, IFLA_INFO_KIND).map(str_of).unwrap_or_default();
    let peer = (kind == "veth").then(|| {
        let index = attr(&a, IFLA_LINK).and_then(u32_of).unwrap_or(0) as i32;
        let nsid = attr(&a, IFLA_LINK_NETNSID)
            .and_then(u32_of)
            .map(|v| v as i32);
        (index, nsid)
    });
    Some(Link {
        entry: NetLink {
            index,
            name: attr(&a, IFLA_IFNAME).map(str_of).unwrap_or_default(),
            kind,
            flags,
            mtu: attr(&a, IFLA_MTU).and_then(u32_of).unwrap_or(0),
            mac: attr(&a, IFLA_ADDRESS)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
            txqlen: attr(&a, IFLA_TXQLEN).and_then(u32_of).unwrap_or(0),
            alias: attr(&a, IFLA_IFALIAS).map(str_of).unwrap_or_default(),
            peer: None,
        },
        peer,
        master: attr(&a, IFLA_MASTER).and_then(u32_of),
        loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
    })
}

/// Every device of the namespace of `nl`.
pub fn list(nl: &mut Netlink) -> std::io::Result<Vec<Link>> {
    let msgs = nl.dump(RTM_GETLINK, &ifinfomsg(0, 0, 0))?;
    Ok(msgs
        .iter()
        .filter(|m| m.ty == RTM_NEWLINK)
        .filter_map(|m| parse(&m.body))
        .collect())
}

/// Device `index` of the namespace of `nl`.
pub fn get(nl: &mut Netlink, index: i32) -> std::io::Result<Link> {
    let m = nl.get(RTM_GETLINK, &ifinfomsg(index, 0, 0))?;
    parse(&m.body).ok_or_else(|| std::io::Error::other("a link message cut short"))
}

/// The id the namespace open at `other` has in the namespace of `nl`
/// (None: it has none).
pub fn nsid_of(nl: &mut Netlink, other: &OwnedFd) -> std::io::Result<Option<i32>> {
    let mut b = Builder::new(&[0u8; 4]);
    b.u32(NETNSA_FD, other.as_raw_fd() as u32);
    let m = nl.get(RTM_GETNSID, &b.buf)?;
    if m.ty != RTM_NEWNSID {
        return Ok(None);
    }
    let a = attrs(m.body.get(4..).unwrap_or_default());
    let id = attr(&a, NETNSA_NSID).and_then(u32_of).map(|v| v as i32);
    Ok(id.filter(|&v| v >= 0))
}

/// The devices of a namespace (its loopback apart), checked: only veth
/// devices, not enslaved; a veth's peer in this namespace or
/// one of `others` (its inode and an open descriptor: cryo's own is 0).
pub fn dump(
    nl: &mut Netlink,
    this: u64,
    others: &[(u64, OwnedFd)],
) -> Result<(Option<NetLink>, Vec<NetLink>), String> {
    let all = list(nl).map_err(|e| format!("listing its devices: {e}"))?;
    let names: HashMap<u32, String> = all
        .iter()
        .map(|l| (l.entry.index as u32, l.entry.name.clone()))
        .collect();
    let mut ids: Option<Vec<(i32, u64)>> = None;
    let mut lo = None;
    let mut out = Vec::new();
    for l in all {
        let name = l.entry.name.clone();
        if l.loopback {
            lo = Some(l.entry);
            continue;
        }
        if l.entry.kind != "veth" {
            let kind = if l.entry.kind.is_empty() {
                "a kind the kernel does not name"
            } else {
                &l.entry.kind
            };
            return Err(format!(
                "device {name} is of kind {kind}: only veth devices (and the loopback) are kept yet"
            ));
        }
        if let Some(m) = l.master {
            let master = names.get(&m).cloned().unwrap_or_else(|| m.to_string());
            return Err(format!(
                "device {name} is a port of {master}: bridges and bonds are not kept yet"
            ));
        }
        let mut entry = l.entry;
        if let Some((index, nsid)) = l.peer {
            let ns = match nsid {
                None => this,
                Some(id) => {
                    if ids.is_none() {
                        let mut v = Vec::new();
                        for (inode, fd) in others {
                            let got = nsid_of(nl, fd)
                                .map_err(|e| format!("the ids of other namespaces in it: {e}"))?;
                            v.extend(got.map(|g| (g, *inode)));
                        }
                        ids = Some(v);
                    }
                    let found = ids.iter().flatten().find(|(g, _)| *g == id);
                    found.map(|(_, inode)| *inode).ok_or_else(|| {
                        format!(
                            "veth device {name}: its peer is in a network namespace that is neither cryo's nor one of the tree's"
                        )
                    })?
                }
            };
            let other = if ns == this {
                get(nl, index)
            } else {
                let fd = others.iter().find(|(i, _)| *i == ns).map(|(_, fd)| fd);
                let fd = fd.ok_or_else(|| {
                    format!("veth device {name}: its peer's namespace {ns} is not open")
                })?;
                Netlink::open_in(fd, nix::sys::socket::SockProtocol::NetlinkRoute)
                    .and_then(|mut theirs| get(&mut theirs, index))
            };
            let other = other.map_err(|e| format!("veth device {name}: its peer: {e}"))?;
            entry.peer = Some(VethPeer {
                ns,
                index,
                name: other.entry.name,
                flags: other.entry.flags,
                mtu: other.entry.mtu,
                mac: other.entry.mac,
                addrs: Vec::new(),
            });
        }
        out.push(entry);
    }
    Ok((lo, out))
}

/// What a restore made outside its own namespaces: the host ends of veth
/// pairs, by name, removed again if the restore fails.
#[derive(Default)]
pub struct HostEnds {
    names: Vec<String>,
}

impl HostEnds {
    /// Delete every host end made (the container end goes with it).
    pub fn remove(&mut self) {
        let Ok(mut nl) = Netlink::route() else { return };
        for name in self.names.drain(..) {
            let mut b = Builder::new(&ifinfomsg(0, 0, 0));
            b.str(IFLA_IFNAME, &name);
            if let Err(e) = nl.request(RTM_DELLINK, 0, &b.buf) {
                tracing::warn!("removing veth end {name} the failed restore made: {e}");
            }
        }
    }
}

/// Where the ends of the image's devices go: the namespaces made (by
/// inode), cryo's own, and the host names given with --veth-pair.
pub struct Places<'a> {
    pub made: &'a HashMap<u64, OwnedFd>,
    pub own: &'a OwnedFd,
    pub veth_pairs: &'a HashMap<String, String>,
}

/// Make the devices `links` of the namespace `this` (reached by `nl`); a
/// veth whose peer is in another of the tree's namespaces is made by the
/// end with the lower (namespace, index).
pub fn make(
    nl: &mut Netlink,
    this: u64,
    links: &[NetLink],
    at: &Places,
    host: &mut HostEnds,
) -> Result<(), String> {
    for l in links {
        let mut b = Builder::new(&ifinfomsg(l.index, 0, 0));
        identity(&mut b, &l.name, l.mtu, &l.mac);
        if l.txqlen != 0 {
            b.u32(IFLA_TXQLEN, l.txqlen);
        }
        if !l.alias.is_empty() {
            b.str(IFLA_IFALIAS, &l.alias);
        }
        b.begin(IFLA_LINKINFO).str(IFLA_INFO_KIND, &l.kind);
        let mut host_end = None;
        if let Some(p) = &l.peer {
            if p.ns != 0 && (p.ns, p.index) < (this, l.index) {
                // Made with the other end.
                continue;
            }
            let (index, name) = if p.ns == 0 {
                let (name, _) = host_name(at.veth_pairs, &l.name, &p.name);
                host_end = Some(name.clone());
                (0, name)
            } else {
                (p.index, p.name.clone())
            };
            b.begin(IFLA_INFO_DATA).begin(VETH_INFO_PEER);
            b.raw(&ifinfomsg(index, 0, 0));
            identity(&mut b, &name, p.mtu, &p.mac);
            let ns = if p.ns == 0 {
                Some(at.own)
            } else if p.ns != this {
                Some(at.made.get(&p.ns).ok_or_else(|| {
                    format!(
                        "veth device {}: its peer's namespace {} is not in the image",
                        l.name, p.ns
                    )
                })?)
            } else {
                None
            };
            if let Some(ns) = ns {
                b.u32(IFLA_NET_NS_FD, ns.as_raw_fd() as u32);
            }
            b.end().end();
        }
        b.end();
        // A host end of the same name may be one of the dumped tree's,
        // going with the namespace of its other end (the kernel removes a
        // namespace's devices shortly after its last task and descriptor).
        let mut made = nl.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &b.buf);
        let start = std::time::Instant::now();
        while host_end.is_some()
            && matches!(&made, Err(e) if e.raw_os_error() == Some(libc::EEXIST))
            && start.elapsed() < std::time::Duration::from_secs(3)
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
            made = nl.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &b.buf);
        }
        made.map_err(|e| match (&host_end, e.raw_os_error()) {
                (Some(h), Some(libc::EEXIST)) => format!(
                    "making veth device {} ({}): its host end {h} or the index {} is taken (name the host end anew with --veth-pair {}=NAME)",
                    l.name, e, l.index, l.name
                ),
                _ => format!("making {} device {} (index {}): {e}", l.kind, l.name, l.index),
            })?;
        host.names.extend(host_end);
    }
    Ok(())
}

/// A new device's name, MTU and hardware address (the last two where
/// known: a sample device takes the kernel's).
fn identity(b: &mut Builder, name: &str, mtu: u32, mac: &[u8]) {
    b.str(IFLA_IFNAME, name);
    if mtu != 0 {
        b.u32(IFLA_MTU, mtu);
    }
    if !mac.is_empty() {
        b.attr(IFLA_ADDRESS, mac);
    }
}

/// The name the host end of veth device `dev` takes, and the bridge it
/// joins: from --veth-pair `dev`=NAME[@BRIDGE] in `pairs`, else `dumped`.
pub fn host_name(
    pairs: &HashMap<String, String>,
    dev: &str,
    dumped: &str,
) -> (String, Option<String>) {
    match pairs.get(dev).map(|v| v.split_once('@')) {
        Some(Some((name, bridge))) => (name.to_string(), Some(bridge.to_string())),
        Some(None) => (pairs[dev].clone(), None),
        None => (dumped.to_string(), None),
    }
}

/// Make device `index` (by `nl`) a port of device `master`.
pub fn set_master(nl: &mut Netlink, index: i32, master: i32) -> std::io::Result<()> {
    let mut b = Builder::new(&ifinfomsg(index, 0, 0));
    b.u32(IFLA_MASTER, master as u32);
    nl.request(RTM_NEWLINK, 0, &b.buf)
}

/// Set the MTU and the settable flags of device `index` (by `nl`).
pub fn set_state(nl: &mut Netlink, index: i32, flags: u32, mtu: u32) -> std::io::Result<()> {
    let mut b = Builder::new(&ifinfomsg(index, flags & SETTABLE, SETTABLE));
    if mtu != 0 {
        b.u32(IFLA_MTU, mtu);
    }
    nl.request(RTM_NEWLINK, 0, &b.buf)
}

/// The index of device `name` in the namespace of `nl`.
pub fn index_of(nl: &mut Netlink, name: &str) -> std::io::Result<i32> {
    let mut b = Builder::new(&ifinfomsg(0, 0, 0));
    b.str(IFLA_IFNAME, name);
    let m = nl.get(RTM_GETLINK, &b.buf)?;
    parse(&m.body)
        .map(|l| l.entry.index)
        .ok_or_else(|| std::io::Error::other("a link message cut short"))
}

/// In a new namespace (by `nl`), a veth pair as the kernel makes it, to
/// read its sysctls.
pub fn make_sample(nl: &mut Netlink, veth: &str) -> Result<(), String> {
    let v = NetLink {
        name: veth.into(),
        kind: "veth".into(),
        peer: Some(VethPeer {
            name: format!("{veth}p"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let own = std::fs::File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|e| e.to_string())?;
    let at = Places {
        made: &HashMap::new(),
        own: &own,
        veth_pairs: &HashMap::new(),
    };
    make(nl, 0, &[v], &at, &mut HostEnds::default())
}
