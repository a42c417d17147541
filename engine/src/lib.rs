//! cryo's engine: checkpoint and restore of Linux processes.
//!
//! The pipelines ([`dump`], [`restore`]) only orchestrate; each resource
//! keeps its dump and its restore side by side in one module: [`core`]
//! (registers and thread state), [`signals`] (actions, pending signals,
//! timers), [`creds`] (credentials and limits), [`fsinfo`] (cwd, root,
//! umask), [`mem`] (mappings and pages), [`files`] (one module per
//! descriptor kind), [`sessions`] (sessions, groups, controlling
//! terminals), [`cgroup`] (membership), [`ns`] (namespaces). Raw system
//! calls live in [`sys`], the parasite's lifecycle in [`infect`].
//!
//! A program checkpoints and restores a tree without the CLI through
//! [`dump()`] and [`restore()`] (as root, like the CLI):
//!
//! ```no_run
//! use cryo_engine::{dump, restore, DumpOptions, RestoreOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pid = 4242; // the root of the tree to checkpoint
//! let mut opts = DumpOptions::new(pid, "/var/lib/cryo/img");
//! opts.leave_running = true; // a snapshot: the tree goes on
//! let stats = dump(&opts)?;
//! println!("stopped {:?}, image {} bytes", stats.frozen, stats.image_bytes);
//!
//! // Later (the tree dumped without -R, or gone):
//! let restored = restore(&RestoreOptions::new("/var/lib/cryo/img"))?;
//! println!("running again as pid {}", restored.pid);
//! # Ok(())
//! # }
//! ```

pub mod cgroup;

pub use dump::{DumpError, DumpOptions, DumpStats};
pub use restore::{RestoreOptions, Restored};

/// Checkpoint the tree `opts` names into `opts.dir` (see [`dump::dump`],
/// which also reports progress). On any error every task is left running
/// as before.
pub fn dump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    dump::dump(opts, &|_, _| {})
}

/// Restore the image in `opts.dir`; returns once every task runs (see
/// [`restore::restore`]). A restore that fails leaves nothing behind.
pub fn restore(opts: &RestoreOptions) -> Result<Restored, restore::RestoreError> {
    restore::restore(opts)
}
pub mod core;
pub mod creds;
pub mod dump;
pub mod fault;
pub mod files;
pub mod freeze;
pub mod fsinfo;
pub mod infect;
pub mod kerndat;
pub mod mem;
pub mod notify;
pub mod ns;
pub mod pageserver;
pub mod phases;
pub mod proc;
pub mod pstree;
pub mod restore;
pub mod sched;
pub mod sessions;
pub mod sigframe;
pub mod signals;
pub mod sys;
