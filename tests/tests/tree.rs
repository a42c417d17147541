//! Checkpoint/restore scenarios of process trees (wl_tree): a session
//! leader, a separate process group, zombies under live parents, orphans
//! of an exited session leader and of an exited group leader, a threaded
//! child. wl_tree checks every process's pid, parent, group and session
//! and collects its zombies' statuses after the restore; the scenarios
//! assert on its verdict, and on the shape of the tree seen from outside.

use std::time::Duration;

use cryo_tests::cg::{cgroup_line, TestCgroup};
use cryo_tests::*;

/// (pid, ppid, pgid, sid, zombie 'Z' or live 'L') of every process of the tree, by pid.
fn shape(root: i32) -> Vec<(i32, i32, i32, i32, char)> {
    let mut v: Vec<(i32, i32, i32, i32, char)> = tree_pids(root)
        .into_iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
            let n = |i: usize| rest.get(i).and_then(|x| x.parse().ok()).unwrap_or(-1);
            // Zombie or live (running and sleeping both count as live).
            let state = match rest.first()?.chars().next()? {
                'Z' => 'Z',
                _ => 'L',
            };
            Some((pid, n(1), n(2), n(3), state))
        })
        .collect();
    v.sort();
    v
}

fn start(dir: &TestDir) -> (Workload, TreeGuard) {
    let wl = Workload::start("wl_tree", &[], dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard)
}

/// After a kill-mode dump: every process of the tree is gone (the root
/// reaped by dump_ok, the others, reparented to this test, reaped here).
fn assert_tree_gone(guard: &TreeGuard) {
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "tree processes left after a kill-mode dump: {:?}",
        guard
            .pids()
            .iter()
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect::<Vec<_>>()
    );
}

fn kill_and_restore(extra: &[&str]) {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    assert!(before.len() >= 12, "setup: tree {before:?}");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, extra);
    assert_tree_gone(&guard);
    // The 4 MiB buffer every child inherited copy-on-write (incompressible)
    // is stored once, not once per process (nine of them).
    let pages = pages_bytes(&img);
    eprintln!("pages files: {pages} bytes");
    assert!(
        pages < 8 << 20,
        "pages files hold {pages} bytes: the copy-on-write buffer is stored more than once"
    );
    restore_ok(&mut wl, &img);
    assert_eq!(
        shape(root),
        before,
        "restored tree (pid, ppid, pgid, sid, state)"
    );
    wl.assert_pass("restored tree");
}

#[test]
fn tree_kill_and_restore() {
    kill_and_restore(&[]);
}

#[test]
fn tree_kill_and_restore_raw() {
    kill_and_restore(&["--compress", "none"]);
}

#[test]
fn tree_leave_running() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    assert_eq!(shape(root), before, "tree changed by dump -R");
    for (pid, ..) in &before {
        if pid_alive(*pid) {
            assert_eq!(tracer_pid(*pid), Some(0), "{pid} still traced");
        }
    }
    wl.assert_pass("tree after dump -R");
}

/// Dump -R, the original checks itself and exits; then the image is
/// restored and checks itself again.
#[test]
fn tree_leave_running_then_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("original tree after dump -R");
    assert_tree_gone(&guard);
    restore_ok(&mut wl, &img);
    assert_eq!(shape(root), before, "restored tree");
    wl.assert_pass("tree restored from a leave-running image");
}

#[test]
fn tree_three_cycles() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    for cycle in 0..3 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        assert_tree_gone(&guard);
        restore_ok(&mut wl, &img);
        assert_eq!(shape(root), before, "cycle {cycle}");
    }
    wl.assert_pass("tree after three cycles");
}

fn freeze_tree(parent: &str, controllers: &str, leave_running: bool) {
    let cg = TestCgroup::new(parent)
        .unwrap_or_else(|| panic!("{parent} is not mounted here: this test needs it"));
    let dir = TestDir::new();
    // The tree is started inside the cgroup: every task it makes is in it.
    let (mut wl, guard) = start(&dir);
    let root = wl.pid();
    for pid in tree_pids(root) {
        cg.add(pid);
    }
    let before = shape(root);
    let img = dir.subdir("img");
    let freeze = cg.dir.to_string_lossy().into_owned();
    let mut args = vec!["--freeze-cgroup", freeze.as_str()];
    if leave_running {
        args.push("-R");
    }
    dump_ok(&mut wl, &img, &args);
    assert!(!cg.frozen(), "{} still frozen", cg.dir.display());
    if leave_running {
        assert_eq!(shape(root), before);
        wl.assert_pass("tree after a --freeze-cgroup -R dump");
        return;
    }
    assert_tree_gone(&guard);
    restore_ok(&mut wl, &img);
    assert_eq!(shape(root), before);
    let want = format!(":{controllers}:{}", cg.rel());
    for (pid, .., state) in shape(root) {
        if state != 'Z' {
            assert_eq!(cgroup_line(pid, controllers), want, "task {pid}");
        }
    }
    wl.assert_pass("tree restored after a --freeze-cgroup dump");
}

