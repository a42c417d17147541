//! Checkpoint/restore scenarios of one single-threaded process (wl_single).
//!
//! Each test starts its own workload, dumps it with the real cryo binary,
//! restores it and reads its self-check verdict.

use std::path::Path;
use std::time::{Duration, Instant};

use cryo_tests::*;

/// Dump (kill mode), restore -d, PASS.
fn kill_mode(wait: &str, dump_extra: &[&str]) {
    let dir = TestDir::new();
    let mut wl = Workload::single(wait, &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, dump_extra);
    assert!(!pid_alive(pid), "pid {pid} alive after a kill-mode dump");
    restore_ok(&mut wl, &img);
    assert_eq!(wl.pid(), pid);
    assert_eq!(tracer_pid(pid), Some(0), "restored task is traced");
    wl.assert_pass(&format!("restored ({wait} wait)"));
}

#[test]
fn kill_mode_nanosleep() {
    kill_mode("nanosleep", &[]);
}

#[test]
fn kill_mode_pause() {
    kill_mode("pause", &[]);
}

/// Blocked in FUTEX_WAIT (ERESTARTSYS, like a blocking read).
#[test]
fn kill_mode_futex() {
    kill_mode("futex", &[]);
}

#[test]
fn kill_mode_busy() {
    kill_mode("busy", &[]);
}

/// wl_single as an unprivileged process: uid/gid 1000, groups 1234 and
/// 5678, no capabilities, no_new_privs. Its credentials must come back as
/// they were (cryo restores as root and must drop to them).
#[test]
fn kill_mode_unprivileged_creds() {
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &["--drop-creds"]);
    let pid = wl.pid();
    assert_eq!(
        proc_status_field(pid, "Uid").as_deref(),
        Some("1000\t1000\t1000\t1000"),
        "wl_single --drop-creds did not drop its uid\nlog:\n{}",
        wl.log_text()
    );
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(!pid_alive(pid), "pid {pid} alive after a kill-mode dump");
    restore_ok(&mut wl, &img);
    assert_eq!(wl.pid(), pid);
    assert_eq!(tracer_pid(pid), Some(0), "restored task is traced");
    for field in ["Uid", "Gid", "Groups", "CapEff", "CapPrm", "NoNewPrivs"] {
        eprintln!(
            "restored pid {pid}: {field}: {:?}",
            proc_status_field(pid, field)
        );
    }
    wl.assert_pass("restored unprivileged workload");
}

fn pages_file_size(img: &Path, pid: i32) -> u64 {
    let p = img.join(format!("pages-{pid}.img"));
    std::fs::metadata(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

#[test]
fn compress_none() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["--compress", "none"]);
    // The workload fills an 8 MiB malloc block and ~100 more pages: raw pages
    // must all be there.
    let size = pages_file_size(&img, pid);
    assert!(
        size >= 8 << 20,
        "uncompressed pages-{pid}.img is only {size} bytes"
    );
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored from uncompressed pages");
}

#[test]
fn compress_zstd() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["--compress", "zstd"]);
    // Every image file is private to its owner (mode 0600).
    let mut names = Vec::new();
    for e in std::fs::read_dir(&img).expect("read image dir") {
        let e = e.expect("dir entry");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&e.metadata().expect("stat").permissions());
        assert_eq!(
            mode & 0o777,
            0o600,
            "{:?} has mode {:o}",
            e.file_name(),
            mode & 0o777
        );
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    assert!(names.len() >= 8, "image files: {names:?}");
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored from zstd pages");
}

#[test]
fn leave_running() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let maps_before = proc_maps(pid);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    // The scratch file of the raw capture is gone; every file is listed
    // in the inventory.
    let inv = cryo_image::read_inventory(&img).expect("inventory");
    for e in std::fs::read_dir(&img).expect("read image dir") {
        let name = e
            .expect("dir entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            name == "inventory.img" || inv.files.iter().any(|f| f.name == name),
            "{name} is in the image directory but not in the inventory"
        );
    }
    let files = FileSnapshot::of_workload(&dir);
    assert!(pid_alive(pid), "pid {pid} gone after dump -R");
    assert_eq!(
        wait_untraced(pid, Duration::from_secs(5)),
        Some(0),
        "pid {pid} still traced after dump -R"
    );
    let maps_after = proc_maps(pid);
    assert!(
        maps_after == maps_before,
        "maps of pid {pid} changed by dump -R:\n{}",
        maps_diff(&maps_before, &maps_after)
    );
    // The original passes its self-check...
    wl.assert_pass("original after dump -R");
    assert!(!pid_alive(pid));
    // ...and so does the restored copy, once the files the original changed
    // after the dump (its log, its shared file mapping) are put back.
    files.put_back();
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored after dump -R");
}

