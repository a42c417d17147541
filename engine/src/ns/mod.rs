//! Namespaces: one arm per kind in [`dump`] and [`restore`], so that a new
//! kind does not compile until both sides handle it.
//!
//! Today every task must share each namespace with cryo: the dump refuses
//! a task in a namespace of its own (paths, pids and addresses would be
//! taken from the wrong one) and records the inode of each, for `cryo
//! image show`; the restored tasks are made in the restoring cryo's
//! namespaces. Modules for the kinds that get their own state (uts, ipc,
//! mnt, net, pid, user, cgroup, time) go next to this one.

#![forbid(unsafe_code)]

use cryo_image::proto::NamespaceId;

/// The kinds of namespace, as /proc/PID/ns names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsKind {
    Cgroup,
    Ipc,
    Mnt,
    Net,
    Pid,
    Time,
    User,
    Uts,
}

pub const ALL: [NsKind; 8] = [
    NsKind::Cgroup,
    NsKind::Ipc,
    NsKind::Mnt,
    NsKind::Net,
    NsKind::Pid,
    NsKind::Time,
    NsKind::User,
    NsKind::Uts,
];

impl NsKind {
    pub fn name(self) -> &'static str {
        match self {
            NsKind::Cgroup => "cgroup",
            NsKind::Ipc => "ipc",
            NsKind::Mnt => "mnt",
            NsKind::Net => "net",
            NsKind::Pid => "pid",
            NsKind::Time => "time",
            NsKind::User => "user",
            NsKind::Uts => "uts",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("task {pid} is in its own {ns} namespace ({id}); dumping tasks in other namespaces is not supported yet")]
    Foreign {
        pid: i32,
        ns: &'static str,
        id: String,
    },
}

fn link(pid: &str, kind: NsKind) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{}", kind.name()))
        .ok()
        .map(|p| p.display().to_string())
}

/// The inode in a /proc/PID/ns link (`mnt:[4026531841]`).
fn inode(link: &str) -> Option<u64> {
    link.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// Dump side of every kind: refuse a namespace that is not cryo's own
/// (none is restored yet). Checked in the order the kernel lists them,
/// mnt first (paths), then pid, net, uts, ipc, user, cgroup, time.
pub fn check(pid: i32) -> Result<(), NsError> {
    let order = [
        NsKind::Mnt,
        NsKind::Pid,
        NsKind::Net,
        NsKind::Uts,
        NsKind::Ipc,
        NsKind::User,
        NsKind::Cgroup,
        NsKind::Time,
    ];
    for kind in order {
        let theirs = link(&pid.to_string(), kind);
        let same = match kind {
            NsKind::Cgroup
            | NsKind::Ipc
            | NsKind::Mnt
            | NsKind::Net
            | NsKind::Pid
            | NsKind::Time
            | NsKind::User
            | NsKind::Uts => theirs.is_none() || theirs == link("self", kind),
        };
        if !same {
            return Err(NsError::Foreign {
                pid,
                ns: kind.name(),
                id: theirs.unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// The namespaces of `pid`, by the inodes of /proc/PID/ns/*, in
/// alphabetical order of kind.
pub fn ids(pid: i32) -> Vec<NamespaceId> {
    ALL.iter()
        .filter_map(|&kind| {
            Some(NamespaceId {
                kind: kind.name().to_string(),
                inode: inode(&link(&pid.to_string(), kind)?)?,
            })
        })
        .collect()
}

/// Restore side of every kind, in the new task before it hands over:
/// nothing is restored yet, the task stays in the namespaces cryo
/// created it in (the dump refused any other).
pub fn restore(_ids: &[NamespaceId]) -> Result<(), String> {
    for kind in ALL {
        match kind {
            NsKind::Cgroup
            | NsKind::Ipc
            | NsKind::Mnt
            | NsKind::Net
            | NsKind::Pid
            | NsKind::Time
            | NsKind::User
            | NsKind::Uts => {}
        }
    }
    Ok(())
}
