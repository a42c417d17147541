//! `cryo swrk FD`: CRIU's RPC service, as container runtimes (runc, crun)
//! start `criu swrk FD` and talk to it over the SOCK_SEQPACKET socket FD.
//! Each message is one protobuf CriuReq (image-format/proto/rpc.proto);
//! each is answered with one CriuResp. A request that cannot be decoded,
//! is too large, or asks for what cryo does not do gets a response with
//! success false and the reason in cr_errmsg (and in the request's log
//! file), never a crash. The service ends after a request unless it asked
//! to keep the connection open, or when the peer closes it.
//!
//! As CRIU's, the descriptors a request names for directories
//! (images_dir_fd, work_dir_fd) and status_fd are the caller's (read
//! through /proc/PEER/fd, the peer from SO_PEERCRED); inherit_fd ones are
//! the service's own (the caller passed them when it started it).
//!
//! Served: VERSION (cryo answers as CRIU 4.2, the version whose options it
//! takes), CHECK, FEATURE_CHECK, DUMP, PRE_DUMP and RESTORE (see
//! [`ops`]), with NOTIFY messages at each step when notify_scripts is set
//! (see cryo_engine::notify), each answered by the caller before cryo goes
//! on. Not yet: the page server and lazy pages through RPC, the pty
//! master of an orphan pty (orphan-pts-master).

mod ops;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use cryo_image::proto::rpc::{
    CriuFeatures, CriuNotify, CriuOpts, CriuReq, CriuReqType, CriuResp, CriuVersion,
};
use prost::Message;

/// The largest request taken (runc's are a few KiB).
const MAX_REQUEST: usize = 64 << 10;

/// The log file the current request named (log_file in its work
/// directory), where the service's log goes; stderr until one is named.
static LOG: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// The writer the service's log goes through (see LOG).
pub struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match LOG.lock().map(|mut l| l.as_mut().map(|f| f.write(buf))) {
            Ok(Some(r)) => r,
            _ => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One connection: the socket and the process at its other end.
pub struct Session {
    sock: Arc<OwnedFd>,
    /// The caller's pid (SO_PEERCRED), whose descriptors requests name.
    peer: i32,
}

/// What receiving one message gave.
enum Received {
    Req(Box<CriuReq>),
    /// The peer closed the connection.
    Closed,
    /// Not a request: the reason, for the failed response.
    Bad(String),
}

pub fn run(fd: i32) -> anyhow::Result<i32> {
    let s = cryo_engine::sys::sock::inherited(fd)
        .map_err(|e| anyhow::anyhow!("swrk: descriptor {fd}: {e}"))?;
    let peer = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| anyhow::anyhow!("swrk: descriptor {fd} (SO_PEERCRED): {e}"))?
        .pid();
    let session = Session {
        sock: Arc::new(s),
        peer,
    };
    loop {
        let (resp, keep) = match session.receive()? {
            Received::Closed => return Ok(0),
            Received::Bad(why) => (failure(0, why), false),
            Received::Req(req) => (session.serve(&req), req.keep_open.unwrap_or(false)),
        };
        send(&*session.sock, &resp)?;
        if !keep {
            return Ok(0);
        }
    }
}

impl Session {
    fn receive(&self) -> anyhow::Result<Received> {
        receive(&*self.sock)
    }

    fn serve(&self, req: &CriuReq) -> CriuResp {
        let raw = req.r#type.unwrap_or(0);
        let Ok(ty) = CriuReqType::try_from(raw) else {
            return failure(raw, format!("an unknown request type {raw}"));
        };
        let r = match ty {
            CriuReqType::Version => Ok(CriuResp {
                version: Some(CriuVersion {
                    major_number: 4,
                    minor_number: 2,
                    gitid: Some(format!("cryo-{}", env!("CARGO_PKG_VERSION"))),
                    sublevel: Some(0),
                    extra: None,
                    name: Some("cryo".into()),
                }),
                ..success(ty)
            }),
            CriuReqType::Check => ops::check(),
            CriuReqType::FeatureCheck => Ok(CriuResp {
                features: Some(CriuFeatures {
                    mem_track: Some(ops::tracking()),
                    lazy_pages: Some(false),
                    pidfd_store: Some(false),
                }),
                ..success(ty)
            }),
            CriuReqType::Dump | CriuReqType::PreDump => ops::dump(self, req, ty),
            CriuReqType::Restore => ops::restore(self, req),
            other => Err(format!(
                "request type {} is not served by cryo yet",
                other.as_str_name()
            )),
        };
        r.unwrap_or_else(|why| failure(raw, why))
    }

