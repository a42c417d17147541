//! `cryo image core` and `cryo image diff` on real dumps taken in
//! leave-running mode; the workloads must still pass their own checks
//! afterwards.
//!
//! - `core_file_backtrace`: the core file of `wl_stack` opened in gdb shows
//!   the workload's own frames (`level_three` <- `level_two` <- `level_one`
//!   <- `main`) with no unreadable memory; readelf (if present) lists the
//!   notes the kernel writes.
//! - `core_file_threads_backtrace`: the core file of `wl_threads
//!   --spinners 2` opened in gdb lists every thread (one `LWP <tid>` per
//!   tid the process had) and `thread apply all bt` shows each kind of
//!   thread in its own function (`waiter`, `sleeper`, `spinner`, `main`);
//!   readelf (if present) lists one NT_PRSTATUS per thread.
//! - `core_file_memory_matches_process`: every read-only segment of the core
//!   of `wl_single` (code, read-only data, file mappings, the vDSO) holds the
//!   bytes the live process has there.
//! - `diff_two_checkpoints`: two checkpoints of `wl_stack --heap-mib 4` a
//!   second apart differ in pages of the buffer it writes, and in nothing
//!   structural.
//! - `core_file_tree`: `cryo image core` of a `wl_tree` dump writes one core
//!   per live process and none for the zombies; every child's core holds,
//!   at the address of the 4 MiB copy-on-write buffer (pages the child's
//!   image keeps in its parent's), the buffer's pattern, the same bytes as
//!   the root's core, and gdb reads them there.
//! - `diff_tree_checkpoints`: two checkpoints of `wl_tree` a second apart
//!   have the same processes (zombies too, with the same state) and no
//!   page of the copy-on-write buffer differs in any of them; an image
//!   against itself is identical.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cryo_image::json::serde_json::{self, Value};
use cryo_tests::*;

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cryo_ok(args: &[&str]) -> Output {
    let out = run_cryo(args, &[]);
    assert_cryo_ok(&out, &format!("cryo {}", args.join(" ")));
    out
}

