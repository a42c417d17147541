//! Pieces every workload binary needs: writing the ready and verdict
//! files, logging to stdout without allocating on the way, closing
//! inherited descriptors, the SIGTERM flag handler, and the final verdict.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use libc::c_int;

/// Set by the SIGTERM handler [`install_term_handler`] installs.
pub static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_sig: c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// SIGTERM sets [`TERM`].
pub fn install_term_handler() -> Result<(), String> {
    // SAFETY: sigaction is plain data; zeroed is a valid (empty) value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_term as extern "C" fn(c_int) as usize;
    // SAFETY: act.sa_mask is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: act is fully initialised; on_term is an async-signal-safe
    // extern "C" fn(c_int), the handler signature without SA_SIGINFO.
    if unsafe { libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "sigaction(SIGTERM): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// clone3 with `flags` (CLONE_FS, CLONE_FILES: what the child shares with
/// this process) and SIGCHLD: returns 0 in the child, as fork.
pub fn clone_sharing(flags: u64) -> Result<i32, String> {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
    }
    let args = CloneArgs {
        flags,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
    };
    // SAFETY: clone3 without CLONE_VM: the child runs on its own copy of
    // the (single-threaded) caller, as after fork.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(format!(
            "clone3({flags:#x}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(r as i32)
}

/// Write a file through `dir` (a descriptor of its directory, opened
/// before a chroot): a temporary name, then a rename.
pub fn write_at(dir: i32, name: &str, text: &str) {
    let (Ok(tmp), Ok(fin)) = (
        std::ffi::CString::new(format!("{name}.tmp")),
        std::ffi::CString::new(name),
    ) else {
        return;
    };
    // SAFETY: openat/write/close/renameat on our own descriptors and
    // NUL-terminated names.
    unsafe {
        let fd = libc::openat(
            dir,
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            return;
        }
        libc::write(fd, text.as_ptr().cast(), text.len());
        libc::close(fd);
        libc::renameat(dir, tmp.as_ptr(), dir, fin.as_ptr());
    }
}

/// A descriptor of the directory of `path`, and its file name (for
/// [`write_at`]).
pub fn dir_of(path: &Path) -> Result<(i32, String), String> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: open of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "open {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok((fd, name))
}

/// [`finish`], the verdict written through a descriptor of its directory
/// (see [`dir_of`]).
pub fn finish_at(name: &str, verdict: (i32, String), result: Result<Vec<String>, String>) -> ! {
    let (text, code) = verdict_text(name, result);
    write_at(verdict.0, &verdict.1, &text);
    std::process::exit(code);
}

/// A new pipe (O_CLOEXEC): [read end, write end].
pub fn pipe() -> Result<[c_int; 2], String> {
    let mut p = [0; 2];
    // SAFETY: pipe2 into a local array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    Ok(p)
}

