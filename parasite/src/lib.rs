//! ABI shared by cryo's no_std blobs (the parasite that runs inside a task
//! being dumped, and the restorer that a restored task jumps into) and the
//! engine that drives them. Every struct is `#[repr(C)]` with a size
//! assertion, so both sides agree on the layout.
#![no_std]

/// Largest number of iovecs one page command carries (UIO_MAXIOV is 1024).
pub const MAX_IOVS: usize = 512;
/// Largest number of POSIX timers the parasite reads in one command.
pub const MAX_TIMERS: usize = 64;
/// Number of signals with an action (1..=64).
pub const NSIG: usize = 64;

/// The membarrier commands whose registration is kept (each one's
/// registration command is twice its value).
pub const MEMBARRIER_PRIVATE_CMDS: [u32; 3] = [
    1 << 3, // MEMBARRIER_CMD_PRIVATE_EXPEDITED
    1 << 5, // MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE
    1 << 7, // MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ
];

/// Most pages one CMD_PAGES batch may cover (the reply's bitmap size).
pub const MAX_BATCH_PAGES: usize = 256;
/// Set in `Iov::len` of a CMD_PAGES range whose pages that hold only zeros
/// are to be skipped (anonymous memory: they read as zero after restore).
pub const IOV_SKIP_ZERO: u64 = 1 << 63;

/// Parasite commands.
pub const CMD_PAGES: u32 = 1;
pub const CMD_STATE: u32 = 2;
pub const CMD_MPROTECT: u32 = 3;
pub const CMD_FINI: u32 = 4;
/// Receive descriptors sent with SCM_RIGHTS (pipes for pages).
pub const CMD_RECV_FDS: u32 = 5;
/// Test hook (CRYO_FAULT `fail-silent-parasite`): never answer, waiting
/// in pause() until stopped from outside.
pub const CMD_TEST_SILENT: u32 = 6;

/// Arguments the dumper places at the start of the parasite's data area
/// before starting it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParasiteArgs {
    /// The task-side end of the control socket (SOCK_SEQPACKET).
    pub sock_fd: i64,
    /// Address of a prepared rt_sigreturn frame holding the task's saved
    /// context: the parasite returns through it on its own when the
    /// control socket closes without a FINI (the dumper died).
    pub sigframe: u64,
}
const _: () = assert!(core::mem::size_of::<ParasiteArgs>() == 16);

/// One memory range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iov {
    pub base: u64,
    pub len: u64,
}
const _: () = assert!(core::mem::size_of::<Iov>() == 16);

/// Every command starts with this header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CmdHeader {
    pub cmd: u32,
    /// CMD_PAGES: the task-side pipe fd. CMD_MPROTECT: the protection.
    /// CMD_STATE: number of timer ids that follow.
    pub arg: u32,
    /// Number of `Iov`s (CMD_PAGES, CMD_MPROTECT) following the header.
    pub count: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CmdHeader>() == 16);

/// A page or mprotect command: header plus iovecs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IovCmd {
    pub hdr: CmdHeader,
    pub iovs: [Iov; MAX_IOVS],
}

/// A state command: header plus the POSIX timer ids to read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StateCmd {
    pub hdr: CmdHeader,
    pub timer_ids: [i32; MAX_TIMERS],
}

/// Every reply starts with this.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Reply {
    pub cmd: u32,
    /// 0 or a negative errno.
    pub err: i32,
    /// Command-specific result (bytes spliced, fds received, ...).
    pub value: i64,
}
const _: () = assert!(core::mem::size_of::<Reply>() == 16);

/// Reply to CMD_PAGES: `reply.value` bytes were spliced; bit i of
/// `skipped` is set when page i of the batch (in iov order) held only
/// zeros and was left out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PagesReply {
    pub reply: Reply,
    pub skipped: [u64; MAX_BATCH_PAGES / 64],
}
const _: () = assert!(core::mem::size_of::<PagesReply>() == 48);

/// The kernel's `struct sigaction` for rt_sigaction on x86_64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}
const _: () = assert!(core::mem::size_of::<KSigaction>() == 32);

