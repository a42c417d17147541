//! IPv4 and IPv6 sockets a restore must make again: TCP listeners with
//! their options, a UDP socket bound and one connected, a TCP socket not
//! bound yet, UDP sockets in multicast groups, ping sockets with echo
//! replies queued and raw sockets (`--raw-queued 1`: one with packets
//! queued, refused).
//!
//! `wl_inet --ready FILE --verdict FILE [--port P] [--connected 1] [--closed 1] [--pending 1] [--half 1] [--outside-pending 1] [--raw-queued 1] [--stream 1] [--peer PORT --expect N]`
//!
//! The process listens on 127.0.0.1 (SO_REUSEADDR, TCP_NODELAY, backlog
//! 17) and on [::1] (IPV6_V6ONLY), both on ports the kernel picks, binds
//! a UDP socket to 127.0.0.1, connects a UDP socket to [::1]:9, and keeps
//! a TCP socket that is not bound with the options users set
//! (SO_KEEPALIVE and the TCP keepalive settings, SO_REUSEPORT, the buffer
//! sizes, TCP_CORK, SO_LINGER, IP_TOS, SO_BINDTODEVICE...). Datagrams wait on
//! two UDP sockets: three on the bound one from two senders (one empty,
//! one of 9000 bytes), and on a dual-stack one bound to [::] one from an
//! IPv4 sender and one from an IPv6 one. On SIGTERM it receives those in
//! order from the same sources, then checks
//! each one's address, peer and options, accepts a new connection on
//! each listener with bytes both ways, and receives a datagram on the
//! bound UDP socket. `--connected 1` also keeps a connection to its own
//! listener (accepted), which cryo refuses without --tcp-established
//! (the test checks that the process runs on); with `--closed 1` it (and
//! `--stream`'s) must come back closed (--tcp-close). `--pending 1`: two
//! connections to the IPv4 listener that it has not accepted, each with
//! bytes from its client; after the restore it accepts them in the order
//! they came, with those bytes. `--half 1`: a connection whose client
//! has shut its side, refused. `--port P`: the IPv4 listener's port.
//! `--outside-pending 1`: the test connects to it and sends "hello",
//! which the process reads first on SIGTERM. `--stream 1`
//! keeps such a connection over IPv4 and one over IPv6, with data in
//! flight both ways (dumped with
//! --tcp-established): the server side holds 200000 bytes of a pattern
//! from the client not read yet, the client 5000 from the server; after
//! the restore each reads them whole, then they exchange more. `--peer
//! PORT` connects to 127.0.0.1:PORT (the test, outside the tree), and on
//! SIGTERM reads N bytes of the pattern from it, then answers "ok".

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_inet";