#[test]
fn tree_freeze_cgroup_v2() {
    freeze_tree("/sys/fs/cgroup/unified", "", false);
}

#[test]
fn tree_freeze_cgroup_v2_leave_running() {
    freeze_tree("/sys/fs/cgroup/unified", "", true);
}

#[test]
fn tree_freeze_cgroup_v1() {
    freeze_tree("/sys/fs/cgroup/freezer", "freezer", false);
}

/// A dump failing at each step leaves the whole tree as it was.
#[test]
fn tree_failed_dumps_leave_tree_running() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    let img = dir.subdir("img");
    // The last live process of the tree fails after all the others were
    // captured (their parasites still in them).
    let last = *tree_pids(root)
        .iter()
        .rev()
        .find(|p| pid_alive(**p))
        .expect("tree pids");
    let late = format!("fail-capture-{last}");
    for fault in [
        "fail-after-seize",
        "fail-in-parasite",
        "fail-after-parasite",
        late.as_str(),
    ] {
        let out = dump(root, &img, &[], &[("CRYO_FAULT", fault)]);
        if let Err(e) = check_cryo_failed_cleanly(&out) {
            panic!("dump with CRYO_FAULT={fault}: {e}");
        }
        assert_eq!(
            shape(root),
            before,
            "tree changed by a dump failing at {fault}"
        );
        for (pid, .., state) in &before {
            if *state != 'Z' {
                assert_eq!(tracer_pid(*pid), Some(0), "{pid} traced after {fault}");
            }
        }
    }
    wl.assert_pass("tree after failed dumps");
}

/// A restore that fails half way (a process deep in the tree fails while
/// the others are being restored), and one refused because a pid of the
/// tree is taken: neither leaves anything of the tree behind.
#[test]
fn tree_failed_restores_leave_nothing() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    // The last live process of the tree, breadth first: a grandchild.
    let deep = *guard
        .pids()
        .iter()
        .rev()
        .find(|p| pid_alive(**p))
        .expect("tree pids");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert_tree_gone(&guard);
    let fault = format!("fail-restore-task-{deep}");
    let out = run_cryo(
        &["restore", "-D", img.to_str().expect("utf-8 path"), "-d"],
        &[("CRYO_FAULT", &fault)],
    );
    assert!(!out.status.success(), "restore with {fault} succeeded");
    assert!(
        stderr_of(&out).contains("injected failure"),
        "stderr: {}",
        stderr_of(&out)
    );
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "tasks of the tree left after a failed restore"
    );
    // Its helpers (stand-ins for the exited session and group leaders)
    // ended too.
    std::thread::sleep(Duration::from_millis(100));
    reap_zombie_children();

    // Take the pid of one process of the tree with a sleeper of our own.
    let holder = spawn_with_pid(deep);
    let out = restore_detached(&img);
    assert!(
        !out.status.success(),
        "restore succeeded with pid {deep} taken"
    );
    let err = stderr_of(&out);
    assert!(
        err.contains(&deep.to_string()),
        "error does not name pid {deep}: {err}"
    );
    for pid in guard.pids() {
        if *pid != deep {
            assert!(
                !pid_alive(*pid),
                "pid {pid} of the tree is running after a refused restore"
            );
        }
    }
    drop(holder);
    // The image still restores once the pid is free.
    assert!(reap_gone(&[deep], Duration::from_secs(5)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("tree restored after two failed restores");
}

/// A child process of this test with the given pid (clone3 set_tid),
/// sleeping until the guard kills it.
fn spawn_with_pid(pid: i32) -> PidGuard {
    // SAFETY: like fork() in this (multi-threaded) test process: the child
    // only calls pause in a loop, which is async-signal-safe, until it is
    // killed.
    match unsafe { cryo_engine::sys::clone3_with_pid(&[pid], libc::SIGCHLD, 0) } {
        Ok(0) => loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        },
        Ok(child) => PidGuard::new(child),
        Err(e) => panic!("clone3 set_tid {pid}: {e}"),
    }
}

