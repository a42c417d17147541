//! A container whose root is a directory: the process unshares its mount
//! namespace, builds a root of binds in DIR/root and pivot_roots into it.
//!
//! `wl_rootfs --ready FILE --verdict FILE --tmp DIR`
//!
//! DIR/root holds a file `marker` and becomes a mount (a bind of itself);
//! in it go read-only /usr (the host's, with lib, lib64 and bin linking
//! into it as on a merged-/usr system), /dev, a new proc, a tmpfs on /tmp
//! holding `note`, and, at their own paths, the directory of this binary
//! and the directory of the ready and verdict files (so that both work
//! from inside). Then pivot_root, the old root unmounted, and the process
//! works in /tmp holding descriptors on /tmp/note and /marker. On SIGTERM
//! it checks the files, the descriptors, its working directory, that its
//! mounts are exactly those, /usr read-only, and that the host's other
//! directories are out of reach.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_rootfs";
const NOTE: &str = "a note on the container's tmpfs\n";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn c(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

fn mount(src: &Path, at: &Path, fstype: Option<&str>, flags: u64) -> Result<(), String> {
    let fstype = fstype.map(|f| std::ffi::CString::new(f).unwrap_or_default());
    // SAFETY: mount reads NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c(src).as_ptr(),
            c(at).as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(os_err(&format!("mount on {}", at.display())));
    }
    Ok(())
}

/// Bind host directory `dir` at the same path below `root`.
fn bind_same(root: &Path, dir: &Path) -> Result<PathBuf, String> {
    let at = root.join(dir.strip_prefix("/").unwrap_or(dir));
    std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
    mount(dir, &at, None, libc::MS_BIND)?;
    Ok(Path::new("/").join(dir.strip_prefix("/").unwrap_or(dir)))
}

/// The root, built and entered; returns the mountpoints made.
fn enter_root(root: &Path, keep: &[PathBuf]) -> Result<BTreeSet<String>, String> {
    let io = |w: String| move |e: std::io::Error| format!("{w}: {e}");
    // SAFETY: unshare takes a flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(os_err("unshare(CLONE_NEWNS)"));
    }
    mount(
        Path::new("none"),
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
    )?;
    std::fs::write(root.join("marker"), "rootfs").map_err(io("marker".into()))?;
    mount(root, root, None, libc::MS_BIND)?;
    for d in ["usr", "dev", "proc", "tmp", "old"] {
        std::fs::create_dir_all(root.join(d)).map_err(io(d.into()))?;
    }
    for (l, t) in [
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("bin", "usr/bin"),
    ] {
        let _ = std::os::unix::fs::symlink(t, root.join(l));
    }
    let mut made: BTreeSet<String> = ["/", "/usr", "/dev", "/proc", "/tmp"]
        .map(String::from)
        .into();
    mount(Path::new("/usr"), &root.join("usr"), None, libc::MS_BIND)?;
    let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
    mount(Path::new("none"), &root.join("usr"), None, ro)?;
    mount(Path::new("/dev"), &root.join("dev"), None, libc::MS_BIND)?;
    mount(Path::new("proc"), &root.join("proc"), Some("proc"), 0)?;
    mount(Path::new("cryo-wl"), &root.join("tmp"), Some("tmpfs"), 0)?;
    std::fs::write(root.join("tmp/note"), NOTE).map_err(io("note".into()))?;
    for k in keep {
        made.insert(bind_same(root, k)?.display().to_string());
    }
    std::env::set_current_dir(root).map_err(io("chdir".into()))?;
    nix_pivot()?;
    std::env::set_current_dir("/tmp").map_err(io("chdir /tmp".into()))?;
    Ok(made)
}

fn nix_pivot() -> Result<(), String> {
    let (dot, old) = (c(Path::new(".")), c(Path::new("old")));
    // SAFETY: pivot_root reads two NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) } != 0 {
        return Err(os_err("pivot_root"));
    }
    // SAFETY: umount2 reads a path; the old root is ours to let go.
    if unsafe { libc::umount2(c(Path::new("/old")).as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os_err("umount /old"));
    }
    std::fs::remove_dir("/old").map_err(|e| format!("rmdir /old: {e}"))
}

fn mountpoints() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn check(made: &BTreeSet<String>, note: &mut std::fs::File, marker: &std::fs::File) -> Vec<String> {
    let mut fails = Vec::new();
    let now = mountpoints();
    if &now != made {
        fails.push(format!("mounts {now:?}, not {made:?}"));
    }
    for (p, want) in [("/marker", "rootfs"), ("/tmp/note", NOTE)] {
        match std::fs::read_to_string(p) {
            Ok(s) if s == want => {}
            other => fails.push(format!("{p} reads {other:?}")),
        }
    }
    let mut rest = String::new();
    if note
        .read_to_string(&mut rest)
        .map(|_| rest != NOTE[5..])
        .unwrap_or(true)
    {
        fails.push(format!("the held note reads {rest:?}"));
    }
    let id = |m: std::io::Result<std::fs::Metadata>| m.map(|m| (m.dev(), m.ino())).ok();
    if id(marker.metadata()) != id(std::fs::metadata("/marker")) {
        fails.push("the held marker is not /marker".into());
    }
    if id(std::fs::metadata(".")) != id(std::fs::metadata("/tmp")) {
        fails.push(format!(
            "working in {:?}, not /tmp",
            std::env::current_dir()
        ));
    }
    if std::fs::write("/usr/cryo-wl-rootfs", "x").is_ok() {
        let _ = std::fs::remove_file("/usr/cryo-wl-rootfs");
        fails.push("/usr is writable".into());
    }
    for gone in ["/etc", "/var", "/root"] {
        if Path::new(gone).exists() {
            fails.push(format!("the host's {gone} is in reach"));
        }
    }
    fails
}

fn run(a: &wl::Args, base: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| format!("exe: {e}"))?;
    let mut keep: Vec<PathBuf> = [exe.parent(), a.ready.parent(), a.verdict.parent()]
        .into_iter()
        .flatten()
        .map(Path::to_path_buf)
        .collect();
    keep.sort();
    keep.dedup();
    let root = base.join("root");
    std::fs::create_dir_all(&root).map_err(|e| format!("root: {e}"))?;
    let made = enter_root(&root, &keep)?;
    let mut note = std::fs::File::open("/tmp/note").map_err(|e| format!("note: {e}"))?;
    let mut five = [0u8; 5];
    note.read_exact(&mut five)
        .map_err(|e| format!("note: {e}"))?;
    let marker = std::fs::File::open("/marker").map_err(|e| format!("marker: {e}"))?;
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(check(&made, &mut note, &marker))
}

fn main() {
    let usage = "wl_rootfs --ready FILE --verdict FILE --tmp DIR";
    let a = wl::Args::parse(usage);
    let base = a.tmp_dir(NAME, usage);
    wl::close_extra_fds();
    let result = run(&a, &base);
    wl::finish(NAME, &a.verdict, result);
}
