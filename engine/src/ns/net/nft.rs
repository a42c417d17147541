//! The nftables ruleset of a namespace: whether it has any table is asked
//! of nfnetlink directly (a namespace without one needs no `nft`); its
//! ruleset is saved with `nft -j list ruleset` and loaded with
//! `nft -j -f -`, run inside the namespace.

#![forbid(unsafe_code)]

use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use crate::sys::netlink::Netlink;

const NFT_MSG_NEWTABLE: u16 = 0x0a00;
const NFT_MSG_GETTABLE: u16 = 0x0a01;

/// The program run: `nft` from PATH, or CRYO_NFT.
fn nft() -> String {
    std::env::var("CRYO_NFT").unwrap_or_else(|_| "nft".into())
}

/// How many nftables tables the namespace open at `ns` has.
fn tables(ns: &OwnedFd) -> Result<usize, String> {
    let mut nl = match Netlink::open_in(ns, nix::sys::socket::SockProtocol::NetlinkNetFilter) {
        Ok(nl) => nl,
        // No nfnetlink in this kernel: no table either.
        Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => return Ok(0),
        Err(e) => return Err(format!("a netfilter netlink socket in it: {e}")),
    };
    // struct nfgenmsg: AF_UNSPEC, NFNETLINK_V0, resource id 0.
    match nl.dump(NFT_MSG_GETTABLE, &[0u8; 4]) {
        Ok(m) => Ok(m.iter().filter(|m| m.ty == NFT_MSG_NEWTABLE).count()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOENT)) => Ok(0),
        Err(e) => Err(format!("listing its nftables tables: {e}")),
    }
}

/// The ruleset of the namespace open at `ns` as JSON, empty if it has no
/// table.
pub fn dump(ns: &OwnedFd) -> Result<String, String> {
    let n = tables(ns)?;
    if n == 0 {
        return Ok(String::new());
    }
    let mut cmd = Command::new(nft());
    cmd.args(["-j", "list", "ruleset"]);
    crate::sys::ns::command_in_net(&mut cmd, ns);
    let out = cmd.stderr(Stdio::piped()).output().map_err(|e| {
        format!(
            "it has {n} nftables table(s), and running {} to save them failed ({e}): install nftables",
            nft()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "its {n} nftables table(s): `{} -j list ruleset` failed: {}",
            nft(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| "its nftables ruleset is not UTF-8".into())
}

/// Load `ruleset` (JSON) in the namespace open at `ns`.
pub fn load(ns: &OwnedFd, ruleset: &str) -> Result<(), String> {
    feed(ns, &["-j", "-f", "-"], ruleset).map_err(|e| format!("loading its nftables ruleset: {e}"))
}

/// Run nftables script `script` (nft's own syntax) in the namespace open
/// at `ns`.
pub fn run_script(ns: &OwnedFd, script: &str) -> Result<(), String> {
    feed(ns, &["-f", "-"], script)
}

/// Run `nft ARGS` in the namespace open at `ns` with `input` on its
/// standard input; its error output is the error.
fn feed(ns: &OwnedFd, args: &[&str], input: &str) -> Result<(), String> {
    let mut cmd = Command::new(nft());
    cmd.args(args);
    crate::sys::ns::command_in_net(&mut cmd, ns);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {} ({e}): install nftables", nft()))?;
    let wrote = child
        .stdin
        .take()
        .map(|mut i| i.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", nft()))?;
    if let Some(Err(e)) = wrote {
        return Err(format!("giving {} its input: {e}", nft()));
    }
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}