    /// The path of the caller's descriptor `fd`.
    fn peer_fd_path(&self, fd: i32) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{fd}", self.peer))
    }

    /// The directory the caller's descriptor names.
    fn dir_of(&self, fd: i32, what: &str) -> Result<PathBuf, String> {
        std::fs::read_link(self.peer_fd_path(fd))
            .map_err(|e| format!("{what} {fd} of process {}: {e}", self.peer))
            .and_then(|p| match p.is_dir() {
                true => Ok(p),
                false => Err(format!("{what} {fd} ({}) is not a directory", p.display())),
            })
    }

    /// The request's options and image directory; its log goes to its
    /// log_file from here on.
    fn opts_of<'r>(&self, req: &'r CriuReq) -> Result<(&'r CriuOpts, PathBuf), String> {
        let o = req.opts.as_ref().ok_or("a request without its options")?;
        let fd = o.images_dir_fd.ok_or("options without images_dir_fd")?;
        let dir = self.dir_of(fd, "images_dir_fd")?;
        self.open_log(o, &dir)?;
        Ok((o, dir))
    }

    /// Sends the log to the request's log_file, in its work directory
    /// (work_dir_fd, else the image directory), as CRIU does: that is the
    /// file runc names when a request fails.
    fn open_log(&self, o: &CriuOpts, images: &std::path::Path) -> Result<(), String> {
        let Some(name) = o.log_file.as_deref() else {
            return Ok(());
        };
        if name.is_empty() || name.contains('/') || name == ".." {
            return Err(format!(
                "log_file {name:?}: a plain file name is taken (no directories)"
            ));
        }
        let dir = match o.work_dir_fd {
            Some(fd) => self.dir_of(fd, "work_dir_fd")?,
            None => images.to_path_buf(),
        };
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("log_file {}: {e}", path.display()))?;
        if let Ok(mut l) = LOG.lock() {
            *l = Some(f);
        }
        Ok(())
    }

    /// The listener that tells the caller of each step (a NOTIFY message,
    /// which it answers before cryo goes on), if the request asked.
    fn notifier(&self, o: &CriuOpts) -> cryo_engine::notify::Notify {
        if !o.notify_scripts.unwrap_or(false) {
            return Default::default();
        }
        let sock = self.sock.clone();
        cryo_engine::notify::Notify::new(move |step, pid| notify(&sock, step, pid))
    }
}

/// One NOTIFY round: the step told, the caller's answer awaited.
fn notify(sock: &OwnedFd, step: &str, pid: i32) -> Result<(), String> {
    let told = CriuResp {
        notify: Some(CriuNotify {
            script: Some(step.to_string()),
            pid: Some(pid),
        }),
        ..success(CriuReqType::Notify)
    };
    send(sock, &told).map_err(|e| e.to_string())?;
    match receive(sock).map_err(|e| e.to_string())? {
        Received::Req(r) if r.r#type == Some(CriuReqType::Notify as i32) => {
            match r.notify_success.unwrap_or(false) {
                true => Ok(()),
                false => Err("the caller answered that it failed".into()),
            }
        }
        Received::Req(r) => Err(format!(
            "the caller answered with a request of type {:?}, not NOTIFY",
            r.r#type
        )),
        Received::Closed => Err("the caller closed the connection".into()),
        Received::Bad(why) => Err(format!("the caller's answer: {why}")),
    }
}

fn receive(s: &impl AsFd) -> anyhow::Result<Received> {
    let mut buf = vec![0u8; MAX_REQUEST + 1];
    let n = match nix::sys::socket::recv(
        s.as_fd().as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_TRUNC,
    ) {
        Ok(0) => return Ok(Received::Closed),
        Ok(n) => n,
        Err(e) => anyhow::bail!("swrk: receiving a request: {e}"),
    };
    if n > MAX_REQUEST {
        return Ok(Received::Bad(format!(
            "a request of {n} bytes, more than the {MAX_REQUEST} taken"
        )));
    }
    Ok(match CriuReq::decode(&buf[..n]) {
        Ok(req) => Received::Req(Box::new(req)),
        Err(e) => Received::Bad(format!("a malformed request ({n} bytes): {e}")),
    })
}

fn send(s: &impl AsFd, resp: &CriuResp) -> anyhow::Result<()> {
    let bytes = resp.encode_to_vec();
    nix::sys::socket::send(
        s.as_fd().as_raw_fd(),
        &bytes,
        nix::sys::socket::MsgFlags::empty(),
    )
    .map_err(|e| anyhow::anyhow!("swrk: sending the response: {e}"))?;
    Ok(())
}

/// A failed response to a request of type `ty`.
fn failure(ty: i32, why: String) -> CriuResp {
    tracing::error!("swrk: {why}");
    CriuResp {
        r#type: ty,
        success: false,
        cr_errmsg: Some(why),
        cr_errno: Some(nix::errno::Errno::EINVAL as i32),
        ..Default::default()
    }
}

fn success(ty: CriuReqType) -> CriuResp {
    CriuResp {
        r#type: ty as i32,
        success: true,
        ..Default::default()
    }
}
