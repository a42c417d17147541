//! Checkpoint/restore of processes that moved or unmapped their vDSO
//! (wl_vdso): the restored process finds its vDSO mappings where they
//! were, or absent, and its clock works.

use cryo_tests::*;

fn cycle(mode: &str, leave_running: bool) {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_vdso", &["--vdso", mode], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    wl.assert_pass(&format!("vDSO {mode}"));
}

#[test]
fn vdso_moved_kill_and_restore() {
    cycle("moved", false);
}

#[test]
fn vdso_moved_leave_running() {
    cycle("moved", true);
}

#[test]
fn vdso_apart_kill_and_restore() {
    cycle("apart", false);
}

#[test]
fn vdso_gone_kill_and_restore() {
    cycle("gone", false);
}

#[test]
fn vdso_gone_leave_running() {
    cycle("gone", true);
}

#[test]
fn vdso_apart_leave_running() {
    cycle("apart", true);
}
