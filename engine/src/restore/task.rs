//! A new task with its dumped pid, after the tree is built: everything it
//! does before it jumps into the restorer, one resource after another.

#![forbid(unsafe_code)]

use std::os::fd::{IntoRawFd, RawFd};

use super::handoff::{self, Boot, Prepared};
use super::node::{FsRole, NodeCtx, TableRole};
use super::status::Never;
use crate::{cgroup, fsinfo, mem, ns};

/// The counter of a shared filesystem information's page (see
/// [`FsRole`]): its members that opened every path they need.
const PATHS_OPENED: usize = 0;

/// What a task made of its memory before it created its children, who
/// inherit it: the bootstrap and premap areas, filled.
pub struct Memory {
    layout: handoff::Layout,
    boot: Boot,
    premap: mem::restore::Premap,
    rvmas: Vec<cryo_parasite::RVma>,
}

impl Memory {
    /// The premap area, for a child to take the mappings it still shared
    /// copy-on-write with this task from (it inherits them by the fork).
    pub fn premap(&self) -> &mem::restore::Premap {
        &self.premap
    }
}

/// The first part of task `me`'s preparation, before it creates its
/// children: its cgroups and namespaces, then its memory. `parent` is the
/// memory of the task that created it, if that was its dumped parent
/// (with its image's index): the mappings still shared copy-on-write are
/// taken from it, so the pages stay one frame.
pub fn prepare_memory(
    ctx: &NodeCtx,
    me: usize,
    status_w: RawFd,
    parent: Option<(usize, &mem::restore::Premap)>,
) -> Result<Memory, String> {
    let img = &ctx.tree.procs[me];
    // Test hook: a restore failing in one task of the tree, the others
    // created and on their way.
    if img.pstree.ppid != 0 && crate::fault::check(&format!("restore-task-{}", img.pstree.pid)) {
        return Err("injected failure (CRYO_FAULT)".into());
    }
    let pc = img.core.process.clone().unwrap_or_default();
    // Back into the dumped cgroups first, so that the memory set up below
    // is charged to them.
    cgroup::join(&pc.cgroups, ctx.cgroups)?;
    // Namespaces other than its parent's are made here (a root's parent is
    // cryo, in the restoring cryo's own).
    let parent_ns = ctx
        .tree
        .procs
        .iter()
        .find(|p| p.pstree.pid == img.pstree.ppid)
        .and_then(|p| p.core.process.as_ref())
        .map(|p| p.namespaces.as_slice());
    let ns_cx = ns::RestoreCtx {
        mnt_made: &ctx.ns_made.mnt,
        late_tmpfs: &ctx.ns_made.late_tmpfs,
        net_made: &ctx.ns_made.net,
        owned: &ctx.ns_made.owned,
        cgroups: &pc.cgroups,
        cgroup_targets: ctx.cgroups,
    };
    ns::restore(&pc.namespaces, parent_ns, &ctx.tree.namespaces, &ns_cx)?;
    // Every signal stays blocked until the final sigreturn sets the
    // dumped mask.
    crate::sys::proc::block_all_signals();
    // The bootstrap and premap areas first, before anything else here
    // allocates memory.
    let layout = handoff::plan(img)?;
    let boot = Boot::map(&layout, img.pstree.pid, status_w)?;
    let parent = parent.map(|(i, pm)| (&ctx.tree.procs[i], pm));
    let (mut premap, rvmas) =
        mem::restore::premap(img, layout.premap_base, ctx.shm, ctx.files, parent)?;
    mem::restore::fill_pages(img, &ctx.readers[me], &mut premap)?;
    mem::cow::fill_from_parents(ctx.tree, ctx.readers, ctx.chain, me, &mut premap)?;
    mem::incremental::fill_from_chain(img, ctx.chain, &mut premap)?;
    mem::restore::install_guards(img, &mut premap)?;
    Ok(Memory {
        layout,
        boot,
        premap,
        rvmas,
    })
}

