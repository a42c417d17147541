//! A process in a mount namespace of its own, a copy of the host's plus
//! mounts it made, which a restore must make again: files of a tmpfs with
//! their contents and metadata, binds, peer groups and flags.
//!
//! `wl_mntns --ready FILE --verdict FILE --tmp DIR [--proc 1] [--ramfs 1]
//!  [--host-peer DIR2] [--overlay 1]`
//!
//! The process unshares its mount namespace (nothing else: every other
//! mount is the host's) and, under DIR, mounts a tmpfs `t` (size=8m,
//! mode=0751) with files: nested directories, a text file, a sparse file
//! (a byte, then a pattern after 2 MiB of hole), a symbolic link, a fifo,
//! two names of one file, a 0600 file owned by 1000:1001, a sticky 01777
//! directory, set times; makes `t` shared, binds `t/a` on `b` (a peer of
//! `t`) and `t` on `s`, made a slave of their group; mounts a second tmpfs
//! `ro` with one file and makes it read-only, nosuid, nodev, and new
//! devpts (ptmxmode=0666), sysfs and mqueue instances. It keeps a
//! descriptor on the text file at offset 3 and one on the directory
//! `t/a`, works in `t/a`, and forks a child that stays in the namespace.
//! On SIGTERM it checks all of that, that a mount made under `t/a` now
//! reaches `b` and `s` (the peer group and the slave work), what the
//! child reads through `b`, and that its namespace is not the one it
//! started in.
//!
//! With `--proc 1`, the work above is done by the init of a new pid
//! namespace (the parent waits for it), which also mounts a proc of its
//! pid namespace on /proc: after the restore /proc/1 must be itself (with
//! `--proc-fd 1`, it also holds a descriptor on that proc's
//! /proc/self/stat, which cryo refuses).
//! With `--ramfs 1`, it also mounts a ramfs on DIR/x (a filesystem cryo
//! does not make again: refused, or named external); after the restore
//! DIR/x must be a mount holding a file `marker`.
//! With `--host-peer DIR2` (a shared mount of the test's namespace, whose
//! copy in this one is its peer), after the restore DIR2/late must be a
//! mount here: the test mounts it in its own namespace, and it comes
//! through the peer group.
//! With `--overlay 1`, it also mounts an overlay on DIR/o of DIR/lower
//! (holding `low.txt`) with its upper and work directories in DIR, and
//! writes `new.txt` through it: after the restore both must read back.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_mntns";
const TEXT: &str = "the tmpfs of a mount namespace keeps this text\n";
const HOLE: u64 = 2 << 20;
const MTIME: i64 = 1_600_000_000;

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn mnt_ns() -> String {
    std::fs::read_link("/proc/self/ns/mnt")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn c(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

fn mount(src: &str, at: &Path, fstype: Option<&str>, flags: u64, data: &str) -> Result<(), String> {
    let src = std::ffi::CString::new(src).unwrap_or_default();
    let fstype = fstype.map(|f| std::ffi::CString::new(f).unwrap_or_default());
    let data = std::ffi::CString::new(data).unwrap_or_default();
    // SAFETY: mount reads NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            c(at).as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(os_err(&format!("mount on {}", at.display())));
    }
    Ok(())
}

fn pattern(i: u64) -> u8 {
    (i as u8).wrapping_mul(13).wrapping_add(5)
}

fn set_mtime(p: &Path, secs: i64) -> Result<(), String> {
    let t = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 250,
        },
    ];
    // SAFETY: utimensat reads the path and two timespecs that live here.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(os_err("utimensat"));
    }
    Ok(())
}

