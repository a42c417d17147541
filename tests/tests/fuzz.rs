//! Fuzzing of every image decoder, bounded so CI runs it on every change:
//! real images are dumped from workloads (open files of every kind and a
//! process tree; memory of random bytes, 64-byte records and zero pages),
//! then each round damages one file (bit flips, truncation, a length field
//! set to an extreme, bytes inserted or overwritten), *re-seals* the
//! inventory with the damaged file's size and checksum (so the damage
//! reaches the decoders instead of being caught by the checksum), and runs
//! everything that reads an image: the restore's loader and cross-checks
//! (`TreeImage::load`, the tree plan, every pages chunk) in this process,
//! and, every few rounds, `cryo image verify` and `cryo image show`.
//!
//! Any panic, hang, crash or error that does not name the file at fault is
//! a failure; the round that found it is printed with its seed so that
//! `CRYO_FUZZ_SEED=<seed> CRYO_FUZZ_ROUNDS=1` replays it. The rounds per
//! image default to 600 (`CRYO_FUZZ_ROUNDS`).
//!
//! The seeds of rounds that once found a bug are kept in [`CORPUS`] and
//! replayed first; real images kept in `tests/corpus` are fuzzed too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryo_engine::restore::image::TreeImage;
use cryo_engine::restore::tree::Plan;
use cryo_image::proto::Inventory;
use cryo_tests::*;

/// Round seeds that found bugs (replayed on every run before the random
/// rounds): none yet for the images of today's workloads.
const CORPUS: &[u64] = &[];

/// A small xorshift generator: the same seed gives the same rounds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// One way to damage a file.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Flip 1 to 8 random bits.
    Flip,
    /// Cut the file at a random offset.
    Truncate,
    /// Overwrite a record length (at a random record of the framing) with
    /// 0, 1, a huge value or the record's length +/- 1.
    Length,
    /// Insert 1 to 64 random bytes at a random offset.
    Insert,
    /// Overwrite 4 or 8 random bytes with an extreme integer.
    Extreme,
}

const OPS: [Op; 5] = [Op::Flip, Op::Truncate, Op::Length, Op::Insert, Op::Extreme];

/// The offsets of the record length fields of an image file (after the
/// 8-byte magic, `[u32 length][body]`); pages files have none.
fn record_offsets(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 8usize;
    while at + 4 <= data.len() {
        out.push(at);
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
        at += 4 + len;
    }
    out
}

