//! cryo: checkpoint and restore Linux processes.

mod check;
mod dump;
mod image;
mod migrate;
mod pageserver;
mod predump;
mod restore;
mod swrk;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cryo",
    version,
    about = "Checkpoint and restore Linux processes"
)]
struct Cli {
    /// More logging (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Write the log to this file instead of stderr.
    #[arg(short = 'o', long = "log-file", global = true)]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checkpoint a running process into an image directory.
    Dump(dump::DumpArgs),
    /// Copy the memory of a running process tree into an image that a
    /// later dump takes as its parent (--prev-images-dir); it runs on.
    PreDump(predump::PreDumpArgs),
    /// Restore a process from an image directory.
    Restore(restore::RestoreArgs),
    /// Move a running tree to another host (pre-copy rounds, a short stop,
    /// the restore there by its `cryo page-server --restore`).
    Migrate(migrate::MigrateArgs),
    /// Receive images from dump or pre-dump --page-server over TCP.
    PageServer(pageserver::PageServerArgs),
    /// CRIU's RPC service on the socket FD (what runc and crun start as
    /// `criu swrk FD`).
    Swrk {
        /// The SOCK_SEQPACKET socket the caller passed.
        fd: i32,
    },
    /// Keeps a pre-dump's tracking of written pages (started by pre-dump).
    #[command(hide = true)]
    TrackHold(predump::TrackHoldArgs),
    /// Report which kernel features cryo relies on are present.
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, decode, encode or verify an image.
    Image(image::ImageArgs),
}

fn init_logging(verbose: u8, file: Option<&PathBuf>, swrk: bool) -> anyhow::Result<()> {
    let level = match verbose {
        0 if swrk => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRYO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match file {
        // The RPC service writes where each request's log_file says (in
        // its work directory), and to stderr before one names it.
        _ if swrk => builder
            .with_ansi(false)
            .with_writer(|| swrk::LogSink)
            .init(),
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("opening log file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = init_logging(
        cli.verbose,
        cli.log_file.as_ref(),
        matches!(cli.cmd, Cmd::Swrk { .. }),
    ) {
        eprintln!("cryo: {e:#}");
        std::process::exit(1);
    }
    let res = match cli.cmd {
        Cmd::Dump(a) => dump::run(a),
        Cmd::PreDump(a) => predump::run(a),
        Cmd::TrackHold(a) => predump::hold(a),
        Cmd::PageServer(a) => pageserver::run(a),
        Cmd::Migrate(a) => migrate::run(a),
        Cmd::Swrk { fd } => swrk::run(fd),
        Cmd::Restore(a) => restore::run(a),
        Cmd::Check { json } => check::run(json),
        Cmd::Image(a) => image::run(a),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if cli.log_file.is_some() {
                tracing::error!("{e:#}");
            }
            eprintln!("cryo: error: {e:#}");
            std::process::exit(1);
        }
    }
}
