//! Shared anonymous memory of several layouts across three levels of a
//! tree, and private pages shared copy-on-write (wl_shm): after a restore
//! every process sees each shared region as one object with its contents,
//! and the private pages a child never wrote are its parent's frames.

use cryo_tests::*;

fn start(dir: &TestDir, cow_frames: bool) -> (Workload, TreeGuard) {
    let args: &[&str] = if cow_frames {
        &["--cow-frames", "1"]
    } else {
        &[]
    };
    let wl = Workload::start("wl_shm", args, dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    assert_eq!(guard.pids().len(), 3, "wl_shm is three processes");
    (wl, guard)
}

#[test]
fn shm_layouts_kill_and_restore() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, true);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
    restore_ok(&mut wl, &img);
    wl.assert_pass("shared memory and copy-on-write frames restored");
}

#[test]
fn shm_layouts_leave_running() {
    let dir = TestDir::new();
    let (mut wl, _guard) = start(&dir, true);
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    wl.assert_pass("shared memory and copy-on-write frames after dump -R");
}

#[test]
fn shm_layouts_two_cycles() {
    let dir = TestDir::new();
    let (mut wl, guard) = start(&dir, true);
    for cycle in 0..2 {
        let img = dir.subdir(&format!("img-{cycle}"));
        dump_ok(&mut wl, &img, &[]);
        assert!(reap_gone(guard.pids(), std::time::Duration::from_secs(10)));
        restore_ok(&mut wl, &img);
    }
    wl.assert_pass("shared memory and copy-on-write frames after two cycles");
}