/// `cryo dump --cgroup`: every process of a cgroup, here two separate
/// trees (wl_tree and wl_threads), frozen by the cgroup's freezer; the
/// restore brings both back.
fn dump_cgroup(parent: &str, controllers: &str, leave_running: bool) {
    let cg = TestCgroup::new(parent)
        .unwrap_or_else(|| panic!("{parent} is not mounted here: this test needs it"));
    let dir_a = TestDir::new();
    let dir_b = TestDir::new();
    let (mut tree, guard) = start(&dir_a);
    let mut threads = Workload::start("wl_threads", &["--spinners", "1"], &dir_b);
    let mut all = tree_pids(tree.pid());
    all.push(threads.pid());
    for pid in &all {
        cg.add(*pid);
    }
    let before = shape(tree.pid());
    let img = dir_a.subdir("img");
    let cgroup = cg.dir.to_string_lossy().into_owned();
    let mut args = vec![
        "dump",
        "--cgroup",
        cgroup.as_str(),
        "-D",
        img.to_str().expect("utf-8 path"),
    ];
    if leave_running {
        args.push("-R");
    }
    let out = run_cryo(&args, &[]);
    assert_cryo_ok(&out, "cryo dump --cgroup");
    assert!(!cg.frozen(), "{} still frozen", cg.dir.display());
    if leave_running {
        assert_eq!(shape(tree.pid()), before);
        tree.assert_pass("wl_tree after dump --cgroup -R");
        threads.assert_pass("wl_threads after dump --cgroup -R");
        return;
    }
    tree.assert_gone_after_dump();
    threads.assert_gone_after_dump();
    assert_tree_gone(&guard);
    let out = restore_detached(&img);
    tree.mark_running();
    threads.mark_running();
    assert_cryo_ok(&out, "cryo restore of a cgroup dump");
    tree.assert_restored();
    threads.assert_restored();
    assert_eq!(shape(tree.pid()), before, "restored tree");
    let want = format!(":{controllers}:{}", cg.rel());
    assert_eq!(cgroup_line(threads.pid(), controllers), want);
    tree.assert_pass("wl_tree restored from a cgroup dump");
    threads.assert_pass("wl_threads restored from a cgroup dump");
}

#[test]
fn cgroup_dump_two_trees_v2() {
    dump_cgroup("/sys/fs/cgroup/unified", "", false);
}

#[test]
fn cgroup_dump_two_trees_v1() {
    dump_cgroup("/sys/fs/cgroup/freezer", "freezer", false);
}

#[test]
fn cgroup_dump_two_trees_leave_running() {
    dump_cgroup("/sys/fs/cgroup/unified", "", true);
}

#[test]
fn cgroup_dump_two_trees_v1_leave_running() {
    dump_cgroup("/sys/fs/cgroup/freezer", "freezer", true);
}

/// Three `dump --cgroup` / restore cycles in a row of a tree (the
/// restored tasks are back in the cgroup, so the next dump finds them).
#[test]
fn cgroup_dump_three_cycles() {
    let cg = TestCgroup::new("/sys/fs/cgroup/unified").expect("cgroup2 mounted");
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    for pid in tree_pids(wl.pid()) {
        cg.add(pid);
    }
    let before = shape(wl.pid());
    let cgroup = cg.dir.to_string_lossy().into_owned();
    for cycle in 0..3 {
        let img = dir.subdir(&format!("img-{cycle}"));
        let out = run_cryo(
            &[
                "dump",
                "--cgroup",
                &cgroup,
                "-D",
                img.to_str().expect("utf-8 path"),
            ],
            &[],
        );
        assert_cryo_ok(&out, &format!("cycle {cycle}: cryo dump --cgroup"));
        wl.assert_gone_after_dump();
        assert_tree_gone(&guard);
        restore_ok(&mut wl, &img);
        assert_eq!(shape(wl.pid()), before, "cycle {cycle}");
    }
    wl.assert_pass("tree after three cgroup dump cycles");
}

/// The pids of every process (and thread) in an image.
fn image_pids(img: &std::path::Path) -> Vec<i32> {
    let mut r =
        cryo_image::ImageReader::open(img, cryo_image::PSTREE_FILE, cryo_image::Kind::Pstree)
            .expect("pstree.img");
    let mut out = Vec::new();
    while let Some(e) = r
        .next::<cryo_image::proto::PstreeEntry>()
        .expect("pstree record")
    {
        out.push(e.pid as i32);
        out.extend(e.threads.iter().map(|t| *t as i32));
    }
    out
}

/// A process forking without pause while it is dumped: every dump either
/// captures a consistent tree (children mid-sleep and zombies included),
/// which restores and collects every child with its own exit code, or
/// fails cleanly and leaves the process running.
#[test]
fn tree_that_keeps_forking() {
    for round in 0..3 {
        let dir = TestDir::new();
        let mut wl = Workload::start("wl_forker", &[], &dir);
        let pid = wl.pid();
        let img = dir.subdir("img");
        let out = dump(pid, &img, &[], &[]);
        if !out.status.success() {
            if let Err(e) = check_cryo_failed_cleanly(&out) {
                panic!("round {round}: {e}");
            }
            eprintln!(
                "round {round}: the dump failed cleanly: {}",
                stderr_of(&out)
            );
            wl.assert_pass("forker after a failed dump");
            continue;
        }
        wl.assert_gone_after_dump();
        let pids = image_pids(&img);
        eprintln!("round {round}: dumped {} tasks", pids.len());
        assert!(
            reap_gone(&pids, Duration::from_secs(10)),
            "round {round}: dumped tasks still there"
        );
        restore_ok(&mut wl, &img);
        wl.assert_pass(&format!("forker restored (round {round})"));
    }
}

