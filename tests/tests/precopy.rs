//! `dump --pre-copy`: private memory is copied (and compressed into the
//! pages file) while the tasks still run, tracked with asynchronous
//! userfaultfd write-protection; the stop then captures only what was
//! written since. Each workload checks its own memory after the restore:
//! `wl_bench` 32 MiB filled once, one page rewritten per step (most of
//! it is kept from the pre-copy), `wl_sweep` memory it rewrites without pause
//! (nothing settles; what is restored must still be one instant's),
//! `wl_single` every kind of mapping, `wl_tree` a tree with pages shared
//! copy-on-write.

use std::path::Path;
use std::time::Duration;

use cryo_tests::*;

/// Kill-mode dump with --pre-copy; returns the pages kept from the
/// pre-copy.
fn dump_pre_copy(dir: &TestDir, wl: &mut Workload, img: &Path) -> u64 {
    let stats = dir.join("stats.json");
    dump_ok(
        wl,
        img,
        &["--pre-copy", "--stats", stats.to_str().expect("utf-8 path")],
    );
    stats_field(&stats, "pages_precopied")
}

#[test]
fn pre_copy_keeps_unchanged_memory() {
    let dir = TestDir::new();
    // 32 MiB filled once (one page rewritten every 50 ms).
    let mut wl = Workload::start("wl_bench", &["--mib", "32", "--rewrite"], &dir);
    let img = dir.subdir("img");
    let kept = dump_pre_copy(&dir, &mut wl, &img);
    assert!(
        kept >= 32 * 256 / 2,
        "only {kept} pages were kept from the pre-copy (the 32 MiB hardly change)"
    );
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(200));
    wl.assert_pass("restored after a pre-copy dump");
}

/// The same with --compress none (raw chunks, the pre-copy's first).
#[test]
fn pre_copy_raw_image() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "16", "--rewrite"], &dir);
    let img = dir.subdir("img");
    let stats = dir.join("stats.json");
    dump_ok(
        &mut wl,
        &img,
        &[
            "--pre-copy",
            "--compress",
            "none",
            "--stats",
            stats.to_str().expect("utf-8 path"),
        ],
    );
    assert!(stats_field(&stats, "pages_precopied") > 0, "nothing kept");
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(200));
    wl.assert_pass("restored raw pre-copy image");
}

#[test]
fn pre_copy_of_memory_rewritten_all_the_time() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "16", "--threads", "2"], &dir);
    let img = dir.subdir("img");
    dump_pre_copy(&dir, &mut wl, &img);
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(500));
    wl.assert_pass("restored sweeper");
}

#[test]
fn pre_copy_single_every_mapping_kind() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let img = dir.subdir("img");
    let kept = dump_pre_copy(&dir, &mut wl, &img);
    assert!(kept > 0, "nothing was kept from the pre-copy");
    restore_ok(&mut wl, &img);
    wl.assert_pass("wl_single after a pre-copy dump");
}

#[test]
fn pre_copy_tree() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_tree", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_pre_copy(&dir, &mut wl, &img);
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "the tree outlived a kill-mode dump"
    );
    // Pages the children share copy-on-write with their parent are not
    // pre-copied: the pages files stay small (the 4 MiB buffer once).
    let pages = pages_bytes(&img);
    assert!(pages < 12 << 20, "pages files hold {pages} bytes");
    let out = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&out, "cryo image verify of a pre-copy image");
    restore_ok(&mut wl, &img);
    wl.assert_pass("tree after a pre-copy dump");
}

#[test]
fn pre_copy_with_leave_running_is_refused() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &["--pre-copy", "-R"], &[]);
    assert!(!out.status.success(), "--pre-copy -R was accepted");
    assert!(
        stderr_of(&out).contains("--pre-copy"),
        "the refusal does not name the option: {}",
        stderr_of(&out)
    );
    wl.assert_pass("task after the refused dump");
}

/// A dump that fails after the pre-copy: the task runs on untracked (no
/// userfaultfd registration left), and no image file stays behind.
#[test]
fn failed_pre_copy_dump_leaves_task_running() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "8", "--rewrite"], &dir);
    let img = dir.subdir("img");
    let out = dump(
        wl.pid(),
        &img,
        &["--pre-copy"],
        &[("CRYO_FAULT", "fail-after-precopy")],
    );
    assert!(!out.status.success(), "the dump did not fail");
    check_cryo_failed_cleanly(&out).unwrap_or_else(|e| panic!("{e}"));
    assert!(pid_alive(wl.pid()), "the task died");
    assert_eq!(tracer_pid(wl.pid()), Some(0), "the task is still traced");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", wl.pid())).unwrap_or_default();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "a userfaultfd registration is left in the task"
    );
    assert!(
        file_names(&img).is_empty(),
        "a failed dump left files: {:?}",
        file_names(&img)
    );
    wl.assert_pass("task after the failed dump");
}

