//! Step g: `cryo migrate` of a fresh workload to a `cryo page-server
//! --restore` over loopback TCP (both hosts are this one), against a plain
//! copy of the same memory over a loopback TCP connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::procs::*;
use super::{Env, Figures};

/// A loopback port free now.
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// The number before `unit` after `key` in `text` ("stop time 12.3 ms").
fn figure(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    let num: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

pub(super) fn migration(
    env: &mut Env,
    run_dir: &Path,
    content: &[u8],
    f: &mut Figures,
) -> Result<(), String> {
    let port = free_port()?;
    let dest = run_dir.join("mig-dest");
    let mut server = Command::new(&env.cryo)
        .args([
            "page-server",
            "--restore",
            "--address",
            "127.0.0.1",
            "--port",
        ])
        .arg(port.to_string())
        .arg("-D")
        .arg(&dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting cryo page-server: {e}"))?;
    let up = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let res = (|| {
        if !up {
            return Err("cryo page-server did not listen".to_string());
        }
        let w = start_workload(env, &run_dir.join("wl-mig"))?;
        // Both ends are this host: the task killed here is reaped at once,
        // before the other end restores its pid.
        let pid = w.pid;
        let reaper = std::thread::spawn(move || {
            let mut status = 0;
            // SAFETY: waitpid writes one int into `status`, a live local.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        });
        let out = Command::new(&env.cryo)
            .args(["migrate", "-t", &pid.to_string(), "--to"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-D")
            .arg(run_dir.join("mig-work"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running cryo migrate: {e}"))?;
        let _ = reaper.join();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "cryo migrate failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        println!("    {}", said.trim());
        register_pid(pid);
        for (k, key) in [("mig.stop_ms", "stop time"), ("mig.total_ms", "total")] {
            if let Some(v) = figure(&said, key) {
                f.insert(k.into(), v);
            }
        }
        if let Some(at) = said.find(" bytes sent") {
            let head = &said[..at];
            let n: String = head
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(v) = n.chars().rev().collect::<String>().parse::<f64>() {
                f.insert("mig.bytes".into(), v);
            }
        }
        finish_workload(&w, "migrated task")
    })();
    let _ = server.kill();
    let _ = server.wait();
    if !env.keep {
        let _ = std::fs::remove_dir_all(&dest);
        let _ = std::fs::remove_dir_all(run_dir.join("mig-work"));
    }
    res?;
    let ms = tcp_copy(content)?;
    println!("    baseline: the same memory over loopback TCP into fresh memory {ms:.1} ms");
    f.insert("base.tcp_ms".into(), ms);
    Ok(())
}

/// A plain copy of `content` over a loopback TCP connection into fresh
/// memory: its time.
fn tcp_copy(content: &[u8]) -> Result<f64, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let at = l.local_addr().map_err(|e| e.to_string())?;
    let len = content.len();
    let t = Instant::now();
    let rx = std::thread::spawn(move || -> Result<usize, String> {
        let (mut c, _) = l.accept().map_err(|e| e.to_string())?;
        let mut into = vec![0u8; len];
        c.read_exact(&mut into).map_err(|e| e.to_string())?;
        Ok(std::hint::black_box(into).len())
    });
    let mut c = TcpStream::connect(at).map_err(|e| e.to_string())?;
    c.write_all(content).map_err(|e| e.to_string())?;
    drop(c);
    rx.join()
        .map_err(|_| "the receiver panicked".to_string())??;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}
