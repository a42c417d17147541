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

pub mod cgroup;
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
pub mod ns;
pub mod pageserver;
pub mod proc;
pub mod pstree;
pub mod restore;
pub mod sched;
pub mod sessions;
pub mod sigframe;
pub mod signals;
pub mod sys;
