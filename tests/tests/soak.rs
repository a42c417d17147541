//! Soak: many dump/restore cycles of one workload that checks its own
//! memory and descriptors at the end (ignored by default; README gives the
//! command). `CRYO_SOAK_CYCLES` sets the cycles (1000 by default); every
//! fifth cycle is a leave-running dump first, then a kill-mode one.

use std::time::{Duration, Instant};

use cryo_tests::*;

fn cycles() -> u32 {
    std::env::var("CRYO_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Dump and restore `wl` `n` times (the same pid each time), then check
/// its verdict; prints the cycle times.
fn soak(wl: &mut Workload, guard: &TreeGuard, dir: &TestDir, what: &str) {
    let n = cycles();
    let pid = wl.pid();
    let img = dir.path().join("img");
    let mut times: Vec<Duration> = Vec::with_capacity(n as usize);
    for cycle in 0..n {
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(&img);
        if cycle % 5 == 4 {
            dump_ok(wl, &img, &["-R"]);
            let _ = std::fs::remove_dir_all(&img);
        }
        dump_ok(wl, &img, &[]);
        assert!(
            reap_gone(guard.pids(), Duration::from_secs(10)),
            "{what}: cycle {cycle}: tasks left after the dump"
        );
        restore_ok(wl, &img);
        assert_eq!(wl.pid(), pid, "{what}: cycle {cycle}");
        times.push(t0.elapsed());
    }
    times.sort();
    let total: Duration = times.iter().sum();
    eprintln!(
        "{what}: {n} cycles in {:.1} s: median {:?}, max {:?}",
        total.as_secs_f64(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
    wl.assert_pass(&format!("{what} after {n} dump/restore cycles"));
}

#[test]
#[ignore = "soak: about ten minutes; run by hand (README)"]
fn soak_open_files() {
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let mut wl = Workload::start("wl_fds", &["--tmp", tmp.to_str().expect("utf-8")], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    soak(&mut wl, &guard, &dir, "wl_fds");
}

#[test]
#[ignore = "soak: about ten minutes; run by hand (README)"]
fn soak_memory_and_threads() {
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &["--thread"]);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    soak(&mut wl, &guard, &dir, "wl_single --thread");
}
