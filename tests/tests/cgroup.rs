//! Freezing a cgroup while seizing (`--freeze-cgroup`, cgroup v2 and the
//! v1 freezer), restored tasks going back to the cgroups they were in, and
//! cgroups removed after the dump made again with their limits
//! (`--manage-cgroups`).

use cryo_tests::cg::{cgroup_line, TestCgroup};
use cryo_tests::*;

fn freeze_dump_restore(parent: &str, controllers: &str, leave_running: bool) {
    let Some(cg) = TestCgroup::new(parent) else {
        panic!("{parent} is not mounted here: this test needs that cgroup hierarchy");
    };
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    cg.add(pid);
    let want = format!(":{controllers}:{}", cg.rel());
    assert_eq!(cgroup_line(pid, controllers), want);
    let img = dir.subdir("img");
    let freeze = cg.dir.to_string_lossy().into_owned();
    let mut args = vec!["--freeze-cgroup", freeze.as_str()];
    if leave_running {
        args.push("-R");
    }
    dump_ok(&mut wl, &img, &args);
    assert!(
        !cg.frozen(),
        "{} still frozen after the dump",
        cg.dir.display()
    );
    if leave_running {
        assert_eq!(tracer_pid(pid), Some(0), "still traced after dump -R");
        wl.assert_pass("original after a --freeze-cgroup -R dump");
        return;
    }
    // The image shows where the task was.
    let show = run_cryo(
        &["image", "show", "--json", img.to_str().expect("utf-8 path")],
        &[],
    );
    assert_cryo_ok(&show, "cryo image show --json");
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains(&cg.rel()),
        "image show --json lacks {}: {text}",
        cg.rel()
    );
    restore_ok(&mut wl, &img);
    assert_eq!(
        cgroup_line(pid, controllers),
        want,
        "restored task is not back in its cgroup"
    );
    wl.assert_pass("restored after a --freeze-cgroup dump");
}

#[test]
fn freeze_cgroup_v2_kill_and_restore() {
    freeze_dump_restore("/sys/fs/cgroup/unified", "", false);
}

#[test]
fn freeze_cgroup_v2_leave_running() {
    freeze_dump_restore("/sys/fs/cgroup/unified", "", true);
}

#[test]
fn freeze_cgroup_v1_kill_and_restore() {
    freeze_dump_restore("/sys/fs/cgroup/freezer", "freezer", false);
}

#[test]
fn freeze_cgroup_v1_leave_running() {
    freeze_dump_restore("/sys/fs/cgroup/freezer", "freezer", true);
}

/// A task that is not in the cgroup named by --freeze-cgroup is refused
/// and left running, and the cgroup is thawed.
#[test]
fn freeze_cgroup_refuses_task_outside() {
    let cg = TestCgroup::new("/sys/fs/cgroup/unified").expect("cgroup2 mounted");
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let img = dir.subdir("img");
    let freeze = cg.dir.to_string_lossy().into_owned();
    let out = dump(wl.pid(), &img, &["--freeze-cgroup", &freeze], &[]);
    assert!(
        !out.status.success(),
        "dump of a task outside the cgroup succeeded"
    );
    assert!(
        stderr_of(&out).contains("not in cgroup"),
        "stderr: {}",
        stderr_of(&out)
    );
    assert!(!cg.frozen());
    assert_eq!(tracer_pid(wl.pid()), Some(0));
    wl.assert_pass("task outside the frozen cgroup");
}

/// A task's test cgroups: v1 memory (a memory limit), v1 pids (a pids
/// limit) and a cgroup2 one, with the task in all three.
struct Limited {
    mem: TestCgroup,
    pids: TestCgroup,
    v2: TestCgroup,
}

const MEM_LIMIT: &str = "268435456";
const PIDS_LIMIT: &str = "77";

impl Limited {
    fn new(pid: i32) -> Limited {
        let (Some(mem), Some(pids), Some(v2)) = (
            TestCgroup::new("/sys/fs/cgroup/memory"),
            TestCgroup::new("/sys/fs/cgroup/pids"),
            TestCgroup::new("/sys/fs/cgroup/unified"),
        ) else {
            panic!("this test needs the v1 memory and pids hierarchies and cgroup2 mounted");
        };
        std::fs::write(mem.dir.join("memory.limit_in_bytes"), MEM_LIMIT).expect("memory limit");
        std::fs::write(pids.dir.join("pids.max"), PIDS_LIMIT).expect("pids limit");
        for cg in [&mem, &pids, &v2] {
            cg.add(pid);
        }
        Limited { mem, pids, v2 }
    }

