//! Checkpoint/restore of a process under chroot() (wl_root): its root is
//! the same directory after the restore, or, when it had been removed, a
//! directory made again and removed again.

use cryo_tests::*;

fn cycle(gone: bool, leave_running: bool) {
    let dir = TestDir::new();
    let jail = dir.join("jail");
    let mut args = vec!["--jail", jail.to_str().expect("utf-8 path")];
    if gone {
        args.extend(["--gone", "1"]);
    }
    let mut wl = Workload::start("wl_root", &args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    if gone {
        assert!(
            !jail.exists(),
            "the remade root {} was left behind",
            jail.display()
        );
    }
    wl.assert_pass(&format!("chroot (root removed: {gone})"));
}

#[test]
fn chroot_kill_and_restore() {
    cycle(false, false);
}

#[test]
fn chroot_leave_running() {
    cycle(false, true);
}

#[test]
fn chroot_removed_root_kill_and_restore() {
    cycle(true, false);
}

#[test]
fn chroot_removed_root_leave_running() {
    cycle(true, true);
}
