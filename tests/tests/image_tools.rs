//! `cryo image show / decode / encode / verify` on real dumps taken in
//! leave-running mode; the workloads must still pass their own checks
//! afterwards.
//!
//! - `image_show_decode_encode_verify`: all four on `wl_single`.
//! - `image_show_threads`: `show` of `wl_threads --spinners 2` carries the
//!   pid, every tid (leader first) and one thread entry per tid, the
//!   process-wide state on the leader's.
//! - `image_verify_threads`: `verify` passes on that image and names the
//!   non-leader `core-<tid>.img` that is deleted, has a byte flipped, or
//!   (inventory fixed up) is gone or holds another thread.
//! - `image_decode_encode_threads`: decode | encode is byte-identical for
//!   every file of that image, one core file per thread among them.
//! - `image_show_tree`: `show --json` of a `wl_tree` dump carries every
//!   pid of the tree with the ppid, pgid, sid and threads /proc gave before
//!   the dump, marks the zombies with their exit status (7, 42, SIGUSR2),
//!   and shows the copy-on-write buffer of every child as its parent's
//!   pages; the text form lists the tree and the zombies.
//! - `image_verify_tree`: `verify` passes on that image (in-parent runs are
//!   not counted against the chunks) and names the damaged file: a child's
//!   pagemap with a byte flipped; the root's pages file deleted (and every
//!   child whose pages are stored there); a child whose parent is made a
//!   zombie, so that its in-parent pages have no live parent.
//! - `image_decode_encode_tree`: decode | encode is byte-identical for every
//!   metadata file of that image; zombies have no per-process files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cryo_image::json::serde_json::{self, Value};
use cryo_image::proto::{PagemapHead, PagemapRecord};
use cryo_image::{ImageReader, Kind};
use cryo_tests::*;

fn cryo_ok(args: &[&str]) -> Output {
    let out = run_cryo(args, &[]);
    assert_cryo_ok(&out, &format!("cryo {}", args.join(" ")));
    out
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `cryo image decode FILE` into `json`.
fn decode_to(file: &Path, json: &Path) -> Value {
    let out = cryo_ok(&["image", "decode", path_str(file)]);
    std::fs::write(json, &out.stdout).unwrap_or_else(|e| panic!("write {}: {e}", json.display()));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("decode of {} is not JSON: {e}", file.display()))
}

/// `cryo image encode < json > out`; stdin and stdout are files.
fn encode(json: &Path, out: &Path) {
    let err = PathBuf::from(format!("{}.err", out.display()));
    let mut child = Command::new(cryo_bin())
        .args(["image", "encode"])
        .stdin(File::open(json).unwrap_or_else(|e| panic!("open {}: {e}", json.display())))
        .stdout(File::create(out).unwrap_or_else(|e| panic!("create {}: {e}", out.display())))
        .stderr(File::create(&err).expect("create stderr file"))
        .spawn()
        .expect("spawn cryo image encode");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for cryo image encode") {
            break st;
        }
        if start.elapsed() > CRYO_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cryo image encode < {} hung; killed it", json.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    assert!(
        status.success(),
        "cryo image encode < {} failed ({status}):\n{stderr}",
        json.display()
    );
}

/// Offset and length of the first chunk of a pagemap.
fn first_chunk(img: &Path, pid: u32) -> (u64, u64) {
    let mut r = ImageReader::open(img, &cryo_image::pagemap_file(pid), Kind::Pagemap)
        .expect("open pagemap");
    let _head: PagemapHead = r.next().expect("read head").expect("pagemap head");
    while let Some(rec) = r.next::<PagemapRecord>().expect("read pagemap record") {
        if let Some(cryo_image::proto::pagemap_record::Record::Chunk(c)) = rec.record {
            return (c.offset, u64::from(c.stored_len));
        }
    }
    panic!("pagemap of {pid} has no chunk");
}

/// Runs `cryo image verify` on `img` and expects it to fail cleanly (exit
/// status 1) naming `file`. Returns its problem lines.
fn expect_verify_fails(img: &Path, file: &str, case: &str) -> Vec<String> {
    let out = run_cryo(&["image", "verify", path_str(img)], &[]);
    let text = format!("{}{}", stdout_of(&out), stderr_of(&out));
    eprintln!("{case}:\n{text}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: verify should exit 1:\n{text}"
    );
    assert!(!text.contains("panicked at"), "{case}: panic:\n{text}");
    let lines: Vec<String> = stdout_of(&out).lines().map(str::to_string).collect();
    assert!(
        lines.iter().any(|l| l.contains(file)),
        "{case}: no problem names {file}:\n{text}"
    );
    lines
}

/// decode | encode of every file of `img` but the pages files (decoded as
/// a summary only) gives back the identical bytes; the JSON and re-encoded
/// files go to `work`. Returns the names of the files round-tripped.
fn assert_decode_encode_identical(img: &Path, work: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for name in file_names(img) {
        let file = img.join(&name);
        let json = work.join(format!("{name}.json"));
        if name.starts_with("pages-") {
            let doc = decode_to(&file, &json);
            assert_eq!(doc["kind"], "pages", "{doc:#}");
            assert_eq!(doc["header_ok"], true, "{doc:#}");
            assert!(
                doc["pagemap"]["chunks"].as_u64().unwrap_or(0) > 0,
                "{doc:#}"
            );
            continue;
        }
        let doc = decode_to(&file, &json);
        assert!(doc["records"].is_array(), "{name}: {doc:#}");
        let back = work.join(format!("{name}.bin"));
        encode(&json, &back);
        let a = std::fs::read(&file).expect("read original");
        let b = std::fs::read(&back).expect("read re-encoded");
        assert!(
            a == b,
            "{name}: decode | encode differs from the original ({} vs {} bytes)",
            a.len(),
            b.len()
        );
        done.push(name);
    }
    done
}

