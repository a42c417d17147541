//! `--action-script` (CRIU's action scripts) on dump and restore: each
//! step runs the command with CRTOOLS_SCRIPT_ACTION (and CRTOOLS_INIT_PID
//! where it has one), in order; a script that fails stops the dump with
//! the tree running on as before.

use cryo_tests::*;

/// A script appending "STEP PID" to `log`, failing at `fail_at`.
fn script(log: &std::path::Path, fail_at: &str) -> String {
    format!(
        "echo \"$CRTOOLS_SCRIPT_ACTION ${{CRTOOLS_INIT_PID:-0}}\" >> {}; \
         [ \"$CRTOOLS_SCRIPT_ACTION\" != \"{fail_at}\" ]",
        log.display()
    )
}

fn steps(log: &std::path::Path) -> Vec<(String, i32)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (s, p) = l.split_once(' ')?;
            Some((s.to_string(), p.parse().ok()?))
        })
        .collect()
}

#[test]
fn scripts_run_at_each_step_in_order() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    let log = dir.join("steps");
    let s = script(&log, "none");
    dump_ok(&mut wl, &img, &["--action-script", &s]);
    let dumped: Vec<String> = steps(&log).into_iter().map(|(s, _)| s).collect();
    assert_eq!(dumped, ["pre-dump", "network-lock", "post-dump"]);
    std::fs::remove_file(&log).expect("the steps file");
    let img_s = img.to_str().expect("utf-8 path");
    let out = run_cryo(&["restore", "-D", img_s, "-d", "--action-script", &s], &[]);
    wl.mark_running();
    assert_cryo_ok(&out, "restore with an action script");
    wl.assert_restored();
    let restored = steps(&log);
    let names: Vec<&str> = restored.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, RESTORE_STEPS);
    assert!(
        restored.iter().all(|(_, p)| *p == pid),
        "CRTOOLS_INIT_PID is not the root's pid: {restored:?}"
    );
    wl.assert_pass("restored with action scripts");
}

/// A script failing at post-dump (the image written, the task not yet
/// killed): the dump fails, the task runs on, no image is left.
#[test]
fn failing_script_leaves_the_tree_running() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let img = dir.subdir("img");
    let log = dir.join("steps");
    let out = dump(
        wl.pid(),
        &img,
        &["--action-script", &script(&log, "post-dump")],
        &[],
    );
    assert!(!out.status.success(), "the dump succeeded");
    let err = stderr_of(&out);
    assert!(err.contains("post-dump"), "{err}");
    check_cryo_failed_cleanly(&out).expect("a clean failure");
    let told: Vec<String> = steps(&log).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        told,
        ["pre-dump", "network-lock", "post-dump", "network-unlock"]
    );
    assert!(pid_alive(wl.pid()), "the task is gone");
    assert!(
        file_names(&img).is_empty(),
        "a failed dump left {:?}",
        file_names(&img)
    );
    wl.assert_pass("after a failed action script");
}
