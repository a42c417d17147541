//! cryo's engine: checkpoint and restore of Linux processes.

pub mod cgroup;
pub mod dump;
pub mod fault;
pub mod files;
pub mod freeze;
pub mod infect;
pub mod kerndat;
pub mod mem;
pub mod proc;
pub mod pstree;
pub mod restore;
pub mod sigframe;
pub mod sys;
