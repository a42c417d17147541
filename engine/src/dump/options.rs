//! What a dump is told (the command line's options as the engine takes
//! them) and what it reports.

#![forbid(unsafe_code)]

use super::*;

#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// The root of the tree to dump (unused with `cgroup`).
    pub pid: i32,
    /// Dump every process of this cgroup instead, frozen by its freezer.
    pub cgroup: Option<PathBuf>,
    pub dir: PathBuf,
    pub leave_running: bool,
    pub compression: Compression,
    pub zstd_level: i32,
    pub threads: usize,
    /// Freeze this cgroup (v2 or v1 freezer) while seizing the task.
    pub freeze_cgroup: Option<PathBuf>,
    /// Largest deleted file or memfd whose contents go into the image.
    pub ghost_limit: u64,
    /// A larger deleted file that still has another name is kept by a
    /// hard link next to its old path (removed by the restore).
    pub link_remap: bool,
    /// Accept unix datagram sockets connected to a peer outside the tree
    /// (restore connects them to its address again).
    pub ext_unix_sk: bool,
    /// A shell job: descriptors on the tasks' controlling terminal are
    /// accepted and reattached to the restoring session's terminal.
    pub shell_job: bool,
    /// Copy private memory while the tasks still run, in rounds, and stop
    /// them only for what they wrote since the last one (not with
    /// `leave_running`, where the stop is already short).
    pub pre_copy: bool,
    /// Mounts of the tree's mount namespaces that the restore binds from
    /// a path it is given, as (mountpoint, key): --external
    /// mnt[MOUNTPOINT]:KEY.
    pub externals: Vec<(String, String)>,
    /// Established TCP connections are dumped through TCP_REPAIR (and
    /// left in repair mode, silent, when the tasks are killed), not
    /// refused (--tcp-established).
    pub tcp_established: bool,
    /// Connections in any state but listening are dumped closed, without
    /// TCP_REPAIR or a lock: the restore makes sockets of their kind, not
    /// connected (--tcp-close).
    pub tcp_close: bool,
    /// Lock those connections with nftables (their packets dropped until
    /// the restore): --network-lock nft (the default), iptables or skip.
    pub network_lock: Option<crate::files::inet::Lock>,
    /// An incremental dump: pages not written since the image in this
    /// directory (a pre-dump, or a dump of the tree left running) are
    /// that image's (--prev-images-dir; the image's `parent` link names
    /// it as given, relative to the image's directory).
    pub prev_images_dir: Option<PathBuf>,
    /// Pipes (by inode) whose other end may be held outside the tree
    /// (--external-pipe pipe:[INODE]): kept as leading outside (their
    /// bytes in flight stay in them), the restore given them back with
    /// --inherit-fd.
    pub external_pipes: Vec<u64>,
    /// Every pipe whose other end is held outside the tree is taken so
    /// (as CRIU's RPC service does: runc gives a container's stdio pipes
    /// back at restore by inherit_fd).
    pub external_pipes_all: bool,
    /// Unix sockets (by inode) whose state is not kept: the restore is
    /// given them (--external unix[INODE], then --inherit-fd
    /// fd[N]:socket:[INODE]), as a supervisor's connection to the tree.
    pub external_sockets: Vec<u64>,
    /// Who is told of the dump's steps (action scripts, RPC).
    pub notify: crate::notify::Notify,
}

impl DumpOptions {
    /// A kill-mode dump of the tree under `pid` into `dir` with the
    /// defaults the CLI has (zstd level 1 on every CPU, network lock nft).
    pub fn new(pid: i32, dir: impl Into<PathBuf>) -> DumpOptions {
        DumpOptions {
            pid,
            cgroup: None,
            dir: dir.into(),
            leave_running: false,
            compression: Compression::Zstd,
            zstd_level: 1,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            freeze_cgroup: None,
            ghost_limit: 64 << 20,
            link_remap: false,
            ext_unix_sk: false,
            shell_job: false,
            pre_copy: false,
            externals: Vec::new(),
            tcp_established: false,
            tcp_close: false,
            network_lock: Some(crate::files::inet::Lock::Nft),
            prev_images_dir: None,
            external_pipes: Vec::new(),
            external_pipes_all: false,
            external_sockets: Vec::new(),
            notify: Default::default(),
        }
    }

    /// The parent image's directory (--prev-images-dir, a relative one
    /// from the image's directory), if any.
    pub fn parent_image(&self) -> Option<PathBuf> {
        self.prev_images_dir
            .as_ref()
            .map(|p| match p.is_absolute() {
                true => p.clone(),
                false => self.dir.join(p),
            })
    }

    pub(crate) fn collect(&self) -> CollectOptions {
        CollectOptions {
            ghost_limit: self.ghost_limit,
            link_remap: self.link_remap,
            shell_job: self.shell_job,
            owners: true,
            tcp_established: self.tcp_established,
            tcp_close: self.tcp_close,
            network_lock: self.network_lock.map(|k| (self.pid, k)),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct DumpStats {
    /// The first root dumped, and how many processes were.
    pub root: i32,
    pub processes: usize,
    pub pages: TransferStats,
    /// How long the task was stopped.
    pub frozen: Duration,
    pub total: Duration,
    pub image_bytes: u64,
    /// Each phase's time: seize, capture (parasite and memory), files,
    /// namespaces, cgroups, resume (left running), write (the image, its
    /// fsync), kill.
    pub phases: crate::phases::Phases,
}