#[test]
fn leave_running_then_restore_busy() {
    let dir = TestDir::new();
    let mut wl = Workload::single("busy", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["--leave-running"]);
    let files = FileSnapshot::of_workload(&dir);
    assert!(pid_alive(pid), "pid {pid} gone after dump --leave-running");
    wl.assert_pass("original after dump --leave-running");
    files.put_back();
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored after dump --leave-running");
}

#[test]
fn three_cycles() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    for cycle in 0..3 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        restore_ok(&mut wl, &img);
        assert_eq!(wl.pid(), pid, "cycle {cycle}");
    }
    wl.assert_pass("after three dump/restore cycles");
}

#[test]
fn three_cycles_pause_leave_running() {
    // Dump -R, then kill mode, then restore twice: images of an image.
    let dir = TestDir::new();
    let mut wl = Workload::single("pause", &dir);
    for cycle in 0..3 {
        let img = dir.subdir(&format!("img-{cycle}"));
        if cycle == 0 {
            dump_ok(&mut wl, &img, &["-R"]);
            continue;
        }
        dump_ok(&mut wl, &img, &[]);
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("after dump -R and two kill-mode cycles");
}

#[test]
fn restore_attached() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    wl.mark_running();

    // A thread waits until the pid runs the workload binary again, then
    // SIGTERMs it (a signal that arrives while cryo's restorer still runs
    // must stay pending until the task's own mask is back).
    let exe = workload_bin("wl_single");
    let signaller = std::thread::spawn(move || -> Result<(), String> {
        let start = Instant::now();
        loop {
            let cur = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if cur.as_deref() == Some(exe.as_path()) && pid_alive(pid) {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "pid {pid} did not run {} within 30 s",
                    exe.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let it get back into its wait loop.
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill by the explicit pid of the restored workload.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        Ok(())
    });
    let out = try_run_cryo(&["restore", "-D", img.to_str().unwrap()], &[], CRYO_TIMEOUT);
    let sig = signaller.join().expect("signaller thread");
    let out = match (out, sig) {
        (Ok(out), Ok(())) => out,
        (Ok(out), Err(e)) => panic!(
            "{e}\ncryo exited with {}; stderr:\n{}",
            out.status,
            stderr_of(&out)
        ),
        (Err(e), sig) => panic!("{e}\nsignaller: {sig:?}\nlog:\n{}", wl.log_text()),
    };
    let verdict = std::fs::read_to_string(wl.verdict_path()).unwrap_or_default();
    assert!(
        !stderr_of(&out).contains("panicked at"),
        "cryo panicked:\n{}",
        stderr_of(&out)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "attached restore: cryo's status should be the task's (0 on PASS); verdict {verdict:?}\nstderr:\n{}\nlog:\n{}",
        stderr_of(&out),
        wl.log_text()
    );
    assert_eq!(
        verdict.trim(),
        "PASS",
        "verdict of the attached restore\nlog:\n{}",
        wl.log_text()
    );
    // cryo waited for the task: it is gone.
    let _ = try_reap(pid);
    assert!(
        !pid_alive(pid),
        "pid {pid} alive after cryo restore returned"
    );
    let _ = wl.terminate_and_verdict();
}

#[test]
fn sigkill_cryo_while_parasite_runs() {
    sigkill_cryo_at("in-parasite");
}

/// cryo killed right after seizing, while every signal of the task is
/// blocked and before any parasite exists: the guardian puts the task's
/// own mask back.
#[test]
fn sigkill_cryo_after_seize() {
    sigkill_cryo_at("after-seize");
}

/// cryo killed inside its first injected syscall (the mmap of the
/// parasite area, from its syscall-entry stop): the task spins in cryo's
/// `syscall; jmp .` instead of dying of a trap, and the guardian restores
/// its code, registers and mask and unmaps what the mmap made.
#[test]
fn sigkill_cryo_in_injected_syscall() {
    sigkill_cryo_at("in-syscall");
}

/// cryo killed between injected syscalls, with the control socket pair
/// already made in the task: the guardian also closes those descriptors.
#[test]
fn sigkill_cryo_after_socketpair() {
    sigkill_cryo_at("after-socketpair");
}

fn sigkill_cryo_at(point: &str) {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let maps_before = proc_maps(pid);
    let sigblk_before = proc_status_field(pid, "SigBlk");
    let img = dir.subdir("img");
    let flag = dir.join("parasite-running");
    let fault = format!("pause-{point}:{}", flag.display());
    let pid_s = pid.to_string();
    let mut run = spawn_cryo(
        &["dump", "-t", &pid_s, "-D", img.to_str().unwrap()],
        &[("CRYO_FAULT", &fault)],
    );
    let start = Instant::now();
    while !flag.exists() {
        if start.elapsed() > Duration::from_secs(30) {
            let err = run.stderr_so_far();
            run.kill();
            panic!("cryo did not reach the pause {point} within 30 s; stderr:\n{err}");
        }
        if !pid_alive(run.pid()) {
            let err = run.stderr_so_far();
            run.kill();
            panic!("cryo exited before reaching the pause {point}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The parasite is inside the task now.
    run.kill();
    assert!(
        pid_alive(pid),
        "workload died when cryo was killed mid-dump\nlog:\n{}",
        wl.log_text()
    );
    assert_eq!(
        wait_untraced(pid, Duration::from_secs(5)),
        Some(0),
        "workload still traced 5 s after cryo was killed"
    );
    // The parasite is gone: mappings and the blocked mask are back.
    // (The cure may finish asynchronously once cryo is gone: poll a little.)
    // The guardian repairs the task once cryo is gone; between cryo's death
    // and its repair the task may briefly be untraced.
    let start = Instant::now();
    let mut maps_now = proc_maps(pid);
    while (maps_now != maps_before
        || proc_status_field(pid, "SigBlk") != sigblk_before
        || tracer_pid(pid) != Some(0))
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
        maps_now = proc_maps(pid);
    }
    assert!(
        maps_now == maps_before,
        "maps still changed 5 s after cryo was killed mid-dump (parasite left behind?):\n{}",
        maps_diff(&maps_before, &maps_now)
    );
    assert_eq!(
        proc_status_field(pid, "SigBlk"),
        sigblk_before,
        "SigBlk changed"
    );
    wl.assert_pass("workload after cryo was SIGKILLed while its parasite ran");
}

#[test]
fn fail_after_parasite_leaves_task_running() {
    failed_dump_leaves_task_running(&["fail-after-parasite"]);
}

/// A dump failing right after the seize, and another failing while the
/// parasite runs (before any page moved), both on the same task in a row.
#[test]
fn fail_at_other_steps_leaves_task_running() {
    failed_dump_leaves_task_running(&["fail-after-seize", "fail-in-parasite"]);
}

fn failed_dump_leaves_task_running(faults: &[&str]) {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let maps_before = proc_maps(pid);
    let sigblk_before = proc_status_field(pid, "SigBlk");
    let img = dir.subdir("img");
    for fault in faults {
        let out = dump(pid, &img, &[], &[("CRYO_FAULT", fault)]);
        if let Err(e) = check_cryo_failed_cleanly(&out) {
            panic!("dump with CRYO_FAULT={fault}: {e}");
        }
    }
    assert!(
        pid_alive(pid),
        "workload died in a failed dump\nlog:\n{}",
        wl.log_text()
    );
    assert_eq!(
        tracer_pid(pid),
        Some(0),
        "workload still traced after a failed dump"
    );
    let maps_after = proc_maps(pid);
    assert!(
        maps_after == maps_before,
        "maps changed by a failed dump:\n{}",
        maps_diff(&maps_before, &maps_after)
    );
    assert_eq!(
        proc_status_field(pid, "SigBlk"),
        sigblk_before,
        "SigBlk changed by a failed dump"
    );
    wl.assert_pass("workload after a failed dump");
}

#[test]
fn dump_of_a_free_pid_fails_cleanly() {
    become_subreaper();
    // A pid that was just used and reaped is free (pids are not reused
    // right away).
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id() as i32;
    child.wait().expect("wait for true");
    assert!(!pid_alive(pid));
    let dir = TestDir::new();
    let img = dir.subdir("img");
    let out = dump(pid, &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of free pid {pid}: {e}");
    }
    assert!(
        !img.join("inventory.img").exists(),
        "a failed dump left an inventory.img (a complete-looking image)"
    );
}

/// A file the task has mapped shrinks between dump and restore: the
/// restore is refused naming the mapping's file (the pages would be gone,
/// SIGBUS later), nothing is left running, and once the file is back the
/// image restores.
#[test]
fn restore_refuses_shrunk_mapped_file() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    let files = FileSnapshot::of_workload(&dir);
    let mapped = dir.join("tmp").join("wl-private.dat");
    std::fs::write(&mapped, b"").expect("truncate the mapped file");
    let out = restore_detached(&img);
    let err = stderr_of(&out);
    assert!(
        !out.status.success(),
        "restore with a shrunk mapped file succeeded"
    );
    assert!(
        err.contains(&format!("mm-{pid}.img")) && err.contains("wl-private.dat"),
        "message does not name the image and the file: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = try_reap(pid);
    assert!(!pid_alive(pid), "pid {pid} alive after a refused restore");
    files.put_back();
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored once the file was back");
}

/// Waits up to 5 s for `pid` to be in state `want`; the state it has.
fn wait_state(pid: i32, want: char) -> Option<char> {
    let t0 = std::time::Instant::now();
    loop {
        let s = proc_state(pid);
        if s == Some(want) || t0.elapsed() > std::time::Duration::from_secs(5) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill by the explicit pid of the workload this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// A process stopped by SIGSTOP (two threads) is dumped: with
/// --leave-running it stays stopped and goes on at SIGCONT; in kill mode it
/// is restored stopped, and goes on at SIGCONT with its state intact.
#[test]
fn stopped_process_is_dumped_and_restored_stopped() {
    become_subreaper();
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &["--thread"]);
    let pid = wl.pid();
    let img = dir.subdir("img");
    signal(pid, libc::SIGSTOP);
    assert_eq!(
        wait_state(pid, 'T'),
        Some('T'),
        "setup: SIGSTOP did not stop pid {pid}"
    );
    dump_ok(&mut wl, &img, &["-R"]);
    assert_eq!(
        wait_state(pid, 'T'),
        Some('T'),
        "pid {pid} is no longer stopped after dump -R"
    );
    signal(pid, libc::SIGCONT);
    assert_ne!(
        wait_state(pid, 'S'),
        Some('T'),
        "pid {pid} did not go on at SIGCONT after dump -R"
    );
    signal(pid, libc::SIGSTOP);
    assert_eq!(
        wait_state(pid, 'T'),
        Some('T'),
        "SIGSTOP did not stop pid {pid} again"
    );
    let _ = std::fs::remove_dir_all(&img);
    dump_ok(&mut wl, &img, &[]);
    wl.assert_gone_after_dump();
    restore_ok(&mut wl, &img);
    assert_eq!(
        wait_state(pid, 'T'),
        Some('T'),
        "pid {pid} was not restored stopped"
    );
    // Every thread is in the group stop.
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
    {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
        assert_eq!(
            state.as_deref(),
            Some("T"),
            "thread {:?} of pid {pid} is not stopped",
            t.file_name()
        );
    }
    signal(pid, libc::SIGCONT);
    assert_ne!(
        wait_state(pid, 'S'),
        Some('T'),
        "restored pid {pid} did not go on at SIGCONT"
    );
    wl.assert_pass("restored stopped, then continued");
}

/// `--stats` on dump and restore gives each phase's time; the phases
/// follow one another, so they add up to no more than the total.
#[test]
fn stats_give_each_phase() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let img = dir.subdir("img");
    let ds = dir.join("dump.json");
    dump_ok(&mut wl, &img, &["--stats", ds.to_str().expect("utf-8")]);
    let dumped = [
        "prepare",
        "seize",
        "capture",
        "files",
        "namespaces",
        "cgroups",
        "write",
        "kill",
    ];
    let sum: f64 = dumped.iter().map(|p| stats_ms(&ds, p)).sum();
    let total = stats_ms(&ds, "total_ms");
    assert!(
        sum > 0.0 && sum <= total + 0.01,
        "dump phases {sum} ms of {total}"
    );
    let rs = dir.join("restore.json");
    let img_s = img.to_str().expect("utf-8");
    let out = run_cryo(
        &[
            "restore",
            "-D",
            img_s,
            "-d",
            "--stats",
            rs.to_str().expect("utf-8"),
        ],
        &[],
    );
    wl.mark_running();
    assert_cryo_ok(&out, "restore --stats");
    wl.assert_restored();
    let restored = ["load", "namespaces", "files", "cgroups", "tasks"];
    let sum: f64 = restored.iter().map(|p| stats_ms(&rs, p)).sum();
    let total = stats_ms(&rs, "total_ms");
    assert!(
        sum > 0.0 && sum <= total + 0.01,
        "restore phases {sum} ms of {total}"
    );
    wl.assert_pass("restored, with stats");
}

/// `--compress fast` (zstd at a negative level) restores like the default.
#[test]
fn kill_mode_compress_fast() {
    kill_mode("busy", &["--compress", "fast"]);
}
