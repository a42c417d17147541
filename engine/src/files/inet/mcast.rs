//! Multicast groups a UDP or raw socket joined, dump and restore side by
//! side. The kernel lists a socket's groups nowhere, but it answers
//! MCAST_MSFILTER for one group on one device: the candidates are the
//! groups some socket joined on each device of the namespace
//! (/proc/PID/net/igmp and igmp6), each asked of the socket, which
//! answers with its filter (mode and sources) or EADDRNOTAVAIL. The
//! restore joins each again (MCAST_JOIN_GROUP on the device of that name
//! in the socket's namespace) and sets its filter (MCAST_MSFILTER).

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use cryo_image::proto::Membership;

use crate::sys::inet;

const MCAST_JOIN_GROUP: i32 = 42;
const MCAST_MSFILTER: i32 = 48;
const MCAST_EXCLUDE: u32 = 0;
const MCAST_INCLUDE: u32 = 1;
/// struct group_filter: interface (u32, padded to 8), the group (a
/// sockaddr_storage), mode, count of sources, then the sources.
const FILTER_HEAD: usize = 144;
/// The sources asked for at most per group.
const MAX_SOURCES: usize = 64;

/// The groups joined on the devices of task `pid`'s network namespace:
/// (device index, device name, group address bytes), IPv4 ones for
/// `v6` false.
fn candidates(pid: i32, v6: bool) -> Result<Vec<(u32, String, Vec<u8>)>, String> {
    let path = format!("/proc/{pid}/net/{}", if v6 { "igmp6" } else { "igmp" });
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{path}: {e}")),
    };
    let mut out = Vec::new();
    if v6 {
        // "IDX DEVICE GROUP(32 hex digits) USERS FLAGS TIMER"
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(idx), Some(dev), Some(hex)) = (f.first(), f.get(1), f.get(2)) else {
                continue;
            };
            let (Ok(idx), Some(group)) = (idx.parse::<u32>(), hex_bytes(hex)) else {
                continue;
            };
            if group.len() == 16 {
                out.push((idx, dev.to_string(), group));
            }
        }
        return Ok(out);
    }
    // "IDX\tDEVICE    : COUNT QUERIER" then one "\t\t\t\tGROUP USERS ..."
    // line per group, the group as the hex of its address's bytes read
    // as a native word.
    let mut dev: Option<(u32, String)> = None;
    for l in text.lines().skip(1) {
        if !l.starts_with('\t') {
            let mut f = l.split_whitespace();
            dev = match (f.next().and_then(|i| i.parse().ok()), f.next()) {
                (Some(i), Some(name)) => Some((i, name.trim_end_matches(':').to_string())),
                _ => None,
            };
            continue;
        }
        let (Some((idx, name)), Some(hex)) = (&dev, l.split_whitespace().next()) else {
            continue;
        };
        if let Ok(word) = u32::from_str_radix(hex, 16) {
            out.push((*idx, name.clone(), word.to_ne_bytes().to_vec()));
        }
    }
    Ok(out)
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The level of the multicast options of a socket of `family`.
fn level(family: i32) -> i32 {
    if family == libc::AF_INET6 {
        libc::IPPROTO_IPV6
    } else {
        libc::IPPROTO_IP
    }
}

/// A struct group_filter for `group` on device `ifindex`, with room for
/// `room` sources, mode `mode` and `sources`.
fn filter(
    ifindex: u32,
    group: &[u8],
    mode: u32,
    sources: &[Vec<u8>],
    room: usize,
) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; FILTER_HEAD + 128 * room.max(sources.len())];
    b[..4].copy_from_slice(&ifindex.to_ne_bytes());
    b[8..136].copy_from_slice(&inet::sockaddr_bytes(group, 0).map_err(|e| e.to_string())?);
    b[136..140].copy_from_slice(&mode.to_ne_bytes());
    let count = if sources.is_empty() {
        room
    } else {
        sources.len()
    };
    b[140..144].copy_from_slice(&(count as u32).to_ne_bytes());
    for (i, s) in sources.iter().enumerate() {
        let at = FILTER_HEAD + 128 * i;
        b[at..at + 128].copy_from_slice(&inet::sockaddr_bytes(s, 0).map_err(|e| e.to_string())?);
    }
    Ok(b)
}

/// Dump side: the groups socket `s` (of `family`, its task `pid`) joined.
pub fn dump(pid: i32, s: &impl AsFd, family: i32) -> Result<Vec<Membership>, String> {
    let mut out = Vec::new();
    for (idx, ifname, group) in candidates(pid, family == libc::AF_INET6)? {
        let ask = filter(idx, &group, MCAST_EXCLUDE, &[], MAX_SOURCES)?;
        let got = match inet::getsockopt_in(s, level(family), MCAST_MSFILTER, ask) {
            Ok(g) => g,
            // Not a member of this one.
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => continue,
            Err(e) => {
                return Err(format!(
                    "MCAST_MSFILTER of group {}: {e}",
                    crate::ns::net::addrs::ip_text(&group)
                ))
            }
        };
        let word = |at: usize| {
            got.get(at..at + 4)
                .map_or(0, |w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
        };
        let (mode, count) = (word(136), word(140) as usize);
        if count > MAX_SOURCES {
            return Err(format!(
                "group {} with a filter of {count} sources (at most {MAX_SOURCES} are kept)",
                crate::ns::net::addrs::ip_text(&group)
            ));
        }
        let sources = (0..count)
            .filter_map(|i| got.get(FILTER_HEAD + 128 * i..FILTER_HEAD + 128 * (i + 1)))
            .map(inet::sockaddr_addr)
            .collect();
        out.push(Membership {
            ifname,
            group,
            include: mode == MCAST_INCLUDE,
            sources,
        });
    }
    Ok(out)
}

/// Restore side: socket `s` (of `family`, in its holder's network
/// namespace) joins its groups again with their filters.
pub fn restore(s: &OwnedFd, family: i32, groups: &[Membership]) -> Result<(), String> {
    for m in groups {
        let at = crate::ns::net::addrs::ip_text(&m.group);
        let idx = nix::net::if_::if_nametoindex(m.ifname.as_str())
            .map_err(|e| format!("multicast group {at}: device {}: {e}", m.ifname))?;
        // struct group_req: interface (u32, padded to 8), then the group.
        let mut req = vec![0u8; 136];
        req[..4].copy_from_slice(&idx.to_ne_bytes());
        req[8..].copy_from_slice(&inet::sockaddr_bytes(&m.group, 0).map_err(|e| e.to_string())?);
        inet::setsockopt(s, level(family), MCAST_JOIN_GROUP, &req)
            .map_err(|e| format!("joining multicast group {at} on {}: {e}", m.ifname))?;
        if m.include || !m.sources.is_empty() {
            let mode = if m.include {
                MCAST_INCLUDE
            } else {
                MCAST_EXCLUDE
            };
            let f = filter(idx, &m.group, mode, &m.sources, 0)?;
            inet::setsockopt(s, level(family), MCAST_MSFILTER, &f)
                .map_err(|e| format!("the source filter of multicast group {at}: {e}"))?;
        }
    }
    Ok(())
}
