//! Building x86_64 rt_sigreturn frames from dumped registers: used by the
//! parasite to return the task to its saved context on its own, and by the
//! restorer to enter the restored context.

#![forbid(unsafe_code)]

use cryo_parasite::{sigframe as sf, KStack};

/// user_regs_struct, as PTRACE_GETREGS returns it.
pub type Regs = libc::user_regs_struct;

/// All-zero registers.
pub fn zeroed_regs() -> Regs {
    Regs {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        rbp: 0,
        rbx: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rax: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        orig_rax: 0,
        rip: 0,
        cs: 0,
        eflags: 0,
        rsp: 0,
        ss: 0,
        fs_base: 0,
        gs_base: 0,
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
    }
}

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
const EINTR: i64 = -4;

/// Turn a syscall the task was stopped in into what the kernel's restart
/// logic would do: re-execute it, or (for restart blocks, whose kernel
/// state does not survive) return EINTR.
pub fn apply_syscall_restart(regs: &mut Regs) {
    if (regs.orig_rax as i64) < 0 {
        return;
    }
    match regs.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            regs.rax = regs.orig_rax;
            regs.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => regs.rax = EINTR as u64,
        _ => {}
    }
    regs.orig_rax = u64::MAX;
}

/// Size of the fpstate buffer for an XSAVE area of `xsave_len` bytes.
pub fn fpstate_len(xsave_len: usize) -> usize {
    xsave_len + 4
}

/// Build the fpstate (XSAVE area plus the software bytes and trailing
/// magic the kernel checks before it uses the extended state).
///
/// PTRACE_GETREGSET gives the area of every feature in XCR0, AMX tile
/// data included where the CPU has it; a signal frame of a task that did
/// not ask for AMX is shorter, and the kernel takes only x87/SSE from a
/// frame that claims more than its own size (the upper halves of the
/// vector registers would be lost). So the frame claims the features and
/// size of the default frame (the same layout, cut before the tile data),
/// and carries the trailing magic both there and after the whole area
/// (where the kernel of a task that did ask for AMX looks for it).
pub fn build_fpstate(xsave: &[u8]) -> Vec<u8> {
    let s = xsave.len();
    let (frame_size, frame_features) = crate::sys::sigframe_xsave();
    let mut fp = vec![0u8; fpstate_len(s)];
    fp[..s].copy_from_slice(xsave);
    if s >= 576 {
        let size = s.min(frame_size as usize);
        // XCR0 as PTRACE_GETREGSET reported it sits at 464.
        let xcr0 = u64::from_le_bytes(xsave[464..472].try_into().unwrap_or([0; 8]));
        fp[464..512].fill(0);
        fp[464..468].copy_from_slice(&sf::FP_XSTATE_MAGIC1.to_le_bytes());
        fp[468..472].copy_from_slice(&((s + 4) as u32).to_le_bytes());
        fp[472..480].copy_from_slice(&(xcr0 & frame_features).to_le_bytes());
        fp[480..484].copy_from_slice(&(size as u32).to_le_bytes());
        fp[size..size + 4].copy_from_slice(&sf::FP_XSTATE_MAGIC2.to_le_bytes());
        fp[s..s + 4].copy_from_slice(&sf::FP_XSTATE_MAGIC2.to_le_bytes());
    }
    fp
}

/// Build a 440-byte rt_sigframe. `regs` must already have had
/// [`apply_syscall_restart`] applied. `fpstate_addr` is where the fpstate
/// will live in the task (64-byte aligned), 0 for none.
pub fn build_frame(regs: &Regs, mask: u64, altstack: &KStack, fpstate_addr: u64) -> Vec<u8> {
    let mut f = vec![0u8; sf::SIZE];
    let put =
        |f: &mut Vec<u8>, off: usize, v: u64| f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut f, sf::UC_FLAGS, sf::UC_FLAGS_VALUE);
    put(&mut f, sf::UC_STACK, altstack.sp);
    f[sf::UC_STACK + 8..sf::UC_STACK + 12].copy_from_slice(&altstack.flags.to_le_bytes());
    put(&mut f, sf::UC_STACK + 16, altstack.size);
    let sc = sf::SIGCONTEXT;
    for (off, v) in [
        (sf::SC_R8, regs.r8),
        (sf::SC_R9, regs.r9),
        (sf::SC_R10, regs.r10),
        (sf::SC_R11, regs.r11),
        (sf::SC_R12, regs.r12),
        (sf::SC_R13, regs.r13),
        (sf::SC_R14, regs.r14),
        (sf::SC_R15, regs.r15),
        (sf::SC_RDI, regs.rdi),
        (sf::SC_RSI, regs.rsi),
        (sf::SC_RBP, regs.rbp),
        (sf::SC_RBX, regs.rbx),
        (sf::SC_RDX, regs.rdx),
        (sf::SC_RAX, regs.rax),
        (sf::SC_RCX, regs.rcx),
        (sf::SC_RSP, regs.rsp),
        (sf::SC_RIP, regs.rip),
        (sf::SC_EFLAGS, regs.eflags),
        (sf::SC_FPSTATE, fpstate_addr),
    ] {
        put(&mut f, sc + off, v);
    }
    f[sc + sf::SC_CS..sc + sf::SC_CS + 2].copy_from_slice(&(regs.cs as u16).to_le_bytes());
    f[sc + sf::SC_SS..sc + sf::SC_SS + 2].copy_from_slice(&(regs.ss as u16).to_le_bytes());
    put(&mut f, sf::UC_SIGMASK, mask);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_regs() -> Regs {
        zeroed_regs()
    }

    #[test]
    fn restart_rules() {
        let mut r = zero_regs();
        r.orig_rax = 7;
        r.rax = (-514i64) as u64;
        r.rip = 0x1002;
        apply_syscall_restart(&mut r);
        assert_eq!((r.rax, r.rip), (7, 0x1000));
        let mut r = zero_regs();
        r.orig_rax = 35;
        r.rax = (-516i64) as u64;
        r.rip = 0x1002;
        apply_syscall_restart(&mut r);
        assert_eq!((r.rax as i64, r.rip), (-4, 0x1002));
        let mut r = zero_regs();
        r.orig_rax = u64::MAX;
        r.rax = 5;
        apply_syscall_restart(&mut r);
        assert_eq!(r.rax, 5);
    }

    #[test]
    fn fpstate_magic() {
        let mut xs = vec![0u8; 832];
        xs[464] = 7;
        let fp = build_fpstate(&xs);
        assert_eq!(fp.len(), 836);
        assert_eq!(&fp[832..836], &sf::FP_XSTATE_MAGIC2.to_le_bytes());
        assert_eq!(u64::from_le_bytes(fp[472..480].try_into().unwrap()), 7);
    }

    /// An area larger than this CPU's default signal frame (AMX tile data
    /// in XCR0) claims the default frame's size, with the magic there and
    /// at its end.
    #[test]
    fn fpstate_of_a_larger_area() {
        let (frame, _) = crate::sys::sigframe_xsave();
        let s = frame as usize + 8192;
        let mut xs = vec![0u8; s];
        xs[464] = 7;
        let fp = build_fpstate(&xs);
        let at = |o: usize| u32::from_le_bytes(fp[o..o + 4].try_into().unwrap());
        assert_eq!(at(480), frame);
        assert_eq!(at(frame as usize), sf::FP_XSTATE_MAGIC2);
        assert_eq!(at(s), sf::FP_XSTATE_MAGIC2);
    }
}
