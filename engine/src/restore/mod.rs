//! The restore pipeline: load and check the image, open every file the
//! tree shares, create the tree's tasks with their dumped pids (clone3
//! set_tid, each by its parent; see [`node`]), let each prepare itself
//! ([`task`]) and hand over to the restorer blob ([`handoff`]), which
//! moves the memory into place and returns into the dumped context; cryo
//! traces them all to the end ([`supervise`]). Each resource is restored
//! by its own module; this one only orchestrates.

// No #![forbid(unsafe_code)] here: it would cover handoff.rs too; each
// other submodule forbids it itself.

mod fdtable;
mod handoff;
pub mod image;
mod node;
mod status;
mod supervise;
mod task;
pub mod tree;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryo_image::proto::FileKind;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::infect::InfectError;
use image::{ImageLoadError, TreeImage};
use node::NodeCtx;
use tree::Plan;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Load(#[from] ImageLoadError),
    #[error(transparent)]
    Core(#[from] crate::core::CoreError),
    #[error("restoring task {pid}: file {id} ({path}) of files.img: {what}")]
    File {
        pid: i32,
        id: u32,
        path: String,
        what: String,
    },
    #[error("restoring the tree of task {pid}: {what}")]
    Plan { pid: i32, what: String },
    #[error("restoring the cgroups of the tree of task {pid}: {what}")]
    Cgroups { pid: i32, what: String },
    #[error("restoring the namespaces of the tree of task {pid}: {what}")]
    Namespaces { pid: i32, what: String },
    #[error("pid {pid} is in use by {holder}; cannot restore the task with its pid")]
    PidTaken { pid: i32, holder: String },
    #[error("creating task with pid {pid}: {errno}")]
    Clone { pid: i32, errno: Errno },
    #[error("restoring task {pid}: {what}: {errno}")]
    Sys {
        pid: i32,
        what: &'static str,
        errno: Errno,
    },
    #[error("restoring task {pid}: {message}")]
    Child { pid: i32, message: String },
    #[error("restoring task {pid}: the restorer failed at {stage} (item {index}): {errno}")]
    Restorer {
        pid: i32,
        stage: String,
        index: u32,
        errno: Errno,
    },
    #[error("restoring task {pid}: the new task {what}")]
    Died { pid: i32, what: String },
    #[error("restoring task {pid}: finishing: {source}")]
    Finish {
        pid: i32,
        #[source]
        source: InfectError,
    },
    #[error("restoring task {pid}: its scheduling state: {source}")]
    Sched {
        pid: i32,
        #[source]
        source: crate::sched::SchedError,
    },
    #[error("restoring task {pid}: timed out after {secs} s")]
    Timeout { pid: i32, secs: u64 },
    #[error("injected failure ({what}) from CRYO_FAULT")]
    Fault { what: String },
    #[error("restoring task {pid}: {what}")]
    Notify { pid: i32, what: String },
}

/// Test hook: `CRYO_FAULT=pause-restore-POINT:PATH` stops cryo at POINT
/// (tests kill it there), `fail-restore-POINT` fails the restore there.
/// The points, in order: loaded, files, spawned, created, joined,
/// trapped, stepped, unmapped.
fn fault(point: &str) -> Result<()> {
    let what = format!("restore-{point}");
    if crate::fault::check(&what) {
        return Err(RestoreError::Fault { what });
    }
    Ok(())
}

type Result<T> = std::result::Result<T, RestoreError>;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// What is done with the tree's cgroups (CRIU's --manage-cgroups).
    pub manage_cgroups: crate::cgroup::props::Manage,
    /// Restore the tree's cgroups under this one (--cgroup-root).
    pub cgroup_root: Option<String>,
    /// The same for the hierarchy of one controller (by its name, "" for
    /// cgroup v2): CRIU's cg_root entries.
    pub cgroup_roots: HashMap<String, String>,
    /// The path for each key of a mount the dump was told is external
    /// (--external mnt[KEY]:PATH).
    pub externals: HashMap<String, String>,
    /// The directory the root of the tree's mount namespace binds, in
    /// place of the dumped one (--root).
    pub root: Option<String>,
    /// The names the host ends of veth devices take, by the device's
    /// (--veth-pair IN=OUT), in place of theirs at the dump.
    pub veth_pairs: HashMap<String, String>,
    /// TCP connections in the image are restored closed: sockets of their
    /// kind, not connected (--tcp-close).
    pub tcp_close: bool,
    /// Descriptors of cryo's for the pipes and sockets of the image that
    /// led outside the tree (--inherit-fd fd[N]:pipe:[INODE],
    /// fd[N]:socket:[INODE]): (key, descriptor).
    pub inherit_fds: Vec<(String, std::os::fd::RawFd)>,
    /// The root process is made a child of cryo's parent, not of cryo
    /// (CRIU's rst_sibling: the runtime that started cryo waits for it).
    pub sibling: bool,
    /// Who is told of the restore's steps (action scripts, RPC).
    pub notify: crate::notify::Notify,
}

