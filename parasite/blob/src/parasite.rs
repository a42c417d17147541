//! The parasite: runs inside a task being dumped, on its own stack in a
//! mapping the dumper made, and serves commands over a SOCK_SEQPACKET
//! socket. If the socket closes without a FINI (the dumper died), it puts
//! the task back into its saved context by itself.
#![no_std]
#![no_main]

mod rt;

use core::mem::{size_of, MaybeUninit};
use cryo_parasite::*;
use rt::*;

const MAX_FDS: usize = 16;

#[repr(C)]
struct MsgHdr {
    name: u64,
    namelen: u32,
    _pad: u32,
    iov: u64,
    iovlen: u64,
    control: u64,
    controllen: u64,
    flags: i32,
    _pad2: i32,
}

#[repr(C)]
struct KIovec {
    base: u64,
    len: u64,
}

/// Received data, aligned for any command.
#[repr(C, align(16))]
struct Buf([u8; size_of::<IovCmd>()]);

struct State {
    sock: usize,
    fds: [i32; MAX_FDS],
    nfds: usize,
}

impl State {
    fn close_all(&mut self) {
        for i in 0..self.nfds {
            syscall1(SYS_CLOSE, self.fds[i] as usize);
        }
        self.nfds = 0;
    }
}

fn send<T>(sock: usize, v: &T) -> isize {
    syscall3(SYS_WRITE, sock, v as *const T as usize, size_of::<T>())
}

fn reply(sock: usize, cmd: u32, r: isize) -> isize {
    let rep = Reply {
        cmd,
        err: if r < 0 { r as i32 } else { 0 },
        value: if r < 0 { 0 } else { r as i64 },
    };
    send(sock, &rep)
}

/// Receive one message; descriptors that come with it are appended to
/// `st.fds`. Returns the byte count (<= 0 on close or error).
fn recv(st: &mut State, buf: &mut Buf) -> isize {
    let mut ctl = [0u64; 16];
    let mut iov = KIovec {
        base: buf.0.as_mut_ptr() as u64,
        len: buf.0.len() as u64,
    };
    let mut msg = MsgHdr {
        name: 0,
        namelen: 0,
        _pad: 0,
        iov: &mut iov as *mut KIovec as u64,
        iovlen: 1,
        control: ctl.as_mut_ptr() as u64,
        controllen: size_of::<[u64; 16]>() as u64,
        flags: 0,
        _pad2: 0,
    };
    let n = syscall3(
        SYS_RECVMSG,
        st.sock,
        &mut msg as *mut MsgHdr as usize,
        0x4000_0000,
    ); // MSG_CMSG_CLOEXEC
    if n > 0 && msg.controllen >= 16 {
        // One cmsghdr: len u64, level i32, type i32, then the fds.
        let len = ctl[0] as usize;
        let level_type = ctl[1];
        if level_type == 1 | (1 << 32) && len > 16 && len <= size_of::<[u64; 16]>() {
            let count = (len - 16) / 4;
            let p = ctl.as_ptr() as *const i32;
            for i in 0..count {
                // SAFETY: i < count keeps the read inside the cmsg data,
                // which lies inside `ctl` (len was bounds-checked).
                let fd = unsafe { *p.add(4 + i) };
                if st.nfds < MAX_FDS {
                    st.fds[st.nfds] = fd;
                    st.nfds += 1;
                } else {
                    syscall1(SYS_CLOSE, fd as usize);
                }
            }
        }
    }
    n
}

/// vmsplice every range into the pipe, resuming after short splices.
fn splice_pages(pipe: i32, iovs: &mut [Iov]) -> isize {
    let mut total: isize = 0;
    let mut i = 0;
    while i < iovs.len() {
        let n = syscall4(
            SYS_VMSPLICE,
            pipe as usize,
            iovs[i..].as_ptr() as usize,
            iovs.len() - i,
            0,
        );
        if n < 0 {
            return n;
        }
        if n == 0 {
            return -5; // EIO: the pipe took nothing
        }
        total += n;
        let mut left = n as u64;
        while i < iovs.len() && left >= iovs[i].len {
            left -= iovs[i].len;
            i += 1;
        }
        if left > 0 {
            iovs[i].base += left;
            iovs[i].len -= left;
        }
    }
    total
}

