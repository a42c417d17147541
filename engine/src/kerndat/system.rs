//! Probes of the system around the tasks: cgroup freezers, namespaces,
//! the vdso, PR_SET_MM_MAP, POSIX timer ids and CAP_SYS_RESOURCE.

#![forbid(unsafe_code)]

use super::*;

use crate::ns::mnt::info::Mount;

pub(super) fn read_mountinfo() -> Result<Vec<Mount>, String> {
    crate::ns::mnt::info::read("self").map_err(|e| format!("/proc/self/mountinfo: {e}"))
}

/// Create `<mount>/cryo-check-<pid>`, check that `file` exists in it, and
/// remove the directory again.
pub(super) fn probe_cgroup_file(mount: &Path, file: &str) -> Result<Outcome, KerndatError> {
    let dir = mount.join(format!("cryo-check-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| io_err(&dir, e))?;
    let has = dir.join(file).exists();
    let removed = std::fs::remove_dir(&dir).map_err(|e| io_err(&dir, e));
    removed?;
    if has {
        yes(format!("{} has {file}", mount.display()))
    } else {
        no(format!("no {file} in a child of {}", mount.display()))
    }
}

pub(super) fn probe_cgroup_v2_freezer(
    mounts: &Result<Vec<Mount>, String>,
) -> Result<Outcome, KerndatError> {
    let mounts = match mounts {
        Ok(m) => m,
        Err(e) => return no(e.clone()),
    };
    match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => probe_cgroup_file(Path::new(&m.mountpoint), "cgroup.freeze"),
        None => no("no cgroup2 mount"),
    }
}

pub(super) fn probe_cgroup_v1_freezer(
    mounts: &Result<Vec<Mount>, String>,
) -> Result<Outcome, KerndatError> {
    let mounts = match mounts {
        Ok(m) => m,
        Err(e) => return no(e.clone()),
    };
    let found = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.fs_options.split(',').any(|o| o == "freezer"));
    match found {
        Some(m) => probe_cgroup_file(Path::new(&m.mountpoint), "freezer.state"),
        None => no("no cgroup v1 freezer mount"),
    }
}

// ---------------------------------------------------------------------------
// namespaces

pub(super) struct NsKind {
    name: &'static str,
    feature: &'static str,
    flag: libc::c_int,
    cost: &'static str,
}

pub(super) const NAMESPACES: &[NsKind] = &[
    NsKind {
        name: "user",
        feature: "ns-user",
        flag: libc::CLONE_NEWUSER,
        cost: "cannot restore tasks in their own user namespace",
    },
    NsKind {
        name: "pid",
        feature: "ns-pid",
        flag: libc::CLONE_NEWPID,
        cost: "cannot restore pid namespaces (pid clashes on restore more likely)",
    },
    NsKind {
        name: "net",
        feature: "ns-net",
        flag: libc::CLONE_NEWNET,
        cost: "cannot restore tasks in their own network namespace",
    },
    NsKind {
        name: "mnt",
        feature: "ns-mnt",
        flag: libc::CLONE_NEWNS,
        cost: "cannot restore mount namespaces",
    },
    NsKind {
        name: "uts",
        feature: "ns-uts",
        flag: libc::CLONE_NEWUTS,
        cost: "cannot restore hostname/domainname namespaces",
    },
    NsKind {
        name: "ipc",
        feature: "ns-ipc",
        flag: libc::CLONE_NEWIPC,
        cost: "cannot restore IPC namespaces (SysV objects, mqueues)",
    },
    NsKind {
        name: "cgroup",
        feature: "ns-cgroup",
        flag: libc::CLONE_NEWCGROUP,
        cost: "cannot restore cgroup namespaces",
    },
    NsKind {
        name: "time",
        feature: "ns-time",
        flag: CLONE_NEWTIME,
        cost: "cannot restore time namespaces (monotonic/boottime clocks jump)",
    },
];

pub(super) fn probe_namespaces() -> Vec<Feature> {
    // Fork one child per namespace first, then reap them all: the unshares
    // run in parallel.
    let children: Vec<Result<Child, KerndatError>> = NAMESPACES
        .iter()
        .map(|ns| {
            let flag = ns.flag;
            spawn(|| sys::proc::fork_unshare(flag))
        })
        .collect();
    NAMESPACES
        .iter()
        .zip(children)
        .map(|(ns, child)| {
            let r = probe_one_ns(ns, child);
            feature(ns.feature, ns.cost, r)
        })
        .collect()
}

