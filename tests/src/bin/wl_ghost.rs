//! Files with no name left, held by mappings, descriptors and the working
//! directory, that must come back with their contents and identity.
//!
//! `wl_ghost --ready FILE --verdict FILE --tmp DIR [--ns-fd 1]`
//!
//! In DIR it makes, then removes the names of:
//! - `priv.dat` (3 pages of 'A', 'B', 'C'), mapped private; the task wrote
//!   page 1 full of 'X' (its own copy): the file must still read 'B';
//! - `shared.dat` (2 pages of 'S'), mapped shared and open read-write: a
//!   write through the descriptor after the restore must show in the map;
//! - `twice.dat` (1 page), mapped shared at two addresses, no descriptor:
//!   a write through one must show through the other;
//! - `replaced.dat`, mapped shared, then replaced by a rename of another
//!   file over its name: the map keeps the old bytes, and the new file at
//!   that name must be left as it is (the old one comes back under a name
//!   next to it);
//! - a memfd "cryo-map" (2 pages of 'M', sealed against shrinking and
//!   growing) mapped shared and a memfd "cryo-priv" mapped private (its
//!   first byte written), neither with a descriptor;
//! - `gone-cwd` (mode 0751): its working directory, also open as a
//!   descriptor: the restored task must be in it, the same directory as
//!   the descriptor's;
//! - `gone-dir` (owner 4321:8765, fixed times): open as a descriptor;
//! - `null-node`, a character device node 1:3 (mode 0640): open
//!   read-write, it must still be /dev/null's device;
//! - `gone.fifo`, a FIFO open for reading, writing and both, with bytes
//!   queued.
//!
//! On SIGTERM it checks each, and that DIR holds only `replaced.dat` (cryo
//! removed every name it made again). `--ns-fd 1` also holds a descriptor
//! of /proc/self/ns/uts, which cryo must refuse by name.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_ghost";
const PAGE: usize = 4096;
const DIR_OWNER: (u32, u32) = (4321, 8765);
const DIR_TIMES: [(i64, i64); 2] = [(1_100_000_000, 111), (1_200_000_000, 222)];

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths")
}

fn open(p: &Path, flags: i32, mode: u32) -> Result<i32, String> {
    // SAFETY: a NUL-terminated path we own.
    let fd = unsafe { libc::open(cpath(p).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(os_err(&format!("open {}", p.display())));
    }
    Ok(fd)
}

fn write_all(fd: i32, data: &[u8]) -> Result<(), String> {
    // SAFETY: writing from our buffer.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n != data.len() as isize {
        return Err(os_err(&format!("write fd {fd}")));
    }
    Ok(())
}

fn pread(fd: i32, len: usize, off: i64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: reading into our buffer of `len` bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off) };
    buf.truncate(n.max(0) as usize);
    buf
}

/// A new file of `pages` pages, page i full of `fill[i]`, open read-write.
fn file_of(p: &Path, fill: &[u8]) -> Result<i32, String> {
    let fd = open(p, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    for &b in fill {
        write_all(fd, &[b; PAGE])?;
    }
    Ok(fd)
}

/// A mapping of `len` bytes of `fd`.
fn map(fd: i32, len: usize, flags: i32) -> Result<*mut u8, String> {
    // SAFETY: a new mapping the kernel places; fd is ours.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap"));
    }
    Ok(p.cast())
}

/// The bytes of a mapping of ours.
fn bytes<'a>(p: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: every caller passes a live read-write mapping of ours of at
    // least `len` bytes, which stays mapped for the program's life.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

fn unlink(p: &Path) -> Result<(), String> {
    std::fs::remove_file(p).map_err(|e| format!("unlink {}: {e}", p.display()))
}