/// `struct itimerval`: interval then value, each `{sec, usec}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KItimerval {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

/// `struct itimerspec`: interval then value, each `{sec, nsec}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KItimerspec {
    pub interval_sec: i64,
    pub interval_nsec: i64,
    pub value_sec: i64,
    pub value_nsec: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TimerState {
    pub id: i32,
    pub overrun: i32,
    pub spec: KItimerspec,
}

/// `stack_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KStack {
    pub sp: u64,
    pub flags: i32,
    pub _pad: i32,
    pub size: u64,
}
const _: () = assert!(core::mem::size_of::<KStack>() == 24);

/// What CMD_STATE returns: the state only the task itself can read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StateReply {
    pub reply: Reply,
    pub sigactions: [KSigaction; NSIG],
    pub itimers: [KItimerval; 3],
    pub altstack: KStack,
    pub tid_address: u64,
    pub brk: u64,
    pub securebits: i64,
    pub child_subreaper: i64,
    pub dumpable: i64,
    pub pdeath_signal: i64,
    pub nr_timers: u32,
    /// The membarrier commands (MEMBARRIER_CMD_PRIVATE_EXPEDITED and its
    /// _SYNC_CORE and _RSEQ kinds) that succeed in the task: it registered
    /// for them (they fail with EPERM before).
    pub membarrier: u32,
    pub timers: [TimerState; MAX_TIMERS],
}

/// `struct prctl_mm_map` for PR_SET_MM_MAP (104 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}
const _: () = assert!(core::mem::size_of::<PrctlMmMap>() == 104);

/// A mapping the restorer puts in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RVma {
    /// Final address and length.
    pub start: u64,
    pub len: u64,
    /// Where the mapping was prepared (0 if the restorer maps it itself).
    pub premap: u64,
    /// Final PROT_* bits.
    pub prot: u32,
    /// MAP_* flags for mappings the restorer creates (shared file maps).
    pub flags: u32,
    /// File offset for mappings the restorer creates.
    pub pgoff: u64,
    /// Descriptor for mappings the restorer creates, or -1.
    pub fd: i32,
    /// RVMA_* bits.
    pub madv: u32,
}
const _: () = assert!(core::mem::size_of::<RVma>() == 48);

pub const RVMA_DONTDUMP: u32 = 1;
pub const RVMA_DONTFORK: u32 = 2;
pub const RVMA_WIPEONFORK: u32 = 4;
pub const RVMA_HUGEPAGE: u32 = 8;
pub const RVMA_NOHUGEPAGE: u32 = 16;
pub const RVMA_MERGEABLE: u32 = 32;
/// mseal(2) the mapping once it is in place (smaps VmFlags `sl`).
pub const RVMA_SEALED: u32 = 64;
/// An attachment of a System V shared memory segment: the restorer
/// attaches segment `pgoff` (its id) at `start` with shmat (SHM_REMAP;
/// read-only without PROT_WRITE), then sets `prot`; `fd` is -1.
pub const RVMA_SYSV_SHM: u32 = 128;

/// A range the restorer keeps while it unmaps everything else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RRlimit {
    pub resource: u32,
    pub _pad: u32,
    pub cur: u64,
    pub max: u64,
}

/// A POSIX timer to recreate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RTimer {
    pub id: i32,
    pub clock_id: i32,
    pub notify: i32,
    pub signo: i32,
    pub sigev_value: u64,
    pub notify_tid: u32,
    pub _pad: u32,
    pub spec: KItimerspec,
}

/// A signal to queue again: the raw siginfo plus whether it is
/// thread-private (queued by the thread itself: the kernel lets a task
/// queue a tkill-like siginfo only to itself).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RSiginfo {
    pub info: [u8; 128],
    pub private: u32,
    pub _pad: u32,
}

/// struct clone_args of clone3(2), version 2 (with set_tid and cgroup),
/// shared by the engine and the restorer blob.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}
const _: () = assert!(core::mem::size_of::<CloneArgs>() == 88);

