//! A tree whose child is in a network namespace of its own with a veth
//! device, addresses, routes, a dummy device, an nftables table and a
//! per-device sysctl, which a restore must make again as they were.
//!
//! `wl_netdev --ready FILE --verdict FILE [--host 1 [--after NAME]] [--bridge 1]`
//!
//! The parent makes a network namespace of its own too (or, with
//! `--host 1`, stays in the one it was started in, the "host"), forks a
//! child that makes another, and joins the two with a veth pair: its end
//! (`v0`, or `cryoh0` on the host) has 10.77.0.1/24 and fd77::1/64 and
//! MTU 9000, the child's (`v1`) 10.77.0.2/24 and fd77::2/64. The child
//! also has a second (secondary) address 10.77.0.3/24 on `v1`, 10.66.0.1/32
//! on its loopback, a route to 10.99.0.0/16 through the parent, an
//! nftables table `inet cryo_wl` that drops
//! TCP port 7, and net.ipv4.conf.v1.forwarding set to 1; the parent (in
//! its own namespace) a route to 10.98.0.0/16 through the child. Each
//! records its devices' indexes and hardware addresses.
//!
//! On SIGTERM each end checks its devices (same index and hardware
//! address, up, MTU, addresses), the child its route, loopback address,
//! nftables table and sysctl; then the child binds UDP port 7777 on its
//! addresses and the parent sends it a datagram over IPv4 and one over
//! IPv6, which must come back. `--after NAME`: the host end is named NAME
//! after the restore (--veth-pair v1=NAME). `--bridge 1` also gives the child a
//! bridge device, which cryo refuses to dump (the test checks that the
//! tree runs on).

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_netdev";
const PORT: u16 = 7777;

