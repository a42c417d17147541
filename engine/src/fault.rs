//! Test hooks driven by the CRYO_FAULT environment variable: `fail-POINT`
//! makes a dump fail at POINT, `pause-POINT:PATH` writes PATH there and
//! waits to be killed (tests kill cryo at that moment), `hold-POINT:PATH`
//! writes PATH and waits until it is removed, and `fail-step-N`
//! makes the Nth step of a dump fail, whatever it is: every seize, every
//! syscall injected into a task, every parasite command and every image
//! file written is a step (tests raise N until the dump succeeds).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The steps of this process's dump so far.
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Count one step of the dump (`what`: what it is); `Some(message)` when
/// CRYO_FAULT says this step fails.
pub fn step(what: &str) -> Option<String> {
    let n = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    let f = std::env::var("CRYO_FAULT").ok()?;
    let want: u64 = f.strip_prefix("fail-step-")?.parse().ok()?;
    (n == want).then(|| format!("step {n}: {what}"))
}

/// If CRYO_FAULT says `hold-POINT:PATH` (the first time only), write
/// PATH and wait until the test removes it (at most two minutes): a test
/// changes something while cryo is there.
pub fn hold(point: &str) {
    static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(f) = std::env::var("CRYO_FAULT") else {
        return;
    };
    let Some(path) = f.strip_prefix(&format!("hold-{point}:")) else {
        return;
    };
    if HELD.swap(true, Ordering::Relaxed) || std::fs::write(path, b"held\n").is_err() {
        return;
    }
    let start = std::time::Instant::now();
    while std::path::Path::new(path).exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// If CRYO_FAULT asks to pause at `point`, write the flag file and wait
/// forever. Returns whether CRYO_FAULT asks to fail at `point`.
pub fn check(point: &str) -> bool {
    let Ok(f) = std::env::var("CRYO_FAULT") else {
        return false;
    };
    if let Some(path) = f.strip_prefix(&format!("pause-{point}:")) {
        let _ = std::fs::write(path, b"paused\n");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    f == format!("fail-{point}")
}
