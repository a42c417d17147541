//! A process in an IPC namespace of its own holding System V objects,
//! which a restore must make again with their ids, keys, owners, modes
//! and contents.
//!
//! `wl_ipc --ready FILE --verdict FILE [--mqueue 1] [--partial 1]`
//!
//! The parent P unshares its IPC namespace, lowers two of its limits
//! (kernel.shmmni, kernel.msgmnb), makes a shared memory segment with a
//! key (three pages and a bit: a pattern in the first and third page, the
//! second left zero; mode 0640, owner 1000:1001), a private one (two pages
//! of another pattern), a set of three semaphores (1, 7, 300) and a
//! message queue holding four messages of several types (one empty), and
//! attaches the keyed segment and forks C, which inherits the
//! attachment and stays in the namespace (one object of each kind was
//! made and removed first, so that the ids are not a fresh namespace's
//! first). On SIGTERM P checks every
//! object by its key or id (same ids, sizes, modes, owners, contents,
//! values, messages in order), the limits, that its namespace is not the
//! one it started in, what C sees of the semaphores, and that a byte P
//! writes through its attachment is the one C reads through its own (and
//! the segment counts two attachments).
//!
//! With `--mqueue`, P also makes a POSIX message queue in the namespace
//! (mode 0640, owner 1000:1001, at most 5 messages of 64 bytes) holding
//! three messages of two priorities, and keeps a descriptor of it; on
//! SIGTERM it checks the queue's limits, owner and mode, and receives
//! the messages through its descriptor in priority order.
//!
//! With `--partial`, P also attaches the private segment and unmaps the
//! second page of that attachment: a part of a segment, which cryo
//! refuses to dump (the test checks that the tree runs on).

use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_ipc";
const PAGE: usize = 4096;
const SHM_KEY: i32 = 0x4352_5901;
const SEM_KEY: i32 = 0x4352_5902;
const MSG_KEY: i32 = 0x4352_5903;
const SHM_SIZE: usize = 3 * PAGE + 100;
const SEMS: [u16; 3] = [1, 7, 300];
const MESSAGES: [(i64, &str); 4] = [
    (1, "first"),
    (5, "the second message, a little longer than the first"),
    (3, ""),
    (2, "last"),
];
const SHMMNI: &str = "1000";
const MSGMNB: &str = "32768";

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn ipc_ns() -> String {
    std::fs::read_link("/proc/self/ns/ipc")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn pattern(seed: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed)
}

/// Fill segment `id` through an attachment of ours (removed after): the
/// pattern of `seed` in every page but the second when `hole`.
fn fill(id: i32, size: usize, seed: u8, hole: bool) -> Result<(), String> {
    // SAFETY: shmat maps the segment; we write inside its size, then
    // detach.
    unsafe {
        let at = libc::shmat(id, std::ptr::null(), 0);
        if at as isize == -1 {
            return Err(os_err("shmat"));
        }
        let bytes = std::slice::from_raw_parts_mut(at as *mut u8, size);
        for (i, b) in bytes.iter_mut().enumerate() {
            if !(hole && (PAGE..2 * PAGE).contains(&i)) {
                *b = pattern(seed, i);
            }
        }
        libc::shmdt(at);
    }
    Ok(())
}

/// What differs in segment `id` from `fill`'s pattern.
fn check_fill(id: i32, size: usize, seed: u8, hole: bool) -> Option<String> {
    // SAFETY: shmat maps the segment read-only; we read inside its size,
    // then detach.
    unsafe {
        let at = libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY);
        if at as isize == -1 {
            return Some(os_err("shmat"));
        }
        let bytes = std::slice::from_raw_parts(at as *const u8, size);
        let bad = bytes.iter().enumerate().find_map(|(i, &b)| {
            let want = if hole && (PAGE..2 * PAGE).contains(&i) {
                0
            } else {
                pattern(seed, i)
            };
            (b != want).then(|| format!("segment {id}: byte {i} is {b:#x}, not {want:#x}"))
        });
        libc::shmdt(at);
        bad
    }
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

struct Made {
    shm: i32,
    private: i32,
    sem: i32,
    msg: i32,
}