/// Fill `buf` from `fd`, retrying on EINTR; false at end of file or on
/// another error.
pub fn read_exact(fd: c_int, buf: &mut [u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: reads into the unread tail of `buf`, of exactly that
        // length.
        let r = unsafe { libc::read(fd, buf[off..].as_mut_ptr().cast(), buf.len() - off) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if r <= 0 {
            return false;
        }
        off += r as usize;
    }
    true
}

/// One line from `fd`, without its newline (what came before the end of
/// file, if that came first).
pub fn read_line(fd: c_int) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while read_exact(fd, &mut b) && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child's loop: close the descriptors it inherited that are not its
/// own (`close`: the command pipes' write ends), then on each byte from
/// `cmd` write `answer()` and a newline to `back`; once `cmd` ends,
/// collect its own children and exit.
pub fn serve(cmd: c_int, back: c_int, close: &[c_int], answer: impl Fn() -> String) -> ! {
    for &fd in close {
        // SAFETY: closing inherited descriptors that are not ours to keep.
        unsafe { libc::close(fd) };
    }
    let mut b = [0u8; 1];
    while read_exact(cmd, &mut b) {
        write_fd(back, format!("{}\n", answer()).as_bytes());
    }
    // SAFETY: collect our children, then end at once.
    unsafe {
        while libc::wait(std::ptr::null_mut()) > 0 {}
        libc::_exit(0)
    }
}

/// A [`serve`] child's answer: one byte on `cmd`, one line from `back`.
pub fn ask(cmd: c_int, back: c_int) -> String {
    write_fd(cmd, b"?");
    read_line(back)
}

/// End a [`serve`] child: close its command pipe, then wait for it.
pub fn end_server(cmd: c_int, child: i32) {
    // SAFETY: closing our own pipe end and waiting for our own child.
    unsafe {
        libc::close(cmd);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
}

/// Write `data` to `path` through a temporary file and a rename, so a
/// reader never sees half of it.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Write all of `data` to `fd`, retrying on EINTR; gives up silently on
/// other errors (logging must never fail a workload).
pub fn write_fd(fd: c_int, data: &[u8]) {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: the source is the unwritten tail of `data`, of exactly the
        // length given; fd is one of the caller's descriptors.
        let r = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
        if r <= 0 {
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        off += r as usize;
    }
}

/// One log line on stdout: "name[pid]: msg".
pub fn log(name: &str, msg: &str) {
    write_fd(
        1,
        format!("{name}[{}]: {msg}\n", std::process::id()).as_bytes(),
    );
}

/// Close every descriptor above 2 (cryo refuses kinds it cannot restore
/// yet, and a test harness may leak some).
pub fn close_extra_fds() {
    // SAFETY: close_range only closes descriptors of this process; nothing
    // else in this single-threaded program holds descriptors above 2 yet.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return;
    }
    let fds: Vec<c_int> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        // SAFETY: as above; the directory's own fd is already closed, and
        // closing an fd that is not open only fails with EBADF.
        unsafe { libc::close(fd) };
    }
}

/// Write the verdict (PASS, or one FAIL line per failure; a setup error is
/// a FAIL too) and exit: 0 on PASS, 1 on FAIL, 2 when setup failed or the
/// verdict cannot be written.
pub fn finish(name: &str, verdict: &Path, result: Result<Vec<String>, String>) -> ! {
    let (text, code) = verdict_text(name, result);
    if let Err(e) = write_atomic(verdict, text.as_bytes()) {
        log(name, &format!("cannot write verdict: {e}"));
        std::process::exit(2);
    }
    std::process::exit(code);
}

/// The verdict's text and the exit code that goes with it (a setup error
/// is logged too).
fn verdict_text(name: &str, result: Result<Vec<String>, String>) -> (String, i32) {
    match result {
        Ok(fails) if fails.is_empty() => ("PASS\n".to_string(), 0),
        Ok(fails) => (fails.iter().map(|f| format!("FAIL: {f}\n")).collect(), 1),
        Err(e) => {
            log(name, &format!("setup failed: {e}"));
            (format!("FAIL: setup: {e}\n"), 2)
        }
    }
}

/// A workload's command line: `--ready FILE --verdict FILE` and its own
/// `--KEY VALUE` options.
pub struct Args {
    pub ready: PathBuf,
    pub verdict: PathBuf,
    opts: Vec<(String, String)>,
}

impl Args {
    /// Parse the command line; without `--ready` and `--verdict`, print
    /// `usage` and exit 2.
    pub fn parse(usage: &str) -> Args {
        let mut ready = None;
        let mut verdict = None;
        let mut opts = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let Some(key) = a.strip_prefix("--") else {
                continue;
            };
            let value = args.next().unwrap_or_default();
            match key {
                "ready" => ready = Some(PathBuf::from(value)),
                "verdict" => verdict = Some(PathBuf::from(value)),
                _ => opts.push((key.to_string(), value)),
            }
        }
        let (Some(ready), Some(verdict)) = (ready, verdict) else {
            eprintln!("usage: {usage}");
            std::process::exit(2);
        };
        Args {
            ready,
            verdict,
            opts,
        }
    }

    /// The directory `--tmp` names, made absolute; without it, print
    /// `usage` and exit 2; a directory that cannot be resolved is the
    /// workload `name`'s setup failure.
    pub fn tmp_dir(&self, name: &str, usage: &str) -> PathBuf {
        let Some(tmp) = self.get("tmp") else {
            eprintln!("usage: {usage}");
            std::process::exit(2);
        };
        match std::fs::canonicalize(tmp) {
            Ok(t) => t,
            Err(e) => finish(name, &self.verdict, Err(format!("--tmp {tmp}: {e}"))),
        }
    }

    /// The value of `--key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}
