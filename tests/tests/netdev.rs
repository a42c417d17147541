//! Network devices of a container: veth pairs (between two namespaces of
//! the tree, or with one end in cryo's own), addresses, routes, an
//! nftables table and a per-device sysctl, checked by wl_netdev itself
//! after the restore, with traffic over the pair. Each test runs in a
//! network namespace of its own (cryo's "host" there), so no device or
//! address ever reaches the machine's.

use std::process::Command;
use std::time::Duration;

use cryo_tests::*;

fn own_network() -> bool {
    own_network_namespace(&["ip", "nft"])
}

fn ip_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Start wl_netdev with `args`, dump it and restore it `rounds` times
/// (once and leave it running with `leave_running`); the image shows
/// each of `shown`.
fn cycle(args: &[&str], rounds: usize, leave_running: bool, shown: &[&str]) {
    if !own_network() {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_netdev", args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 2, "wl_netdev is two processes");
    for round in 0..rounds {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
        let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        for want in shown {
            assert!(text.contains(want), "image show lacks {want:?}: {text}");
        }
    }
    wl.assert_pass("wl_netdev");
}

#[test]
fn veth_between_tree_namespaces_two_rounds() {
    cycle(
        &[],
        2,
        false,
        &[
            "device v0 #2 veth MTU 9000",
            "10.77.0.3/24",
            "route 10.99.0.0/16 via 10.77.0.1",
            "nftables ruleset",
        ],
    );
}

#[test]
fn veth_between_tree_namespaces_leave_running() {
    cycle(&[], 1, true, &["peer v0 #2 in net:["]);
}

/// The host end is made again in cryo's namespace, with its address,
/// and removed by the kernel with the tree's end when the tree ends.
#[test]
fn veth_with_host_end_two_rounds() {
    cycle(
        &["--host", "1"],
        2,
        false,
        &["peer cryoh0 #", "in cryo's namespace"],
    );
    assert!(
        !ip_link_exists("cryoh0") || {
            std::thread::sleep(Duration::from_secs(2));
            !ip_link_exists("cryoh0")
        },
        "the host end outlived the tree"
    );
}

/// `--veth-pair v1=cryoh1` names the host end anew at the restore.
#[test]
fn veth_host_end_renamed() {
    if !own_network() {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_netdev", &["--host", "1", "--after", "cryoh1"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_reap(&mut wl, &guard, &img, &[]);
    let path = img.to_str().expect("utf-8 path");
    let out = run_cryo(
        &["restore", "-D", path, "-d", "--veth-pair", "v1=cryoh1"],
        &[],
    );
    wl.mark_running();
    assert_cryo_ok(&out, "restore with --veth-pair");
    wl.assert_restored();
    assert!(ip_link_exists("cryoh1"), "no host end cryoh1");
    wl.assert_pass("wl_netdev with its host end renamed");
}

/// A restore that fails after the devices were made removes the host end
/// it made; a second restore then succeeds.
#[test]
fn failed_restore_removes_host_end() {
    if !own_network() {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_netdev", &["--host", "1"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_reap(&mut wl, &guard, &img, &[]);
    let path = img.to_str().expect("utf-8 path");
    let out = run_cryo(
        &["restore", "-D", path, "-d"],
        &[("CRYO_FAULT", "fail-restore-spawned")],
    );
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("restore with an injected failure: {e}");
    }
    assert!(
        !ip_link_exists("cryoh0"),
        "the failed restore left host end cryoh0 behind"
    );
    restore_ok(&mut wl, &img);
    wl.assert_pass("wl_netdev after a failed restore");
}

/// A dump that cannot be done fails naming the device (a bridge) or what
/// is missing (nft), and leaves the tree running as it was.
fn refused(args: &[&str], env: &[(&str, &str)], wants: &[&str]) {
    if !own_network() {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_netdev", args, &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], env);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("refused dump: {e}");
    }
    let err = stderr_of(&out);
    assert!(wants.iter().all(|w| err.contains(w)), "stderr: {err}");
    wl.assert_pass("wl_netdev after a refused dump");
}

#[test]
fn bridge_device_refused() {
    refused(
        &["--bridge", "1"],
        &[],
        &["device br0 is of kind bridge", "net namespace"],
    );
}

#[test]
fn ruleset_without_nft_refused() {
    refused(
        &[],
        &[("CRYO_NFT", "/nonexistent/nft")],
        &["nftables table", "install nftables"],
    );
}