/// `--cgroup` with `--pre-copy`: the pre-copy runs before the freeze.
#[test]
fn pre_copy_cgroup() {
    let cg = cryo_tests::cg::TestCgroup::new("/sys/fs/cgroup/unified").expect("cgroup2 mounted");
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "16", "--rewrite"], &dir);
    cg.add(wl.pid());
    let img = dir.subdir("img");
    let stats = dir.join("stats.json");
    let cgroup = cg.dir.to_string_lossy().into_owned();
    let out = run_cryo(
        &[
            "dump",
            "--cgroup",
            &cgroup,
            "-D",
            img.to_str().expect("utf-8 path"),
            "--pre-copy",
            "--stats",
            stats.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert_cryo_ok(&out, "cryo dump --cgroup --pre-copy");
    wl.assert_gone_after_dump();
    assert!(!cg.frozen(), "the cgroup stayed frozen");
    assert!(stats_field(&stats, "pages_precopied") > 0, "nothing kept");
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(200));
    wl.assert_pass("restored cgroup after a pre-copy dump");
}

// Adversarial scenarios: the task changes its memory map between the
// pre-copy rounds and the stop. The sweep is paced (about 0.7 s per sweep
// of 16 MiB) so that pages copied in a round are still unchanged at the
// stop and kept, next to pages rewritten, discarded, moved or mapped anew
// since. Each wl_sweep variation checks that what it finds after the
// restore is the memory of the stop, page by page.

/// Kill-mode dump with --pre-copy of wl_sweep, paced, with `more`
/// arguments; `check` looks at the image (given the pids of the tree at
/// the start), then the restored tree checks itself. Returns the pages
/// kept from the pre-copy.
fn pre_copy_variant(more: &[&str], what: &str, check: &dyn Fn(&Path, &[i32])) -> u64 {
    let dir = TestDir::new();
    // One sweep of its memory takes about two seconds: slow enough that a
    // loaded machine's dump still finds pages unwritten since its
    // pre-copy.
    let mut args = vec!["--mib", "16", "--pace", "30000"];
    args.extend_from_slice(more);
    let mut wl = Workload::start("wl_sweep", &args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let t0 = std::time::Instant::now();
    let kept = dump_pre_copy(&dir, &mut wl, &img);
    eprintln!(
        "{what}: pages kept from the pre-copy: {kept} (dump {:?})",
        t0.elapsed()
    );
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "the tree outlived a kill-mode dump"
    );
    // Children forked after the start were reparented to this test.
    reap_zombie_children();
    check(&img, guard.pids());
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass(&format!("restored {what}"));
    kept
}

fn some_kept(what: &str, more: &[&str]) {
    let kept = pre_copy_variant(more, what, &|_, _| {});
    assert!(kept > 0, "nothing was kept from the pre-copy");
}

#[test]
fn pre_copy_of_memory_moved_with_mremap() {
    some_kept("a task moving memory", &["--mremap", "512"]);
}

#[test]
fn pre_copy_of_memory_unmapped_and_mapped_anew() {
    some_kept(
        "a task unmapping and mapping memory again",
        &["--remap", "512"],
    );
}

#[test]
fn pre_copy_of_pages_discarded_then_rewritten() {
    some_kept("a task discarding and rewriting pages", &["--redo", "512"]);
}

#[test]
fn pre_copy_of_memory_changing_protections() {
    some_kept(
        "a task changing protections",
        &["--mprotect", "1024", "--protnone", "1024"],
    );
}

#[test]
fn pre_copy_of_huge_pages() {
    some_kept("a task in huge pages", &["--thp", "1"]);
}

/// Children come and go during the rounds (some may be pre-copied, then
/// end before the stop).
#[test]
fn pre_copy_of_a_forking_task() {
    some_kept("a task forking", &["--forker", "1"]);
}

/// A parent and its child sweeping the area they still partly share
/// copy-on-write.
#[test]
fn pre_copy_tree_writing_shared_pages() {
    pre_copy_variant(&["--tree", "1"], "a tree sharing pages", &|img, pids| {
        assert_eq!(pids.len(), 2, "the sweeper has no child: {pids:?}");
        let shared = in_parent_pages(img, pids[1]);
        assert!(
            shared >= 256,
            "only {shared} pages of the child were still shared with its parent"
        );
    });
}

/// All of it at once, in huge pages, with two plain sweepers.
#[test]
fn pre_copy_with_everything_at_once() {
    some_kept("a task changing its memory every way", SWEEP_EVERYTHING);
}

/// A child that ends on its own during the rounds (or just before the
/// stop): its pre-copy is dropped, the zombie is dumped as one.
#[test]
fn pre_copy_tree_child_exits_during_rounds() {
    for life in ["60", "150"] {
        pre_copy_variant(
            &["--tree", "1", "--child-life", life],
            "a tree whose child exits",
            &|_, _| {},
        );
    }
}
