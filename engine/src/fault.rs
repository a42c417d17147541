//! Test hooks driven by the CRYO_FAULT environment variable: `fail-POINT`
//! makes a dump fail at POINT, `pause-POINT:PATH` writes PATH there and
//! waits to be killed (tests kill cryo at that moment).

#![forbid(unsafe_code)]

use std::time::Duration;

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
