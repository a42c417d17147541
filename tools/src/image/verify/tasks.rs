//! The process tree, cores and mappings of an image.

use super::*;

/// pstree.img itself, and that every process has its files and every
/// per-task file its process.
pub(super) fn check_tasks(
    rep: &mut Report<'_>,
    d: &Decoded,
    regular: &BTreeSet<String>,
    missing: &mut HashSet<String>,
    root_pid: Option<u32>,
) {
    let mut need = |rep: &mut Report<'_>, name: String, why: String| {
        if !regular.contains(&name) && missing.insert(name.clone()) {
            rep.file(&name, format!("missing ({why})"));
        }
    };
    if !regular.contains(FILES_FILE) {
        need(rep, FILES_FILE.to_string(), "every image has one".into());
    }
    let Some(pstree) = &d.pstree else {
        if !regular.contains(PSTREE_FILE) {
            need(rep, PSTREE_FILE.to_string(), "every image has one".into());
        }
        return;
    };
    if pstree.is_empty() {
        rep.file(PSTREE_FILE, "holds no process");
    }
    let mut pids = BTreeSet::new();
    let mut tids = BTreeSet::new();
    // Live processes and their threads: those have per-process files.
    let mut live = BTreeSet::new();
    let mut live_tids = BTreeSet::new();
    for e in pstree {
        if !pids.insert(e.pid) {
            rep.file(PSTREE_FILE, format!("process {} appears twice", e.pid));
        }
        if !e.zombie {
            live.insert(e.pid);
            live_tids.extend(e.threads.iter().copied());
        } else {
            check_zombie(rep, e);
        }
        if !e.threads.contains(&e.pid) {
            rep.file(
                PSTREE_FILE,
                format!(
                    "process {}: its threads {:?} do not include its pid",
                    e.pid, e.threads
                ),
            );
        }
        for &tid in &e.threads {
            if !tids.insert(tid) {
                rep.file(PSTREE_FILE, format!("thread {tid} appears twice"));
            }
        }
    }
    if let Some(root) = root_pid {
        if !pids.contains(&root) {
            rep.file(
                INVENTORY_FILE,
                format!("root pid {root} is not a process of pstree.img"),
            );
        } else if pstree.first().map(|e| e.pid) != Some(root) {
            rep.file(
                PSTREE_FILE,
                format!("the root process {root} is not the first entry"),
            );
        }
        if pstree.iter().any(|e| e.pid == root && e.zombie) {
            rep.file(PSTREE_FILE, format!("the root process {root} is a zombie"));
        }
        for e in pstree {
            if e.pid != root && !pids.contains(&e.ppid) {
                rep.file(
                    PSTREE_FILE,
                    format!("process {}: parent {} is not in the image", e.pid, e.ppid),
                );
            }
        }
    }
    // Parents come before their children; a zombie has no children (the
    // kernel hands them over when it exits).
    let mut seen = BTreeSet::new();
    for e in pstree {
        if pids.contains(&e.ppid) && !seen.contains(&e.ppid) && e.ppid != e.pid {
            rep.file(
                PSTREE_FILE,
                format!("process {} comes before its parent {}", e.pid, e.ppid),
            );
        }
        if pstree.iter().any(|p| p.pid == e.ppid && p.zombie) {
            rep.file(
                PSTREE_FILE,
                format!(
                    "process {}: its parent {} is a zombie, which cannot have children",
                    e.pid, e.ppid
                ),
            );
        }
        seen.insert(e.pid);
    }
    for e in pstree.iter().filter(|e| !e.zombie) {
        let why = format!("process {} of pstree.img", e.pid);
        for &tid in &e.threads {
            need(rep, core_file(tid), format!("thread {tid} of {why}"));
        }
        need(rep, mm_file(e.pid), why.clone());
        need(rep, pagemap_file(e.pid), why.clone());
        need(rep, fdinfo_file(e.pid), why.clone());
        need(rep, pages_file(e.pid), why);
    }
    let orphan = |pid: u32| {
        if pids.contains(&pid) {
            format!("belongs to process {pid}, a zombie of pstree.img (zombies have no such file)")
        } else {
            "belongs to no process of pstree.img".to_string()
        }
    };
    for &tid in d.cores.keys() {
        if !live_tids.contains(&tid) {
            let msg = if tids.contains(&tid) {
                format!(
                    "belongs to thread {tid} of a zombie of pstree.img (zombies have no such file)"
                )
            } else {
                "belongs to no thread of pstree.img".to_string()
            };
            rep.file(&core_file(tid), msg);
        }
    }
    for (ids, name) in [
        (
            d.mms.keys().copied().collect::<Vec<_>>(),
            mm_file as fn(u32) -> String,
        ),
        (d.pagemaps.keys().copied().collect(), pagemap_file),
        (d.fdinfos.keys().copied().collect(), fdinfo_file),
        (d.pages.iter().copied().collect(), pages_file),
    ] {
        for pid in ids {
            if !live.contains(&pid) {
                rep.file(&name(pid), orphan(pid));
            }
        }
    }
}

