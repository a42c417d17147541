//! The network lock of a dump (--network-lock nft|iptables|skip): while
//! the tree is away, each of its connections' packets is dropped, so that
//! a peer outside the tree sends again instead of meeting no socket and
//! being reset. Made in the network namespace of the connection's task
//! (an nftables table `cryo_lock_ROOT`, or a chain `CRYO-LOCK-ROOT` of
//! iptables' and ip6tables' filter tables jumped to from INPUT and
//! OUTPUT), one rule each way per connection matching its four-tuple.
//! Removed by the restore once the connections are made again, and at
//! once when the dump fails or leaves the tree running. A tree in a
//! network namespace of its own has its lock in that namespace's ruleset
//! in the image: taken out when the namespace is made again.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

/// How a dump locks the tree's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    Nft,
    Iptables,
}

impl Lock {
    /// Its name on the command line and in the image.
    pub fn name(self) -> &'static str {
        match self {
            Lock::Nft => "nft",
            Lock::Iptables => "iptables",
        }
    }

    pub fn from_name(name: &str) -> Option<Lock> {
        match name {
            "nft" => Some(Lock::Nft),
            "iptables" => Some(Lock::Iptables),
            _ => None,
        }
    }
}

/// The name of the nftables table (nft) or chain (iptables) of the lock
/// of a tree whose root is `root`.
fn name(kind: Lock, root: i32) -> String {
    match kind {
        Lock::Nft => format!("cryo_lock_{root}"),
        Lock::Iptables => format!("CRYO-LOCK-{root}"),
    }
}

/// The network namespaces a dump locked, with the lock's kind and name:
/// unlocked when it fails or leaves the tree running.
static LOCKED: std::sync::Mutex<Vec<(OwnedFd, Lock, String)>> = std::sync::Mutex::new(Vec::new());

/// One end of a connection: address bytes and port.
pub type End<'a> = (&'a [u8], u16);

