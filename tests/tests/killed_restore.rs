//! A `cryo restore` killed with SIGKILL at any moment leaves nothing of
//! the tree behind (no task running or stopped, no helper), and the image
//! is untouched: the next restore from it succeeds and the restored tree
//! passes its own checks.
//!
//! cryo is killed at each of its restore's steps (CRYO_FAULT
//! `pause-restore-POINT`: after loading the image, after opening the
//! tree's files, after creating the roots, once every task exists, once
//! every task is in its group, once every restorer is done, after the
//! final rt_sigreturns, after the bootstrap areas are gone), and at
//! moments spread over a whole restore without any hook. The workload is
//! wl_tree: sessions, groups, helpers for exited leaders, zombies, pipes
//! and a buffer shared copy-on-write.

use std::path::Path;
use std::time::{Duration, Instant};

use cryo_tests::*;

const POINTS: [&str; 8] = [
    "loaded", "files", "spawned", "created", "joined", "trapped", "stepped", "unmapped",
];

/// Every pid and tid of the image (pstree.img through `cryo image show
/// --json` is not needed: the tree's pids were recorded before the dump).
fn alive(pids: &[i32]) -> Vec<i32> {
    pids.iter().copied().filter(|&p| pid_alive(p)).collect()
}

/// The xxh3 of every file of the image, to tell it was not changed.
fn image_hashes(img: &Path) -> Vec<(String, u64, u64)> {
    let mut out: Vec<(String, u64, u64)> = file_names(img)
        .into_iter()
        .map(|n| {
            let (size, h) = cryo_image::hash_file(&img.join(&n)).expect("hash an image file");
            (n, size, h)
        })
        .collect();
    out.sort();
    out
}

/// After cryo died: reap what the kill left (the tasks it made were
/// traced with PTRACE_O_EXITKILL; they fall to this test, a subreaper) and
/// check that nothing of the tree is left.
fn assert_nothing_left(pids: &[i32], outside: &Outside, what: &str) {
    let gone = reap_gone(pids, Duration::from_secs(10));
    // Helpers (stand-ins for exited leaders) have pids of the image too.
    std::thread::sleep(Duration::from_millis(50));
    reap_zombie_children();
    assert!(
        gone,
        "{what}: tasks of the tree left after cryo was killed: {:?}",
        alive(pids)
    );
    outside.assert_same(what);
}

/// What a killed restore must not have changed outside the tree: the
/// mounts, and the cgroups (this test's membership, and the cgroups that
/// exist under the cgroup v2 root's first level).
struct Outside {
    mounts: Vec<String>,
    cgroup: String,
    cgroups: Vec<String>,
}

impl Outside {
    /// What is outside now, in a mount namespace of this test's own
    /// (private: the mounts other tests make meanwhile do not show in it,
    /// the ones a restore it runs makes do).
    fn take() -> Outside {
        // SAFETY: unshare and mount take plain arguments; they change only
        // this process's mount namespace and its propagation.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare(CLONE_NEWNS)");
            let root = c"/";
            let made = libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            assert_eq!(made, 0, "making / private");
        }
        Outside::get()
    }

    fn get() -> Outside {
        // Mount ids and options only; the order of lines is kept.
        // This thread's (the test runs on a thread of its own).
        let mounts = std::fs::read_to_string("/proc/thread-self/mountinfo")
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        let mut cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        cgroups.sort();
        Outside {
            mounts,
            cgroup: std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
            cgroups,
        }
    }

    fn assert_same(&self, what: &str) {
        let now = Outside::get();
        assert_eq!(now.mounts, self.mounts, "{what}: the mounts changed");
        assert_eq!(
            now.cgroup, self.cgroup,
            "{what}: this test's cgroups changed"
        );
        assert_eq!(
            now.cgroups, self.cgroups,
            "{what}: cgroups appeared or went"
        );
    }
}

fn start_tree(dir: &TestDir) -> (Workload, TreeGuard) {
    let wl = Workload::start("wl_tree", &[], dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard)
}