pub(super) fn probe_one_ns(
    ns: &NsKind,
    child: Result<Child, KerndatError>,
) -> Result<Outcome, KerndatError> {
    let child = child?;
    let pid = child.pid().as_raw();
    let status = child.wait()?;
    let link = format!("/proc/self/ns/{}", ns.name);
    let has_link = std::fs::symlink_metadata(&link).is_ok();
    match status {
        WaitStatus::Exited(_, 0) if has_link => yes(format!("{link} exists, unshare works")),
        WaitStatus::Exited(_, 0) => no(format!("unshare works but {link} is missing")),
        other => match errno_from_exit(&other) {
            Some(errno) => no(format!("unshare in a child: {errno}")),
            None => Err(KerndatError::Child {
                probe: ns.feature,
                pid,
                status: format!("{other:?}"),
            }),
        },
    }
}

/// open_tree(OPEN_TREE_CLONE): a detached copy of the root mount, let go.
pub(super) fn probe_mount_api() -> Result<Outcome, KerndatError> {
    match crate::sys::mount::clone_mount("/") {
        Ok(_) => yes("open_tree(OPEN_TREE_CLONE) works (peer groups also need Linux 5.15's MOVE_MOUNT_SET_GROUP)"),
        Err(e) => no(format!("open_tree: {e}")),
    }
}

pub(super) fn probe_timens_offsets() -> Result<Outcome, KerndatError> {
    let p = "/proc/self/timens_offsets";
    if Path::new(p).exists() {
        yes(format!("{p} exists"))
    } else {
        no(format!("{p} missing"))
    }
}

// ---------------------------------------------------------------------------
// vdso, prctl, capabilities

pub(super) fn probe_vdso_movable() -> Result<Outcome, KerndatError> {
    let path = "/proc/self/smaps";
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut in_vdso = false;
    for line in text.lines() {
        if line.ends_with("[vdso]") {
            in_vdso = true;
        } else if in_vdso {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                let flags = flags.trim();
                return if flags.split_whitespace().any(|f| f == "sl") {
                    no(format!("[vdso] is sealed (VmFlags: {flags})"))
                } else {
                    yes(format!("[vdso] not sealed (VmFlags: {flags})"))
                };
            }
        }
    }
    if in_vdso {
        yes("[vdso] has no VmFlags line (no sealing support)")
    } else {
        yes("no [vdso] mapped")
    }
}

pub(super) fn probe_pr_set_mm_map() -> Result<Outcome, KerndatError> {
    let size = sys::proc::mm_map_size().map_err(sys_err("prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)"))?;
    if size == 104 {
        yes("prctl_mm_map size 104")
    } else {
        Err(KerndatError::Unexpected {
            what: "prctl_mm_map size",
            expected: "104".into(),
            found: size.to_string(),
        })
    }
}

pub(super) fn probe_timer_restore_ids() -> Result<Outcome, KerndatError> {
    let r = sys::proc::timer_restore_ids_mode()
        .map_err(sys_err("prctl(PR_TIMER_CREATE_RESTORE_IDS, GET)"))?;
    yes(format!("current mode {r}"))
}

pub(super) fn status_caps(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

pub(super) fn probe_cap_sys_resource() -> Result<Outcome, KerndatError> {
    let path = "/proc/self/status";
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let Some(eff) = status_caps(&text, "CapEff:") else {
        return Err(KerndatError::Unexpected {
            what: "/proc/self/status",
            expected: "a CapEff line".into(),
            found: "none".into(),
        });
    };
    let bit = 1u64 << CAP_SYS_RESOURCE;
    if eff & bit != 0 {
        return yes(format!("CapEff {eff:#x}"));
    }
    let bnd = match status_caps(&text, "CapBnd:") {
        Some(b) if b & bit == 0 => ", not in the bounding set",
        _ => "",
    };
    no(format!("CapEff {eff:#x} lacks bit {CAP_SYS_RESOURCE}{bnd}"))
}
