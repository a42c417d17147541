//! `cryo swrk FD`, CRIU's RPC service as runc and crun use it: requests
//! encoded here from the schema (image-format/proto/rpc.proto) over a
//! SOCK_SEQPACKET pair; VERSION, FEATURE_CHECK, a DUMP and a RESTORE of a
//! real workload by descriptors of the image directory; malformed
//! requests (garbage, truncated, unknown type, too large, empty) each get
//! a failed response naming the problem, never a crash.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use cryo_image::proto::rpc::{CriuOpts, CriuReq, CriuReqType, CriuResp};
use cryo_tests::*;
use prost::Message;

/// A `cryo swrk 3` of the test's with its end of a socket pair, and each
/// (descriptor of the test's, number there) of `extra`.
struct Swrk {
    child: std::process::Child,
    sock: OwnedFd,
}

impl Swrk {
    fn start(extra: &[(i32, i32)]) -> Swrk {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, a live
        // array.
        let made = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(made, 0, "socketpair");
        // SAFETY: both were just made and are owned by nothing else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let raw = theirs.as_raw_fd();
        let keep: Vec<(i32, i32)> = extra.to_vec();
        let mut cmd = std::process::Command::new(cryo_bin());
        cmd.args(["swrk", "3"]).stdin(std::process::Stdio::null());
        // SAFETY: only dup2 and fcntl, async-signal-safe, on descriptors
        // the child inherited (the fork copied them while held).
        unsafe {
            cmd.pre_exec(move || {
                for &(fd, at) in &keep {
                    if libc::dup2(fd, at) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting cryo swrk");
        drop(theirs);
        Swrk { child, sock: ours }
    }

    /// Send `bytes` as one message and read the response.
    fn ask(&mut self, bytes: &[u8]) -> CriuResp {
        // SAFETY: the kernel reads bytes.len() bytes of a live slice.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(
            n,
            bytes.len() as isize,
            "sending the request: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: the kernel writes at most buf.len() bytes into `buf`.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n > 0, "no response: {}", std::io::Error::last_os_error());
        CriuResp::decode(&buf[..n as usize]).expect("a response of the schema")
    }

    /// It ends, successfully, within 10 s.
    fn ends(mut self) {
        for _ in 0..500 {
            if let Ok(Some(s)) = self.child.try_wait() {
                assert!(s.success(), "cryo swrk ended with {s}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("cryo swrk did not end");
    }
}

fn req(ty: CriuReqType, opts: Option<CriuOpts>) -> Vec<u8> {
    CriuReq {
        r#type: Some(ty as i32),
        opts,
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn version_and_features() {
    let mut s = Swrk::start(&[]);
    let r = s.ask(&req(CriuReqType::Version, None));
    assert!(r.success, "{r:?}");
    let v = r.version.expect("a version");
    assert_eq!((v.major_number, v.minor_number), (4, 2));
    assert_eq!(v.name.as_deref(), Some("cryo"));
    s.ends();
    let mut s = Swrk::start(&[]);
    let r = s.ask(&req(CriuReqType::FeatureCheck, None));
    assert!(
        r.success && r.features.is_some_and(|f| f.mem_track == Some(true)),
        "{r:?}"
    );
    s.ends();
}

#[test]
fn malformed_requests_get_failed_responses() {
    let huge = vec![0x08u8; 100 << 10];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            (0..64u32).map(|i| (i * 89 % 251) as u8 | 0x80).collect(),
        ),
        (
            "truncated",
            req(CriuReqType::Dump, Some(CriuOpts::default()))[..3].to_vec(),
        ),
        (
            "unknown type",
            CriuReq {
                r#type: Some(99),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        ("too large", huge),
        ("dump without options", req(CriuReqType::Dump, None)),
        (
            "dump of no directory",
            req(
                CriuReqType::Dump,
                Some(CriuOpts {
                    images_dir_fd: Some(987),
                    pid: Some(1),
                    ..Default::default()
                }),
            ),
        ),
        ("notify unasked", req(CriuReqType::Notify, None)),
    ];
    for (what, bytes) in cases {
        let mut s = Swrk::start(&[]);
        let r = s.ask(&bytes);
        assert!(!r.success, "{what}: {r:?}");
        assert!(
            r.cr_errmsg.as_deref().is_some_and(|m| !m.is_empty()),
            "{what}: {r:?}"
        );
        s.ends();
    }
}

/// A DUMP by RPC of a real workload, its image directory a descriptor
/// of the test's (the caller's, as with CRIU: read through /proc), then a
/// RESTORE the same way: the response names the restored pid, and the
/// workload checks itself.
#[test]
fn dump_and_restore_by_rpc() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "4"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let img = dir.subdir("img");
    let d = std::fs::File::open(&img).expect("the image directory");
    let dfd = d.as_raw_fd();
    let opts = CriuOpts {
        images_dir_fd: Some(dfd),
        pid: Some(wl.pid()),
        ..Default::default()
    };
    let mut s = Swrk::start(&[]);
    let r = s.ask(&req(CriuReqType::Dump, Some(opts.clone())));
    assert!(r.success, "DUMP: {r:?}");
    s.ends();
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    let mut s = Swrk::start(&[]);
    let r = s.ask(&req(
        CriuReqType::Restore,
        Some(CriuOpts { pid: None, ..opts }),
    ));
    wl.mark_running();
    assert!(r.success, "RESTORE: {r:?}");
    assert_eq!(r.restore.map(|x| x.pid), Some(wl.pid()));
    s.ends();
    wl.assert_pass("restored by RPC");
}

impl Swrk {
    /// Send a request, then answer each NOTIFY with `answer(step, pid)`
    /// (true: success) until the request's own response, returned with
    /// the steps told.
    fn ask_notified(
        &mut self,
        bytes: &[u8],
        mut answer: impl FnMut(&str, i32) -> bool,
    ) -> (CriuResp, Vec<String>) {
        let mut steps = Vec::new();
        let mut r = self.ask(bytes);
        while r.r#type == CriuReqType::Notify as i32 {
            assert!(r.success, "a NOTIFY without success: {r:?}");
            let n = r.notify.clone().expect("a NOTIFY names its step");
            let step = n.script.unwrap_or_default();
            let ok = answer(&step, n.pid.unwrap_or(0));
            steps.push(step);
            let back = CriuReq {
                r#type: Some(CriuReqType::Notify as i32),
                notify_success: Some(ok),
                ..Default::default()
            };
            r = self.ask(&back.encode_to_vec());
        }
        (r, steps)
    }
}

/// The image directory, the test's descriptor of it, and the options of
/// a DUMP of `wl` into it with notifications.
fn notified_dump(dir: &TestDir, wl: &Workload) -> (std::path::PathBuf, std::fs::File, CriuOpts) {
    let img = dir.subdir("img");
    let d = std::fs::File::open(&img).expect("the image directory");
    let opts = CriuOpts {
        images_dir_fd: Some(d.as_raw_fd()),
        pid: Some(wl.pid()),
        notify_scripts: Some(true),
        ..Default::default()
    };
    (img, d, opts)
}

/// With notify_scripts, each step of a DUMP and a RESTORE is told in
/// CRIU's order and waits for the caller's answer; with rst_sibling the
/// restored root is the caller's child (checked while the restore waits
/// on post-restore, every task still stopped).
#[test]
fn notifications_in_order_and_sibling_root() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "4"], &dir);
    let guard = TreeGuard::new(tree_pids(wl.pid()));
    let (_img, _d, opts) = notified_dump(&dir, &wl);
    let mut s = Swrk::start(&[]);
    let (r, steps) = s.ask_notified(&req(CriuReqType::Dump, Some(opts.clone())), |_, _| true);
    assert!(r.success, "DUMP: {r:?}");
    assert_eq!(steps, ["pre-dump", "network-lock", "post-dump"]);
    s.ends();
    assert!(reap_gone(guard.pids(), Duration::from_secs(10)));
    let mut s = Swrk::start(&[]);
    let mut parent_at_post_restore = None;
    let restore = CriuOpts {
        pid: None,
        rst_sibling: Some(true),
        ..opts
    };
    let (r, steps) = s.ask_notified(&req(CriuReqType::Restore, Some(restore)), |step, pid| {
        if step == "post-restore" {
            parent_at_post_restore = proc_status_field(pid, "PPid");
        }
        true
    });
    wl.mark_running();
    assert!(r.success, "RESTORE: {r:?}");
    assert_eq!(steps, RESTORE_STEPS);
    assert_eq!(
        parent_at_post_restore,
        Some(std::process::id().to_string()),
        "with rst_sibling the root is the caller's child"
    );
    s.ends();
    wl.assert_pass("restored by RPC as the caller's child");
}

/// A caller that answers post-dump with a failure fails the DUMP: the
/// tree runs on as before (its own check passes), and no image is left.
#[test]
fn failed_notification_leaves_the_tree_running() {
    let dir = TestDir::new();
    let mut wl = Workload::start("wl_bench", &["--mib", "4"], &dir);
    let (img, _d, opts) = notified_dump(&dir, &wl);
    let mut s = Swrk::start(&[]);
    let (r, steps) = s.ask_notified(&req(CriuReqType::Dump, Some(opts)), |step, _| {
        step != "post-dump"
    });
    assert!(!r.success, "DUMP succeeded: {r:?}");
    let why = r.cr_errmsg.unwrap_or_default();
    assert!(why.contains("post-dump"), "{why}");
    assert_eq!(
        steps,
        ["pre-dump", "network-lock", "post-dump", "network-unlock"]
    );
    s.ends();
    assert!(pid_alive(wl.pid()), "the dumped task is gone");
    let left: Vec<String> = std::fs::read_dir(&img)
        .expect("the image directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(left.is_empty(), "a failed dump left {left:?}");
    wl.assert_pass("after a refused post-dump");
}