/// One thread (other than the leader) for the restorer to create with
/// clone3 `set_tid`. It sets its own per-thread state, reports ready and
/// returns into its dumped context through its own frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RThread {
    pub tid: u64,
    /// Its tid at each level of its pid namespaces, innermost first (an
    /// i32 array for clone3 `set_tid`).
    pub set_tid: u64,
    pub set_tid_size: u64,
    /// Lowest address and size of the thread's stack in the bootstrap area.
    pub stack: u64,
    pub stack_size: u64,
    pub sigframe: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub rseq_ptr: u64,
    pub rseq_len: u32,
    pub rseq_sig: u32,
    pub rseq_cs: u64,
    pub comm: [u8; 16],
    pub groups: u64,
    pub nr_groups: u64,
    pub set_creds: u64,
    pub creds: RCreds,
    pub pdeath_signal: u64,
    /// The thread's own pending signals (RSiginfo array).
    pub siginfos: u64,
    pub nr_siginfos: u64,
    /// Where the thread counts itself ready (a u32 shared by all threads).
    pub ready: u64,
    pub status_fd: i32,
    pub index: u32,
    /// The pid its status records carry: the process's as cryo sees it
    /// (getpid inside a pid namespace of its own is another).
    pub report_pid: u32,
    pub _pad: u32,
}

/// Restorer progress stages, reported with an errno when a step fails.
pub const STAGE_RSEQ_UNREGISTER: u32 = 1;
pub const STAGE_UNMAP: u32 = 2;
pub const STAGE_VDSO: u32 = 3;
pub const STAGE_MREMAP: u32 = 4;
pub const STAGE_MAP_SHARED: u32 = 5;
pub const STAGE_MPROTECT: u32 = 6;
pub const STAGE_MM_MAP: u32 = 7;
pub const STAGE_THREAD_STATE: u32 = 8;
pub const STAGE_RSEQ: u32 = 9;
pub const STAGE_SIGACTION: u32 = 10;
pub const STAGE_TIMERS: u32 = 11;
pub const STAGE_SIGNALS: u32 = 12;
pub const STAGE_RLIMIT: u32 = 13;
pub const STAGE_CREDS: u32 = 14;
pub const STAGE_ITIMER: u32 = 15;
pub const STAGE_MADVISE: u32 = 16;
pub const STAGE_CLONE_THREAD: u32 = 17;
/// Per-thread state set by a restored thread itself (index: thread, err).
pub const STAGE_THREAD: u32 = 18;
pub const STAGE_DONE: u32 = 100;
/// Sent by the new task before the restorer runs: `err` is the bootstrap
/// area's address, `index` its size in pages.
pub const STAGE_BOOT: u32 = 99;
/// The task (or helper, or zombie-to-be) exists, with its session and,
/// if it leads one, its process group (tree restore, phase 1).
pub const STAGE_CREATED: u32 = 101;
/// It joined its process group (phase 2).
pub const STAGE_JOINED: u32 = 102;
/// cryo's code in the new task failed: `index` bytes of message follow.
pub const STAGE_CHILD_ERR: u32 = 103;

/// What the restorer writes to its status descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RStatus {
    pub stage: u32,
    /// Index of the item (vma, signal, resource) the stage failed on.
    pub index: u32,
    /// Negative errno, or 0.
    pub err: i64,
    /// The process reporting (many share one status pipe).
    pub pid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<RStatus>() == 24);

/// Credentials to put back (the last privileged step of a restore).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RCreds {
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub securebits: u32,
    pub no_new_privs: u32,
}

