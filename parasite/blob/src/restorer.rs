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
use cryo_parasite::*;
use rt::*;

const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const MREMAP_MAYMOVE: usize = 1;
const MREMAP_FIXED: usize = 2;
const MAP_FIXED: usize = 0x10;

fn fail(fd: i32, stage: u32, index: usize, err: isize) -> ! {
    let st = RStatus {
        stage,
        index: index as u32,
        err: err as i64,
    };
    syscall3(
        SYS_WRITE,
        fd as usize,
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

fn check(fd: i32, stage: u32, index: usize, r: isize) {
    if r < 0 {
        fail(fd, stage, index, r);
    }
}

/// Switch to the dumped credentials. Capabilities survive the uid change
/// (SECBIT_NO_SETUID_FIXUP) until capset sets the dumped ones.
fn restore_creds(sfd: i32, c: &RCreds) {
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

/// Entered from `_cryo_start` with the argument pointer in rdi.
///
/// # Safety
/// `args` must point to a complete `RestoreArgs` that stays mapped.
#[no_mangle]
pub unsafe extern "C" fn blob_main(a: *const RestoreArgs) {
    // SAFETY: the engine wrote a RestoreArgs at this address inside the
    // bootstrap area, which is never unmapped here.
    let a = unsafe { &*a };
    let sfd = a.status_fd;

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

    // 3. Move our vdso/vvar block where the dumped task had it, through a
    // scratch area so no step lands on a part not moved yet.
    let parts = &a.vdso_parts[..(a.nr_vdso_parts as usize).min(4)];
    if let Some(first) = parts.first() {
        let base = first.start;
        if a.vdso_dst == 0 {
            for (i, p) in parts.iter().enumerate() {
                check(
                    sfd,
                    STAGE_VDSO,
                    i,
                    syscall2(SYS_MUNMAP, p.start as usize, (p.end - p.start) as usize),
                );
            }
        } else if a.vdso_dst != base {
            for (i, p) in parts.iter().enumerate() {
                let len = (p.end - p.start) as usize;
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
            for (i, p) in parts.iter().enumerate() {
                let len = (p.end - p.start) as usize;
                let tmp = a.vdso_scratch + (p.start - base);
                let dst = a.vdso_dst + (p.start - base);
                let r = syscall5(
                    SYS_MREMAP,
                    tmp as usize,
                    len,
                    len,
                    MREMAP_MAYMOVE | MREMAP_FIXED,
                    dst as usize,
                );
                check(sfd, STAGE_VDSO, i, r);
            }
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
        let advice: [(u32, usize); 5] = [
            (RVMA_DONTDUMP, 16),
            (RVMA_DONTFORK, 10),
            (RVMA_WIPEONFORK, 18),
            (RVMA_HUGEPAGE, 14),
            (RVMA_NOHUGEPAGE, 15),
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

    // 6. Per-thread state.
    syscall1(SYS_SET_TID_ADDRESS, a.clear_child_tid as usize);
    if a.robust_list != 0 {
        let r = syscall2(
            SYS_SET_ROBUST_LIST,
            a.robust_list as usize,
            a.robust_list_len as usize,
        );
        check(sfd, STAGE_THREAD_STATE, 0, r);
    }
    check(
        sfd,
        STAGE_THREAD_STATE,
        1,
        syscall2(SYS_PRCTL, 15, a.comm.as_ptr() as usize),
    ); // PR_SET_NAME
    if a.rseq_ptr != 0 {
        let r = syscall4(
            SYS_RSEQ,
            a.rseq_ptr as usize,
            a.rseq_len as usize,
            0,
            a.rseq_sig as usize,
        );
        check(sfd, STAGE_RSEQ, 0, r);
        // Registration cleared rseq_cs; put the dumped value back.
        // SAFETY: the rseq area lies in the task's memory restored above
        // (the kernel just accepted it), 32-byte aligned; rseq_cs is at +8.
        unsafe { core::ptr::write_volatile((a.rseq_ptr + 8) as *mut u64, a.rseq_cs) };
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
    let pid = syscall0(SYS_GETPID) as usize;
    let tid = syscall0(SYS_GETTID) as usize;
    // SAFETY: siginfos/nr_siginfos describe an array in the bootstrap area.
    let sigs: &[RSiginfo] = unsafe { slice(a.siginfos, a.nr_siginfos) };
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

    // 8. Credentials (groups), process attributes, limits.
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
    check(
        sfd,
        STAGE_THREAD_STATE,
        5,
        syscall1(SYS_PERSONALITY, a.personality as usize),
    );
    if a.set_creds != 0 {
        restore_creds(sfd, &a.creds);
    }
    // Changing credentials resets these, so they come after.
    if a.child_subreaper != 0 {
        check(sfd, STAGE_THREAD_STATE, 2, syscall2(SYS_PRCTL, 36, 1));
    }
    if a.pdeath_signal != 0 {
        check(
            sfd,
            STAGE_THREAD_STATE,
            3,
            syscall2(SYS_PRCTL, 1, a.pdeath_signal as usize),
        );
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

    // 10. Report success, then load fs/gs base and return into the
    // dumped context. Nothing below may use TLS.
    let done = RStatus {
        stage: STAGE_DONE,
        index: 0,
        err: 0,
    };
    syscall3(
        SYS_WRITE,
        sfd as usize,
        &done as *const RStatus as usize,
        size_of::<RStatus>(),
    );
    syscall1(SYS_CLOSE, sfd as usize);
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