fn opt(fd: i32, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = -1;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` (4) bytes into `v`.
    unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    v
}

fn set(fd: i32, level: i32, name: i32, v: i32) -> Result<(), String> {
    // SAFETY: the kernel reads 4 bytes from `v`.
    let r = unsafe { libc::setsockopt(fd, level, name, (&v as *const i32).cast(), 4) };
    if r != 0 {
        return Err(format!(
            "setsockopt {level}:{name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn set_bytes(fd: i32, level: i32, name: i32, v: &[u8]) -> Result<(), String> {
    // SAFETY: the kernel reads v.len() bytes from a live slice.
    let r = unsafe { libc::setsockopt(fd, level, name, v.as_ptr().cast(), v.len() as u32) };
    if r != 0 {
        return Err(format!(
            "setsockopt {level}:{name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A sockaddr_in of `ip` (port 0), as a sockaddr_storage's 128 bytes.
fn storage_v4(ip: [u8; 4]) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    b[4..8].copy_from_slice(&ip);
    b
}

/// A UDP socket on 0.0.0.0 that joined 239.1.2.3 on lo (any source) and
/// 232.1.1.1 from 127.0.0.1 only, multicast TTL 7; and one on [::] that
/// joined ff12::1234 on lo.
fn multicast() -> Result<(UdpSocket, UdpSocket), String> {
    let mc = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
    let fd = mc.as_raw_fd();
    // struct ip_mreqn: group, local address, device index.
    let mut mreqn = vec![239, 1, 2, 3, 0, 0, 0, 0];
    mreqn.extend_from_slice(&1i32.to_ne_bytes());
    set_bytes(fd, libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP, &mreqn)?;
    // struct group_source_req: device index (padded to 8), group, source.
    let mut gsr = vec![0u8; 264];
    gsr[..4].copy_from_slice(&1u32.to_ne_bytes());
    gsr[8..136].copy_from_slice(&storage_v4([232, 1, 1, 1]));
    gsr[136..].copy_from_slice(&storage_v4([127, 0, 0, 1]));
    set_bytes(fd, libc::IPPROTO_IP, 46, &gsr)?; // MCAST_JOIN_SOURCE_GROUP
    set(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, 7)?;
    let mc6 = UdpSocket::bind("[::]:0").map_err(|e| format!("udp6 bind: {e}"))?;
    let group: std::net::Ipv6Addr = "ff12::1234".parse().map_err(|e| format!("{e}"))?;
    mc6.join_multicast_v6(&group, 1)
        .map_err(|e| format!("joining ff12::1234: {e}"))?;
    Ok((mc, mc6))
}

/// `mc` still gets what goes to its groups from the sources it takes
/// (and not from one it filters out); `mc6` is still a member of its
/// group; its TTL is 7.
fn check_multicast(mc: &UdpSocket, _mc6: &UdpSocket) -> Result<(), String> {
    let ttl = opt(mc.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MULTICAST_TTL);
    if ttl != 7 {
        return Err(format!("IP_MULTICAST_TTL is {ttl}, not 7"));
    }
    let port = mc.local_addr().map_err(|e| e.to_string())?.port();
    let sender = |from: &str| -> Result<UdpSocket, String> {
        let s = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
        let mut mreqn = vec![0u8; 8];
        mreqn.extend_from_slice(&1i32.to_ne_bytes());
        set_bytes(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &mreqn,
        )?;
        Ok(s)
    };
    let (one, two) = (sender("127.0.0.1:0")?, sender("127.0.0.2:0")?);
    for (s, to, what) in [
        (&one, "239.1.2.3", &b"g1"[..]),
        (&two, "232.1.1.1", b"ssm-out"),
        (&one, "232.1.1.1", b"ssm-in"),
    ] {
        s.send_to(what, (to, port))
            .map_err(|e| format!("sending to {to}: {e}"))?;
    }
    let _ = mc.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 16];
    for want in [&b"g1"[..], b"ssm-in"] {
        match mc.recv_from(&mut b) {
            Ok((n, _)) if &b[..n] == want => {}
            Ok((n, from)) => {
                return Err(format!("got {:?} from {from}, not {want:?}", &b[..n]));
            }
            Err(e) => return Err(format!("nothing for {want:?}: {e}")),
        }
    }
    let groups = std::fs::read_to_string("/proc/self/net/igmp6").map_err(|e| e.to_string())?;
    if !groups.contains("ff120000000000000000000000001234") {
        return Err(format!("ff12::1234 is joined no more: {groups}"));
    }
    Ok(())
}

/// A new socket of `family`, `ty`, `protocol` as a UdpSocket (for its
/// datagram calls), bound to `at` if given.
fn dgram(family: i32, ty: i32, protocol: i32, at: Option<&str>) -> Result<UdpSocket, String> {
    // SAFETY: socket() returns a new descriptor, owned at once.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(format!(
            "socket({family}, {ty}, {protocol}): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is new and ours.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(at) = at {
        socket2_bind(&owned, at.parse().map_err(|e| format!("{at}: {e}"))?)?;
    }
    Ok(UdpSocket::from(owned))
}

/// An ICMP (`v6`: ICMPv6) echo request with sequence `seq` and `data`
/// (a ping socket fills in its identifier and checksum).
fn echo(v6: bool, seq: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 0, 0, seq];
    m.extend_from_slice(data);
    m
}

/// Ping sockets with echo replies queued (two over IPv4, one over IPv6)
/// and raw sockets: an ICMP one bound to and connected to 127.0.0.1 that
/// filters out every ICMP type, one of protocol 253 on [::1] with
/// IPV6_CHECKSUM 2. With `queued`, a raw ICMP socket that keeps what it
/// sees (which cryo refuses).
struct Icmp {
    ping4: UdpSocket,
    ping6: UdpSocket,
    ident: (u16, u16),
    raw4: UdpSocket,
    raw6: UdpSocket,
    _queued: Option<UdpSocket>,
}

fn icmp(queued: bool) -> Result<Icmp, String> {
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
        .map_err(|e| format!("ping_group_range: {e}"))?;
    let raw4 = dgram(
        libc::AF_INET,
        libc::SOCK_RAW,
        libc::IPPROTO_ICMP,
        Some("127.0.0.1:0"),
    )?;
    set_bytes(raw4.as_raw_fd(), libc::SOL_RAW, 1, &u32::MAX.to_ne_bytes())?;
    raw4.connect("127.0.0.1:0")
        .map_err(|e| format!("raw connect: {e}"))?;
    let raw6 = dgram(libc::AF_INET6, libc::SOCK_RAW, 253, Some("[::1]:0"))?;
    set(raw6.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 2)?;
    let watcher = match queued {
        true => Some(dgram(
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMP,
            None,
        )?),
        false => None,
    };
    let ping4 = dgram(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP, None)?;
    let ping6 = dgram(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6, None)?;
    for (i, d) in [&b"ping-1"[..], b"ping-2"].into_iter().enumerate() {
        ping4
            .send_to(&echo(false, i as u8 + 1, d), "127.0.0.1:0")
            .map_err(|e| format!("ping: {e}"))?;
    }
    ping6
        .send_to(&echo(true, 1, b"ping6-1"), "[::1]:0")
        .map_err(|e| format!("ping6: {e}"))?;
    // The replies come on the way out of each send; a little time anyway.
    std::thread::sleep(Duration::from_millis(20));
    let port = |s: &UdpSocket| s.local_addr().map(|a| a.port()).unwrap_or(0);
    Ok(Icmp {
        ident: (port(&ping4), port(&ping6)),
        ping4,
        ping6,
        raw4,
        raw6,
        _queued: watcher,
    })
}

/// The echo replies come out in order and whole from their sources, the
/// ping sockets keep their identifiers and ping again; the raw sockets
/// kept their addresses, filter and checksum offset, the ICMP one its
/// peer (a send without an address goes).
fn check_icmp(c: &Icmp) -> Result<(), String> {
    let port = |s: &UdpSocket| s.local_addr().map(|a| a.port()).unwrap_or(0);
    if (port(&c.ping4), port(&c.ping6)) != c.ident {
        return Err(format!(
            "the ping identifiers are {:?}, were {:?}",
            (port(&c.ping4), port(&c.ping6)),
            c.ident
        ));
    }
    let mut b = [0u8; 64];
    let replies = [
        (&c.ping4, 0u8, 1u8, &b"ping-1"[..], "127.0.0.1"),
        (&c.ping4, 0, 2, b"ping-2", "127.0.0.1"),
        (&c.ping6, 129, 1, b"ping6-1", "::1"),
    ];
    for (s, ty, seq, data, from) in replies {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let (n, src) = s
            .recv_from(&mut b)
            .map_err(|e| format!("echo reply {seq} of {from} is gone: {e}"))?;
        let ok = n == 8 + data.len() && b[0] == ty && b[7] == seq && &b[8..n] == data;
        if !ok || src.ip().to_string() != from {
            return Err(format!("echo reply {seq} from {src}: {:?}", &b[..n]));
        }
    }
    for (s, v6, to) in [
        (&c.ping4, false, "127.0.0.1:0"),
        (&c.ping6, true, "[::1]:0"),
    ] {
        s.send_to(&echo(v6, 9, b"again"), to)
            .map_err(|e| format!("pinging {to} again: {e}"))?;
        let (n, _) = s
            .recv_from(&mut b)
            .map_err(|e| format!("no answer from {to}: {e}"))?;
        if n < 8 || b[7] != 9 {
            return Err(format!("{to} answered {:?}", &b[..n]));
        }
    }
    let filter = {
        let mut v = 0u32;
        let mut len = 4 as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` (4) bytes into `v`.
        unsafe {
            libc::getsockopt(
                c.raw4.as_raw_fd(),
                libc::SOL_RAW,
                1,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        v
    };
    if filter != u32::MAX {
        return Err(format!("the raw socket's ICMP_FILTER is {filter:#x}"));
    }
    let msg = echo(false, 1, b"raw");
    // SAFETY: the kernel reads msg.len() bytes of a live buffer.
    let sent = unsafe { libc::send(c.raw4.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(format!(
            "the raw socket sends to no peer: {}",
            std::io::Error::last_os_error()
        ));
    }
    let sum = opt(c.raw6.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM);
    let addrs = (c.raw4.local_addr(), c.raw6.local_addr());
    let want = ("127.0.0.1".to_string(), "::1".to_string());
    let got = (
        addrs.0.map(|a| a.ip().to_string()).unwrap_or_default(),
        addrs.1.map(|a| a.ip().to_string()).unwrap_or_default(),
    );
    if sum != 2 || got != want {
        return Err(format!(
            "the raw sockets: IPV6_CHECKSUM {sum}, addresses {got:?}"
        ));
    }
    Ok(())
}

/// The bytes of option `name` at `level` of `fd` (empty if unreadable).
fn get_bytes(fd: i32, level: i32, name: i32) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    let mut len = b.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `b`.
    let r = unsafe { libc::getsockopt(fd, level, name, b.as_mut_ptr().cast(), &mut len) };
    b.truncate(if r == 0 { len as usize } else { 0 });
    b
}

/// An option set: (name, level, option, its value as read back).
type SetOption = (&'static str, i32, i32, Vec<u8>);

/// The options users set, set on TCP socket `fd`: (name, level, option,
/// its value as read back).
fn set_options(fd: i32) -> Result<Vec<SetOption>, String> {
    let (sol, tcp, ip) = (libc::SOL_SOCKET, libc::IPPROTO_TCP, libc::IPPROTO_IP);
    let ints = [
        ("SO_REUSEPORT", sol, libc::SO_REUSEPORT, 1),
        ("SO_RCVBUF", sol, libc::SO_RCVBUF, 100_000),
        ("SO_SNDBUF", sol, libc::SO_SNDBUF, 60_000),
        ("TCP_KEEPIDLE", tcp, libc::TCP_KEEPIDLE, 77),
        ("TCP_KEEPINTVL", tcp, libc::TCP_KEEPINTVL, 11),
        ("TCP_KEEPCNT", tcp, libc::TCP_KEEPCNT, 4),
        ("TCP_CORK", tcp, libc::TCP_CORK, 1),
        ("TCP_USER_TIMEOUT", tcp, libc::TCP_USER_TIMEOUT, 30_000),
        ("IP_TOS", ip, libc::IP_TOS, 0x10),
    ];
    let mut out = Vec::new();
    for (what, level, name, v) in ints {
        set(fd, level, name, v)?;
        out.push((what, level, name, get_bytes(fd, level, name)));
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 5,
    };
    // SAFETY: the kernel reads one struct linger from a live local.
    let r = unsafe {
        libc::setsockopt(
            fd,
            sol,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if r != 0 {
        return Err(format!("SO_LINGER: {}", std::io::Error::last_os_error()));
    }
    out.push((
        "SO_LINGER",
        sol,
        libc::SO_LINGER,
        get_bytes(fd, sol, libc::SO_LINGER),
    ));
    set_bytes(fd, sol, libc::SO_BINDTODEVICE, b"lo")?;
    out.push((
        "SO_BINDTODEVICE",
        sol,
        libc::SO_BINDTODEVICE,
        get_bytes(fd, sol, libc::SO_BINDTODEVICE),
    ));
    Ok(out)
}

/// A TCP listener on `addr` with the options `opts` set before bind.
fn listener(
    addr: &str,
    v6: bool,
    opts: &[(i32, i32)],
    backlog: i32,
) -> Result<TcpListener, String> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket() returns a new descriptor, owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is new and ours.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    for &(level, name) in opts {
        set(fd, level, name, 1)?;
    }
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    socket2_bind(&owned, sa)?;
    // SAFETY: listen takes integers.
    if unsafe { libc::listen(fd, backlog) } != 0 {
        return Err(format!("listen: {}", std::io::Error::last_os_error()));
    }
    Ok(TcpListener::from(owned))
}

fn socket2_bind(fd: &OwnedFd, sa: SocketAddr) -> Result<(), String> {
    let r = match sa {
        SocketAddr::V4(a) => {
            let s = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: the kernel reads the sockaddr_in, a live local.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&s as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            }
        }
        SocketAddr::V6(a) => {
            // SAFETY: zeroed is a valid sockaddr_in6.
            let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            // SAFETY: as above.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&s as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            }
        }
    };
    if r != 0 {
        return Err(format!("bind {sa}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A new client of `l` exchanges bytes with what `l` accepts.
fn serves(l: &TcpListener) -> Result<(), String> {
    let at = l.local_addr().map_err(|e| e.to_string())?;
    let mut c = TcpStream::connect(at).map_err(|e| format!("connecting to {at}: {e}"))?;
    let (mut a, _) = l.accept().map_err(|e| format!("accept on {at}: {e}"))?;
    c.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut b = [0u8; 4];
    a.read_exact(&mut b).map_err(|e| e.to_string())?;
    a.write_all(b"pong").map_err(|e| e.to_string())?;
    c.read_exact(&mut b).map_err(|e| e.to_string())?;
    if &b != b"pong" {
        return Err(format!("{at} answered {b:?}"));
    }
    Ok(())
}

fn pattern(i: usize) -> u8 {
    (i * 31 % 251) as u8
}

/// A connection to `l` with bytes in flight both ways: (client, server,
/// how many the client wrote).
fn stream_pair(l: &TcpListener) -> Result<(TcpStream, TcpStream, usize), String> {
    let at = l.local_addr().map_err(|e| e.to_string())?;
    let mut c = TcpStream::connect(at).map_err(|e| format!("connecting: {e}"))?;
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    let data: Vec<u8> = (0..200_000).map(pattern).collect();
    c.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sent = 0;
    while sent < data.len() {
        match c.write(&data[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("writing: {e}")),
        }
    }
    c.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.write_all(&[7u8; 5000])
        .map_err(|e| format!("server writing: {e}"))?;
    Ok((c, s, sent))
}

/// `n` bytes of the pattern from the test, then "ok" back.
fn answer_peer(mut p: TcpStream, n: usize) -> Result<(), String> {
    let _ = p.set_read_timeout(Some(Duration::from_secs(20)));
    let mut got = vec![0u8; n];
    p.read_exact(&mut got)
        .map_err(|e| format!("reading its {n} bytes: {e}"))?;
    if let Some(i) = (0..n).find(|&i| got[i] != pattern(i)) {
        return Err(format!("its byte {i} is {:#x}", got[i]));
    }
    p.write_all(b"ok").map_err(|e| format!("answering: {e}"))
}

/// What was in flight comes out whole on each side, then more goes both
/// ways.
fn check_stream(mut c: TcpStream, mut s: TcpStream, sent: usize) -> Result<(), String> {
    let t = Some(Duration::from_secs(10));
    let _ = (c.set_read_timeout(t), s.set_read_timeout(t));
    let mut got = vec![0u8; sent];
    s.read_exact(&mut got)
        .map_err(|e| format!("the server reading the {sent} bytes in flight: {e}"))?;
    if let Some(i) = (0..sent).find(|&i| got[i] != pattern(i)) {
        return Err(format!("byte {i} of the client's is {:#x}", got[i]));
    }
    let mut back = vec![0u8; 5000];
    c.read_exact(&mut back)
        .map_err(|e| format!("the client reading the 5000 bytes in flight: {e}"))?;
    if back.iter().any(|&b| b != 7) {
        return Err("the server's bytes changed".into());
    }
    c.write_all(b"after").map_err(|e| e.to_string())?;
    let mut b = [0u8; 5];
    s.read_exact(&mut b)
        .map_err(|e| format!("after the restore: {e}"))?;
    s.write_all(b"reply").map_err(|e| e.to_string())?;
    c.read_exact(&mut b)
        .map_err(|e| format!("the reply: {e}"))?;
    if &b != b"reply" {
        return Err(format!("the reply is {b:?}"));
    }
    Ok(())
}

/// Two clients of `at` that it has not accepted yet, each having sent
/// bytes of the pattern (as many as the connection takes, up to
/// 150000): (client, its pattern's offset, bytes sent).
fn pending_clients(at: SocketAddr) -> Result<Vec<(TcpStream, usize, usize)>, String> {
    let mut out = Vec::new();
    for (i, n) in [3000usize, 150_000].into_iter().enumerate() {
        let mut c = TcpStream::connect(at).map_err(|e| format!("connecting: {e}"))?;
        let data: Vec<u8> = (0..n).map(|j| pattern(j + i)).collect();
        c.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut sent = 0;
        while sent < n {
            match c.write(&data[sent..]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("writing: {e}")),
            }
        }
        c.set_nonblocking(false).map_err(|e| e.to_string())?;
        out.push((c, i, sent));
    }
    Ok(out)
}

/// `l` accepts the waiting connections in the order they came, each from
/// its client with all it had sent, and they talk both ways.
fn check_pending(l: &TcpListener, pending: Vec<(TcpStream, usize, usize)>) -> Result<(), String> {
    let t = Some(Duration::from_secs(10));
    for (mut c, i, sent) in pending {
        let (mut s, from) = accept_within(l, Duration::from_secs(10))?;
        let want = c.local_addr().map_err(|e| e.to_string())?;
        if from != want {
            return Err(format!("accepted {from} where {want} came first"));
        }
        let _ = (c.set_read_timeout(t), s.set_read_timeout(t));
        let mut got = vec![0u8; sent];
        s.read_exact(&mut got)
            .map_err(|e| format!("reading the {sent} bytes client {i} sent: {e}"))?;
        if let Some(j) = (0..sent).find(|&j| got[j] != pattern(j + i)) {
            return Err(format!("byte {j} of client {i}'s is {:#x}", got[j]));
        }
        s.write_all(b"back").map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        c.read_exact(&mut b)
            .map_err(|e| format!("client {i} reading the answer: {e}"))?;
        c.write_all(b"more").map_err(|e| e.to_string())?;
        s.read_exact(&mut b)
            .map_err(|e| format!("server reading client {i}'s more: {e}"))?;
        if &b != b"more" {
            return Err(format!("client {i} sent {b:?}"));
        }
    }
    Ok(())
}

/// A connection `l` accepts within `t` (not one: an error, not a hang).
fn accept_within(l: &TcpListener, t: Duration) -> Result<(TcpStream, SocketAddr), String> {
    let start = std::time::Instant::now();
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let got = loop {
        match l.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < t => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => break other.map_err(|e| format!("accept: {e}")),
        }
    };
    l.set_nonblocking(false).map_err(|e| e.to_string())?;
    let (s, from) = got?;
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    Ok((s, from))
}

/// The server reads the end of what the client sent, and can still
/// write to it.
fn check_half(mut c: TcpStream, mut s: TcpStream) -> Result<(), String> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        other => return Err(format!("the server read {other:?}, not the end")),
    }
    s.write_all(b"x").map_err(|e| e.to_string())?;
    c.read_exact(&mut b).map_err(|e| e.to_string())
}

/// A connection restored closed (--tcp-close): not connected.
fn check_closed(mut c: &TcpStream) -> Result<(), String> {
    if let Ok(p) = c.peer_addr() {
        return Err(format!("it is connected to {p}"));
    }
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        other => Err(format!("reading gave {other:?}, not ENOTCONN")),
    }
}

/// The datagrams queued at the dump come out in order, whole, from their
/// senders.
fn check_queued(
    u4: &UdpSocket,
    dual: &UdpSocket,
    (s, t, six): (SocketAddr, SocketAddr, SocketAddr),
    big: &[u8],
    fails: &mut Vec<String>,
) {
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    let want: [(&UdpSocket, &[u8], SocketAddr); 5] = [
        (u4, b"first", s),
        (u4, b"", t),
        (u4, big, s),
        (dual, b"to dual from v4", mapped(t)),
        (dual, b"to dual from v6", six),
    ];
    let mut b = vec![0u8; 65536];
    for (i, (sock, data, from)) in want.into_iter().enumerate() {
        let _ = sock.set_nonblocking(true);
        match sock.recv_from(&mut b) {
            Ok((n, f)) if &b[..n] == data && f == from => {}
            Ok((n, f)) => fails.push(format!(
                "queued datagram {i}: {n} bytes from {f}, not {} from {from}",
                data.len()
            )),
            Err(e) => fails.push(format!("queued datagram {i} is gone: {e}")),
        }
        let _ = sock.set_nonblocking(false);
    }
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let tcp = libc::IPPROTO_TCP;
    let port4: u16 = a.get("port").and_then(|p| p.parse().ok()).unwrap_or(0);
    let l4 = listener(
        &format!("127.0.0.1:{port4}"),
        false,
        &[
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
            (tcp, libc::TCP_NODELAY),
        ],
        17,
    )?;
    let l6 = listener(
        "[::1]:0",
        true,
        &[(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)],
        5,
    )?;
    let u4 = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("udp bind: {e}"))?;
    let u6 = UdpSocket::bind("[::1]:0").map_err(|e| format!("udp6 bind: {e}"))?;
    u6.connect("[::1]:9")
        .map_err(|e| format!("udp6 connect: {e}"))?;
    // SAFETY: socket() returns a new descriptor, owned at once.
    let idle = unsafe {
        OwnedFd::from_raw_fd(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))
    };
    set(idle.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    let idle_opts = set_options(idle.as_raw_fd())?;
    let (mc, mc6) = multicast()?;
    let icmp = icmp(a.get("raw-queued") == Some("1"))?;
    let u4_s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let u4_t = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let dual = UdpSocket::bind("[::]:0").map_err(|e| format!("udp [::] bind: {e}"))?;
    let d6 = UdpSocket::bind("[::1]:0").map_err(|e| e.to_string())?;
    let big = vec![0x5au8; 9000];
    let to4 = u4.local_addr().map_err(|e| e.to_string())?;
    let dual_port = dual.local_addr().map_err(|e| e.to_string())?.port();
    let sent = [
        (u4_s.send_to(b"first", to4), "first"),
        (u4_t.send_to(b"", to4), "empty"),
        (u4_s.send_to(&big, to4), "big"),
        (
            u4_t.send_to(b"to dual from v4", ("127.0.0.1", dual_port)),
            "dual v4",
        ),
        (
            d6.send_to(b"to dual from v6", ("::1", dual_port)),
            "dual v6",
        ),
    ];
    for (r, what) in sent {
        r.map_err(|e| format!("sending the {what} datagram: {e}"))?;
    }
    let senders = (
        u4_s.local_addr().map_err(|e| e.to_string())?,
        u4_t.local_addr().map_err(|e| e.to_string())?,
        d6.local_addr().map_err(|e| e.to_string())?,
    );
    let addrs = (
        l4.local_addr().map_err(|e| e.to_string())?,
        l6.local_addr().map_err(|e| e.to_string())?,
        u4.local_addr().map_err(|e| e.to_string())?,
        u6.local_addr().map_err(|e| e.to_string())?,
    );
    // Refused by cryo without --tcp-established: a connection (its ends
    // restored closed with --tcp-close).
    let connected = if a.get("connected") == Some("1") {
        let c = TcpStream::connect(addrs.0).map_err(|e| e.to_string())?;
        let (s, _) = l4.accept().map_err(|e| e.to_string())?;
        vec![c, s]
    } else {
        Vec::new()
    };
    // Connections l4 has not accepted yet, with bytes from their clients.
    let pending = if a.get("pending") == Some("1") {
        pending_clients(addrs.0)?
    } else {
        Vec::new()
    };
    // Half closed: the client has shut its side (FIN_WAIT2, the server's
    // CLOSE_WAIT), which cryo refuses.
    let half = if a.get("half") == Some("1") {
        let c = TcpStream::connect(addrs.0).map_err(|e| e.to_string())?;
        let (s, _) = l4.accept().map_err(|e| e.to_string())?;
        c.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Some((c, s))
    } else {
        None
    };
    let peer = match a.get("peer") {
        Some(p) => Some(
            TcpStream::connect(("127.0.0.1", p.parse::<u16>().map_err(|e| e.to_string())?))
                .map_err(|e| format!("connecting to the test: {e}"))?,
        ),
        None => None,
    };
    // Over IPv4 and over IPv6.
    let stream = if a.get("stream") == Some("1") {
        Some([stream_pair(&l4)?, stream_pair(&l6)?])
    } else {
        None
    };
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    // The test's connection, left waiting on l4 by a refused dump.
    if a.get("outside-pending") == Some("1") {
        let got = l4
            .accept()
            .map_err(|e| e.to_string())
            .and_then(|(mut t, _)| {
                let _ = t.set_read_timeout(Some(Duration::from_secs(10)));
                let mut b = [0u8; 5];
                t.read_exact(&mut b).map_err(|e| e.to_string()).map(|()| b)
            });
        if got.as_ref().map(|b| &b[..]) != Ok(b"hello") {
            fails.push(format!("the test's waiting connection gave {got:?}"));
        }
    }
    if let Some((c, s)) = half {
        if let Err(e) = check_half(c, s) {
            fails.push(format!("the half-closed connection: {e}"));
        }
    }
    if let Err(e) = check_pending(&l4, pending) {
        fails.push(format!("the connections waiting to be accepted: {e}"));
    }
    let closed = a.get("closed") == Some("1");
    if closed {
        for (i, c) in connected.iter().enumerate() {
            if let Err(e) = check_closed(c) {
                fails.push(format!("end {i} of the connection: {e}"));
            }
        }
    }
    if let Some(p) = peer {
        let n: usize = a.get("expect").and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Err(e) = answer_peer(p, n) {
            fails.push(format!("the connection from outside: {e}"));
        }
    }
    for (i, (c, s, sent)) in stream.into_iter().flatten().enumerate() {
        if closed {
            for (end, t) in [&c, &s].into_iter().enumerate() {
                if let Err(e) = check_closed(t) {
                    fails.push(format!("end {end} of stream {i}: {e}"));
                }
            }
            continue;
        }
        if let Err(e) = check_stream(c, s, sent) {
            fails.push(format!("connection {i}: {e}"));
        }
    }
    check_queued(&u4, &dual, senders, &big, &mut fails);
    if let Err(e) = check_multicast(&mc, &mc6) {
        fails.push(format!("multicast: {e}"));
    }
    if let Err(e) = check_icmp(&icmp) {
        fails.push(format!("ICMP: {e}"));
    }
    let now = (
        l4.local_addr(),
        l6.local_addr(),
        u4.local_addr(),
        u6.local_addr(),
    );
    if (
        now.0.as_ref().ok().copied(),
        now.1.as_ref().ok().copied(),
        now.2.as_ref().ok().copied(),
        now.3.as_ref().ok().copied(),
    ) != (Some(addrs.0), Some(addrs.1), Some(addrs.2), Some(addrs.3))
    {
        fails.push(format!("addresses {now:?}, were {addrs:?}"));
    }
    for (what, fd, level, name, want) in [
        (
            "SO_REUSEADDR",
            l4.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            1,
        ),
        ("TCP_NODELAY", l4.as_raw_fd(), tcp, libc::TCP_NODELAY, 1),
        (
            "SO_ACCEPTCONN",
            l4.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            1,
        ),
        (
            "IPV6_V6ONLY",
            l6.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            1,
        ),
        (
            "SO_KEEPALIVE",
            idle.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            1,
        ),
        (
            "SO_REUSEADDR of [::1]",
            l6.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            0,
        ),
    ] {
        let got = opt(fd, level, name);
        if got != want {
            fails.push(format!("{what} is {got}, not {want}"));
        }
    }
    for (what, level, name, was) in &idle_opts {
        let now = get_bytes(idle.as_raw_fd(), *level, *name);
        if &now != was {
            fails.push(format!("{what} is {now:?}, was {was:?}"));
        }
    }
    match u6.peer_addr() {
        Ok(p) if p == "[::1]:9".parse::<SocketAddr>().unwrap_or(p) && p.port() == 9 => {}
        other => fails.push(format!("the connected UDP socket's peer is {other:?}")),
    }
    for l in [&l4, &l6] {
        if let Err(e) = serves(l) {
            fails.push(e);
        }
    }
    let sender = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let _ = sender.send_to(b"datagram", addrs.2);
    let _ = u4.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 16];
    match u4.recv_from(&mut b) {
        Ok((8, _)) if &b[..8] == b"datagram" => {}
        other => fails.push(format!("the bound UDP socket got {other:?}")),
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_inet --ready FILE --verdict FILE [--port P] [--connected 1] [--closed 1] [--pending 1] [--half 1] [--outside-pending 1] [--raw-queued 1] [--stream 1] [--peer PORT --expect N]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
