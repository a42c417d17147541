//! `cryo image show`: a readable summary of an image: the whole process
//! tree (zombies with their exit status), then for every live process its
//! threads, memory (per mapping, the pages stored in its own pages file and
//! those that are its parent's), descriptors and state.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use cryo_image::proto::{FileEntry, Inventory, PstreeEntry, Vma};
use cryo_image::PAGE_SIZE;

use super::load;

mod json;

/// One process of the image, with everything read from its files.
pub(super) type Task = super::task::TaskImage;

struct Image {
    inventory: Inventory,
    /// Every process, zombies included, in pstree order.
    pstree: Vec<PstreeEntry>,
    tasks: Vec<Task>,
    /// Per live task: where its in-parent pages are stored (the pid of the
    /// ancestor holding them, None for pages no ancestor stored).
    parent_sources: Vec<BTreeMap<Option<u32>, u64>>,
    files: HashMap<u32, FileEntry>,
    /// Every regular file of the directory, with its size and whether the
    /// inventory lists it.
    dir_files: Vec<(String, u64, bool)>,
    /// The namespaces that were not the dumping cryo's (namespaces.img).
    namespaces: Vec<cryo_image::proto::NamespaceEntry>,
    /// The tree's cgroups with their settings (cgroups.img).
    cgroups: Vec<cryo_image::proto::CgroupDir>,
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

impl Image {
    fn load(dir: &Path) -> anyhow::Result<Image> {
        let loaded = super::task::load_image(dir)?;
        let parent_sources = (0..loaded.tasks.len())
            .map(|i| super::task::parent_sources(&loaded, i))
            .collect();
        let super::task::LoadedImage {
            inventory,
            pstree,
            tasks,
            files,
            ..
        } = loaded;
        let listed: std::collections::HashSet<&str> =
            inventory.files.iter().map(|f| f.name.as_str()).collect();
        let dir_files = load::dir_entries(dir)?
            .into_iter()
            .filter(|(_, m)| m.is_file())
            .map(|(name, m)| {
                let is_listed =
                    name == cryo_image::INVENTORY_FILE || listed.contains(name.as_str());
                (name, m.len(), is_listed)
            })
            .collect();
        let namespaces = if listed.contains(cryo_image::NAMESPACES_FILE) {
            load::read_all(
                dir,
                cryo_image::NAMESPACES_FILE,
                cryo_image::Kind::Namespaces,
            )?
        } else {
            Vec::new()
        };
        let cgroups = if listed.contains(cryo_image::CGROUPS_FILE) {
            load::read_all(dir, cryo_image::CGROUPS_FILE, cryo_image::Kind::Cgroups)?
        } else {
            Vec::new()
        };
        Ok(Image {
            inventory,
            pstree,
            tasks,
            parent_sources,
            files,
            dir_files,
            namespaces,
            cgroups,
        })
    }

    fn total_size(&self) -> u64 {
        self.dir_files.iter().map(|f| f.1).sum()
    }

    fn pages_stored(&self) -> u64 {
        self.tasks.iter().map(|t| t.pagemap.head.total_pages).sum()
    }

    fn pages_in_parent(&self) -> u64 {
        self.tasks.iter().map(|t| t.pagemap.parent_pages()).sum()
    }

    fn task(&self, pid: u32) -> Option<(usize, &Task)> {
        self.tasks
            .iter()
            .enumerate()
            .find(|(_, t)| t.entry.pid == pid)
    }

    fn children(&self, pid: u32) -> Vec<u32> {
        self.pstree
            .iter()
            .filter(|e| e.ppid == pid && e.pid != pid)
            .map(|e| e.pid)
            .collect()
    }

    /// Sizes of the pages files the pagemaps name.
    fn pages_file_size(&self) -> u64 {
        self.tasks
            .iter()
            .filter_map(|t| {
                self.dir_files
                    .iter()
                    .find(|f| f.0 == t.pagemap.head.pages_file)
                    .map(|f| f.1)
            })
            .sum()
    }

