//! `cryo image`: inspect, convert and check image directories.
//!
//! - `show DIR [--json]`: what the image holds: the process tree (zombies
//!   with their exit status), then task by task.
//! - `decode FILE`: any image file as `{"kind", "records"}` JSON (proto3
//!   canonical JSON per record); a summary for pages files.
//! - `encode`: that JSON on stdin back to the binary file on stdout.
//! - `verify DIR`: framing, inventory, page checksums and cross-references;
//!   reports every problem.
//! - `core DIR -O OUTDIR`: an ELF core file per live process (`core.<pid>`),
//!   for gdb and other core-file tools; pages kept in a parent's image are
//!   read from there.
//! - `diff DIR1 DIR2 [--json]`: what changed between two checkpoints of the
//!   same workload (tasks, mappings, stored pages, descriptors, registers).

mod codec;
mod core;
mod diff;
mod load;
mod show;
mod task;
mod verify;

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Summarise an image: process tree (zombies too), memory, descriptors, core state, files.
    Show {
        /// Image directory.
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print an image file as JSON ({"kind", "records"}; a summary for pages files).
    Decode {
        /// Image file.
        file: PathBuf,
    },
    /// Read `cryo image decode` JSON on stdin and write the binary file.
    Encode {
        /// Write here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check an image thoroughly and report every problem found.
    Verify {
        /// Image directory.
        dir: PathBuf,
    },
    /// Write an ELF core file per live process (`core.<pid>`) for gdb and readelf.
    Core {
        /// Image directory.
        dir: PathBuf,
        /// Directory for the core files (created if missing).
        #[arg(short = 'O', long = "output-dir")]
        output_dir: PathBuf,
    },
    /// Show what changed between two images of the same workload.
    Diff {
        /// The older image directory.
        dir1: PathBuf,
        /// The newer image directory.
        dir2: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `cryo image ...`; returns the exit code.
pub fn run(a: ImageArgs) -> anyhow::Result<i32> {
    match a.cmd {
        ImageCmd::Show { dir, json } => show::run(&dir, json),
        ImageCmd::Decode { file } => codec::decode(&file),
        ImageCmd::Encode { output } => codec::encode(output.as_deref()),
        ImageCmd::Verify { dir } => verify::run(&dir),
        ImageCmd::Core { dir, output_dir } => core::run(&dir, &output_dir),
        ImageCmd::Diff { dir1, dir2, json } => diff::run(&dir1, &dir2, json),
    }
}
