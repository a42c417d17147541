//! A process in a cgroup namespace of its own, rooted at a cgroup the
//! test made, working in a cgroup below that root.
//!
//! `wl_cgns --ready FILE --verdict FILE --cgroup DIR`
//!
//! DIR is a cgroup2 directory with a child `inner`. The process moves
//! into DIR, unshares its cgroup namespace there (DIR becomes its root;
//! in the v1 hierarchies, the cgroups it is in become theirs), moves into
//! DIR/inner and forks a child. On SIGTERM it checks that both see
//! themselves in "/inner" of the v2 hierarchy and at "/" of every other,
//! and that the namespace is not the one it started in.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_cgns";

fn cgroup_ns() -> String {
    std::fs::read_link("/proc/self/ns/cgroup")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// What is wrong with this process's view of its cgroups.
fn view() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| {
            let want = if l.starts_with("0::") { "/inner" } else { "/" };
            l.rsplit(':').next() != Some(want)
        })
        .collect();
    (!bad.is_empty()).then(|| format!("its cgroups as it sees them: {bad:?}"))
}

fn join(dir: &Path) -> Result<(), String> {
    std::fs::write(dir.join("cgroup.procs"), "0")
        .map_err(|e| format!("joining {}: {e}", dir.display()))
}

fn run(a: &wl::Args, dir: &Path) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let host = cgroup_ns();
    join(dir)?;
    // SAFETY: unshare takes a flag.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWCGROUP): {}",
            std::io::Error::last_os_error()
        ));
    }
    join(&dir.join("inner"))?;
    let (cmd, back) = (wl::pipe()?, wl::pipe()?);
    // SAFETY: fork of this single-threaded process; the child answers
    // with its namespace and what is wrong with its view.
    let child = unsafe { libc::fork() };
    if child == 0 {
        wl::serve(cmd[0], back[1], &[cmd[1], back[0]], || {
            format!("{} {}", cgroup_ns(), view().unwrap_or_else(|| "ok".into()))
        });
    }
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails: Vec<String> = view().into_iter().collect();
    let mine = cgroup_ns();
    if mine == host {
        fails.push(format!("in the host's cgroup namespace {mine}"));
    }
    let said = wl::ask(cmd[1], back[0]);
    if said != format!("{mine} ok") {
        fails.push(format!("the child says {said:?}"));
    }
    wl::end_server(cmd[1], child);
    Ok(fails)
}

fn main() {
    let usage = "wl_cgns --ready FILE --verdict FILE --cgroup DIR";
    let a = wl::Args::parse(usage);
    let Some(dir) = a.get("cgroup").map(PathBuf::from) else {
        eprintln!("usage: {usage}");
        std::process::exit(2);
    };
    wl::close_extra_fds();
    let result = run(&a, &dir);
    wl::finish(NAME, &a.verdict, result);
}
