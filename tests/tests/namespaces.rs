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

/// Checkpoints of workload `name` (`args`), `procs` processes: a dump
/// -R, or two rounds of a dump, the tree's end and a restore (the second
/// dumps what the first restored); the first image's summary must show
/// each of `shown`, `cryo image verify` must pass on each, and so must the
/// workload's own checks at the end.
fn ns_cycle(name: &str, args: &[&str], procs: usize, leave_running: bool, shown: &[&str]) {
    let dir = TestDir::new();
    let mut wl = Workload::start(name, args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), procs, "{name} is {procs} processes");
    let rounds = if leave_running { 1 } else { 2 };
    for round in 0..rounds {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
        let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        // The first round's (a restore changes some, the time offsets).
        for want in shown.iter().filter(|_| round == 0) {
            assert!(text.contains(want), "image show lacks {want:?}: {text}");
        }
        let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
        assert_cryo_ok(&verify, &format!("image verify of {name}'s image {round}"));
    }
    wl.assert_pass(name);
}

fn uts_cycle(leave_running: bool) {
    let host = hostname();
    ns_cycle(
        "wl_uts",
        &[],
        4,
        leave_running,
        &["hostname \"cryo-uts-a\"", "hostname \"cryo-uts-b\""],
    );
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
    refused(
        wl.pid(),
        &img,
        "dump of a task back in the host's namespace",
        &["uts namespace", "its parent"],
    );
    wl.assert_pass("UTS namespaces after a refused dump");
}

/// A dump of `pid` into `img` fails cleanly (`what` it was) with each of
/// `wants` in its message.
fn refused(pid: i32, img: &std::path::Path, what: &str, wants: &[&str]) {
    let out = dump(pid, img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("{what}: {e}");
    }
    let err = stderr_of(&out);
    assert!(wants.iter().all(|w| err.contains(w)), "stderr: {err}");
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
    // Inner pids shown, the nested namespace's with two levels.
    ns_cycle("wl_pidns", &[], 8, leave_running, &[" [1]", ",1]", "pid:["]);
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
    let what = "cryo restore --pidfile of a pid namespace's init";
    assert_eq!(
        restore_with_pidfile(&img, &pidfile, what),
        init,
        "--pidfile"
    );
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
    refused(
        member,
        &img,
        "dump of a pid namespace's member without its init",
        &[
            "pid namespace",
            "its init (pid 1 inside) is not in the dumped tree",
        ],
    );
    wl.assert_pass("pid namespaces after a refused dump");

    let dir = TestDir::new();
    let mut wl = Workload::start("wl_pidns", &["--unshare", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    refused(
        wl.pid(),
        &img,
        "dump of a task with another pid namespace for its children",
        &[
            &format!("task {}", wl.pid()),
            "pid namespace for its children",
        ],
    );
    wl.assert_pass("pid namespaces after a refused dump");
}

fn timens_cycle(leave_running: bool) {
    // In kill mode the children's clocks must stand still while the tree
    // is away (between the dump and the restore).
    let args: &[&str] = if leave_running {
        &[]
    } else {
        &["--expect-pause", "1"]
    };
    ns_cycle(
        "wl_timens",
        args,
        3,
        leave_running,
        &["time:[", "monotonic +1000"],
    );
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
    ns_cycle(
        "wl_ipc",
        &[],
        2,
        leave_running,
        &["ipc:[", "2 shared memory segment(s)"],
    );
}

#[test]
fn ipc_namespace_kill_and_restore() {
    ipc_cycle(false);
}

#[test]
fn ipc_namespace_leave_running() {
    ipc_cycle(true);
}

/// A POSIX message queue of the tree's IPC namespace, with its messages
/// and a descriptor of it, in both modes.
fn mqueue_cycle(leave_running: bool) {
    ns_cycle(
        "wl_ipc",
        &["--mqueue", "1"],
        2,
        leave_running,
        &["ipc:[", "POSIX message queue(s)"],
    );
}

#[test]
fn ipc_namespace_posix_mqueue_kill_and_restore() {
    mqueue_cycle(false);
}

#[test]
fn ipc_namespace_posix_mqueue_leave_running() {
    mqueue_cycle(true);
}

/// A network namespace with only its loopback (up, another MTU), two
/// sysctls and a unix listener bound to an abstract name in it.
fn netns_cycle(leave_running: bool) {
    ns_cycle("wl_netns", &[], 2, leave_running, &["net:[", "MTU 16384"]);
}

#[test]
fn net_namespace_kill_and_restore() {
    netns_cycle(false);
}

#[test]
fn net_namespace_leave_running() {
    netns_cycle(true);
}

/// A tree across two network namespaces (the parent in the host's, its
/// child in its own): each one's abstract unix listener is bound in its
/// own namespace again.
#[test]
fn net_namespace_split_tree_kill_and_restore() {
    ns_cycle("wl_netns", &["--split", "1"], 2, false, &["net:["]);
}

/// A part of a System V segment attached (the rest unmapped) is refused
/// at the dump naming the mapping, and the tree runs on.
#[test]
fn ipc_partial_attachment_refused() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_ipc", &["--partial", "1"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    refused(
        wl.pid(),
        &img,
        "dump of a partial System V attachment",
        &["a part of System V segment", "only whole attachments"],
    );
    wl.assert_pass("System V objects after a refused dump");
}
