//! Processes in a time namespace of their own, whose clocks a restore
//! must carry on from where they were.
//!
//! `wl_timens --ready FILE --verdict FILE [--expect-pause 1]`
//!
//! The parent P makes a time namespace for its children (unshare
//! CLONE_NEWTIME, CLOCK_MONOTONIC 1000 s and CLOCK_BOOTTIME 2000 s ahead
//! of the host's), makes C in it, and goes back to its own children's
//! namespace being its own (setns); C makes G, which inherits it. Each
//! child answers a query with its clocks and its time namespace. At ready
//! and on SIGTERM P asks both and reads its own clocks (the host's): the
//! children share a namespace that is not P's, their clocks never went
//! back, they were about 1000 s (2000 s) ahead at first, and with
//! `--expect-pause` (a kill-mode dump and a restore in between) they
//! advanced less than the host's: they stood still while the tree was
//! not running, instead of jumping by that time.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_timens";
const SEC: i64 = 1_000_000_000;

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn clock(id: libc::clockid_t) -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the local timespec.
    unsafe { libc::clock_gettime(id, &mut t) };
    t.tv_sec * SEC + t.tv_nsec
}

fn time_ns() -> String {
    std::fs::read_link("/proc/self/ns/time")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// "MONOTONIC BOOTTIME NAMESPACE".
fn answer() -> String {
    format!(
        "{} {} {}",
        clock(libc::CLOCK_MONOTONIC),
        clock(libc::CLOCK_BOOTTIME),
        time_ns()
    )
}

struct Clocks {
    mono: i64,
    boot: i64,
    ns: String,
}

fn parse(line: &str) -> Option<Clocks> {
    let mut f = line.split_whitespace();
    Some(Clocks {
        mono: f.next()?.parse().ok()?,
        boot: f.next()?.parse().ok()?,
        ns: f.next()?.to_string(),
    })
}

fn ask(cmd: i32, back: i32) -> Result<Clocks, String> {
    wl::write_fd(cmd, b"?");
    let line = wl::read_line(back);
    parse(&line).ok_or_else(|| format!("a child answered {line:?}"))
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let expect_pause = a.get("expect-pause") == Some("1");
    let own = std::fs::File::open("/proc/self/ns/time").map_err(|e| format!("ns: {e}"))?;
    // SAFETY: unshare takes a flag: only our next children are affected.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(os_err("unshare(CLONE_NEWTIME)"));
    }
    std::fs::write("/proc/self/timens_offsets", "1 1000 0\n7 2000 0\n")
        .map_err(|e| format!("timens_offsets: {e}"))?;
    let (to_c, to_g, back) = (wl::pipe()?, wl::pipe()?, wl::pipe()?);
    let ends = [to_c[1], to_g[1]];
    // What the children close: the command pipes' write ends and our
    // namespace's descriptor.
    let theirs = [to_c[1], to_g[1], std::os::fd::AsRawFd::as_raw_fd(&own)];
    // SAFETY: fork of this single-threaded process; the child makes G
    // and serves, never returning.
    let c = unsafe { libc::fork() };
    if c == 0 {
        // SAFETY: as above, in C.
        let g = unsafe { libc::fork() };
        if g == 0 {
            wl::serve(to_g[0], back[1], &theirs, answer)
        }
        wl::serve(to_c[0], back[1], &theirs, answer)
    }
    if c < 0 {
        return Err(os_err("fork"));
    }
    // Our own children's time namespace is ours again.
    // SAFETY: setns takes the descriptor of our own namespace and a flag.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&own), libc::CLONE_NEWTIME) } != 0 {
        return Err(os_err("setns(our own time namespace)"));
    }
    drop(own);
    let host0 = (clock(libc::CLOCK_MONOTONIC), clock(libc::CLOCK_BOOTTIME));
    let c0 = ask(to_c[1], back[0])?;
    let g0 = ask(to_g[1], back[0])?;
    let mut fails = Vec::new();
    let near = |v: i64, want: i64| (v - want).abs() < SEC;
    if !near(c0.mono - host0.0, 1000 * SEC) || !near(c0.boot - host0.1, 2000 * SEC) {
        fails.push(format!(
            "at first C's clocks are {} s and {} s ahead, not 1000 s and 2000 s",
            (c0.mono - host0.0) / SEC,
            (c0.boot - host0.1) / SEC
        ));
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c1 = ask(to_c[1], back[0])?;
    let g1 = ask(to_g[1], back[0])?;
    let host1 = (clock(libc::CLOCK_MONOTONIC), clock(libc::CLOCK_BOOTTIME));
    let mine = time_ns();
    if c1.ns == mine || g1.ns != c1.ns || c0.ns != g0.ns {
        fails.push(format!(
            "namespaces: P {mine}, C {} then {}, G {} then {}",
            c0.ns, c1.ns, g0.ns, g1.ns
        ));
    }
    for (who, before, after) in [("C", &c0, &c1), ("G", &g0, &g1)] {
        if after.mono < before.mono || after.boot < before.boot {
            fails.push(format!(
                "{who}'s clocks went back: monotonic {} -> {}, boottime {} -> {}",
                before.mono, after.mono, before.boot, after.boot
            ));
        }
    }
    let (inside, outside) = (c1.mono - c0.mono, host1.0 - host0.0);
    if expect_pause && inside + 5_000_000 > outside {
        fails.push(format!(
            "C's monotonic clock moved {inside} ns while the host's moved {outside} ns: it did not stand still while the tree was away"
        ));
    }
    // SAFETY: closing our command pipes ends the children; then wait for C.
    unsafe {
        for fd in ends {
            libc::close(fd);
        }
        libc::waitpid(c, std::ptr::null_mut(), 0);
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_timens --ready FILE --verdict FILE [--expect-pause 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
