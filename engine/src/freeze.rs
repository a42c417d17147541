//! Cgroup freezers: cgroup v2 `cgroup.freeze` (frozen once cgroup.events
//! says `frozen 1`) and the v1 freezer's `freezer.state`. A frozen cgroup
//! lets cryo seize all of its tasks at one instant; it is thawed right
//! after (the tasks then stay in their ptrace stops), and always thawed
//! if anything fails.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("{path}: neither cgroup.freeze (cgroup v2) nor freezer.state (v1 freezer) found; is it a cgroup directory?")]
    NotFreezable { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not frozen after {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
}

type Result<T> = std::result::Result<T, FreezeError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    V2,
    V1,
}

/// A frozen cgroup; thawed on drop.
#[derive(Debug)]
pub struct Freezer {
    dir: PathBuf,
    kind: Kind,
    frozen: bool,
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| FreezeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| FreezeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Freezer {
    /// Freeze the cgroup at `dir` and wait until every task in it is
    /// frozen.
    pub fn freeze(dir: &Path) -> Result<Freezer> {
        let kind = if dir.join("cgroup.freeze").exists() {
            Kind::V2
        } else if dir.join("freezer.state").exists() {
            Kind::V1
        } else {
            return Err(FreezeError::NotFreezable {
                path: dir.to_path_buf(),
            });
        };
        let mut f = Freezer {
            dir: dir.to_path_buf(),
            kind,
            frozen: true,
        };
        match kind {
            Kind::V2 => write(&dir.join("cgroup.freeze"), "1")?,
            Kind::V1 => write(&dir.join("freezer.state"), "FROZEN")?,
        }
        let start = Instant::now();
        loop {
            if f.is_frozen()? {
                return Ok(f);
            }
            if start.elapsed() > TIMEOUT {
                f.thaw()?;
                return Err(FreezeError::Timeout {
                    path: dir.to_path_buf(),
                    secs: TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn is_frozen(&self) -> Result<bool> {
        Ok(match self.kind {
            Kind::V2 => read(&self.dir.join("cgroup.events"))?
                .lines()
                .any(|l| l.trim() == "frozen 1"),
            Kind::V1 => read(&self.dir.join("freezer.state"))?.trim() == "FROZEN",
        })
    }

    /// Thaw the cgroup (idempotent).
    pub fn thaw(&mut self) -> Result<()> {
        if !self.frozen {
            return Ok(());
        }
        match self.kind {
            Kind::V2 => write(&self.dir.join("cgroup.freeze"), "0")?,
            Kind::V1 => write(&self.dir.join("freezer.state"), "THAWED")?,
        }
        self.frozen = false;
        Ok(())
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::error!("could not thaw {}: {e}", self.dir.display());
        }
    }
}

/// The pids in a cgroup directory and the cgroups below it (their
/// cgroup.procs).
pub fn procs(dir: &Path) -> Result<Vec<i32>> {
    let mut out: Vec<i32> = read(&dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    // And those of the cgroups below (frozen with it).
    let subdirs = std::fs::read_dir(dir).into_iter().flatten().flatten();
    for e in subdirs.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
        out.extend(procs(&e.path())?);
    }
    Ok(out)
}