fn state(sock: usize, cmd: &StateCmd) -> isize {
    let mut out = MaybeUninit::<StateReply>::zeroed();
    // SAFETY: StateReply is plain integers, so all-zero bytes are a valid value.
    let st = unsafe { out.assume_init_mut() };
    for sig in 1..=NSIG {
        let r = syscall4(
            SYS_RT_SIGACTION,
            sig,
            0,
            &mut st.sigactions[sig - 1] as *mut KSigaction as usize,
            8,
        );
        if r < 0 && sig != 9 && sig != 19 {
            return reply(sock, CMD_STATE, r);
        }
    }
    for which in 0..3 {
        let r = syscall2(
            SYS_GETITIMER,
            which,
            &mut st.itimers[which] as *mut KItimerval as usize,
        );
        if r < 0 {
            return reply(sock, CMD_STATE, r);
        }
    }
    let r = syscall2(SYS_SIGALTSTACK, 0, &mut st.altstack as *mut KStack as usize);
    if r < 0 {
        return reply(sock, CMD_STATE, r);
    }
    syscall2(SYS_PRCTL, 40, &mut st.tid_address as *mut u64 as usize); // PR_GET_TID_ADDRESS
    st.brk = syscall1(SYS_BRK, 0) as u64;
    st.securebits = syscall1(SYS_PRCTL, 27) as i64; // PR_GET_SECUREBITS
    let mut v: i32 = 0;
    syscall2(SYS_PRCTL, 37, &mut v as *mut i32 as usize); // PR_GET_CHILD_SUBREAPER
    st.child_subreaper = v as i64;
    st.dumpable = syscall1(SYS_PRCTL, 3) as i64; // PR_GET_DUMPABLE
    let mut v: i32 = 0;
    syscall2(SYS_PRCTL, 2, &mut v as *mut i32 as usize); // PR_GET_PDEATHSIG
    st.pdeath_signal = v as i64;
    // A private expedited barrier succeeds only after its registration
    // (EPERM before); running one is harmless (an IPI to the CPUs that run
    // the process's threads).
    for cmd in MEMBARRIER_PRIVATE_CMDS {
        if syscall3(SYS_MEMBARRIER, cmd as usize, 0, 0) == 0 {
            st.membarrier |= cmd;
        }
    }
    let n = (cmd.hdr.arg as usize).min(MAX_TIMERS);
    for i in 0..n {
        let id = cmd.timer_ids[i];
        let t = &mut st.timers[i];
        t.id = id;
        let r = syscall2(
            SYS_TIMER_GETTIME,
            id as usize,
            &mut t.spec as *mut KItimerspec as usize,
        );
        if r < 0 {
            return reply(sock, CMD_STATE, r);
        }
        t.overrun = syscall1(SYS_TIMER_GETOVERRUN, id as usize) as i32;
    }
    st.nr_timers = n as u32;
    st.reply = Reply {
        cmd: CMD_STATE,
        err: 0,
        value: 0,
    };
    send(sock, st)
}

/// Whether the page at `addr` holds only zeros.
fn page_is_zero(addr: u64) -> bool {
    let p = addr as *const u64;
    let mut acc = 0u64;
    for i in 0..512 {
        // SAFETY: the dumper only sends ranges of readable mappings of this
        // task (unreadable ones were made readable first), page-aligned, so
        // all 512 words of the page are mapped.
        acc |= unsafe { core::ptr::read_volatile(p.add(i)) };
        if acc != 0 && i % 64 == 63 {
            return false;
        }
    }
    acc == 0
}

const SIGPIPE_BIT: u64 = 1 << (13 - 1);

/// Whether SIGPIPE is pending for this thread or its process.
fn sigpipe_pending() -> bool {
    let mut set: u64 = 0;
    let r = syscall2(SYS_RT_SIGPENDING, &mut set as *mut u64 as usize, 8);
    r == 0 && set & SIGPIPE_BIT != 0
}

/// A vmsplice into a pipe whose reader is gone (the dumper gave up on the
/// transfer) raises SIGPIPE in this thread. Every signal is blocked while
/// the parasite runs, so it would reach the task once cured, where its
/// default action kills it: dequeue it again, without waiting.
fn take_back_sigpipe() {
    let set: u64 = SIGPIPE_BIT;
    let zero = [0i64; 2];
    syscall4(
        SYS_RT_SIGTIMEDWAIT,
        &set as *const u64 as usize,
        0,
        zero.as_ptr() as usize,
        8,
    );
}

