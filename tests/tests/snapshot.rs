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

// Adversarial scenarios: the task changes its memory map while cryo
// copies its memory after the resume. Each wl_sweep variation checks its
// own memory as it goes (and against its cursor at the end); cryo either
// copies one instant's memory after the resume, or sees that the change
// made that impossible and dumps again with the memory copied while the
// task is stopped. Either way the dump succeeds, every task runs on
// untracked and unstopped, and the restored copy finds one instant's
// memory.

/// Every task of the tree under `root` runs: not stopped, not traced, no
/// userfaultfd registration left.
fn assert_left_running(root: i32) {
    for pid in tree_pids(root) {
        if let Some(state) = proc_state(pid) {
            assert!(
                !matches!(state, 't' | 'T'),
                "pid {pid} is left stopped ({state}) after dump -R"
            );
        }
        if let Some(t) = tracer_pid(pid) {
            assert_eq!(t, 0, "pid {pid} is still traced after dump -R");
        }
        assert_untracked(pid);
    }
}

/// Dump -R the workload, check the original goes on untouched, restore
/// and check the restored copy; returns whether cryo dumped again.
fn leave_running_survives(dir: &TestDir, wl: &mut Workload, what: &str) -> bool {
    let img = dir.subdir("img");
    let stats = dir.join("stats.json");
    let out = dump(
        wl.pid(),
        &img,
        &["-R", "--stats", stats.to_str().expect("utf-8 path")],
        &[],
    );
    assert_cryo_ok(&out, &format!("cryo dump -R of {what}"));
    let again = stderr_of(&out).contains("dumping again");
    let copied = stats_field(&stats, "pages_copied_running");
    let saved = stats_field(&stats, "pages_saved_on_write");
    eprintln!("{what}: dumped again: {again}; pages copied after the resume: {copied}, saved before a write: {saved}");
    assert!(
        again == (copied == 0),
        "a second dump ({again}) must copy nothing after the resume ({copied} pages did)"
    );
    assert_left_running(wl.pid());
    wl.assert_pass(&format!("original {what} after dump -R"));
    restore_ok(wl, &img);
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass(&format!("restored {what}"));
    again
}

fn leave_running_variant(args: &[&str], what: &str) -> bool {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", args, &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    leave_running_survives(&dir, &mut wl, what)
}

/// A sweeper whose area moves back and forth with mremap.
#[test]
fn leave_running_copy_with_mremap() {
    leave_running_variant(&["--mib", "16", "--mremap", "256"], "a task moving memory");
}

/// A sweeper that makes parts of its area read-only and writable again
/// before writing them (VMAs split and merged under write-protection).
#[test]
fn leave_running_copy_with_mprotect() {
    let again = leave_running_variant(
        &["--mib", "16", "--mprotect", "1024"],
        "a task changing protections",
    );
    assert!(!again, "mprotect alone must not make cryo dump again");
}

/// The same with PROT_NONE: cryo cannot read those pages while they are.
#[test]
fn leave_running_copy_with_mprotect_none() {
    leave_running_variant(
        &["--mib", "16", "--protnone", "1024"],
        "a task making memory inaccessible",
    );
}

/// A sweeper that unmaps its area and maps it anew at the same address.
#[test]
fn leave_running_copy_with_munmap_and_mmap() {
    leave_running_variant(
        &["--mib", "16", "--remap", "256"],
        "a task unmapping and mapping memory again",
    );
}

/// A sweeper that discards each page just before rewriting it.
#[test]
fn leave_running_copy_with_discard_then_rewrite() {
    leave_running_variant(
        &["--mib", "16", "--redo", "512"],
        "a task discarding and rewriting pages",
    );
}

/// A thread forks children that write their copy-on-write copy of the
/// sweep area and exit at once; the parent goes on being tracked. A child
/// caught at the stop is dumped too, and when it exits during the copy
/// cryo dumps again (seen in about 1 run in 10): either outcome is right,
/// the sweep checks the memory.
#[test]
fn leave_running_copy_with_forks() {
    let again = leave_running_variant(&["--mib", "16", "--forker", "1"], "a task forking");
    eprintln!("dumped again: {again}");
}

/// The sweep area in transparent huge pages: write faults split them.
#[test]
fn leave_running_copy_of_huge_pages() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "16", "--thp", "1"], &dir);
    let huge = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", wl.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(huge >= 4096, "only {huge} kB in huge pages: THP not in use");
    let again = leave_running_survives(&dir, &mut wl, "a task in huge pages");
    assert!(!again, "huge pages alone must not make cryo dump again");
}

/// A parent and its child sweep the same area, still shared copy-on-write
/// where neither wrote since the fork: both write pages they share while
/// cryo copies them.
#[test]
fn leave_running_tree_writing_shared_pages() {
    let dir = TestDir::new();
    let mut wl = Workload::start(
        "wl_sweep",
        &["--mib", "16", "--tree", "1", "--pace", "4000"],
        &dir,
    );
    let pids = tree_pids(wl.pid());
    assert_eq!(pids.len(), 2, "the sweeper has no child: {pids:?}");
    let child = pids[1];
    let _guard = TreeGuard::new(pids);
    let again = leave_running_survives(&dir, &mut wl, "a tree sharing pages");
    assert!(!again, "a tree must not make cryo dump again");
    let shared = in_parent_pages(&dir.join("img"), child);
    assert!(
        shared >= 256,
        "only {shared} pages of the child were still shared with its parent"
    );
}

/// All of it at once, in huge pages, with two plain sweepers.
#[test]
fn leave_running_copy_with_everything_at_once() {
    leave_running_variant(
        &[&["--mib", "8"], SWEEP_EVERYTHING].concat(),
        "a task changing its memory every way",
    );
}

/// A child that ends on its own while cryo copies the tree's memory:
/// its memory cannot be copied any more, so cryo dumps again (the child
/// is a zombie then, or gone), and the restored parent collects it.
#[test]
fn leave_running_tree_child_exits_during_copy() {
    let dir = TestDir::new();
    let mut wl = Workload::start(
        "wl_sweep",
        &[
            "--mib",
            "16",
            "--tree",
            "1",
            "--pace",
            "4000",
            "--child-life",
            "100",
        ],
        &dir,
    );
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    leave_running_survives(&dir, &mut wl, "a tree whose child exits");
}
