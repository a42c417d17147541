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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

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
