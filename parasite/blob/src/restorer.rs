//! The restorer: a restored task jumps here (on a stack inside the
//! bootstrap area) once cryo has prepared its memory. It unmaps
//! everything but the bootstrap area and the prepared mappings, moves the
//! mappings to their dumped addresses, restores the per-process and
//! per-thread state that only the task itself can set, and returns into
//! the dumped context with rt_sigreturn.
#![no_std]
#![no_main]

mod rt;

use core::mem::size_of;
use core::sync::atomic::{AtomicU32, Ordering};
use cryo_parasite::*;
use rt::*;

const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const MREMAP_MAYMOVE: usize = 1;
const MREMAP_FIXED: usize = 2;
const MAP_FIXED: usize = 0x10;
/// shmat flags: replace what is mapped there; attach read-only.
const SHM_REMAP: usize = 0o40000;
const SHM_RDONLY: usize = 0o10000;
const PROT_WRITE: u32 = 2;
const SYS_SHMAT: usize = 30;

/// Where a task's status records go, and the pid they carry (cryo's view
/// of the process: its getpid differs inside a pid namespace of its own).
#[derive(Clone, Copy)]
struct Sfd {
    fd: i32,
    pid: u32,
}

fn fail(s: Sfd, stage: u32, index: usize, err: isize) -> ! {
    let st = RStatus {
        stage,
        index: index as u32,
        err: err as i64,
        pid: s.pid,
        _pad: 0,
    };
    syscall3(
        SYS_WRITE,
        s.fd as usize,
        &st as *const RStatus as usize,
        size_of::<RStatus>(),
    );
    exit_group(1);
}

/// Build a slice from a pointer/length pair the engine placed in the
/// bootstrap area.
///
/// # Safety
/// `ptr` must point to `n` initialised `T`s that stay mapped.
unsafe fn slice<'a, T>(ptr: u64, n: u64) -> &'a [T] {
    if n == 0 {
        return &[];
    }
    // SAFETY: forwarded contract.
    unsafe { core::slice::from_raw_parts(ptr as *const T, n as usize) }
}

fn check(s: Sfd, stage: u32, index: usize, r: isize) {
    if r < 0 {
        fail(s, stage, index, r);
    }
}

