//! `cryo swrk FD`: CRIU's RPC service, as container runtimes (runc, crun)
//! start `criu swrk FD` and talk to it over the SOCK_SEQPACKET socket FD.
//! Each message is one protobuf CriuReq (image-format/proto/rpc.proto);
//! each is answered with one CriuResp. A request that cannot be decoded,
//! is too large, or asks for what cryo does not do gets a response with
//! success false and the reason in cr_errmsg, never a crash. The service
//! ends after a request unless it asked to keep the connection open, or
//! when the peer closes it.
//!
//! Served: VERSION (cryo answers as CRIU 4.2, the version whose options it
//! takes), CHECK, FEATURE_CHECK, DUMP, PRE_DUMP and RESTORE with the
//! options of `criu_opts` cryo has (image and work directories as the
//! caller's descriptors, pid, leave_running, tcp_established, tcp_close,
//! ext_unix_sk, shell_job, link_remap, ghost_limit, freeze_cgroup,
//! parent_img, external mounts, root, manage_cgroups_mode, inherit_fd for
//! pipes, status_fd). Not yet: notification scripts (NOTIFY), the page
//! server and lazy pages through RPC.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;

use cryo_image::proto::rpc::{
    CriuDumpResp, CriuFeatures, CriuOpts, CriuReq, CriuReqType, CriuResp, CriuRestoreResp,
    CriuVersion,
};
use prost::Message;

/// The largest request taken (runc's are a few KiB).
const MAX_REQUEST: usize = 64 << 10;

pub fn run(fd: i32) -> anyhow::Result<i32> {
    let s = cryo_engine::sys::sock::inherited(fd)
        .map_err(|e| anyhow::anyhow!("swrk: descriptor {fd}: {e}"))?;
    loop {
        let mut buf = vec![0u8; MAX_REQUEST + 1];
        let n = match nix::sys::socket::recv(
            s.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_TRUNC,
        ) {
            Ok(0) => return Ok(0),
            Ok(n) => n,
            Err(e) => anyhow::bail!("swrk: receiving a request: {e}"),
        };
        let (resp, keep) = if n > MAX_REQUEST {
            (
                failure(
                    0,
                    format!("a request of {n} bytes, more than the {MAX_REQUEST} taken"),
                ),
                false,
            )
        } else {
            match CriuReq::decode(&buf[..n]) {
                Ok(req) => {
                    let keep = req.keep_open.unwrap_or(false);
                    (serve(&req), keep)
                }
                Err(e) => (
                    failure(0, format!("a malformed request ({n} bytes): {e}")),
                    false,
                ),
            }
        };
        send(&s, &resp)?;
        if !keep {
            return Ok(0);
        }
    }
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

fn serve(req: &CriuReq) -> CriuResp {
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
        CriuReqType::Check => check(),
        CriuReqType::FeatureCheck => Ok(CriuResp {
            features: Some(CriuFeatures {
                mem_track: Some(tracking()),
                lazy_pages: Some(false),
                pidfd_store: Some(false),
            }),
            ..success(ty)
        }),
        CriuReqType::Dump | CriuReqType::PreDump => dump(req, ty),
        CriuReqType::Restore => restore(req),
        other => Err(format!(
            "request type {} is not served by cryo yet",
            other.as_str_name()
        )),
    };
    r.unwrap_or_else(|why| failure(raw, why))
}

fn tracking() -> bool {
    cryo_engine::kerndat::probe()
        .iter()
        .any(|f| f.name == "dirty-tracking" && f.present)
}

fn check() -> Result<CriuResp, String> {
    let features = cryo_engine::kerndat::probe();
    let missing: Vec<&str> = crate::check::REQUIRED
        .iter()
        .copied()
        .filter(|n| !features.iter().any(|f| f.name == *n && f.present))
        .collect();
    match missing.is_empty() {
        true => Ok(success(CriuReqType::Check)),
        false => Err(format!("missing kernel features: {}", missing.join(", "))),
    }
}

/// The directory a descriptor of the caller's names.
fn dir_of(fd: i32, what: &str) -> Result<PathBuf, String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("{what} {fd}: {e}"))
        .and_then(|p| match p.is_dir() {
            true => Ok(p),
            false => Err(format!("{what} {fd} ({}) is not a directory", p.display())),
        })
}