/// A zombie's wait status and exit signal.
pub(super) fn check_zombie(rep: &mut Report<'_>, e: &PstreeEntry) {
    if load::WaitStatus::of(e.exit_status) == load::WaitStatus::Invalid {
        rep.file(
            PSTREE_FILE,
            format!(
                "zombie {}: exit status {:#x} is neither an exit code nor a fatal signal",
                e.pid, e.exit_status
            ),
        );
    }
    if e.exit_signal > 64 {
        rep.file(
            PSTREE_FILE,
            format!(
                "zombie {}: exit signal {} is not a signal",
                e.pid, e.exit_signal
            ),
        );
    }
}

pub(super) fn check_cores(rep: &mut Report<'_>, d: &Decoded) {
    let leaders: BTreeSet<u32> = d
        .pstree
        .iter()
        .flatten()
        .filter(|e| !e.zombie)
        .map(|e| e.pid)
        .collect();
    for (&tid, core) in &d.cores {
        let name = core_file(tid);
        if core.tid != tid {
            rep.file(&name, format!("holds thread {}, expected {tid}", core.tid));
        }
        if core.regs.is_none() {
            rep.file(&name, "no registers");
        }
        if core.xsave.len() < XSAVE_MIN || core.xsave.len() > XSAVE_MAX {
            rep.file(
                &name,
                format!(
                    "XSAVE area of {} bytes (expected {XSAVE_MIN}..={XSAVE_MAX})",
                    core.xsave.len()
                ),
            );
        }
        if leaders.contains(&tid) && core.process.is_none() {
            rep.file(&name, "the leader's core lacks the process-wide state");
        }
    }
}

