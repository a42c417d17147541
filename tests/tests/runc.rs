//! runc drives cryo as its criu (`runc --criu CRYO checkpoint/restore`):
//! a real container (a bundle from `runc spec`, a busybox rootfs) whose
//! shell counts on its standard output, a pipe of the test's. The count
//! and a token the shell drew at its start live in its memory; after the
//! restore, the container (given a new pipe by runc, through inherit_fd)
//! must go on from the next number with the same token: a restart would
//! start again at 1 with another token, a lost or repeated line breaks
//! the sequence. Each test uses its own runc state directory and
//! container id, and removes the container by id.
//!
//! Skipped with a message where runc or a static busybox is missing
//! (.ci/run installs Debian's runc and busybox-static).

use std::io::BufRead;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cryo_tests::*;

const BUSYBOX: &str = "/bin/busybox";

/// Why runc tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    let found = |p: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
    };
    if !found("runc") {
        return Some("runc is not installed (apt-get install runc)".into());
    }
    if !Path::new(BUSYBOX).is_file() {
        return Some(format!(
            "{BUSYBOX} is missing (apt-get install busybox-static)"
        ));
    }
    // A dynamic busybox would find no libc in the rootfs.
    let ldd = Command::new("ldd").arg(BUSYBOX).output();
    if ldd.is_ok_and(|o| o.status.success()) {
        return Some(format!(
            "{BUSYBOX} is dynamically linked (apt-get install busybox-static)"
        ));
    }
    None
}

