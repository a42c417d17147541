//! `cryo restore`.

use std::path::PathBuf;

use clap::Args;
use cryo_engine::restore::{restore, RestoreOptions};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Image directory.
    #[arg(short = 'D', long = "images-dir", required_unless_present = "stream")]
    pub dir: Option<PathBuf>,
    /// Read the image from standard input, as `cryo dump --stream` wrote
    /// it (staged in a directory of its own under $TMPDIR, removed once
    /// the tree runs).
    #[arg(long, conflicts_with = "dir")]
    pub stream: bool,
    /// Give the tree descriptor N of this process for the pipe or socket
    /// that led outside it at the dump (dump --external-pipe, --external
    /// unix[INODE]), as CRIU's flag does: fd[N]:pipe:[INODE] or
    /// fd[N]:socket:[INODE]. Repeatable.
    #[arg(
        long = "inherit-fd",
        value_name = "fd[N]:pipe:[INODE]|fd[N]:socket:[INODE]"
    )]
    pub inherit_fds: Vec<String>,
    /// Return as soon as the task runs instead of waiting for it to exit.
    #[arg(short = 'd', long)]
    pub restore_detached: bool,
    /// Write the restored root's pid (as this process's pid namespace
    /// sees it: a container's init, not its pid 1 inside) to FILE.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// What to do with the tree's cgroups: none (join them, they must
    /// exist), props (they must exist; write their settings), soft (make
    /// missing ones with their settings; report existing ones that differ),
    /// full (make missing ones; write settings to all), strict (make
    /// missing ones; refuse existing ones that differ), ignore (stay in
    /// cryo's cgroups).
    #[arg(long, value_name = "MODE", default_value = "soft")]
    pub manage_cgroups: cryo_engine::cgroup::props::Manage,
    /// Put the tree's cgroups under this cgroup (in every hierarchy): it
    /// takes the place of the deepest cgroup they all share.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<String>,
    /// The path to bind for a mount the dump was told is external
    /// (--external mnt[MOUNTPOINT]:KEY there): mnt[KEY]:PATH. Repeatable.
    #[arg(long = "external", value_name = "mnt[KEY]:PATH")]
    pub externals: Vec<String>,
    /// The directory to make the root of the tree's mount namespace (a
    /// container whose root was a directory, moved or copied since).
    #[arg(long, value_name = "DIR")]
    pub root: Option<String>,
    /// The name the host end of the tree's veth device IN takes (in place
    /// of its name at the dump), and a bridge it joins: IN=OUT[@BRIDGE].
    /// Repeatable.
    #[arg(long = "veth-pair", value_name = "IN=OUT[@BRIDGE]")]
    pub veth_pairs: Vec<String>,
    /// Restore the image's TCP connections closed (sockets of their kind,
    /// not connected), as CRIU's flag does: for an image whose peers are
    /// gone.
    #[arg(long)]
    pub tcp_close: bool,
    /// Run this command at each step of the restore, as CRIU's action
    /// scripts (CRTOOLS_SCRIPT_ACTION: pre-restore, setup-namespaces,
    /// post-restore, network-unlock, pre-resume, post-resume; with
    /// CRTOOLS_INIT_PID); one that fails before the tree runs stops the
    /// restore. Repeatable.
    #[arg(long = "action-script", value_name = "CMD")]
    pub action_scripts: Vec<PathBuf>,
    /// Write the restore's figures (its time, each phase's) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
}

/// A new directory of cryo's own under $TMPDIR (0700) to stage a
/// streamed image in.
pub fn stage_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for n in 0..1000u32 {
        let d = base.join(format!("cryo-stream-{}-{n}", std::process::id()));
        match std::os::unix::fs::DirBuilderExt::mode(
            std::fs::DirBuilder::new().recursive(false),
            0o700,
        )
        .create(&d)
        {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => anyhow::bail!("{}: {e}", d.display()),
        }
    }
    anyhow::bail!("no free directory name under {}", base.display())
}

pub fn run(a: RestoreArgs) -> anyhow::Result<i32> {
    if !a.stream {
        let dir = a
            .dir
            .clone()
            .ok_or_else(|| anyhow::anyhow!("-D DIR or --stream is needed"))?;
        return restore_from(&a, &dir);
    }
    let staged = stage_dir()?;
    let img = staged.join("image");
    let read = cryo_engine::pageserver::read_image(&mut std::io::stdin().lock(), &img);
    let r = read
        .map_err(|e| anyhow::anyhow!("reading the image from standard input: {e}"))
        .and_then(|()| restore_from(&a, &img));
    let _ = std::fs::remove_dir_all(&staged);
    r
}

fn restore_from(a: &RestoreArgs, dir: &std::path::Path) -> anyhow::Result<i32> {
    // Made before the restore, so that a pid file that cannot be written
    // fails it before any task exists.
    let pidfile = a
        .pidfile
        .as_ref()
        .map(|p| {
            std::fs::File::create(p).map_err(|e| anyhow::anyhow!("--pidfile {}: {e}", p.display()))
        })
        .transpose()?;
    let r = restore(&RestoreOptions {
        dir: dir.to_path_buf(),
        manage_cgroups: a.manage_cgroups,
        cgroup_root: a.cgroup_root.clone(),
        cgroup_roots: Default::default(),
        externals: cryo_engine::ns::mnt::parse_externals(&a.externals)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .collect(),
        root: a.root.clone(),
        veth_pairs: a
            .veth_pairs
            .iter()
            .map(|p| {
                p.split_once('=')
                    .filter(|(i, o)| !i.is_empty() && !o.is_empty())
                    .map(|(i, o)| (i.to_string(), o.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("--veth-pair {p:?}: expected IN=OUT[@BRIDGE]"))
            })
            .collect::<anyhow::Result<_>>()?,
        tcp_close: a.tcp_close,
        inherit_fds: a
            .inherit_fds
            .iter()
            .map(|s| cryo_engine::files::parse_inherit(s).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?,
        sibling: false,
        notify: cryo_engine::notify::Notify::scripts(&a.action_scripts, dir.to_path_buf()),
    })
    .map_err(|e| anyhow::anyhow!("restore from {} failed: {e}", dir.display()))?;
    tracing::info!(pid = r.pid, ms = r.elapsed.as_millis() as u64, "restored");
    tracing::info!(
        "restore phases (ms): {}",
        crate::dump::phases_text(&r.phases)
    );
    if let Some(path) = &a.stats {
        let j = serde_json::json!({
            "pid": r.pid,
            "total_ms": r.elapsed.as_secs_f64() * 1e3,
            "phases_ms": crate::dump::phases_json(&r.phases),
        });
        // The tree runs: a stats file that fails now is reported only.
        if let Err(e) = std::fs::write(path, format!("{j}\n")) {
            tracing::error!("writing stats to {}: {e}", path.display());
        }
    }
    if let (Some(mut f), Some(p)) = (pidfile, a.pidfile.as_ref()) {
        use std::io::Write;
        // The tree runs: a pid file that fails now is reported, not undone.
        if let Err(e) = write!(f, "{}", r.pid).and_then(|_| f.sync_all()) {
            tracing::error!(pid = r.pid, "writing --pidfile {}: {e}", p.display());
        }
    }
    if a.restore_detached {
        return Ok(0);
    }
    // The restored task is our child: wait for it and pass on its status.
    loop {
        match waitpid(Pid::from_raw(r.pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(anyhow::anyhow!("waiting for task {}: {e}", r.pid)),
        }
    }
}