/// Start `cryo restore -d` of `img` paused at `point`, wait for the
/// pause and kill cryo there.
fn kill_restore_at(img: &Path, point: &str, dir: &TestDir) {
    let flag = dir.join(&format!("paused-restore-{point}"));
    let _ = std::fs::remove_file(&flag);
    let fault = format!("pause-restore-{point}:{}", flag.display());
    let img_s = img.to_str().expect("utf-8 path");
    let mut run = spawn_cryo(&["restore", "-D", img_s, "-d"], &[("CRYO_FAULT", &fault)]);
    let start = Instant::now();
    while !flag.exists() {
        if start.elapsed() > Duration::from_secs(60) || !pid_alive(run.pid()) {
            let err = run.stderr_so_far();
            run.kill();
            panic!("cryo restore did not reach the pause {point}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    run.kill();
}

#[test]
fn restore_killed_at_every_step_leaves_nothing() {
    become_subreaper();
    let outside = Outside::take();
    let dir = TestDir::new();
    let (mut wl, guard) = start_tree(&dir);
    let pids = guard.pids().to_vec();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert_nothing_left(&pids, &outside, "after the dump");
    let hashes = image_hashes(&img);
    for point in POINTS {
        kill_restore_at(&img, point, &dir);
        assert_nothing_left(&pids, &outside, &format!("cryo killed at restore-{point}"));
        assert_eq!(
            image_hashes(&img),
            hashes,
            "cryo killed at restore-{point} changed the image"
        );
    }
    restore_ok(&mut wl, &img);
    wl.assert_pass("tree restored after eight killed restores");
}

/// Kill cryo at moments spread over a restore's whole run, measured
/// first: each time the tree is either not there at all or restored
/// whole (if cryo was done before the kill), and a restored tree passes.
#[test]
fn restore_killed_at_any_moment_leaves_nothing_or_everything() {
    become_subreaper();
    let outside = Outside::take();
    let dir = TestDir::new();
    let (mut wl, guard) = start_tree(&dir);
    let pids = guard.pids().to_vec();
    let root = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert_nothing_left(&pids, &outside, "after the dump");
    let hashes = image_hashes(&img);
    // How long a whole restore takes here, then the tree is put away
    // again (by a dump, which checks it too).
    let t0 = Instant::now();
    restore_ok(&mut wl, &img);
    let whole = t0.elapsed();
    let live = alive(&pids);
    let img2 = dir.subdir("img2");
    dump_ok(&mut wl, &img2, &[]);
    assert_nothing_left(&pids, &outside, "after the second dump");
    let steps = 12u32;
    let mut restored = 0;
    for i in 0..steps {
        // Up to one and a half times a whole restore: some are done first.
        let delay = whole * i * 3 / (2 * steps);
        let img_s = img.to_str().expect("utf-8 path");
        let mut run = spawn_cryo(&["restore", "-D", img_s, "-d"], &[]);
        std::thread::sleep(delay);
        run.kill();
        std::thread::sleep(Duration::from_millis(50));
        if pid_alive(root) && proc_state(root) != Some('Z') {
            // cryo was done: the whole tree must be there and well.
            let now = alive(&pids);
            assert!(
                live.iter().all(|p| now.contains(p)),
                "killed after {delay:?}: the root runs but not all of the tree ({now:?} of {live:?})"
            );
            restored += 1;
            wl.mark_running();
            wl.assert_pass(&format!("tree restored by a cryo killed after {delay:?}"));
            assert_nothing_left(&pids, &outside, "after the restored tree ended");
        } else {
            assert_nothing_left(&pids, &outside, &format!("cryo killed after {delay:?}"));
        }
        assert_eq!(
            image_hashes(&img),
            hashes,
            "a killed restore changed the image"
        );
    }
    eprintln!("{restored} of {steps} restores were done before their kill");
    restore_ok(&mut wl, &img);
    wl.assert_pass("tree restored after the killed restores");
}