    /// Raw bytes of the stored pages / bytes of the pages files.
    fn ratio(&self) -> f64 {
        let size = self.pages_file_size();
        if size == 0 {
            0.0
        } else {
            (self.pages_stored() * PAGE_SIZE as u64) as f64 / size as f64
        }
    }
}

pub(super) fn perms(v: &Vma) -> String {
    let shared = matches!(
        cryo_image::proto::VmaKind::try_from(v.kind),
        Ok(cryo_image::proto::VmaKind::VmaAnonShared
            | cryo_image::proto::VmaKind::VmaFileShared
            | cryo_image::proto::VmaKind::VmaSysvShm)
    );
    let mut s = String::with_capacity(4);
    s.push(if v.prot & 1 != 0 { 'r' } else { '-' });
    s.push(if v.prot & 2 != 0 { 'w' } else { '-' });
    s.push(if v.prot & 4 != 0 { 'x' } else { '-' });
    s.push(if shared { 's' } else { 'p' });
    s
}

/// O_* flags as text (`O_RDWR|O_APPEND`), unknown bits in hex.
pub(super) fn open_flags(flags: u32) -> String {
    use nix::libc;
    let f = flags as i32;
    let mut parts: Vec<String> = vec![match f & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY".into(),
        libc::O_WRONLY => "O_WRONLY".into(),
        libc::O_RDWR => "O_RDWR".into(),
        other => format!("O_ACCMODE({other})"),
    }];
    let mut rest = f & !libc::O_ACCMODE;
    let mut take = |bits: i32, name: &str| {
        if bits != 0 && rest & bits == bits {
            parts.push(name.to_string());
            rest &= !bits;
        }
    };
    take(libc::O_TMPFILE, "O_TMPFILE");
    take(libc::O_SYNC, "O_SYNC");
    take(libc::O_DSYNC, "O_DSYNC");
    take(libc::O_APPEND, "O_APPEND");
    take(libc::O_NONBLOCK, "O_NONBLOCK");
    take(libc::O_CREAT, "O_CREAT");
    take(libc::O_EXCL, "O_EXCL");
    take(libc::O_NOCTTY, "O_NOCTTY");
    take(libc::O_TRUNC, "O_TRUNC");
    take(libc::O_DIRECT, "O_DIRECT");
    // The kernel's O_LARGEFILE (0o100000 on x86_64, where libc says 0):
    // fdinfo shows it for every file opened by a 64-bit task.
    take(0o100000, "O_LARGEFILE");
    take(libc::O_DIRECTORY, "O_DIRECTORY");
    take(libc::O_NOFOLLOW, "O_NOFOLLOW");
    take(libc::O_NOATIME, "O_NOATIME");
    take(libc::O_CLOEXEC, "O_CLOEXEC");
    take(libc::O_PATH, "O_PATH");
    take(libc::O_ASYNC, "O_ASYNC");
    if rest != 0 {
        parts.push(format!("{rest:#o}"));
    }
    parts.join("|")
}

