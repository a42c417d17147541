//! Checkpoint/restore scenarios of open files (wl_fds): one open file
//! description shared by a dup and by a child, O_APPEND and O_NONBLOCK,
//! character devices and a directory, a pipe between parent and child
//! with 10000 bytes in flight and a 256 KiB buffer, a pipe and a FIFO with
//! bytes queued. wl_fds checks every descriptor after the restore.

use cryo_tests::*;

fn start(dir: &TestDir) -> (Workload, TreeGuard) {
    let tmp = dir.subdir("tmp");
    let wl = Workload::start("wl_fds", &["--tmp", tmp.to_str().expect("utf-8 path")], dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard)
}

#[test]
fn fds_kill_and_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("open files restored");
}

/// Dump -R leaves every descriptor and the bytes in flight alone (they
/// are read without being consumed): the original passes.
#[test]
fn fds_leave_running() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("open files after dump -R");
}

#[test]
fn fds_three_cycles() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    for cycle in 0..3 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("open files after three cycles");
}

/// A deleted file (or memfd) larger than --ghost-limit is refused, naming
/// the task, the descriptor and the limit; the tree runs on.
#[test]
fn fds_ghost_limit_refuses() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &["--ghost-limit", "4"], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with --ghost-limit 4: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("ghost-limit") && err.contains(&format!("task {}", wl.pid())),
        "stderr: {err}"
    );
    wl.assert_pass("open files after a refused dump");
}

/// A datagram socket connected to a socket of this test (outside the
/// tree): refused without --ext-unix-sk, naming the flag; with it, the
/// restored socket is connected again and its next message arrives here.
#[test]
fn fds_external_dgram_peer() {
    use std::os::unix::net::UnixDatagram;
    let dir = TestDir::new();
    let path = dir.join("outside.sock");
    let ours = UnixDatagram::bind(&path).expect("bind our datagram socket");
    ours.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("read timeout");
    let tmp = dir.subdir("tmp");
    let mut wl = Workload::start(
        "wl_fds",
        &[
            "--tmp",
            tmp.to_str().expect("utf-8 path"),
            "--ext-dgram",
            path.to_str().expect("utf-8 path"),
        ],
        &dir,
    );
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let mut buf = [0u8; 64];
    let n = ours.recv(&mut buf).expect("the workload's first message");
    assert_eq!(&buf[..n], b"before");
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump without --ext-unix-sk: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("outside the dumped tree") && err.contains("--ext-unix-sk"),
        "stderr: {err}"
    );
    dump_ok(&mut wl, &img, &["--ext-unix-sk"]);
    assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("open files with an outside datagram peer");
    let n = ours
        .recv(&mut buf)
        .expect("the restored workload's message");
    assert_eq!(&buf[..n], b"after");
}
