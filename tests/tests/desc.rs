//! Checkpoint/restore of descriptors with finer state (wl_desc): an
//! O_TMPFILE file, sparse deleted files and memfds with their holes, an
//! O_PATH symlink, a pidfd of a reaped process, a pipe's signal owner and
//! signal, flock, POSIX, OFD locks and a lease, epoll targets added as
//! numbers since closed or reused, unix sockets whose names were removed
//! or taken, and descriptors in flight (SCM_RIGHTS).

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

/// A socket that only a message in flight holds is refused, naming the
/// socket and why; the task runs on.
#[test]
fn desc_socket_in_flight_refused() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start_with(&dir, &["--flight-socket", "1"]);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with a socket in flight: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("in flight") && err.contains(&format!("task {}", wl.pid())),
        "stderr: {err}"
    );
    wl.assert_pass("descriptors after a refused dump");
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