/// The tids of a live process (`/proc/PID/task`), sorted.
fn task_tids(pid: i32) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/task: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Starts `wl_threads --spinners 2` and dumps it with `-R` into
/// `<dir>/img`. Returns the workload, the image and the process's tids
/// (sorted, read before the dump and checked unchanged after it).
fn dump_threads(dir: &TestDir) -> (Workload, PathBuf, Vec<u32>) {
    let mut wl = Workload::start("wl_threads", &["--spinners", "2"], dir);
    let pid = wl.pid();
    let tids = task_tids(pid);
    assert_eq!(tids.len(), 5, "main, waiter, sleeper, 2 spinners: {tids:?}");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    assert_eq!(task_tids(pid), tids, "the threads changed during the dump");
    (wl, img, tids)
}

#[test]
fn image_show_decode_encode_verify() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let upid = pid as u32;
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);

    // (a) show --json
    let out = cryo_ok(&["image", "show", path_str(&img), "--json"]);
    let show: Value = serde_json::from_slice(&out.stdout).expect("show --json is JSON");
    let procs = show["processes"].as_array().expect("processes array");
    assert_eq!(procs.len(), 1, "one process: {show:#}");
    let p = &procs[0];
    assert_eq!(p["pid"].as_i64(), Some(i64::from(pid)), "pid: {p:#}");
    assert_eq!(p["threads"], serde_json::json!([pid]), "threads: {p:#}");
    let maps = p["mm"]["mappings"].as_array().expect("mappings");
    assert!(
        maps.iter()
            .any(|m| m["pages_stored"].as_u64().unwrap_or(0) > 0),
        "no mapping has stored pages: {maps:#?}"
    );
    let fds: Vec<u64> = p["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(|f| f["fd"].as_u64())
        .collect();
    for fd in [0, 1, 2] {
        assert!(fds.contains(&fd), "fd {fd} missing from {fds:?}");
    }
    assert!(show["pages_stored"].as_u64().unwrap_or(0) > 0, "{show:#}");
    assert!(show["compression_ratio"].as_f64().unwrap_or(0.0) > 0.0);
    // The text form works too and names the process.
    let out = cryo_ok(&["image", "show", path_str(&img)]);
    assert!(stdout_of(&out).contains(&pid.to_string()));

    // (b) decode | encode is byte-identical for every metadata file.
    let work = dir.subdir("json");
    assert_decode_encode_identical(&img, &work);

    // (c) verify: pristine, then damaged copies.
    let out = cryo_ok(&["image", "verify", path_str(&img)]);
    assert!(
        stdout_of(&out).starts_with("ok: "),
        "verify: {}",
        stdout_of(&out)
    );

    let pages = cryo_image::pages_file(upid);
    let mm = cryo_image::mm_file(upid);
    let pagemap = cryo_image::pagemap_file(upid);

    // A flipped byte inside a page chunk.
    let copy = dir.join("flip");
    copy_dir(&img, &copy);
    let (off, len) = first_chunk(&copy, upid);
    let mut data = std::fs::read(copy.join(&pages)).expect("read pages");
    data[(off + len / 2) as usize] ^= 0x5a;
    std::fs::write(copy.join(&pages), data).expect("write pages");
    let lines = expect_verify_fails(&copy, &pages, "flipped page byte");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&pages) && l.contains("chunk")),
        "flipped page byte: no chunk problem reported: {lines:#?}"
    );

    // A truncated mm file.
    let copy = dir.join("truncmm");
    copy_dir(&img, &copy);
    let data = std::fs::read(copy.join(&mm)).expect("read mm");
    std::fs::write(copy.join(&mm), &data[..data.len() / 2]).expect("write mm");
    expect_verify_fails(&copy, &mm, "truncated mm");

    // A file the inventory does not list.
    let copy = dir.join("extra");
    copy_dir(&img, &copy);
    std::fs::write(copy.join("stray.img"), b"CRYOJUNK").expect("write stray file");
    expect_verify_fails(&copy, "stray.img", "unlisted file");

    // A pagemap run moved outside every mapping, the inventory fixed up so
    // that only the cross-reference is wrong.
    let copy = dir.join("moved");
    copy_dir(&img, &copy);
    let json = work.join("moved-pagemap.json");
    let mut doc = decode_to(&copy.join(&pagemap), &json);
    let run = doc["records"]
        .as_array_mut()
        .expect("records")
        .iter_mut()
        .find(|r| r.get("run").is_some())
        .expect("a run record");
    // Page 1 of the address space: below mmap_min_addr, never mapped.
    run["run"]["vaddr"] = Value::String("4096".into());
    std::fs::write(&json, serde_json::to_vec(&doc).expect("serialize")).expect("write json");
    encode(&json, &copy.join(&pagemap));
    let mut inv = cryo_image::read_inventory(&copy).expect("read inventory");
    for f in &mut inv.files {
        let (size, hash) = cryo_image::hash_file(&copy.join(&f.name)).expect("hash");
        f.size = size;
        f.xxh3 = hash;
    }
    cryo_image::write_inventory(&copy, &inv).expect("write inventory");
    let lines = expect_verify_fails(&copy, &pagemap, "moved run");
    assert!(
        lines.iter().all(|l| l.contains(&pagemap)),
        "moved run: problems beyond the pagemap: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("outside every mapping")),
        "moved run: {lines:#?}"
    );

    // files.img deleted.
    let copy = dir.join("nofiles");
    copy_dir(&img, &copy);
    std::fs::remove_file(copy.join(cryo_image::FILES_FILE)).expect("rm files.img");
    expect_verify_fails(&copy, cryo_image::FILES_FILE, "deleted files.img");

    // (d) The workload was left running and still passes its own checks.
    match wl.terminate_and_verdict() {
        Ok(v) if v.passed() => {}
        Ok(v) => panic!(
            "workload verdict {:?}, exit {:?}\nlog:\n{}",
            v.text,
            v.exit,
            wl.log_text()
        ),
        Err(e) => panic!("{e}\nlog:\n{}", wl.log_text()),
    }
}

