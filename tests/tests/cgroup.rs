//! Freezing a cgroup while seizing (`--freeze-cgroup`, cgroup v2 and the
//! v1 freezer), and restored tasks going back to the cgroups they were in.

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
