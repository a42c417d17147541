//! The page server: `cryo page-server` on the destination takes the
//! images of a pre-dump and of the dump after it over TCP (loopback, in
//! a network namespace of the test's own), and the tree restores there;
//! malformed or broken input leaves nothing and the server goes on.
//! `cryo migrate` does it all in one command, against `cryo page-server
//! --restore`, and leaves the tree running where it was if the
//! destination fails it.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use cryo_tests::*;

/// The holder a pre-dump left, killed by its pid.
fn kill_holder(img: &Path) {
    if let Ok(pid) = std::fs::read_to_string(img.join("track.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill takes integers; the pid is our holder's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// pre-dump and dump of memory rewritten all the time, both sent to the
/// page server (their pages files do not stay on the source); the tree
/// restores from the server's directory, one instant's memory.
#[test]
fn pre_dump_and_dump_through_the_page_server() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let dest = dir.subdir("dest");
    let mut server = PageServer::start(&dest, 7090, &[]);
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    std::thread::sleep(Duration::from_millis(800));
    let to = ["--page-server", "--address", "127.0.0.1", "--port", "7090"];
    let pre = dir.subdir("pre");
    let pid = wl.pid().to_string();
    let mut args = vec!["pre-dump", "-t", &pid, "-D", pre.to_str().expect("utf-8")];
    args.extend_from_slice(&to);
    let out = run_cryo(&args, &[]);
    assert_cryo_ok(&out, "cryo pre-dump --page-server");
    std::thread::sleep(Duration::from_millis(300));
    let img = dir.subdir("img");
    let mut extra = vec!["--prev-images-dir", "../pre"];
    extra.extend_from_slice(&to);
    dump_and_reap(&mut wl, &guard, &img, &extra);
    kill_holder(&pre);
    assert!(server
        .ended(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let left: Vec<String> = std::fs::read_dir(&img)
        .expect("the source image")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pages-"))
        .collect();
    assert!(
        left.is_empty(),
        "pages files stayed on the source: {left:?}"
    );
    let there = dest.join("img");
    let verify = run_cryo(&["image", "verify", there.to_str().expect("utf-8")], &[]);
    assert_cryo_ok(&verify, "cryo image verify on the destination");
    restore_ok(&mut wl, &there);
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass("restored from the page server's images");
}

/// Frames the server must refuse: nothing is written, outside its
/// directory or in it, and it goes on taking connections.
#[test]
fn malformed_and_broken_input_is_refused() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let dest = dir.subdir("dest");
    let mut server = PageServer::start(&dest, 7091, &[]);
    let frame = |ty: u32, payload: &[u8]| {
        let mut f = ty.to_le_bytes().to_vec();
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        f.extend_from_slice(payload);
        f
    };
    let file = |name: &str, size: u64| {
        let mut p = (name.len() as u16).to_le_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        frame(2, &p)
    };
    let hello = |name: &str| {
        let mut p = b"CRYO-PS1".to_vec();
        p.extend_from_slice(name.as_bytes());
        frame(1, &p)
    };
    let sessions: Vec<Vec<u8>> = vec![
        // Garbage.
        (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
        // A huge frame length.
        [
            frame(1, b"CRYO-PS1x")[..8].to_vec(),
            u64::MAX.to_le_bytes().to_vec(),
        ]
        .concat(),
        // An image name with a slash, and one going up.
        hello("../escape"),
        hello("a/b"),
        // A file name going up, a file cut short by the connection's end,
        // a parent link pointing far away, a wrong checksum.
        [hello("img1"), file("../../escaped", 4), b"evil".to_vec()].concat(),
        [hello("img2"), file("pages-1.img", 1000), vec![7; 10]].concat(),
        [hello("img3"), frame(3, b"../../../etc")].concat(),
        [
            hello("img4"),
            file("inventory.img", 4),
            b"abcd".to_vec(),
            frame(4, &[1]),
        ]
        .concat(),
    ];
    for s in &sessions {
        let mut c = TcpStream::connect(("127.0.0.1", 7091)).expect("connecting to the server");
        let _ = c.write_all(s);
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        server.ended(Duration::from_millis(10)).is_none(),
        "the server ended"
    );
    let inside: Vec<String> = std::fs::read_dir(&dest)
        .expect("the server's directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(inside.is_empty(), "the server kept {inside:?}");
    for gone in ["escape", "escaped"] {
        assert!(
            !dir.join(gone).exists() && !dir.path().parent().is_some_and(|p| p.join(gone).exists())
        );
    }
}

/// cryo migrate of memory rewritten all the time: pre-copy rounds, the
/// stop, the restore by the page server; the tree runs on (same pid) with
/// one instant's memory, and the stop time is printed.
#[test]
fn migrate_to_a_restoring_page_server() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let dir = TestDir::new();
    let dest = dir.subdir("dest");
    let mut server = PageServer::start(&dest, 7092, &["--restore"]);
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    std::thread::sleep(Duration::from_millis(800));
    let work = dir.subdir("work");
    let out = migrate(&mut wl, "127.0.0.1:7092", &work);
    assert_cryo_ok(&out, "cryo migrate");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("stop time") && said.contains("restored in"),
        "migrate said: {said}"
    );
    eprintln!("{said}");
    assert!(server
        .ended(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass("migrated to the page server");
    drop(guard);
}

/// A destination that takes the connection and says nothing: migrate
/// fails naming it, and the tree runs on here untouched.
#[test]
fn migrate_to_a_broken_destination_leaves_the_tree_running() {
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:7093").expect("a listener of the test's");
    let closer = std::thread::spawn(move || {
        for c in l.incoming().take(1) {
            drop(c);
        }
    });
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let _guard = TreeGuard::new(tree_pids(wl.pid()));
    let work = dir.subdir("work");
    let pid = wl.pid().to_string();
    let out = run_cryo(
        &[
            "migrate",
            "-t",
            &pid,
            "--to",
            "127.0.0.1:7093",
            "-D",
            work.to_str().expect("utf-8"),
        ],
        &[],
    );
    let _ = closer.join();
    assert!(
        !out.status.success(),
        "migrate to a broken destination succeeded"
    );
    assert!(
        stderr_of(&out).contains("runs on here"),
        "{}",
        stderr_of(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    wl.assert_pass("after a failed migration");
}

/// A destination that takes the pre-copy rounds but refuses the last
/// image (as one whose restore fails would): migrate restores the tree
/// where it was, from the images it kept, and says so.
#[test]
fn migrate_restores_here_when_the_destination_refuses_the_last_image() {
    use std::io::Read;
    if !own_network_namespace(&["ip"]) {
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:7094").expect("a listener of the test's");
    // A destination of the test's: it reads every frame, answers OK to a
    // pre-dump's END and ERROR to the last image's.
    let dest = std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            loop {
                let mut head = [0u8; 16];
                if c.read_exact(&mut head).is_err() {
                    break;
                }
                let ty = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
                let len = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
                let mut p = vec![0u8; len as usize];
                if c.read_exact(&mut p).is_err() {
                    break;
                }
                if ty == 2 {
                    // FILE: its bytes follow.
                    let n = p[0] as usize | (p[1] as usize) << 8;
                    let size = u64::from_le_bytes(p[2 + n..10 + n].try_into().unwrap_or_default());
                    let _ = std::io::copy(&mut (&mut c).take(size), &mut std::io::sink());
                }
                if ty == 4 {
                    let last = p.first() == Some(&1);
                    let (t, msg): (u32, &[u8]) = if last {
                        (6, b"refused by the test")
                    } else {
                        (5, b"")
                    };
                    let mut f = t.to_le_bytes().to_vec();
                    f.extend_from_slice(&[0; 4]);
                    f.extend_from_slice(&(msg.len() as u64).to_le_bytes());
                    f.extend_from_slice(msg);
                    let _ = c.write_all(&f);
                    if last {
                        return;
                    }
                    break;
                }
            }
        }
    });
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    std::thread::sleep(Duration::from_millis(800));
    let work = dir.subdir("work");
    let out = migrate(&mut wl, "127.0.0.1:7094", &work);
    let _ = dest.join();
    assert!(
        !out.status.success(),
        "migrate to a refusing destination succeeded"
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("restored here") && err.contains("refused by the test"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass("restored where it was after a refused migration");
    drop(guard);
}

/// Two hosts: this test's network namespace and one more it makes, a veth
/// pair between them (10.77.0.1 here, 10.77.0.2 there, addresses of the
/// test's own namespaces). The page server runs over there; migrate
/// moves the tree across and it runs on there.
#[test]
fn migrate_between_two_network_namespaces() {
    if !own_network_namespace(&["ip", "nsenter"]) {
        return;
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The other host: a namespace a sleeper of the test's holds.
    let mut holder = std::process::Command::new("unshare")
        .args(["-n", "sleep", "600"])
        .spawn()
        .expect("a network namespace of the test's");
    let there = holder.id().to_string();
    std::thread::sleep(Duration::from_millis(100));
    run(&[
        "ip", "link", "add", "mig0", "type", "veth", "peer", "name", "mig1", "netns", &there,
    ]);
    run(&["ip", "addr", "add", "10.77.0.1/24", "dev", "mig0"]);
    run(&["ip", "link", "set", "mig0", "up"]);
    for cmd in [
        &["ip", "addr", "add", "10.77.0.2/24", "dev", "mig1"][..],
        &["ip", "link", "set", "mig1", "up"],
        &["ip", "link", "set", "lo", "up"],
    ] {
        let mut a = vec!["nsenter", "-t", &there, "-n"];
        a.extend_from_slice(cmd);
        run(&a);
    }
    let dir = TestDir::new();
    let dest = dir.subdir("dest");
    let mut server = std::process::Command::new("nsenter")
        .args(["-t", &there, "-n"])
        .arg(cryo_bin())
        .args([
            "page-server",
            "--restore",
            "--address",
            "10.77.0.2",
            "--port",
            "7095",
            "-D",
        ])
        .arg(&dest)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("the page server over there");
    let mut wl = Workload::start("wl_sweep", &["--mib", "4", "--pace", "30000"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    std::thread::sleep(Duration::from_millis(800));
    let work = dir.subdir("work");
    let out = migrate(&mut wl, "10.77.0.2:7095", &work);
    let ended = (0..500).find_map(|_| {
        std::thread::sleep(Duration::from_millis(20));
        server.try_wait().ok().flatten()
    });
    let _ = holder.kill();
    let _ = holder.wait();
    assert_cryo_ok(&out, "cryo migrate to the other namespace");
    assert!(
        ended.is_some_and(|s| s.success()),
        "the page server over there: {ended:?}"
    );
    // It runs over there now.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    assert_ne!(
        ns(&wl.pid().to_string()),
        ns("self"),
        "the tree runs in this namespace still"
    );
    std::thread::sleep(Duration::from_millis(600));
    wl.assert_pass("migrated to the other network namespace");
    drop(guard);
}

/// `cryo migrate` of `wl` to `to`, its work files in `work`. Both hosts
/// are this one: the killed tree (the test's child) is reaped the moment
/// it dies, before the destination restores its pid.
fn migrate(wl: &mut Workload, to: &str, work: &std::path::Path) -> std::process::Output {
    let raw = wl.pid();
    let reaper = std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waitpid writes one int into `status`, a live local.
        unsafe { libc::waitpid(raw, &mut status, 0) };
    });
    let pid = raw.to_string();
    let out = run_cryo(
        &[
            "migrate",
            "-t",
            &pid,
            "--to",
            to,
            "-D",
            work.to_str().expect("utf-8"),
        ],
        &[],
    );
    let _ = reaper.join();
    wl.mark_running();
    out
}