#[test]
fn image_show_threads() {
    let dir = TestDir::new();
    let (mut wl, img, tids) = dump_threads(&dir);
    let pid = wl.pid();
    let upid = pid as u32;

    let out = cryo_ok(&["image", "show", path_str(&img), "--json"]);
    let show: Value = serde_json::from_slice(&out.stdout).expect("show --json is JSON");
    let procs = show["processes"].as_array().expect("processes array");
    assert_eq!(procs.len(), 1, "one process: {show:#}");
    let p = &procs[0];
    assert_eq!(p["pid"].as_u64(), Some(u64::from(upid)), "pid: {p:#}");
    let threads: Vec<u32> = p["threads"]
        .as_array()
        .unwrap_or_else(|| panic!("threads: {p:#}"))
        .iter()
        .map(|t| t.as_u64().expect("tid") as u32)
        .collect();
    assert_eq!(threads.first(), Some(&upid), "leader first: {threads:?}");
    let mut sorted = threads.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, tids, "threads of the image vs /proc/{pid}/task");

    // One thread entry per tid, in the threads' order, each its own.
    let cores = p["cores"].as_array().expect("cores array");
    let core_tids: Vec<u32> = cores
        .iter()
        .map(|c| c["tid"].as_u64().expect("tid") as u32)
        .collect();
    assert_eq!(core_tids, threads, "one core per thread: {cores:#?}");
    let mut comms: Vec<&str> = cores
        .iter()
        .map(|c| c["comm"].as_str().expect("comm"))
        .collect();
    assert_eq!(comms[0], "wl_threads", "the leader's name: {cores:#?}");
    comms.sort_unstable();
    assert_eq!(
        comms,
        ["sleeper", "spinner-0", "spinner-1", "waiter", "wl_threads"],
        "thread names: {cores:#?}"
    );
    for c in cores {
        let tid = c["tid"].as_u64().expect("tid");
        let comm = c["comm"].as_str().unwrap_or_default();
        let live = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_else(|e| panic!("read comm of {tid}: {e}"));
        assert_eq!(comm, live.trim_end(), "thread {tid}: name vs /proc");
        assert!(
            c["xsave_bytes"].as_u64().unwrap_or(0) >= 576,
            "thread {tid} ({comm}): {c:#}"
        );
        assert!(c["creds"].is_object(), "thread {tid} ({comm}): {c:#}");
    }
    // Every thread has a stack of its own.
    let mut rsps: Vec<&str> = cores.iter().filter_map(|c| c["rsp"].as_str()).collect();
    rsps.sort_unstable();
    rsps.dedup();
    assert_eq!(
        rsps.len(),
        tids.len(),
        "distinct stack pointers: {cores:#?}"
    );
    // The process-wide state is the leader's.
    assert!(p["process"].is_object(), "process state: {p:#}");
    // Its namespaces, as /proc says (the workload shares cryo's).
    for kind in ["ipc", "mnt", "net", "pid", "user", "uts"] {
        let link = std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("ns link");
        let inode: u64 = link
            .to_string_lossy()
            .split_once(":[")
            .and_then(|(_, r)| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
            .expect("ns inode");
        let listed = p["process"]["namespaces"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["kind"] == kind && n["inode"] == inode));
        assert!(
            listed,
            "namespace {kind}:[{inode}] not shown: {:#}",
            p["process"]
        );
    }
    assert!(p["credentials"].is_object(), "credentials: {p:#}");
    assert_eq!(
        show["inventory"]["root_pid"].as_u64(),
        Some(u64::from(upid))
    );

    // The text form lists the threads and a line for each.
    let out = cryo_ok(&["image", "show", path_str(&img)]);
    let text = stdout_of(&out);
    let list = threads
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    assert!(text.contains(&list), "no thread list {list}:\n{text}");
    for tid in &tids {
        assert_eq!(
            text.lines()
                .filter(|l| l.trim_start().starts_with(&format!("thread {tid} ")))
                .count(),
            1,
            "one line for thread {tid}:\n{text}"
        );
    }

    wl.assert_pass("wl_threads after dump -R and image show");
}

