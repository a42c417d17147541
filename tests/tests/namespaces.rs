//! Tasks in namespaces of their own (wl_uts: two UTS namespaces, one
//! nested in the other's tree): made again with their names, shared by
//! the same tasks, the host's names untouched. wl_pidns: two nested pid
//! namespaces, every task with its pids at every level. wl_timens: a time
//! namespace whose clocks go on from the dump's. wl_ipc: System V objects
//! of an IPC namespace with their ids and contents.

use std::time::Duration;

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

/// The init of wl_pidns's outer pid namespace (its parent's only child).
fn pidns_init(wl: &Workload) -> i32 {
    let p = wl.pid();
    std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .expect("wl_pidns has made its namespace's init")
}

fn pidns_cycle(leave_running: bool) {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_pidns", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 8, "wl_pidns is eight processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(" [1]") && shown.contains(",1]") && shown.contains("pid:["),
        "image show lists the inner pids and the pid namespaces: {shown}"
    );
    let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&verify, "image verify of an image with pid namespaces");
    wl.assert_pass("pid namespaces");
}

#[test]
fn pid_namespaces_kill_and_restore() {
    pidns_cycle(false);
}

#[test]
fn pid_namespaces_leave_running() {
    pidns_cycle(true);
}

/// A container's init dumped on its own (its parent outside the tree):
/// the restore makes its pid namespace itself, and --pidfile names it as
/// the host sees it.
#[test]
fn pid_namespace_init_as_root_with_pidfile() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_pidns", &[], &dir);
    let init = pidns_init(&wl);
    let guard = TreeGuard::new(tree_pids(init));
    let img = dir.subdir("img");
    let out = dump(init, &img, &[], &[]);
    assert_cryo_ok(&out, "cryo dump of a pid namespace's init");
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "the dumped tree did not end"
    );
    let pidfile = dir.join("restored.pid");
    let out = run_cryo(
        &[
            "restore",
            "-D",
            img.to_str().expect("utf-8 path"),
            "-d",
            "--pidfile",
            pidfile.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert_cryo_ok(&out, "cryo restore --pidfile of a pid namespace's init");
    let written = std::fs::read_to_string(&pidfile).unwrap_or_default();
    assert_eq!(written.trim(), init.to_string(), "--pidfile");
    // The parent, left running, passes SIGTERM on to the restored init.
    wl.assert_pass("a pid namespace's init restored on its own");
    assert!(
        reap_gone(&[init], Duration::from_secs(10)),
        "the restored init did not end"
    );
}

/// A task of a pid namespace dumped without the namespace's init, and one
/// whose children would go to a pid namespace none of its tasks is in,
/// are refused naming the reason; the tree runs on.
#[test]
fn pid_namespace_refusals() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_pidns", &[], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let init = pidns_init(&wl);
    let member = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<i32>().ok())
        .expect("the init has children");
    let img = dir.subdir("img");
    let out = dump(member, &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a pid namespace's member without its init: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("pid namespace")
            && err.contains("its init (pid 1 inside) is not in the dumped tree"),
        "stderr: {err}"
    );
    wl.assert_pass("pid namespaces after a refused dump");

    let dir = TestDir::new();
    let mut wl = Workload::start("wl_pidns", &["--unshare", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a task with another pid namespace for its children: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("task {}", wl.pid()))
            && err.contains("pid namespace for its children"),
        "stderr: {err}"
    );
    wl.assert_pass("pid namespaces after a refused dump");
}

fn timens_cycle(leave_running: bool) {
    let dir = TestDir::new();
    // In kill mode the children's clocks must stand still while the tree
    // is away (between the dump and the restore).
    let args: &[&str] = if leave_running {
        &[]
    } else {
        &["--expect-pause", "1"]
    };
    let mut wl = Workload::start("wl_timens", args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 3, "wl_timens is three processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("time:[") && shown.contains("monotonic +1000"),
        "image show lists the time namespace and its offsets: {shown}"
    );
    wl.assert_pass("a time namespace");
}

#[test]
fn time_namespace_kill_and_restore() {
    timens_cycle(false);
}

#[test]
fn time_namespace_leave_running() {
    timens_cycle(true);
}

fn ipc_cycle(leave_running: bool) {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_ipc", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 2, "wl_ipc is two processes");
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
    let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("ipc:[") && shown.contains("2 shared memory segment(s)"),
        "image show lists the IPC namespace's objects: {shown}"
    );
    wl.assert_pass("an IPC namespace");
}

#[test]
fn ipc_namespace_kill_and_restore() {
    ipc_cycle(false);
}

#[test]
fn ipc_namespace_leave_running() {
    ipc_cycle(true);
}

/// A POSIX message queue in the tree's IPC namespace is refused, naming
/// it; the tree runs on.
#[test]
fn ipc_namespace_posix_mqueue_refused() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_ipc", &["--mqueue", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of an IPC namespace with a POSIX message queue: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("ipc namespace") && err.contains("POSIX message queue /cryo-wl-ipc"),
        "stderr: {err}"
    );
    wl.assert_pass("an IPC namespace after a refused dump");
}
