//! `cryo migrate`: move a running tree to another host in one command.
//! Pre-dumps copy its memory while it runs, each sent to the destination
//! (a `cryo page-server --restore` there), round after round while the
//! pages written in between shrink; then the tree stops for a dump of
//! only what it wrote since the last round, which goes over too, and the
//! destination restores it at once. The stop time printed runs from the
//! dump's start to the destination's word that the tree runs there.
//!
//! If anything fails before the final dump, the tree runs on here. If
//! the final image cannot be sent or restored there, the tree is
//! restored here from the local images, which keep their pages until the
//! destination runs the tree.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use cryo_engine::dump::predump::{pre_dump, PreDumpOptions};
use cryo_engine::dump::{dump, DumpOptions};
use cryo_image::proto::Compression;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Process to move, with all its descendants.
    #[arg(short = 't', long = "tree")]
    pub pid: i32,
    /// The destination: HOST:PORT of a `cryo page-server --restore`.
    #[arg(long)]
    pub to: String,
    /// Where the images are made here (created if missing).
    #[arg(short = 'D', long = "work-dir")]
    pub dir: PathBuf,
    /// Most pre-copy rounds before the stop.
    #[arg(long, default_value_t = 5)]
    pub max_rounds: u32,
    /// Established TCP connections go too (TCP_REPAIR), as with dump.
    #[arg(long)]
    pub tcp_established: bool,
}

/// Few enough pages written in a round to stop the rounds.
const SETTLED: u64 = 256;

pub fn run(a: MigrateArgs) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&a.dir).map_err(|e| anyhow::anyhow!("{}: {e}", a.dir.display()))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut sent = 0u64;
    let mut rounds: Vec<u64> = Vec::new();
    let mut prev: Option<String> = None;
    for k in 1..=a.max_rounds.max(1) {
        let name = format!("pre{k}");
        let dir = a.dir.join(&name);
        let o = PreDumpOptions {
            pid: a.pid,
            dir: dir.clone(),
            prev_images_dir: prev.as_ref().map(|p| PathBuf::from(format!("../{p}"))),
            compression: Compression::Zstd,
            zstd_level: 1,
            threads,
            track_limit: Duration::from_secs(600),
        };
        let st = pre_dump(&o).map_err(|e| {
            anyhow::anyhow!("pre-copy round {k} failed (the tree runs on here): {e}")
        })?;
        match cryo_engine::pageserver::send(&dir, &a.to, false) {
            Ok((n, _)) => sent += n,
            Err(e) => {
                // The tracking it left ends: nothing will take it.
                drop(cryo_engine::mem::track::take(&dir));
                anyhow::bail!(
                    "sending pre-copy round {k} to {} failed (the tree runs on here): {e}",
                    a.to
                );
            }
        }
        let written = st.pages_stored;
        eprintln!(
            "pre-copy round {k}: {written} pages ({} ms)",
            st.total.as_millis()
        );
        let settled = written <= SETTLED || rounds.last().is_some_and(|&l| written >= l);
        rounds.push(written);
        prev = Some(name);
        if settled {
            break;
        }
    }
    let dir = a.dir.join("final");
    let mut opts = DumpOptions::new(a.pid, dir.clone());
    opts.threads = threads;
    opts.tcp_established = a.tcp_established;
    opts.network_lock = opts.network_lock.filter(|_| a.tcp_established);
    opts.prev_images_dir = prev.map(|p| PathBuf::from(format!("../{p}")));
    let stop = Instant::now();
    let st = dump(&opts, &|_, _| {})
        .map_err(|e| anyhow::anyhow!("the final dump failed (the tree runs on here): {e}"))?;
    let dumped = stop.elapsed();
    let t_send = Instant::now();
    let said = match cryo_engine::pageserver::send(&dir, &a.to, true) {
        Ok((n, said)) => {
            sent += n;
            said
        }
        Err(e) => return restore_here(&dir, &e),
    };
    let stopped = stop.elapsed();
    // The tree runs there: the pages kept here for a restore here go.
    for d in std::fs::read_dir(&a.dir).into_iter().flatten().flatten() {
        cryo_engine::pageserver::drop_pages(&d.path());
    }
    println!(
        "migrated task {} to {}: {} pre-copy round(s) ({} pages), then {} pages at the stop; stop time {:.1} ms (dump {:.1} ms, of it frozen {:.1} ms; sent and {}: {:.1} ms); total {:.1} ms; {sent} bytes sent",
        a.pid,
        a.to,
        rounds.len(),
        rounds.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
        st.pages.pages_stored,
        ms(stopped),
        ms(dumped),
        ms(st.frozen),
        if said.is_empty() { "taken".to_string() } else { said },
        ms(t_send.elapsed()),
        ms(t0.elapsed()),
    );
    Ok(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The final image did not reach the destination, or its restore there
/// failed: the tree comes back here.
fn restore_here(dir: &Path, why: &str) -> anyhow::Result<i32> {
    match cryo_engine::restore::restore(&cryo_engine::restore::RestoreOptions::new(dir)) {
        Ok(r) => anyhow::bail!(
            "the migration failed ({why}); the tree was restored here (pid {}) from {}",
            r.pid,
            dir.display()
        ),
        Err(e) => anyhow::bail!(
            "the migration failed ({why}), and restoring the tree here from {} failed too: {e}",
            dir.display()
        ),
    }
}
