//! Restoring damaged, missing or foreign images must fail cleanly: non-zero
//! exit, a message naming the file at fault, no panic, no hang, and nothing
//! left running.

use std::path::Path;

use cryo_tests::*;

#[derive(Clone, Copy, Debug)]
enum Damage {
    TruncateToZero,
    TruncateToHalf,
    Delete,
    FlipMiddleByte,
    FlipByteNearEnd,
    GarbageSameSize,
}

const DAMAGES: [Damage; 6] = [
    Damage::TruncateToZero,
    Damage::TruncateToHalf,
    Damage::Delete,
    Damage::FlipMiddleByte,
    Damage::FlipByteNearEnd,
    Damage::GarbageSameSize,
];

fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Applies `damage` to `path`; returns false if it would not change the file.
fn apply(path: &Path, damage: Damage) -> bool {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let len = data.len();
    let new = match damage {
        Damage::Delete => {
            std::fs::remove_file(path).unwrap_or_else(|e| panic!("rm {}: {e}", path.display()));
            return true;
        }
        Damage::TruncateToZero => Vec::new(),
        Damage::TruncateToHalf => data[..len / 2].to_vec(),
        Damage::FlipMiddleByte => {
            let mut d = data.clone();
            if len > 0 {
                d[len / 2] ^= 0xff;
            }
            d
        }
        Damage::FlipByteNearEnd => {
            let mut d = data.clone();
            if len > 0 {
                d[len.saturating_sub(3)] ^= 0xff;
            }
            d
        }
        Damage::GarbageSameSize => {
            let seed = path.as_os_str().len() as u64 * 0x9E37_79B9 + len as u64;
            let mut g = garbage(len, seed);
            if g == data && len > 0 {
                g[0] ^= 0xff;
            }
            g
        }
    };
    if new == data {
        return false;
    }
    std::fs::write(path, new).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    true
}

/// Runs `cryo restore -D img -d` expecting a clean failure whose message
/// contains one of `names`. Returns the problems found and cryo's stderr.
fn expect_refused_err(img: &Path, pid: i32, names: &[&str], case: &str) -> (Vec<String>, String) {
    let mut problems = Vec::new();
    let mut stderr = String::new();
    let img_s = img.to_str().expect("utf-8 path");
    match try_run_cryo(&["restore", "-D", img_s, "-d"], &[], CRYO_TIMEOUT) {
        Err(e) => problems.push(format!("{case}: {e}")),
        Ok(out) => {
            stderr = stderr_of(&out);
            eprintln!("{case}: {} {:?}", out.status, stderr.trim_end());
            if let Err(e) = check_cryo_failed_cleanly(&out) {
                problems.push(format!("{case}: {e}"));
            } else {
                let err = stderr_of(&out);
                if !names.iter().any(|n| err.contains(n)) {
                    problems.push(format!("{case}: stderr does not name {names:?}: {err:?}"));
                }
            }
        }
    }
    if pid > 0 {
        // A task cryo started and then gave up on may have been reparented to
        // us (subreaper): reap it. Anything still running is a failure.
        let _ = try_reap(pid);
        if pid_alive(pid) {
            problems.push(format!(
                "{case}: pid {pid} is alive after the failed restore"
            ));
            kill_and_reap(pid);
        }
    }
    (problems, stderr)
}

fn expect_refused(img: &Path, pid: i32, names: &[&str], case: &str) -> Vec<String> {
    expect_refused_err(img, pid, names, case).0
}

