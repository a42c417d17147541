//! Tasks in namespaces of their own (wl_uts: two UTS namespaces, one
//! nested in the other's tree): made again with their names, shared by
//! the same tasks, the host's names untouched.

use cryo_tests::*;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default()
}

fn uts_cycle(leave_running: bool) {
    let host = hostname();
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_uts", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 4, "wl_uts is four processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("hostname \"cryo-uts-a\"") && shown.contains("hostname \"cryo-uts-b\""),
        "image show lists the namespaces: {shown}"
    );
    let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&verify, "image verify of an image with namespaces");
    wl.assert_pass("UTS namespaces");
    assert_eq!(hostname(), host, "the host's hostname changed");
}

#[test]
fn uts_namespaces_kill_and_restore() {
    uts_cycle(false);
}

#[test]
fn uts_namespaces_leave_running() {
    uts_cycle(true);
}

/// A task back in the host's UTS namespace under a parent in another one
/// is refused, naming it; the tree runs on.
#[test]
fn uts_back_to_host_refused() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_uts", &["--back-to-host", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a task back in the host's namespace: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("uts namespace") && err.contains("its parent"),
        "stderr: {err}"
    );
    wl.assert_pass("UTS namespaces after a refused dump");
}