/// The rest of task `me`'s preparation, once the tree is built: its
/// working directory, descriptors and the hand-over to the restorer.
pub fn prepare(
    ctx: &NodeCtx,
    me: usize,
    status_w: RawFd,
    m: Memory,
    (table, fs): (TableRole, FsRole),
) -> Result<Never, String> {
    let img = &ctx.tree.procs[me];
    let pc = img.core.process.clone().unwrap_or_default();
    let Memory {
        layout,
        boot,
        premap,
        mut rvmas,
    } = m;
    // While the tree's files are all inherited (a removed working
    // directory or a mapped memfd is one of them): into the working
    // directory, and the files of shared mappings, which the restorer
    // maps.
    fsinfo::restore(&pc, ctx.files)?;
    let mut kept: Vec<RawFd> = mem::restore::open_shared_files(img, &rvmas, ctx.files)?
        .into_iter()
        .map(IntoRawFd::into_raw_fd)
        .collect();
    // Shared filesystem information: the root is the first task's to enter.
    let root = match fs {
        FsRole::Member(_) => None,
        FsRole::Own | FsRole::Builder(..) => {
            fsinfo::open_root(&pc, ctx.files)?.map(IntoRawFd::into_raw_fd)
        }
    };
    kept.extend(root);
    // Its user namespace, joined last: kept above the tree's descriptors.
    let user = ns::user::open_for(&pc.namespaces, &ctx.ns_made.users)?;
    kept.extend(user);
    // Descriptors: the pages are read, every inherited descriptor but the
    // tree's files goes (the shared mappings' files and the root move
    // above them). A table shared with other tasks is built by one of
    // them once the others keep their own above its floor.
    let status_fd = match table {
        TableRole::Own => crate::restore::fdtable::install(
            img,
            &ctx.tree.pids,
            ctx.files,
            status_w,
            &mut kept,
            None,
        )?,
        TableRole::Builder(t, members) => {
            t.wait_members(members);
            let fd = crate::restore::fdtable::install(
                img,
                &ctx.tree.pids,
                ctx.files,
                status_w,
                &mut kept,
                Some(t.floor),
            )?;
            t.built();
            fd
        }
        TableRole::Member(t) => {
            let fd = t.keep(status_w)?;
            for k in kept.iter_mut() {
                let above = t.keep(*k)?;
                crate::sys::fd::close(*k);
                *k = above;
            }
            super::status::STATUS_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
            t.member_ready();
            t.wait_built();
            fd
        }
    };
    let user = user.and_then(|_| kept.pop());
    let root = root.and_then(|_| kept.pop());
    let shared_files = kept;
    mem::restore::give_shared_files(&mut rvmas, &shared_files);
    let mm_name = cryo_image::mm_file(img.pstree.pid);
    // The restorer closes the shared mappings' files once they are mapped,
    // and the executable's once PR_SET_MM_MAP has it.
    let mut close_fds = shared_files;
    let exe_fd = mem::mm::open_exe(&img.mm, &mm_name)?.into_raw_fd();
    close_fds.push(exe_fd);
    let loginuid_fd = handoff::open_loginuid(img)?;
    // The root last: no path of cryo's is opened from here on, by this
    // task or (shared filesystem information) any other that shares it.
    match fs {
        FsRole::Member(c) => c.add(PATHS_OPENED, 1),
        FsRole::Builder(c, members) if root.is_some() => c.wait_for(PATHS_OPENED, members),
        FsRole::Builder(..) | FsRole::Own => {}
    }
    if let Some(fd) = root {
        fsinfo::enter_root(fd, &pc)?;
    }
    let prepared = Prepared {
        layout,
        boot,
        premap: premap.keep(),
        rvmas,
        close_fds,
        exe_fd,
        status_fd,
        loginuid_fd,
        cpu_timer_slack_us: ctx.cpu_timer_slack_us,
        userns: ns::user::state_of(&pc.namespaces, &ctx.tree.namespaces).cloned(),
        host_free: ctx
            .plan
            .index_of(img.pid())
            .is_some_and(|n| ctx.plan.nodes[n].host_free),
    };
    // Last, with all it needed of cryo's powers done: into its user
    // namespace, where the restorer sets its ids as the namespace sees them.
    if let Some(fd) = user {
        ns::user::join(fd)?;
    }
    handoff::enter(img, prepared, ctx.tree.pids.view_of(&img.pstree))
}