#[test]
fn image_verify_threads() {
    let dir = TestDir::new();
    let (mut wl, img, tids) = dump_threads(&dir);
    let upid = wl.pid() as u32;

    let out = cryo_ok(&["image", "verify", path_str(&img)]);
    let text = stdout_of(&out);
    assert!(text.starts_with("ok: "), "verify: {text}");
    let names = file_names(&img);
    for tid in &tids {
        let core = cryo_image::core_file(*tid);
        assert!(names.contains(&core), "{core} missing from {names:?}");
    }

    // A non-leader thread's core, and another one to check that only the
    // damaged file is blamed.
    let victim = *tids.iter().find(|&&t| t != upid).expect("a non-leader");
    let core = cryo_image::core_file(victim);
    let only_victim = |lines: &[String], case: &str| {
        assert!(
            lines.iter().all(|l| l.contains(&core)),
            "{case}: problems beyond {core}: {lines:#?}"
        );
    };

    // Deleted.
    let copy = dir.join("nocore");
    copy_dir(&img, &copy);
    std::fs::remove_file(copy.join(&core)).expect("rm core");
    let lines = expect_verify_fails(&copy, &core, "deleted thread core");
    only_victim(&lines, "deleted thread core");

    // A byte flipped in the middle.
    let copy = dir.join("flipcore");
    copy_dir(&img, &copy);
    let mut data = std::fs::read(copy.join(&core)).expect("read core");
    let mid = data.len() / 2;
    data[mid] ^= 0x5a;
    std::fs::write(copy.join(&core), data).expect("write core");
    let lines = expect_verify_fails(&copy, &core, "flipped thread core byte");
    only_victim(&lines, "flipped thread core byte");

    // Deleted, and taken out of the inventory: pstree still lists the
    // thread, so its core is missing.
    let copy = dir.join("nocore-inv");
    copy_dir(&img, &copy);
    std::fs::remove_file(copy.join(&core)).expect("rm core");
    let mut inv = cryo_image::read_inventory(&copy).expect("read inventory");
    inv.files.retain(|f| f.name != core);
    cryo_image::write_inventory(&copy, &inv).expect("write inventory");
    let lines = expect_verify_fails(&copy, &core, "thread core gone from the image");
    only_victim(&lines, "thread core gone from the image");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("missing") && l.contains(&format!("thread {victim}"))),
        "thread core gone from the image: {lines:#?}"
    );

    // The core holds another thread (the leader's tid), the inventory
    // fixed up so that only the cross-check is wrong.
    let copy = dir.join("wrongtid");
    copy_dir(&img, &copy);
    let work = dir.subdir("json");
    let json = work.join("wrongtid-core.json");
    let mut doc = decode_to(&copy.join(&core), &json);
    let rec = doc["records"]
        .as_array_mut()
        .expect("records")
        .first_mut()
        .expect("a core record");
    assert_eq!(rec["tid"].as_u64(), Some(u64::from(victim)), "{rec:#}");
    rec["tid"] = serde_json::json!(upid);
    std::fs::write(&json, serde_json::to_vec(&doc).expect("serialize")).expect("write json");
    encode(&json, &copy.join(&core));
    let mut inv = cryo_image::read_inventory(&copy).expect("read inventory");
    for f in &mut inv.files {
        let (size, hash) = cryo_image::hash_file(&copy.join(&f.name)).expect("hash");
        f.size = size;
        f.xxh3 = hash;
    }
    cryo_image::write_inventory(&copy, &inv).expect("write inventory");
    let lines = expect_verify_fails(&copy, &core, "core of another thread");
    only_victim(&lines, "core of another thread");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("holds thread {upid}, expected {victim}"))),
        "core of another thread: {lines:#?}"
    );

    wl.assert_pass("wl_threads after dump -R and image verify");
}

#[test]
fn image_decode_encode_threads() {
    let dir = TestDir::new();
    let (mut wl, img, tids) = dump_threads(&dir);
    let work = dir.subdir("json");
    let done = assert_decode_encode_identical(&img, &work);
    let mut cores: Vec<String> = done
        .iter()
        .filter(|n| n.starts_with("core-"))
        .cloned()
        .collect();
    cores.sort();
    let mut want: Vec<String> = tids.iter().map(|t| cryo_image::core_file(*t)).collect();
    want.sort();
    assert_eq!(cores, want, "one core file per thread");
    for tid in &tids {
        let core = cryo_image::core_file(*tid);
        assert!(done.contains(&core), "{core} not round-tripped: {done:?}");
        // Each decoded core is its own thread's.
        let json = std::fs::read(work.join(format!("{core}.json"))).expect("read json");
        let doc: Value = serde_json::from_slice(&json).expect("decode output is JSON");
        assert_eq!(
            doc["records"][0]["tid"].as_u64(),
            Some(u64::from(*tid)),
            "{core}: {doc:#}"
        );
    }
    for name in [
        cryo_image::PSTREE_FILE.to_string(),
        cryo_image::mm_file(wl.pid() as u32),
        cryo_image::pagemap_file(wl.pid() as u32),
    ] {
        assert!(done.contains(&name), "{name} not round-tripped: {done:?}");
    }
    wl.assert_pass("wl_threads after dump -R and decode/encode");
}