/// The tmpfs files, the binds and the read-only mount under `base`.
fn make(base: &Path) -> Result<(), String> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    for d in ["t", "b", "s", "ro"] {
        std::fs::create_dir_all(base.join(d)).map_err(io(d))?;
    }
    let t = base.join("t");
    mount("cryo-wl", &t, Some("tmpfs"), 0, "size=8m,mode=0751")?;
    std::fs::create_dir_all(t.join("a/b/deep")).map_err(io("a/b/deep"))?;
    std::fs::create_dir(t.join("a/p")).map_err(io("a/p"))?;
    std::fs::write(t.join("a/b/c.txt"), TEXT).map_err(io("c.txt"))?;
    let f = std::fs::File::create(t.join("a/sparse")).map_err(io("sparse"))?;
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"x", 0).map_err(io("sparse"))?;
    let tail: Vec<u8> = (0..10_000).map(pattern).collect();
    f.write_all_at(&tail, HOLE).map_err(io("sparse"))?;
    std::os::unix::fs::symlink("b/c.txt", t.join("a/link")).map_err(io("link"))?;
    // SAFETY: mkfifo reads the path.
    if unsafe { libc::mkfifo(c(&t.join("a/fifo")).as_ptr(), 0o640) } != 0 {
        return Err(os_err("mkfifo"));
    }
    std::fs::hard_link(t.join("a/b/c.txt"), t.join("a/again.txt")).map_err(io("hard link"))?;
    std::fs::write(t.join("a/secret"), "s").map_err(io("secret"))?;
    std::os::unix::fs::chown(t.join("a/secret"), Some(1000), Some(1001)).map_err(io("chown"))?;
    std::fs::set_permissions(t.join("a/secret"), PermissionsExt::from_mode(0o600))
        .map_err(io("chmod"))?;
    std::fs::create_dir(t.join("sticky")).map_err(io("sticky"))?;
    std::fs::set_permissions(t.join("sticky"), PermissionsExt::from_mode(0o1777))
        .map_err(io("chmod"))?;
    set_mtime(&t.join("a/b/c.txt"), MTIME)?;
    set_mtime(&t.join("a/b/deep"), MTIME + 1)?;
    mount("", &t, None, libc::MS_SHARED, "")?;
    mount(
        &t.join("a").display().to_string(),
        &base.join("b"),
        None,
        libc::MS_BIND,
        "",
    )?;
    mount(
        &t.display().to_string(),
        &base.join("s"),
        None,
        libc::MS_BIND,
        "",
    )?;
    mount("", &base.join("s"), None, libc::MS_SLAVE, "")?;
    let ro = base.join("ro");
    mount("cryo-wl-ro", &ro, Some("tmpfs"), 0, "size=1m")?;
    std::fs::write(ro.join("kept"), "kept").map_err(io("ro/kept"))?;
    let flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    mount("", &ro, None, flags, "")?;
    // New instances of the other filesystems cryo makes again.
    for (d, fstype, data) in VIRTUAL {
        std::fs::create_dir_all(base.join(d)).map_err(io(d))?;
        mount(fstype, &base.join(d), Some(fstype), libc::MS_NOEXEC, data)?;
    }
    Ok(())
}

/// Mounts of new virtual filesystems: (directory, type, options); each
/// is checked by a file it must show.
const VIRTUAL: [(&str, &str, &str); 3] = [
    ("pts", "devpts", "newinstance,ptmxmode=0666,mode=0620"),
    ("sys", "sysfs", ""),
    ("mq", "mqueue", ""),
];

fn check_virtual(base: &Path, fails: &mut Vec<String>) {
    for ((d, fstype, _), shows) in VIRTUAL.iter().zip(["ptmx", "kernel", ""]) {
        let at = base.join(d);
        let Some(m) = mount_of(&at) else {
            fails.push(format!("{d} is not a mount"));
            continue;
        };
        let got = m
            .iter()
            .skip_while(|x| *x != "-")
            .nth(1)
            .cloned()
            .unwrap_or_default();
        let opts_ok = *fstype != "devpts" || m.last().is_some_and(|o| o.contains("ptmxmode=666"));
        if got != *fstype || !opts_ok || (!shows.is_empty() && !at.join(shows).exists()) {
            fails.push(format!(
                "{d} is {m:?}, not a new {fstype} showing {shows:?}"
            ));
        }
    }
}

fn make_overlay(base: &Path) -> Result<(), String> {
    for d in ["lower", "up", "work", "o"] {
        std::fs::create_dir_all(base.join(d)).map_err(|e| format!("{d}: {e}"))?;
    }
    std::fs::write(base.join("lower/low.txt"), "lower").map_err(|e| format!("low.txt: {e}"))?;
    let p = |d: &str| base.join(d).display().to_string();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        p("lower"),
        p("up"),
        p("work")
    );
    mount("overlay", &base.join("o"), Some("overlay"), 0, &data)?;
    std::fs::write(base.join("o/new.txt"), "upper").map_err(|e| format!("new.txt: {e}"))
}