/// Everything the restorer needs. Pointers refer to memory inside the
/// bootstrap area, which the restorer keeps.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RestoreArgs {
    pub status_fd: i32,
    /// Nonzero: stop with int3 right before rt_sigreturn so the
    /// controller can remove the bootstrap area afterwards.
    pub trap_before_sigreturn: u32,
    /// Ranges to keep while everything else is unmapped (sorted).
    pub keep: u64,
    pub nr_keep: u64,
    /// Mappings, in the order to put them in place.
    pub vmas: u64,
    pub nr_vmas: u64,
    /// The vdso/vvar VMAs currently mapped (ascending), where each must
    /// go (its dumped address; 0: unmap it, the dumped task had none such),
    /// and a scratch area as large as the whole block to bounce through.
    pub vdso_parts: [Range; 4],
    pub nr_vdso_parts: u64,
    pub vdso_dst: [u64; 4],
    pub vdso_scratch: u64,
    pub mm_map: PrctlMmMap,
    /// Descriptors to close once mappings are in place.
    pub close_fds: u64,
    pub nr_close_fds: u64,
    /// Own rseq registration to drop first (ptr 0 = none).
    pub own_rseq_ptr: u64,
    pub own_rseq_len: u32,
    pub own_rseq_sig: u32,
    /// rseq registration to make (ptr 0 = none) and rseq_cs to write back.
    pub rseq_ptr: u64,
    pub rseq_len: u32,
    pub rseq_sig: u32,
    pub rseq_cs: u64,
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub comm: [u8; 16],
    pub personality: u64,
    pub sigactions: [KSigaction; NSIG],
    /// Bit (signo-1) set: restore that action.
    pub sigaction_mask: u64,
    pub itimers: [KItimerval; 3],
    pub timers: u64,
    pub nr_timers: u64,
    pub siginfos: u64,
    pub nr_siginfos: u64,
    pub rlimits: u64,
    pub nr_rlimits: u64,
    pub child_subreaper: u64,
    pub dumpable: u64,
    pub pdeath_signal: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    /// Supplementary groups to set (setgroups) when `set_groups` is nonzero.
    pub groups: u64,
    pub nr_groups: u64,
    pub set_groups: u64,
    /// Nonzero: switch to `creds`.
    pub set_creds: u64,
    pub creds: RCreds,
    /// The rt_sigreturn frame; rsp is set to `sigframe + 8` before the call.
    pub sigframe: u64,
    /// The other threads to create (RThread array) and the u32 word each
    /// of them increments once its state is set.
    pub threads: u64,
    pub nr_threads: u64,
    pub threads_ready: u64,
    /// Nonzero: PR_SET_THP_DISABLE (the process had transparent huge
    /// pages turned off).
    pub thp_disable: u64,
    /// StateReply::membarrier: register for each of those commands again.
    pub membarrier: u64,
    /// The audit login uid to write to /proc/self/loginuid (only the task
    /// itself may), or u64::MAX to leave it; through `loginuid_fd`, that
    /// file opened by the task before it changed its root.
    pub loginuid: u64,
    pub loginuid_fd: i64,
    /// The pid its status records carry (see RThread::report_pid).
    pub report_pid: u64,
}

/// Offsets inside the kernel rt_sigframe (x86_64), from its start.
pub mod sigframe {
    pub const UC_FLAGS: usize = 8;
    pub const UC_STACK: usize = 24;
    pub const SIGCONTEXT: usize = 48;
    pub const UC_SIGMASK: usize = 304;
    pub const SIZE: usize = 440;
    /// Offsets inside the sigcontext.
    pub const SC_R8: usize = 0;
    pub const SC_R9: usize = 8;
    pub const SC_R10: usize = 16;
    pub const SC_R11: usize = 24;
    pub const SC_R12: usize = 32;
    pub const SC_R13: usize = 40;
    pub const SC_R14: usize = 48;
    pub const SC_R15: usize = 56;
    pub const SC_RDI: usize = 64;
    pub const SC_RSI: usize = 72;
    pub const SC_RBP: usize = 80;
    pub const SC_RBX: usize = 88;
    pub const SC_RDX: usize = 96;
    pub const SC_RAX: usize = 104;
    pub const SC_RCX: usize = 112;
    pub const SC_RSP: usize = 120;
    pub const SC_RIP: usize = 128;
    pub const SC_EFLAGS: usize = 136;
    pub const SC_CS: usize = 144;
    pub const SC_GS: usize = 146;
    pub const SC_FS: usize = 148;
    pub const SC_SS: usize = 150;
    pub const SC_FPSTATE: usize = 184;
    pub const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
    pub const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
    /// UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    pub const UC_FLAGS_VALUE: u64 = 7;
}