#[test]
fn damaged_images_are_refused() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let pristine = dir.subdir("pristine");
    dump_ok(&mut wl, &pristine, &[]);

    let names = file_names(&pristine);
    for want in [
        "inventory.img".to_string(),
        "pstree.img".to_string(),
        format!("core-{pid}.img"),
        format!("mm-{pid}.img"),
        format!("pagemap-{pid}.img"),
        format!("pages-{pid}.img"),
        format!("fdinfo-{pid}.img"),
        "files.img".to_string(),
    ] {
        assert!(names.contains(&want), "image lacks {want}: {names:?}");
    }

    let mut problems = Vec::new();
    let mut cases = 0;
    // Only image files: anything else cryo may write there (logs, stats) is
    // not covered by the inventory.
    for name in names.iter().filter(|n| n.ends_with(".img")) {
        for damage in DAMAGES {
            // The directory name must not contain the file name: the
            // message has to name the file, not merely the path of the image.
            let copy = dir.join(&format!("case-{cases}"));
            copy_dir(&pristine, &copy);
            if !apply(&copy.join(name), damage) {
                let _ = std::fs::remove_dir_all(&copy);
                continue;
            }
            cases += 1;
            let case = format!("{name} {damage:?}");
            problems.extend(expect_refused(&copy, pid, &[name.as_str()], &case));
            let _ = std::fs::remove_dir_all(&copy);
        }
    }

    // A newer format major version is refused with a clear message.
    {
        let copy = dir.join("case-newer");
        copy_dir(&pristine, &copy);
        let mut inv = cryo_image::read_inventory(&copy).expect("read the pristine inventory");
        inv.format_major += 1;
        cryo_image::write_inventory(&copy, &inv).expect("rewrite the inventory");
        cases += 1;
        let case = format!("inventory.img with format_major {}", inv.format_major);
        let (p, err) = expect_refused_err(&copy, pid, &["inventory.img"], &case);
        let lower = err.to_lowercase();
        if p.is_empty() && !(lower.contains("format") || lower.contains("version")) {
            problems.push(format!(
                "{case}: message does not mention the format version: {err:?}"
            ));
        }
        problems.extend(p);
        let _ = std::fs::remove_dir_all(&copy);
    }

    // An image from a CPU with another XSAVE layout (here: an XSAVE area of
    // a different size, consistently re-sealed) is refused naming the core.
    {
        let copy = dir.join("case-cpu");
        copy_dir(&pristine, &copy);
        let core_name = format!("core-{pid}.img");
        let mut core: cryo_image::proto::CoreEntry =
            cryo_image::read_one(&copy, &core_name, cryo_image::Kind::Core).expect("read core");
        core.xsave.truncate(832);
        let info = cryo_image::write_one(&copy, &core_name, cryo_image::Kind::Core, &core)
            .expect("write core");
        let mut inv = cryo_image::read_inventory(&copy).expect("read inventory");
        for f in inv.files.iter_mut().filter(|f| f.name == core_name) {
            f.size = info.size;
            f.xxh3 = info.xxh3;
        }
        cryo_image::write_inventory(&copy, &inv).expect("rewrite the inventory");
        cases += 1;
        let case = format!("{core_name} from another CPU");
        let (p, err) = expect_refused_err(&copy, pid, &[core_name.as_str()], &case);
        if p.is_empty() && !err.contains("XSAVE") {
            problems.push(format!("{case}: message does not say XSAVE: {err:?}"));
        }
        problems.extend(p);
        let _ = std::fs::remove_dir_all(&copy);
    }

    // The pristine image still restores: the checks above would have
    // noticed a working restore.
    restore_ok(&mut wl, &pristine);
    wl.assert_pass("restore of the pristine image after the damaged ones");

    eprintln!("{cases} damaged-image cases run");
    assert!(
        problems.is_empty(),
        "{} of {cases} damaged-image cases misbehaved:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn restore_from_empty_directory_fails() {
    become_subreaper();
    let dir = TestDir::new();
    let img = dir.subdir("empty");
    let problems = expect_refused(&img, 0, &["inventory.img"], "empty directory");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn restore_from_nonexistent_directory_fails() {
    become_subreaper();
    let dir = TestDir::new();
    let img = dir.join("does-not-exist");
    let img_s = img.to_str().unwrap().to_string();
    let problems = expect_refused(
        &img,
        0,
        &[img_s.as_str(), "inventory.img"],
        "nonexistent directory",
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Without root, cryo refuses an image another user wrote (an image is a
/// program's memory, registers and descriptors: restoring it would run what
/// that user chose), naming the file and the owner; nothing is started,
/// and root restores the same image afterwards.
#[test]
fn image_of_another_user_is_refused_without_root() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    become_subreaper();
    let dir = TestDir::new();
    let mut wl = Workload::single_with("nanosleep", &dir, &[]);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &[]);
    // Readable by the other user, so only the ownership stands in the way;
    // the binary copied where that user can run it.
    let perm = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
    };
    perm(dir.path(), 0o755);
    perm(&img, 0o755);
    for name in file_names(&img) {
        perm(&img.join(name), 0o644);
    }
    let cryo = dir.join("cryo");
    std::fs::copy(cryo_bin(), &cryo).expect("copy cryo");
    perm(&cryo, 0o755);
    const NOBODY: u32 = 65534;
    let out = std::process::Command::new(&cryo)
        .args(["restore", "-D", img.to_str().expect("utf-8"), "-d"])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cryo as uid 65534");
    let err = stderr_of(&out);
    check_cryo_failed_cleanly(&out).unwrap_or_else(|e| panic!("restore as uid {NOBODY}: {e}"));
    for want in [
        img.to_str().expect("utf-8"),
        "owned by uid 0",
        &format!("uid {NOBODY}"),
        "only root",
    ] {
        assert!(err.contains(want), "stderr does not say {want:?}:\n{err}");
    }
    let _ = try_reap(pid);
    assert!(!pid_alive(pid), "pid {pid} runs after the refused restore");
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored by root after another user was refused");
}