    fn lines(&self) -> [String; 3] {
        [
            format!(":memory:{}", self.mem.rel()),
            format!(":pids:{}", self.pids.rel()),
            format!("::{}", self.v2.rel()),
        ]
    }

    fn remove(&self) {
        for cg in [&self.mem, &self.pids, &self.v2] {
            std::fs::remove_dir(&cg.dir)
                .unwrap_or_else(|e| panic!("rmdir {}: {e}", cg.dir.display()));
        }
    }

    fn limits(&self) -> (String, String) {
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(p)
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        (
            read(self.mem.dir.join("memory.limit_in_bytes")),
            read(self.pids.dir.join("pids.max")),
        )
    }
}

/// A workload in [`Limited`] cgroups, dumped in kill mode (the test
/// directory, the workload, its cgroups and the image).
fn dumped_in_limited() -> (TestDir, Workload, Limited, std::path::PathBuf) {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let cgs = Limited::new(wl.pid());
    assert_eq!(memberships(wl.pid()), cgs.lines());
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    (dir, wl, cgs, img)
}

fn memberships(pid: i32) -> [String; 3] {
    [
        cgroup_line(pid, "memory"),
        cgroup_line(pid, "pids"),
        cgroup_line(pid, ""),
    ]
}

/// The cgroups of a dumped task, removed after the dump, are made again
/// by the restore with their limits and the task put back in them; a
/// restore that fails after making them removes them again.
#[test]
fn cgroups_removed_after_the_dump_are_made_again() {
    let (_dir, mut wl, cgs, img) = dumped_in_limited();
    let pid = wl.pid();
    let show = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains(&format!("memory.limit_in_bytes={MEM_LIMIT}"))
            && text.contains(&format!("pids.max={PIDS_LIMIT}")),
        "image show lists the cgroups' limits: {text}"
    );
    let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&verify, "image verify of an image with cgroups.img");
    cgs.remove();
    // A restore failing in the task, once the cgroups were made.
    let fault = format!("fail-restore-task-{pid}");
    let out = run_cryo(
        &["restore", "-D", img.to_str().expect("utf-8 path"), "-d"],
        &[("CRYO_FAULT", &fault)],
    );
    assert!(!out.status.success(), "the restore with a fault succeeded");
    reap_zombie_children();
    for cg in [&cgs.mem, &cgs.pids, &cgs.v2] {
        assert!(
            !cg.dir.exists(),
            "the failed restore left cgroup {} behind",
            cg.dir.display()
        );
    }
    restore_ok(&mut wl, &img);
    assert_eq!(memberships(pid), cgs.lines(), "not back in its cgroups");
    assert_eq!(
        cgs.limits(),
        (MEM_LIMIT.to_string(), PIDS_LIMIT.to_string()),
        "the cgroups made again lack their limits"
    );
    wl.assert_pass("restored into cgroups made again");
}

/// A cgroup that exists at restore with other limits than at the dump:
/// `--manage-cgroups strict` refuses it (nothing is left running), the
/// default (soft) restores into it as it is and says what differs.
#[test]
fn cgroups_with_other_limits_strict_and_soft() {
    let (_dir, mut wl, cgs, img) = dumped_in_limited();
    let pid = wl.pid();
    std::fs::write(cgs.pids.dir.join("pids.max"), "50").expect("pids limit");
    let img_s = img.to_str().expect("utf-8 path");
    let out = run_cryo(
        &["restore", "-D", img_s, "-d", "--manage-cgroups", "strict"],
        &[],
    );
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("restore --manage-cgroups strict into a changed cgroup: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("exists with other settings") && err.contains("pids.max"),
        "stderr: {err}"
    );
    assert!(!pid_alive(pid), "the refused restore left task {pid}");
    let out = run_cryo(&["restore", "-D", img_s, "-d"], &[]);
    wl.mark_running();
    assert_cryo_ok(&out, "restore (soft) into a changed cgroup");
    assert!(
        stderr_of(&out).contains("left as they are"),
        "soft mode says what differs: {}",
        stderr_of(&out)
    );
    wl.assert_restored();
    assert_eq!(memberships(pid), cgs.lines());
    assert_eq!(cgs.limits().1, "50", "soft mode changed an existing cgroup");
    wl.assert_pass("restored into a changed cgroup");
}

