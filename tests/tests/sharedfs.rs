//! A parent and child that share their filesystem information
//! (clone CLONE_FS, wl_fs): after a restore a chdir or umask by one is
//! seen by the other.

use cryo_tests::*;

fn cycle(leave_running: bool, chroot: bool) {
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let mut args = vec!["--tmp", tmp.to_str().expect("utf-8 path")];
    if chroot {
        args.extend(["--chroot", "1"]);
    }
    let mut wl = Workload::start("wl_fs", &args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 2, "wl_fs is two processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    wl.assert_pass("filesystem information shared by clone(CLONE_FS)");
}

#[test]
fn shared_fs_kill_and_restore() {
    cycle(false, false);
}

#[test]
fn shared_fs_leave_running() {
    cycle(true, false);
}

/// The same two chrooted: the root is shared again too (the first task
/// enters it once the other has opened every path of cryo's).
#[test]
fn shared_fs_chrooted_kill_and_restore() {
    cycle(false, true);
}

#[test]
fn shared_fs_chrooted_leave_running() {
    cycle(true, true);
}

fn table_cycle(leave_running: bool) {
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let mut wl = Workload::start(
        "wl_table",
        &["--tmp", tmp.to_str().expect("utf-8 path")],
        &dir,
    );
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 4, "wl_table is four processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    wl.assert_pass("a descriptor table shared by clone(CLONE_FILES)");
}

/// Three processes with one descriptor table (clone CLONE_FILES, a chain
/// of two) and a forked one with a copy: after a restore a descriptor one
/// opens or closes is opened or closed for the others.
#[test]
fn shared_table_kill_and_restore() {
    table_cycle(false);
}

#[test]
fn shared_table_leave_running() {
    table_cycle(true);
}

/// A table shared by a process and its grandchild but not by the child
/// between them (it unshared) is refused, naming both; they run on.
#[test]
fn shared_table_not_through_parents_refused() {
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let mut wl = Workload::start(
        "wl_table",
        &[
            "--tmp",
            tmp.to_str().expect("utf-8 path"),
            "--unshared-middle",
            "1",
        ],
        &dir,
    );
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a table shared past a parent: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("share one descriptor table") && err.contains(&wl.pid().to_string()),
        "stderr: {err}"
    );
    wl.assert_pass("a shared table after a refused dump");
}