/// CMD_PAGES: drop zero pages of ranges that allow it, vmsplice the rest.
fn pages(sock: usize, pipe: i32, iovs: &[Iov]) -> isize {
    let mut out = [Iov::default(); MAX_IOVS];
    let mut n = 0usize;
    let mut rep = PagesReply::default();
    let mut page = 0usize;
    for iov in iovs {
        let skip = iov.len & IOV_SKIP_ZERO != 0;
        let len = iov.len & !IOV_SKIP_ZERO;
        let mut addr = iov.base;
        while addr < iov.base + len {
            if page >= MAX_BATCH_PAGES {
                return reply(sock, CMD_PAGES, -7); // E2BIG
            }
            if skip && page_is_zero(addr) {
                rep.skipped[page / 64] |= 1 << (page % 64);
            } else if n > 0 && out[n - 1].base + out[n - 1].len == addr {
                out[n - 1].len += 4096;
            } else if n < MAX_IOVS {
                out[n] = Iov {
                    base: addr,
                    len: 4096,
                };
                n += 1;
            } else {
                return reply(sock, CMD_PAGES, -7);
            }
            addr += 4096;
            page += 1;
        }
    }
    let had_sigpipe = sigpipe_pending();
    let r = if n > 0 {
        splice_pages(pipe, &mut out[..n])
    } else {
        0
    };
    if r == -32 && !had_sigpipe {
        take_back_sigpipe();
    }
    rep.reply = Reply {
        cmd: CMD_PAGES,
        err: if r < 0 { r as i32 } else { 0 },
        value: if r < 0 { 0 } else { r as i64 },
    };
    send(sock, &rep)
}

/// Entered from `_cryo_start` with the argument pointer in rdi.
///
/// # Safety
/// `args` must point to a complete `ParasiteArgs` that stays mapped.
#[no_mangle]
pub unsafe extern "C" fn blob_main(args: *const ParasiteArgs) {
    // SAFETY: the dumper wrote a ParasiteArgs at this address inside the
    // parasite's own mapping before starting us.
    let args = unsafe { *args };
    let mut st = State {
        sock: args.sock_fd as usize,
        fds: [-1; MAX_FDS],
        nfds: 0,
    };
    let mut buf = MaybeUninit::<Buf>::uninit();
    // SAFETY: Buf is a byte array; any bit pattern is valid, and it is
    // only read after recv() filled the first n bytes.
    let buf = unsafe { buf.assume_init_mut() };
    loop {
        let n = recv(&mut st, buf);
        if n < size_of::<CmdHeader>() as isize {
            break;
        }
        // SAFETY: Buf is 16-aligned and at least a CmdHeader long.
        let hdr = unsafe { *(buf.0.as_ptr() as *const CmdHeader) };
        let r = match hdr.cmd {
            CMD_RECV_FDS => reply(st.sock, hdr.cmd, st.nfds as isize),
            CMD_PAGES => {
                // SAFETY: Buf is sized and aligned for IovCmd.
                let cmd = unsafe { &*(buf.0.as_ptr() as *const IovCmd) };
                let count = (hdr.count as usize).min(MAX_IOVS);
                if (hdr.arg as usize) < st.nfds {
                    pages(st.sock, st.fds[hdr.arg as usize], &cmd.iovs[..count])
                } else {
                    reply(st.sock, hdr.cmd, -9) // EBADF
                }
            }
            CMD_MPROTECT => {
                // SAFETY: Buf is sized and aligned for IovCmd.
                let cmd = unsafe { &*(buf.0.as_ptr() as *const IovCmd) };
                let count = (hdr.count as usize).min(MAX_IOVS);
                let mut res = 0;
                for iov in &cmd.iovs[..count] {
                    let r = syscall3(
                        SYS_MPROTECT,
                        iov.base as usize,
                        iov.len as usize,
                        hdr.arg as usize,
                    );
                    if r < 0 {
                        res = r;
                        break;
                    }
                }
                reply(st.sock, hdr.cmd, res)
            }
            CMD_STATE => {
                // SAFETY: Buf is sized and aligned for StateCmd (smaller than IovCmd).
                let cmd = unsafe { &*(buf.0.as_ptr() as *const StateCmd) };
                state(st.sock, cmd)
            }
            CMD_FINI => {
                st.close_all();
                let r = reply(st.sock, hdr.cmd, 0);
                syscall1(SYS_CLOSE, st.sock);
                if r < 0 {
                    // The dumper is gone: no one will cure us.
                    break;
                }
                return;
            }
            // pause(), not a sleep: an interrupted pause leaves no restart
            // block that the task's own interrupted syscall would resume.
            CMD_TEST_SILENT => loop {
                syscall0(SYS_PAUSE);
            },
            _ => reply(st.sock, hdr.cmd, -22),
        };
        if r < 0 {
            break;
        }
    }
    // The control socket closed or failed without FINI: the dumper is
    // gone. Drop our descriptors and return the task to its saved context.
    st.close_all();
    syscall1(SYS_CLOSE, st.sock);
    // SAFETY: the dumper built the frame from the task's saved registers,
    // XSAVE area and signal mask, inside this mapping (which stays mapped)
    // with a 64-byte aligned fpstate, before starting us.
    unsafe { sigreturn(args.sigframe) }
}
