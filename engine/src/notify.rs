//! Who is told of each step of a dump or a restore: CRIU's action
//! scripts (`--action-script`) and the NOTIFY messages of its RPC
//! service, which container runtimes answer (runc records the restored
//! pid at `post-restore`, runs its hooks at `setup-namespaces`).
//!
//! The steps, with CRIU's names:
//! - dump: `pre-dump` (before any task is seized), `network-lock` (the
//!   tree is stopped, nothing captured yet), `post-dump` (the image is
//!   written; tasks not yet killed), `network-unlock` (after a dump that
//!   left the tree running, or after a failed one once it runs again);
//! - restore: `pre-restore`, `setup-namespaces` (every task is in its
//!   namespaces, with the root's pid), `post-restore` (every task is
//!   restored and still stopped, with the root's pid), `network-unlock`
//!   (whatever locked the network at the dump may let it go),
//!   `pre-resume`, `post-resume` (every task runs).
//!
//! A step's listener that fails stops the dump or the restore there (a
//! dump then leaves the tree running; a restore leaves nothing).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type Listener = dyn Fn(&str, i32) -> Result<(), String> + Send + Sync;

struct Inner {
    listeners: Vec<Box<Listener>>,
    /// `network-lock` was told (and `network-unlock` is owed).
    locked: AtomicBool,
}

/// The listeners of a dump's or a restore's steps (none by default).
#[derive(Clone, Default)]
pub struct Notify(Option<Arc<Inner>>);

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.as_ref().map_or(0, |i| i.listeners.len());
        write!(f, "Notify({n} listeners)")
    }
}

impl Notify {
    /// Told of each step by `f(step, pid)` (pid 0 where the step has
    /// none); an error stops the dump or restore.
    pub fn new(f: impl Fn(&str, i32) -> Result<(), String> + Send + Sync + 'static) -> Notify {
        Notify::of(vec![Box::new(f)])
    }

    fn of(listeners: Vec<Box<Listener>>) -> Notify {
        Notify(Some(Arc::new(Inner {
            listeners,
            locked: AtomicBool::new(false),
        })))
    }

    /// Action scripts, as CRIU runs them: each through `sh -c`, with
    /// CRTOOLS_SCRIPT_ACTION (the step), CRTOOLS_IMAGE_DIR and, where the
    /// step has one, CRTOOLS_INIT_PID; an exit other than 0 is a failure.
    pub fn scripts(paths: &[PathBuf], image_dir: PathBuf) -> Notify {
        if paths.is_empty() {
            return Notify::default();
        }
        let listeners = paths
            .iter()
            .cloned()
            .map(|script| {
                let dir = image_dir.clone();
                Box::new(move |step: &str, pid: i32| run_script(&script, &dir, step, pid))
                    as Box<Listener>
            })
            .collect();
        Notify::of(listeners)
    }

    /// Tell every listener of `step` (for `pid`); the first failure is
    /// returned, naming the step.
    pub fn tell(&self, step: &str, pid: i32) -> Result<(), String> {
        let Some(inner) = &self.0 else {
            return Ok(());
        };
        tracing::debug!(step, pid, "notify");
        for l in &inner.listeners {
            l(step, pid).map_err(|e| format!("the {step} notification failed: {e}"))?;
        }
        Ok(())
    }

    /// `network-lock`, once for a dump however often it is tried.
    pub fn lock_network(&self, pid: i32) -> Result<(), String> {
        match &self.0 {
            Some(i) if !i.locked.load(Ordering::SeqCst) => {
                self.tell("network-lock", pid)?;
                i.locked.store(true, Ordering::SeqCst);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `network-unlock`, if `network-lock` was told (an error is only
    /// logged: the dump's outcome is already decided).
    pub fn unlock_network(&self, pid: i32) {
        if let Some(i) = &self.0 {
            if i.locked.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.tell("network-unlock", pid) {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}

fn run_script(script: &PathBuf, dir: &PathBuf, step: &str, pid: i32) -> Result<(), String> {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env("CRTOOLS_SCRIPT_ACTION", step)
        .env("CRTOOLS_IMAGE_DIR", dir)
        .stdin(std::process::Stdio::null());
    if pid > 0 {
        cmd.env("CRTOOLS_INIT_PID", pid.to_string());
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("action script {} ended {s}", script.display())),
        Err(e) => Err(format!("action script {}: {e}", script.display())),
    }
}