/// (ppid, pgid, sid, zombie) of a process from /proc/PID/stat.
fn stat_ids(pid: i32) -> (u32, u32, u32, bool) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    let rest: Vec<&str> = s[s.rfind(')').expect("comm end") + 1..]
        .split_whitespace()
        .collect();
    let n = |i: usize| -> u32 {
        rest[i]
            .parse()
            .unwrap_or_else(|e| panic!("/proc/{pid}/stat field {i}: {e}"))
    };
    (n(1), n(2), n(3), rest[0] == "Z")
}

/// What /proc said about one process of the tree before the dump.
#[derive(Debug)]
struct Seen {
    pid: u32,
    ppid: u32,
    pgid: u32,
    sid: u32,
    zombie: bool,
    /// Sorted; empty for zombies.
    tids: Vec<u32>,
}

/// Starts `wl_tree`, reads every process of the tree from /proc, dumps it
/// with `-R` into `<dir>/img` and checks the tree did not change.
fn dump_tree(dir: &TestDir) -> (Workload, TreeGuard, PathBuf, Vec<Seen>) {
    let mut wl = Workload::start("wl_tree", &[], dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let seen = |pids: &[i32]| -> Vec<Seen> {
        let mut v: Vec<Seen> = pids
            .iter()
            .map(|&pid| {
                let (ppid, pgid, sid, zombie) = stat_ids(pid);
                Seen {
                    pid: pid as u32,
                    ppid,
                    pgid,
                    sid,
                    zombie,
                    tids: if zombie { Vec::new() } else { task_tids(pid) },
                }
            })
            .collect();
        v.sort_by_key(|s| s.pid);
        v
    };
    let before = seen(guard.pids());
    assert!(
        before.len() >= 12 && before.iter().filter(|s| s.zombie).count() == 3,
        "setup: {before:#?}"
    );
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    let after = seen(&tree_pids(wl.pid()));
    assert_eq!(
        format!("{after:?}"),
        format!("{before:?}"),
        "the tree changed during the dump"
    );
    (wl, guard, img, before)
}

fn show_json(img: &Path) -> Value {
    let out = cryo_ok(&["image", "show", path_str(img), "--json"]);
    serde_json::from_slice(&out.stdout).expect("show --json is JSON")
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}")) as u32
}

/// A live process of the tree other than the root that has no children.
fn leaf_child(seen: &[Seen], root: u32) -> u32 {
    seen.iter()
        .find(|s| {
            s.pid != root && !s.zombie && !seen.iter().any(|c| c.ppid == s.pid && c.pid != s.pid)
        })
        .map(|s| s.pid)
        .expect("a live leaf child")
}

/// Brings every size and checksum of the inventory up to date with the
/// files, so that only the cross-checks see a change.
fn fix_inventory(img: &Path) {
    let mut inv = cryo_image::read_inventory(img).expect("read inventory");
    for f in &mut inv.files {
        let (size, hash) = cryo_image::hash_file(&img.join(&f.name)).expect("hash");
        f.size = size;
        f.xxh3 = hash;
    }
    cryo_image::write_inventory(img, &inv).expect("write inventory");
}

