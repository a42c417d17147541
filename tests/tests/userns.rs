//! A container in a user namespace of its own (wl_userns): dumped as the
//! tree's root (its parent outside), restored with its uid and gid maps,
//! its ids inside, and every other namespace owned by the user namespace
//! again, checked by the container itself; in kill mode over two rounds
//! and in leave-running mode; with its pid namespace owned by the user
//! namespace too (every pid inside kept, the host's the kernel's).

use std::time::Duration;

use cryo_tests::*;

/// The container's root: the workload's only child, or the one it names
/// (made by an unprivileged process that ended since).
fn container(wl: &Workload) -> i32 {
    let p = wl.pid();
    let named = wl
        .verdict_path()
        .parent()
        .map(|d| d.join("tmp").join("container.pid"));
    if let Some(pid) = named
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| t.trim().parse().ok())
    {
        return pid;
    }
    std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .expect("wl_userns has made its container")
}

fn start(dir: &TestDir, args: &[&str]) -> Workload {
    let tmp = dir.subdir("tmp");
    let mut all = vec!["--tmp", tmp.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    Workload::start("wl_userns", &all, dir)
}

#[test]
fn user_namespace_kill_and_restore_two_rounds() {
    let dir = TestDir::new();
    let mut wl = start(&dir, &["--pidns", "0"]);
    let root = container(&wl);
    // The same pids after each restore.
    let guard = TreeGuard::new(tree_pids(root));
    for round in 0..2 {
        let img = dir.subdir(&format!("img{round}"));
        let out = dump(root, &img, &[], &[]);
        assert_cryo_ok(&out, "cryo dump of a container in a user namespace");
        assert!(
            reap_gone(guard.pids(), Duration::from_secs(10)),
            "the dumped container did not end"
        );
        let show = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(
            text.contains("uid map 0 100000 65536"),
            "image show lacks the map: {text}"
        );
        let pidfile = dir.join(&format!("restored{round}.pid"));
        let what = "cryo restore of a container in a user namespace";
        assert_eq!(
            restore_with_pidfile(&img, &pidfile, what),
            root,
            "--pidfile"
        );
    }
    // The parent, left running, passes SIGTERM on to the restored root.
    wl.assert_pass("a container in a user namespace, restored twice");
    assert!(reap_gone(&[root], Duration::from_secs(10)));
}

/// A user namespace whose maps were never written: restored unmapped,
/// its tasks with the overflow ids inside as before.
#[test]
fn unmapped_user_namespace_kill_and_restore() {
    let dir = TestDir::new();
    let mut wl = start(&dir, &["--pidns", "0", "--map", "0"]);
    let root = container(&wl);
    let guard = TreeGuard::new(tree_pids(root));
    let img = dir.subdir("img");
    let out = dump(root, &img, &[], &[]);
    assert_cryo_ok(&out, "cryo dump of an unmapped user namespace");
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    let out = restore_detached(&img);
    assert_cryo_ok(&out, "cryo restore of an unmapped user namespace");
    wl.assert_pass("an unmapped user namespace");
}

#[test]
fn user_namespace_leave_running() {
    let dir = TestDir::new();
    let mut wl = start(&dir, &["--pidns", "0"]);
    let root = container(&wl);
    let _guard = TreeGuard::new(tree_pids(root));
    let img = dir.subdir("img");
    let out = dump(root, &img, &["-R"], &[]);
    assert_cryo_ok(&out, "cryo dump -R of a container in a user namespace");
    let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&verify, "image verify");
    wl.assert_pass("a container in a user namespace after a dump -R");
}

/// A container whose pid namespace its user namespace owns (a rootless
/// container's layout, with cgroup and time namespaces of its own too),
/// one of its processes with a thread: every pid
/// and tid inside kept, the root's pid in the
/// host's namespace the kernel's (--pidfile names it), over two rounds.
#[test]
fn user_namespace_owning_its_pid_namespace_two_rounds() {
    let dir = TestDir::new();
    // With a thread, whose tid inside is kept too, and cgroup and time
    // namespaces of its own.
    let mut wl = start(&dir, &["--thread", "1", "--all", "1"]);
    let mut root = container(&wl);
    let pidfile = dir.join("tmp").join("restored.pid");
    for round in 0..2 {
        let guard = TreeGuard::new(tree_pids(root));
        let img = dir.subdir(&format!("img{round}"));
        let out = dump(root, &img, &[], &[]);
        assert_cryo_ok(&out, "cryo dump of a container owning its pid namespace");
        assert!(
            reap_gone(guard.pids(), Duration::from_secs(10)),
            "the dumped container did not end"
        );
        drop(guard);
        let what = "cryo restore of a container owning its pid namespace";
        root = restore_with_pidfile(&img, &pidfile, what);
        assert!(pid_alive(root), "the restored root {root} does not run");
    }
    let _guard = TreeGuard::new(tree_pids(root));
    // The parent passes SIGTERM on to the pid the pid file names.
    wl.assert_pass("a container owning its pid namespace, restored twice");
}

/// Threads of a process in a user namespace but in the host's pid
/// namespace are refused naming why (their host tids could not be
/// chosen from inside), and the container runs on.
#[test]
fn user_namespace_thread_outside_owned_pid_namespace_refused() {
    let dir = TestDir::new();
    let mut wl = start(&dir, &["--pidns", "0", "--thread", "1"]);
    let root = container(&wl);
    let _guard = TreeGuard::new(tree_pids(root));
    let img = dir.subdir("img");
    let out = dump(root, &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a thread in a user namespace: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("user namespace") && err.contains("2 threads"),
        "stderr: {err}"
    );
    wl.assert_pass("a container with a thread after a refused dump");
}

/// A container made by an unprivileged user (uid 1000): setgroups denied
/// and its own ids mapped only, as such a user may; restored with the
/// same maps, twice.
#[test]
fn unprivileged_user_namespace_two_rounds() {
    let dir = TestDir::new();
    let mut wl = start(&dir, &["--pidns", "0", "--unprivileged", "1"]);
    let root = container(&wl);
    let guard = TreeGuard::new(tree_pids(root));
    for round in 0..2 {
        let img = dir.subdir(&format!("img{round}"));
        let out = dump(root, &img, &[], &[]);
        assert_cryo_ok(&out, "cryo dump of an unprivileged user's container");
        assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
        let show = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(
            text.contains("uid map 0 1000 1") && text.contains("setgroups deny"),
            "image show lacks the maps: {text}"
        );
        let out = restore_detached(&img);
        assert_cryo_ok(&out, "cryo restore of an unprivileged user's container");
    }
    wl.assert_pass("an unprivileged user's container, restored twice");
}
