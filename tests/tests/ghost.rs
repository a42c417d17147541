//! Checkpoint/restore scenarios of files with no name left (wl_ghost):
//! mappings of deleted files and memfds (private and shared, one mapped
//! twice, one whose name now belongs to another file), a removed working
//! directory, a removed directory, device node and FIFO held open. The
//! workload checks contents, identity and owners after the restore, and
//! that every name cryo made again is gone.

use cryo_tests::*;

fn start(dir: &TestDir, extra: &[&str]) -> (Workload, TreeGuard) {
    let tmp = dir.subdir("tmp");
    let mut args = vec!["--tmp", tmp.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let wl = Workload::start("wl_ghost", &args, dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    (wl, guard)
}

#[test]
fn ghosts_kill_and_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, &[]);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("files without a name restored");
}

/// Reading the files for the image changes none of them.
#[test]
fn ghosts_leave_running() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir, &[]);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("files without a name after dump -R");
}

/// A restored tree's remade files are dumped and restored again (their
/// names do not grow).
#[test]
fn ghosts_two_cycles() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, &[]);
    for cycle in 0..2 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("files without a name after two cycles");
}

/// A mapped memfd larger than --ghost-limit is refused by name.
#[test]
fn ghosts_mapping_over_the_limit_refused() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir, &[]);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &["--ghost-limit", "4096"], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump with --ghost-limit 4096: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("ghost-limit") && err.contains(&format!("task {}", wl.pid())),
        "stderr: {err}"
    );
    wl.assert_pass("files without a name after a refused dump");
}

/// A descriptor of a namespace file is refused, naming it as one.
#[test]
fn ghosts_namespace_fd_refused() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir, &["--ns-fd", "1"]);
    let img = dir.subdir("img");
    let out = dump(wl.pid(), &img, &[], &[]);
    if let Err(e) = check_cryo_failed_cleanly(&out) {
        panic!("dump of a task holding /proc/self/ns/uts: {e}");
    }
    let err = stderr_of(&out);
    assert!(
        err.contains("namespace file") && err.contains("uts:["),
        "stderr: {err}"
    );
    wl.assert_pass("files without a name after a refused dump");
}