#[test]
fn image_show_tree() {
    let dir = TestDir::new();
    let (mut wl, _guard, img, seen) = dump_tree(&dir);
    let root = wl.pid() as u32;

    let show = show_json(&img);
    let procs = show["processes"].as_array().expect("processes array");
    let mut pids: Vec<u32> = procs.iter().map(|p| u32_of(&p["pid"])).collect();
    assert_eq!(u32_of(&procs[0]["pid"]), root, "the root first: {show:#}");
    pids.sort_unstable();
    let want: Vec<u32> = seen.iter().map(|s| s.pid).collect();
    assert_eq!(pids, want, "the pids of the image vs the tree in /proc");
    assert_eq!(show["zombies"].as_u64(), Some(3), "{show:#}");
    assert_eq!(
        show["live_processes"].as_u64(),
        Some(seen.iter().filter(|s| !s.zombie).count() as u64)
    );

    let mut exits = Vec::new();
    for s in &seen {
        let p = procs
            .iter()
            .find(|p| u32_of(&p["pid"]) == s.pid)
            .expect("process in show");
        let ctx = format!("process {}: {s:?} vs {p:#}", s.pid);
        assert_eq!(u32_of(&p["pgid"]), s.pgid, "pgid of {ctx}");
        assert_eq!(u32_of(&p["sid"]), s.sid, "sid of {ctx}");
        assert_eq!(u32_of(&p["ppid"]), s.ppid, "ppid of {ctx}");
        assert_eq!(p["zombie"].as_bool(), Some(s.zombie), "zombie of {ctx}");
        // Every child of this process is listed under it.
        let mut kids: Vec<u32> = p["children"]
            .as_array()
            .unwrap_or_else(|| panic!("children of {ctx}"))
            .iter()
            .map(u32_of)
            .collect();
        kids.sort_unstable();
        let want: Vec<u32> = seen
            .iter()
            .filter(|c| c.ppid == s.pid && c.pid != root)
            .map(|c| c.pid)
            .collect();
        assert_eq!(kids, want, "children of {ctx}");
        if s.zombie {
            assert!(p["exit_status"].is_u64(), "{ctx}");
            assert!(p.get("mm").is_none(), "a zombie has no memory: {ctx}");
            let e = &p["exit"];
            exits.push(match (e["code"].as_u64(), e["signal"].as_u64()) {
                (Some(c), None) => format!("code {c}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => panic!("exit of {ctx}"),
            });
            continue;
        }
        let mut threads: Vec<u32> = p["threads"]
            .as_array()
            .unwrap_or_else(|| panic!("threads of {ctx}"))
            .iter()
            .map(u32_of)
            .collect();
        assert_eq!(threads.first(), Some(&s.pid), "leader first: {ctx}");
        threads.sort_unstable();
        assert_eq!(threads, s.tids, "threads of {ctx}");
        assert_eq!(
            p["cores"].as_array().map(Vec::len),
            Some(s.tids.len()),
            "one core per thread: {ctx}"
        );
        // The 4 MiB copy-on-write buffer: stored by the root, the parent's
        // pages in every child (1024 pages at least, in one mapping).
        let maps = p["mm"]["mappings"].as_array().expect("mappings");
        let pm = &p["pagemap"];
        let stored: u64 = maps
            .iter()
            .map(|m| m["pages_stored"].as_u64().expect("pages_stored"))
            .sum();
        let parent: u64 = maps
            .iter()
            .map(|m| m["pages_in_parent"].as_u64().expect("pages_in_parent"))
            .sum();
        assert_eq!(pm["pages_stored"].as_u64(), Some(stored), "{ctx}");
        assert_eq!(pm["pages_in_parent"].as_u64(), Some(parent), "{ctx}");
        let biggest = |k: &str| maps.iter().filter_map(|m| m[k].as_u64()).max().unwrap_or(0);
        if s.pid == root {
            assert_eq!(parent, 0, "the root has no parent in the image: {ctx}");
            assert!(biggest("pages_stored") >= 1024, "the root's buffer: {ctx}");
        } else {
            assert!(
                biggest("pages_in_parent") >= 1024,
                "the buffer is the parent's pages: {ctx}"
            );
            assert!(
                stored < 256,
                "a child stores only what it wrote ({stored} pages): {ctx}"
            );
            // Those pages are the root's, wherever the child sits.
            let from = pm["in_parent_from"].as_array().expect("in_parent_from");
            let of_root: u64 = from
                .iter()
                .filter(|f| f["pid"].as_u64() == Some(u64::from(root)))
                .map(|f| f["pages"].as_u64().unwrap_or(0))
                .sum();
            assert!(of_root >= 1024, "{ctx}");
        }
    }
    exits.sort();
    let want = vec![
        "code 42".to_string(),
        "code 7".to_string(),
        format!("signal {}", libc::SIGUSR2),
    ];
    assert_eq!(exits, want, "exit statuses of the zombies");
    assert!(show["pages_in_parent"].as_u64().unwrap_or(0) >= 8 * 1024);

    // The text form: one line per process in the tree, zombies marked, a
    // section for every live process only.
    let out = cryo_ok(&["image", "show", path_str(&img)]);
    let text = stdout_of(&out);
    let tree: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("process tree:"))
        .skip(2)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(tree.len(), seen.len(), "tree lines:\n{text}");
    for s in &seen {
        let line = tree
            .iter()
            .find(|l| l.split_whitespace().next() == Some(&s.pid.to_string()))
            .unwrap_or_else(|| panic!("no tree line for {}:\n{text}", s.pid));
        assert_eq!(line.contains("<zombie: "), s.zombie, "{line}");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with(&format!("task {} ", s.pid)))
                .count(),
            usize::from(!s.zombie),
            "task section of {}:\n{text}",
            s.pid
        );
    }
    assert!(text.contains("exited with code 42"), "{text}");
    assert!(text.contains("killed by SIGUSR2"), "{text}");

    wl.assert_pass("wl_tree after dump -R and image show");
}

