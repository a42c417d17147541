//! The requests that check, dump and restore: CRIU's options as cryo's
//! engine takes them. An option cryo cannot honour is refused by name,
//! never ignored, unless it only tunes CRIU's own work (log_level,
//! auto_dedup, evasive_devices, file_locks: cryo always keeps locks).

use std::path::PathBuf;

use cryo_image::proto::rpc::{CriuCgMode, CriuRestoreResp};
use cryo_image::proto::rpc::{CriuDumpResp, CriuOpts, CriuReq, CriuReqType, CriuResp};

use super::{success, Session};

pub fn tracking() -> bool {
    cryo_engine::kerndat::probe()
        .iter()
        .any(|f| f.name == "dirty-tracking" && f.present)
}

pub fn check() -> Result<CriuResp, String> {
    let missing = crate::check::missing(&cryo_engine::kerndat::probe());
    match missing.is_empty() {
        true => Ok(success(CriuReqType::Check)),
        false => Err(format!("missing kernel features: {}", missing.join(", "))),
    }
}

/// Options of either request that cryo does not have.
fn refuse_unserved(o: &CriuOpts) -> Result<(), String> {
    if o.lazy_pages.unwrap_or(false) {
        return Err("lazy_pages: cryo has no lazy restore yet".into());
    }
    if o.ps.is_some() {
        return Err(
            "ps: a page server through RPC is not served yet (use cryo dump --page-server)".into(),
        );
    }
    if let Some(j) = o.join_ns.first() {
        return Err(format!(
            "join_ns: joining the existing {} namespace {} is not served yet",
            j.ns, j.ns_file
        ));
    }
    // runc always asks for an empty network namespace (it leaves network
    // devices to its hooks); cryo makes the tree's network namespace
    // again as it was dumped, a superset: a runc container's has only
    // its loopback. Other namespaces are refused.
    let net = libc::CLONE_NEWNET as u32;
    if let Some(bits) = o.empty_ns.filter(|&b| b & !net != 0) {
        return Err(format!(
            "empty_ns {bits:#x}: only the network namespace (CLONE_NEWNET) is taken"
        ));
    }
    if let Some(p) = o.lsm_profile.as_ref().or(o.lsm_mount_context.as_ref()) {
        return Err(format!(
            "lsm_profile/lsm_mount_context {p:?}: cryo sets no LSM labels"
        ));
    }
    // runc names /etc/criu/runc.conf whether or not it exists.
    if let Some(c) = o
        .config_file
        .as_ref()
        .filter(|c| std::path::Path::new(c).exists())
    {
        tracing::warn!("config_file {c}: CRIU's configuration files are not read by cryo");
    }
    Ok(())
}

pub fn dump(s: &Session, req: &CriuReq, ty: CriuReqType) -> Result<CriuResp, String> {
    let (o, dir) = s.opts_of(req)?;
    refuse_unserved(o)?;
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
        let r = cryo_engine::dump::predump::pre_dump(&p);
        if let Err(e) = r {
            cryo_engine::dump::remove_partial(&dir);
            return Err(e.to_string());
        }
        return Ok(success(ty));
    }
    let mut d = cryo_engine::DumpOptions::new(pid, dir.clone());
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
    d.external_sockets = cryo_engine::ns::mnt::external_sockets(&o.external)?;
    // ext_mnt: the mountpoint (key) is external, recorded by its name.
    d.externals
        .extend(o.ext_mnt.iter().map(|m| (m.key.clone(), m.val.clone())));
    // As CRIU: a pipe leading outside (a container's stdio) is the
    // caller's, given back at restore by inherit_fd.
    d.external_pipes_all = true;
    d.notify = s.notifier(o);
    if let Err(e) = cryo_engine::dump(&d) {
        cryo_engine::dump::remove_partial(&dir);
        return Err(e.to_string());
    }
    Ok(CriuResp {
        dump: Some(CriuDumpResp {
            restored: Some(false),
        }),
        ..success(ty)
    })
}

pub fn restore(s: &Session, req: &CriuReq) -> Result<CriuResp, String> {
    let (o, dir) = s.opts_of(req)?;
    refuse_unserved(o)?;
    let mut r = cryo_engine::RestoreOptions::new(dir);
    r.root = o.root.clone();
    r.tcp_close = o.tcp_close.unwrap_or(false);
    r.sibling = o.rst_sibling.unwrap_or(false);
    if let Some(m) = o.manage_cgroups_mode {
        use cryo_engine::cgroup::props::Manage;
        r.manage_cgroups = match CriuCgMode::try_from(m) {
            Ok(CriuCgMode::Ignore) => Manage::Ignore,
            Ok(CriuCgMode::CgNone) => Manage::None,
            Ok(CriuCgMode::Props) => Manage::Props,
            Ok(CriuCgMode::Full) => Manage::Full,
            Ok(CriuCgMode::Strict) => Manage::Strict,
            _ => Manage::Soft,
        };
    }
    for c in &o.cg_root {
        match c.ctrl.as_deref() {
            Some(ctrl) => r.cgroup_roots.insert(ctrl.to_string(), c.path.clone()),
            None => r.cgroup_root.replace(c.path.clone()),
        };
    }
    r.externals = cryo_engine::ns::mnt::parse_externals(&o.external)?
        .into_iter()
        .collect();
    // ext_mnt: the mount recorded by this name (key) is bound from val.
    r.externals
        .extend(o.ext_mnt.iter().map(|m| (m.key.clone(), m.val.clone())));
    r.veth_pairs = o
        .veths
        .iter()
        .map(|v| (v.if_in.clone(), v.if_out.clone()))
        .collect();
    for i in &o.inherit_fd {
        let (key, fd) = cryo_engine::files::parse_inherit(&format!("fd[{}]:{}", i.fd, i.key))
            .map_err(|e| format!("inherit_fd {:?}: {e}", i.key))?;
        r.inherit_fds.push((key, fd));
    }
    // The caller's status descriptor, opened before the restore: one
    // that cannot be opened fails the request before any task exists.
    let status = o
        .status_fd
        .map(|fd| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(s.peer_fd_path(fd))
                .map_err(|e| format!("status_fd {fd}: {e}"))
        })
        .transpose()?;
    r.notify = s.notifier(o);
    let restored = cryo_engine::restore(&r).map_err(|e| e.to_string())?;
    // The caller's status descriptor learns that the tree runs.
    if let Some(mut f) = status {
        use std::io::Write;
        let _ = f.write_all(&[0u8]);
    }
    Ok(CriuResp {
        restore: Some(CriuRestoreResp { pid: restored.pid }),
        ..success(CriuReqType::Restore)
    })
}
