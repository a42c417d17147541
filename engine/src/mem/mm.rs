//! The mm fields of a process: code, data, brk, stack, arguments,
//! environment, auxv and the executable.
//!
//! Dump: /proc/PID/stat (its fields past the 44th), /proc/PID/auxv and
//! /proc/PID/exe; brk from the parasite. Restore: the restorer sets them
//! all at once with PR_SET_MM_MAP (which needs no CAP_SYS_RESOURCE, unlike
//! the single-field calls), with the executable opened by the new task.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{MmEntry, Vma};
use cryo_parasite::PrctlMmMap;

use super::MemError;
use crate::proc::Stat;

/// The mm entry of a stopped process (`brk`: from the parasite).
pub fn dump(pid: i32, stat: &Stat, brk: u64, vmas: Vec<Vma>) -> Result<MmEntry, MemError> {
    let proc_err = |what: &str| {
        let path = format!("/proc/{pid}/{what}");
        move |source| MemError::Proc { path, source }
    };
    let auxv: Vec<u64> = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(proc_err("auxv"))?
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let exe_path = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(proc_err("exe"))?
        .to_string_lossy()
        .into_owned();
    Ok(MmEntry {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv,
        exe_path,
        vmas,
        thp_disabled: false,
        // Found with the pages (mem::page_runs).
        guards: Vec::new(),
    })
}

/// The executable, opened for PR_SET_MM_MAP's exe_fd.
pub fn open_exe(mm: &MmEntry, mm_name: &str) -> Result<OwnedFd, String> {
    use nix::fcntl::OFlag;
    nix::fcntl::open(
        mm.exe_path.as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "{mm_name}: opening the executable {}: {}",
            mm.exe_path,
            std::io::Error::from(e)
        )
    })
}

/// struct prctl_mm_map for the restorer (`auxv_at`: where the auxv words
/// were copied for it).
pub fn restorer_mm_map(mm: &MmEntry, auxv_at: u64, exe_fd: i32) -> PrctlMmMap {
    PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: auxv_at,
        auxv_size: (mm.auxv.len() * 8).min(448) as u32,
        exe_fd: exe_fd as u32,
    }
}