fn ids(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The namespaces of the tree that were not the dumping cryo's, with
/// their members and state (a process's own list marks them with `*`).
fn namespaces_text(img: &Image, s: &mut String) {
    if img.namespaces.is_empty() {
        return;
    }
    let _ = writeln!(s, "\nnamespaces of the tree's own (* below):");
    for n in &img.namespaces {
        let _ = writeln!(
            s,
            "  {}:[{}] owner user:[{}] processes {}{}",
            n.kind,
            n.inode,
            n.owner,
            ids(&n.pids),
            ns_state(n)
        );
        for m in n.mnt.iter().flat_map(|m| m.mounts.iter()) {
            let _ = writeln!(s, "    {}", mount_line(m));
        }
    }
}

/// What a namespace keeps beyond its members, by kind.
fn ns_state(n: &cryo_image::proto::NamespaceEntry) -> String {
    let mut state = match &n.uts {
        Some(u) => format!(" hostname {:?} domainname {:?}", u.hostname, u.domainname),
        None => String::new(),
    };
    if let Some(i) = &n.ipc {
        let stored: usize = i.shm.iter().map(|s| s.contents.len()).sum();
        let messages: usize = i.msg.iter().map(|q| q.messages.len()).sum();
        state += &format!(
            " System V: {} shared memory segment(s) ({stored} bytes stored), {} semaphore set(s), {} message queue(s) ({messages} messages), {} limits",
            i.shm.len(),
            i.sem.len(),
            i.msg.len(),
            i.sysctls.len()
        );
        if !i.mqueues.is_empty() {
            let queued: usize = i.mqueues.iter().map(|q| q.messages.len()).sum();
            state += &format!(
                "; {} POSIX message queue(s) ({queued} messages)",
                i.mqueues.len()
            );
        }
    }
    if let Some(t) = &n.time {
        let secs = |ns: i64| {
            format!(
                "{:+}.{:09}",
                ns.div_euclid(1_000_000_000),
                ns.rem_euclid(1_000_000_000)
            )
        };
        state += &format!(
            " clocks ahead of the host's: monotonic {} s, boottime {} s",
            secs(t.monotonic_offset_ns),
            secs(t.boottime_offset_ns)
        );
    }
    if let Some(c) = &n.cgroup {
        let roots: Vec<String> = c
            .roots
            .iter()
            .map(|r| format!("{}:{}", r.controllers, r.path))
            .collect();
        state += &format!(" rooted at {}", roots.join(" "));
    }
    if let Some(t) = &n.net {
        state += &format!(
            " loopback flags {:#x} MTU {}, {} sysctl(s) set",
            t.lo_flags,
            t.lo_mtu,
            t.sysctls.len()
        );
        state += &net_text(t);
    }
    if let Some(u) = &n.user {
        let map = |m: &[cryo_image::proto::IdRange]| {
            m.iter()
                .map(|r| format!("{} {} {}", r.inside, r.outside, r.count))
                .collect::<Vec<_>>()
                .join(", ")
        };
        state += &format!(
            " uid map {} gid map {} setgroups {}",
            map(&u.uid_map),
            map(&u.gid_map),
            if u.setgroups { "allow" } else { "deny" }
        );
    }
    if let Some(m) = &n.mnt {
        state += &format!(" {} mount(s):", m.mounts.len());
    }
    state
}

/// A network namespace's devices, addresses, routes and rules.
fn net_text(t: &cryo_image::proto::NetState) -> String {
    use cryo_engine::ns::net::addrs;
    let mut s = String::new();
    for l in &t.links {
        let on: Vec<String> = t
            .addrs
            .iter()
            .filter(|a| a.index == l.index)
            .map(addrs::text)
            .collect();
        s += &format!(
            "\n    device {} #{} {} MTU {} flags {:#x} {}",
            l.name,
            l.index,
            l.kind,
            l.mtu,
            l.flags,
            on.join(" ")
        );
        if let Some(p) = &l.peer {
            let ns = match p.ns {
                0 => "cryo's namespace".to_string(),
                i => format!("net:[{i}]"),
            };
            s += &format!(" peer {} #{} in {ns}", p.name, p.index);
        }
    }
    for r in &t.routes {
        s += &format!("\n    route {}", addrs::route_text(r));
    }
    if !t.nft_ruleset.is_empty() {
        s += &format!("\n    nftables ruleset of {} bytes", t.nft_ruleset.len());
    }
    s
}

/// One mount: where, what, how it is made again, its propagation.
fn mount_line(m: &cryo_image::proto::MountEntry) -> String {
    use cryo_image::proto::mount_entry::How;
    let how = match &m.how {
        Some(How::HostPath(p)) if m.host_below > 0 => {
            format!(
                "bind of {p} (the mount {} below the top there)",
                m.host_below
            )
        }
        Some(How::HostPath(p)) => format!("bind of {p}"),
        Some(How::Bind(b)) => format!("bind of mount {} at /{}", b.mount, b.subdir),
        Some(How::Fresh(_)) if m.fstype == "tmpfs" => {
            format!("new, files in {}", cryo_image::tmpfs_file(m.id))
        }
        Some(How::Fresh(_)) => "new".to_string(),
        Some(How::External(k)) => format!("external {k}"),
        None => "?".to_string(),
    };
    let mut prop = Vec::new();
    if m.shared != 0 {
        prop.push(format!("shared:{}", m.shared));
    }
    if m.master != 0 {
        prop.push(format!("master:{}", m.master));
    }
    if m.unbindable {
        prop.push("unbindable".into());
    }
    if !m.host_group_path.is_empty() {
        prop.push(format!("(group of {})", m.host_group_path));
    }
    if m.late {
        prop.push("late".into());
    }
    format!(
        "{} {} {} {} root {}: {how} {}",
        m.id,
        m.mountpoint,
        m.fstype,
        m.source,
        m.root,
        prop.join(" ")
    )
    .trim_end()
    .to_string()
}

/// The processes depth first, each with its depth: the roots (whose
/// parent is not in the image) in pstree order, every child under its
/// parent. Entries a damaged pstree leaves unreachable (a cycle) come last.
fn tree_order(pstree: &[PstreeEntry]) -> Vec<(usize, &PstreeEntry)> {
    let in_image: std::collections::HashSet<u32> = pstree.iter().map(|e| e.pid).collect();
    let mut out = Vec::with_capacity(pstree.len());
    let mut done = vec![false; pstree.len()];
    let mut stack: Vec<(usize, usize)> = pstree
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, e)| !in_image.contains(&e.ppid) || e.ppid == e.pid)
        .map(|(i, _)| (0, i))
        .collect();
    loop {
        while let Some((depth, i)) = stack.pop() {
            if done[i] {
                continue;
            }
            done[i] = true;
            out.push((depth, &pstree[i]));
            let pid = pstree[i].pid;
            for (j, c) in pstree.iter().enumerate().rev() {
                if c.ppid == pid && j != i && !done[j] {
                    stack.push((depth + 1, j));
                }
            }
        }
        match done.iter().position(|d| !d) {
            Some(i) => stack.push((0, i)),
            None => break,
        }
    }
    out
}

