//! Addresses and routes of a namespace through rtnetlink: every address
//! of its devices, and the routes but the kernel's own (those it makes
//! for an address or a device, and the local table); a multipath route,
//! one through a nexthop object or with an encapsulation is refused.
//! Made again after the devices: addresses before the devices go up
//! (IPv6 ones without duplicate detection, usable at once), routes after.

#![forbid(unsafe_code)]

use cryo_image::proto::{NetAddr, NetRoute};

use crate::sys::netlink::{attr, attrs, str_of, u32_of, Builder, Netlink};
use crate::sys::netlink::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_LABEL: u16 = 3;
const IFA_BROADCAST: u16 = 4;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const IFA_F_TENTATIVE: u32 = 0x40;
const IFA_F_PERMANENT: u32 = 0x80;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const RTA_METRICS: u16 = 8;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_VIA: u16 = 18;
const RTA_PREF: u16 = 20;
const RTA_ENCAP: u16 = 22;
const RTA_NH_ID: u16 = 30;
const RT_TABLE_LOCAL: u32 = 255;
const RTPROT_KERNEL: u32 = 2;
const RTM_F_CLONED: u32 = 0x200;
const FOREVER: u32 = u32::MAX;

/// Every address of the namespace of `nl`.
pub fn list(nl: &mut Netlink) -> std::io::Result<Vec<NetAddr>> {
    let msgs = nl.dump(RTM_GETADDR, &[0u8; 8])?;
    Ok(msgs
        .iter()
        .filter(|m| m.ty == RTM_NEWADDR)
        .filter_map(|m| parse_addr(&m.body))
        .collect())
}

fn parse_addr(b: &[u8]) -> Option<NetAddr> {
    let a = attrs(b.get(8..)?);
    let bytes = |t| attr(&a, t).map(<[u8]>::to_vec).unwrap_or_default();
    let (preferred, valid) = match attr(&a, IFA_CACHEINFO) {
        Some(c) => (u32_of(c)?, u32_of(c.get(4..)?)?),
        None => (FOREVER, FOREVER),
    };
    let flags = attr(&a, IFA_FLAGS)
        .and_then(u32_of)
        .unwrap_or(u32::from(b[2]));
    Some(NetAddr {
        family: u32::from(b[0]),
        prefixlen: u32::from(b[1]),
        flags,
        scope: u32::from(b[3]),
        index: i32::from_ne_bytes(b.get(4..8)?.try_into().ok()?),
        address: bytes(IFA_ADDRESS),
        local: bytes(IFA_LOCAL),
        broadcast: bytes(IFA_BROADCAST),
        label: attr(&a, IFA_LABEL).map(str_of).unwrap_or_default(),
        valid,
        preferred,
    })
}

/// Put address `a` on its device again (by `nl`).
pub fn add(nl: &mut Netlink, a: &NetAddr, index: i32) -> std::io::Result<()> {
    // The kernel's own state of an address is not asked for again; an
    // IPv6 one is usable at once rather than after duplicate detection.
    let mut flags =
        a.flags & !(IFA_F_TENTATIVE | IFA_F_PERMANENT | IFA_F_DADFAILED | IFA_F_DEPRECATED);
    if a.family == libc::AF_INET6 as u32 {
        flags |= IFA_F_NODAD;
    }
    let mut head = [0u8; 8];
    head[0] = a.family as u8;
    head[1] = a.prefixlen as u8;
    head[2] = flags as u8;
    head[3] = a.scope as u8;
    head[4..8].copy_from_slice(&index.to_ne_bytes());
    let mut b = Builder::new(&head);
    for (t, v) in [
        (IFA_ADDRESS, &a.address),
        (IFA_LOCAL, &a.local),
        (IFA_BROADCAST, &a.broadcast),
    ] {
        if !v.is_empty() {
            b.attr(t, v);
        }
    }
    if !a.label.is_empty() {
        b.str(IFA_LABEL, &a.label);
    }
    b.u32(IFA_FLAGS, flags);
    if a.valid != FOREVER || a.preferred != FOREVER {
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&a.preferred.to_ne_bytes());
        c[4..8].copy_from_slice(&a.valid.to_ne_bytes());
        b.attr(IFA_CACHEINFO, &c);
    }
    nl.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &b.buf)
}

/// One address as `ip` writes it (`10.0.0.1/24`).
pub fn text(a: &NetAddr) -> String {
    format!(
        "{}/{}",
        ip_text(if a.local.is_empty() {
            &a.address
        } else {
            &a.local
        }),
        a.prefixlen
    )
}

/// An IPv4 or IPv6 address as text (its bytes).
pub fn ip_text(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or_default()).to_string(),
        0 => "default".into(),
        _ => format!("{b:02x?}"),
    }
}

