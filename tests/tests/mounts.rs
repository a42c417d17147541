//! Mount namespaces: wl_mntns unshares its mount namespace (a copy of the
//! host's) and mounts a tmpfs with files of every kind, binds that are
//! peers and slaves of it, and a read-only tmpfs; the restore makes them
//! again, and none of them is left in cryo's namespace. Also a proc of the
//! tree's own pid namespace, and a filesystem cryo does not make (refused,
//! then named external).

use std::path::Path;

use cryo_tests::*;

/// The mounts of the test's own namespace at or below `base`.
fn own_mounts_under(base: &Path) -> Vec<String> {
    let base = base.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|mp| mp.starts_with(&base)))
        .map(str::to_string)
        .collect()
}

fn show_and_verify(img: &Path, shown: &[&str]) {
    let img_s = img.to_str().expect("utf-8 path");
    let out = run_cryo(&["image", "show", img_s], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in shown {
        assert!(text.contains(want), "image show lacks {want:?}: {text}");
    }
    assert_cryo_ok(&run_cryo(&["image", "verify", img_s], &[]), "image verify");
}

/// `cycles` checkpoints of wl_mntns (`extra` arguments, `procs`
/// processes), each a dump -R or a dump and a restore.
fn mntns_cycle(extra: &[&str], procs: usize, leave_running: bool, cycles: usize) {
    let dir = TestDir::new();
    let base = dir.subdir("m");
    let mut args = vec!["--tmp", base.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let mut wl = Workload::start("wl_mntns", &args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), procs, "wl_mntns is {procs} processes");
    for c in 0..cycles {
        let img = dir.subdir(&format!("img{c}"));
        dump_and_maybe_restore(&mut wl, &guard, &img, leave_running);
        show_and_verify(
            &img,
            &["mnt:[", "tmpfs-", "bind of mount", "shared:", "master:"],
        );
        let leaked = own_mounts_under(&base);
        assert!(
            leaked.is_empty(),
            "mounts of the tree's namespace in cryo's: {leaked:?}"
        );
    }
    wl.assert_pass("wl_mntns after its restores");
}

#[test]
fn mount_namespace_kill_and_restore_twice() {
    mntns_cycle(&[], 2, false, 2);
}

#[test]
fn mount_namespace_leave_running() {
    mntns_cycle(&[], 2, true, 1);
}

#[test]
fn mount_namespace_with_an_overlay() {
    mntns_cycle(&["--overlay", "1"], 2, false, 1);
}

#[test]
fn mount_namespace_with_its_pid_namespace_proc() {
    mntns_cycle(&["--proc", "1"], 3, false, 1);
}

/// A tmpfs of the test's own namespace, shared, unmounted (with what is
/// below it) at the end.
struct SharedMount(std::path::PathBuf);

impl SharedMount {
    fn new(at: std::path::PathBuf) -> SharedMount {
        let m = SharedMount(at);
        sh_mount("cryo-test-h", &m.0, Some("tmpfs"), 0);
        sh_mount("", &m.0, None, libc::MS_SHARED);
        m
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        for p in [self.0.join("late"), self.0.clone()] {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: umount2 reads the path; the mounts are this test's.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn sh_mount(src: &str, at: &Path, fstype: Option<&str>, flags: u64) {
    let c = |s: &[u8]| std::ffi::CString::new(s).expect("no NUL");
    let (src, at_c) = (c(src.as_bytes()), c(at.as_os_str().as_encoded_bytes()));
    let fstype = fstype.map(|f| c(f.as_bytes()));
    // SAFETY: mount reads NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            at_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    assert_eq!(
        r,
        0,
        "mount on {}: {}",
        at.display(),
        std::io::Error::last_os_error()
    );
}

/// A mount the workload's namespace shares with the test's (a copy made by
/// unshare of a shared mount) is a peer of it again after the restore: a
/// mount the test makes there then comes through.
#[test]
fn mount_namespace_peer_of_a_host_mount() {
    let dir = TestDir::new();
    let base = dir.subdir("m");
    let h = SharedMount::new(dir.subdir("h"));
    std::fs::create_dir(h.0.join("late")).expect("mkdir late");
    let h_s = h.0.to_str().expect("utf-8 path");
    let args = [
        "--tmp",
        base.to_str().expect("utf-8 path"),
        "--host-peer",
        h_s,
    ];
    let mut wl = Workload::start("wl_mntns", &args, &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, false);
    show_and_verify(&img, &["(group of"]);
    sh_mount("cryo-test-late", &h.0.join("late"), Some("tmpfs"), 0);
    wl.assert_pass("wl_mntns with a peer of the test's mount");
}

/// A file open on the proc the namespace's init mounts is refused, naming
/// it; the tree runs on.
#[test]
fn mount_namespace_file_on_its_late_proc_refused() {
    let dir = TestDir::new();
    let base = dir.subdir("m");
    let args = [
        "--tmp",
        base.to_str().expect("utf-8 path"),
        "--proc",
        "1",
        "--proc-fd",
        "1",
    ];
    let mut wl = Workload::start("wl_mntns", &args, &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with a file on the namespace's proc: {e}");
    }
    assert!(
        stderr_of(&out).contains("/proc/"),
        "stderr: {}",
        stderr_of(&out)
    );
    assert!(
        stderr_of(&out).contains("mounts at the restore"),
        "stderr: {}",
        stderr_of(&out)
    );
    wl.assert_pass("wl_mntns after a refused dump");
}

/// A ramfs is refused naming it and the way out; dumped with it named
/// external, the restore binds the directory it is given there.
#[test]
fn mount_namespace_unknown_filesystem_refused_then_external() {
    let dir = TestDir::new();
    let base = dir.subdir("m");
    let base_s = base.to_str().expect("utf-8 path");
    let mut wl = Workload::start("wl_mntns", &["--tmp", base_s, "--ramfs", "1"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with a ramfs: {e}");
    }
    let err = stderr_of(&out);
    for want in ["ramfs cryo-wl-x", "--external mnt["] {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
    let x = format!("mnt[{base_s}/x]:scratch");
    dump_ok(&mut wl, &img, &["--external", &x]);
    assert!(
        reap_gone(guard.pids(), std::time::Duration::from_secs(10)),
        "the dumped tree did not end"
    );
    let given = dir.subdir("given");
    std::fs::write(given.join("marker"), "m").expect("marker");
    let img_s = img.to_str().expect("utf-8 path");
    let missing = run_cryo(&["restore", "-D", img_s, "-d"], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&missing) {
        panic!("restore without the external path: {e}");
    }
    assert!(
        stderr_of(&missing).contains("--external mnt[scratch]:PATH"),
        "{}",
        stderr_of(&missing)
    );
    let ext = format!("mnt[scratch]:{}", given.display());
    let out = run_cryo(&["restore", "-D", img_s, "-d", "--external", &ext], &[]);
    wl.mark_running();
    assert_cryo_ok(&out, "restore with --external");
    wl.assert_restored();
    wl.assert_pass("wl_mntns with an external mount");
}

/// The init's root of its container: a directory with binds, entered by
/// pivot_root.
fn rootfs_workload(dir: &TestDir) -> (Workload, TreeGuard, std::path::PathBuf) {
    let base = dir.subdir("c");
    let wl = Workload::start(
        "wl_rootfs",
        &["--tmp", base.to_str().expect("utf-8 path")],
        dir,
    );
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard, base)
}

/// The directory of its filesystem the root mount of `pid` shows.
fn root_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .and_then(|l| l.split(' ').nth(3).map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn pivot_root_container_kill_and_restore() {
    let dir = TestDir::new();
    let (mut wl, guard, base) = rootfs_workload(&dir);
    let img = dir.subdir("img");
    dump_and_maybe_restore(&mut wl, &guard, &img, false);
    show_and_verify(&img, &["mnt:[", "tmpfs-"]);
    assert!(own_mounts_under(&base).is_empty(), "mounts leaked");
    wl.assert_pass("wl_rootfs after a restore");
}

/// The container's root moved: the restore without --root fails cleanly,
/// with --root it binds the new place.
#[test]
fn pivot_root_container_restored_elsewhere_with_root() {
    let dir = TestDir::new();
    let (mut wl, guard, base) = rootfs_workload(&dir);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(
        reap_gone(guard.pids(), std::time::Duration::from_secs(10)),
        "the dumped tree did not end"
    );
    let moved = base.join("moved");
    std::fs::rename(base.join("root"), &moved).expect("move the root");
    let img_s = img.to_str().expect("utf-8 path");
    let out = run_cryo(&["restore", "-D", img_s, "-d"], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("restore with the root gone: {e}");
    }
    let moved_s = moved.to_str().expect("utf-8 path");
    let out = run_cryo(&["restore", "-D", img_s, "-d", "--root", moved_s], &[]);
    wl.mark_running();
    assert_cryo_ok(&out, "restore --root");
    wl.assert_restored();
    assert_eq!(root_of(wl.pid()), moved_s, "the restored root");
    wl.assert_pass("wl_rootfs restored with --root");
}

/// A restore failing in a task of the namespace, once cryo made it and
/// its first task entered it, leaves no mount behind; the next restore
/// passes.
#[test]
fn mount_namespace_failed_restore_leaves_nothing() {
    let dir = TestDir::new();
    let base = dir.subdir("m");
    let mut wl = Workload::start(
        "wl_mntns",
        &["--tmp", base.to_str().expect("utf-8 path")],
        &dir,
    );
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let child = *guard
        .pids()
        .iter()
        .find(|&&p| p != wl.pid())
        .expect("wl_mntns's child");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(
        reap_gone(guard.pids(), std::time::Duration::from_secs(10)),
        "the dumped tree did not end"
    );
    let fault = format!("fail-restore-task-{child}");
    let img_s = img.to_str().expect("utf-8 path");
    let out = run_cryo(&["restore", "-D", img_s, "-d"], &[("CRYO_FAULT", &fault)]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("restore failing in a task of the namespace: {e}");
    }
    reap_zombie_children();
    let left = own_mounts_under(&base);
    assert!(left.is_empty(), "the failed restore left mounts: {left:?}");
    assert!(
        guard.pids().iter().all(|&p| !pid_alive(p)),
        "the failed restore left tasks"
    );
    restore_ok(&mut wl, &img);
    wl.assert_pass("wl_mntns restored after a failed restore");
}