fn make() -> Result<Made, String> {
    for (name, v) in [("shmmni", SHMMNI), ("msgmnb", MSGMNB)] {
        std::fs::write(format!("/proc/sys/kernel/{name}"), v)
            .map_err(|e| format!("kernel.{name}: {e}"))?;
    }
    // SAFETY: the System V calls take plain values and pointers to live
    // locals of the types they expect.
    unsafe {
        // One object of each kind made and removed first: the ids below
        // are not the ones a fresh namespace hands out first.
        let ids = (
            libc::shmget(libc::IPC_PRIVATE, PAGE, libc::IPC_CREAT | 0o600),
            libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | 0o600),
            libc::msgget(libc::IPC_PRIVATE, libc::IPC_CREAT | 0o600),
        );
        libc::shmctl(ids.0, libc::IPC_RMID, std::ptr::null_mut());
        libc::semctl(ids.1, 0, libc::IPC_RMID);
        libc::msgctl(ids.2, libc::IPC_RMID, std::ptr::null_mut());
        let shm = libc::shmget(SHM_KEY, SHM_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o640);
        let private = libc::shmget(libc::IPC_PRIVATE, 2 * PAGE, libc::IPC_CREAT | 0o600);
        if shm < 0 || private < 0 {
            return Err(os_err("shmget"));
        }
        fill(shm, SHM_SIZE, 7, true)?;
        fill(private, 2 * PAGE, 99, false)?;
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        libc::shmctl(shm, libc::IPC_STAT, &mut ds);
        ds.shm_perm.uid = 1000;
        ds.shm_perm.gid = 1001;
        if libc::shmctl(shm, libc::IPC_SET, &mut ds) != 0 {
            return Err(os_err("shmctl(IPC_SET)"));
        }
        let sem = libc::semget(SEM_KEY, 3, libc::IPC_CREAT | libc::IPC_EXCL | 0o600);
        if sem < 0 || libc::semctl(sem, 0, 17, SEMS.as_ptr()) != 0 {
            return Err(os_err("semget/SETALL"));
        }
        let msg = libc::msgget(MSG_KEY, libc::IPC_CREAT | libc::IPC_EXCL | 0o620);
        if msg < 0 {
            return Err(os_err("msgget"));
        }
        for (t, text) in MESSAGES {
            let mut buf = t.to_ne_bytes().to_vec();
            buf.extend_from_slice(text.as_bytes());
            if libc::msgsnd(msg, buf.as_ptr().cast(), text.len(), 0) != 0 {
                return Err(os_err("msgsnd"));
            }
        }
        Ok(Made {
            shm,
            private,
            sem,
            msg,
        })
    }
}

fn sem_values(id: i32) -> Vec<u16> {
    let mut v = [0u16; 3];
    // SAFETY: GETALL writes three unsigned shorts.
    unsafe { libc::semctl(id, 0, 13, v.as_mut_ptr()) };
    v.to_vec()
}

fn check(m: &Made, fails: &mut Vec<String>) {
    // SAFETY: as in make.
    let (shm, sem, msg) = unsafe {
        (
            libc::shmget(SHM_KEY, 0, 0),
            libc::semget(SEM_KEY, 0, 0),
            libc::msgget(MSG_KEY, 0),
        )
    };
    if (shm, sem, msg) != (m.shm, m.sem, m.msg) {
        fails.push(format!(
            "ids by key: shm {shm} sem {sem} msg {msg}, made as {} {} {}",
            m.shm, m.sem, m.msg
        ));
        return;
    }
    // SAFETY: IPC_STAT fills the local.
    let ds = unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        libc::shmctl(shm, libc::IPC_STAT, &mut ds);
        ds
    };
    let got = (
        ds.shm_segsz,
        ds.shm_perm.mode & 0o777,
        ds.shm_perm.uid,
        ds.shm_perm.gid,
    );
    if got != (SHM_SIZE, 0o640, 1000, 1001) {
        fails.push(format!("segment {shm}: size, mode, owner {got:?}"));
    }
    fails.extend(check_fill(shm, SHM_SIZE, 7, true));
    fails.extend(check_fill(m.private, 2 * PAGE, 99, false));
    if sem_values(sem) != SEMS {
        fails.push(format!("semaphores {:?}", sem_values(sem)));
    }
    for (i, (t, text)) in MESSAGES.iter().enumerate() {
        let mut buf = [0u8; 8 + 256];
        // SAFETY: msgrcv writes at most 8 + 256 bytes into `buf`.
        let n = unsafe { libc::msgrcv(msg, buf.as_mut_ptr().cast(), 256, 0, libc::IPC_NOWAIT) };
        let mtype = i64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
        let body = if n >= 0 {
            String::from_utf8_lossy(&buf[8..8 + n as usize]).into_owned()
        } else {
            os_err("msgrcv")
        };
        if n < 0 || mtype != *t || body != *text {
            fails.push(format!("message {i}: type {mtype}, text {body:?}"));
        }
    }
    for (name, v) in [("shmmni", SHMMNI), ("msgmnb", MSGMNB)] {
        if sysctl(name) != v {
            fails.push(format!("kernel.{name} is {}, not {v}", sysctl(name)));
        }
    }
}