/// Drop the packets of the connection between `ends` (local, then peer)
/// in task `pid`'s network namespace, with lock `kind` of the tree of
/// root `root`.
pub fn lock(pid: i32, ends: (End, End), kind: Lock, root: i32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/proc/{pid}/ns/net");
    let ns: OwnedFd = std::fs::File::open(&path)
        .map_err(|e| format!("{path}: {e}"))?
        .into();
    let ino_of = |n: &OwnedFd| {
        n.try_clone()
            .ok()
            .and_then(|n| std::fs::File::from(n).metadata().ok())
            .map_or(0, |m| m.ino())
    };
    let ino = ino_of(&ns);
    let mut locked = LOCKED.lock().unwrap_or_else(|p| p.into_inner());
    let first = !locked.iter().any(|(n, _, _)| ino_of(n) == ino);
    let name = name(kind, root);
    match kind {
        Lock::Nft => {
            let script = format!(
                "add table inet {name}\n\
                 add chain inet {name} in {{ type filter hook input priority -300; }}\n\
                 add chain inet {name} out {{ type filter hook output priority -300; }}\n\
                 add rule inet {name} in {} drop\n\
                 add rule inet {name} out {} drop\n",
                nft_match(ends.1, ends.0),
                nft_match(ends.0, ends.1),
            );
            crate::ns::net::nft::run_script(&ns, &script).map_err(|e| format!("nft: {e}"))?;
        }
        Lock::Iptables => {
            let tool = iptables_for(ends.0 .0);
            if first {
                for t in ["iptables", "ip6tables"] {
                    iptables(&ns, t, &["-N", &name])?;
                    for hook in ["INPUT", "OUTPUT"] {
                        iptables(&ns, t, &["-I", hook, "-j", &name])?;
                    }
                }
            }
            for (src, dst) in [(ends.1, ends.0), (ends.0, ends.1)] {
                let mut args = vec!["-A".to_string(), name.clone()];
                args.extend(iptables_match(src, dst));
                args.extend(["-j".into(), "DROP".into()]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                iptables(&ns, tool, &args)?;
            }
        }
    }
    if first {
        locked.push((ns, kind, name));
    }
    Ok(())
}

/// At the end of a dump: when the tree was not `killed` (a failed dump,
/// or -R), its lock goes at once.
pub fn settle(killed: bool) {
    let locked = std::mem::take(&mut *LOCKED.lock().unwrap_or_else(|p| p.into_inner()));
    for (ns, kind, name) in locked.iter().filter(|_| !killed) {
        if let Err(e) = unlock(ns, *kind, name) {
            tracing::error!("removing the network lock {name}: {e}");
        }
    }
}

/// Remove lock `name` of kind `kind` from the namespace open at `ns`.
fn unlock(ns: &OwnedFd, kind: Lock, name: &str) -> Result<(), String> {
    match kind {
        Lock::Nft => crate::ns::net::nft::run_script(ns, &format!("delete table inet {name}\n")),
        Lock::Iptables => {
            let mut first = Ok(());
            for t in ["iptables", "ip6tables"] {
                for args in [
                    &["-D", "INPUT", "-j", name][..],
                    &["-D", "OUTPUT", "-j", name],
                    &["-F", name],
                    &["-X", name],
                ] {
                    if let (Err(e), Ok(())) = (iptables(ns, t, args), &first) {
                        first = Err(e);
                    }
                }
            }
            first
        }
    }
}

/// After a restore has made the tree's connections again: the locks
/// (`kinds`) its dump left in cryo's network namespace, where the peers
/// outside the tree are, go.
pub fn unlock_after_restore(root: i32, kinds: &[Lock]) {
    let Ok(own) = std::fs::File::open("/proc/self/ns/net") else {
        return;
    };
    let own: OwnedFd = own.into();
    for &kind in kinds {
        let name = name(kind, root);
        match unlock(&own, kind, &name) {
            Ok(()) => tracing::debug!(name, "network lock removed"),
            Err(e) => tracing::debug!(name, "no network lock to remove here: {e}"),
        }
    }
}

/// The locks a ruleset saved in an image holds (a dump locked the tree's
/// connections in the tree's own network namespace): removed from the
/// namespace open at `ns`, which was just given that ruleset.
pub fn remove_saved(ns: &OwnedFd, ruleset: &str) {
    for (kind, prefix) in [(Lock::Nft, "cryo_lock_"), (Lock::Iptables, "CRYO-LOCK-")] {
        let mut roots: Vec<i32> = ruleset
            .match_indices(prefix)
            .filter_map(|(at, _)| {
                let digits: String = ruleset[at + prefix.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .collect();
        roots.sort_unstable();
        roots.dedup();
        for root in roots {
            if let Err(e) = unlock(ns, kind, &name(kind, root)) {
                tracing::warn!("removing the saved network lock of {root}: {e}");
            }
        }
    }
}

/// Address bytes as on the wire: a v4-mapped address as its IPv4 one.
fn plain(a: &[u8]) -> &[u8] {
    let mapped = a.len() == 16 && a[..10].iter().all(|&b| b == 0) && a[10..12] == [0xff, 0xff];
    if mapped {
        &a[12..]
    } else {
        a
    }
}

/// An nft match of the TCP packets from `src` to `dst`.
fn nft_match(src: End, dst: End) -> String {
    let (s, d) = (plain(src.0), plain(dst.0));
    let ip = if s.len() == 4 { "ip" } else { "ip6" };
    let text = crate::ns::net::addrs::ip_text;
    format!(
        "{ip} saddr {} {ip} daddr {} tcp sport {} tcp dport {}",
        text(s),
        text(d),
        src.1,
        dst.1
    )
}

/// The iptables program for packets of address `a`'s family.
fn iptables_for(a: &[u8]) -> &'static str {
    if plain(a).len() == 4 {
        "iptables"
    } else {
        "ip6tables"
    }
}

/// iptables' arguments matching the TCP packets from `src` to `dst`.
fn iptables_match(src: End, dst: End) -> Vec<String> {
    let text = crate::ns::net::addrs::ip_text;
    [
        "-p",
        "tcp",
        "-s",
        &text(plain(src.0)),
        "-d",
        &text(plain(dst.0)),
        "--sport",
        &src.1.to_string(),
        "--dport",
        &dst.1.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Run `tool -w ARGS` (iptables or ip6tables, or CRYO_IPTABLES and
/// CRYO_IP6TABLES) in the namespace open at `ns`.
fn iptables(ns: &OwnedFd, tool: &str, args: &[&str]) -> Result<(), String> {
    let var = format!("CRYO_{}", tool.to_ascii_uppercase());
    let program = std::env::var(&var).unwrap_or_else(|_| tool.to_string());
    let mut cmd = Command::new(&program);
    cmd.arg("-w").args(args);
    crate::sys::ns::command_in_net(&mut cmd, ns);
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {program} ({e}): install iptables"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} -w {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
