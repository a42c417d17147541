//! IPv4 and IPv6 sockets (wl_inet): TCP listeners with their options, a
//! UDP socket bound and one connected, a TCP socket not bound; made again
//! in the holder's network namespace, checked by the workload with new
//! connections and a datagram. Each test runs in a network namespace of
//! its own (only loopback addresses). Connections without
//! --tcp-established, half-closed ones, and ones a listener has not
//! accepted from outside the tree are refused naming them; those from
//! the tree are kept, and --tcp-close restores connections closed.

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
    refused_with(args, &[], wants)
}

/// [`refused`], the dump given `extra`.
fn refused_with(args: &[&str], extra: &[&str], wants: &[&str]) {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", args, &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, extra, &[]);
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
        &["connection(s) it has not accepted yet", "--tcp-established"],
    );
}

/// A raw socket with packets queued for reading is refused naming it.
#[test]
fn raw_socket_with_packets_queued_refused() {
    refused(
        &["--raw-queued", "1"],
        &["a raw socket (protocol 1)", "bytes queued for reading"],
    );
}

/// A connection whose client has shut its side (FIN_WAIT2; the server's
/// side CLOSE_WAIT) is refused naming its state, even with
/// --tcp-established.
#[test]
fn half_closed_connection_refused() {
    refused_with(
        &["--half", "1"],
        &["--tcp-established"],
        &["in state", "only established ones are kept"],
    );
}

/// Two connections the listener has not accepted, with bytes from their
/// clients (the tree's): kept, accepted after the restore in the order
/// they came, with every byte; twice.
#[test]
fn pending_connections_kept_two_rounds() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    two_rounds(
        &["--pending", "1"],
        "waiting to be accepted",
        "wl_inet's waiting connections after two restores",
    );
}

/// wl_inet with `args`, dumped with --tcp-established and restored
/// twice, `image show` saying `shown` each time; then its verdict.
fn two_rounds(args: &[&str], shown: &str, what: &str) {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    for round in 0..2 {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_reap(&mut wl, &guard, &img, &["--tcp-established"]);
        let show = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(text.contains(shown), "image show: {text}");
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass(what);
}

/// wl_inet with `args` dumped with --tcp-established -R: its verdict.
fn leave_running(args: &[&str], what: &str) {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", args, &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["--tcp-established", "-R"]);
    wl.assert_pass(what);
}

/// With -R the waiting connections are made again at once: the tree
/// accepts them as they were.
#[test]
fn pending_connections_leave_running() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    leave_running(
        &["--pending", "1"],
        "wl_inet's waiting connections after a dump -R",
    );
}

/// A connection from the test (outside the tree) that the tree's
/// listener has not accepted: refused, left in the queue, and the
/// process accepts it after.
#[test]
fn pending_connection_from_outside_refused() {
    use std::io::Write;
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start(
        "wl_inet",
        &["--port", "7070", "--outside-pending", "1"],
        &dir,
    );
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let mut c = std::net::TcpStream::connect("127.0.0.1:7070").expect("connecting to the tree");
    c.write_all(b"hello").expect("writing to the tree");
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &["--tcp-established"], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("refused dump: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("not accepted yet") && err.contains("outside the tree"),
        "stderr: {err}"
    );
    wl.assert_pass("wl_inet after a refused dump");
}

/// --tcp-close at the dump: a connection is restored closed (not
/// connected; reads give ENOTCONN), and the rest goes on.
#[test]
fn connection_dumped_closed() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &["--connected", "1", "--closed", "1"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_reap(&mut wl, &guard, &img, &["--tcp-close"]);
    restore_ok(&mut wl, &img);
    wl.assert_pass("wl_inet with its connection closed");
}

/// --tcp-close at the restore: connections dumped with their data in
/// flight come back closed.
#[test]
fn connection_restored_closed() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_inet", &["--stream", "1", "--closed", "1"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_reap(&mut wl, &guard, &img, &["--tcp-established"]);
    let tables = || {
        let out = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .expect("nft list tables");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(tables().contains("cryo_lock_"), "no lock after the dump");
    let out = run_cryo(
        &[
            "restore",
            "-D",
            img.to_str().expect("utf-8 path"),
            "-d",
            "--tcp-close",
        ],
        &[],
    );
    wl.mark_running();
    assert_cryo_ok(&out, "cryo restore --tcp-close");
    // The connections are gone, and so is the lock their dump made.
    let left = tables();
    assert!(!left.contains("cryo_lock_"), "the lock stayed: {left}");
    wl.assert_pass("wl_inet with its connections restored closed");
}

/// Established connections of the tree (both ends in it, over IPv4 and
/// IPv6) with data in flight both ways, dumped with --tcp-established and restored twice:
/// nothing lost, nothing twice, and it goes on.
#[test]
fn established_connection_with_data_in_flight_two_rounds() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    two_rounds(
        &["--stream", "1"],
        "established (",
        "wl_inet's connection after two restores",
    );
}

/// With --tcp-established and -R, the connection leaves repair mode after
/// the dump and the tree goes on with it.
#[test]
fn established_connection_leave_running() {
    if !own_network_namespace(&["ip", "nft"]) {
        return;
    }
    leave_running(&["--stream", "1"], "wl_inet's connection after a dump -R");
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
    peer_outside("nft");
}

/// The same with the lock made by iptables and ip6tables.
#[test]
fn connection_to_a_peer_outside_the_tree_iptables_lock() {
    peer_outside("iptables");
}

/// A connection to the test, dumped with `--network-lock lock`.
fn peer_outside(lock: &str) {
    use std::io::{Read, Write};
    let tool = if lock == "iptables" {
        "iptables"
    } else {
        "nft"
    };
    if !own_network_namespace(&["ip", tool]) {
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
    dump_and_reap(
        &mut wl,
        &guard,
        &img,
        &["--tcp-established", "--network-lock", lock],
    );
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