const MQ_NAME: &std::ffi::CStr = c"/cryo-wl-ipc";
const MQ_MESSAGES: [(u32, &str); 3] = [(1, "low"), (7, "high"), (1, "low, later")];

/// The POSIX message queue with its messages; its descriptor.
fn make_mqueue() -> Result<i32, String> {
    // SAFETY: zeroed is a valid mq_attr; the two limits are set.
    let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
    attr.mq_maxmsg = 5;
    attr.mq_msgsize = 64;
    // SAFETY: mq_open reads the name and, with O_CREAT, a mode and the
    // attributes, which live across the call.
    let q = unsafe {
        libc::mq_open(
            MQ_NAME.as_ptr(),
            libc::O_CREAT | libc::O_RDWR | libc::O_NONBLOCK,
            0o640,
            &attr as *const libc::mq_attr,
        )
    };
    if q < 0 {
        return Err(os_err("mq_open"));
    }
    // SAFETY: fchown and fchmod of the queue's descriptor; mq_send reads
    // each message's bytes.
    unsafe {
        if libc::fchown(q, 1000, 1001) != 0 || libc::fchmod(q, 0o640) != 0 {
            return Err(os_err("owner of the queue"));
        }
        for (prio, text) in MQ_MESSAGES {
            if libc::mq_send(q, text.as_ptr().cast(), text.len(), prio) != 0 {
                return Err(os_err("mq_send"));
            }
        }
    }
    Ok(q)
}

fn check_mqueue(q: i32, fails: &mut Vec<String>) {
    // SAFETY: zeroed is a valid mq_attr and stat, which the calls fill.
    let (mut attr, mut st): (libc::mq_attr, libc::stat) = unsafe { std::mem::zeroed() };
    // SAFETY: the calls fill our local structs from our descriptor.
    let ok = unsafe { libc::mq_getattr(q, &mut attr) == 0 && libc::fstat(q, &mut st) == 0 };
    let got = (
        attr.mq_maxmsg,
        attr.mq_msgsize,
        attr.mq_curmsgs,
        attr.mq_flags & libc::O_NONBLOCK as i64,
    );
    if !ok || got != (5, 64, 3, libc::O_NONBLOCK as i64) {
        fails.push(format!("the queue's attributes are {got:?} ({ok})"));
    }
    if (st.st_uid, st.st_gid, st.st_mode & 0o777) != (1000, 1001, 0o640) {
        fails.push(format!(
            "the queue's owner and mode are {}:{} {:o}",
            st.st_uid,
            st.st_gid,
            st.st_mode & 0o777
        ));
    }
    let mut want: Vec<(u32, &str)> = MQ_MESSAGES.to_vec();
    want.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (prio, text) in want {
        let mut buf = [0u8; 64];
        let mut p = 0u32;
        // SAFETY: mq_receive writes at most 64 bytes into `buf`.
        let n = unsafe { libc::mq_receive(q, buf.as_mut_ptr().cast(), buf.len(), &mut p) };
        let got = (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned());
        if got.as_deref() != Some(text) || p != prio {
            fails.push(format!(
                "the queue gave {got:?} at priority {p}, not {text:?} at {prio}"
            ));
        }
    }
}

/// Where the parent writes NEW_BYTE through its attachment, which the
/// child must then read through its own.
const SHARED_BYTE: usize = 2 * PAGE + 7;
const NEW_BYTE: u8 = 0xa5;