/// Write `uid` in decimal to /proc/self/loginuid, open as `fd` (the
/// kernel lets only the task itself write it), and close it.
fn restore_loginuid(sfd: Sfd, fd: i64, uid: u32) {
    // Decimal digits, written from the end of the buffer.
    let mut text = [0u8; 10];
    let mut at = text.len();
    let mut v = uid;
    loop {
        at -= 1;
        text[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let r = syscall3(
        SYS_WRITE,
        fd as usize,
        text[at..].as_ptr() as usize,
        text.len() - at,
    );
    syscall1(SYS_CLOSE, fd as usize);
    check(sfd, STAGE_CREDS, 10, r);
}

/// Switch to the dumped credentials. Capabilities survive the uid change
/// (SECBIT_NO_SETUID_FIXUP) until capset sets the dumped ones.
fn restore_creds(sfd: Sfd, c: &RCreds) {
    const PR_CAPBSET_READ: usize = 23;
    const PR_CAPBSET_DROP: usize = 24;
    const PR_GET_SECUREBITS: usize = 27;
    const PR_SET_SECUREBITS: usize = 28;
    const PR_CAP_AMBIENT: usize = 47;
    const SECBIT_NO_SETUID_FIXUP: usize = 1 << 2;
    let cur_bits = syscall1(SYS_PRCTL, PR_GET_SECUREBITS);
    if cur_bits >= 0 && cur_bits as usize & SECBIT_NO_SETUID_FIXUP == 0 {
        check(
            sfd,
            STAGE_CREDS,
            1,
            syscall2(
                SYS_PRCTL,
                PR_SET_SECUREBITS,
                cur_bits as usize | SECBIT_NO_SETUID_FIXUP,
            ),
        );
    }
    let (g, u) = (c.gids, c.uids);
    check(
        sfd,
        STAGE_CREDS,
        2,
        syscall3(119, g[0] as usize, g[1] as usize, g[2] as usize),
    ); // setresgid
    syscall1(123, g[3] as usize); // setfsgid
    check(
        sfd,
        STAGE_CREDS,
        3,
        syscall3(117, u[0] as usize, u[1] as usize, u[2] as usize),
    ); // setresuid
    syscall1(122, u[3] as usize); // setfsuid
    if syscall1(SYS_PRCTL, PR_GET_SECUREBITS) != c.securebits as isize {
        check(
            sfd,
            STAGE_CREDS,
            4,
            syscall2(SYS_PRCTL, PR_SET_SECUREBITS, c.securebits as usize),
        );
    }
    for cap in 0..64usize {
        if c.cap_bnd & (1u64 << cap) == 0 && syscall2(SYS_PRCTL, PR_CAPBSET_READ, cap) == 1 {
            check(
                sfd,
                STAGE_CREDS,
                5,
                syscall2(SYS_PRCTL, PR_CAPBSET_DROP, cap),
            );
        }
    }
    // capset, version 3: header {version, pid}, two data words {eff, prm, inh}.
    let hdr: [u32; 2] = [0x2008_0522, 0];
    let data: [u32; 6] = [
        c.cap_eff as u32,
        c.cap_prm as u32,
        c.cap_inh as u32,
        (c.cap_eff >> 32) as u32,
        (c.cap_prm >> 32) as u32,
        (c.cap_inh >> 32) as u32,
    ];
    check(
        sfd,
        STAGE_CREDS,
        6,
        syscall2(126, hdr.as_ptr() as usize, data.as_ptr() as usize),
    );
    for cap in 0..64usize {
        if c.cap_amb & (1u64 << cap) != 0 {
            check(
                sfd,
                STAGE_CREDS,
                7,
                syscall5(SYS_PRCTL, PR_CAP_AMBIENT, 2, cap, 0, 0),
            );
        }
    }
    if c.no_new_privs != 0 {
        check(sfd, STAGE_CREDS, 8, syscall5(SYS_PRCTL, 38, 1, 0, 0, 0));
    }
}

/// The state every thread sets for itself: clear-child-tid address,
/// robust futex list, name and rseq registration (rseq_cs written back).
#[allow(clippy::too_many_arguments)]
fn own_thread_state(
    sfd: Sfd,
    stage: u32,
    clear_child_tid: u64,
    robust_list: u64,
    robust_list_len: u64,
    comm: &[u8; 16],
    rseq: (u64, u32, u32, u64),
) {
    syscall1(SYS_SET_TID_ADDRESS, clear_child_tid as usize);
    if robust_list != 0 {
        let r = syscall2(
            SYS_SET_ROBUST_LIST,
            robust_list as usize,
            robust_list_len as usize,
        );
        check(sfd, stage, 0, r);
    }
    check(
        sfd,
        stage,
        1,
        syscall2(SYS_PRCTL, 15, comm.as_ptr() as usize),
    ); // PR_SET_NAME
    let (ptr, len, sig, cs) = rseq;
    if ptr != 0 {
        let r = syscall4(SYS_RSEQ, ptr as usize, len as usize, 0, sig as usize);
        check(sfd, STAGE_RSEQ, 0, r);
        // Registration cleared rseq_cs; put the dumped value back.
        // SAFETY: the rseq area lies in the task's memory restored above
        // (the kernel just accepted it), 32-byte aligned; rseq_cs is at +8.
        unsafe { core::ptr::write_volatile((ptr + 8) as *mut u64, cs) };
    }
}

/// Queue this thread's own pending signals again (private ones with
/// rt_tgsigqueueinfo to itself, shared ones to the process).
fn queue_own_signals(sfd: Sfd, ptr: u64, n: u64) {
    let pid = syscall0(SYS_GETPID) as usize;
    let tid = syscall0(SYS_GETTID) as usize;
    // SAFETY: ptr/n describe an RSiginfo array in the bootstrap area.
    let sigs: &[RSiginfo] = unsafe { slice(ptr, n) };
    for (i, s) in sigs.iter().enumerate() {
        let signo = i32::from_ne_bytes([s.info[0], s.info[1], s.info[2], s.info[3]]) as usize;
        let r = if s.private != 0 {
            syscall4(
                SYS_RT_TGSIGQUEUEINFO,
                pid,
                tid,
                signo,
                s.info.as_ptr() as usize,
            )
        } else {
            syscall3(SYS_RT_SIGQUEUEINFO, pid, signo, s.info.as_ptr() as usize)
        };
        check(sfd, STAGE_SIGNALS, i, r);
    }
}

const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_THREAD: u64 = 0x10000;
const CLONE_SYSVSEM: u64 = 0x40000;

/// Create thread `t` with its dumped tid; the new thread starts in
/// [`thread_main`] on its own stack. Returns clone3's result in the caller.
///
/// # Safety
/// `t` must point to an RThread in the bootstrap area whose stack range
/// is mapped, writable and used by nothing else.
unsafe fn spawn_thread(t: *const RThread) -> isize {
    // SAFETY: the caller guarantees `t` is valid.
    let th = unsafe { &*t };

    let cl = CloneArgs {
        flags: CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: 0,
        stack: th.stack,
        stack_size: th.stack_size,
        tls: 0,
        set_tid: th.set_tid,
        set_tid_size: th.set_tid_size,
        cgroup: 0,
    };
    let ret: isize;
    // SAFETY: clone3 only clobbers rax, rcx and r11 in the caller, all
    // declared. The child starts on the stack given in `cl` (inside the
    // bootstrap area, unused by anyone else) with the caller's registers,
    // so r12 holds `t`; it calls thread_main, which never returns, and
    // never comes back to this frame.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "and rsp, -16",
            "call {entry}",
            "ud2",
            "2:",
            entry = sym thread_main,
            inlateout("rax") SYS_CLONE3 as isize => ret,
            in("rdi") &cl as *const CloneArgs as usize,
            in("rsi") size_of::<CloneArgs>(),
            in("r12") t as usize,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// A restored thread other than the leader: set its own state, count
/// itself ready, and return into its dumped context.
///
/// # Safety
/// `t` must point to a complete RThread that stays mapped.
unsafe extern "C" fn thread_main(t: *const RThread) -> ! {
    // SAFETY: spawn_thread passes the RThread its caller vouched for.
    let t = unsafe { &*t };
    let sfd = Sfd {
        fd: t.status_fd,
        pid: t.report_pid,
    };
    own_thread_state(
        sfd,
        STAGE_THREAD,
        t.clear_child_tid,
        t.robust_list,
        t.robust_list_len,
        &t.comm,
        (t.rseq_ptr, t.rseq_len, t.rseq_sig, t.rseq_cs),
    );
    if t.set_creds != 0 {
        check(
            sfd,
            STAGE_CREDS,
            0,
            syscall2(SYS_SETGROUPS, t.nr_groups as usize, t.groups as usize),
        );
        restore_creds(sfd, &t.creds);
    }
    queue_own_signals(sfd, t.siginfos, t.nr_siginfos);
    // Changing credentials resets it, so it comes after.
    if t.pdeath_signal != 0 {
        check(
            sfd,
            STAGE_THREAD,
            3,
            syscall2(SYS_PRCTL, 1, t.pdeath_signal as usize),
        );
    }
    // SAFETY: `ready` is a u32 in the bootstrap area, 64-byte aligned,
    // only ever accessed atomically (here and by the leader).
    let ready = unsafe { AtomicU32::from_ptr(t.ready as *mut u32) };
    ready.fetch_add(1, Ordering::SeqCst);
    syscall3(SYS_FUTEX, t.ready as usize, 1, i32::MAX as usize); // FUTEX_WAKE
    syscall2(SYS_ARCH_PRCTL, 0x1002, t.fs_base as usize); // ARCH_SET_FS
    syscall2(SYS_ARCH_PRCTL, 0x1001, t.gs_base as usize); // ARCH_SET_GS
                                                          // SAFETY: the engine built this thread's frame in the bootstrap area
                                                          // (kept mapped until every thread has left it) from its dumped
                                                          // registers, with a 64-byte aligned fpstate.
    unsafe { trap_then_sigreturn(t.sigframe) }
}

/// Entered from `_cryo_start` with the argument pointer in rdi.
///
/// # Safety
/// `args` must point to a complete `RestoreArgs` that stays mapped.
#[no_mangle]
pub unsafe extern "C" fn blob_main(a: *const RestoreArgs) {
    // SAFETY: the engine wrote a RestoreArgs at this address inside the
    // bootstrap area, which is never unmapped here.
    let a = unsafe { &*a };
    let sfd = Sfd {
        fd: a.status_fd,
        pid: a.report_pid as u32,
    };

    // 1. Drop our own rseq registration before its memory goes away.
    if a.own_rseq_ptr != 0 {
        let r = syscall4(
            SYS_RSEQ,
            a.own_rseq_ptr as usize,
            a.own_rseq_len as usize,
            1, // RSEQ_FLAG_UNREGISTER
            a.own_rseq_sig as usize,
        );
        check(sfd, STAGE_RSEQ_UNREGISTER, 0, r);
    }

    // 2. Unmap everything outside the kept ranges (holes are harmless).
    // SAFETY: keep/nr_keep describe an array inside the bootstrap area.
    let keep: &[Range] = unsafe { slice(a.keep, a.nr_keep) };
    let mut cur = 0u64;
    for (i, k) in keep.iter().enumerate() {
        if k.start > cur {
            check(
                sfd,
                STAGE_UNMAP,
                i,
                syscall2(SYS_MUNMAP, cur as usize, (k.start - cur) as usize),
            );
        }
        if k.end > cur {
            cur = k.end;
        }
    }
    if cur < TASK_SIZE {
        check(
            sfd,
            STAGE_UNMAP,
            keep.len(),
            syscall2(SYS_MUNMAP, cur as usize, (TASK_SIZE - cur) as usize),
        );
    }

    // 3. Move each vdso/vvar part where the dumped task had it (or unmap
    // it), through a scratch area so no step lands on a part not moved yet.
    let n = (a.nr_vdso_parts as usize).min(4);
    let parts = &a.vdso_parts[..n];
    let dsts = &a.vdso_dst[..n];
    if let Some(first) = parts.first() {
        let base = first.start;
        let moves = |i: usize| dsts[i] != 0 && dsts[i] != parts[i].start;
        for (i, p) in parts.iter().enumerate() {
            let len = (p.end - p.start) as usize;
            if dsts[i] == 0 {
                check(sfd, STAGE_VDSO, i, syscall2(SYS_MUNMAP, p.start as usize, len));
            } else if moves(i) {
                let tmp = a.vdso_scratch + (p.start - base);
                let r = syscall5(
                    SYS_MREMAP,
                    p.start as usize,
                    len,
                    len,
                    MREMAP_MAYMOVE | MREMAP_FIXED,
                    tmp as usize,
                );
                check(sfd, STAGE_VDSO, i, r);
            }
        }
        for (i, p) in parts.iter().enumerate() {
            if !moves(i) {
                continue;
            }
            let len = (p.end - p.start) as usize;
            let tmp = a.vdso_scratch + (p.start - base);
            let r = syscall5(
                SYS_MREMAP,
                tmp as usize,
                len,
                len,
                MREMAP_MAYMOVE | MREMAP_FIXED,
                dsts[i] as usize,
            );
            check(sfd, STAGE_VDSO, i, r);
        }
    }

    // 4. Put every mapping in place.
    // SAFETY: vmas/nr_vmas describe an array inside the bootstrap area.
    let vmas: &[RVma] = unsafe { slice(a.vmas, a.nr_vmas) };
    for (i, v) in vmas.iter().enumerate() {
        if v.premap != 0 {
            if v.premap != v.start {
                let r = syscall5(
                    SYS_MREMAP,
                    v.premap as usize,
                    v.len as usize,
                    v.len as usize,
                    MREMAP_MAYMOVE | MREMAP_FIXED,
                    v.start as usize,
                );
                check(sfd, STAGE_MREMAP, i, r);
            }
            check(
                sfd,
                STAGE_MPROTECT,
                i,
                syscall3(
                    SYS_MPROTECT,
                    v.start as usize,
                    v.len as usize,
                    v.prot as usize,
                ),
            );
        } else if v.madv & RVMA_SYSV_SHM != 0 {
            let ro = if v.prot & PROT_WRITE == 0 { SHM_RDONLY } else { 0 };
            let r = syscall3(SYS_SHMAT, v.pgoff as usize, v.start as usize, SHM_REMAP | ro);
            check(sfd, STAGE_MAP_SHARED, i, r);
            let r = syscall3(SYS_MPROTECT, v.start as usize, v.len as usize, v.prot as usize);
            check(sfd, STAGE_MPROTECT, i, r);
        } else if v.fd >= 0 {
            let r = syscall6(
                SYS_MMAP,
                v.start as usize,
                v.len as usize,
                v.prot as usize,
                v.flags as usize | MAP_FIXED,
                v.fd as usize,
                v.pgoff as usize,
            );
            check(sfd, STAGE_MAP_SHARED, i, r);
        }
        let advice: [(u32, usize); 6] = [
            (RVMA_DONTDUMP, 16),
            (RVMA_DONTFORK, 10),
            (RVMA_WIPEONFORK, 18),
            (RVMA_HUGEPAGE, 14),
            (RVMA_NOHUGEPAGE, 15),
            (RVMA_MERGEABLE, 12),
        ];
        for (bit, adv) in advice {
            if v.madv & bit != 0 {
                check(
                    sfd,
                    STAGE_MADVISE,
                    i,
                    syscall3(SYS_MADVISE, v.start as usize, v.len as usize, adv),
                );
            }
        }
        // Sealed last: nothing may change the mapping after this.
        if v.madv & RVMA_SEALED != 0 {
            check(
                sfd,
                STAGE_MADVISE,
                i,
                syscall3(SYS_MSEAL, v.start as usize, v.len as usize, 0),
            );
        }
    }

    // 5. mm fields, exe link included (our own binary is unmapped now).
    let r = syscall5(
        SYS_PRCTL,
        35,
        14,
        &a.mm_map as *const PrctlMmMap as usize,
        size_of::<PrctlMmMap>(),
        0,
    );
    check(sfd, STAGE_MM_MAP, 0, r);
    // SAFETY: close_fds/nr_close_fds describe an array in the bootstrap area.
    let close: &[i32] = unsafe { slice(a.close_fds, a.nr_close_fds) };
    for fd in close {
        syscall1(SYS_CLOSE, *fd as usize);
    }

    // 6. Per-thread state, personality (per thread, so before the other
    // threads exist), then the other threads.
    own_thread_state(
        sfd,
        STAGE_THREAD_STATE,
        a.clear_child_tid,
        a.robust_list,
        a.robust_list_len,
        &a.comm,
        (a.rseq_ptr, a.rseq_len, a.rseq_sig, a.rseq_cs),
    );
    check(
        sfd,
        STAGE_THREAD_STATE,
        5,
        syscall1(SYS_PERSONALITY, a.personality as usize),
    );
    for i in 0..a.nr_threads as usize {
        let t = (a.threads as usize + i * size_of::<RThread>()) as *const RThread;
        // SAFETY: threads/nr_threads describe an RThread array in the
        // bootstrap area, each with its own stack there.
        let mut r = unsafe { spawn_thread(t) };
        // The tid may still be held for a moment by one of cryo's own
        // page threads, joined but not yet released by the kernel.
        let mut tries = 0;
        while r == -17 && tries < 2000 {
            let ts: [i64; 2] = [0, 1_000_000];
            syscall2(SYS_NANOSLEEP, ts.as_ptr() as usize, 0);
            tries += 1;
            // SAFETY: as above.
            r = unsafe { spawn_thread(t) };
        }
        check(sfd, STAGE_CLONE_THREAD, i, r);
    }

    // 7. Signal actions, timers, queued signals.
    for sig in 1..=NSIG {
        if a.sigaction_mask & (1u64 << (sig - 1)) != 0 {
            let act = &a.sigactions[sig - 1];
            let r = syscall4(
                SYS_RT_SIGACTION,
                sig,
                act as *const KSigaction as usize,
                0,
                8,
            );
            check(sfd, STAGE_SIGACTION, sig, r);
        }
    }
    // SAFETY: timers/nr_timers describe an array in the bootstrap area.
    let timers: &[RTimer] = unsafe { slice(a.timers, a.nr_timers) };
    if !timers.is_empty() {
        check(sfd, STAGE_TIMERS, 0, syscall2(SYS_PRCTL, 77, 1)); // PR_TIMER_CREATE_RESTORE_IDS ON
        for (i, t) in timers.iter().enumerate() {
            // struct sigevent: value @0, signo @8, notify @12, tid @16; 64 bytes.
            let mut sev = [0u8; 64];
            sev[0..8].copy_from_slice(&t.sigev_value.to_ne_bytes());
            sev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
            sev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
            sev[16..20].copy_from_slice(&t.notify_tid.to_ne_bytes());
            let mut id: i32 = t.id;
            let r = syscall3(
                SYS_TIMER_CREATE,
                t.clock_id as usize,
                sev.as_ptr() as usize,
                &mut id as *mut i32 as usize,
            );
            check(sfd, STAGE_TIMERS, i, r);
            if id != t.id {
                fail(sfd, STAGE_TIMERS, i, -17);
            }
            let r = syscall4(
                SYS_TIMER_SETTIME,
                id as usize,
                0,
                &t.spec as *const KItimerspec as usize,
                0,
            );
            check(sfd, STAGE_TIMERS, i, r);
        }
        check(sfd, STAGE_TIMERS, 0, syscall2(SYS_PRCTL, 77, 0));
    }
    queue_own_signals(sfd, a.siginfos, a.nr_siginfos);

    // 8. Credentials (groups), process attributes, limits. The login uid
    // first: writing it needs CAP_AUDIT_CONTROL, which the credentials may
    // drop.
    if a.loginuid != u64::MAX {
        restore_loginuid(sfd, a.loginuid_fd, a.loginuid as u32);
    }
    if a.set_groups != 0 {
        check(
            sfd,
            STAGE_CREDS,
            0,
            syscall2(116, a.nr_groups as usize, a.groups as usize),
        );
    }
    // SAFETY: rlimits/nr_rlimits describe an array in the bootstrap area.
    let rl: &[RRlimit] = unsafe { slice(a.rlimits, a.nr_rlimits) };
    for (i, l) in rl.iter().enumerate() {
        let v = [l.cur, l.max];
        let r = syscall4(
            SYS_PRLIMIT64,
            0,
            l.resource as usize,
            v.as_ptr() as usize,
            0,
        );
        check(sfd, STAGE_RLIMIT, i, r);
    }
    if a.set_creds != 0 {
        restore_creds(sfd, &a.creds);
    }
    // Changing credentials resets these, so they come after.
    if a.child_subreaper != 0 {
        check(sfd, STAGE_THREAD_STATE, 2, syscall2(SYS_PRCTL, 36, 1));
    }
    // Always: cryo's restore code set SIGKILL here while the tree was
    // being built.
    check(
        sfd,
        STAGE_THREAD_STATE,
        3,
        syscall2(SYS_PRCTL, 1, a.pdeath_signal as usize),
    );
    for cmd in MEMBARRIER_PRIVATE_CMDS {
        if a.membarrier & cmd as u64 != 0 {
            // MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED and its kinds.
            let r = syscall3(SYS_MEMBARRIER, (cmd << 1) as usize, 0, 0);
            check(sfd, STAGE_THREAD_STATE, 6, r);
        }
    }
    if a.thp_disable != 0 {
        check(sfd, STAGE_THREAD_STATE, 5, syscall2(SYS_PRCTL, 41, 1)); // PR_SET_THP_DISABLE
    }
    if a.dumpable <= 1 {
        check(
            sfd,
            STAGE_THREAD_STATE,
            4,
            syscall2(SYS_PRCTL, 4, a.dumpable as usize),
        );
    }

    // 9. Interval timers last, so they lose as little time as possible.
    for which in 0..3 {
        let it = &a.itimers[which];
        if it.value_sec != 0 || it.value_usec != 0 {
            let r = syscall3(SYS_SETITIMER, which, it as *const KItimerval as usize, 0);
            check(sfd, STAGE_ITIMER, which, r);
        }
    }

    // 10. Wait until every other thread has set its state (so that any
    // failure is reported before success), report success, then load
    // fs/gs base and return into the dumped context. Nothing below may
    // use TLS.
    if a.nr_threads > 0 {
        // SAFETY: threads_ready is a u32 in the bootstrap area, 64-byte
        // aligned, only ever accessed atomically.
        let ready = unsafe { AtomicU32::from_ptr(a.threads_ready as *mut u32) };
        loop {
            let n = ready.load(Ordering::SeqCst);
            if n as u64 >= a.nr_threads {
                break;
            }
            syscall4(SYS_FUTEX, a.threads_ready as usize, 0, n as usize, 0); // FUTEX_WAIT
        }
    }
    let done = RStatus {
        stage: STAGE_DONE,
        index: 0,
        err: 0,
        pid: sfd.pid,
        _pad: 0,
    };
    syscall3(
        SYS_WRITE,
        sfd.fd as usize,
        &done as *const RStatus as usize,
        size_of::<RStatus>(),
    );
    syscall1(SYS_CLOSE, sfd.fd as usize);
    syscall2(SYS_ARCH_PRCTL, 0x1002, a.fs_base as usize); // ARCH_SET_FS
    syscall2(SYS_ARCH_PRCTL, 0x1001, a.gs_base as usize); // ARCH_SET_GS
                                                          // SAFETY: the engine built the frame in the bootstrap area (kept
                                                          // mapped) from the dumped registers, with a 64-byte aligned fpstate
                                                          // carrying the XSAVE magic words.
    unsafe {
        if a.trap_before_sigreturn != 0 {
            trap_then_sigreturn(a.sigframe)
        } else {
            sigreturn(a.sigframe)
        }
    }
}