/// `tool ARGS` in this process's network namespace: its output.
fn run_tool(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("running {tool} {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` (split at spaces).
fn ip(args: &str) -> Result<String, String> {
    run_tool("ip", &args.split_whitespace().collect::<Vec<_>>())
}

fn nft(args: &[&str]) -> Result<String, String> {
    run_tool("nft", args)
}

/// A device's index and hardware address, from `ip -o link show` (on
/// the host, where the restore may give it another index, the address
/// alone).
fn identity(dev: &str) -> Result<String, String> {
    let line = ip(&format!("-o link show dev {dev}"))?;
    let index = line.split(':').next().unwrap_or("").trim().to_string();
    let mac = line
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("none");
    if dev.starts_with("cryoh") {
        return Ok(mac.to_string());
    }
    Ok(format!("{index} {mac}"))
}

/// What must hold of device `dev`: its identity as recorded, up, the
/// MTU and addresses given.
fn check_dev(dev: &str, was: &str, mtu: u32, addrs: &[&str], fails: &mut Vec<String>) {
    match identity(dev) {
        Ok(now) if now == was => {}
        Ok(now) => fails.push(format!(
            "{dev} is now {now:?}, was {was:?} (index, address)"
        )),
        Err(e) => {
            fails.push(e);
            return;
        }
    }
    let link = ip(&format!("-o link show dev {dev}")).unwrap_or_default();
    if !link.contains(",UP") && !link.contains("<UP") {
        fails.push(format!("{dev} is not up: {}", link.trim()));
    }
    if !link.contains(&format!("mtu {mtu} ")) {
        fails.push(format!("{dev}'s MTU is not {mtu}: {}", link.trim()));
    }
    let have = ip(&format!("-o addr show dev {dev}")).unwrap_or_default();
    for a in addrs {
        if !have.contains(&format!(" {a} ")) {
            fails.push(format!("{dev} lacks address {a}: {}", have.trim()));
        }
    }
}

/// The child's setup, in its new namespace, once `v1` is in it.
fn child_setup(bridge: bool) -> Result<(), String> {
    ip("link set lo up")?;
    ip("addr add 10.77.0.2/24 dev v1")?;
    ip("-6 addr add fd77::2/64 dev v1 nodad")?;
    ip("link set v1 up")?;
    ip("route add 10.99.0.0/16 via 10.77.0.1")?;
    ip("addr add 10.77.0.3/24 dev v1")?;
    ip("addr add 10.66.0.1/32 dev lo")?;
    if bridge {
        ip("link add br0 type bridge")?;
    }
    nft(&["add", "table", "inet", "cryo_wl"])?;
    nft(&[
        "add",
        "chain",
        "inet",
        "cryo_wl",
        "input",
        "{ type filter hook input priority 0; policy accept; }",
    ])?;
    nft(&[
        "add", "rule", "inet", "cryo_wl", "input", "tcp", "dport", "7", "counter", "drop",
    ])?;
    std::fs::write("/proc/sys/net/ipv4/conf/v1/forwarding", "1")
        .map_err(|e| format!("net.ipv4.conf.v1.forwarding: {e}"))
}

fn child_check(was: &str) -> String {
    let mut fails = Vec::new();
    let addrs = ["10.77.0.2/24", "10.77.0.3/24", "fd77::2/64"];
    check_dev("v1", was, 1500, &addrs, &mut fails);
    let v1 = ip("-o addr show dev v1").unwrap_or_default();
    if !v1.contains("10.77.0.3/24 scope global secondary") {
        fails.push(format!("10.77.0.3 is not secondary on v1: {v1:?}"));
    }
    match ip("route show 10.99.0.0/16") {
        Ok(r) if r.contains("via 10.77.0.1 dev v1") => {}
        Ok(r) => fails.push(format!("the route to 10.99.0.0/16 is {:?}", r.trim())),
        Err(e) => fails.push(e),
    }
    let lo = ip("-o addr show dev lo").unwrap_or_default();
    if !lo.contains("10.66.0.1/32") {
        fails.push(format!("lo lacks 10.66.0.1: {lo:?}"));
    }
    match nft(&["list", "table", "inet", "cryo_wl"]) {
        Ok(t) if t.contains("tcp dport 7") && t.contains("drop") => {}
        Ok(t) => fails.push(format!("table inet cryo_wl is {t:?}")),
        Err(e) => fails.push(e),
    }
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/conf/v1/forwarding").unwrap_or_default();
    if fwd.trim() != "1" {
        fails.push(format!("net.ipv4.conf.v1.forwarding is {:?}", fwd.trim()));
    }
    fails.join("; ")
}

/// Bind UDP port 7777 on the child's two addresses; echo one datagram on
/// each, in a thread of its own, within five seconds.
fn child_echo() -> Result<std::thread::JoinHandle<String>, String> {
    let v4 = UdpSocket::bind(("10.77.0.2", PORT)).map_err(|e| format!("bind 10.77.0.2: {e}"))?;
    let v6 = UdpSocket::bind(("fd77::2", PORT)).map_err(|e| format!("bind fd77::2: {e}"))?;
    Ok(std::thread::spawn(move || {
        let mut fails = Vec::new();
        for s in [v4, v6] {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 64];
            match s.recv_from(&mut b) {
                Ok((n, from)) => {
                    let _ = s.send_to(&b[..n], from);
                }
                Err(e) => fails.push(format!("no datagram came to {:?}: {e}", s.local_addr())),
            }
        }
        fails.join("; ")
    }))
}

/// The child: make its namespace, then answer the parent's commands.
fn child(cmd: i32, back: i32, bridge: bool) -> ! {
    // SAFETY: unshare takes a flag.
    let ok = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
    wl::write_fd(back, if ok { b"y\n" } else { b"n\n" });
    let mut was = String::new();
    let mut b = [0u8; 1];
    while wl::read_exact(cmd, &mut b) {
        let answer = match b[0] {
            b's' => match child_setup(bridge).and_then(|()| identity("v1")) {
                Ok(id) => {
                    was = id;
                    String::new()
                }
                Err(e) => e,
            },
            b'c' => child_check(&was),
            b'e' => match child_echo() {
                Ok(t) => {
                    wl::write_fd(back, b"\n");
                    t.join()
                        .unwrap_or_else(|_| "the echo thread panicked".into())
                }
                Err(e) => format!("{e}\n{e}"),
            },
            _ => "an unknown command".into(),
        };
        wl::write_fd(back, format!("{answer}\n").as_bytes());
    }
    // SAFETY: end at once; the parent waits for us.
    unsafe { libc::_exit(0) }
}

fn ask(cmd: i32, back: i32, what: u8) -> String {
    wl::write_fd(cmd, &[what]);
    wl::read_line(back)
}

/// A datagram to `to` from a socket of the parent, which must come back.
fn ping(to: SocketAddr) -> Result<(), String> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or(to)
    } else {
        "[::]:0".parse().unwrap_or(to)
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let msg = format!("ping {to}");
    s.send_to(msg.as_bytes(), to)
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut b = [0u8; 64];
    let (n, _) = s
        .recv_from(&mut b)
        .map_err(|e| format!("no echo from {to}: {e}"))?;
    if &b[..n] != msg.as_bytes() {
        return Err(format!(
            "{to} echoed {:?}",
            String::from_utf8_lossy(&b[..n])
        ));
    }
    Ok(())
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let host = a.get("host") == Some("1");
    let bridge = a.get("bridge") == Some("1");
    // SAFETY: unshare takes a flag.
    if !host && unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare: {}", std::io::Error::last_os_error()));
    }
    let mine = if host { "cryoh0" } else { "v0" };
    let (cmd, back) = (wl::pipe()?, wl::pipe()?);
    // SAFETY: fork of this single-threaded process; the child answers
    // the commands until `cmd` closes.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: closing the parent's ends of the pipes.
        unsafe {
            libc::close(cmd[1]);
            libc::close(back[0]);
        }
        child(cmd[0], back[1], bridge);
    }
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if wl::read_line(back[0]) != "y" {
        return Err("the child did not make its namespace".into());
    }
    ip("link set lo up")?;
    ip(&format!(
        "link add {mine} type veth peer name v1 netns {pid}"
    ))?;
    ip(&format!("addr add 10.77.0.1/24 dev {mine}"))?;
    ip(&format!("-6 addr add fd77::1/64 dev {mine} nodad"))?;
    ip(&format!("link set {mine} mtu 9000 up"))?;
    let said = ask(cmd[1], back[0], b's');
    if !said.is_empty() {
        return Err(format!("the child's setup: {said}"));
    }
    if !host {
        ip("route add 10.98.0.0/16 via 10.77.0.2")?;
    }
    let was = identity(mine)?;
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let mine = a.get("after").unwrap_or(mine);
    check_dev(
        mine,
        &was,
        9000,
        &["10.77.0.1/24", "fd77::1/64"],
        &mut fails,
    );
    if !host {
        match ip("route show 10.98.0.0/16") {
            Ok(r) if r.contains("via 10.77.0.2 dev v0") => {}
            Ok(r) => fails.push(format!("the route to 10.98.0.0/16 is {:?}", r.trim())),
            Err(e) => fails.push(e),
        }
    }
    let said = ask(cmd[1], back[0], b'c');
    if !said.is_empty() {
        fails.push(format!("the child: {said}"));
    }
    let bound = ask(cmd[1], back[0], b'e');
    if !bound.is_empty() {
        fails.push(format!("the child's echo: {bound}"));
    }
    for to in ["10.77.0.2:7777", "[fd77::2]:7777"] {
        if let Err(e) = ping(to.parse().map_err(|e| format!("{to}: {e}"))?) {
            fails.push(e);
        }
    }
    let echoed = wl::read_line(back[0]);
    if !echoed.is_empty() {
        fails.push(format!("the child's echo: {echoed}"));
    }
    wl::end_server(cmd[1], pid);
    if host {
        // The host end goes with the child's namespace; nothing is left.
        let _ = ip(&format!("link del {mine}"));
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_netdev --ready FILE --verdict FILE [--host 1 [--after NAME]] [--bridge 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
