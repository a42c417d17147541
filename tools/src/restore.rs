//! `cryo restore`.

use std::path::PathBuf;

use clap::Args;
use cryo_engine::restore::{restore, RestoreOptions};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Image directory.
    #[arg(short = 'D', long = "images-dir")]
    pub dir: PathBuf,
    /// Return as soon as the task runs instead of waiting for it to exit.
    #[arg(short = 'd', long)]
    pub restore_detached: bool,
}

pub fn run(a: RestoreArgs) -> anyhow::Result<i32> {
    let r = restore(&RestoreOptions { dir: a.dir.clone() })
        .map_err(|e| anyhow::anyhow!("restore from {} failed: {e}", a.dir.display()))?;
    tracing::info!(pid = r.pid, ms = r.elapsed.as_millis() as u64, "restored");
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