fn damage(data: &[u8], op: Op, rng: &mut Rng, pages: bool) -> Vec<u8> {
    let mut d = data.to_vec();
    let len = d.len() as u64;
    match op {
        Op::Flip => {
            for _ in 0..=rng.below(8) {
                if len > 0 {
                    let at = rng.below(len) as usize;
                    d[at] ^= 1 << rng.below(8);
                }
            }
        }
        Op::Truncate => d.truncate(rng.below(len) as usize),
        Op::Length if !pages => {
            let offs = record_offsets(data);
            if let Some(&at) = offs.get(rng.below(offs.len() as u64) as usize) {
                let cur = u32::from_le_bytes(d[at..at + 4].try_into().unwrap_or_default());
                let v = match rng.below(6) {
                    0 => 0,
                    1 => 1,
                    2 => u32::MAX,
                    3 => 0x7fff_ffff,
                    4 => cur.wrapping_add(1),
                    _ => cur.wrapping_sub(1),
                };
                d[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        Op::Length | Op::Extreme => {
            let width = if rng.below(2) == 0 { 4 } else { 8 };
            if len >= width {
                let at = rng.below(len - width + 1) as usize;
                let v: u64 = match rng.below(4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => 1 << 31,
                    _ => rng.next(),
                };
                d[at..at + width as usize].copy_from_slice(&v.to_le_bytes()[..width as usize]);
            }
        }
        Op::Insert => {
            let at = rng.below(len + 1) as usize;
            let n = 1 + rng.below(64) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            d.splice(at..at, bytes);
        }
    }
    d
}

/// Put the damaged file's size and checksum into the inventory (unless
/// the inventory itself was damaged), so that the checksum does not stop
/// the damage before the decoders see it.
fn reseal(dir: &Path, inv: &Inventory, name: &str) {
    let mut inv = inv.clone();
    let (size, xxh3) = cryo_image::hash_file(&dir.join(name)).expect("hash the damaged file");
    for f in inv.files.iter_mut().filter(|f| f.name == name) {
        f.size = size;
        f.xxh3 = xxh3;
    }
    cryo_image::write_inventory(dir, &inv).expect("rewrite the inventory");
}

/// Everything the restore reads, short of making tasks: the image, its
/// cross-checks, the tree plan and every pages chunk. Returns the error
/// text (None: the image was accepted).
fn load_everything(dir: &Path) -> Option<String> {
    let tree = match TreeImage::load(dir) {
        Ok(t) => t,
        Err(e) => return Some(e.to_string()),
    };
    if let Err(e) = Plan::build(&tree) {
        return Some(e.to_string());
    }
    for p in &tree.procs {
        let reader = match p.page_reader() {
            Ok(r) => r,
            Err(e) => return Some(e.to_string()),
        };
        let mut buf = Vec::new();
        for (i, c) in reader.chunks().iter().enumerate() {
            buf.resize(c.nr_pages as usize * 4096, 0);
            if let Err(e) = reader.read_chunk(i, &mut buf) {
                return Some(e.to_string());
            }
        }
    }
    None
}

/// The image tools on the damaged image: any outcome but a panic or a
/// crash is fine, and a failure must name a file.
fn run_tools(dir: &Path) -> Result<(), String> {
    let d = dir.to_str().unwrap_or_default();
    for args in [
        vec!["image", "verify", d],
        vec!["image", "show", d, "--json"],
    ] {
        let out = try_run_cryo(&args, &[], Duration::from_secs(30))
            .map_err(|e| format!("cryo {}: {e}", args.join(" ")))?;
        // `verify` lists the problems on stdout, one per line, by file.
        let err = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr_of(&out)
        );
        if out.status.code().is_none() || out.status.code() == Some(101) || err.contains("panicked")
        {
            return Err(format!(
                "cryo {} crashed or panicked ({:?}):\n{err}",
                args.join(" "),
                out.status
            ));
        }
        if !out.status.success() && !err.contains(".img") && !err.contains("inventory") {
            return Err(format!(
                "cryo {} failed without naming a file:\n{err}",
                args.join(" ")
            ));
        }
    }
    Ok(())
}

/// One round: damage one file of `dir` (seeded by `seed`), check every
/// reader, put the file and the inventory back.
fn round(
    dir: &Path,
    files: &[String],
    inv: &Inventory,
    seed: u64,
    tools: bool,
) -> Result<(), String> {
    // splitmix64 of the seed: neighbouring seeds give unrelated rounds.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut rng = Rng((z ^ (z >> 31)) | 1);
    let name = &files[rng.below(files.len() as u64) as usize];
    let path = dir.join(name);
    let orig = std::fs::read(&path).map_err(|e| format!("read {name}: {e}"))?;
    let inv_path = dir.join("inventory.img");
    let inv_orig = std::fs::read(&inv_path).map_err(|e| format!("read the inventory: {e}"))?;
    let op = OPS[rng.below(OPS.len() as u64) as usize];
    let pages = name.starts_with("pages-");
    let damaged = damage(&orig, op, &mut rng, pages);
    let what = format!(
        "round {seed:#x}: {op:?} on {name} ({} -> {} bytes)",
        orig.len(),
        damaged.len()
    );
    std::fs::write(&path, &damaged).map_err(|e| format!("write {name}: {e}"))?;
    if name != "inventory.img" {
        reseal(dir, inv, name);
    }
    let loaded = std::panic::catch_unwind(|| load_everything(dir));
    let tools_result = if tools { run_tools(dir) } else { Ok(()) };
    std::fs::write(&path, &orig).map_err(|e| format!("put back {name}: {e}"))?;
    std::fs::write(&inv_path, &inv_orig).map_err(|e| format!("put back the inventory: {e}"))?;
    match loaded {
        Err(_) => return Err(format!("{what}: the loader panicked")),
        Ok(Some(err)) if !err.contains(".img") && !err.contains("inventory") => {
            return Err(format!("{what}: the error names no file: {err}"))
        }
        Ok(_) => {}
    }
    tools_result.map_err(|e| format!("{what}: {e}"))
}

/// Dump `wl` (left running), then kill it: a seed image.
fn seed_image(wl: &mut Workload, dir: &TestDir, name: &str) -> PathBuf {
    let img = dir.subdir(name);
    dump_ok(wl, &img, &["-R"]);
    img
}

fn fuzz_image(img: &Path) {
    assert!(
        load_everything(img).is_none(),
        "the undamaged image {} does not load",
        img.display()
    );
    let inv = cryo_image::read_inventory(img).expect("read the inventory");
    let mut files: Vec<String> = inv.files.iter().map(|f| f.name.clone()).collect();
    files.push("inventory.img".into());
    let rounds: u64 = std::env::var("CRYO_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let first: u64 = std::env::var("CRYO_FUZZ_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x5eed_0000);
    // A hang shows as no progress for a minute.
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    let watchdog = std::thread::spawn(move || {
        let mut last = (0, Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let p = seen.load(Ordering::Relaxed);
            if p == u64::MAX {
                return None;
            }
            if p != last.0 {
                last = (p, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(60) {
                return Some(p);
            }
        }
    });
    let seeds = CORPUS.iter().copied().chain((0..rounds).map(|i| first + i));
    let mut failures = Vec::new();
    for (i, seed) in seeds.enumerate() {
        if let Err(e) = round(img, &files, &inv, seed, i % 8 == 0) {
            failures.push(e);
        }
        progress.store(i as u64 + 1, Ordering::Relaxed);
    }
    progress.store(u64::MAX, Ordering::Relaxed);
    if let Ok(Some(at)) = watchdog.join() {
        panic!("a round after {at} made no progress for a minute (a hang)");
    }
    assert!(
        load_everything(img).is_none(),
        "the image was not put back after the rounds"
    );
    assert!(
        failures.is_empty(),
        "{} of the rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fuzz_images_of_open_files_and_a_tree() {
    let dir = TestDir::new();
    let tmp = dir.subdir("tmp");
    let mut wl = Workload::start("wl_fds", &["--tmp", tmp.to_str().expect("utf-8")], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = seed_image(&mut wl, &dir, "img");
    drop(guard);
    fuzz_image(&img);
}

#[test]
fn fuzz_images_of_memory_with_records() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "4"], &dir);
    let img = seed_image(&mut wl, &dir, "img");
    fuzz_image(&img);
}

/// The images kept in `tests/corpus` (real images dumped by an earlier
/// build: a `sleep`), fuzzed like the live ones on a copy. They do not
/// depend on today's workloads, and an incompatible change of the image
/// format shows here as an undamaged image that no longer loads.
#[test]
fn fuzz_the_stored_corpus() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let dir = TestDir::new();
    let mut images = 0;
    let entries =
        std::fs::read_dir(&corpus).unwrap_or_else(|e| panic!("read_dir {}: {e}", corpus.display()));
    for e in entries.flatten() {
        if !e.path().join("inventory.img").is_file() {
            continue;
        }
        let copy = dir.join(&e.file_name().to_string_lossy());
        copy_dir(&e.path(), &copy);
        eprintln!("fuzzing the stored image {}", e.path().display());
        fuzz_image(&copy);
        images += 1;
    }
    assert!(images > 0, "no image in {}", corpus.display());
}