macro_rules! need_runc {
    () => {
        if let Some(why) = missing() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// The shell the container runs: a token drawn once, then a count, one
/// line each 50 ms ("N TOKEN"), with a `sleep` child most of the time.
const COUNTER: &str = "tok=$$-$RANDOM$RANDOM$RANDOM; i=0; \
    while :; do i=$((i+1)); echo \"$i $tok\"; sleep 0.05; done";

/// A container of the test's: its bundle, runc state directory and id.
struct Container {
    dir: TestDir,
    id: String,
}

impl Container {
    fn new(name: &str) -> Container {
        let dir = TestDir::new();
        let rootfs = dir.subdir("bundle/rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("rootfs directory");
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copying busybox");
        for applet in ["sh", "sleep", "echo"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("busybox applet link");
        }
        let bundle = dir.join("bundle");
        let out = Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle)
            .output()
            .expect("runc spec");
        assert!(out.status.success(), "runc spec: {}", stderr_of(&out));
        let path = bundle.join("config.json");
        let spec = std::fs::read_to_string(&path).expect("config.json");
        let args = format!(
            "\"args\": [\n\t\t\t\"sh\",\n\t\t\t\"-c\",\n\t\t\t{}\n\t\t]",
            json_string(COUNTER)
        );
        let default_args = "\"args\": [\n\t\t\t\"sh\"\n\t\t]";
        assert!(spec.contains("\"terminal\": true") && spec.contains(default_args));
        let spec = spec
            .replace("\"terminal\": true", "\"terminal\": false")
            .replace(default_args, &args);
        std::fs::write(&path, spec).expect("writing config.json");
        let id = format!("cryo-{}-{name}", std::process::id());
        Container { dir, id }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    /// runc with this test's state directory.
    fn runc(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(self.dir.join("state"));
        c.stdin(Stdio::null());
        c
    }

    /// runc with cryo as its criu.
    fn runc_cryo(&self) -> Command {
        let mut c = self.runc();
        c.arg("--criu").arg(cryo_bin());
        c
    }

    /// A file for the standard error of runc and the container (a
    /// detached container keeps runc's: a pipe would never end).
    fn stderr(&self, name: &str) -> (Stdio, PathBuf) {
        let p = self.dir.join(name);
        let f = std::fs::File::create(&p).expect("a stderr file");
        (Stdio::from(f), p)
    }

    /// Start it detached, its standard output the returned pipe.
    fn run(&self) -> Lines {
        let (r, w) = pipe();
        let (err, err_path) = self.stderr("run.err");
        let st = self
            .runc()
            .args(["run", "-d", "--bundle"])
            .arg(self.bundle())
            .arg(&self.id)
            .stdout(Stdio::from(w))
            .stderr(err)
            .status()
            .expect("runc run");
        let text = std::fs::read_to_string(err_path).unwrap_or_default();
        assert!(st.success(), "runc run: {text}");
        Lines::new(r)
    }

    fn status(&self) -> String {
        let out = self
            .runc()
            .args(["state", &self.id])
            .output()
            .expect("runc state");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("\"status\": \""))
            .map(|s| s.trim_end_matches(['"', ',']).to_string())
            .unwrap_or_else(|| "gone".into())
    }

    /// `runc checkpoint` with `extra` options into `img`; panics with
    /// cryo's log on failure.
    fn checkpoint(&self, img: &str, extra: &[&str]) {
        let work = self.dir.subdir(&format!("work-{img}"));
        let out = self
            .runc_cryo()
            .arg("checkpoint")
            .args(extra)
            .arg("--image-path")
            .arg(self.dir.join(img))
            .arg("--work-path")
            .arg(&work)
            .arg(&self.id)
            .output()
            .expect("runc checkpoint");
        assert!(
            out.status.success(),
            "runc checkpoint {extra:?}: {}\ncryo's log:\n{}",
            stderr_of(&out),
            logs(&work)
        );
    }

    /// `runc restore -d` from `img`, the container's standard output the
    /// returned pipe.
    fn restore(&self, img: &str) -> Lines {
        let work = self.dir.subdir(&format!("work-restore-{img}"));
        let (r, w) = pipe();
        let (err, err_path) = self.stderr("restore.err");
        let st = self
            .runc_cryo()
            .args(["restore", "-d", "--image-path"])
            .arg(self.dir.join(img))
            .arg("--work-path")
            .arg(&work)
            .arg("--bundle")
            .arg(self.bundle())
            .arg(&self.id)
            .stdout(Stdio::from(w))
            .stderr(err)
            .status()
            .expect("runc restore");
        assert!(
            st.success(),
            "runc restore: {}\ncryo's log:\n{}",
            std::fs::read_to_string(err_path).unwrap_or_default(),
            logs(&work)
        );
        Lines::new(r)
    }

    /// Kill and remove it (by id, in this test's runc state only).
    fn remove(&self) {
        let _ = self
            .runc()
            .args(["delete", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
    }
}

fn logs(work: &Path) -> String {
    std::fs::read_dir(work)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = std::io::pipe().expect("pipe");
    (OwnedFd::from(r), OwnedFd::from(w))
}

/// The counter's lines, read by a thread of the test's.
struct Lines {
    rx: mpsc::Receiver<(u64, String)>,
    /// Every line taken so far.
    seen: std::cell::RefCell<Vec<(u64, String)>>,
}

impl Lines {
    fn new(r: OwnedFd) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = std::io::BufReader::new(std::fs::File::from(r));
            for line in r.lines().map_while(Result::ok) {
                let mut it = line.split_whitespace();
                let n = it.next().and_then(|n| n.parse::<u64>().ok());
                let tok = it.next().map(str::to_string);
                match (n, tok) {
                    (Some(n), Some(t)) => {
                        if tx.send((n, t)).is_err() {
                            break;
                        }
                    }
                    _ => panic!("the counter wrote {line:?}"),
                }
            }
        });
        Lines {
            rx,
            seen: Default::default(),
        }
    }

    /// The next line, within 20 s.
    fn next(&self) -> Option<(u64, String)> {
        let l = self.rx.recv_timeout(Duration::from_secs(20)).ok()?;
        self.seen.borrow_mut().push(l.clone());
        Some(l)
    }

    /// `n` lines, each the one after the last (same token).
    fn consecutive(&self, n: usize) -> Vec<(u64, String)> {
        let mut out: Vec<(u64, String)> = Vec::new();
        for _ in 0..n {
            let l = self.next().expect("the counter stopped writing");
            if let Some(prev) = out.last() {
                assert_eq!((prev.0 + 1, &prev.1), (l.0, &l.1), "the count broke");
            }
            out.push(l);
        }
        out
    }

    /// Every line until the writer is gone (the container killed), then
    /// every line written, checked consecutive.
    fn until_closed(&self) -> Vec<(u64, String)> {
        while self.next().is_some() {}
        let all = self.seen.borrow().clone();
        for w in all.windows(2) {
            assert_eq!((w[0].0 + 1, &w[0].1), (w[1].0, &w[1].1), "the count broke");
        }
        all
    }
}

/// The restored counter goes on right after `last`, with its token.
fn assert_goes_on(after: &Lines, last: &(u64, String), what: &str) {
    let first = after.next().expect("the restored container writes nothing");
    assert_eq!(
        (first.0, &first.1),
        (last.0 + 1, &last.1),
        "{what}: the restored counter did not go on from its last line"
    );
    after.consecutive(5);
}

/// Checkpoint (the container killed), restore: the count goes on.
#[test]
fn checkpoint_and_restore() {
    need_runc!();
    let c = Container::new("kill");
    let before = c.run();
    before.consecutive(5);
    c.checkpoint("img", &[]);
    assert_eq!(c.status(), "gone", "runc checkpoint left the container");
    let rest = before.until_closed();
    let last = rest.last().cloned().expect("no line before the checkpoint");
    let after = c.restore("img");
    assert_eq!(c.status(), "running");
    assert_goes_on(&after, &last, "checkpoint");
    c.remove();
}

/// `runc checkpoint --pre-dump`, then a checkpoint with --parent-path
/// (written pages only, the rest from the pre-dump), restore.
#[test]
fn pre_dump_then_checkpoint_with_parent() {
    need_runc!();
    let c = Container::new("predump");
    let before = c.run();
    before.consecutive(3);
    c.checkpoint("pre", &["--pre-dump"]);
    assert_eq!(c.status(), "running", "a pre-dump stopped the container");
    before.consecutive(3);
    c.checkpoint("img", &["--parent-path", "../pre"]);
    assert!(
        std::fs::read_link(c.dir.join("img/parent")).is_ok(),
        "the checkpoint has no parent link"
    );
    let last = before
        .until_closed()
        .last()
        .cloned()
        .expect("no line before the checkpoint");
    let after = c.restore("img");
    assert_goes_on(&after, &last, "pre-dump chain");
    c.remove();
}

/// `runc checkpoint --leave-running`: the container counts on; removed,
/// then restored from the image, it goes on from the count it had when
/// it was dumped.
#[test]
fn leave_running_then_restore() {
    need_runc!();
    let c = Container::new("leave");
    let before = c.run();
    before.consecutive(3);
    c.checkpoint("img", &["--leave-running"]);
    assert_eq!(c.status(), "running", "--leave-running stopped it");
    before.consecutive(3);
    c.remove();
    let lines = before.until_closed();
    let after = c.restore("img");
    let first = after.next().expect("the restored container writes nothing");
    // It was dumped after the lines seen before, before those written at
    // its end.
    let at = lines
        .iter()
        .position(|l| (l.0 + 1, &l.1) == (first.0, &first.1))
        .unwrap_or_else(|| panic!("restored at {first:?}, not after any line it wrote"));
    assert!(at >= 2, "restored at {first:?}, before the checkpoint");
    after.consecutive(5);
    c.remove();
}
