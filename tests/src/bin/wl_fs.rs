//! A parent and a child made with clone(CLONE_FS): they share their
//! working directory and umask, which a restore must keep shared.
//!
//! `wl_fs --ready FILE --verdict FILE --tmp DIR [--chroot 1]`
//!
//! Both sit in DIR/a with umask 022. On SIGTERM the parent asks the child
//! (through a pipe) to change to DIR/b and set umask 077; once the child
//! says it did, the parent must find itself in DIR/b with umask 077 (one
//! fs_struct between them), and the child must have been in DIR/a first.
//!
//! With `--chroot 1` the parent first changes its root to DIR (the child
//! shares it): the directories are /a and /b, and the child checks that
//! its root is DIR's inode; the ready file and the verdict are written
//! through descriptors of their directories.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_fs";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn umask_now() -> u32 {
    // SAFETY: umask only sets and returns the mask; it is put back.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

fn read_byte(fd: i32) -> Option<u8> {
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into a local.
    (unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) } == 1).then_some(b[0])
}

fn write_byte(fd: i32, b: u8) {
    // SAFETY: writes one byte from a local.
    unsafe { libc::write(fd, [b].as_ptr().cast(), 1) };
}

fn run(a: &wl::Args, tmp: &Path, chroot: bool) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let (mut da, mut db) = (tmp.join("a"), tmp.join("b"));
    std::fs::create_dir_all(&da).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::create_dir_all(&db).map_err(|e| format!("mkdir: {e}"))?;
    let ready = wl::dir_of(&a.ready)?;
    let jail = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(tmp)
            .map_err(|e| format!("stat: {e}"))?
            .ino()
    };
    if chroot {
        std::os::unix::fs::chroot(tmp).map_err(|e| format!("chroot: {e}"))?;
        (da, db) = ("/a".into(), "/b".into());
    }
    std::env::set_current_dir(&da).map_err(|e| format!("chdir: {e}"))?;
    // SAFETY: umask takes a plain value.
    unsafe { libc::umask(0o022) };
    let (mut ask, mut done) = ([0; 2], [0; 2]);
    // SAFETY: pipe2 into local arrays.
    let r = unsafe {
        libc::pipe2(ask.as_mut_ptr(), libc::O_CLOEXEC)
            | libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC)
    };
    if r != 0 {
        return Err(os_err("pipe2"));
    }
    let kid = wl::clone_sharing(libc::CLONE_FS as u64)?;
    if kid == 0 {
        // The child: waits for the parent's word, then moves both.
        let first = std::env::current_dir().unwrap_or_default();
        if read_byte(ask[0]) == Some(b'g') {
            let root_ok = !chroot || {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata("/").is_ok_and(|m| m.ino() == jail)
            };
            let ok = root_ok && first == da && std::env::set_current_dir(&db).is_ok();
            // SAFETY: umask takes a plain value.
            unsafe { libc::umask(0o077) };
            write_byte(done[1], if ok { b'y' } else { b'n' });
        }
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    wl::write_at(ready.0, &ready.1, "ready\n");
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    write_byte(ask[1], b'g');
    match read_byte(done[0]) {
        Some(b'y') => {}
        other => fails.push(format!(
            "the child was not in {} under its root, or could not move ({other:?})",
            da.display()
        )),
    }
    let now = std::env::current_dir().unwrap_or_default();
    if now != db {
        fails.push(format!(
            "the child moved to {}, the parent is in {} (not one fs_struct)",
            db.display(),
            now.display()
        ));
    }
    if umask_now() != 0o077 {
        fails.push(format!(
            "the child set umask 077, the parent's is {:03o}",
            umask_now()
        ));
    }
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    Ok(fails)
}

fn main() {
    let usage = "wl_fs --ready FILE --verdict FILE --tmp DIR [--chroot 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let tmp = a.tmp_dir(NAME, usage);
    // The verdict goes through a descriptor of its directory (a chroot).
    let verdict = match wl::dir_of(&a.verdict) {
        Ok(d) => d,
        Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
    };
    wl::finish_at(NAME, verdict, run(&a, &tmp, a.get("chroot") == Some("1")));
}