/// One route as `ip route` writes it, roughly.
pub fn route_text(r: &NetRoute) -> String {
    let mut s = if r.dst.is_empty() {
        "default".to_string()
    } else {
        format!("{}/{}", ip_text(&r.dst), r.dst_len)
    };
    if !r.gateway.is_empty() {
        s += &format!(" via {}", ip_text(&r.gateway));
    }
    if r.oif != 0 {
        s += &format!(" dev #{}", r.oif);
    }
    if r.table != libc::RT_TABLE_MAIN as u32 {
        s += &format!(" table {}", r.table);
    }
    s
}

/// The routes of the namespace of `nl` that are not the kernel's own.
pub fn routes(nl: &mut Netlink) -> Result<Vec<NetRoute>, String> {
    let msgs = nl
        .dump(RTM_GETROUTE, &[0u8; 12])
        .map_err(|e| format!("listing its routes: {e}"))?;
    let mut out = Vec::new();
    for m in msgs.iter().filter(|m| m.ty == RTM_NEWROUTE) {
        let Some(r) = parse_route(&m.body)? else {
            continue;
        };
        out.push(r);
    }
    Ok(out)
}

fn parse_route(b: &[u8]) -> Result<Option<NetRoute>, String> {
    let Some(head) = b.get(..12) else {
        return Ok(None);
    };
    let a = attrs(&b[12..]);
    let bytes = |t| attr(&a, t).map(<[u8]>::to_vec).unwrap_or_default();
    let r = NetRoute {
        family: u32::from(head[0]),
        dst_len: u32::from(head[1]),
        src_len: u32::from(head[2]),
        tos: u32::from(head[3]),
        table: attr(&a, RTA_TABLE)
            .and_then(u32_of)
            .unwrap_or(u32::from(head[4])),
        protocol: u32::from(head[5]),
        scope: u32::from(head[6]),
        kind: u32::from(head[7]),
        flags: u32_of(&head[8..12]).unwrap_or(0),
        dst: bytes(RTA_DST),
        src: bytes(RTA_SRC),
        gateway: bytes(RTA_GATEWAY),
        oif: attr(&a, RTA_OIF).and_then(u32_of).unwrap_or(0) as i32,
        priority: attr(&a, RTA_PRIORITY).and_then(u32_of).unwrap_or(0),
        prefsrc: bytes(RTA_PREFSRC),
        metrics: bytes(RTA_METRICS),
        pref: attr(&a, RTA_PREF)
            .and_then(|v| v.first())
            .map(|&p| u32::from(p)),
    };
    let family_kept = r.family == libc::AF_INET as u32 || r.family == libc::AF_INET6 as u32;
    if !family_kept
        || r.table == RT_TABLE_LOCAL
        || r.protocol == RTPROT_KERNEL
        || r.flags & RTM_F_CLONED != 0
    {
        return Ok(None);
    }
    for (t, what) in [
        (RTA_MULTIPATH, "a multipath route"),
        (RTA_VIA, "a route via another family's gateway"),
        (RTA_NH_ID, "a route through a nexthop object"),
        (RTA_ENCAP, "a route with an encapsulation"),
    ] {
        if attr(&a, t).is_some() {
            return Err(format!("route {}: {what} is not kept yet", route_text(&r)));
        }
    }
    Ok(Some(r))
}

/// Make route `r` again (by `nl`), its device `oif` now.
pub fn add_route(nl: &mut Netlink, r: &NetRoute) -> std::io::Result<()> {
    let mut head = [0u8; 12];
    head[0] = r.family as u8;
    head[1] = r.dst_len as u8;
    head[2] = r.src_len as u8;
    head[3] = r.tos as u8;
    // A table above 255 is named by its attribute alone (RT_TABLE_COMPAT).
    head[4] = if r.table > 255 { 252 } else { r.table as u8 };
    head[5] = r.protocol as u8;
    head[6] = r.scope as u8;
    head[7] = r.kind as u8;
    head[8..12].copy_from_slice(&(r.flags & !RTM_F_CLONED).to_ne_bytes());
    let mut b = Builder::new(&head);
    b.u32(RTA_TABLE, r.table);
    for (t, v) in [
        (RTA_DST, &r.dst),
        (RTA_SRC, &r.src),
        (RTA_GATEWAY, &r.gateway),
        (RTA_PREFSRC, &r.prefsrc),
        (RTA_METRICS, &r.metrics),
    ] {
        if !v.is_empty() {
            b.attr(t, v);
        }
    }
    if r.oif != 0 {
        b.u32(RTA_OIF, r.oif as u32);
    }
    if r.priority != 0 {
        b.u32(RTA_PRIORITY, r.priority);
    }
    if let Some(p) = r.pref {
        b.attr(RTA_PREF, &[p as u8]);
    }
    nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &b.buf)
}