fn opts_of(req: &CriuReq) -> Result<(&CriuOpts, PathBuf), String> {
    let o = req.opts.as_ref().ok_or("a request without its options")?;
    let fd = o.images_dir_fd.ok_or("options without images_dir_fd")?;
    Ok((o, dir_of(fd, "images_dir_fd")?))
}

fn dump(req: &CriuReq, ty: CriuReqType) -> Result<CriuResp, String> {
    let (o, dir) = opts_of(req)?;
    let pid = o
        .pid
        .filter(|&p| p > 0)
        .ok_or("a dump without the pid of the tree's root")?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    if ty == CriuReqType::PreDump {
        let p = cryo_engine::dump::predump::PreDumpOptions {
            pid,
            dir: dir.clone(),
            prev_images_dir: o.parent_img.as_ref().map(PathBuf::from),
            compression: cryo_image::proto::Compression::Zstd,
            zstd_level: 1,
            threads,
            track_limit: std::time::Duration::from_secs(3600),
        };
        cryo_engine::dump::predump::pre_dump(&p).map_err(|e| e.to_string())?;
        return Ok(success(ty));
    }
    let mut d = cryo_engine::DumpOptions::new(pid, dir);
    d.leave_running = o.leave_running.unwrap_or(false);
    d.tcp_established = o.tcp_established.unwrap_or(false);
    d.tcp_close = o.tcp_close.unwrap_or(false);
    d.ext_unix_sk = o.ext_unix_sk.unwrap_or(false);
    d.shell_job = o.shell_job.unwrap_or(false);
    d.link_remap = o.link_remap.unwrap_or(false);
    if let Some(g) = o.ghost_limit {
        d.ghost_limit = u64::from(g);
    }
    d.freeze_cgroup = o.freeze_cgroup.as_ref().map(PathBuf::from);
    d.prev_images_dir = o.parent_img.as_ref().map(PathBuf::from);
    d.externals = cryo_engine::ns::mnt::parse_externals(&o.external)?;
    cryo_engine::dump(&d).map_err(|e| e.to_string())?;
    Ok(CriuResp {
        dump: Some(CriuDumpResp {
            restored: Some(false),
        }),
        ..success(ty)
    })
}

fn restore(req: &CriuReq) -> Result<CriuResp, String> {
    let (o, dir) = opts_of(req)?;
    let mut r = cryo_engine::RestoreOptions::new(dir);
    r.root = o.root.clone();
    r.tcp_close = o.tcp_close.unwrap_or(false);
    if let Some(m) = o.manage_cgroups_mode {
        use cryo_engine::cgroup::props::Manage;
        r.manage_cgroups = match cryo_image::proto::rpc::CriuCgMode::try_from(m) {
            Ok(cryo_image::proto::rpc::CriuCgMode::Ignore) => Manage::Ignore,
            Ok(cryo_image::proto::rpc::CriuCgMode::CgNone) => Manage::None,
            Ok(cryo_image::proto::rpc::CriuCgMode::Props) => Manage::Props,
            Ok(cryo_image::proto::rpc::CriuCgMode::Full) => Manage::Full,
            Ok(cryo_image::proto::rpc::CriuCgMode::Strict) => Manage::Strict,
            _ => Manage::Soft,
        };
    }
    for i in &o.inherit_fd {
        let ino = i
            .key
            .strip_prefix("pipe:[")
            .and_then(|k| k.strip_suffix(']'))
            .and_then(|k| k.parse::<u64>().ok())
            .ok_or_else(|| format!("inherit_fd {:?}: only pipe:[INODE] is taken so far", i.key))?;
        r.inherit_fds.push((ino, i.fd));
    }
    let restored = cryo_engine::restore(&r).map_err(|e| e.to_string())?;
    // The caller's status descriptor learns that the tree runs.
    if let Some(fd) = o.status_fd {
        if let Ok(f) = cryo_engine::sys::sock::inherited(fd) {
            let _ = nix::unistd::write(&f, &[0u8]);
            drop::<OwnedFd>(f);
        }
    }
    Ok(CriuResp {
        restore: Some(CriuRestoreResp { pid: restored.pid }),
        ..success(CriuReqType::Restore)
    })
}
