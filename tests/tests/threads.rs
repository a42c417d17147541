//! Checkpoint/restore scenarios of multi-threaded processes (wl_threads,
//! and wl_single with one extra thread).
//!
//! wl_threads checks every thread by itself after the restore (tid, name,
//! mask, TLS, robust list, rseq, altstack, a signal queued to one thread,
//! a futex waiter, a sleeper, spinners holding a vector register) and
//! joins them all; the scenarios assert on its verdict.

use std::time::{Duration, Instant};

use cryo_tests::cg::{cgroup_line, TestCgroup};
use cryo_tests::*;

fn threads_workload(dir: &TestDir, spinners: usize) -> Workload {
    let n = spinners.to_string();
    Workload::start("wl_threads", &["--spinners", &n], dir)
}

/// Per thread: tid, SigBlk and TracerPid, sorted by tid.
fn thread_states(pid: i32) -> Vec<(i32, String, String)> {
    let mut v: Vec<(i32, String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .map(|tid| {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                        .unwrap_or_default();
                    let field = |name: &str| {
                        status
                            .lines()
                            .find_map(|l| l.strip_prefix(&format!("{name}:")))
                            .map(|v| v.trim().to_string())
                            .unwrap_or_default()
                    };
                    (tid, field("SigBlk"), field("TracerPid"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every thread of `pid` has the mask and tracer it had, and the process
/// the mappings it had, after `what`.
fn assert_untouched(pid: i32, before: &[(i32, String, String)], maps_before: &str, what: &str) {
    assert_eq!(thread_states(pid), before, "threads changed by {what}");
    let maps_now = proc_maps(pid);
    assert!(
        maps_now == maps_before,
        "maps changed by {what}:\n{}",
        maps_diff(maps_before, &maps_now)
    );
}

fn tids(pid: i32) -> Vec<i32> {
    thread_states(pid).into_iter().map(|t| t.0).collect()
}

fn kill_and_restore(spinners: usize, extra: &[&str]) {
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, spinners);
    let pid = wl.pid();
    let before = tids(pid);
    assert_eq!(before.len(), 3 + spinners, "setup: threads {before:?}");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, extra);
    for t in &before {
        assert!(!pid_alive(*t), "thread {t} alive after a kill-mode dump");
    }
    restore_ok(&mut wl, &img);
    assert_eq!(tids(pid), before, "restored threads");
    for (tid, _, tracer) in thread_states(pid) {
        assert_eq!(tracer, "0", "restored thread {tid} is traced");
    }
    wl.assert_pass("restored multi-threaded process");
}

#[test]
fn threads_kill_and_restore() {
    kill_and_restore(1, &[]);
}

/// Four spinners on two cores, raw pages.
#[test]
fn threads_many_spinners_raw() {
    kill_and_restore(4, &["--compress", "none"]);
}

#[test]
fn threads_leave_running() {
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, 2);
    let pid = wl.pid();
    let before = thread_states(pid);
    let maps_before = proc_maps(pid);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    assert_eq!(
        wait_untraced(pid, Duration::from_secs(5)),
        Some(0),
        "still traced after dump -R"
    );
    assert_eq!(
        thread_states(pid),
        before,
        "threads, their masks or tracers changed"
    );
    let maps_after = proc_maps(pid);
    assert!(
        maps_after == maps_before,
        "maps changed by dump -R:\n{}",
        maps_diff(&maps_before, &maps_after)
    );
    // The image holds every thread.
    let pstree: Vec<String> = std::fs::read_dir(&img)
        .expect("image dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("core-"))
        .collect();
    assert_eq!(pstree.len(), before.len(), "core files: {pstree:?}");
    wl.assert_pass("multi-threaded process after dump -R");
}

/// Dump -R; the original checks itself and exits, then the image is
/// restored and checks itself again.
#[test]
fn threads_leave_running_then_restore() {
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, 1);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("original after dump -R");
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored from a leave-running image");
}

#[test]
fn threads_three_cycles() {
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, 2);
    let pid = wl.pid();
    let before = tids(pid);
    for cycle in 0..3 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        restore_ok(&mut wl, &img);
        assert_eq!(tids(pid), before, "cycle {cycle}");
    }
    wl.assert_pass("after three dump/restore cycles");
}

fn freeze_threads(parent: &str, controllers: &str, leave_running: bool) {
    let cg = TestCgroup::new(parent)
        .unwrap_or_else(|| panic!("{parent} is not mounted here: this test needs it"));
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, 2);
    let pid = wl.pid();
    cg.add(pid);
    let want = format!(":{controllers}:{}", cg.rel());
    let before = thread_states(pid);
    let img = dir.subdir("img");
    let freeze = cg.dir.to_string_lossy().into_owned();
    let mut args = vec!["--freeze-cgroup", freeze.as_str()];
    if leave_running {
        args.push("-R");
    }
    dump_ok(&mut wl, &img, &args);
    assert!(!cg.frozen(), "{} still frozen", cg.dir.display());
    if leave_running {
        assert_eq!(wait_untraced(pid, Duration::from_secs(5)), Some(0));
        assert_eq!(thread_states(pid), before, "threads changed by dump -R");
        wl.assert_pass("after a --freeze-cgroup -R dump");
        return;
    }
    restore_ok(&mut wl, &img);
    assert_eq!(
        cgroup_line(pid, controllers),
        want,
        "not back in its cgroup"
    );
    for (tid, _, _) in thread_states(pid) {
        let line =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).unwrap_or_default();
        assert!(
            line.lines().any(|l| l.ends_with(&want)),
            "thread {tid} is not in {want}: {line}"
        );
    }
    wl.assert_pass("restored after a --freeze-cgroup dump");
}

