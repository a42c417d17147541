//! Cgroups made by a test (removed by path when dropped) and reading a
//! task's membership.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A cgroup directory made for one test; removed (by path) on drop, once
/// its tasks are gone.
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(parent: &str) -> Option<TestCgroup> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let parent = Path::new(parent);
        if !parent.is_dir() {
            return None;
        }
        let dir = parent.join(format!(
            "cryo-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Some(TestCgroup { dir })
    }

    pub fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }

    /// The path of this cgroup inside its hierarchy ("/cryo-test-...").
    pub fn rel(&self) -> String {
        format!(
            "/{}",
            self.dir.file_name().unwrap_or_default().to_string_lossy()
        )
    }

    pub fn frozen(&self) -> bool {
        let events = std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
        let state = std::fs::read_to_string(self.dir.join("freezer.state")).unwrap_or_default();
        events.lines().any(|l| l.trim() == "frozen 1") || state.trim() == "FROZEN"
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("could not remove test cgroup {}", self.dir.display());
    }
}

/// The /proc/PID/cgroup line of a hierarchy, without its id:
/// ":freezer:/x" or "::/x" (cgroup v2).
pub fn cgroup_line(pid: i32, controllers: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(_, rest)| format!(":{rest}")))
        .find(|l| l.starts_with(&format!(":{controllers}:")))
        .unwrap_or_default()
}
