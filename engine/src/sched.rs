//! How the kernel schedules the tasks: each thread's policy, real-time
//! priority or deadline parameters, nice value, CPU affinity and timer
//! slack, and the process's oom_score_adj.
//!
//! Dump: read from outside (sched_getattr and sched_getaffinity on the
//! tid, /proc/TID/timerslack_ns, /proc/PID/oom_score_adj). Restore: set
//! from outside too, on every thread while the restored tree is still
//! stopped before its release (restored tasks start with cryo's own
//! settings, so every one is set). CPUs the image names that this machine
//! does not have are dropped from a mask; a mask left empty keeps every
//! CPU, with a warning.

#![forbid(unsafe_code)]

use cryo_image::proto::SchedState;
use nix::errno::Errno;
use nix::sched::CpuSet;
use nix::unistd::Pid;

use crate::sys::proc::{nice_of, sched_getattr, sched_setattr, SchedAttr};

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("task {tid}: {what}: {errno}")]
    Sys {
        tid: i32,
        what: String,
        errno: Errno,
    },
    #[error("task {tid}: {what}: {source}")]
    Io {
        tid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, SchedError>;

const SCHED_DEADLINE: u32 = 6;
const SCHED_FIFO: u32 = 1;
const SCHED_RR: u32 = 2;

fn policy_name(p: u32) -> String {
    match p {
        0 => "SCHED_OTHER".into(),
        SCHED_FIFO => "SCHED_FIFO".into(),
        SCHED_RR => "SCHED_RR".into(),
        3 => "SCHED_BATCH".into(),
        5 => "SCHED_IDLE".into(),
        SCHED_DEADLINE => "SCHED_DEADLINE".into(),
        n => format!("policy {n}"),
    }
}

/// The scheduling state of thread `tid`.
pub fn dump(tid: i32) -> Result<SchedState> {
    let a = sched_getattr(tid).map_err(|errno| SchedError::Sys {
        tid,
        what: "sched_getattr".into(),
        errno,
    })?;
    let nice = nice_of(tid).map_err(|errno| SchedError::Sys {
        tid,
        what: "getpriority".into(),
        errno,
    })?;
    let set =
        nix::sched::sched_getaffinity(Pid::from_raw(tid)).map_err(|errno| SchedError::Sys {
            tid,
            what: "sched_getaffinity".into(),
            errno,
        })?;
    let slack_path = format!("/proc/{tid}/timerslack_ns");
    let slack = std::fs::read_to_string(&slack_path).map_err(|source| SchedError::Io {
        tid,
        what: format!("reading {slack_path}"),
        source,
    })?;
    let timer_slack_ns = slack.trim().parse().map_err(|_| SchedError::Io {
        tid,
        what: format!("parsing {slack_path} ({:?})", slack.trim()),
        source: std::io::ErrorKind::InvalidData.into(),
    })?;
    Ok(SchedState {
        policy: a.policy,
        flags: a.flags,
        nice,
        priority: a.priority,
        dl_runtime: a.runtime,
        dl_deadline: a.deadline,
        dl_period: a.period,
        affinity: mask_words(&set),
        timer_slack_ns,
    })
}

/// The CPU mask as 64-bit words, trailing zero words left out.
fn mask_words(set: &CpuSet) -> Vec<u64> {
    let mut words = vec![0u64; CpuSet::count().div_ceil(64)];
    for cpu in 0..CpuSet::count() {
        if set.is_set(cpu).unwrap_or(false) {
            words[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    while words.last() == Some(&0) {
        words.pop();
    }
    words
}

/// `/proc/PID/oom_score_adj`, if it can be read.
pub fn oom_score_adj(pid: i32) -> Option<i32> {
    crate::proc::read_number(&format!("/proc/{pid}/oom_score_adj"))
}

/// The CPUs this process (cryo) may run on: the ones a restored thread's
/// mask is cut to.
pub fn online_cpus() -> Result<CpuSet> {
    nix::sched::sched_getaffinity(Pid::from_raw(0)).map_err(|errno| SchedError::Sys {
        tid: std::process::id() as i32,
        what: "sched_getaffinity of cryo".into(),
        errno,
    })
}

// ---- restore ----

/// Give thread `tid` (restored, stopped) the scheduling state `s`; its
/// CPU mask is cut to `online` ([`online_cpus`]).
pub fn restore(tid: i32, s: &SchedState, online: &CpuSet) -> Result<()> {
    let sys = |what: String| move |errno| SchedError::Sys { tid, what, errno };
    // The mask first: SCHED_DEADLINE is refused on a task whose mask is
    // narrower than its root domain, and the mask of a task already under
    // it cannot be narrowed.
    let mut set = CpuSet::new();
    let mut any = false;
    for (w, word) in s.affinity.iter().enumerate() {
        for bit in 0..64 {
            let cpu = w * 64 + bit;
            if word & (1 << bit) != 0
                && cpu < CpuSet::count()
                && online.is_set(cpu).unwrap_or(false)
            {
                let _ = set.set(cpu);
                any = true;
            }
        }
    }
    if any {
        nix::sched::sched_setaffinity(Pid::from_raw(tid), &set)
            .map_err(sys(format!("sched_setaffinity to CPUs {:x?}", s.affinity)))?;
    } else if !s.affinity.is_empty() {
        tracing::warn!(
            tid,
            mask = ?s.affinity,
            "none of the CPUs the task was bound to is here; it may run on any"
        );
    }
    let rt = matches!(s.policy, SCHED_FIFO | SCHED_RR | SCHED_DEADLINE);
    let path = format!("/proc/{tid}/timerslack_ns");
    // A real-time or deadline thread has no timer slack (the kernel sets
    // it to 0 with the policy and ignores changes).
    if !rt && crate::proc::read_number::<u64>(&path) != Some(s.timer_slack_ns) {
        std::fs::write(&path, s.timer_slack_ns.to_string()).map_err(|source| SchedError::Io {
            tid,
            what: format!("writing {} to {path}", s.timer_slack_ns),
            source,
        })?;
    }
    let a = SchedAttr {
        size: 0,
        policy: s.policy,
        flags: s.flags,
        nice: s.nice,
        priority: s.priority,
        runtime: s.dl_runtime,
        deadline: s.dl_deadline,
        period: s.dl_period,
    };
    let current = sched_getattr(tid).ok().map(|mut c| {
        c.size = 0;
        c.nice = nice_of(tid).unwrap_or(c.nice);
        c
    });
    if current != Some(a) {
        let mut what = format!("setting {} (nice {}", policy_name(s.policy), s.nice);
        if matches!(s.policy, SCHED_FIFO | SCHED_RR) {
            what += &format!(", priority {}", s.priority);
        }
        what += ")";
        if rt {
            what += " (needs CAP_SYS_NICE or an RLIMIT_RTPRIO that allows it)";
        }
        if rt && s.nice != 0 {
            // The kernel takes the nice value only with a fair policy; a
            // real-time thread keeps the one it had before.
            let fair = SchedAttr {
                policy: 0,
                nice: s.nice,
                ..SchedAttr::default()
            };
            sched_setattr(tid, &fair).map_err(sys(format!("setting nice {}", s.nice)))?;
        }
        sched_setattr(tid, &a).map_err(sys(what))?;
    }
    Ok(())
}

/// Give process `pid` its oom_score_adj back (lowering it needs
/// CAP_SYS_RESOURCE).
pub fn restore_oom_score_adj(pid: i32, adj: i32) -> Result<()> {
    if oom_score_adj(pid) == Some(adj) {
        return Ok(());
    }
    let path = format!("/proc/{pid}/oom_score_adj");
    std::fs::write(&path, adj.to_string()).map_err(|source| SchedError::Io {
        tid: pid,
        what: format!("writing {adj} to {path} (lowering it needs CAP_SYS_RESOURCE)"),
        source,
    })
}