/// Every namespace a process names that is not the dumping cryo's is
/// described by namespaces.img, with the process among its members.
pub(super) fn check_namespaces(rep: &mut Report<'_>, d: &Decoded) {
    // Without it, every namespace was the dumping cryo's (so are those of
    // images made before it existed).
    if d.namespaces.is_empty() {
        return;
    }
    for (&tid, core) in &d.cores {
        let Some(pc) = &core.process else { continue };
        for id in pc.namespaces.iter().filter(|i| !i.host) {
            let e = d
                .namespaces
                .iter()
                .find(|e| e.kind == id.kind && e.inode == id.inode);
            match e {
                None => rep.file(
                    cryo_image::NAMESPACES_FILE,
                    format!(
                        "does not describe the {} namespace {} of process {tid}",
                        id.kind, id.inode
                    ),
                ),
                Some(e) if !e.pids.contains(&tid) => rep.file(
                    cryo_image::NAMESPACES_FILE,
                    format!(
                        "the {} namespace {} does not list its process {tid}",
                        id.kind, id.inode
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

/// Every record of a tmpfs-ID.img, read one at a time (file contents
/// are not held): a data record must follow a regular file's.
pub(super) fn read_tmpfs(dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let mut r = cryo_image::ImageReader::open(dir, name, cryo_image::Kind::Tmpfs)?;
    let mut in_file = false;
    while let Some(rec) = r.next::<cryo_image::proto::TmpfsRecord>()? {
        if let Some(n) = &rec.node {
            // S_IFMT and S_IFREG.
            in_file = n.mode & 0o170000 == 0o100000 && n.link_to.is_empty();
        } else if !in_file {
            anyhow::bail!(
                "{}: record {}: file contents that follow no regular file",
                r.path().display(),
                r.record_index()
            );
        }
    }
    Ok(())
}

/// Each new tmpfs of a mount namespace has its tmpfs-ID.img, and each
/// mount that binds another names one of its namespace.
pub(super) fn check_mounts(rep: &mut Report<'_>, d: &Decoded) {
    use cryo_image::proto::mount_entry::How;
    for e in &d.namespaces {
        let Some(st) = &e.mnt else { continue };
        for m in &st.mounts {
            let fresh_tmpfs = matches!(m.how, Some(How::Fresh(_))) && m.fstype == "tmpfs";
            if fresh_tmpfs && !d.tmpfs.contains(&m.id) {
                rep.file(
                    &cryo_image::tmpfs_file(m.id),
                    format!(
                        "missing or unreadable: the files of the tmpfs at {}",
                        m.mountpoint
                    ),
                );
            }
            if let Some(How::Bind(b)) = &m.how {
                if !st.mounts.iter().any(|o| o.id == b.mount) {
                    rep.file(
                        cryo_image::NAMESPACES_FILE,
                        format!(
                            "mount {} at {} binds mount {}, which is not in its namespace",
                            m.id, m.mountpoint, b.mount
                        ),
                    );
                }
            }
            if m.how.is_none() {
                rep.file(
                    cryo_image::NAMESPACES_FILE,
                    format!(
                        "mount {} at {} says nothing of how it is made",
                        m.id, m.mountpoint
                    ),
                );
            }
        }
    }
}

pub(super) fn check_mms(rep: &mut Report<'_>, d: &Decoded) {
    for (&pid, mm) in &d.mms {
        let name = mm_file(pid);
        let mut prev_end = 0u64;
        for (i, v) in mm.vmas.iter().enumerate() {
            if v.start % PAGE != 0 || v.end % PAGE != 0 || v.end <= v.start {
                rep.file(
                    &name,
                    format!("mapping {i} ({:#x}-{:#x}) is malformed", v.start, v.end),
                );
            } else if v.start < prev_end {
                rep.file(
                    &name,
                    format!(
                        "mapping {i} ({:#x}-{:#x}) overlaps or precedes the previous one",
                        v.start, v.end
                    ),
                );
            }
            if VmaKind::try_from(v.kind).is_err() {
                rep.file(&name, format!("mapping {i} has unknown kind {}", v.kind));
            }
            prev_end = prev_end.max(v.end);
        }
    }
}

/// cgroups.img names each cgroup by an absolute path without `..` and
/// each setting by a plain file name; every cgroup a process was in
/// (other than a hierarchy's root) is described when the file exists.
pub(super) fn check_cgroups(rep: &mut Report<'_>, d: &Decoded) {
    let file = cryo_image::CGROUPS_FILE;
    for c in &d.cgroups {
        if !c.path.starts_with('/') || c.path.split('/').any(|p| p == "..") {
            rep.file(
                file,
                format!("cgroup path {:?} is not a plain absolute path", c.path),
            );
        }
        for s in &c.settings {
            if s.name.is_empty() || s.name.contains('/') || s.name.starts_with('.') {
                rep.file(
                    file,
                    format!("cgroup {}: setting {:?} is not a file name", c.path, s.name),
                );
            }
        }
    }
    if d.cgroups.is_empty() {
        return;
    }
    for (&tid, core) in &d.cores {
        let Some(pc) = &core.process else { continue };
        for m in pc.cgroups.iter().filter(|m| m.path != "/") {
            let described = d
                .cgroups
                .iter()
                .any(|c| c.hierarchy == m.hierarchy && c.path == m.path);
            if !described {
                rep.file(
                    file,
                    format!(
                        "does not describe cgroup {} (hierarchy {}) of process {tid}",
                        m.path, m.hierarchy
                    ),
                );
            }
        }
    }
}