fn check_overlay(base: &Path, fails: &mut Vec<String>) {
    let o = base.join("o");
    let fstype = mount_of(&o).and_then(|m| m.iter().skip_while(|x| *x != "-").nth(1).cloned());
    if fstype.as_deref() != Some("overlay") {
        fails.push(format!("o is {fstype:?}, not an overlay"));
    }
    for (f, want) in [("low.txt", "lower"), ("new.txt", "upper")] {
        match std::fs::read_to_string(o.join(f)) {
            Ok(s) if s == want => {}
            other => fails.push(format!("o/{f} reads {other:?}")),
        }
    }
}

/// The line of /proc/self/mountinfo for `mp`, split in fields.
fn mount_of(mp: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mp = mp.display().to_string();
    text.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(mp.as_str()))
        .map(|l| l.split(' ').map(str::to_string).collect())
}

/// The peer group in a mountinfo line's optional fields (`shared:N`).
fn tag(fields: &[String], name: &str) -> Option<String> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(name).map(str::to_string))
}

fn check_mounts(base: &Path, fails: &mut Vec<String>) {
    let [t, b, s, ro] = ["t", "b", "s", "ro"].map(|d| mount_of(&base.join(d)));
    let (Some(t), Some(b), Some(s), Some(ro)) = (t, b, s, ro) else {
        fails.push("one of the mounts t, b, s, ro is gone".into());
        return;
    };
    let fstype = |f: &[String]| {
        f.iter()
            .skip_while(|x| *x != "-")
            .nth(1)
            .cloned()
            .unwrap_or_default()
    };
    for (name, f) in [("t", &t), ("b", &b), ("s", &s), ("ro", &ro)] {
        if fstype(f) != "tmpfs" {
            fails.push(format!("{name} is a {} mount, not tmpfs", fstype(f)));
        }
    }
    if b.get(3).map(String::as_str) != Some("/a") {
        fails.push(format!("b shows {:?} of its tmpfs, not /a", b.get(3)));
    }
    let group = tag(&t, "shared:");
    if group.is_none() || tag(&b, "shared:") != group {
        fails.push(format!(
            "t and b are not peers: {:?} and {:?}",
            t.get(6),
            b.get(6)
        ));
    }
    if tag(&s, "master:") != group || tag(&s, "shared:").is_some() {
        fails.push(format!("s is not a slave of t's group: {:?}", s.get(6)));
    }
    let opts = ro.get(5).cloned().unwrap_or_default();
    for want in ["ro", "nosuid", "nodev"] {
        if !opts.split(',').any(|o| o == want) {
            fails.push(format!("ro's options {opts} lack {want}"));
        }
    }
    if !ro.iter().any(|f| f.contains("size=1024k")) {
        fails.push(format!("ro's filesystem options are {:?}", ro.last()));
    }
    // The peer group and the slave still propagate.
    let p = base.join("t/a/p");
    match mount("cryo-wl-p", &p, Some("tmpfs"), 0, "size=64k") {
        Err(e) => fails.push(e),
        Ok(()) => {
            let dev = |x: &Path| std::fs::metadata(x).map(|m| m.dev()).unwrap_or(0);
            let new = dev(&p);
            for (name, at) in [("b/p", base.join("b/p")), ("s/a/p", base.join("s/a/p"))] {
                if dev(&at) != new {
                    fails.push(format!("a mount on t/a/p does not reach {name}"));
                }
            }
            // SAFETY: umount2 reads the path; the mount is ours.
            unsafe { libc::umount2(c(&p).as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn check_files(base: &Path, fails: &mut Vec<String>) {
    let t = base.join("t");
    let md = |p: &str| std::fs::symlink_metadata(t.join(p));
    match md("") {
        Ok(m) if m.mode() & 0o7777 == 0o751 => {}
        other => fails.push(format!("the tmpfs root: {:?}", other.map(|m| m.mode()))),
    }
    match std::fs::read_to_string(t.join("a/b/c.txt")) {
        Ok(s) if s == TEXT => {}
        other => fails.push(format!("c.txt reads {other:?}")),
    }
    match md("a/b/c.txt") {
        Ok(m) if m.mtime() == MTIME && m.mtime_nsec() == 250 => {}
        other => fails.push(format!(
            "c.txt's mtime: {:?}",
            other.map(|m| (m.mtime(), m.mtime_nsec()))
        )),
    }
    match md("a/b/deep") {
        Ok(m) if m.mtime() == MTIME + 1 => {}
        other => fails.push(format!("deep's mtime: {:?}", other.map(|m| m.mtime()))),
    }
    match (md("a/b/c.txt"), md("a/again.txt")) {
        (Ok(a), Ok(b)) if a.ino() == b.ino() && a.nlink() == 2 => {}
        _ => fails.push("again.txt is not a second name of c.txt".into()),
    }
    match std::fs::read(t.join("a/sparse")) {
        Ok(v) => {
            let good = v.len() as u64 == HOLE + 10_000
                && v[0] == b'x'
                && v[1..HOLE as usize].iter().all(|&b| b == 0)
                && v[HOLE as usize..]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(i as u64));
            if !good {
                fails.push(format!("the sparse file's {} bytes differ", v.len()));
            }
            if md("a/sparse").map(|m| m.blocks()).unwrap_or(u64::MAX) > 256 {
                fails.push("the sparse file lost its hole".into());
            }
        }
        Err(e) => fails.push(format!("sparse: {e}")),
    }
    match std::fs::read_link(t.join("a/link")) {
        Ok(l) if l == Path::new("b/c.txt") => {}
        other => fails.push(format!("the link points to {other:?}")),
    }
    match md("a/fifo") {
        Ok(m) if m.file_type().is_fifo() && m.mode() & 0o777 == 0o640 => {}
        other => fails.push(format!("the fifo: {:?}", other.map(|m| m.mode()))),
    }
    match md("a/secret") {
        Ok(m) if (m.uid(), m.gid(), m.mode() & 0o7777) == (1000, 1001, 0o600) => {}
        other => fails.push(format!(
            "secret: {:?}",
            other.map(|m| (m.uid(), m.gid(), m.mode()))
        )),
    }
    match md("sticky") {
        Ok(m) if m.mode() & 0o7777 == 0o1777 => {}
        other => fails.push(format!("sticky: {:?}", other.map(|m| m.mode()))),
    }
    match std::fs::read_to_string(base.join("ro/kept")) {
        Ok(s) if s == "kept" => {}
        other => fails.push(format!("ro/kept reads {other:?}")),
    }
    if std::fs::write(base.join("ro/new"), "x").is_ok() {
        fails.push("ro is writable".into());
    }
}

/// The descriptors and the working directory made before the dump.
struct Held {
    text: std::fs::File,
    dir: std::fs::File,
}

fn hold(base: &Path) -> Result<Held, String> {
    use std::io::{Read, Seek};
    let mut text =
        std::fs::File::open(base.join("t/a/b/c.txt")).map_err(|e| format!("open: {e}"))?;
    let mut three = [0u8; 3];
    text.read_exact(&mut three)
        .map_err(|e| format!("read: {e}"))?;
    let _ = text.stream_position();
    let dir = std::fs::File::open(base.join("t/a")).map_err(|e| format!("open t/a: {e}"))?;
    std::env::set_current_dir(base.join("t/a")).map_err(|e| format!("chdir: {e}"))?;
    Ok(Held { text, dir })
}

fn check_held(base: &Path, h: &mut Held, fails: &mut Vec<String>) {
    use std::io::Read;
    let mut rest = String::new();
    match h.text.read_to_string(&mut rest) {
        Ok(_) if rest == TEXT[3..] => {}
        other => fails.push(format!("the held descriptor reads {other:?} {rest:?}")),
    }
    let ino = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let of = |f: &std::fs::File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    if of(&h.text) != ino(&base.join("t/a/b/c.txt")) {
        fails.push("the held descriptor is not c.txt".into());
    }
    if of(&h.dir) != ino(&base.join("t/a")) {
        fails.push("the held directory is not t/a".into());
    }
    if ino(Path::new(".")) != ino(&base.join("t/a")) {
        fails.push(format!(
            "the working directory is {:?}, not t/a",
            std::env::current_dir()
        ));
    }
}

/// Everything but the verdict: set up, wait for SIGTERM, check.
fn work(
    a: &wl::Args,
    base: &Path,
    with_proc: bool,
    ready: &dyn Fn() -> Result<(), String>,
) -> Result<Vec<String>, String> {
    let ramfs = a.get("ramfs") == Some("1");
    let host = mnt_ns();
    // SAFETY: unshare takes a flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(os_err("unshare(CLONE_NEWNS)"));
    }
    make(base)?;
    if a.get("overlay") == Some("1") {
        make_overlay(base)?;
    }
    if ramfs {
        std::fs::create_dir_all(base.join("x")).map_err(|e| format!("x: {e}"))?;
        mount("cryo-wl-x", &base.join("x"), Some("ramfs"), 0, "")?;
    }
    if with_proc {
        mount(
            "proc",
            Path::new("/proc"),
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        )?;
    }
    // A descriptor on the proc of its pid namespace (refused).
    let _on_proc = (with_proc && a.get("proc-fd") == Some("1"))
        .then(|| std::fs::File::open("/proc/self/stat"))
        .transpose()
        .map_err(|e| format!("/proc/self/stat: {e}"))?;
    let mut held = hold(base)?;
    let (cmd, back) = (wl::pipe()?, wl::pipe()?);
    let via_b = base.join("b/b/c.txt");
    // SAFETY: fork of this single-threaded process; the child answers
    // with what it reads through b until `cmd` closes.
    let child = unsafe { libc::fork() };
    if child == 0 {
        wl::serve(cmd[0], back[1], &[cmd[1], back[0]], || {
            format!(
                "{} {}",
                mnt_ns(),
                std::fs::read_to_string(&via_b)
                    .unwrap_or_default()
                    .trim_end()
            )
        });
    }
    if child < 0 {
        return Err(os_err("fork"));
    }
    ready()?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let mine = mnt_ns();
    if mine == host || mine.is_empty() {
        fails.push(format!("in the host's mount namespace {mine}"));
    }
    check_files(base, &mut fails);
    check_held(base, &mut held, &mut fails);
    check_mounts(base, &mut fails);
    check_virtual(base, &mut fails);
    if a.get("overlay") == Some("1") {
        check_overlay(base, &mut fails);
    }
    if let Some(h) = a.get("host-peer") {
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        let late = Path::new(h).join("late");
        if dev(&late).is_none() || dev(&late) == dev(Path::new(h)) {
            fails.push(format!(
                "{} is not a mount here: not a peer of the host's",
                late.display()
            ));
        }
    }
    if ramfs && (mount_of(&base.join("x")).is_none() || !base.join("x/marker").exists()) {
        fails.push("x is not a mount holding marker".into());
    }
    if with_proc {
        let me = std::fs::read_link("/proc/self")
            .map(|p| p.display().to_string())
            .ok();
        if me.as_deref() != Some("1") {
            fails.push(format!(
                "/proc/self is {me:?}, not 1: /proc is not its pid namespace's"
            ));
        }
    }
    let said = wl::ask(cmd[1], back[0]);
    let want = format!("{mine} {}", TEXT.trim_end());
    if said != want {
        fails.push(format!("the child says {said:?}, not {want:?}"));
    }
    wl::end_server(cmd[1], child);
    Ok(fails)
}

fn main() {
    let usage =
        "wl_mntns --ready FILE --verdict FILE --tmp DIR [--proc 1] [--ramfs 1] [--host-peer DIR2] [--overlay 1]";
    let a = wl::Args::parse(usage);
    let base: PathBuf = a.tmp_dir(NAME, usage);
    wl::close_extra_fds();
    if wl::install_term_handler().is_err() {
        wl::finish(NAME, &a.verdict, Err("sigaction".into()));
    }
    let write_ready =
        || wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"));
    if a.get("proc") != Some("1") {
        let result = work(&a, &base, false, &write_ready);
        wl::finish(NAME, &a.verdict, result);
    }
    // The work is the init's of a new pid namespace (clone3, so that this
    // process's own children stay in its namespace); it waits for it and
    // passes SIGTERM on.
    let init = match wl::clone_sharing(libc::CLONE_NEWPID as u64) {
        Ok(0) => {
            let result = work(&a, &base, true, &write_ready);
            wl::finish(NAME, &a.verdict, result);
        }
        Ok(pid) => pid,
        Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
    };
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling and reaping our own child.
    unsafe {
        libc::kill(init, libc::SIGTERM);
        let mut st = 0;
        libc::waitpid(init, &mut st, 0);
        std::process::exit(if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st)
        } else {
            2
        });
    }
}