/// cryo SIGKILLed while its parasite runs in the root of a tree (every
/// other task seized, its signals blocked): the guardian puts every task
/// of every process back.
#[test]
fn tree_sigkill_cryo_while_parasite_runs() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    let masks = |root: i32| -> Vec<(i32, Option<String>, Option<i32>)> {
        tree_pids(root)
            .into_iter()
            .filter(|p| pid_alive(*p))
            .map(|p| (p, proc_status_field(p, "SigBlk"), tracer_pid(p)))
            .collect()
    };
    let masks_before = masks(root);
    let img = dir.subdir("img");
    kill_cryo_paused_at(root, &img, "in-parasite", &dir);
    let t0 = std::time::Instant::now();
    while masks(root) != masks_before && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        masks(root),
        masks_before,
        "tasks not put back after cryo was killed"
    );
    assert_eq!(shape(root), before);
    wl.assert_pass("tree after cryo was SIGKILLed mid-dump");
}

/// A dump under --freeze-cgroup failing in the parasite of the last
/// process leaves the cgroup thawed and the whole tree as it was.
#[test]
fn tree_failed_dump_under_freezer_thaws() {
    let cg = TestCgroup::new("/sys/fs/cgroup/unified").expect("cgroup2 mounted");
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir);
    let root = wl.pid();
    for pid in tree_pids(root) {
        cg.add(pid);
    }
    let before = shape(root);
    let last = *tree_pids(root)
        .iter()
        .rev()
        .find(|p| pid_alive(**p))
        .expect("tree pids");
    let img = dir.subdir("img");
    let freeze = cg.dir.to_string_lossy().into_owned();
    let fault = format!("fail-capture-{last}");
    let out = dump(
        root,
        &img,
        &["--freeze-cgroup", &freeze],
        &[("CRYO_FAULT", &fault)],
    );
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with {fault}: {e}");
    }
    assert!(!cg.frozen(), "{} left frozen", cg.dir.display());
    assert_eq!(shape(root), before);
    wl.assert_pass("tree after a failed dump under the freezer");
}

/// Stopped children of a tree (SIGSTOP to the threaded child, a whole
/// thread group, and to one other): dump -R leaves them stopped, a
/// kill-mode dump restores them stopped (the rest running), and after
/// SIGCONT the tree passes its own checks.
#[test]
fn tree_with_stopped_children() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir);
    let root = wl.pid();
    let before = shape(root);
    let threads = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let live: Vec<i32> = before
        .iter()
        .filter(|s| s.0 != root && s.4 == 'L')
        .map(|s| s.0)
        .collect();
    let mut stopped: Vec<i32> = live.iter().copied().filter(|&p| threads(p) > 1).collect();
    assert!(
        !stopped.is_empty(),
        "setup: no threaded child in {before:?}"
    );
    if let Some(&other) = live.iter().find(|p| !stopped.contains(p)) {
        stopped.push(other);
    }
    let signal = |sig: i32| {
        for &p in &stopped {
            // SAFETY: kill by the explicit pid of a process of the tree
            // this test started.
            assert_eq!(unsafe { libc::kill(p, sig) }, 0, "kill({p}, {sig})");
        }
    };
    let states = || -> Vec<Option<char>> {
        // Give a stop or a continue time to take effect.
        std::thread::sleep(Duration::from_millis(200));
        stopped.iter().map(|&p| proc_state(p)).collect()
    };
    let all_stopped = vec![Some('T'); stopped.len()];
    signal(libc::SIGSTOP);
    assert_eq!(states(), all_stopped, "setup: SIGSTOP to {stopped:?}");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    assert_eq!(states(), all_stopped, "{stopped:?} after dump -R");
    let _ = std::fs::remove_dir_all(&img);
    dump_ok(&mut wl, &img, &[]);
    assert_tree_gone(&guard);
    restore_ok(&mut wl, &img);
    assert_eq!(states(), all_stopped, "{stopped:?} after the restore");
    for &(pid, ..) in &before {
        if !stopped.contains(&pid) && pid_alive(pid) {
            assert_ne!(proc_state(pid), Some('T'), "{pid} was restored stopped");
        }
    }
    signal(libc::SIGCONT);
    assert!(
        states().iter().all(|s| *s != Some('T')),
        "{stopped:?} still stopped after SIGCONT"
    );
    wl.assert_pass("restored tree with stopped children");
}
