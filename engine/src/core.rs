//! The core of each thread: general registers, the XSAVE area, the
//! signal mask, rseq, the robust list, the tid address, the name; and in
//! the leader's core, the process-wide state (see [`crate::signals`],
//! [`crate::creds`], [`crate::fsinfo`]).
//!
//! Dump: ptrace reads registers, XSAVE, mask, rseq and the robust list of
//! each stopped thread; the parasite (leader) or a syscall injected into
//! the thread (the others) reads its altstack and tid address. A thread
//! stopped inside an rseq critical section is moved to its abort handler.
//! Restore: the registers and XSAVE area go into the rt_sigreturn frame
//! each thread ends in (see `restore::handoff`), which needs the same
//! XSAVE layout as the dump's CPU.

#![forbid(unsafe_code)]

use cryo_image::proto::{self, CoreEntry, Creds, GpRegs, ProcessCore, SigaltStack};
use nix::unistd::Pid;

use crate::infect::{InfectError, ThreadState, Victim};
use crate::sigframe::Regs;
use crate::sys::{self, SysError};

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Infect(#[from] InfectError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("task {pid}: its AMX tile registers are in use (XSAVE feature XTILEDATA); cryo does not save them yet")]
    AmxInUse { pid: i32 },
    #[error("{file}: task {pid} was dumped on a CPU with another XSAVE layout ({dumped}; here {here}); restoring across CPU models is not supported yet")]
    Cpu {
        pid: i32,
        file: String,
        dumped: String,
        here: String,
    },
}

type Result<T> = std::result::Result<T, CoreError>;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| CoreError::Proc {
        path: path.into(),
        source,
    })
}

/// What ptrace reads of a thread in a ptrace stop (the leader's before its
/// parasite runs).
pub struct PtraceBits {
    rseq: sys::RseqConf,
    robust: (u64, u64),
    private_sigs: Vec<[u8; 128]>,
}

pub fn ptrace_bits(tid: Pid) -> Result<PtraceBits> {
    Ok(PtraceBits {
        rseq: sys::rseq_config(tid)?,
        robust: sys::get_robust_list(tid)?,
        private_sigs: sys::peek_siginfo(tid, false)?,
    })
}

fn read_task(pid: Pid, addr: u64, out: &mut [u8]) -> std::result::Result<(), nix::errno::Errno> {
    let len = out.len();
    let mut iov = [std::io::IoSliceMut::new(out)];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len,
    }];
    nix::sys::uio::process_vm_readv(pid, &mut iov, &remote).map(|_| ())
}

/// A task stopped inside an rseq critical section continues at its abort
/// handler, as the kernel would do on preemption. Returns the rseq_cs
/// pointer to write back (0 once the abort is taken).
fn rseq_fixup(pid: Pid, rseq: &sys::RseqConf, regs: &mut Regs) -> u64 {
    if rseq.ptr == 0 {
        return 0;
    }
    let mut b = [0u8; 8];
    if read_task(pid, rseq.ptr + 8, &mut b).is_err() {
        return 0;
    }
    let rseq_cs = u64::from_ne_bytes(b);
    if rseq_cs != 0 {
        let mut cs = [0u8; 32];
        if read_task(pid, rseq_cs, &mut cs).is_ok() {
            let word = |i: usize| u64::from_ne_bytes(cs[i..i + 8].try_into().unwrap_or_default());
            let (start_ip, post, abort) = (word(8), word(16), word(24));
            if regs.rip >= start_ip && regs.rip < start_ip.wrapping_add(post) {
                regs.rip = abort;
                return 0;
            }
        }
    }
    rseq_cs
}

/// Everything about a non-leader thread, captured while it is stopped
/// (its altstack and tid address by syscalls injected into it, which
/// write to `scratch` in the leader's parasite area).
pub fn thread_core(pid: i32, v: &mut Victim, scratch: u64) -> Result<CoreEntry> {
    let tid = v.pid;
    let ts = v.thread_state(scratch)?;
    let status = crate::proc::parse_status(&read(&format!("/proc/{pid}/task/{tid}/status"))?);
    let comm = read(&format!("/proc/{pid}/task/{tid}/comm"))?
        .trim_end_matches('\n')
        .to_string();
    let bits = ptrace_bits(tid)?;
    let creds = crate::creds::of_thread(&status, ts.securebits);
    Ok(core_of(v, &ts, &bits, comm, creds, None))
}

