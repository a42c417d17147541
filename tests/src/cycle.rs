//! Helpers around one checkpoint cycle: dump and restore with the real
//! cryo binary, the image's files and figures, and the programs a test
//! runs beside (a page server, a counter).

use super::*;

/// `cryo dump -t <pid> -D <img> <extra...>`, with a log file next to the image.
pub fn dump(pid: i32, img: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    std::fs::create_dir_all(img).unwrap_or_else(|e| panic!("mkdir {}: {e}", img.display()));
    let pid_s = pid.to_string();
    let img_s = img.to_str().expect("utf-8 image path");
    let mut args = vec!["dump", "-t", &pid_s, "-D", img_s];
    args.extend_from_slice(extra);
    run_cryo(&args, env)
}

/// Starts `cryo dump -t PID -D IMG` with CRYO_FAULT making it pause at
/// `point` (it writes a flag file there and waits), and SIGKILLs it once
/// it has got there. Panics if cryo does not get there within 30 s.
pub fn kill_cryo_paused_at(pid: i32, img: &Path, point: &str, dir: &TestDir) {
    let flag = dir.join(&format!("paused-{point}"));
    let fault = format!("pause-{point}:{}", flag.display());
    let pid_s = pid.to_string();
    let img_s = img.to_str().expect("utf-8 path");
    let mut run = spawn_cryo(
        &["dump", "-t", &pid_s, "-D", img_s],
        &[("CRYO_FAULT", &fault)],
    );
    let start = Instant::now();
    while !flag.exists() {
        if start.elapsed() > Duration::from_secs(30) || !pid_alive(run.pid()) {
            let err = run.stderr_so_far();
            run.kill();
            panic!("cryo did not reach the pause {point}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    run.kill();
}

/// `cryo restore -D <img> -d`.
pub fn restore_detached(img: &Path) -> Output {
    run_cryo(
        &[
            "restore",
            "-D",
            img.to_str().expect("utf-8 image path"),
            "-d",
        ],
        &[],
    )
}

/// Dumps (kill mode unless `extra` says otherwise), asserting success.
pub fn dump_ok(wl: &mut Workload, img: &Path, extra: &[&str]) {
    let out = dump(wl.pid(), img, extra, &[]);
    if !out.status.success() || stderr_of(&out).contains("panicked at") {
        panic!(
            "cryo dump of pid {} failed ({}):\nstderr:\n{}\nworkload log:\n{}",
            wl.pid(),
            out.status,
            stderr_of(&out),
            wl.log_text()
        );
    }
    if !extra.iter().any(|a| *a == "-R" || *a == "--leave-running") {
        wl.assert_gone_after_dump();
    }
}

/// `cryo restore -D <img> -d`, asserting success and that the pid runs the
/// workload again.
/// One checkpoint of the workload into `img`: with `leave_running` a
/// dump -R (the original runs on), else a dump, the tree's end (the pids
/// of `guard`) and a restore.
pub fn dump_and_maybe_restore(
    wl: &mut Workload,
    guard: &TreeGuard,
    img: &Path,
    leave_running: bool,
) {
    if leave_running {
        dump_ok(wl, img, &["-R"]);
    } else {
        dump_and_reap(wl, guard, img, &[]);
        restore_ok(wl, img);
    }
}

/// A kill-mode dump (`extra` arguments), asserting success, and the end
/// of the dumped tree (the pids of `guard`).
pub fn dump_and_reap(wl: &mut Workload, guard: &TreeGuard, img: &Path, extra: &[&str]) {
    dump_ok(wl, img, extra);
    assert!(
        reap_gone(guard.pids(), Duration::from_secs(10)),
        "the dumped tree did not end"
    );
}

pub fn restore_ok(wl: &mut Workload, img: &Path) {
    let out = restore_detached(img);
    wl.mark_running();
    assert_cryo_ok(&out, &format!("cryo restore -D {} -d", img.display()));
    wl.assert_restored();
}

/// Copies the regular files of directory `from` into a new directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read_dir {}: {e}", from.display()))
    {
        let e = e.expect("dir entry");
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
        }
    }
}

/// Names of the regular files of a directory, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A number field of cryo's `--stats` JSON file.
pub fn stats_field(path: &Path, key: &str) -> u64 {
    stats_number(path, key, |c| c.is_ascii_digit())
}

/// The value of `key` in a `--stats` JSON file: the characters `part`
/// takes after it, parsed.
fn stats_number<T: std::str::FromStr>(path: &Path, key: &str, part: fn(&char) -> bool) -> T {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let pat = format!("\"{key}\":");
    let at = text
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in the stats: {text}"))
        + pat.len();
    text[at..]
        .chars()
        .take_while(part)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("bad {key} in the stats: {text}"))
}

