//! `--shell-job`: a process started from a shell, its descriptors 0-2 on
//! the shell's terminal (a pty this test holds the master of). Without the
//! flag the dump is refused naming the terminal; with it the process is
//! dumped, and restored by a cryo running in another shell session on the
//! same terminal, where it finds its terminal again (wl_tty checks).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryo_tests::*;

/// `setsid -c sh -c SCRIPT` on the pty: a shell session whose controlling
/// terminal is the pty.
fn shell(slave: &OwnedFd, script: &str) -> PidGuard {
    let io = || Stdio::from(slave.try_clone().expect("dup the pty slave"));
    let child = Command::new("setsid")
        .args(["-c", "sh", "-c", script])
        .stdin(io())
        .stdout(io())
        .stderr(io())
        .spawn()
        .expect("spawn setsid -c sh");
    let pid = child.id() as i32;
    // Waited for by pid (the guard kills and reaps it).
    drop(child);
    PidGuard::new(pid)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn shell_job_dump_and_restore() {
    become_subreaper();
    let dir = TestDir::new();
    let (master, slave) = openpty();
    // Everything the terminal shows, read from the master side.
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let reader = {
        let seen = seen.clone();
        let mut f = std::fs::File::from(master.try_clone().expect("dup master"));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = seen.lock() {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        })
    };
    let ready = dir.join("ready");
    let verdict = dir.join("verdict");
    let wl = workload_bin("wl_tty");
    let pidfile = dir.join("pid");
    let script = format!(
        "{} --ready {} --verdict {} 0<&1 & echo $! > {}; wait",
        wl.display(),
        ready.display(),
        verdict.display(),
        pidfile.display()
    );
    let sh1 = shell(&slave, &script);
    wait_for("wl_tty to be ready", Duration::from_secs(20), || {
        ready.exists()
    });
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let guard = TreeGuard::new(vec![pid]);
    let img = dir.subdir("img");

    let out = dump(pid, &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a shell job without --shell-job: {e}");
    }
    assert!(
        stderr_of(&out).contains("--shell-job"),
        "the refusal does not mention --shell-job: {}",
        stderr_of(&out)
    );

    let out = dump(pid, &img, &["--shell-job"], &[]);
    assert_cryo_ok(&out, "cryo dump --shell-job");
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    drop(sh1); // the first shell goes away; the terminal stays

    // A new shell session on the same terminal restores it.
    let cryo = cryo_bin();
    let restored = dir.join("restored");
    let script = format!(
        "{} restore -D {} -d && touch {}; exec sleep 600",
        cryo.display(),
        img.display(),
        restored.display()
    );
    let sh2 = shell(&slave, &script);
    wait_for("the restore", Duration::from_secs(30), || restored.exists());
    assert!(pid_alive(pid), "pid {pid} not running after the restore");
    // SAFETY: SIGTERM to the restored workload, by its pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("the verdict", Duration::from_secs(20), || verdict.exists());
    let text = std::fs::read_to_string(&verdict).unwrap_or_default();
    assert_eq!(text.trim(), "PASS", "wl_tty verdict: {text}");
    wait_for(
        "tty-check-ok on the terminal",
        Duration::from_secs(5),
        || {
            seen.lock()
                .map(|s| String::from_utf8_lossy(&s).contains("tty-check-ok"))
                .unwrap_or(false)
        },
    );
    drop(guard);
    drop(sh2);
    // The terminal goes away with every end closed; the reader then ends.
    drop(slave);
    drop(master);
    let _ = reader.join();
}
