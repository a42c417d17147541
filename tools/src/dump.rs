//! `cryo dump`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use cryo_engine::dump::{dump, remove_partial, DumpOptions};
use cryo_image::proto::Compression;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Compress {
    /// Raw pages (they can be mapped straight from the file).
    None,
    /// zstd, in independent chunks compressed in parallel.
    Zstd,
    /// zstd at a fast negative level (FAST_LEVEL; --zstd-level sets
    /// another), the same chunks and record grouping: less time, a larger
    /// image.
    Fast,
}

/// The zstd level of `--compress fast`.
pub const FAST_LEVEL: i32 = -5;

impl Compress {
    /// The compression and zstd level it means, `level` (--zstd-level)
    /// overriding its own.
    pub fn resolve(self, level: Option<i32>) -> (Compression, i32) {
        match self {
            Compress::None => (Compression::None, level.unwrap_or(1)),
            Compress::Zstd => (Compression::Zstd, level.unwrap_or(1)),
            Compress::Fast => (Compression::Zstd, level.unwrap_or(FAST_LEVEL)),
        }
    }
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Process to dump, with all its descendants and threads.
    #[arg(short = 't', long = "tree", required_unless_present = "cgroup")]
    pub pid: Option<i32>,
    /// Dump every process of this cgroup (a cgroup v2 directory or a v1
    /// freezer directory), frozen by its freezer while they are seized;
    /// they may form several trees.
    #[arg(long, conflicts_with_all = ["pid", "freeze_cgroup"])]
    pub cgroup: Option<PathBuf>,
    /// Image directory (created if missing).
    #[arg(short = 'D', long = "images-dir", required_unless_present = "stream")]
    pub dir: Option<PathBuf>,
    /// Write the image to standard output (a pipe, a socket) instead of
    /// leaving it in a directory, for tools that store images elsewhere;
    /// `cryo restore --stream` reads it. It is staged in a directory of
    /// its own under $TMPDIR while it is made, removed once written.
    #[arg(long, conflicts_with_all = ["dir", "page_server"])]
    pub stream: bool,
    /// Leave the process running after the dump (default: kill it).
    #[arg(short = 'R', long)]
    pub leave_running: bool,
    /// Page compression.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compress: Compress,
    /// zstd level (negative levels are faster; default 1, or FAST_LEVEL
    /// with --compress fast).
    #[arg(long, allow_negative_numbers = true)]
    pub zstd_level: Option<i32>,
    /// Compression threads (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Freeze this cgroup (cgroup v2 directory or v1 freezer directory)
    /// while seizing the task, and thaw it right after.
    #[arg(long)]
    pub freeze_cgroup: Option<PathBuf>,
    /// Largest file deleted while open (or memfd) whose contents are saved
    /// in the image, in bytes; a larger one is refused.
    #[arg(long, default_value_t = 64 << 20)]
    pub ghost_limit: u64,
    /// A deleted file larger than --ghost-limit that still has another
    /// name is kept by a hard link cryo makes next to its old path
    /// (NAME.cryo-link-PID-N, removed by the restore) instead of refused.
    #[arg(long)]
    pub link_remap: bool,
    /// A shell job: accept descriptors on the tasks' controlling terminal;
    /// restore reattaches them to the terminal of the session it runs in.
    #[arg(short = 'j', long)]
    pub shell_job: bool,
    /// Dump established TCP connections (through TCP_REPAIR: sequence
    /// numbers, queues with the data in flight, window and options), as
    /// CRIU's flag does; without it they are refused.
    #[arg(long)]
    pub tcp_established: bool,
    /// Dump TCP connections (established or in any other state but
    /// listening) closed, as CRIU's flag does: the restore gives the tasks
    /// sockets of their kind that are not connected.
    #[arg(long)]
    pub tcp_close: bool,
    /// How those connections are kept quiet until the restore: nft (a
    /// table that drops their packets, so that a peer retransmits instead
    /// of being reset; the restore removes it), iptables (a chain of
    /// iptables and ip6tables doing the same) or skip.
    #[arg(long, value_name = "nft|iptables|skip", default_value = "nft")]
    pub network_lock: String,
    /// Copy private memory while the tasks still run (in rounds, tracking
    /// their writes with userfaultfd) and stop them only for what they
    /// wrote since: a shorter stop for migrations. Not with -R.
    #[arg(long)]
    pub pre_copy: bool,
    /// Accept unix datagram sockets connected to a socket outside the
    /// dumped tree (a logger, say): the restore connects them to its
    /// address again.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Write the dump's figures (time stopped, image size, ...) as JSON here.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// A mount of the tree's mount namespace that the restore binds from
    /// a path it is given rather than makes: mnt[MOUNTPOINT]:KEY (the
    /// restore takes --external mnt[KEY]:PATH); or unix[INODE]: a unix
    /// socket (one connected to a supervisor outside the tree) whose
    /// state is not kept, given back at restore with --inherit-fd
    /// fd[N]:socket:[INODE]. Repeatable.
    #[arg(long = "external", value_name = "mnt[MOUNTPOINT]:KEY|unix[INODE]")]
    pub externals: Vec<String>,
    /// An incremental dump: the image (a pre-dump, or a dump left
    /// running) whose pages this one refers to where they were not
    /// written since; relative to the image directory unless absolute.
    #[arg(long)]
    pub prev_images_dir: Option<PathBuf>,
    #[command(flatten)]
    pub to: crate::pageserver::ToPageServer,
    /// A pipe whose other end may be held outside the tree (a
    /// supervisor's log pipe): kept as leading outside, and given back at
    /// restore with --inherit-fd fd[N]:pipe:[INODE]. Repeatable.
    #[arg(long = "external-pipe", value_name = "pipe:[INODE]")]
    pub external_pipes: Vec<String>,
    /// Run this command at each step of the dump, as CRIU's action
    /// scripts (CRTOOLS_SCRIPT_ACTION: pre-dump, network-lock, post-dump,
    /// network-unlock); one that fails stops the dump. Repeatable.
    #[arg(long = "action-script", value_name = "CMD")]
    pub action_scripts: Vec<PathBuf>,
}

