//! Descriptor tables shared between processes (clone with CLONE_FILES).
//!
//! Dump: kcmp KCMP_FILES orders the tables of the tree's processes, so
//! those sharing one are found with a binary search each; every sharer
//! must reach the first of them through parents that share it too (that
//! is how the restore makes it: each created by its parent with
//! CLONE_FILES), and says so in its pstree entry.
//!
//! Restore: the first task of the group (the builder) makes a
//! [`SharedTable`] before it creates the others; they are created sharing
//! its table with cryo's inherited descriptors in it. Each member keeps
//! what it still needs at numbers from `floor` up, which the builder
//! leaves alone, and says it is ready (it no longer uses what cryo left
//! in the table); the builder then builds the dumped table once for all
//! (see `restore::fdtable`) and says so; the members go on from there.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;

use crate::sys::mem::SharedCounters;
use crate::sys::SysError;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("tasks {a} and {b} share one descriptor table (clone with CLONE_FILES), but not through their parents: cryo makes a shared table by creating each sharer from a parent that shares it")]
    NotThroughParents { a: i32, b: i32 },
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// For each process of `procs` (pid, ppid), whether it shares its
/// descriptor table with its parent. The tree is stopped.
pub fn shared_with_parent(procs: &[(i32, i32)]) -> Result<Vec<bool>, TableError> {
    // One process per table, in the kernel's order of the tables, and
    // which of them each process's table is.
    let mut reps: Vec<usize> = Vec::new();
    let mut table_of: Vec<usize> = Vec::with_capacity(procs.len());
    for (i, &(pid, _)) in procs.iter().enumerate() {
        let mut failed = None;
        let at = reps.binary_search_by(|&r| {
            crate::sys::kcmp_files(procs[r].0, pid).unwrap_or_else(|e| {
                failed = Some(e);
                std::cmp::Ordering::Equal
            })
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        match at {
            Ok(k) => table_of.push(reps[k]),
            Err(k) => {
                reps.insert(k, i);
                table_of.push(i);
            }
        }
    }
    let index_of: std::collections::HashMap<i32, usize> =
        procs.iter().enumerate().map(|(i, p)| (p.0, i)).collect();
    let shares: Vec<bool> = procs
        .iter()
        .enumerate()
        .map(|(i, &(_, ppid))| {
            index_of
                .get(&ppid)
                .is_some_and(|&p| table_of[p] == table_of[i])
        })
        .collect();
    // Of the processes of one table, only one may have a parent outside
    // it (its first, which the others descend from).
    let mut first: std::collections::HashMap<usize, i32> = Default::default();
    for (i, &(pid, _)) in procs.iter().enumerate() {
        if shares[i] {
            continue;
        }
        if let Some(&other) = first.get(&table_of[i]) {
            return Err(TableError::NotThroughParents { a: other, b: pid });
        }
        first.insert(table_of[i], pid);
    }
    Ok(shares)
}

/// A descriptor table tasks of the restored tree share, as its builder
/// made it before it created the others (inherited by each, by value).
#[derive(Debug, Clone, Copy)]
pub struct SharedTable {
    /// Numbers from here up are the members' own; every number below is
    /// the builder's to close or fill.
    pub floor: RawFd,
    sync: SharedCounters,
}

/// Counters of [`SharedTable::sync`]: members ready, table built.
const READY: usize = 0;
const BUILT: usize = 1;

impl SharedTable {
    /// Made by the builder before it creates any member: `floor` is above
    /// every descriptor open now and every dumped number (`max_fd`).
    pub fn new(max_fd: RawFd) -> Result<SharedTable, String> {
        let sync = SharedCounters::new()
            .map_err(|e| format!("a page shared with the tasks sharing its descriptors: {e}"))?;
        let open_max = std::fs::read_dir("/proc/self/fd")
            .map_err(|e| format!("reading /proc/self/fd: {e}"))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
            .max()
            .unwrap_or(2);
        Ok(SharedTable {
            floor: open_max.max(max_fd) + 1,
            sync,
        })
    }

    /// A member's copy of `fd` at or above the floor, where the builder
    /// leaves it alone.
    pub fn keep(&self, fd: RawFd) -> Result<RawFd, String> {
        crate::sys::fd::dup_at_least(fd, self.floor)
            .map_err(|e| format!("keeping descriptor {fd} above the shared table: {e}"))
    }

    /// A member no longer uses anything of cryo's below the floor.
    pub fn member_ready(&self) {
        self.sync.add(READY, 1);
    }

    /// The builder waits for its `members`.
    pub fn wait_members(&self, members: u32) {
        self.sync.wait_for(READY, members);
    }

    /// The builder has filled the table.
    pub fn built(&self) {
        self.sync.add(BUILT, 1);
    }

    /// A member waits for the builder.
    pub fn wait_built(&self) {
        self.sync.wait_for(BUILT, 1);
    }
}
