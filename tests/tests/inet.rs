//! IPv4 and IPv6 sockets (wl_inet): TCP listeners with their options, a
//! UDP socket bound and one connected, a TCP socket not bound; made again
//! in the holder's network namespace, checked by the workload with new
//! connections and a datagram. Each test runs in a network namespace of
//! its own (only loopback addresses). A connection, and one a listener
//! has not accepted, are refused naming them.

use std::time::Duration;

use cryo_tests::*;

#[test]
fn inet_sockets_kill_and_restore_two_rounds() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    for round in 0..2 {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_maybe_restore(&mut wl, &guard, &img, false);
        let show = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&show.stdout);
        for want in ["listening (backlog 17)", "UDP", "to [::1]:9"] {
            assert!(text.contains(want), "image show lacks {want:?}: {text}");
        }
    }
    wl.assert_pass("wl_inet after two restores");
}

#[test]
fn inet_sockets_leave_running() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, true);
    wl.assert_pass("wl_inet after a dump -R");
}

/// A dump refused naming `wants`; the process runs on as it was.
fn refused(args: &[&str], wants: &[&str]) {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", args, &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("refused dump: {e}");
    }
    let err = stderr_of(&out);
    assert!(wants.iter().all(|w| err.contains(w)), "stderr: {err}");
    std::thread::sleep(Duration::from_millis(10));
    wl.assert_pass("wl_inet after a refused dump");
}

#[test]
fn established_tcp_connection_refused() {
    refused(
        &["--connected", "1"],
        &["an established TCP connection to", "--tcp-established"],
    );
}

#[test]
fn listener_with_pending_connection_refused() {
    refused(
        &["--pending", "1"],
        &["connection(s) it has not accepted yet"],
    );
}

/// Established connections of the tree (both ends in it, over IPv4 and
/// IPv6) with data in flight both ways, dumped with --tcp-established and restored twice:
/// nothing lost, nothing twice, and it goes on.
#[test]
fn established_connection_with_data_in_flight_two_rounds() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &["--stream", "1"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    for round in 0..2 {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_reap(&mut wl, &guard, &img, &["--tcp-established"]);
        let show = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(text.contains("established ("), "image show: {text}");
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("wl_inet's connection after two restores");
}

/// With --tcp-established and -R, the connection leaves repair mode after
/// the dump and the tree goes on with it.
#[test]
fn established_connection_leave_running() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &["--stream", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["--tcp-established", "-R"]);
    wl.assert_pass("wl_inet's connection after a dump -R");
}

/// A dump that fails once the connection is in repair mode takes it out
/// again: the tree goes on with it.
#[test]
fn failed_dump_leaves_connection_working() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &["--stream", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(
        wl.pid(),
        &img,
        &["--tcp-established"],
        &[("CRYO_FAULT", "fail-step-3")],
    );
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("a dump failing with a connection in repair mode: {e}");
    }
    wl.assert_pass("wl_inet's connection after a failed dump");
}

/// A connection whose other end is the test itself, outside the tree:
/// bytes the test sends before the dump, and while the tree is away
/// (the network lock drops them, the test's kernel sends them again), all
/// reach the restored tree, and the test's side notices nothing.
#[test]
fn connection_to_a_peer_outside_the_tree() {
    use std::io::{Read, Write};
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    let pattern = |i: usize| (i * 31 % 251) as u8;
    // A little before the dump (the tree's window stays open), more while
    // it is away: sent at once, each packet would meet no socket.
    let data: Vec<u8> = (0..51_000).map(pattern).collect();
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener of the test's");
    let port = l.local_addr().expect("its address").port().to_string();
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &["--peer", &port, "--expect", "51000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let (mut c, _) = l.accept().expect("the workload connects");
    c.write_all(&data[..1000]).expect("writing before the dump");
    let img = dir.subdir("img");
    dump_and_reap(&mut wl, &guard, &img, &["--tcp-established"]);
    // While the tree is away.
    c.write_all(&data[1000..])
        .expect("writing while the tree is away");
    std::thread::sleep(Duration::from_millis(100));
    restore_ok(&mut wl, &img);
    wl.assert_pass("wl_inet's connection from outside the tree");
    let mut ok = [0u8; 2];
    c.set_read_timeout(Some(Duration::from_secs(10))).ok();
    c.read_exact(&mut ok).expect("the restored tree answers");
    assert_eq!(&ok, b"ok");
}
