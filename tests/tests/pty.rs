//! Checkpoint/restore scenarios of pseudo-terminal pairs (wl_pty): a pty
//! whose master is in the parent and whose slave is the controlling
//! terminal of a child's session, with a grandchild's group in the
//! foreground and a member that gave the terminal up, raw settings, a window size, packet mode, and a second pty
//! left locked. wl_pty checks all of it after the restore, and that data
//! flows both ways. A pty end whose other end is held outside the tree is
//! refused, naming the descriptor, and the tree runs on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use cryo_tests::*;

fn start(dir: &TestDir, args: &[&str]) -> (Workload, TreeGuard) {
    let wl = Workload::start("wl_pty", args, dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard)
}

/// The four processes of wl_pty (parent, session leader, the one that
/// gave up its terminal, grandchild).
fn assert_four(guard: &TreeGuard) {
    assert_eq!(
        guard.pids().len(),
        4,
        "wl_pty should be four processes: {:?}",
        guard.pids()
    );
}

#[test]
fn pty_kill_and_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, &[]);
    assert_four(&guard);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    // `cryo image show` names the new kinds with their pty.
    let out = run_cryo(&["image", "show", img.to_str().expect("utf-8 path")], &[]);
    assert_cryo_ok(&out, "cryo image show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pty_master") && text.contains("pty_slave") && text.contains("(pty "),
        "image show: {text}"
    );
    restore_ok(&mut wl, &img);
    for &pid in guard.pids() {
        assert!(pid_alive(pid), "pid {pid} of the tree not restored");
    }
    wl.assert_pass("pty pair restored");
}

/// Dump -R reads the pty's state without changing it: the original
/// passes.
#[test]
fn pty_leave_running() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, &[]);
    assert_four(&guard);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("pty pair after dump -R");
}

#[test]
fn pty_two_cycles() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, &[]);
    assert_four(&guard);
    for cycle in 0..2 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("pty pair after two cycles");
}

/// A pty made by this test: (master, slave path).
fn openpty_path() -> (OwnedFd, String) {
    let (m, s) = openpty();
    let path = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd()))
        .expect("slave path")
        .display()
        .to_string();
    (m, path)
}

/// The workload holds the slave of a pty whose master this test holds:
/// refused (with and without --shell-job: it is not its controlling
/// terminal), naming the task, the fd and the reason; it runs on.
#[test]
fn pty_slave_with_master_outside_refused() {
    let dir = TestDir::new();
    let (master, slave) = openpty_path();
    let (mut wl, _guard) = start(&dir, &["--hold-slave", &slave]);
    let img = dir.subdir("img");
    for extra in [&[][..], &["--shell-job"][..]] {
        let out = dump(wl.pid(), &img, extra, &[]);
        if let Err(e) = check_cryo_failed_cleanly(&out) {
            panic!("dump {extra:?} of a pty slave with its master outside: {e}");
        }
        let err = stderr_of(&out);
        assert!(
            err.contains(&format!("task {}: fd 5 ", wl.pid()))
                && err.contains("master is held outside the dumped tree")
                && err.contains(&slave),
            "dump {extra:?}: stderr: {err}"
        );
    }
    wl.assert_pass("pty slave after the refused dumps");
    drop(master);
}

/// The workload holds a master whose slave this test opened: refused,
/// naming the master's fd and this process; it runs on.
#[test]
fn pty_master_with_slave_outside_refused() {
    let dir = TestDir::new();
    let name_file = dir.join("slave-name");
    let (mut wl, _guard) = start(
        &dir,
        &["--hold-master", name_file.to_str().expect("utf-8 path")],
    );
    let slave = std::fs::read_to_string(&name_file).expect("slave name");
    let ours = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave)
        .unwrap_or_else(|e| panic!("open {slave}: {e}"));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a pty master with its slave outside: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("task {}: fd 5 ", wl.pid()))
            && err.contains(&format!(
                "whose slave is open in process {}",
                std::process::id()
            )),
        "stderr: {err}"
    );
    wl.assert_pass("pty master after the refused dump");
    drop(ours);
}

/// The index N of the workload's pty, from its log ("pty /dev/pts/N").
fn logged_index(wl: &Workload) -> u32 {
    let log = wl.log_text();
    log.split("pty /dev/pts/")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pty in the log:\n{log}"))
}

/// Masters of new ptys until one is pty `index` (the kernel hands out the
/// lowest free one); all are held.
fn take_pty(index: u32) -> Vec<OwnedFd> {
    let mut held = Vec::new();
    loop {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")
            .expect("open /dev/ptmx");
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes the pty's index into our local.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGPTN, &mut n) };
        assert_eq!(r, 0, "TIOCGPTN: {}", std::io::Error::last_os_error());
        held.push(OwnedFd::from(f));
        assert!(n <= index, "pty {index} was taken by someone else");
        if n == index {
            return held;
        }
    }
}

/// A restore whose pty index is in use fails before it creates anything,
/// naming the pty; once the index is free again, it restores.
#[test]
fn pty_index_in_use_fails_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, &[]);
    assert_four(&guard);
    let index = logged_index(&wl);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    let held = take_pty(index);
    let out = restore_detached(&img);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("restore with pty {index} in use: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("pty {index} is in use")) && err.contains("files.img"),
        "stderr: {err}"
    );
    for &pid in guard.pids() {
        assert!(!pid_alive(pid), "pid {pid} runs after the failed restore");
    }
    reap_zombie_children();
    drop(held);
    restore_ok(&mut wl, &img);
    wl.assert_pass("pty pair restored once its index was free");
}

/// A devpts instance of the tree's own mount namespace with a pair of it,
/// beside a pty of cryo's devpts of the same index (wl_ptyns): mounted
/// anew at the restore and the pair made there, both pairs with their
/// indexes, settings and data flow, over two rounds.
#[test]
fn pty_of_own_devpts_instance_two_rounds() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_ptyns", &[], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    for round in 0..2 {
        let img = dir.subdir(&format!("img{round}"));
        dump_and_maybe_restore(&mut wl, &guard, &img, false);
        let img_s = img.to_str().expect("utf-8 path");
        let show = run_cryo(&["image", "show", img_s], &[]);
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(
            text.contains("of the tree's own devpts"),
            "image show lacks the tree's own devpts: {text}"
        );
        assert_cryo_ok(&run_cryo(&["image", "verify", img_s], &[]), "image verify");
    }
    wl.assert_pass("wl_ptyns after two restores");
}