/// The core of one stopped thread: what `ts` says (read by the parasite
/// or by syscalls injected into it) and what ptrace reads (registers,
/// XSAVE, mask, rseq, robust list, its own pending signals).
pub fn core_of(
    v: &Victim,
    ts: &ThreadState,
    bits: &PtraceBits,
    comm: String,
    creds: Creds,
    process: Option<ProcessCore>,
) -> CoreEntry {
    let tid = v.pid;
    let rseq = &bits.rseq;
    let (robust, robust_len) = bits.robust;
    let mut regs = *v.regs();
    let rseq_cs = rseq_fixup(tid, rseq, &mut regs);
    CoreEntry {
        tid: tid.as_raw() as u32,
        regs: Some(gpregs(&regs)),
        xsave: v.xstate().to_vec(),
        blocked: v.sigmask(),
        altstack: Some(SigaltStack {
            sp: ts.altstack.sp,
            flags: ts.altstack.flags as u32,
            size: ts.altstack.size,
        }),
        clear_child_tid: ts.tid_address,
        robust_list: robust,
        robust_list_len: robust_len,
        rseq: (rseq.ptr != 0).then_some(proto::Rseq {
            ptr: rseq.ptr,
            len: rseq.len,
            sig: rseq.sig,
            rseq_cs,
        }),
        comm,
        pending: crate::signals::pending(&bits.private_sigs),
        creds: Some(creds),
        process,
        pdeath_signal: ts.pdeath_signal,
        // Read by the dump from outside (crate::sched).
        sched: None,
        // A thread's, set by the dump (the leader's are the pstree's).
        ns_tids: Vec::new(),
    }
}

fn gpregs(r: &Regs) -> GpRegs {
    GpRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

// ---- restore ----

/// The registers of a dumped thread, for its rt_sigreturn frame.
pub fn regs_from(core: &CoreEntry) -> Regs {
    let mut r = crate::sigframe::zeroed_regs();
    if let Some(g) = &core.regs {
        r.r15 = g.r15;
        r.r14 = g.r14;
        r.r13 = g.r13;
        r.r12 = g.r12;
        r.rbp = g.rbp;
        r.rbx = g.rbx;
        r.r11 = g.r11;
        r.r10 = g.r10;
        r.r9 = g.r9;
        r.r8 = g.r8;
        r.rax = g.rax;
        r.rcx = g.rcx;
        r.rdx = g.rdx;
        r.rsi = g.rsi;
        r.rdi = g.rdi;
        r.orig_rax = g.orig_rax;
        r.rip = g.rip;
        r.cs = g.cs;
        r.eflags = g.eflags;
        r.rsp = g.rsp;
        r.ss = g.ss;
        r.fs_base = g.fs_base;
        r.gs_base = g.gs_base;
    }
    r
}

/// A thread whose AMX tile registers hold state (XSTATE_BV has
/// XTILEDATA) is refused: the signal frames cryo returns and restores
/// through carry the default features only.
pub fn check_xstate(pid: i32, xsave: &[u8]) -> Result<()> {
    let xstate_bv = xsave
        .get(512..520)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    if xstate_bv & sys::XFEATURE_XTILEDATA != 0 {
        return Err(CoreError::AmxInUse { pid });
    }
    Ok(())
}

/// The XSAVE area goes back through a signal frame, which only works for
/// the same layout: another CPU (features, sizes) would silently lose
/// vector state. Checked for the leader's core of process `pid`.
pub fn check_cpu(pid: i32, core: &CoreEntry) -> Result<()> {
    let (size, xcr0) = sys::xsave_layout();
    let xs = &core.xsave;
    let dumped_xcr0 = xs
        .get(464..472)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    if xs.len() != size as usize || dumped_xcr0 != xcr0 {
        return Err(CoreError::Cpu {
            pid,
            file: cryo_image::core_file(pid as u32),
            dumped: format!("{} bytes, XCR0 {dumped_xcr0:#x}", xs.len()),
            here: format!("{size} bytes, XCR0 {xcr0:#x}"),
        });
    }
    Ok(())
}

/// A thread name as the 16-byte, NUL-terminated buffer PR_SET_NAME takes.
pub fn comm_bytes(name: &str) -> [u8; 16] {
    let mut comm = [0u8; 16];
    let b = name.as_bytes();
    comm[..b.len().min(15)].copy_from_slice(&b[..b.len().min(15)]);
    comm
}
