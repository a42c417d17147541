//! Incremental dumps: `cryo pre-dump` copies a running tree's memory and
//! leaves a holder keeping the tracking of what it writes; `cryo dump
//! --prev-images-dir` then stores only the pages written since and refers
//! to the pre-dump for the rest, and the restore reads through the chain.
//! `wl_sweep`, paced, rewrites its memory all the time and checks after
//! the restore that it is one instant's; `wl_bench` fills memory once and
//! checks it whole.

use std::path::Path;
use std::time::Duration;

use cryo_tests::*;

fn pre_dump(pid: i32, img: &Path, extra: &[&str]) {
    let pid_s = pid.to_string();
    let mut args = vec![
        "pre-dump",
        "-t",
        &pid_s,
        "-D",
        img.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let out = run_cryo(&args, &[]);
    assert_cryo_ok(&out, "cryo pre-dump");
}

/// The holder a pre-dump left in `img`, killed (by the pid it wrote) if
/// it is still there, so that no test leaves one behind.
struct Holder(std::path::PathBuf);

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("track.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill takes integers; the pid is our holder's.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A dump of `wl` into `img` against `parent`; returns the pages it left
/// to the parent image.
fn dump_against(dir: &TestDir, wl: &mut Workload, img: &Path, parent: &str, extra: &[&str]) -> u64 {
    let stats = dir.join("stats.json");
    let mut args = vec![
        "--prev-images-dir",
        parent,
        "--stats",
        stats.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    dump_ok(wl, img, &args);
    stats_field(&stats, "pages_in_parent_image")
}

/// pre-dump, then a kill-mode dump against it: most of the 32 MiB come
/// from the pre-dump, the restored memory is whole.
#[test]
fn pre_dump_then_dump() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "32", "--rewrite"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let pre = dir.subdir("pre");
    let _holder = Holder(pre.clone());
    pre_dump(wl.pid(), &pre, &[]);
    assert!(pid_alive(wl.pid()), "the pre-dump stopped the tree");
    let img = dir.subdir("img");
    let kept = dump_against(&dir, &mut wl, &img, "../pre", &[]);
    assert!(
        kept >= 32 * 256 / 2,
        "only {kept} pages were left to the pre-dump (the 32 MiB hardly change)"
    );
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&verify, "cryo image verify of the incremental image");
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(200));
    wl.assert_pass("restored from a dump against a pre-dump");
}

/// A chain: pre-dump, pre-dump against it, dump against that, of memory
/// rewritten all the time (paced): what is restored is one instant's.
#[test]
fn chain_of_pre_dumps_of_memory_rewritten_all_the_time() {
    let dir = TestDir::new();
    // 4 MiB, one sweep in about half a second: the first sweep is over
    // before the first pre-dump, so pages are written again between the
    // images (a stale page from a parent breaks the sweep's check).
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let (p1, p2) = (dir.subdir("p1"), dir.subdir("p2"));
    let _holders = (Holder(p1.clone()), Holder(p2.clone()));
    std::thread::sleep(Duration::from_millis(800));
    pre_dump(wl.pid(), &p1, &[]);
    std::thread::sleep(Duration::from_millis(300));
    pre_dump(wl.pid(), &p2, &["--prev-images-dir", "../p1"]);
    std::thread::sleep(Duration::from_millis(300));
    let img = dir.subdir("img");
    let kept = dump_against(&dir, &mut wl, &img, "../p2", &[]);
    eprintln!("pages left to the parent images: {kept}");
    assert!(kept > 0, "nothing was left to the parent images");
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass("restored through a chain of two pre-dumps");
}

/// Without the tracking (its holder killed) the dump compares each page
/// with the parent's: the unchanged ones are left to it, the ones the
/// workload rewrote meanwhile are stored, and the restore is whole.
#[test]
fn dump_without_tracking_compares_contents() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "8", "--rewrite"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let pre = dir.subdir("pre");
    pre_dump(wl.pid(), &pre, &[]);
    drop(Holder(pre.clone()));
    // Pages rewritten meanwhile (one every 50 ms).
    std::thread::sleep(Duration::from_millis(400));
    let img = dir.subdir("img");
    let kept = dump_against(&dir, &mut wl, &img, "../pre", &[]);
    assert!(
        kept >= 8 * 256 / 2,
        "only {kept} pages were left to the parent (the 8 MiB hardly change)"
    );
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored from a dump whose tracking was lost");
}

/// A pre-dump is not restorable alone: refused naming it.
#[test]
fn pre_dump_alone_is_refused_by_restore() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "4"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let pre = dir.subdir("pre");
    let _holder = Holder(pre.clone());
    pre_dump(wl.pid(), &pre, &[]);
    let out = restore_detached(&pre);
    assert!(!out.status.success(), "a pre-dump was restored");
    let err = stderr_of(&out);
    assert!(err.contains("pre-dump"), "stderr: {err}");
    wl.assert_pass("after a refused restore of its pre-dump");
}

