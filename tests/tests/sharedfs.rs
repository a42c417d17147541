//! A parent and child that share their filesystem information
//! (clone CLONE_FS, wl_fs): after a restore a chdir or umask by one is
//! seen by the other.

use cryo_tests::*;

fn cycle(leave_running: bool) {
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let mut wl = Workload::start("wl_fs", &["--tmp", tmp.to_str().expect("utf-8 path")], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 2, "wl_fs is two processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    wl.assert_pass("filesystem information shared by clone(CLONE_FS)");
}

#[test]
fn shared_fs_kill_and_restore() {
    cycle(false);
}

#[test]
fn shared_fs_leave_running() {
    cycle(true);
}
