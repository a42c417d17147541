//! `cryo image show / decode / encode / verify` on a real dump of
//! `wl_single` taken in leave-running mode; the workload must still pass
//! its own checks afterwards.

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
    let names = file_names(&img);
    for name in &names {
        let file = img.join(name);
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
    }

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