fn to_text(img: &Image, dir: &Path) -> String {
    let inv = &img.inventory;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "image {} (format {}.{}, {}, kernel {}, root pid {}{})",
        dir.display(),
        inv.format_major,
        inv.format_minor,
        inv.producer,
        inv.kernel_release,
        inv.root_pid,
        if inv.leave_running {
            ", left running"
        } else {
            ""
        }
    );

    // Process tree, children indented under their parents.
    let zombies = img.pstree.iter().filter(|e| e.zombie).count();
    let _ = writeln!(
        s,
        "\nprocess tree: {} processes, {} live, {} zombie{}",
        img.pstree.len(),
        img.tasks.len(),
        zombies,
        if zombies == 1 { "" } else { "s" }
    );
    // The PID column: each process indented under its parent, with its
    // pids inside its pid namespaces (outermost first) after it.
    let rows: Vec<(String, &PstreeEntry)> = tree_order(&img.pstree)
        .into_iter()
        .map(|(depth, e)| {
            let inner = match e.ns_pids.get(1..) {
                Some(levels) if !levels.is_empty() => format!(" [{}]", ids(levels)),
                _ => String::new(),
            };
            (format!("{}{}{inner}", "  ".repeat(depth), e.pid), e)
        })
        .collect();
    let w = rows.iter().map(|(p, _)| p.len()).max().unwrap_or(0).max(16);
    let _ = writeln!(
        s,
        "  {:<w$} {:>7} {:>7} {:>7} {:<12} COMMAND",
        "PID", "PPID", "PGID", "SID", "THREADS"
    );
    if img.pstree.iter().any(|e| e.ns_pids.len() > 1) {
        let _ = writeln!(s, "  (PID [its pids inside nested pid namespaces])");
    }
    for (pid, e) in rows {
        let what = if e.zombie {
            format!(
                "<zombie: {}> ",
                load::WaitStatus::of(e.exit_status).text(e.exit_status)
            )
        } else {
            String::new()
        };
        let line = format!(
            "  {:<w$} {:>7} {:>7} {:>7} {:<12} {what}{}",
            pid,
            e.ppid,
            e.pgid,
            e.sid,
            ids(&e.threads),
            e.cmdline.join(" ")
        );
        let _ = writeln!(s, "{}", line.trim_end());
    }
    namespaces_text(img, &mut s);
    if !img.cgroups.is_empty() {
        let _ = writeln!(
            s,
            "\ncgroups of the tree (made again by the restore where missing):"
        );
        for c in &img.cgroups {
            let settings: Vec<String> = c
                .settings
                .iter()
                .map(|x| format!("{}={}", x.name, x.value.replace('\n', ";")))
                .collect();
            let _ = writeln!(
                s,
                "  {} (hierarchy {} {}) {}",
                c.path,
                c.hierarchy,
                if c.controllers.is_empty() {
                    "cgroup2"
                } else {
                    &c.controllers
                },
                settings.join(" ")
            );
        }
    }

    for (ti, t) in img.tasks.iter().enumerate() {
        let e = &t.entry;
        let pm = &t.pagemap;
        let _ = writeln!(s, "\ntask {} ({}):", e.pid, t.mm.exe_path);
        if e.stopped {
            let _ = writeln!(s, "  stopped (SIGSTOP or job control): restored stopped");
        }
        if let Some(index) = e.pty_ctty {
            let fg = match e.tty_pgrp {
                0 => "its session leader's group".to_string(),
                g => format!("group {g}"),
            };
            let _ = writeln!(
                s,
                "  controlling terminal: pty {index} of the image, {fg} in the foreground"
            );
        }
        for (tid, c) in &t.cores {
            let regs = c.regs.unwrap_or_default();
            let rseq = match &c.rseq {
                Some(r) => format!("{:#x} (len {}, sig {:#x})", r.ptr, r.len, r.sig),
                None => "none".into(),
            };
            let _ = writeln!(
                s,
                "  thread {tid} {:?}: rip {:#x} rsp {:#x} sigmask {:#018x} pending {} rseq {rseq}",
                c.comm,
                regs.rip,
                regs.rsp,
                c.blocked,
                c.pending.len()
            );
            if let Some(cr) = &c.creds {
                let _ = writeln!(
                    s,
                    "    creds: uid {} gid {} groups [{}] cap_eff {:#x} cap_prm {:#x} cap_bnd {:#x} securebits {:#x}{}",
                    ids(&cr.uid),
                    ids(&cr.gid),
                    ids(&cr.groups),
                    cr.cap_eff,
                    cr.cap_prm,
                    cr.cap_bnd,
                    cr.securebits,
                    if cr.no_new_privs { " no_new_privs" } else { "" }
                );
            }
            if let Some(p) = &c.process {
                let _ = writeln!(
                    s,
                    "    process: cwd {:?}{} root {:?} umask {:04o} sigactions {} itimers {} posix timers {} rlimits {} shared pending {}",
                    p.cwd,
                    p.cwd_file
                        .map(|id| format!(" (removed: file {id})"))
                        .unwrap_or_default(),
                    p.root,
                    p.umask,
                    p.sigactions.len(),
                    p.itimers.len(),
                    p.posix_timers.len(),
                    p.rlimits.len(),
                    p.shared_pending.len()
                );
                for c in &p.cgroups {
                    let what = if c.hierarchy == 0 {
                        "cgroup2"
                    } else {
                        c.controllers.as_str()
                    };
                    let _ = writeln!(s, "    cgroup {what}: {}", c.path);
                }
                if !p.namespaces.is_empty() {
                    let ns: Vec<String> = p
                        .namespaces
                        .iter()
                        .map(|n| {
                            let own = !n.host && !img.namespaces.is_empty();
                            let host = if own { "*" } else { "" };
                            format!("{}:[{}]{host}", n.kind, n.inode)
                        })
                        .collect();
                    let _ = writeln!(s, "    namespaces: {}", ns.join(" "));
                }
            }
        }
        let _ = writeln!(
            s,
            "  memory: {} mappings, {} pages stored in {} runs, {} chunks ({}, {})",
            t.mm.vmas.len(),
            pm.head.total_pages,
            pm.runs.len(),
            pm.chunks.len(),
            pm.head.pages_file,
            load::compression_name(pm.head.compression)
        );
        if pm.parent_pages() > 0 {
            let from: Vec<String> = img.parent_sources[ti]
                .iter()
                .map(|(pid, n)| match pid {
                    Some(pid) => format!("{n} in process {pid}'s pages file"),
                    None => format!("{n} stored by no ancestor (zeros)"),
                })
                .collect();
            let _ = writeln!(
                s,
                "  from the parent {}: {} pages in {} runs ({})",
                e.ppid,
                pm.parent_pages(),
                pm.runs.iter().filter(|r| load::in_parent(r)).count(),
                from.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "    {:<33} {:<5} {:<13} {:>7} {:>7} FILE@OFFSET",
            "START-END", "PERMS", "KIND", "STORED", "PARENT"
        );
        for v in &t.mm.vmas {
            let file = match (v.path.is_empty(), v.file_id) {
                (true, _) => String::new(),
                (false, 0) => format!("{}@{:#x}", v.path, v.pgoff),
                // Its contents are those of that entry of files.img.
                (false, id) => format!("{}@{:#x} (file {id})", v.path, v.pgoff),
            };
            let _ = writeln!(
                s,
                "    {:<33} {:<5} {:<13} {:>7} {:>7} {}",
                format!("{:012x}-{:012x}", v.start, v.end),
                perms(v),
                load::vma_kind_name(v.kind),
                load::pages_in(&pm.runs, v.start, v.end, false),
                load::pages_in(&pm.runs, v.start, v.end, true),
                file
            );
        }
        let _ = writeln!(s, "  descriptors:");
        let _ = writeln!(
            s,
            "    {:>4} {:<7} {:<10} {:<28} {:>8} PATH",
            "FD", "CLOEXEC", "KIND", "FLAGS", "OFFSET"
        );
        for fd in &t.fds {
            match img.files.get(&fd.id) {
                Some(f) => {
                    let _ = writeln!(
                        s,
                        "    {:>4} {:<7} {:<10} {:<28} {:>8} {}",
                        fd.fd,
                        if fd.cloexec { "yes" } else { "no" },
                        load::file_kind_name(f.kind),
                        open_flags(f.flags),
                        f.pos,
                        load::file_label(f)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "    {:>4} {:<7} file id {} missing from files.img",
                        fd.fd,
                        if fd.cloexec { "yes" } else { "no" },
                        fd.id
                    );
                }
            }
        }
    }

    let _ = writeln!(s, "\nimage files:");
    for (name, size, listed) in &img.dir_files {
        let _ = writeln!(
            s,
            "  {:<24} {:>12}{}",
            name,
            size,
            if *listed {
                ""
            } else {
                "  (not in the inventory)"
            }
        );
    }
    let _ = writeln!(
        s,
        "  total {} bytes in {} files",
        img.total_size(),
        img.dir_files.len()
    );
    let pages = img.pages_stored();
    let _ = writeln!(
        s,
        "pages: {} stored ({} bytes raw) in {} bytes of pages files, compression ratio {:.2}; {} more are a parent's",
        pages,
        pages * PAGE_SIZE as u64,
        img.pages_file_size(),
        img.ratio(),
        img.pages_in_parent()
    );
    s
}

pub fn run(dir: &Path, json_out: bool) -> anyhow::Result<i32> {
    // A CRIU image: what it says of itself.
    if let Some(c) = cryo_image::criu::criu_image(dir) {
        if json_out {
            let j = serde_json::json!({
                "criu_image": true,
                "img_version": c.img_version,
                "format": c.version_text(),
                "pre_dump": c.pre_dump,
                "processes": c.processes.iter().map(|&(pid, ppid)| serde_json::json!({"pid": pid, "ppid": ppid})).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            println!("{}: {}", dir.display(), c.describe());
            for (pid, ppid) in &c.processes {
                println!("  process {pid} (parent {ppid})");
            }
            println!("cryo reads CRIU images only this far (importing them is not done yet)");
        }
        return Ok(0);
    }
    // Image errors already include their cause: print it once.
    let img = Image::load(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json::to_json(&img, dir))?
        );
    } else {
        print!("{}", to_text(&img, dir));
    }
    Ok(0)
}
