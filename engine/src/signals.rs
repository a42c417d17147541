//! Signals and timers: signal actions, pending signals (shared and per
//! thread), interval timers and POSIX timers.
//!
//! Dump: the parasite reads the sigactions, itimers and each POSIX
//! timer's time left and overrun inside the task; /proc/PID/timers gives
//! the timers' ids and notification; ptrace (PTRACE_PEEKSIGINFO) copies
//! the pending signals without dequeuing them. Restore: the restorer sets
//! the actions, arms the timers (one about to fire fires at once) and
//! queues the pending signals again (see `restore::handoff`, which puts
//! these into the restorer's arguments).

#![forbid(unsafe_code)]

use cryo_image::proto::{Itimer, PendingSignal, PosixTimer, ProcessCore, SigAction};
use cryo_parasite::{KItimerspec, KItimerval, KSigaction, RSiginfo, RTimer, StateReply, NSIG};

use crate::proc::TimerInfo;

/// SIGKILL and SIGSTOP have no action to keep.
fn settable(signo: usize) -> bool {
    (1..=NSIG).contains(&signo) && signo != 9 && signo != 19
}

pub fn pending(sigs: &[[u8; 128]]) -> Vec<PendingSignal> {
    sigs.iter()
        .map(|s| PendingSignal {
            siginfo: s.to_vec(),
        })
        .collect()
}

/// The process's signal actions, from the parasite's reply.
pub fn sigactions(st: &StateReply) -> Vec<SigAction> {
    (1..=NSIG)
        .filter(|&s| settable(s))
        .map(|s| {
            let a = &st.sigactions[s - 1];
            SigAction {
                signo: s as u32,
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            }
        })
        .collect()
}

/// ITIMER_REAL, _VIRTUAL and _PROF, from the parasite's reply.
pub fn itimers(st: &StateReply) -> Vec<Itimer> {
    st.itimers
        .iter()
        .enumerate()
        .map(|(i, t)| Itimer {
            which: i as u32,
            interval_us: (t.interval_sec as u64) * 1_000_000 + t.interval_usec as u64,
            value_us: (t.value_sec as u64) * 1_000_000 + t.value_usec as u64,
        })
        .collect()
}

/// The POSIX timers of /proc/PID/timers with the time left and overrun
/// the parasite read of each (in the same order).
pub fn posix_timers(timers: &[TimerInfo], st: &StateReply) -> Vec<PosixTimer> {
    timers
        .iter()
        .zip(st.timers.iter())
        .map(|(t, s)| PosixTimer {
            id: t.id,
            clock_id: t.clock_id,
            notify: t.notify,
            signo: t.signo,
            sigev_value: t.sigev_value,
            notify_tid: t.notify_tid,
            interval_ns: (s.spec.interval_sec as u64) * 1_000_000_000 + s.spec.interval_nsec as u64,
            value_ns: (s.spec.value_sec as u64) * 1_000_000_000 + s.spec.value_nsec as u64,
            overrun: s.overrun,
        })
        .collect()
}

// ---- restore ----

/// The restorer's sigaction table and the mask of the signals it sets.
pub fn restorer_sigactions(pc: &ProcessCore) -> ([KSigaction; NSIG], u64) {
    let mut out = [KSigaction::default(); NSIG];
    let mut mask = 0u64;
    for a in &pc.sigactions {
        let s = a.signo as usize;
        if settable(s) {
            out[s - 1] = KSigaction {
                handler: a.handler,
                flags: a.flags,
                restorer: a.restorer,
                mask: a.mask,
            };
            mask |= 1 << (s - 1);
        }
    }
    (out, mask)
}

/// The interval timers for the restorer. The kernel adds a tick to the
/// value of a CPU-time timer (ITIMER_VIRTUAL, ITIMER_PROF) it is given;
/// `cpu_slack_us` (see `sys::proc::cpu_itimer_slack_us`) is taken off
/// here, so that the timer does not expire a tick later at every restore
/// (a value shorter than that fires at the first tick, as it would have).
pub fn restorer_itimers(pc: &ProcessCore, cpu_slack_us: u64) -> [KItimerval; 3] {
    let mut out = [KItimerval::default(); 3];
    for t in &pc.itimers {
        let value_us = match t.which {
            1 | 2 if t.value_us > 0 => t.value_us.saturating_sub(cpu_slack_us).max(1),
            _ => t.value_us,
        };
        if let Some(slot) = out.get_mut(t.which as usize) {
            *slot = KItimerval {
                interval_sec: (t.interval_us / 1_000_000) as i64,
                interval_usec: (t.interval_us % 1_000_000) as i64,
                value_sec: (value_us / 1_000_000) as i64,
                value_usec: (value_us % 1_000_000) as i64,
            };
        }
    }
    out
}

/// The process's POSIX timers for the restorer; `local_tid`: a thread
/// (cryo's view of its tid) as the process sees it (ns::pid::View).
pub fn restorer_timers(
    pc: &ProcessCore,
    local_tid: impl Fn(u32) -> Result<u32, String>,
) -> Result<Vec<RTimer>, String> {
    pc.posix_timers
        .iter()
        .map(|t| {
            let notify_tid = match t.notify & 4 != 0 {
                true => local_tid(t.notify_tid)
                    .map_err(|e| format!("POSIX timer {}: its thread: {e}", t.id))?,
                false => 0,
            };
            Ok(RTimer {
                id: t.id,
                clock_id: t.clock_id,
                notify: t.notify,
                signo: t.signo,
                sigev_value: t.sigev_value,
                notify_tid,
                _pad: 0,
                spec: KItimerspec {
                    interval_sec: (t.interval_ns / 1_000_000_000) as i64,
                    interval_nsec: (t.interval_ns % 1_000_000_000) as i64,
                    // A timer that was about to fire fires right away.
                    value_sec: (t.value_ns / 1_000_000_000) as i64,
                    value_nsec: if t.value_ns == 0 && t.interval_ns == 0 {
                        0
                    } else {
                        (t.value_ns % 1_000_000_000).max(if t.value_ns == 0 { 1 } else { 0 }) as i64
                    },
                },
            })
        })
        .collect()
}

/// Pending signals to queue again; `private`: the thread's own, else the
/// process's shared ones.
pub fn restorer_siginfos(list: &[PendingSignal], private: bool) -> Vec<RSiginfo> {
    list.iter()
        .map(|s| {
            let mut info = [0u8; 128];
            let n = s.siginfo.len().min(128);
            info[..n].copy_from_slice(&s.siginfo[..n]);
            RSiginfo {
                info,
                private: private as u32,
                _pad: 0,
            }
        })
        .collect()
}