/// `--cgroup-root`: the task's cgroups go under another cgroup, made in
/// every hierarchy it was in, with the limits its own cgroups had.
#[test]
fn cgroups_restored_under_another_root() {
    let (_dir, mut wl, cgs, img) = dumped_in_limited();
    let pid = wl.pid();
    let name = format!("cryo-test-root-{}-{pid}", std::process::id());
    let root = format!("/{name}");
    let out = run_cryo(
        &[
            "restore",
            "-D",
            img.to_str().expect("utf-8 path"),
            "-d",
            "--cgroup-root",
            &root,
        ],
        &[],
    );
    wl.mark_running();
    assert_cryo_ok(&out, "restore --cgroup-root");
    wl.assert_restored();
    let got = memberships(pid);
    let read = |h: &str, f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{h}/{name}/{f}"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let limits = (
        read("memory", "memory.limit_in_bytes"),
        read("pids", "pids.max"),
    );
    wl.assert_pass("restored under another cgroup root");
    // Every hierarchy's new cgroup, once the task is gone.
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup mounts")
        .flatten()
    {
        let d = h.path().join(&name);
        for _ in 0..50 {
            if !d.exists() || std::fs::remove_dir(&d).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert_eq!(
        got,
        [
            format!(":memory:{root}"),
            format!(":pids:{root}"),
            format!("::{root}")
        ],
        "not in the cgroups under the new root"
    );
    assert_eq!(limits, (MEM_LIMIT.to_string(), PIDS_LIMIT.to_string()));
    drop(cgs);
}

/// A cgroup made for a test below another (removed first).
struct Child(std::path::PathBuf);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// wl_cgns's cgroup namespace is rooted at the test's cgroup again, and
/// its tasks are in its child `inner`, as they see it and as cryo does.
fn cgns_cycle(leave_running: bool) {
    let cg = TestCgroup::new("/sys/fs/cgroup/unified").expect("cgroup2 mounted");
    let inner = Child(cg.dir.join("inner"));
    std::fs::create_dir(&inner.0).expect("mkdir inner");
    let dir = TestDir::new();
    let cg_s = cg.dir.to_str().expect("utf-8 path");
    let mut wl = Workload::start("wl_cgns", &["--cgroup", cg_s], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 2, "wl_cgns is two processes");
    // Two rounds in kill mode: the second dumps what the first restored.
    for round in 0..if leave_running { 1 } else { 2 } {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
        let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("cgroup:["),
            "image show lacks the cgroup namespace"
        );
        let seen =
            std::fs::read_to_string(format!("/proc/{}/cgroup", wl.pid())).unwrap_or_default();
        let want = format!("0::{}/inner", cg.rel());
        assert!(
            seen.lines().any(|l| l == want),
            "cryo sees {seen:?}, not {want}"
        );
    }
    wl.assert_pass("wl_cgns");
}

#[test]
fn cgroup_namespace_kill_and_restore() {
    cgns_cycle(false);
}

#[test]
fn cgroup_namespace_leave_running() {
    cgns_cycle(true);
}

/// A task moved into the cgroup while `--cgroup` has it frozen and walks
/// it: the walk starts again and the image has it too.
#[test]
fn cgroup_dump_catches_a_task_moved_in_during_the_walk() {
    let cg = TestCgroup::new("/sys/fs/cgroup/unified").expect("cgroup2 mounted");
    let (dir_a, dir_b) = (TestDir::new(), TestDir::new());
    let mut a = Workload::single("nanosleep", &dir_a);
    let mut b = Workload::single("nanosleep", &dir_b);
    cg.add(a.pid());
    let img = dir_a.subdir("img");
    let flag = dir_a.join("held");
    let fault = format!("hold-freeze-walked:{}", flag.display());
    let cg_s = cg.dir.to_str().expect("utf-8 path");
    let img_s = img.to_str().expect("utf-8 path");
    let mut run = spawn_cryo(
        &["dump", "--cgroup", cg_s, "-D", img_s, "-R"],
        &[("CRYO_FAULT", &fault)],
    );
    let start = std::time::Instant::now();
    while !flag.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30) && pid_alive(run.pid()),
            "cryo did not get to the walked cgroup: {}",
            run.stderr_so_far()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    cg.add(b.pid());
    std::fs::remove_file(&flag).expect("let cryo go on");
    let out = run
        .wait_timeout(std::time::Duration::from_secs(60))
        .expect("cryo dump ended");
    assert_cryo_ok(&out, "cryo dump --cgroup with a task moved in");
    assert!(
        stderr_of(&out).contains("walking it again"),
        "stderr: {}",
        stderr_of(&out)
    );
    let show = run_cryo(&["image", "show", img_s], &[]);
    let text = String::from_utf8_lossy(&show.stdout);
    for pid in [a.pid(), b.pid()] {
        assert!(text.contains(&pid.to_string()), "image lacks {pid}: {text}");
    }
    assert!(!cg.frozen(), "the cgroup is still frozen");
    a.assert_pass("the first task after the dump");
    b.assert_pass("the task moved in after the dump");
}
