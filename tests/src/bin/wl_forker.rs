//! A process that never stops forking, for dumps taken while the tree
//! changes under cryo.
//!
//! `wl_forker --ready FILE --verdict FILE`
//!
//! It forks children without pause; child number N sleeps N % 7 ms and
//! exits with code N % 100. It collects them as they end and checks each
//! status against the number it gave that pid. On SIGTERM it stops
//! forking, collects every child still there (those a restore brought
//! back, mid-sleep or as zombies, included) and writes the verdict: PASS
//! if every child ended with its own code and at least one child ended
//! after the SIGTERM or since the last restore.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_forker";
const MAX_LIVE: usize = 8;

fn run(ready: &std::path::Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let mut live: HashMap<i32, u64> = HashMap::new();
    let mut fails = Vec::new();
    let mut n: u64 = 0;
    let mut reaped: u64 = 0;
    let mut ready_written = false;
    let reap = |live: &mut HashMap<i32, u64>, fails: &mut Vec<String>, block: bool| -> u64 {
        let mut count = 0;
        loop {
            let mut status = 0;
            let flags = if block { 0 } else { libc::WNOHANG };
            // SAFETY: waitpid on our own children into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if pid <= 0 {
                return count;
            }
            count += 1;
            match live.remove(&pid) {
                Some(k) => {
                    let want = (k % 100) as i32;
                    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != want {
                        fails.push(format!(
                            "child {pid} (number {k}) ended with status {status:#x}, expected exit {want}"
                        ));
                    }
                }
                None => fails.push(format!("collected unknown child {pid}")),
            }
        }
    };
    while !wl::TERM.load(Ordering::SeqCst) {
        if live.len() < MAX_LIVE {
            // SAFETY: single-threaded; the child only sleeps and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                std::thread::sleep(Duration::from_millis(n % 7));
                // SAFETY: _exit without running the parent's handlers.
                unsafe { libc::_exit((n % 100) as i32) };
            }
            if pid < 0 {
                return Err(format!("fork: {}", std::io::Error::last_os_error()));
            }
            live.insert(pid, n);
            n += 1;
        }
        reaped += reap(&mut live, &mut fails, false);
        if !ready_written && n > 50 {
            wl::write_atomic(ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
            ready_written = true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let before = reaped;
    while !live.is_empty() {
        let got = reap(&mut live, &mut fails, true);
        if got == 0 {
            fails.push(format!(
                "children lost: {:?}",
                live.keys().collect::<Vec<_>>()
            ));
            break;
        }
        reaped += got;
    }
    wl::log(
        NAME,
        &format!("forked {n}, collected {reaped} ({before} before SIGTERM)"),
    );
    if n == 0 {
        fails.push("never forked".into());
    }
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse("wl_forker --ready FILE --verdict FILE");
    wl::close_extra_fds();
    let result = run(&a.ready);
    wl::finish(NAME, &a.verdict, result);
}