/// The attachment at `at` shows the segment's pattern, the segment counts
/// both processes' attachments, and NEW_BYTE goes in for the child to see.
fn check_attached(id: i32, at: usize, fails: &mut Vec<String>) {
    // SAFETY: the attachment holds SHM_SIZE bytes at `at` for the
    // process's life.
    let bytes = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, SHM_SIZE) };
    let want = |i: usize| {
        if (PAGE..2 * PAGE).contains(&i) {
            0
        } else {
            pattern(7, i)
        }
    };
    if let Some(i) = (0..SHM_SIZE).find(|&i| bytes[i] != want(i)) {
        fails.push(format!(
            "the attachment's byte {i} is {:#x}, not {:#x}",
            bytes[i],
            want(i)
        ));
    }
    // SAFETY: zeroed is a valid shmid_ds, which IPC_STAT fills.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes into our local struct.
    if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } != 0 || ds.shm_nattch != 2 {
        fails.push(format!(
            "the segment has {} attachments, not 2",
            ds.shm_nattch
        ));
    }
    bytes[SHARED_BYTE] = NEW_BYTE;
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let host = ipc_ns();
    // SAFETY: unshare takes a flag.
    if unsafe { libc::unshare(libc::CLONE_NEWIPC) } != 0 {
        return Err(os_err("unshare(CLONE_NEWIPC)"));
    }
    let made = make()?;
    // SAFETY: shmat maps the keyed segment somewhere free; it stays
    // attached (the child inherits it) for the process's life.
    let at = unsafe { libc::shmat(made.shm, std::ptr::null(), 0) } as usize;
    if at as isize == -1 {
        return Err(os_err("shmat"));
    }
    if a.get("partial") == Some("1") {
        // SAFETY: shmat maps the private segment somewhere free; its
        // second page is unmapped at once, the rest stays attached.
        unsafe {
            let p = libc::shmat(made.private, std::ptr::null(), 0);
            if p as isize == -1 || libc::munmap(p.cast::<u8>().add(PAGE).cast(), PAGE) != 0 {
                return Err(os_err("a part of the private segment"));
            }
        }
    }
    let mq = if a.get("mqueue") == Some("1") {
        Some(make_mqueue()?)
    } else {
        None
    };
    let (cmd, back) = (wl::pipe()?, wl::pipe()?);
    // SAFETY: fork of this single-threaded process; the child answers
    // with its namespace and the semaphores' values until `cmd` closes.
    let c = unsafe { libc::fork() };
    if c == 0 {
        // SAFETY: closing the write end of our command pipe.
        unsafe { libc::close(cmd[1]) };
        let mut b = [0u8; 1];
        while wl::read_exact(cmd[0], &mut b) {
            // SAFETY: semget by key takes plain values.
            let id = unsafe { libc::semget(SEM_KEY, 0, 0) };
            // SAFETY: the attachment inherited from the parent holds
            // SHM_SIZE bytes at `at`.
            let seen = unsafe { *((at + SHARED_BYTE) as *const u8) };
            wl::write_fd(
                back[1],
                format!("{} {:?} {seen:#x}\n", ipc_ns(), sem_values(id)).as_bytes(),
            );
        }
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) }
    }
    if c < 0 {
        return Err(os_err("fork"));
    }
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let mine = ipc_ns();
    if mine == host || mine.is_empty() {
        fails.push(format!("the parent is in the host's IPC namespace {mine}"));
    }
    check(&made, &mut fails);
    check_attached(made.shm, at, &mut fails);
    wl::write_fd(cmd[1], b"?");
    let mut said = Vec::new();
    let mut b = [0u8; 1];
    while wl::read_exact(back[0], &mut b) && b[0] != b'\n' {
        said.push(b[0]);
    }
    let said = String::from_utf8_lossy(&said).into_owned();
    let want = format!("{mine} {:?} {NEW_BYTE:#x}", SEMS.to_vec());
    if said != want {
        fails.push(format!("the child says {said:?}, not {want:?}"));
    }
    if let Some(q) = mq {
        check_mqueue(q, &mut fails);
    }
    // SAFETY: closing our command pipe ends the child; then wait for it.
    unsafe {
        libc::close(cmd[1]);
        libc::waitpid(c, std::ptr::null_mut(), 0);
    }
    Ok(fails)
}

fn main() {
    let usage = "wl_ipc --ready FILE --verdict FILE [--mqueue 1] [--partial 1]";
    let a = wl::Args::parse(usage);
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