/// An incremental image whose parent is gone: verify and restore both
/// name it.
#[test]
fn missing_parent_is_named() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "8"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let pre = dir.subdir("pre");
    let _holder = Holder(pre.clone());
    pre_dump(wl.pid(), &pre, &[]);
    let img = dir.subdir("img");
    let kept = dump_against(&dir, &mut wl, &img, "../pre", &[]);
    assert!(kept > 0);
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    std::fs::remove_dir_all(&pre).expect("removing the pre-dump");
    let verify = run_cryo(&["image", "verify", img.to_str().expect("utf-8 path")], &[]);
    assert!(!verify.status.success(), "verify passed without the parent");
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(said.contains("parent image"), "verify said: {said}");
    let out = restore_detached(&img);
    assert!(!out.status.success(), "restored without the parent image");
    assert!(stderr_of(&out).contains("parent"), "{}", stderr_of(&out));
}

/// `cryo check` says how incremental dumps find the pages written since.
#[test]
fn check_names_the_tracking_method() {
    let out = run_cryo(&["check"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("dirty-tracking"))
        .unwrap_or_else(|| panic!("cryo check has no dirty-tracking line: {text}"));
    assert!(
        line.contains("userfaultfd") && line.contains("PAGEMAP_SCAN"),
        "{line}"
    );
}

/// The contents compared without tracking must tell a page written since
/// the parent from one that was not: a counter whose count lives in its
/// memory (stack and heap) goes on from where it was, never repeating a
/// number it printed before the dump.
#[test]
fn compared_contents_are_the_dump_instants() {
    let dir = TestDir::new();
    let log = dir.join("counter.log");
    let file = std::fs::File::create(&log).expect("the counter's log");
    let pid = spawn_counter(
        std::process::Stdio::from(file.try_clone().expect("the counter's log")),
        std::process::Stdio::from(file),
    );
    let guard = TreeGuard::new(vec![pid]);
    std::thread::sleep(Duration::from_millis(700));
    let pre = dir.subdir("pre");
    pre_dump(pid, &pre, &[]);
    drop(Holder(pre.clone()));
    // Counts printed after the pre-dump, which it must not bring back.
    std::thread::sleep(Duration::from_millis(700));
    let img = dir.subdir("img");
    std::fs::create_dir_all(&img).expect("the image directory");
    let out = dump(pid, &img, &["--prev-images-dir", "../pre"], &[]);
    assert_cryo_ok(&out, "cryo dump --prev-images-dir without tracking");
    assert!(reap_gone(&[pid], Duration::from_secs(10)));
    let out = restore_detached(&img);
    assert_cryo_ok(&out, "cryo restore of the incremental image");
    std::thread::sleep(Duration::from_millis(900));
    drop(guard);
    let text = std::fs::read_to_string(&log).expect("reading the counter's log");
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split("count ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(counts.len() >= 10, "too few counts: {text}");
    for w in counts.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the counter went from {} to {}: {text}",
            w[0],
            w[1]
        );
    }
}

/// Periodic snapshots: a pre-dump, a dump -R against it (the tree goes
/// on, and the tracking goes on from that image, kept by a holder of its
/// own), then a dump against the -R one: it refers to it for most pages,
/// and the chain of three restores one instant's memory.
#[test]
fn leave_running_dump_hands_the_tracking_on() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    std::thread::sleep(Duration::from_millis(800));
    let pre = dir.subdir("pre");
    let snap = dir.subdir("snap");
    let _holders = (Holder(pre.clone()), Holder(snap.clone()));
    pre_dump(wl.pid(), &pre, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let first = dump_against(&dir, &mut wl, &snap, "../pre", &["-R"]);
    assert!(first > 0, "the -R dump left nothing to the pre-dump");
    assert!(
        snap.join("track.pid").exists(),
        "no holder keeps the tracking after the -R dump"
    );
    std::thread::sleep(Duration::from_millis(300));
    let img = dir.subdir("img");
    let second = dump_against(&dir, &mut wl, &img, "../snap", &[]);
    assert!(second > 0, "the last dump left nothing to the -R one");
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass("restored through a pre-dump and a dump -R");
}

/// A dump against a pre-dump that fails gives the tracking back to a
/// holder of the pre-dump's: the tree runs on, and the next attempt still
/// leaves most pages to the pre-dump.
#[test]
fn failed_dump_gives_the_tracking_back() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "8", "--rewrite"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let pre = dir.subdir("pre");
    let _holder = Holder(pre.clone());
    pre_dump(wl.pid(), &pre, &[]);
    let img = dir.subdir("img");
    let out = dump(
        wl.pid(),
        &img,
        &["--prev-images-dir", "../pre"],
        &[("CRYO_FAULT", "fail-after-seize")],
    );
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("a failed incremental dump: {e}");
    }
    assert!(
        pre.join("track.pid").exists(),
        "the tracking was not given back"
    );
    let kept = dump_against(&dir, &mut wl, &img, "../pre", &[]);
    assert!(
        kept >= 8 * 256 / 2,
        "only {kept} pages left to the pre-dump"
    );
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored after a failed incremental dump");
}
