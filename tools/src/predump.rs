//! `cryo pre-dump` and the holder it leaves (`cryo track-hold`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use cryo_engine::dump::predump::{pre_dump, PreDumpOptions};
use cryo_engine::dump::remove_partial;

use crate::dump::Compress;

#[derive(Args, Debug)]
pub struct PreDumpArgs {
    /// Process whose memory to copy, with all its descendants; it runs on.
    #[arg(short = 't', long = "tree")]
    pub pid: i32,
    /// Image directory (created if missing).
    #[arg(short = 'D', long = "images-dir")]
    pub dir: PathBuf,
    /// The pre-dump this one follows (relative to the image directory
    /// unless absolute): only pages written since are copied.
    #[arg(long)]
    pub prev_images_dir: Option<PathBuf>,
    /// Page compression.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compress: Compress,
    /// zstd level (negative levels are faster).
    #[arg(long, allow_negative_numbers = true)]
    pub zstd_level: Option<i32>,
    /// Compression threads (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// How long the tracking of written pages is kept for the next dump,
    /// in seconds (a holder process keeps it; its pid is in
    /// DIR/track.pid).
    #[arg(long, default_value_t = 3600)]
    pub track_timeout: u64,
    #[command(flatten)]
    pub to: crate::pageserver::ToPageServer,
}

pub fn run(a: PreDumpArgs) -> anyhow::Result<i32> {
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let o = PreDumpOptions {
        pid: a.pid,
        dir: a.dir.clone(),
        prev_images_dir: a.prev_images_dir.clone(),
        compression: a.compress.resolve(a.zstd_level).0,
        zstd_level: a.compress.resolve(a.zstd_level).1,
        threads,
        track_limit: Duration::from_secs(a.track_timeout),
    };
    match pre_dump(&o) {
        Ok(st) => {
            a.to.send(&a.dir, false)?;
            tracing::info!(
                processes = st.processes,
                pages = st.pages_stored,
                in_parent = st.pages_in_parent,
                tracked = st.tracked,
                total_ms = st.total.as_millis() as u64,
                "pre-dump done"
            );
            Ok(0)
        }
        Err(e) => {
            remove_partial(&a.dir);
            Err(anyhow::anyhow!("pre-dump of task {} failed: {e}", a.pid))
        }
    }
}

/// `cryo track-hold` (started by pre-dump; not for people).
#[derive(Args, Debug)]
pub struct TrackHoldArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub secs: u64,
}

pub fn hold(a: TrackHoldArgs) -> anyhow::Result<i32> {
    cryo_engine::mem::track::serve(&a.dir, Duration::from_secs(a.secs))
        .map_err(anyhow::Error::msg)?;
    Ok(0)
}
