//! Probes of the system around the tasks: cgroup freezers, namespaces,
//! the vdso, PR_SET_MM_MAP, POSIX timer ids and CAP_SYS_RESOURCE.

#![forbid(unsafe_code)]

use super::*;

pub(super) struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
    super_opts: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
pub(super) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn read_mountinfo() -> Result<Vec<MountEntry>, String> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e).to_string())?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let (Some(fstype), Some(_src), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape(mp)),
            fstype: fstype.to_string(),
            super_opts: opts.to_string(),
        });
    }
    Ok(out)
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
    mounts: &Result<Vec<MountEntry>, String>,
) -> Result<Outcome, KerndatError> {
    let mounts = match mounts {
        Ok(m) => m,
        Err(e) => return no(e.clone()),
    };
    match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => probe_cgroup_file(&m.mount_point, "cgroup.freeze"),
        None => no("no cgroup2 mount"),
    }
}

pub(super) fn probe_cgroup_v1_freezer(
    mounts: &Result<Vec<MountEntry>, String>,
) -> Result<Outcome, KerndatError> {
    let mounts = match mounts {
        Ok(m) => m,
        Err(e) => return no(e.clone()),
    };
    let found = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "freezer"));
    match found {
        Some(m) => probe_cgroup_file(&m.mount_point, "freezer.state"),
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