/// Bytes of the pages files of an image directory.
pub fn pages_bytes(img: &Path) -> u64 {
    std::fs::read_dir(img)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", img.display()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// A new pty made by the test: (master, slave), both close-on-exec.
pub fn openpty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors; no name, termios or
    // window size is passed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [m, s] {
        // SAFETY: setting FD_CLOEXEC on descriptors we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: both are new descriptors we own.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(m),
            std::os::fd::OwnedFd::from_raw_fd(s),
        )
    }
}

/// Pages of process `pid` that its image stores as its parent's (runs
/// flagged in-parent in `pagemap-<pid>.img`, from `cryo image decode`).
pub fn in_parent_pages(img: &Path, pid: i32) -> u64 {
    let file = img.join(format!("pagemap-{pid}.img"));
    let out = run_cryo(
        &["image", "decode", file.to_str().expect("utf-8 path")],
        &[],
    );
    assert_cryo_ok(&out, "cryo image decode");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |run: &str, key: &str| -> u64 {
        run.split_once(&format!("\"{key}\":"))
            .map(|(_, v)| {
                v.trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    text.split("\"run\":")
        .skip(1)
        .map(|r| r.split('}').next().unwrap_or(""))
        .filter(|r| field(r, "flags") & 1 != 0)
        .map(|r| field(r, "nr_pages"))
        .sum()
}

/// wl_sweep options that make it change its memory every way at once
/// (threads, huge pages, mremap, munmap + mmap, mprotect, PROT_NONE,
/// discard and rewrite, forks, discards).
pub const SWEEP_EVERYTHING: &[&str] = &[
    "--threads",
    "2",
    "--thp",
    "1",
    "--mremap",
    "512",
    "--remap",
    "512",
    "--mprotect",
    "512",
    "--protnone",
    "512",
    "--redo",
    "512",
    "--forker",
    "1",
    "--discard",
    "2",
];

/// Put this test (the thread that runs it, and what it starts) in a new
/// network namespace with its loopback up. False, with the reason
/// printed, where one of `tools` (`ip`, `nft`) cannot be run.
pub fn own_network_namespace(tools: &[&str]) -> bool {
    for tool in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!(
                "SKIP: {tool} is not installed (Debian's iproute2, nftables and iptables packages)"
            );
            return false;
        }
    }
    // SAFETY: unshare takes a flag; it changes this thread's namespace
    // only, which the test's children inherit.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
    true
}

/// `cryo restore -D <img> -d --pidfile <pidfile>`, asserting success
/// (`what` the restore is); the pid the pid file names.
pub fn restore_with_pidfile(img: &Path, pidfile: &Path, what: &str) -> i32 {
    let out = run_cryo(
        &[
            "restore",
            "-D",
            img.to_str().expect("utf-8 path"),
            "-d",
            "--pidfile",
            pidfile.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert_cryo_ok(&out, what);
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what}: --pidfile {} names no pid", pidfile.display()))
}

/// A `cryo page-server` of the test's on 127.0.0.1:`port` into `dir`
/// (with `extra` options), killed by its handle when dropped.
pub struct PageServer(std::process::Child);

impl PageServer {
    pub fn start(dir: &Path, port: u16, extra: &[&str]) -> PageServer {
        let child = Command::new(cryo_bin())
            .args(["page-server", "--address", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("-D")
            .arg(dir)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting cryo page-server");
        // Listening once it takes a connection (that one it refuses).
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        PageServer(child)
    }

    /// How it ended, if it did within `t`.
    pub fn ended(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < t {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the demo `counter` (it prints a count every 200 ms) with
/// `stdout` and `stderr`, and no other descriptor of the test's; returns
/// its pid (it is waited for by pid).
pub fn spawn_counter(stdout: Stdio, stderr: Stdio) -> i32 {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(workload_bin("counter"));
    // SAFETY: close_range is async-signal-safe and only closes the
    // child's descriptors above its standard three, after fork and before
    // exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("starting the counter");
    let pid = child.id() as i32;
    // Waited for by pid (TreeGuard, reap_gone).
    drop(child);
    pid
}

/// A number (milliseconds, say) of a `--stats` JSON file, by key.
pub fn stats_ms(path: &Path, key: &str) -> f64 {
    stats_number(path, key, |c| {
        c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')
    })
}

/// The steps a restore tells its listeners (notifications, action
/// scripts), in order.
pub const RESTORE_STEPS: [&str; 6] = [
    "pre-restore",
    "setup-namespaces",
    "post-restore",
    "network-unlock",
    "pre-resume",
    "post-resume",
];