impl RestoreOptions {
    /// Restore the image in `dir` with the default settings.
    pub fn new(dir: impl Into<PathBuf>) -> RestoreOptions {
        RestoreOptions {
            dir: dir.into(),
            manage_cgroups: Default::default(),
            cgroup_root: None,
            cgroup_roots: HashMap::new(),
            externals: HashMap::new(),
            root: None,
            veth_pairs: HashMap::new(),
            tcp_close: false,
            inherit_fds: Vec::new(),
            sibling: false,
            notify: Default::default(),
        }
    }
}

/// A restored, running task.
#[derive(Debug)]
pub struct Restored {
    pub pid: i32,
    pub elapsed: Duration,
    /// Each phase's time: load (the image read and checked), namespaces,
    /// files, cgroups, tasks (created, memory filled, resumed).
    pub phases: crate::phases::Phases,
}

const PAGE: u64 = 4096;
const BOOT_STACK: u64 = 256 * 1024;
/// Stack of each restored thread other than the leader while it runs the
/// restorer (it only sets its own state: a few hundred bytes deep).
const THREAD_STACK: u64 = 32 * 1024;
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Who holds a pid, for the error message.
fn pid_holder(pid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(format!("process {pid} ({})", comm.trim()))
}

/// Who holds a pid, after giving a zombie holder (a task of the dumped
/// tree, say, killed by the dump and not yet collected by its new parent)
/// ten seconds to go away.
fn pid_still_taken(pid: i32) -> Option<String> {
    let start = Instant::now();
    loop {
        let holder = pid_holder(pid)?;
        let zombie = crate::pstree::stat(pid).is_some_and(|s| matches!(s.state, 'Z' | 'X'));
        if !zombie || start.elapsed() > Duration::from_secs(10) {
            return Some(if zombie {
                format!("{holder}, a zombie its parent does not collect")
            } else {
                holder
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every pid and tid of the image: the plan's nodes and every thread.
fn all_tids<'a>(tree: &'a TreeImage, plan: &'a Plan) -> impl Iterator<Item = i32> + 'a {
    plan.nodes.iter().map(|n| n.pid).chain(
        tree.procs
            .iter()
            .flat_map(|p| p.threads.iter().map(|t| t.tid as i32)),
    )
}

/// The image, loaded and cross-checked, with its pages files open (a
/// damaged one is refused here), checked against this CPU, planned, and
/// every pid it needs free.
/// What [`load`] gives: the image, its pages files and its parent images
/// open, and the plan.
type Loaded = (
    TreeImage,
    Vec<cryo_image::PageReader>,
    std::cell::RefCell<crate::mem::incremental::Chain>,
    Plan,
);

fn load(opts: &RestoreOptions) -> Result<Loaded> {
    let tree = TreeImage::load(&opts.dir)?;
    let root = tree.procs[0].pid();
    let mut readers = Vec::with_capacity(tree.procs.len());
    for p in &tree.procs {
        readers.push(p.page_reader()?);
    }
    for img in &tree.procs {
        crate::core::check_cpu(img.pid(), &img.core)?;
    }
    // Parent images are opened here: a task in a mount namespace of the
    // tree does not see their paths.
    let chain = crate::mem::incremental::Chain::preload(&opts.dir, &tree.procs)
        .map_err(|what| RestoreError::Plan { pid: root, what })?;
    let plan = Plan::build(&tree).map_err(|e| RestoreError::Plan {
        pid: root,
        what: e.to_string(),
    })?;
    // A pid of cryo's namespace the kernel chooses is not asked for.
    let chosen = |tid: &i32| plan.nodes.iter().all(|n| !(n.host_free && n.pid == *tid));
    for tid in all_tids(&tree, &plan).filter(chosen) {
        if let Some(holder) = pid_still_taken(tid) {
            return Err(RestoreError::PidTaken { pid: tid, holder });
        }
    }
    Ok((tree, readers, std::cell::RefCell::new(chain), plan))
}

/// What cryo makes before any task: the shared anonymous objects and
/// every open file description of the tree, inherited by the tasks.
struct Shared {
    shm: HashMap<u64, OwnedFd>,
    files: HashMap<u32, OwnedFd>,
    /// The socket files bound for the tree's unix sockets: removed if the
    /// restore fails.
    socket_files: Vec<std::path::PathBuf>,
}

/// Remove the socket files a failed restore bound.
fn remove_socket_files(paths: &[std::path::PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// The namespaces cryo made before the tasks (mount, network; user and
/// those a user namespace of the tree owns), by their inode at the dump.
#[derive(Default)]
pub struct NsMade {
    pub mnt: HashMap<u64, RawFd>,
    /// The detached mounts made for late mounts (ns::mnt::build::Made),
    /// by mount id.
    pub late_tmpfs: HashMap<u32, RawFd>,
    pub net: HashMap<u64, RawFd>,
    pub users: HashMap<u64, RawFd>,
    pub owned: HashMap<u64, RawFd>,
}

/// Open every file description of the tree (`used`), each in the mount
/// namespace of the mount it was opened through, or else of its first
/// holder, and in its first holder's network namespace, where cryo made
/// those (`made`): then by a thread of its own that goes from one
/// namespace to the other.
fn open_files(
    tree: &TreeImage,
    used: &std::collections::BTreeSet<u32>,
    made: &NsMade,
    socket_files: &mut Vec<std::path::PathBuf>,
) -> std::result::Result<HashMap<u32, OwnedFd>, crate::files::OpenError> {
    let files = &tree.procs[0].files;
    if made.mnt.is_empty() && made.net.is_empty() {
        return crate::files::open_all(files, used, socket_files, None);
    }
    let mut by_file: HashMap<u32, [Option<RawFd>; 2]> = HashMap::new();
    for p in &tree.procs {
        let Some(pc) = p.core.process.as_ref() else {
            continue;
        };
        let of = |kind: &str, made: &HashMap<u64, RawFd>| {
            let id = pc.namespaces.iter().find(|n| n.kind == kind && !n.host)?;
            made.get(&id.inode).copied()
        };
        let ns = [of("mnt", &made.mnt), of("net", &made.net)];
        for id in p.fds.iter().map(|f| f.id).chain(p.held_files()) {
            by_file.entry(id).or_insert(ns);
        }
    }
    // The mount namespace of the mount a file was opened through, where
    // that is known (none of the tree's: cryo's).
    let mount_ns: HashMap<u32, u64> = tree
        .namespaces
        .iter()
        .flat_map(|e| {
            let mounts = e.mnt.iter().flat_map(|m| m.mounts.iter());
            mounts.map(move |m| (m.id, e.inode))
        })
        .collect();
    for f in files.iter().filter(|f| f.mnt_id != 0) {
        let mnt = mount_ns
            .get(&f.mnt_id)
            .and_then(|ns| made.mnt.get(ns))
            .copied();
        by_file.entry(f.id).or_default()[0] = mnt;
    }
    let fail = |what: String| crate::files::OpenError {
        id: 0,
        path: "namespaces".into(),
        what,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                .map_err(|e| fail(format!("unshare(CLONE_FS): {e}")))?;
            let mut sw = crate::ns::Switch::new(by_file).map_err(fail)?;
            crate::files::open_all(files, used, socket_files, Some(&mut sw))
        })
        .join()
        .unwrap_or_else(|_| Err(fail("the thread opening the files panicked".into())))
    })
}

fn make_shared(tree: &TreeImage, made: &NsMade) -> Result<Shared> {
    let root = tree.procs[0].pid();
    let shm = crate::mem::shared::make_objects(tree).map_err(|e| RestoreError::Sys {
        pid: root,
        what: "creating shared anonymous memory (through /proc/self/map_files: needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN)",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    // The files of descriptors in flight (SCM_RIGHTS) too.
    let in_flight = tree.procs[0]
        .files
        .iter()
        .filter_map(|f| f.unix.as_ref())
        .flat_map(|u| u.rights.iter().flat_map(|r| r.files.iter().copied()));
    let used = tree
        .procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.id).chain(p.held_files()))
        .chain(in_flight)
        .collect();
    let mut socket_files = Vec::new();
    let files = open_files(tree, &used, made, &mut socket_files).map_err(|e| {
        remove_socket_files(&socket_files);
        RestoreError::File {
            pid: root,
            id: e.id,
            path: e.path,
            what: e.what,
        }
    })?;
    Ok(Shared {
        shm,
        files,
        socket_files,
    })
}

fn raw_fds<K: Copy + std::hash::Hash + Eq>(m: &HashMap<K, OwnedFd>) -> HashMap<K, RawFd> {
    m.iter().map(|(k, v)| (*k, v.as_raw_fd())).collect()
}

/// Create each root of the plan (cryo is their parent) and trace it from
/// its first instruction on; every task the roots create is traced too.
fn spawn_roots(ctx: &NodeCtx, roots: &mut Vec<Pid>) -> Result<()> {
    let root = ctx.tree.procs[0].pid();
    for r in ctx.plan.roots() {
        let node = &ctx.plan.nodes[r];
        let set_tid = node.set_tid();
        let how = crate::sys::proc::NewTask {
            set_tid: &set_tid,
            // clone3 takes no exit signal with CLONE_PARENT: the child
            // gets cryo's own (SIGCHLD for a runtime's child).
            exit_signal: if ctx.sibling { 0 } else { node.exit_signal },
            share_fs: false,
            share_files: false,
            new_pid_ns: node.new_pid_ns(1),
            sibling: ctx.sibling,
        };
        let created = match (node.host_free, node.kind) {
            (true, tree::NodeKind::Task(i)) => spawn_in_userns(ctx, i, &set_tid, node.pid),
            _ => crate::sys::proc::fork_with_pid(&how),
        };
        match created {
            Ok(0) => node::node_main(ctx, r, None, node::Sharing::default()),
            Ok(c) => {
                let c = Pid::from_raw(c);
                roots.push(c);
                let opts = ptrace::Options::PTRACE_O_TRACESYSGOOD
                    | ptrace::Options::PTRACE_O_EXITKILL
                    | ptrace::Options::PTRACE_O_TRACECLONE
                    | ptrace::Options::PTRACE_O_TRACEFORK
                    | ptrace::Options::PTRACE_O_TRACEVFORK;
                ptrace::seize(c, opts).map_err(|errno| RestoreError::Sys {
                    pid: root,
                    what: "PTRACE_SEIZE",
                    errno,
                })?;
            }
            Err(Errno::EEXIST) => {
                return Err(RestoreError::PidTaken {
                    pid: node.pid,
                    holder: pid_holder(node.pid).unwrap_or_else(|| "another task".into()),
                })
            }
            Err(errno) => {
                return Err(RestoreError::Clone {
                    pid: node.pid,
                    errno,
                })
            }
        }
    }
    if roots.is_empty() {
        return Err(RestoreError::Plan {
            pid: root,
            what: "no root process".into(),
        });
    }
    Ok(())
}

/// A root in a pid namespace its user namespace owns (`set_tid`: its
/// pids from there in): an intermediate process of cryo's joins the
/// root's cgroups and user namespace (it is single-threaded, as setns
/// asks) and creates the root in a new pid namespace as cryo's child
/// (CLONE_PARENT), so that the user namespace owns the pid namespace.
/// Returns as fork does: 0 in the root, its pid in cryo.
fn spawn_in_userns(
    ctx: &NodeCtx,
    i: usize,
    set_tid: &[i32],
    pid: i32,
) -> std::result::Result<i32, Errno> {
    let img = &ctx.tree.procs[i];
    let pc = img.core.process.clone().unwrap_or_default();
    let user = pc
        .namespaces
        .iter()
        .find(|n| n.kind == "user" && !n.host)
        .and_then(|n| ctx.ns_made.users.get(&n.inode).copied())
        .ok_or(Errno::ENOENT)?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let how = crate::sys::proc::NewTask {
        set_tid: &[],
        exit_signal: libc::SIGCHLD,
        share_fs: false,
        share_files: false,
        new_pid_ns: false,
        sibling: false,
    };
    let mid = crate::sys::proc::fork_with_pid(&how)?;
    if mid == 0 {
        let made = crate::cgroup::join(&pc.cgroups, ctx.cgroups)
            .map_err(|e| {
                tracing::error!(pid, "the root's cgroups: {e}");
                Errno::EACCES
            })
            .and_then(|()| {
                nix::sched::setns(
                    crate::sys::fd::borrow(user),
                    nix::sched::CloneFlags::CLONE_NEWUSER,
                )
            })
            .and_then(|()| {
                let flags = (libc::CLONE_NEWPID | libc::CLONE_PARENT) as u64;
                // SAFETY: this intermediate process is single-threaded (a
                // fork of cryo's, which fork_with_pid made sure of).
                unsafe { crate::sys::clone3_with_pid(set_tid, 0, flags) }
            });
        let word = match made {
            Ok(0) => return Ok(0),
            Ok(p) => p,
            Err(e) => -(e as i32),
        };
        let _ = nix::unistd::write(&w, &word.to_ne_bytes());
        crate::sys::proc::exit_now(0);
    }
    drop(w);
    let mut b = [0u8; 4];
    let got = nix::unistd::read(&r, &mut b);
    let _ = waitpid(Pid::from_raw(mid), None);
    match (got, i32::from_ne_bytes(b)) {
        (Ok(4), p) if p > 0 => Ok(p),
        (Ok(4), e) => Err(Errno::from_raw(-e)),
        _ => Err(Errno::EIO),
    }
}

/// Restore the image in `opts.dir`; returns once every task runs.
pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    let mut phases = crate::phases::Phases::start();
    crate::files::set_inherited(&opts.inherit_fds);
    let (mut tree, readers, chain, plan) = load(opts)?;
    // The locks the dump left for the tree's connections, taken before
    // --tcp-close drops the connections (their locks go all the same).
    let locks = crate::files::inet::locks_of(&tree.procs[0].files);
    if opts.tcp_close {
        crate::files::inet::close_connections(&mut tree.procs[0].files);
    }
    let root = tree.procs[0].pid();
    opts.notify
        .tell("pre-restore", root)
        .map_err(|what| RestoreError::Notify { pid: root, what })?;
    fault("loaded")?;
    phases.end("load");
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| RestoreError::Sys {
            pid: root,
            what: "pipe",
            errno,
        })
    };
    let (status_r, status_w) = pipe()?;
    let (go0_r, go0_w) = pipe()?;
    let (go1_r, go1_w) = pipe()?;
    let (go2_r, go2_w) = pipe()?;
    let ns_err = |what| RestoreError::Namespaces { pid: root, what };
    let mut user_ns = crate::ns::user::make_all(&tree.namespaces).map_err(ns_err)?;
    let (mnt_ns, late_tmpfs) = crate::ns::mnt::make_all(
        &tree.namespaces,
        &opts.dir,
        &opts.externals,
        opts.root.as_deref(),
        &user_ns.owned,
    )
    .map_err(ns_err)?;
    let t_net = Instant::now();
    let net_ns = crate::ns::net::make_all(&tree.namespaces, &opts.veth_pairs, &user_ns.owned)
        .map_err(ns_err)?;
    tracing::debug!(
        ms = t_net.elapsed().as_secs_f64() * 1e3,
        "network namespaces made"
    );
    let mut made = NsMade {
        mnt: raw_fds(&mnt_ns),
        late_tmpfs: raw_fds(&late_tmpfs),
        net: raw_fds(&net_ns.fds),
        users: raw_fds(&user_ns.users),
        owned: raw_fds(&user_ns.owned),
    };
    phases.end("namespaces");
    let shared = make_shared(&tree, &made)?;
    // The tree's connections are made again: the lock their dump left
    // goes (their peers' packets reach them from now on).
    crate::files::inet::unlock_after_restore(root, &locks);
    fault("files")?;
    phases.end("files");
    let memberships = tree
        .procs
        .iter()
        .flat_map(|p| p.core.process.iter().flat_map(|pc| pc.cgroups.iter()));
    let mut cgroups = crate::cgroup::props::prepare(
        &tree.cgroups,
        memberships,
        opts.manage_cgroups,
        crate::cgroup::props::Roots {
            all: opts.cgroup_root.as_deref(),
            by_controller: Some(&opts.cgroup_roots),
        },
    )
    .map_err(|what| {
        remove_socket_files(&shared.socket_files);
        RestoreError::Cgroups { pid: root, what }
    })?;
    if let Err(what) = user_ns.cgroups(&tree.namespaces, &tree.procs, &cgroups.targets) {
        remove_socket_files(&shared.socket_files);
        cgroups.remove_created();
        return Err(ns_err(what));
    }
    made.owned.extend(raw_fds(&user_ns.owned));
    phases.end("cgroups");
    let file_fds = raw_fds(&shared.files);
    let shm_fds = raw_fds(&shared.shm);
    let pty_masters: HashMap<u32, RawFd> = tree.procs[0]
        .files
        .iter()
        .filter(|f| f.kind == FileKind::FilePtyMaster as i32)
        // Controlling terminals are ptys of cryo's devpts.
        .filter(|f| f.pty.as_ref().is_some_and(|p| p.devpts == 0))
        .filter_map(|f| Some((f.pty.as_ref()?.index, *file_fds.get(&f.id)?)))
        .collect();
    let ctx = NodeCtx {
        tree: &tree,
        readers: &readers,
        chain: &chain,
        plan: &plan,
        shm: &shm_fds,
        files: &file_fds,
        pty_masters: &pty_masters,
        status_w: status_w.as_raw_fd(),
        cpu_timer_slack_us: crate::sys::proc::cpu_itimer_slack_us(),
        go: [go0_r.as_raw_fd(), go1_r.as_raw_fd(), go2_r.as_raw_fd()],
        cgroups: &cgroups.targets,
        ns_made: &made,
        sibling: opts.sibling,
    };
    let mut roots: Vec<Pid> = Vec::new();
    let started = spawn_roots(&ctx, &mut roots);
    drop(status_w);
    drop((go0_r, go1_r, go2_r));
    let res = started.and_then(|()| {
        fault("spawned")?;
        // Let the roots go on, now that they are traced.
        nix::unistd::write(&go0_w, &vec![b'g'; roots.len()]).map_err(|errno| {
            RestoreError::Sys {
                pid: root,
                what: "write",
                errno,
            }
        })?;
        let pairs: Vec<(i32, i32)> = plan
            .roots()
            .map(|r| plan.nodes[r].pid)
            .zip(roots.iter().map(|p| p.as_raw()))
            .collect();
        supervise::supervise(
            &tree,
            &plan,
            status_r,
            (&go1_w, &go2_w),
            &pairs,
            &opts.notify,
        )
    });
    // Closing the barriers ends any task still waiting on one.
    drop((go0_w, go1_w, go2_w));
    match res {
        Ok(()) => {
            net_ns.keep();
            // The root's pid here (the kernel's choice in a pid namespace
            // a user namespace of the tree owns).
            let root = plan
                .roots()
                .position(|r| plan.nodes[r].pid == root)
                .and_then(|i| roots.get(i))
                .map_or(root, |p| p.as_raw());
            phases.end("tasks");
            Ok(Restored {
                pid: root,
                elapsed: t0.elapsed(),
                phases,
            })
        }
        Err(e) => {
            tracing::warn!("restore failed ({e}); killing every task it made");
            kill_all(&roots, all_tids(&tree, &plan));
            remove_socket_files(&shared.socket_files);
            cgroups.remove_created();
            Err(e)
        }
    }
}

/// A failed restore leaves nothing behind: kill every task it made (the
/// roots, its children, and every task of the tree that this process
/// traces: a pid of the image held by someone else is never touched) and
/// reap them. A traced thread's exit must be collected before its
/// leader's can be.
fn kill_all(roots: &[Pid], tree_pids: impl Iterator<Item = i32>) {
    let me = std::process::id() as i32;
    for r in roots {
        let _ = kill(*r, Signal::SIGKILL);
    }
    for pid in tree_pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let tracer = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok());
        if tracer == Some(me) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let start = Instant::now();
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Err(Errno::EINTR) => {}
            Err(_) => break,
            Ok(WaitStatus::StillAlive) => {
                if start.elapsed() > Duration::from_secs(10) {
                    tracing::error!("tasks of the failed restore did not end within 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(st) => {
                // Anything still stopping is ours (traced): kill it too.
                if let Some(p) = st.pid() {
                    if !matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                        let _ = kill(p, Signal::SIGKILL);
                        let _ = ptrace::cont(p, None);
                    }
                }
            }
        }
    }
}
