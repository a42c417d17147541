//! `cryo image show --json`: the image as one JSON object (tree, each
//! live process's core state, mappings and descriptors, namespaces).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cryo_image::proto::{CoreEntry, FdEntry, FileEntry, Vma};
use cryo_image::PAGE_SIZE;
use serde_json::{json, Value};

use super::{hex, open_flags, perms, Image, Task};
use crate::image::load::{self, Pagemap};

pub(super) fn creds_json(core: &CoreEntry) -> Value {
    match &core.creds {
        None => Value::Null,
        Some(c) => json!({
            "uid": c.uid,
            "gid": c.gid,
            "groups": c.groups,
            "cap_inh": hex(c.cap_inh),
            "cap_prm": hex(c.cap_prm),
            "cap_eff": hex(c.cap_eff),
            "cap_bnd": hex(c.cap_bnd),
            "cap_amb": hex(c.cap_amb),
            "securebits": c.securebits,
            "no_new_privs": c.no_new_privs,
        }),
    }
}

pub(super) fn core_json(tid: u32, core: &CoreEntry) -> Value {
    let regs = core.regs.unwrap_or_default();
    json!({
        "tid": tid,
        "comm": core.comm,
        "rip": hex(regs.rip),
        "rsp": hex(regs.rsp),
        "sigmask": format!("{:#018x}", core.blocked),
        "pending_signals": core.pending.len(),
        "rseq": core.rseq.as_ref().map(|r| json!({
            "ptr": hex(r.ptr),
            "len": r.len,
            "sig": hex(u64::from(r.sig)),
        })),
        "xsave_bytes": core.xsave.len(),
        "creds": creds_json(core),
    })
}

pub(super) fn process_json(core: &CoreEntry) -> Value {
    match &core.process {
        None => Value::Null,
        Some(p) => json!({
            "cwd": p.cwd,
            "cwd_file": p.cwd_file,
            "root": p.root,
            "umask": format!("{:04o}", p.umask),
            "personality": hex(u64::from(p.personality)),
            "sigactions": p.sigactions.len(),
            "itimers": p.itimers.len(),
            "posix_timers": p.posix_timers.len(),
            "rlimits": p.rlimits.len(),
            "shared_pending_signals": p.shared_pending.len(),
            "child_subreaper": p.child_subreaper,
            "dumpable": p.dumpable,
            "pdeath_signal": p.pdeath_signal,
            "cgroups": p.cgroups.iter().map(|c| json!({
                "hierarchy": c.hierarchy,
                "controllers": c.controllers,
                "path": c.path,
            })).collect::<Vec<_>>(),
            "namespaces": p.namespaces.iter().map(|n| json!({
                "kind": n.kind,
                "inode": n.inode,
                "host": n.host,
            })).collect::<Vec<_>>(),
        }),
    }
}

pub(super) fn namespace_json(n: &cryo_image::proto::NamespaceEntry) -> Value {
    let mut v = json!({
        "kind": n.kind,
        "inode": n.inode,
        "owner_user_ns": n.owner,
        "pids": n.pids,
    });
    if let Some(u) = &n.uts {
        v["hostname"] = u.hostname.clone().into();
        v["domainname"] = u.domainname.clone().into();
    }
    if let Some(m) = &n.mnt {
        v["mounts"] = m
            .mounts
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "parent": m.parent,
                    "mountpoint": m.mountpoint,
                    "root": m.root,
                    "fstype": m.fstype,
                    "source": m.source,
                    "shared": m.shared,
                    "master": m.master,
                    "unbindable": m.unbindable,
                    "late": m.late,
                })
            })
            .collect();
    }
    v
}

pub(super) fn mapping_json(v: &Vma, pm: &Pagemap) -> Value {
    json!({
        "start": hex(v.start),
        "end": hex(v.end),
        "perms": perms(v),
        "kind": load::vma_kind_name(v.kind),
        "path": v.path,
        "file_id": (v.file_id != 0).then_some(v.file_id),
        "offset": hex(v.pgoff),
        "pages": (v.end.saturating_sub(v.start)) / PAGE_SIZE as u64,
        "pages_stored": load::pages_in(&pm.runs, v.start, v.end, false),
        "pages_in_parent": load::pages_in(&pm.runs, v.start, v.end, true),
        "vm_flags": v.vm_flags,
    })
}

pub(super) fn fd_json(fd: &FdEntry, files: &HashMap<u32, FileEntry>) -> Value {
    let f = files.get(&fd.id);
    json!({
        "fd": fd.fd,
        "id": fd.id,
        "cloexec": fd.cloexec,
        "kind": f.map(|f| load::file_kind_name(f.kind)),
        "path": f.map(|f| f.path.clone()),
        "flags": f.map(|f| open_flags(f.flags)),
        "offset": f.map(|f| f.pos),
        "pty": f.and_then(|f| f.pty.as_ref()).map(|p| p.index),
    })
}