#[test]
fn threads_freeze_cgroup_v2() {
    freeze_threads("/sys/fs/cgroup/unified", "", false);
}

#[test]
fn threads_freeze_cgroup_v2_leave_running() {
    freeze_threads("/sys/fs/cgroup/unified", "", true);
}

#[test]
fn threads_freeze_cgroup_v1() {
    freeze_threads("/sys/fs/cgroup/freezer", "freezer", false);
}

/// A dump failing at each step leaves every thread as it was: untraced,
/// with its own signal mask, and the workload passes.
#[test]
fn threads_failed_dumps_leave_process_running() {
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, 2);
    let pid = wl.pid();
    let before = thread_states(pid);
    let maps_before = proc_maps(pid);
    let img = dir.subdir("img");
    for fault in [
        "fail-after-seize",
        "fail-in-parasite",
        "fail-after-parasite",
    ] {
        let out = dump(pid, &img, &[], &[("CRYO_FAULT", fault)]);
        if let Err(e) = check_cryo_failed_cleanly(&out) {
            panic!("dump with CRYO_FAULT={fault}: {e}");
        }
        assert_untouched(
            pid,
            &before,
            &maps_before,
            &format!("a dump failing at {fault}"),
        );
    }
    wl.assert_pass("after three failed dumps");
}

/// cryo SIGKILLed while its parasite runs in the leader (every other
/// thread seized, its signals blocked): the guardian puts every thread
/// back.
#[test]
fn threads_sigkill_cryo_while_parasite_runs() {
    let dir = TestDir::new();
    let mut wl = threads_workload(&dir, 2);
    let pid = wl.pid();
    let before = thread_states(pid);
    let maps_before = proc_maps(pid);
    let img = dir.subdir("img");
    kill_cryo_paused_at(pid, &img, "in-parasite", &dir);
    let start = Instant::now();
    while (thread_states(pid) != before || proc_maps(pid) != maps_before)
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_untouched(
        pid,
        &before,
        &maps_before,
        "cryo killed mid-dump (5 s later)",
    );
    wl.assert_pass("after cryo was SIGKILLed mid-dump");
}

/// wl_single with one extra thread that sleeps with every signal blocked:
/// the whole single-process self-check passes after a restore.
#[test]
fn single_with_a_thread_kill_and_restore() {
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &["--thread"]);
    let pid = wl.pid();
    let before = tids(pid);
    assert_eq!(before.len(), 2, "setup: wl_single --thread");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    restore_ok(&mut wl, &img);
    assert_eq!(tids(pid), before);
    wl.assert_pass("wl_single --thread restored");
}