#[test]
fn image_verify_tree() {
    let dir = TestDir::new();
    let (mut wl, _guard, img, seen) = dump_tree(&dir);
    let root = wl.pid() as u32;

    let out = cryo_ok(&["image", "verify", path_str(&img)]);
    let text = stdout_of(&out);
    assert!(text.starts_with("ok: "), "verify: {text}");

    // A byte flipped in the middle of a leaf child's pagemap.
    let leaf = leaf_child(&seen, root);
    let pagemap = cryo_image::pagemap_file(leaf);
    let copy = dir.join("flip-pagemap");
    copy_dir(&img, &copy);
    let mut data = std::fs::read(copy.join(&pagemap)).expect("read pagemap");
    let mid = data.len() / 2;
    data[mid] ^= 0x5a;
    std::fs::write(copy.join(&pagemap), data).expect("write pagemap");
    let lines = expect_verify_fails(&copy, &pagemap, "flipped byte in a child's pagemap");
    // A damaged chunk record is reported on the pages file it describes.
    let leaf_pages = cryo_image::pages_file(leaf);
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&pagemap) || l.contains(&leaf_pages)),
        "flipped byte in a child's pagemap: problems beyond {pagemap}: {lines:#?}"
    );

    // The root's pages file deleted: named, and so is every child whose
    // shared pages are stored there (the copy-on-write buffer: all of them).
    let pages = cryo_image::pages_file(root);
    let copy = dir.join("no-root-pages");
    copy_dir(&img, &copy);
    std::fs::remove_file(copy.join(&pages)).expect("rm pages");
    let lines = expect_verify_fails(&copy, &pages, "root's pages file deleted");
    assert!(
        lines.iter().all(|l| l.contains(&pages)),
        "root's pages file deleted: problems beyond {pages}: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{}: listed in the inventory but missing", pages))),
        "{lines:#?}"
    );
    for s in seen.iter().filter(|s| s.pid != root && !s.zombie) {
        let pm = cryo_image::pagemap_file(s.pid);
        assert!(
            lines.iter().any(|l| l.contains(&pm) && l.contains(&pages)),
            "root's pages file deleted: child {} not reported: {lines:#?}",
            s.pid
        );
    }

    // The leaf child made a child of a zombie in pstree.img (inventory
    // fixed up): its in-parent pages have no live parent.
    let zombie = seen.iter().find(|s| s.zombie).expect("a zombie").pid;
    let copy = dir.join("zombie-parent");
    copy_dir(&img, &copy);
    let work = dir.subdir("json");
    let json = work.join("zombie-parent-pstree.json");
    let mut doc = decode_to(&copy.join(cryo_image::PSTREE_FILE), &json);
    let rec = doc["records"]
        .as_array_mut()
        .expect("records")
        .iter_mut()
        .find(|r| r["pid"].as_u64() == Some(u64::from(leaf)))
        .expect("the leaf's pstree record");
    rec["ppid"] = serde_json::json!(zombie);
    std::fs::write(&json, serde_json::to_vec(&doc).expect("serialize")).expect("write json");
    encode(&json, &copy.join(cryo_image::PSTREE_FILE));
    fix_inventory(&copy);
    let lines = expect_verify_fails(&copy, &pagemap, "child of a zombie");
    assert!(
        lines.iter().any(|l| l.contains(&pagemap)
            && l.contains(&format!("its parent {zombie} is not a live process"))),
        "child of a zombie: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains(cryo_image::PSTREE_FILE)
            && l.contains(&format!("its parent {zombie} is a zombie"))),
        "child of a zombie: {lines:#?}"
    );

    // The buffer's mapping taken out of the root's mm (inventory fixed
    // up): the children's in-parent runs there are covered by no mapping
    // of their parent any more.
    let show = show_json(&img);
    let buf_start = show["processes"][0]["mm"]["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .filter(|m| m["kind"] == "anon-private")
        .max_by_key(|m| m["pages_stored"].as_u64().unwrap_or(0))
        .and_then(|m| m["start"].as_str())
        .map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).expect("hex"))
        .expect("the root's buffer mapping");
    let mm = cryo_image::mm_file(root);
    let copy = dir.join("no-buffer-mapping");
    copy_dir(&img, &copy);
    let json = work.join("no-buffer-mapping-mm.json");
    let mut doc = decode_to(&copy.join(&mm), &json);
    let vmas = doc["records"][0]["vmas"]
        .as_array_mut()
        .expect("vmas of the mm record");
    let before = vmas.len();
    vmas.retain(|v| {
        v["start"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            != buf_start
    });
    assert_eq!(vmas.len() + 1, before, "the buffer's mapping in {mm}");
    std::fs::write(&json, serde_json::to_vec(&doc).expect("serialize")).expect("write json");
    encode(&json, &copy.join(&mm));
    fix_inventory(&copy);
    let lines = expect_verify_fails(&copy, &mm, "buffer mapping gone from the root");
    for s in seen.iter().filter(|s| s.ppid == root && !s.zombie) {
        let pm = cryo_image::pagemap_file(s.pid);
        assert!(
            lines.iter().any(|l| l.contains(&pm)
                && l.contains(&format!(
                    "no mapping of {mm} with stored pages covers {buf_start:#x}"
                ))),
            "buffer mapping gone from the root: child {} not reported: {lines:#?}",
            s.pid
        );
    }

    wl.assert_pass("wl_tree after dump -R and image verify");
}

#[test]
fn image_decode_encode_tree() {
    let dir = TestDir::new();
    let (mut wl, _guard, img, seen) = dump_tree(&dir);
    let work = dir.subdir("json");
    let done = assert_decode_encode_identical(&img, &work);
    for name in [
        cryo_image::PSTREE_FILE,
        cryo_image::FILES_FILE,
        cryo_image::INVENTORY_FILE,
    ] {
        assert!(
            done.iter().any(|d| d == name),
            "{name} not round-tripped: {done:?}"
        );
    }
    let names = file_names(&img);
    for s in &seen {
        let mut per_process = vec![
            cryo_image::mm_file(s.pid),
            cryo_image::pagemap_file(s.pid),
            cryo_image::fdinfo_file(s.pid),
        ];
        per_process.extend(s.tids.iter().map(|t| cryo_image::core_file(*t)));
        if s.zombie {
            for f in per_process.iter().chain([&cryo_image::pages_file(s.pid)]) {
                assert!(!names.contains(f), "zombie {} has {f}", s.pid);
            }
            assert!(
                !names.contains(&cryo_image::core_file(s.pid)),
                "zombie {} has a core",
                s.pid
            );
        } else {
            for f in &per_process {
                assert!(done.contains(f), "{f} not round-tripped: {done:?}");
            }
        }
    }
    // The pstree records as decoded: the zombies' exit statuses survive.
    let doc: Value = serde_json::from_slice(
        &std::fs::read(work.join(format!("{}.json", cryo_image::PSTREE_FILE))).expect("read json"),
    )
    .expect("pstree JSON");
    let records = doc["records"].as_array().expect("records");
    assert_eq!(records.len(), seen.len(), "{doc:#}");
    for r in records.iter().filter(|r| r["zombie"] == true) {
        assert!(r["exit_status"].as_u64().unwrap_or(0) != 0, "{r:#}");
    }
    wl.assert_pass("wl_tree after dump -R and decode/encode");
}

