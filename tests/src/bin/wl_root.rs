//! A process under chroot(), whose root must come back.
//!
//! `wl_root --ready FILE --verdict FILE --jail DIR [--gone 1]`
//!
//! It changes its root to DIR (made mode 0751) and its working directory
//! to DIR/inner. With `--gone 1` it changes both to DIR itself and then
//! removes DIR (through a descriptor of its parent): its root and working
//! directory are a removed directory.
//!
//! On SIGTERM it checks, without /proc (the jail has none), that `/` is
//! still DIR (same device and inode, or for `--gone` a removed directory
//! of mode 0751), that `/..` is `/`, and that its working directory is
//! DIR/inner (or `/`). The verdict goes through a descriptor of its
//! directory, opened before the chroot.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_root";
const MODE: u32 = 0o751;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths")
}

fn stat(p: &str) -> Option<libc::stat> {
    let path = CString::new(p).ok()?;
    // SAFETY: zeroed is a valid stat; stat fills it from a NUL-terminated
    // path.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::stat(path.as_ptr(), &mut st) } == 0).then_some(st)
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn run(a: &wl::Args, jail: &Path, gone: bool) -> Result<Vec<String>, String> {
    let (ready_dir, ready_name) = wl::dir_of(&a.ready)?;
    wl::install_term_handler()?;
    std::fs::create_dir_all(jail.join("inner")).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::set_permissions(jail, std::os::unix::fs::PermissionsExt::from_mode(MODE))
        .map_err(|e| format!("chmod: {e}"))?;
    let jail_st = stat(jail.to_str().unwrap_or("")).ok_or("stat of the jail")?;
    let inner_st = stat(jail.join("inner").to_str().unwrap_or("")).ok_or("stat")?;
    let parent = jail.parent().ok_or("the jail has no parent")?;
    let open_dir = |p: &Path| {
        // SAFETY: open of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c(p).as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            Err(os_err(&format!("open {}", p.display())))
        } else {
            Ok(fd)
        }
    };
    let parent_fd = open_dir(parent)?;
    if gone {
        std::fs::remove_dir(jail.join("inner")).map_err(|e| format!("rmdir: {e}"))?;
    }
    let cwd = if gone {
        jail.to_path_buf()
    } else {
        jail.join("inner")
    };
    std::env::set_current_dir(&cwd).map_err(|e| format!("chdir: {e}"))?;
    // SAFETY: chroot to a NUL-terminated path of ours.
    if unsafe { libc::chroot(c(jail).as_ptr()) } != 0 {
        return Err(os_err("chroot"));
    }
    if gone {
        let name = CString::new(jail.file_name().ok_or("no name")?.as_bytes()).expect("no NUL");
        // SAFETY: removes the (empty) jail directory through our
        // descriptor of its parent.
        if unsafe { libc::unlinkat(parent_fd, name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(os_err("rmdir of the jail"));
        }
    }
    wl::write_at(ready_dir, &ready_name, "ready\n");
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let (Some(root), Some(up), Some(here)) = (stat("/"), stat("/.."), stat(".")) else {
        return Ok(vec!["cannot stat /, /.. or .".into()]);
    };
    let id = |s: &libc::stat| (s.st_dev, s.st_ino);
    if id(&up) != id(&root) {
        fails.push("/.. is not / (the root is not a chroot any more?)".into());
    }
    if gone {
        if root.st_nlink != 0 || root.st_mode & 0o7777 != MODE {
            fails.push(format!(
                "the root has {} links and mode {:o}, expected a removed directory of mode {MODE:o}",
                root.st_nlink,
                root.st_mode & 0o7777
            ));
        }
        if id(&here) != id(&root) {
            fails.push("the working directory is not the root".into());
        }
    } else {
        if id(&root) != id(&jail_st) {
            fails.push(format!("the root is not {}", jail.display()));
        }
        if id(&here) != id(&inner_st) {
            fails.push("the working directory is not inner".into());
        }
    }
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse("wl_root --ready FILE --verdict FILE --jail DIR [--gone 1]");
    let Some(jail) = a.get("jail").map(PathBuf::from) else {
        eprintln!("--jail is required");
        std::process::exit(2);
    };
    wl::close_extra_fds();
    let gone = a.get("gone") == Some("1");
    // The verdict goes through a descriptor of its directory.
    let verdict = match wl::dir_of(&a.verdict) {
        Ok(d) => d,
        Err(e) => wl::finish(NAME, &a.verdict, Err(e)),
    };
    wl::finish_at(NAME, verdict, run(&a, &jail, gone));
}
