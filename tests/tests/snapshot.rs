//! Leave-running dumps stop the task only for its state: private anonymous
//! memory is write-protected with userfaultfd and copied once the task
//! runs again, each page saved before the task's first write to it.
//! `wl_sweep` rewrites its memory without pause and checks that what it
//! finds is the memory of one instant; the stats file tells how many pages
//! were copied while it ran and how many were saved before a write.

use std::path::Path;
use std::time::Duration;

use cryo_tests::*;

/// smaps of `pid` shows no userfaultfd registration left ("uw").
fn assert_untracked(pid: i32) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    for line in smaps.lines().filter(|l| l.starts_with("VmFlags:")) {
        assert!(
            !line.split_whitespace().any(|f| f == "uw"),
            "pid {pid} still has a userfaultfd write-protect registration: {line}"
        );
    }
}

/// Dump -R while wl_sweep writes, check the original, then restore the
/// image and check the restored copy sweeps on from one instant's memory.
fn sweep_cycle(dir: &TestDir, wl: &mut Workload, img: &Path, mib: u64) {
    let stats = dir.join("stats.json");
    let stats_s = stats.to_str().expect("utf-8 path");
    dump_ok(wl, img, &["-R", "--stats", stats_s]);
    let copied = stats_field(&stats, "pages_copied_running");
    let saved = stats_field(&stats, "pages_saved_on_write");
    assert!(
        copied >= mib * 256,
        "only {copied} pages were copied after the resume (the {mib} MiB swept were not tracked)"
    );
    assert!(
        saved > 0,
        "no page was saved before a write: the sweep did not write during the copy"
    );
    assert_untracked(wl.pid());
    // The original kept sweeping through the copy without a failure.
    wl.assert_pass("original after dump -R");
    restore_ok(wl, img);
    // Many sweeps (the check covers every page twice within two).
    std::thread::sleep(Duration::from_millis(700));
    wl.assert_pass("restored copy");
}

#[test]
fn leave_running_copy_is_one_instant() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "32"], &dir);
    let img = dir.subdir("img");
    sweep_cycle(&dir, &mut wl, &img, 32);
}

#[test]
fn leave_running_copy_two_cycles() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "32"], &dir);
    for cycle in 0..2 {
        let img = dir.subdir(&format!("img{cycle}"));
        sweep_cycle(&dir, &mut wl, &img, 32);
        // The restored copy was told to stop: start the next cycle from a
        // fresh process.
        wl = Workload::start("wl_sweep", &["--mib", "32"], &dir);
    }
}

/// Three threads sweep their own areas (one written through read(2) every
/// 32 pages): faults from several threads at once, kernel-mode writes.
#[test]
fn leave_running_copy_threads() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "12", "--threads", "3"], &dir);
    let img = dir.subdir("img");
    sweep_cycle(&dir, &mut wl, &img, 36);
}

/// Memory the task discards (MADV_DONTNEED) or unmaps before cryo has
/// copied it makes a copy of one instant impossible: cryo dumps again
/// with the memory copied while the task is stopped. Either way the dump
/// succeeds, and the restored sweep finds one instant's memory.
#[test]
fn leave_running_copy_with_discarded_memory() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "16", "--discard", "4"], &dir);
    let img = dir.subdir("img");
    let stats = dir.join("stats.json");
    let out = dump(
        wl.pid(),
        &img,
        &["-R", "--stats", stats.to_str().expect("utf-8 path")],
        &[],
    );
    assert_cryo_ok(&out, "cryo dump -R of a task discarding memory");
    let again = stderr_of(&out).contains("dumping again");
    let copied = stats_field(&stats, "pages_copied_running");
    eprintln!("dumped again: {again}; pages copied after the resume: {copied}");
    assert!(
        again == (copied == 0),
        "a second dump ({again}) must copy nothing after the resume ({copied} pages did)"
    );
    wl.assert_pass("original after dump -R");
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(500));
    wl.assert_pass("restored copy");
}

/// A failure while memory is copied after the resume: the task goes on
/// untouched (no registration left, its own check passes), no image.
#[test]
fn failed_copy_after_resume_leaves_task_running() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "32"], &dir);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &["-R"], &[("CRYO_FAULT", "fail-in-copy")]);
    assert!(!out.status.success(), "dump with a failing copy succeeded");
    check_cryo_failed_cleanly(&out).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stderr_of(&out).contains("fail-in-copy"),
        "the error does not say what failed: {}",
        stderr_of(&out)
    );
    assert!(pid_alive(wl.pid()), "the task died");
    assert_eq!(tracer_pid(wl.pid()), Some(0), "the task is still traced");
    assert_untracked(wl.pid());
    assert!(
        file_names(&img).is_empty(),
        "a failed dump left files: {:?}",
        file_names(&img)
    );
    std::thread::sleep(Duration::from_millis(200));
    wl.assert_pass("task after the failed dump");
}

/// A task without the privilege for a full userfaultfd (uid 1000, no
/// capabilities, vm.unprivileged_userfaultfd=0 here): its memory is copied
/// while it is stopped, as before, and the dump is as good.
#[test]
fn leave_running_unprivileged_task_is_copied_while_stopped() {
    let unprivileged_uffd = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &["--drop-creds"]);
    let pid = wl.pid();
    let img = dir.subdir("img");
    let stats = dir.join("stats.json");
    let files = FileSnapshot::of_workload(&dir);
    dump_ok(
        &mut wl,
        &img,
        &["-R", "--stats", stats.to_str().expect("utf-8")],
    );
    let copied = stats_field(&stats, "pages_copied_running");
    if !unprivileged_uffd {
        assert_eq!(copied, 0, "an unprivileged task got a userfaultfd");
    }
    assert_untracked(pid);
    wl.assert_pass("original after dump -R");
    files.put_back();
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored copy");
}