/// The /proc/self/maps name of the mapping at `p`.
fn map_name(p: *mut u8) -> String {
    let want = format!("{:x}-", p as usize);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let line = maps.lines().find(|l| l.starts_with(&want)).unwrap_or("");
    // The name is what follows the first five fields.
    line.split_whitespace()
        .skip(5)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A descriptor of the file mapped at `p` (through map_files).
fn map_fd(p: *mut u8, len: usize) -> Result<i32, String> {
    let s = p as usize;
    open(
        &PathBuf::from(format!("/proc/self/map_files/{s:x}-{:x}", s + len)),
        libc::O_RDONLY,
        0,
    )
}

fn link_of(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn fstat(fd: i32) -> libc::stat {
    // SAFETY: zeroed is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of our descriptor into a local.
    unsafe { libc::fstat(fd, &mut st) };
    st
}

struct Ghosts {
    tmp: PathBuf,
    priv_map: *mut u8,
    shared_map: *mut u8,
    shared_fd: i32,
    twice: [*mut u8; 2],
    replaced: *mut u8,
    memfd_map: *mut u8,
    memfd_priv: *mut u8,
    cwd_fd: i32,
    dir_fd: i32,
    node_fd: i32,
    fifo: [i32; 3],
}

fn memfd(name: &std::ffi::CStr, flags: u32) -> Result<i32, String> {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(os_err("memfd_create"));
    }
    Ok(fd)
}

fn close(fd: i32) {
    // SAFETY: closing a descriptor of ours that nothing else uses.
    unsafe { libc::close(fd) };
}

fn setup(tmp: &Path) -> Result<Ghosts, String> {
    let shared = libc::MAP_SHARED;
    let private = libc::MAP_PRIVATE;

    let p = tmp.join("priv.dat");
    let fd = file_of(&p, b"ABC")?;
    let priv_map = map(fd, 3 * PAGE, private)?;
    bytes(priv_map, 3 * PAGE)[PAGE..2 * PAGE].fill(b'X');
    close(fd);
    unlink(&p)?;

    let p = tmp.join("shared.dat");
    let shared_fd = file_of(&p, b"SS")?;
    let shared_map = map(shared_fd, 2 * PAGE, shared)?;
    bytes(shared_map, 2 * PAGE)[100..115].copy_from_slice(b"through the map");
    unlink(&p)?;

    let p = tmp.join("twice.dat");
    let fd = file_of(&p, b"T")?;
    let twice = [map(fd, PAGE, shared)?, map(fd, PAGE, shared)?];
    close(fd);
    unlink(&p)?;

    let p = tmp.join("replaced.dat");
    let fd = file_of(&p, b"R")?;
    let replaced = map(fd, PAGE, shared)?;
    bytes(replaced, PAGE)[0] = b'r';
    close(fd);
    let newer = tmp.join("replaced.new");
    std::fs::write(&newer, b"the new file").map_err(|e| format!("write: {e}"))?;
    std::fs::rename(&newer, &p).map_err(|e| format!("rename: {e}"))?;

    let fd = memfd(c"cryo-map", libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)?;
    write_all(fd, &[b'M'; 2 * PAGE])?;
    // SAFETY: fcntl on our memfd.
    if unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } != 0
    {
        return Err(os_err("F_ADD_SEALS"));
    }
    let memfd_map = map(fd, 2 * PAGE, shared)?;
    close(fd);
    let fd = memfd(c"cryo-priv", libc::MFD_CLOEXEC)?;
    write_all(fd, &[b'P'; PAGE])?;
    let memfd_priv = map(fd, PAGE, private)?;
    bytes(memfd_priv, PAGE)[0] = b'q';
    close(fd);

    let d = tmp.join("gone-cwd");
    std::fs::create_dir(&d).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o751))
        .map_err(|e| format!("chmod: {e}"))?;
    std::env::set_current_dir(&d).map_err(|e| format!("chdir: {e}"))?;
    let cwd_fd = open(&d, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    std::fs::remove_dir(&d).map_err(|e| format!("rmdir: {e}"))?;

    let d = tmp.join("gone-dir");
    std::fs::create_dir(&d).map_err(|e| format!("mkdir: {e}"))?;
    std::os::unix::fs::chown(&d, Some(DIR_OWNER.0), Some(DIR_OWNER.1))
        .map_err(|e| format!("chown: {e}"))?;
    let dir_fd = open(&d, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let ts = DIR_TIMES.map(|(s, n)| libc::timespec {
        tv_sec: s,
        tv_nsec: n,
    });
    // SAFETY: futimens of our descriptor with two timespecs.
    if unsafe { libc::futimens(dir_fd, ts.as_ptr()) } != 0 {
        return Err(os_err("futimens"));
    }
    std::fs::remove_dir(&d).map_err(|e| format!("rmdir: {e}"))?;

    let n = tmp.join("null-node");
    // SAFETY: mknod of a new node at a NUL-terminated path of ours.
    if unsafe {
        libc::mknod(
            cpath(&n).as_ptr(),
            libc::S_IFCHR | 0o640,
            libc::makedev(1, 3),
        )
    } != 0
    {
        return Err(os_err("mknod"));
    }
    // SAFETY: chmod of our node (the umask trimmed the mode).
    unsafe { libc::chmod(cpath(&n).as_ptr(), 0o640) };
    let node_fd = open(&n, libc::O_RDWR, 0)?;
    unlink(&n)?;

    let f = tmp.join("gone.fifo");
    // SAFETY: mkfifo at a NUL-terminated path of ours.
    if unsafe { libc::mkfifo(cpath(&f).as_ptr(), 0o600) } != 0 {
        return Err(os_err("mkfifo"));
    }
    let r = open(&f, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
    let w = open(&f, libc::O_WRONLY, 0)?;
    let rw = open(&f, libc::O_RDWR, 0)?;
    write_all(w, b"queued in the fifo")?;
    unlink(&f)?;

    Ok(Ghosts {
        tmp: tmp.to_path_buf(),
        priv_map,
        shared_map,
        shared_fd,
        twice,
        replaced,
        memfd_map,
        memfd_priv,
        cwd_fd,
        dir_fd,
        node_fd,
        fifo: [r, w, rw],
    })
}

fn check_maps(g: &Ghosts, fails: &mut Vec<String>) {
    let mut want_name = |p: *mut u8, want: String| {
        let got = map_name(p);
        if got != want {
            fails.push(format!(
                "the mapping at {p:?} is {got:?}, expected {want:?}"
            ));
        }
    };
    let t = g.tmp.display();
    want_name(g.priv_map, format!("{t}/priv.dat (deleted)"));
    want_name(g.shared_map, format!("{t}/shared.dat (deleted)"));
    want_name(g.twice[0], format!("{t}/twice.dat (deleted)"));
    want_name(g.memfd_priv, "/memfd:cryo-priv (deleted)".into());
    // Its name is taken: a restore makes it next to it, under a name of
    // cryo's.
    let got = map_name(g.replaced);
    let next_to = format!("{t}/replaced.dat.cryo-ghost-");
    let remade = got.starts_with(&next_to) && got.ends_with(" (deleted)");
    if !remade && got != format!("{t}/replaced.dat (deleted)") {
        fails.push(format!(
            "the map of the replaced file is {got:?}, expected {t}/replaced.dat (deleted) or {next_to}PID-N (deleted)"
        ));
    }

    let m = bytes(g.priv_map, 3 * PAGE);
    let pages_ok = m[..PAGE].iter().all(|&b| b == b'A')
        && m[PAGE..2 * PAGE].iter().all(|&b| b == b'X')
        && m[2 * PAGE..].iter().all(|&b| b == b'C');
    if !pages_ok {
        fails.push("the private map of priv.dat does not read A, X, C".into());
    }
    match map_fd(g.priv_map, 3 * PAGE) {
        Ok(fd) => {
            if pread(fd, PAGE, PAGE as i64) != [b'B'; PAGE] {
                fails.push("priv.dat's page 1 is not 'B' (a private write reached it)".into());
            }
            close(fd);
        }
        Err(e) => fails.push(e),
    }

    let m = bytes(g.shared_map, 2 * PAGE);
    if &m[100..115] != b"through the map" || m[0] != b'S' || m[2 * PAGE - 1] != b'S' {
        fails.push("the shared map of shared.dat lost its bytes".into());
    }
    if pread(g.shared_fd, 15, 100) != b"through the map" {
        fails.push("shared.dat's descriptor does not read what the map wrote".into());
    }
    // SAFETY: pwrite from a literal to our descriptor.
    unsafe { libc::pwrite(g.shared_fd, b"via fd".as_ptr().cast(), 6, 5000) };
    if &m[5000..5006] != b"via fd" {
        fails.push("a write through shared.dat's descriptor is not seen in its map".into());
    }
    if fstat(g.shared_fd).st_nlink != 0 {
        fails.push("shared.dat has a name again".into());
    }

    let (a, b) = (bytes(g.twice[0], PAGE), bytes(g.twice[1], PAGE));
    if a[1] != b'T' || b[PAGE - 1] != b'T' {
        fails.push("the maps of twice.dat lost their bytes".into());
    }
    a[7] = b'!';
    if b[7] != b'!' {
        fails.push("the two maps of twice.dat are not one file".into());
    }

    let m = bytes(g.replaced, PAGE);
    if m[0] != b'r' || m[1] != b'R' {
        fails.push("the map of the replaced file lost its bytes".into());
    }
    let now = std::fs::read(g.tmp.join("replaced.dat")).unwrap_or_default();
    if now != b"the new file" {
        fails.push(format!(
            "replaced.dat now reads {:?}",
            String::from_utf8_lossy(&now)
        ));
    }

    let m = bytes(g.memfd_map, 2 * PAGE);
    if m.iter().any(|&b| b != b'M') {
        fails.push("the memfd map lost its bytes".into());
    }
    match map_fd(g.memfd_map, 2 * PAGE) {
        Ok(fd) => {
            // SAFETY: fcntl on our descriptor.
            let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
            if seals != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW {
                fails.push(format!("the mapped memfd's seals are {seals:#x}"));
            }
            close(fd);
        }
        Err(e) => fails.push(e),
    }
    let m = bytes(g.memfd_priv, PAGE);
    if m[0] != b'q' || m[1] != b'P' {
        fails.push("the private memfd map lost its bytes".into());
    }
    match map_fd(g.memfd_priv, PAGE) {
        Ok(fd) => {
            if pread(fd, 1, 0) != b"P" {
                fails.push("the private write reached the memfd".into());
            }
            close(fd);
        }
        Err(e) => fails.push(e),
    }
}

fn check_dirs(g: &Ghosts, fails: &mut Vec<String>) {
    let t = g.tmp.display();
    let cwd = std::fs::read_link("/proc/self/cwd").unwrap_or_default();
    let want = format!("{t}/gone-cwd (deleted)");
    if cwd.to_string_lossy() != want {
        fails.push(format!(
            "the working directory is {cwd:?}, expected {want:?}"
        ));
    }
    match std::fs::metadata(".") {
        Ok(md) => {
            let fd_st = fstat(g.cwd_fd);
            if md.nlink() != 0 || md.mode() & 0o7777 != 0o751 || !md.is_dir() {
                fails.push(format!(
                    "the working directory has {} links and mode {:o}",
                    md.nlink(),
                    md.mode()
                ));
            }
            if (md.dev(), md.ino()) != (fd_st.st_dev, fd_st.st_ino) {
                fails
                    .push("the working directory is not the directory its descriptor holds".into());
            }
        }
        Err(e) => fails.push(format!("stat of the working directory: {e}")),
    }
    let st = fstat(g.dir_fd);
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR || st.st_nlink != 0 {
        fails.push("gone-dir is not a removed directory".into());
    }
    if (st.st_uid, st.st_gid) != DIR_OWNER {
        fails.push(format!("gone-dir is owned by {}:{}", st.st_uid, st.st_gid));
    }
    let times = [
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec),
    ];
    if times != DIR_TIMES {
        fails.push(format!(
            "gone-dir's times are {times:?}, expected {DIR_TIMES:?}"
        ));
    }
    if link_of(g.dir_fd) != format!("{t}/gone-dir (deleted)") {
        fails.push(format!("gone-dir's descriptor is {}", link_of(g.dir_fd)));
    }
}

fn check_nodes(g: &Ghosts, fails: &mut Vec<String>) {
    let t = g.tmp.display();
    let st = fstat(g.node_fd);
    if st.st_mode & libc::S_IFMT != libc::S_IFCHR
        || st.st_rdev != libc::makedev(1, 3)
        || st.st_mode & 0o7777 != 0o640
    {
        fails.push(format!(
            "null-node is mode {:o}, device {:#x}",
            st.st_mode, st.st_rdev
        ));
    }
    if write_all(g.node_fd, b"x").is_err() || !pread(g.node_fd, 8, 0).is_empty() {
        fails.push("null-node does not behave as /dev/null".into());
    }
    if link_of(g.node_fd) != format!("{t}/null-node (deleted)") {
        fails.push(format!("null-node's descriptor is {}", link_of(g.node_fd)));
    }
    let [r, _, rw] = g.fifo;
    let ino: Vec<u64> = g.fifo.iter().map(|&f| fstat(f).st_ino).collect();
    if ino.iter().any(|&i| i != ino[0]) || fstat(r).st_mode & libc::S_IFMT != libc::S_IFIFO {
        fails.push("the three ends of gone.fifo are not one FIFO".into());
    }
    if link_of(r) != format!("{t}/gone.fifo (deleted)") {
        fails.push(format!("gone.fifo's descriptor is {}", link_of(r)));
    }
    let mut buf = [0u8; 64];
    // SAFETY: reading into a local buffer.
    let n = unsafe { libc::read(r, buf.as_mut_ptr().cast(), 64) };
    if buf[..n.max(0) as usize] != *b"queued in the fifo" {
        fails.push(format!(
            "gone.fifo held {:?}",
            String::from_utf8_lossy(&buf[..n.max(0) as usize])
        ));
    }
    let _ = write_all(rw, b"more");
    // SAFETY: as above.
    let n = unsafe { libc::read(r, buf.as_mut_ptr().cast(), 64) };
    if buf[..n.max(0) as usize] != *b"more" {
        fails.push("a write to gone.fifo's read-write end did not reach its reader".into());
    }
    let mut names: Vec<String> = std::fs::read_dir(&g.tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names != ["replaced.dat"] {
        fails.push(format!("{t} holds {names:?}, expected only replaced.dat"));
    }
}

fn run(a: &wl::Args, tmp: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let g = setup(tmp)?;
    if a.get("ns-fd") == Some("1") {
        open(Path::new("/proc/self/ns/uts"), libc::O_RDONLY, 0)?;
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    check_maps(&g, &mut fails);
    check_dirs(&g, &mut fails);
    check_nodes(&g, &mut fails);
    Ok(fails)
}

fn main() {
    let usage = "wl_ghost --ready FILE --verdict FILE --tmp DIR [--ns-fd 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let tmp = a.tmp_dir(NAME, usage);
    let result = run(&a, &tmp);
    wl::finish(NAME, &a.verdict, result);
}
