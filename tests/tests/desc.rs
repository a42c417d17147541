//! Checkpoint/restore of descriptors with finer state (wl_desc): an
//! O_TMPFILE file, sparse deleted files and memfds with their holes, an
//! O_PATH symlink, a pidfd of a reaped process, a pipe's signal owner and
//! signal, flock, POSIX, OFD locks and a lease, epoll targets added as
//! numbers since closed or reused, unix sockets whose names were removed
//! or taken; and descriptors in flight (SCM_RIGHTS, wl_flight).

use cryo_tests::*;

fn start(dir: &TestDir) -> (Workload, TreeGuard) {
    start_with(dir, &[])
}

fn start_with(dir: &TestDir, extra: &[&str]) -> (Workload, TreeGuard) {
    let tmp = dir.subdir("tmp");
    let mut args = vec!["--tmp", tmp.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let wl = Workload::start("wl_desc", &args, dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard)
}

#[test]
fn desc_kill_and_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    let size: u64 = std::fs::read_dir(&img)
        .expect("image dir")
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(
        size < 16 << 20,
        "the image of 96 MiB of sparse files with 12 KiB of data is {size} bytes"
    );
    assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("descriptors restored");
}

#[test]
fn desc_leave_running() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("descriptors after dump -R");
}

#[test]
fn desc_two_cycles() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    for cycle in 0..2 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("descriptors after two cycles");
}

fn start_flight(dir: &TestDir, extra: &[&str]) -> (Workload, TreeGuard) {
    let tmp = dir.subdir("tmp");
    let mut args = vec!["--tmp", tmp.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let wl = Workload::start("wl_flight", &args, dir);
    let guard = TreeGuard::new(vec![wl.pid()]);
    (wl, guard)
}

/// Descriptors in flight (wl_flight): files, a pipe end, a unix socket
/// with its own queue carrying another socket, each only held by the
/// messages, come back in their messages.
fn flight_cycle(leave_running: bool) {
    let dir = TestDir::new();
    let (mut wl, guard) = start_flight(&dir, &[]);
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    wl.assert_pass("descriptors in flight");
}

#[test]
fn flight_kill_and_restore() {
    flight_cycle(false);
}

#[test]
fn flight_leave_running() {
    flight_cycle(true);
}

/// An epoll that only a message in flight holds is refused, naming the
/// socket and why; the task runs on.
#[test]
fn flight_epoll_refused() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start_flight(&dir, &["--flight-epoll", "1"]);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with an epoll in flight: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("in flight")
            && err.contains("FILE_EPOLL")
            && err.contains(&format!("task {}", wl.pid())),
        "stderr: {err}"
    );
    wl.assert_pass("descriptors in flight after a refused dump");
}

/// A deleted file larger than --ghost-limit that still has another name:
/// refused without --link-remap; with it, kept by a link the restore
/// removes, and the restored descriptor is that very file.
#[test]
fn desc_link_remap() {
    let dir = TestDir::new();
    let (mut wl, guard) = start_with(&dir, &["--expect-linked", "1"]);
    let img = dir.subdir("img");
    let limit = ["--ghost-limit", "8192"];
    let out = dump(wl.pid(), &img, &limit, &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with --ghost-limit 8192: {e}");
    }
    assert!(
        stderr_of(&out).contains("ghost-limit"),
        "stderr: {}",
        stderr_of(&out)
    );
    dump_ok(&mut wl, &img, &[&limit[..], &["--link-remap"]].concat());
    assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("descriptors restored with --link-remap");
}