pub fn run(a: DumpArgs) -> anyhow::Result<i32> {
    let staged = a.stream.then(crate::restore::stage_dir).transpose()?;
    let dir = match (&staged, &a.dir) {
        (Some(s), _) => s.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => anyhow::bail!("-D DIR or --stream is needed"),
    };
    let r = dump_to(&a, &dir);
    if let (Some(s), Ok(_)) = (&staged, &r) {
        let out = std::io::stdout();
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out.lock());
        let sent = cryo_engine::pageserver::write_image(s, "image", true, &mut w);
        drop(w);
        let _ = std::fs::remove_dir_all(s);
        sent.map_err(|e| anyhow::anyhow!("writing the image to standard output: {e}"))?;
    } else if let Some(s) = &staged {
        let _ = std::fs::remove_dir_all(s);
    }
    r
}

fn dump_to(a: &DumpArgs, dir: &std::path::Path) -> anyhow::Result<i32> {
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let opts = DumpOptions {
        pid: a.pid.unwrap_or(0),
        cgroup: a.cgroup.clone(),
        dir: dir.to_path_buf(),
        leave_running: a.leave_running,
        compression: a.compress.resolve(a.zstd_level).0,
        zstd_level: a.compress.resolve(a.zstd_level).1,
        threads,
        freeze_cgroup: a.freeze_cgroup.clone(),
        ghost_limit: a.ghost_limit,
        link_remap: a.link_remap,
        ext_unix_sk: a.ext_unix_sk,
        shell_job: a.shell_job,
        tcp_established: a.tcp_established,
        tcp_close: a.tcp_close,
        network_lock: match a.network_lock.as_str() {
            "skip" => None,
            other => Some(
                cryo_engine::files::inet::Lock::from_name(other).ok_or_else(|| {
                    anyhow::anyhow!("--network-lock {other}: expected nft, iptables or skip")
                })?,
            ),
        },
        pre_copy: a.pre_copy,
        external_pipes_all: false,
        notify: cryo_engine::notify::Notify::scripts(&a.action_scripts, dir.to_path_buf()),
        prev_images_dir: a.prev_images_dir.clone(),
        external_pipes: a
            .external_pipes
            .iter()
            .map(|p| {
                p.strip_prefix("pipe:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--external-pipe {p:?}: expected pipe:[INODE]"))
            })
            .collect::<anyhow::Result<_>>()?,
        externals: cryo_engine::ns::mnt::parse_externals(&a.externals)
            .map_err(anyhow::Error::msg)?,
        external_sockets: cryo_engine::ns::mnt::external_sockets(&a.externals)
            .map_err(anyhow::Error::msg)?,
    };
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar: std::cell::RefCell<Option<indicatif::ProgressBar>> = std::cell::RefCell::new(None);
    let progress = |done: u64, total: u64| {
        if !tty || start.elapsed() < Duration::from_secs(1) {
            return;
        }
        let mut b = bar.borrow_mut();
        let pb = b.get_or_insert_with(|| {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "dumping pages {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        });
        pb.set_position(done);
    };
    let res = dump(&opts, &progress);
    if let Some(pb) = bar.borrow_mut().take() {
        pb.finish_and_clear();
    }
    match res {
        Ok(st) => {
            a.to.send(dir, true)?;
            tracing::info!(
                pid = st.root,
                processes = st.processes,
                pages = st.pages.pages_stored,
                zero_pages = st.pages.zero_pages,
                frozen_ms = st.frozen.as_millis() as u64,
                total_ms = st.total.as_millis() as u64,
                image_bytes = st.image_bytes,
                "dump done"
            );
            tracing::info!("dump phases (ms): {}", phases_text(&st.phases));
            if let Some(path) = &a.stats {
                let j = serde_json::json!({
                    "frozen_ms": st.frozen.as_secs_f64() * 1e3,
                    "total_ms": st.total.as_secs_f64() * 1e3,
                    "image_bytes": st.image_bytes,
                    "pages_stored": st.pages.pages_stored,
                    "zero_pages": st.pages.zero_pages,
                    "pages_scanned": st.pages.pages_scanned,
                    "pages_copied_running": st.pages.pages_copied_running,
                    "pages_saved_on_write": st.pages.pages_saved_on_write,
                    "pages_precopied": st.pages.pages_precopied,
                    "pages_in_parent_image": st.pages.pages_in_parent_image,
                    "processes": st.processes,
                    "phases_ms": phases_json(&st.phases),
                });
                std::fs::write(path, format!("{j}\n"))
                    .map_err(|e| anyhow::anyhow!("writing stats to {}: {e}", path.display()))?;
            }
            Ok(0)
        }
        Err(e) => {
            remove_partial(dir);
            let what = match (&a.cgroup, a.pid) {
                (Some(cg), _) => format!("cgroup {}", cg.display()),
                (None, pid) => format!("task {}", pid.unwrap_or(0)),
            };
            Err(anyhow::anyhow!("dump of {what} failed: {e}"))
        }
    }
}

/// Each phase's milliseconds, by name (--stats; the log line has them in order).
pub fn phases_json(p: &cryo_engine::phases::Phases) -> serde_json::Value {
    let m: serde_json::Map<String, serde_json::Value> = p
        .millis()
        .into_iter()
        .map(|(n, ms)| (n.to_string(), serde_json::json!(ms)))
        .collect();
    serde_json::Value::Object(m)
}

/// "seize 0.4, capture 2.1, ..." for the log.
pub fn phases_text(p: &cryo_engine::phases::Phases) -> String {
    p.millis()
        .iter()
        .map(|(n, ms)| format!("{n} {ms:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}
