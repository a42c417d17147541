//! Credentials and resource limits.
//!
//! Dump: each thread's uids, gids, groups, capability sets and
//! no_new_privs from /proc/PID/task/TID/status, its securebits from the
//! parasite or an injected prctl; the process's limits from
//! /proc/PID/limits (prlimit64 on another user's task would need
//! CAP_SYS_RESOURCE, which root lacks here), its audit login uid; a
//! thread under seccomp is refused. Restore: the restorer writes the login
//! uid, sets the limits and, last, each thread's credentials.

#![forbid(unsafe_code)]

use std::collections::HashMap;

use cryo_image::proto::{Creds, ProcessCore, Rlimit};
use cryo_parasite::{RCreds, RRlimit};

use crate::proc as procfmt;

/// Credentials of one thread, from its /proc status.
pub fn of_thread(status: &HashMap<String, String>, securebits: u32) -> Creds {
    let get = |k: &str| status.get(k).cloned().unwrap_or_default();
    Creds {
        uid: procfmt::status_numbers(&get("Uid")),
        gid: procfmt::status_numbers(&get("Gid")),
        groups: procfmt::status_numbers(&get("Groups")),
        cap_inh: procfmt::status_hex(&get("CapInh")),
        cap_prm: procfmt::status_hex(&get("CapPrm")),
        cap_eff: procfmt::status_hex(&get("CapEff")),
        cap_bnd: procfmt::status_hex(&get("CapBnd")),
        cap_amb: procfmt::status_hex(&get("CapAmb")),
        securebits,
        no_new_privs: get("NoNewPrivs") == "1",
    }
}

/// The audit login uid of `pid` ("self" for this process): /proc/PID/loginuid.
pub fn loginuid(pid: &str) -> Option<u32> {
    procfmt::read_number(&format!("/proc/{pid}/loginuid"))
}

/// The first thread of `pid` that runs under seccomp, and its mode: a
/// restore without the filter would give the task more than it had.
pub fn seccomp_thread(pid: i32) -> Option<(i32, &'static str)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    dir.flatten().find_map(|e| {
        let tid = e.file_name().to_str()?.parse::<i32>().ok()?;
        // A thread that ended meanwhile has nothing to refuse.
        let status = procfmt::parse_status(&std::fs::read_to_string(e.path().join("status")).ok()?);
        let mode = match status.get("Seccomp").map(String::as_str) {
            None | Some("0") => return None,
            Some("1") => "strict mode",
            Some("2") => "a filter",
            Some(_) => "an unknown mode",
        };
        Some((tid, mode))
    })
}

/// The limits of /proc/PID/limits (`text`), or None if it does not parse.
pub fn rlimits(text: &str) -> Option<Vec<Rlimit>> {
    Some(
        procfmt::parse_limits(text)?
            .into_iter()
            .enumerate()
            .map(|(i, (cur, max))| Rlimit {
                resource: i as u32,
                cur,
                max,
            })
            .collect(),
    )
}

// ---- restore ----

/// Credentials as the restorer sets them.
pub fn restorer_creds(c: &Creds) -> RCreds {
    RCreds {
        uids: c
            .uid
            .get(..4)
            .and_then(|u| u.try_into().ok())
            .unwrap_or_default(),
        gids: c
            .gid
            .get(..4)
            .and_then(|g| g.try_into().ok())
            .unwrap_or_default(),
        cap_inh: c.cap_inh,
        cap_prm: c.cap_prm,
        cap_eff: c.cap_eff,
        cap_bnd: c.cap_bnd,
        cap_amb: c.cap_amb,
        securebits: c.securebits,
        no_new_privs: c.no_new_privs as u32,
    }
}

/// Whether the dump recorded a full set of ids to set back.
pub fn has_ids(c: &Creds) -> bool {
    c.uid.len() == 4 && c.gid.len() == 4
}

pub fn restorer_rlimits(pc: &ProcessCore) -> Vec<RRlimit> {
    pc.rlimits
        .iter()
        .map(|l| RRlimit {
            resource: l.resource,
            _pad: 0,
            cur: l.cur,
            max: l.max,
        })
        .collect()
}