/// `prog` from $PATH, or None.
fn find_tool(prog: &str, fallback: &str) -> Option<PathBuf> {
    let fb = PathBuf::from(fallback);
    if fb.is_file() {
        return Some(fb);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// gdb in batch mode on `exe` and `core`, running each of `cmds` (`-ex`);
/// its stdout and stderr, asserting it succeeded.
fn run_gdb(gdb: &Path, exe: &Path, core: &Path, cmds: &[&str], dir: &TestDir, tag: &str) -> String {
    let mut args = vec!["-nx", "-batch", "-iex", "set debuginfod enabled off"];
    for c in cmds {
        args.push("-ex");
        args.push(c);
    }
    args.push(path_str(exe));
    args.push(path_str(core));
    let out = run_tool(gdb, &args, dir, tag);
    let text = format!(
        "{}{}",
        stdout_of(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{tag}:\n{text}");
    assert!(out.status.success(), "gdb failed ({}):\n{text}", out.status);
    text
}

/// Runs an external tool with output to files (no pipes to hang on) and a
/// timeout; kills it by pid if it hangs.
fn run_tool(prog: &Path, args: &[&str], dir: &TestDir, tag: &str) -> Output {
    let out_p = dir.join(&format!("{tag}.out"));
    let err_p = dir.join(&format!("{tag}.err"));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_p).expect("create tool stdout"))
        .stderr(std::fs::File::create(&err_p).expect("create tool stderr"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", prog.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for tool") {
            break st;
        }
        if start.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {} did not finish within {TOOL_TIMEOUT:?}; killed it",
                prog.display(),
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    std::fs::File::open(&out_p)
        .and_then(|mut f| f.read_to_end(&mut stdout))
        .expect("read tool stdout");
    std::fs::File::open(&err_p)
        .and_then(|mut f| f.read_to_end(&mut stderr))
        .expect("read tool stderr");
    Output {
        status,
        stdout,
        stderr,
    }
}

/// `key=<hex>` from a ready file.
fn ready_hex(dir: &TestDir, key: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join("ready")).expect("read ready file");
    let v = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in ready file {text:?}"));
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("bad {key}= in ready file {text:?}: {e}"))
}

fn hex_field(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a hex string: {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

/// A PT_LOAD of a core file.
struct Load {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    flags: u32,
}

/// Checks the ELF header of a core file and returns its PT_LOADs and the
/// number of PT_NOTEs.
fn parse_core(data: &[u8]) -> (Vec<Load>, usize) {
    assert!(data.len() >= 64, "core file of {} bytes", data.len());
    assert_eq!(&data[..4], b"\x7fELF", "ELF magic");
    assert_eq!(data[4], 2, "ELFCLASS64");
    assert_eq!(data[5], 1, "ELFDATA2LSB");
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(u16_at(16), 4, "e_type ET_CORE");
    assert_eq!(u16_at(18), 62, "e_machine EM_X86_64");
    let phoff = u64_at(32) as usize;
    let phnum = u16_at(56) as usize;
    assert_eq!(u16_at(54), 56, "e_phentsize");
    let mut loads = Vec::new();
    let mut notes = 0;
    for i in 0..phnum {
        let o = phoff + i * 56;
        match u32_at(o) {
            1 => loads.push(Load {
                flags: u32_at(o + 4),
                offset: u64_at(o + 8),
                vaddr: u64_at(o + 16),
                filesz: u64_at(o + 32),
                memsz: u64_at(o + 40),
            }),
            4 => notes += 1,
            t => panic!("unexpected program header type {t}"),
        }
    }
    (loads, notes)
}

#[test]
fn core_file_backtrace() {
    let gdb = find_tool("gdb", "/usr/bin/gdb").unwrap_or_else(|| {
        panic!(
            "gdb is not installed (not at /usr/bin/gdb nor in $PATH): install gdb \
             (apt-get install gdb) to run this test"
        )
    });
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_stack", &[], &dir);
    let pid = wl.pid();
    wait_settled(pid, Duration::from_secs(10));
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);

    let out_dir = dir.join("cores");
    let out = cryo_ok(&["image", "core", path_str(&img), "-O", path_str(&out_dir)]);
    let core = out_dir.join(format!("core.{pid}"));
    assert!(
        core.is_file(),
        "{} not written; cryo said:\n{}",
        core.display(),
        stdout_of(&out)
    );
    let data = std::fs::read(&core).expect("read core file");
    let (loads, notes) = parse_core(&data);
    assert_eq!(notes, 1, "one PT_NOTE");
    let maps = proc_maps(pid);
    assert_eq!(
        loads.len(),
        maps.lines().filter(|l| !l.ends_with("[vsyscall]")).count(),
        "one PT_LOAD per mapping:\n{maps}"
    );

    if let Some(readelf) = find_tool("readelf", "/usr/bin/readelf") {
        let out = run_tool(&readelf, &["-n", path_str(&core)], &dir, "readelf");
        let text = stdout_of(&out);
        eprintln!(
            "readelf -n:\n{}",
            text.lines()
                .filter(|l| !l.contains("description data"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        for n in [
            "NT_PRSTATUS",
            "NT_PRPSINFO",
            "NT_FPREGSET",
            "NT_X86_XSTATE",
            "NT_SIGINFO",
            "NT_AUXV",
            "NT_FILE",
        ] {
            assert!(text.contains(n), "readelf -n lacks {n}:\n{text}");
        }
    }

    let exe = workload_bin("wl_stack");
    let text = run_gdb(&gdb, &exe, &core, &["bt", "info threads"], &dir, "gdb");
    for f in [
        "wl_stack::level_three",
        "wl_stack::level_two",
        "wl_stack::level_one",
        "wl_stack::main",
    ] {
        assert!(text.contains(f), "the backtrace lacks {f}:\n{text}");
    }
    assert!(
        !text.contains("Cannot access memory"),
        "gdb could not read memory of the core:\n{text}"
    );
    assert!(
        text.contains(&format!("LWP {pid}")),
        "info threads does not show thread {pid}:\n{text}"
    );

    wl.assert_pass("wl_stack after dump -R and image core");
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

/// The blocks of `thread apply all bt` output, keyed by the tid of their
/// `Thread N (... LWP <tid> ...)` header line.
fn gdb_thread_blocks(text: &str) -> Vec<(u32, String)> {
    let mut blocks: Vec<(u32, String)> = Vec::new();
    for line in text.lines() {
        let header = line
            .strip_prefix("Thread ")
            .and_then(|rest| rest.split_once("LWP "))
            .and_then(|(_, rest)| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u32>().ok()
            });
        match header {
            Some(tid) => blocks.push((tid, String::new())),
            None => {
                if let Some((_, b)) = blocks.last_mut() {
                    b.push_str(line);
                    b.push('\n');
                }
            }
        }
    }
    blocks
}

#[test]
fn core_file_threads_backtrace() {
    let gdb = find_tool("gdb", "/usr/bin/gdb").unwrap_or_else(|| {
        panic!(
            "gdb is not installed (not at /usr/bin/gdb nor in $PATH): install gdb \
             (apt-get install gdb) to run this test"
        )
    });
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_threads", &["--spinners", "2"], &dir);
    let pid = wl.pid();
    let tids = task_tids(pid);
    assert_eq!(tids.len(), 5, "main, waiter, sleeper, 2 spinners: {tids:?}");
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    assert_eq!(task_tids(pid), tids, "the threads changed during the dump");

    let out_dir = dir.join("cores");
    let out = cryo_ok(&[
        "image",
        "core",
        path_str(&img),
        "--output-dir",
        path_str(&out_dir),
    ]);
    let core = out_dir.join(format!("core.{pid}"));
    assert!(
        core.is_file(),
        "{} not written; cryo said:\n{}",
        core.display(),
        stdout_of(&out)
    );
    let data = std::fs::read(&core).expect("read core file");
    let (loads, notes) = parse_core(&data);
    assert_eq!(notes, 1, "one PT_NOTE");
    assert!(!loads.is_empty(), "no PT_LOAD");

    if let Some(readelf) = find_tool("readelf", "/usr/bin/readelf") {
        let out = run_tool(&readelf, &["-n", path_str(&core)], &dir, "readelf");
        let text = stdout_of(&out);
        assert!(out.status.success(), "readelf -n failed:\n{text}");
        let count = |n: &str| {
            text.lines()
                .filter(|l| l.split_whitespace().any(|w| w == n))
                .count()
        };
        assert_eq!(
            count("NT_PRSTATUS"),
            tids.len(),
            "one NT_PRSTATUS per thread:\n{text}"
        );
        assert_eq!(
            count("NT_X86_XSTATE"),
            tids.len(),
            "one NT_X86_XSTATE per thread:\n{text}"
        );
        assert_eq!(
            count("NT_FPREGSET"),
            tids.len(),
            "one NT_FPREGSET per thread:\n{text}"
        );
        for n in ["NT_PRPSINFO", "NT_SIGINFO", "NT_AUXV", "NT_FILE"] {
            assert_eq!(count(n), 1, "one {n} for the process:\n{text}");
        }
    }

    let exe = workload_bin("wl_threads");
    let text = run_gdb(
        &gdb,
        &exe,
        &core,
        &["info threads", "thread apply all bt"],
        &dir,
        "gdb",
    );
    assert!(
        !text.contains("Cannot access memory"),
        "gdb could not read memory of the core:\n{text}"
    );
    // `info threads`: one line per thread (`[*] N  Thread 0x... (LWP tid) ...`),
    // before the first backtrace header.
    let mut listed: Vec<u32> = text
        .lines()
        .take_while(|l| !l.starts_with("Thread "))
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches('*').trim_start();
            l.split_whitespace().next()?.parse::<u32>().ok()?;
            let (_, rest) = l.split_once("(LWP ")?;
            rest.split_once(')')?.0.parse::<u32>().ok()
        })
        .collect();
    listed.sort_unstable();
    assert_eq!(
        listed, tids,
        "info threads lists every thread once:\n{text}"
    );

    // One backtrace per thread, each of one thread of the workload.
    let blocks = gdb_thread_blocks(&text);
    let mut bt_tids: Vec<u32> = blocks.iter().map(|(t, _)| *t).collect();
    bt_tids.sort_unstable();
    assert_eq!(bt_tids, tids, "one backtrace per thread:\n{text}");
    let with = |f: &str| blocks.iter().filter(|(_, b)| b.contains(f)).count();
    for (f, n) in [
        ("wl_threads::waiter", 1),
        ("wl_threads::sleeper", 1),
        ("wl_threads::spinner", 2),
        ("wl_threads::main", 1),
    ] {
        assert_eq!(with(f), n, "{n} backtrace(s) should contain {f}:\n{text}");
    }
    // The main thread is the process's own: its backtrace is the leader's.
    let leader = blocks
        .iter()
        .find(|(t, _)| *t == pid as u32)
        .map(|(_, b)| b.as_str())
        .unwrap_or_default();
    assert!(
        leader.contains("wl_threads::main"),
        "the leader {pid} is not in main:\n{text}"
    );

    // Every thread's registers are its own: gdb's pc of each LWP is the
    // rip the image holds for that tid, and each spinner's xmm9 holds its
    // own pattern (the FP notes of the right thread).
    let out = cryo_ok(&["image", "show", "--json", path_str(&img)]);
    let show: Value = serde_json::from_slice(&out.stdout).expect("show --json is JSON");
    let cores = show["processes"][0]["cores"]
        .as_array()
        .unwrap_or_else(|| panic!("no cores in show --json: {show:#}"));
    let text = run_gdb(
        &gdb,
        &exe,
        &core,
        &[r#"thread apply all printf "regs pc=%#lx xmm9=%#lx\n", $pc, $xmm9.v2_int64[0]"#],
        &dir,
        "gdb-regs",
    );
    let regs = gdb_thread_blocks(&text);
    assert_eq!(regs.len(), tids.len(), "registers of every thread:\n{text}");
    for c in cores {
        let tid = c["tid"].as_u64().expect("tid") as u32;
        let comm = c["comm"].as_str().expect("comm");
        let line = regs
            .iter()
            .find(|(t, _)| *t == tid)
            .and_then(|(_, b)| b.lines().find_map(|l| l.strip_prefix("regs ")))
            .unwrap_or_else(|| panic!("no registers of thread {tid} ({comm}):\n{text}"));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).expect("hex"))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
        };
        assert_eq!(
            field("pc="),
            hex_field(&c["rip"]),
            "thread {tid} ({comm}): gdb's pc is not the image's rip"
        );
        if let Some(k) = comm.strip_prefix("spinner-") {
            let k: u64 = k.parse().expect("spinner number");
            assert_eq!(
                field("xmm9="),
                0x0123_4567_89ab_cdef ^ (k << 40),
                "thread {tid} ({comm}): xmm9 is not its pattern"
            );
        }
    }

    wl.assert_pass("wl_threads after dump -R and image core");
}

#[test]
fn core_file_memory_matches_process() {
    let dir = TestDir::new();
    let mut wl = Workload::single("nanosleep", &dir);
    let pid = wl.pid();
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    let out_dir = dir.join("cores");
    cryo_ok(&[
        "image",
        "core",
        path_str(&img),
        "--output-dir",
        path_str(&out_dir),
    ]);
    let data = std::fs::read(out_dir.join(format!("core.{pid}"))).expect("read core file");
    let (loads, _) = parse_core(&data);
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let maps = proc_maps(pid);
    let mut compared = 0u64;
    let mut filled = 0u64;
    for l in &loads {
        assert!(
            l.offset + l.filesz <= data.len() as u64,
            "segment {:#x} beyond the end of the file",
            l.vaddr
        );
        if l.filesz > 0 {
            assert_eq!(
                l.filesz, l.memsz,
                "segment {:#x}: partial contents",
                l.vaddr
            );
            filled += 1;
        }
        // Read-only, readable segments do not change while the workload
        // sleeps: compare them with the live process.
        if l.filesz == 0 || l.flags & 2 != 0 || l.flags & 4 == 0 {
            continue;
        }
        let mut live = vec![0u8; l.filesz as usize];
        if mem.read_exact_at(&mut live, l.vaddr).is_err() {
            continue;
        }
        let got = &data[l.offset as usize..(l.offset + l.filesz) as usize];
        let bad = got
            .chunks(4096)
            .zip(live.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        let line = maps
            .lines()
            .find(|m| m.starts_with(&format!("{:x}-", l.vaddr)))
            .unwrap_or("?");
        assert_eq!(
            bad, 0,
            "segment {:#x} ({line}): {bad} pages differ from the live process",
            l.vaddr
        );
        compared += 1;
    }
    assert!(compared >= 5, "only {compared} read-only segments compared");
    assert!(filled >= compared, "{filled} filled segments");
    wl.assert_pass("wl_single after dump -R and image core");
}

#[test]
fn diff_two_checkpoints() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_stack", &["--heap-mib", "4"], &dir);
    let pid = wl.pid();
    let buf = ready_hex(&dir, "buf");
    wait_settled(pid, Duration::from_secs(10));
    let img1 = dir.subdir("img1");
    let img2 = dir.subdir("img2");
    dump_ok(&mut wl, &img1, &["-R"]);
    std::thread::sleep(Duration::from_millis(1000));
    dump_ok(&mut wl, &img2, &["-R"]);

    // Text form: exit 0 although there are differences.
    let out = cryo_ok(&["image", "diff", path_str(&img1), path_str(&img2)]);
    let text = stdout_of(&out);
    eprintln!("image diff:\n{text}");
    assert!(text.contains(&format!("task {pid}")), "{text}");
    assert!(text.contains("total"), "{text}");

    let out = cryo_ok(&["image", "diff", "--json", path_str(&img1), path_str(&img2)]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("diff --json is JSON");
    assert_eq!(v["identical"], false, "{v:#}");
    assert_eq!(v["tasks_added"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["tasks_removed"], serde_json::json!([]), "{v:#}");
    let tasks = v["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 1, "{v:#}");
    let t = &tasks[0];
    assert_eq!(t["pid"].as_u64(), Some(pid as u64), "{t:#}");
    assert_eq!(t["changed"], serde_json::json!({}), "{t:#}");
    assert_eq!(t["mappings"]["added"], serde_json::json!([]), "{t:#}");
    assert_eq!(t["mappings"]["removed"], serde_json::json!([]), "{t:#}");
    let pages = t["pages"]["mappings"].as_array().expect("pages.mappings");
    let m = pages
        .iter()
        .find(|m| hex_field(&m["start"]) <= buf && buf < hex_field(&m["end"]))
        .unwrap_or_else(|| {
            panic!("no differing pages in the mapping of the buffer {buf:#x}: {t:#}")
        });
    let differ = m["differ"].as_u64().expect("differ");
    assert!(differ >= 1, "{m:#}");
    assert_eq!(
        differ,
        m["changed"].as_u64().unwrap()
            + m["only_old"].as_u64().unwrap()
            + m["only_new"].as_u64().unwrap(),
        "{m:#}"
    );
    assert!(t["pages"]["total"].as_u64().unwrap() >= differ, "{t:#}");

    // An image against itself: identical, exit 0.
    let out = cryo_ok(&["image", "diff", "--json", path_str(&img1), path_str(&img1)]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("diff --json is JSON");
    assert_eq!(v["identical"], true, "{v:#}");
    assert_eq!(v["tasks"][0]["pages"]["total"], 0, "{v:#}");

    // A directory that is not an image: exit 1 with a message.
    let out = run_cryo(
        &["image", "diff", path_str(&img1), path_str(dir.path())],
        &[],
    );
    check_cryo_failed_cleanly(&out).unwrap_or_else(|e| panic!("diff with a non-image: {e}"));
    assert_eq!(out.status.code(), Some(1));

    wl.assert_pass("wl_stack after two dumps -R");
}

/// `cow_pattern(i)` of wl_tree: word i of its copy-on-write buffer.
fn cow_pattern(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x00c0_ffee
}

const COW_LEN: usize = 4 << 20;

fn cow_bytes() -> Vec<u8> {
    (0..COW_LEN / 8)
        .flat_map(|i| cow_pattern(i).to_le_bytes())
        .collect()
}

/// The bytes of a core file at `[addr, addr + len)`, if one PT_LOAD with
/// contents holds all of them.
fn core_bytes<'a>(data: &'a [u8], loads: &[Load], addr: u64, len: u64) -> Option<&'a [u8]> {
    let l = loads
        .iter()
        .find(|l| l.vaddr <= addr && addr + len <= l.vaddr + l.filesz)?;
    let off = (l.offset + (addr - l.vaddr)) as usize;
    data.get(off..off + len as usize)
}

/// Starts `wl_tree` and dumps it with `-R` into `<dir>/<name>`. Returns
/// the workload, the guard of its tree, the image and the live and zombie
/// pids read from /proc before the dump.
fn dump_tree(dir: &TestDir) -> (Workload, TreeGuard, PathBuf, Vec<u32>, Vec<u32>) {
    let mut wl = Workload::start("wl_tree", &[], dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let (mut live, mut zombies) = (Vec::new(), Vec::new());
    for &pid in guard.pids() {
        match proc_state(pid) {
            Some('Z') => zombies.push(pid as u32),
            Some(_) => live.push(pid as u32),
            None => panic!("{pid} of the tree is gone"),
        }
    }
    live.sort_unstable();
    zombies.sort_unstable();
    assert!(
        live.len() >= 9 && zombies.len() == 3,
        "setup: live {live:?}, zombies {zombies:?}"
    );
    let img = dir.subdir("img");
    dump_ok(&mut wl, &img, &["-R"]);
    (wl, guard, img, live, zombies)
}

#[test]
fn core_file_tree() {
    let gdb = find_tool("gdb", "/usr/bin/gdb").unwrap_or_else(|| {
        panic!(
            "gdb is not installed (not at /usr/bin/gdb nor in $PATH): install gdb \
             (apt-get install gdb) to run this test"
        )
    });
    let dir = TestDir::new();
    let (mut wl, _guard, img, live, zombies) = dump_tree(&dir);
    let root = wl.pid() as u32;
    // The buffer, in the root's live memory: where the pattern starts.
    let pattern = cow_bytes();
    let maps = proc_maps(root as i32);
    let mem = std::fs::File::open(format!("/proc/{root}/mem")).expect("open /proc/PID/mem");
    let mut cow = None;
    for line in maps.lines().filter(|l| l.contains(" rw-p ")) {
        let (a, b) = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .expect("maps range");
        let (a, b) = (
            u64::from_str_radix(a, 16).expect("hex"),
            u64::from_str_radix(b, 16).expect("hex"),
        );
        if b - a < COW_LEN as u64 {
            continue;
        }
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.read_exact_at(&mut buf, a).is_err() {
            continue;
        }
        if let Some(off) = buf.windows(32).position(|w| w == &pattern[..32]) {
            cow = Some(a + off as u64);
            break;
        }
    }
    let cow = cow.unwrap_or_else(|| panic!("the copy-on-write buffer is not in the root:\n{maps}"));
    eprintln!("copy-on-write buffer at {cow:#x}");

    let out_dir = dir.join("cores");
    let out = cryo_ok(&["image", "core", path_str(&img), "-O", path_str(&out_dir)]);
    let mut written = file_names(&out_dir);
    written.sort();
    let mut want: Vec<String> = live.iter().map(|p| format!("core.{p}")).collect();
    want.sort();
    assert_eq!(
        written,
        want,
        "one core per live process, none for the zombies {zombies:?}; cryo said:\n{}",
        stdout_of(&out)
    );

    // Which processes keep the buffer in their parent's image.
    let out = cryo_ok(&["image", "show", "--json", path_str(&img)]);
    let show: Value = serde_json::from_slice(&out.stdout).expect("show --json is JSON");
    let in_parent_at = |pid: u32| -> u64 {
        let p = show["processes"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["pid"].as_u64() == Some(u64::from(pid))))
            .unwrap_or_else(|| panic!("{pid} not in show"));
        p["mm"]["mappings"]
            .as_array()
            .expect("mappings")
            .iter()
            .find(|m| hex_field(&m["start"]) <= cow && cow < hex_field(&m["end"]))
            .and_then(|m| m["pages_in_parent"].as_u64())
            .unwrap_or(0)
    };

    let root_data = std::fs::read(out_dir.join(format!("core.{root}"))).expect("read core");
    let (root_loads, _) = parse_core(&root_data);
    let root_cow = core_bytes(&root_data, &root_loads, cow, COW_LEN as u64)
        .unwrap_or_else(|| panic!("the root's core lacks {cow:#x}"));
    assert!(
        root_cow == &pattern[..],
        "the root's core: the buffer's bytes"
    );
    for &pid in live.iter().filter(|&&p| p != root) {
        assert!(
            in_parent_at(pid) >= 1024,
            "process {pid}: the buffer is not its parent's pages in the image"
        );
        let data = std::fs::read(out_dir.join(format!("core.{pid}"))).expect("read core");
        let (loads, notes) = parse_core(&data);
        assert_eq!(notes, 1, "core.{pid}: one PT_NOTE");
        let got = core_bytes(&data, &loads, cow, COW_LEN as u64)
            .unwrap_or_else(|| panic!("core.{pid} lacks {cow:#x}"));
        let bad = got
            .chunks(4096)
            .zip(root_cow.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            bad, 0,
            "core.{pid}: {bad} pages of the buffer differ from the root's core"
        );
    }

    // gdb reads the pattern in a grandchild's core (its pages are two
    // levels up).
    let grandchild = live
        .iter()
        .copied()
        .find(|&p| {
            let ppid = show["processes"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["pid"].as_u64() == Some(u64::from(p))))
                .and_then(|x| x["ppid"].as_u64())
                .unwrap_or(0) as u32;
            ppid != root && live.contains(&ppid)
        })
        .expect("a grandchild of the root");
    let word = 4321usize;
    let addr = cow + (word * 8) as u64;
    let exe = workload_bin("wl_tree");
    let core = out_dir.join(format!("core.{grandchild}"));
    let text = run_gdb(
        &gdb,
        &exe,
        &core,
        &[&format!(
            "printf \"word=%#lx\\n\", *(unsigned long *){addr:#x}"
        )],
        &dir,
        "gdb",
    );
    let got = text
        .lines()
        .find_map(|l| l.strip_prefix("word="))
        .map(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).expect("hex"))
        .unwrap_or_else(|| panic!("gdb printed no word:\n{text}"));
    assert_eq!(
        got,
        cow_pattern(word),
        "gdb on core.{grandchild}: word {word} of the buffer"
    );

    wl.assert_pass("wl_tree after dump -R and image core");
}

#[test]
fn diff_tree_checkpoints() {
    let dir = TestDir::new();
    let (mut wl, _guard, img1, live, zombies) = dump_tree(&dir);
    std::thread::sleep(Duration::from_millis(1000));
    let img2 = dir.subdir("img2");
    dump_ok(&mut wl, &img2, &["-R"]);

    let out = cryo_ok(&["image", "diff", path_str(&img1), path_str(&img2)]);
    let text = stdout_of(&out);
    eprintln!("image diff:\n{text}");
    assert!(text.contains("0 added, 0 removed"), "{text}");

    let out = cryo_ok(&["image", "diff", "--json", path_str(&img1), path_str(&img2)]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("diff --json is JSON");
    assert_eq!(v["tasks_added"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["tasks_removed"], serde_json::json!([]), "{v:#}");
    let tasks = v["tasks"].as_array().expect("tasks");
    let mut pids: Vec<u32> = tasks
        .iter()
        .map(|t| t["pid"].as_u64().expect("pid") as u32)
        .collect();
    pids.sort_unstable();
    let mut all: Vec<u32> = live.iter().chain(&zombies).copied().collect();
    all.sort_unstable();
    assert_eq!(pids, all, "every process of the tree, zombies too");
    // The 4 MiB buffer nobody writes: the root stores it, the children
    // share it; none of it differs anywhere.
    let show = {
        let out = cryo_ok(&["image", "show", "--json", path_str(&img1)]);
        serde_json::from_slice::<Value>(&out.stdout).expect("show --json is JSON")
    };
    let root = wl.pid() as u64;
    let cow_map = show["processes"][0]["mm"]["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .filter(|m| m["kind"] == "anon-private")
        .max_by_key(|m| m["pages_stored"].as_u64().unwrap_or(0))
        .expect("the root's buffer mapping")
        .clone();
    assert_eq!(show["processes"][0]["pid"].as_u64(), Some(root));
    let cow_start = hex_field(&cow_map["start"]);
    for t in tasks {
        let pid = t["pid"].as_u64().expect("pid") as u32;
        assert_eq!(t["changed"], serde_json::json!({}), "task {pid}: {t:#}");
        assert_eq!(t["mappings"]["added"], serde_json::json!([]), "{t:#}");
        assert_eq!(t["mappings"]["removed"], serde_json::json!([]), "{t:#}");
        for m in t["pages"]["mappings"].as_array().expect("pages.mappings") {
            assert!(
                hex_field(&m["start"]) != cow_start,
                "task {pid}: pages of the copy-on-write buffer differ: {m:#}"
            );
        }
        if zombies.contains(&pid) {
            assert_eq!(t["pages"]["total"], 0, "zombie {pid}: {t:#}");
        }
    }

    // An image against itself: identical.
    let out = cryo_ok(&["image", "diff", "--json", path_str(&img1), path_str(&img1)]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("diff --json is JSON");
    assert_eq!(v["identical"], true, "{v:#}");

    wl.assert_pass("wl_tree after two dumps -R");
}