/// Where the in-parent pages of a process are stored, for JSON.
pub(super) fn sources_json(sources: &BTreeMap<Option<u32>, u64>) -> Value {
    sources
        .iter()
        .map(|(pid, n)| match pid {
            Some(pid) => json!({ "pid": pid, "pages": n }),
            None => json!({ "pid": Value::Null, "pages": n, "zero": true }),
        })
        .collect()
}

/// The rest of a live process's JSON object.
pub(super) fn live_json(
    p: &mut Value,
    t: &Task,
    sources: &BTreeMap<Option<u32>, u64>,
    files: &HashMap<u32, FileEntry>,
) {
    let e = &t.entry;
    let pm = &t.pagemap;
    let leader = t.cores.iter().find(|(tid, _)| *tid == e.pid).map(|c| &c.1);
    let fields = json!({
        "exe": t.mm.exe_path,
        "mm": {
            "mappings": t.mm.vmas.iter().map(|v| mapping_json(v, pm)).collect::<Vec<_>>(),
            "start_brk": hex(t.mm.start_brk),
            "brk": hex(t.mm.brk),
            "start_stack": hex(t.mm.start_stack),
        },
        "pagemap": {
            "pages_file": pm.head.pages_file,
            "compression": load::compression_name(pm.head.compression),
            "pages_stored": pm.head.total_pages,
            "pages_in_parent": pm.parent_pages(),
            "in_parent_from": sources_json(sources),
            "runs": pm.runs.len(),
            "in_parent_runs": pm.runs.iter().filter(|r| load::in_parent(r)).count(),
            "chunks": pm.chunks.len(),
        },
        "fds": t.fds.iter().map(|f| fd_json(f, files)).collect::<Vec<_>>(),
        "cores": t.cores.iter().map(|(tid, c)| core_json(*tid, c)).collect::<Vec<_>>(),
        "credentials": leader.map(creds_json).unwrap_or(Value::Null),
        "process": leader.map(process_json).unwrap_or(Value::Null),
    });
    if let (Some(obj), Value::Object(more)) = (p.as_object_mut(), fields) {
        obj.extend(more);
    }
}

pub(super) fn to_json(img: &Image, dir: &Path) -> Value {
    let inv = &img.inventory;
    let processes: Vec<Value> = img
        .pstree
        .iter()
        .map(|e| {
            let mut p = json!({
                "pid": e.pid,
                "ppid": e.ppid,
                "pgid": e.pgid,
                "sid": e.sid,
                "threads": e.threads,
                "cmdline": e.cmdline,
                "zombie": e.zombie,
                "exit_signal": e.exit_signal,
                "children": img.children(e.pid),
                "pty_ctty": e.pty_ctty,
                "tty_pgrp": e.tty_pgrp,
                "stopped": e.stopped,
                "ns_pids": e.ns_pids,
            });
            if e.zombie {
                let st = load::WaitStatus::of(e.exit_status);
                p["exit_status"] = e.exit_status.into();
                p["exit"] = st.json();
                p["exit_text"] = st.text(e.exit_status).into();
            } else if let Some((i, t)) = img.task(e.pid) {
                live_json(&mut p, t, &img.parent_sources[i], &img.files);
            }
            p
        })
        .collect();
    let files: Vec<Value> = img
        .dir_files
        .iter()
        .map(|(name, size, listed)| json!({ "name": name, "size": size, "listed": listed }))
        .collect();
    json!({
        "dir": dir.display().to_string(),
        "inventory": {
            "format": format!("{}.{}", inv.format_major, inv.format_minor),
            "producer": inv.producer,
            "kernel": inv.kernel_release,
            "created_unix_ms": inv.created_unix_ms,
            "root_pid": inv.root_pid,
            "leave_running": inv.leave_running,
        },
        "processes": processes,
        "live_processes": img.tasks.len(),
        "zombies": img.pstree.iter().filter(|e| e.zombie).count(),
        "files": files,
        "namespaces": img.namespaces.iter().map(namespace_json).collect::<Vec<_>>(),
        "total_size": img.total_size(),
        "pages_stored": img.pages_stored(),
        "pages_in_parent": img.pages_in_parent(),
        "pages_bytes": img.pages_stored() * PAGE_SIZE as u64,
        "pages_file_size": img.pages_file_size(),
        "compression_ratio": img.ratio(),
    })
}