/// A directory in CRIU's format (inventory.img and pstree.img written
/// here from CRIU's magic numbers and field numbers): `image show` says it
/// is a CRIU image, which version and its processes; restore and verify
/// refuse it naming it.
#[test]
fn criu_image_is_recognised() {
    let dir = TestDir::new();
    let img = dir.subdir("criu");
    let record = |m: &[u8]| [(m.len() as u32).to_le_bytes().to_vec(), m.to_vec()].concat();
    // InventoryEntry: img_version (1) = 2, fdinfo_per_id (2) = true.
    let inv = [
        0x5831_3116u32.to_le_bytes().to_vec(),
        record(&[0x08, 0x02, 0x10, 0x01]),
    ]
    .concat();
    // PstreeEntry: pid (1), ppid (2), pgid (3), sid (4).
    let entry = |pid: u8, ppid: u8| record(&[0x08, pid, 0x10, ppid, 0x18, pid, 0x20, pid]);
    let pstree = [
        0x5456_4319u32.to_le_bytes().to_vec(),
        0x5027_3030u32.to_le_bytes().to_vec(),
        entry(100, 1),
        entry(101, 100),
    ]
    .concat();
    std::fs::write(img.join("inventory.img"), inv).expect("writing inventory.img");
    std::fs::write(img.join("pstree.img"), pstree).expect("writing pstree.img");
    let p = img.to_str().expect("utf-8 path");
    let show = run_cryo(&["image", "show", p], &[]);
    assert_cryo_ok(&show, "cryo image show of a CRIU image");
    let text = String::from_utf8_lossy(&show.stdout);
    for want in [
        "a CRIU image (CRIU images v1.1)",
        "2 process(es)",
        "root pid 100",
        "process 101 (parent 100)",
    ] {
        assert!(text.contains(want), "image show lacks {want:?}: {text}");
    }
    let restore = run_cryo(&["restore", "-D", p, "-d"], &[]);
    assert!(!restore.status.success(), "a CRIU image was restored");
    assert!(
        stderr_of(&restore).contains("a CRIU image"),
        "{}",
        stderr_of(&restore)
    );
}

/// The library API: a Rust program dumps a tree with cryo_engine::dump
/// (left running) and the image restores as one the CLI made.
#[test]
fn library_api_dump() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "4"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let mut opts = cryo_engine::DumpOptions::new(wl.pid(), &img);
    opts.leave_running = true;
    let stats = cryo_engine::dump(&opts).expect("cryo_engine::dump");
    assert!(stats.image_bytes > 0 && stats.processes == 1, "{stats:?}");
    wl.assert_pass("after a dump by the library");
    drop(guard);
    restore_ok(&mut wl, &img);
    wl.assert_pass("restored from the library's image");
}

/// `dump --stream` writes the image to standard output and `restore
/// --stream` takes it from standard input: the workload checks itself
/// after; a stream cut short is refused and leaves nothing running.
#[test]
fn dump_and_restore_through_a_stream() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "8"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let stream = dir.join("image.stream");
    let pid = wl.pid().to_string();
    let out = std::process::Command::new(cryo_bin())
        .args(["dump", "-t", &pid, "--stream"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&stream).expect("the stream file"))
        .output()
        .expect("running cryo dump --stream");
    assert!(
        out.status.success(),
        "cryo dump --stream: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    let len = std::fs::metadata(&stream).expect("the stream").len();
    // Cut short: refused, nothing restored.
    let cut = dir.join("cut.stream");
    let bytes = std::fs::read(&stream).expect("reading the stream");
    std::fs::write(&cut, &bytes[..(len / 2) as usize]).expect("writing the cut stream");
    let restore = |from: &std::path::Path| {
        std::process::Command::new(cryo_bin())
            .args(["restore", "--stream", "-d"])
            .stdin(std::fs::File::open(from).expect("a stream"))
            .output()
            .expect("running cryo restore --stream")
    };
    let bad = restore(&cut);
    assert!(!bad.status.success(), "a cut stream was restored");
    assert!(!pid_alive(wl.pid()), "a cut stream left the task running");
    let good = restore(&stream);
    wl.mark_running();
    assert!(
        good.status.success(),
        "cryo restore --stream: {}",
        String::from_utf8_lossy(&good.stderr)
    );
    wl.assert_pass("restored from a stream");
}
