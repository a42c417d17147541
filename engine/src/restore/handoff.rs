//! The hand-off into the restorer blob: the bootstrap area (the blob, its
//! arguments, the rt_sigreturn frames and stacks), placed with the premap
//! area in a hole free both in the new task and in the dumped layout; the
//! arguments gathered from every resource module; and the jump.
//!
//! This is one of the places unsafe code is allowed: the bootstrap area is
//! raw memory of the new task that the restorer keeps after it unmaps
//! everything else, and the jump leaves Rust for good.

use crate::ns::pid::View;
use cryo_image::proto::{CoreEntry, Vma, VmaKind};
use cryo_parasite::*;

use super::image::Image;
use super::status::{send_status, Never};
use super::{BOOT_STACK, PAGE, THREAD_STACK};
use crate::infect::blob::{Blob, RESTORER_ELF};
use crate::mem::restore::{is_vdso, kind, premap_len};
use crate::{core, creds, mem, sigframe, signals};

extern "C" {
    // glibc >= 2.35: where this thread's rseq area lives relative to the
    // thread pointer, and its registered feature size (0 if none).
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

/// Where the bootstrap and premap areas go, and this process's vdso.
pub struct Layout {
    pub boot_base: u64,
    pub boot_len: u64,
    pub premap_base: u64,
    /// Our own vdso/vvar mappings, ascending: (start, end, name).
    vdso_now: Vec<(u64, u64, String)>,
    vdso_span: u64,
}

/// Our own vdso/vvar mappings, ascending: (start, end, name).
fn own_vdso() -> Vec<(u64, u64, String)> {
    crate::proc::read_maps("self")
        .into_iter()
        .filter(|m| matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]"))
        .map(|m| (m.start, m.end, m.name))
        .collect()
}

/// Ranges mapped in this process right now.
fn own_maps() -> Vec<(u64, u64)> {
    crate::proc::read_maps("self")
        .into_iter()
        .map(|m| (m.start, m.end))
        .collect()
}

/// Highest free gap of `size` bytes (plus guard space) below the usual
/// mmap area that overlaps none of `busy`.
fn find_hole(busy: &[(u64, u64)], size: u64) -> Option<u64> {
    let guard = 1 << 20;
    let mut b: Vec<(u64, u64)> = busy.to_vec();
    b.push((0, 0x1000_0000)); // stay clear of low memory
    b.push((0x7fff_0000_0000, u64::MAX));
    b.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in b {
        if let Some(last) = merged.last_mut() {
            if s <= last.1 {
                last.1 = last.1.max(e);
                continue;
            }
        }
        merged.push((s, e));
    }
    // Walk gaps from the top down.
    for w in merged.windows(2).rev() {
        let (gap_start, gap_end) = (w[0].1 + guard, w[1].0.saturating_sub(guard));
        if gap_end > gap_start && gap_end - gap_start >= size {
            return Some((gap_end - size) & !(PAGE - 1));
        }
    }
    None
}

/// Plan the bootstrap and premap areas of `img`, sized for its blob,
/// arguments, threads and mappings, in a hole free here and in the dumped
/// layout.
pub fn plan(img: &Image) -> Result<Layout, String> {
    let vmas = &img.mm.vmas;
    let probe = Blob::load("restorer", RESTORER_ELF, 0).map_err(|e| e.to_string())?;
    let vdso_now = own_vdso();
    let vdso_span = match (vdso_now.first(), vdso_now.last()) {
        (Some(f), Some(l)) => l.1 - f.0,
        _ => 0,
    };
    let xs_len = img.core.xsave.len() as u64;
    let per_thread = THREAD_STACK + xs_len + 4096 + 64 * 4;
    let boot_len = probe.image.len() as u64
        + 64 * 1024
        + ((vmas.len() as u64 * 48 + xs_len + 16 * 1024 + 4095) & !4095)
        + vdso_span
        + BOOT_STACK
        + ((img.threads.len() as u64 * per_thread + 4095) & !4095);
    let mut busy = own_maps();
    busy.extend(vmas.iter().map(|v| (v.start, v.end)));
    let total = boot_len + premap_len(vmas) + PAGE;
    let hole = find_hole(&busy, total)
        .ok_or_else(|| format!("no free address range of {total} bytes for the restorer"))?;
    Ok(Layout {
        boot_base: hole,
        boot_len,
        premap_base: hole + boot_len + PAGE,
        vdso_now,
        vdso_span,
    })
}

/// A bump allocator over the bootstrap area.
pub struct Boot {
    base: u64,
    ptr: *mut u8,
    len: usize,
    used: usize,
}

impl Boot {
    /// Map the bootstrap area of `layout` and tell cryo where it is (it
    /// removes it once the task runs in its own context).
    pub fn map(layout: &Layout, pid: u32, status_w: i32) -> Result<Boot, String> {
        let (base, len) = (layout.boot_base, layout.boot_len);
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping;
        // the range was chosen free and is not in use by any Rust object.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED || p as u64 != base {
            return Err(format!(
                "mapping the bootstrap area: {}",
                std::io::Error::last_os_error()
            ));
        }
        let boot_msg = RStatus {
            stage: STAGE_BOOT,
            index: (len / PAGE) as u32,
            err: base as i64,
            pid,
            _pad: 0,
        };
        send_status(status_w, &boot_msg);
        Ok(Boot {
            base,
            ptr: base as *mut u8,
            len: len as usize,
            used: 0,
        })
    }

    fn alloc(&mut self, size: usize, align: usize) -> Result<(u64, *mut u8), String> {
        let off = (self.used + align - 1) & !(align - 1);
        if off + size > self.len {
            return Err(format!(
                "bootstrap area too small ({} bytes needed)",
                off + size
            ));
        }
        self.used = off + size;
        // SAFETY: off + size <= len, so the pointer stays in the mapping.
        Ok((self.base + off as u64, unsafe { self.ptr.add(off) }))
    }

    fn put<T: Copy>(&mut self, items: &[T]) -> Result<u64, String> {
        let size = std::mem::size_of_val(items);
        let (addr, p) = self.alloc(size.max(1), 64)?;
        // SAFETY: `p` points to `size` writable bytes just reserved in the
        // bootstrap mapping, aligned to 64 (>= align_of::<T>() for the ABI
        // structs); `items` cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr() as *const u8, p, size) };
        Ok(addr)
    }

    /// The rt_sigreturn frame (and its XSAVE area) of a thread's core.
    fn frame(&mut self, core: &CoreEntry) -> Result<u64, String> {
        let mut regs = core::regs_from(core);
        sigframe::apply_syscall_restart(&mut regs);
        let alt = core.altstack.unwrap_or_default();
        let altstack = KStack {
            sp: alt.sp,
            flags: alt.flags as i32,
            _pad: 0,
            size: alt.size,
        };
        let fp_at = self.put(&sigframe::build_fpstate(&core.xsave))?;
        self.put(&sigframe::build_frame(
            &regs,
            core.blocked,
            &altstack,
            fp_at,
        ))
    }
}

/// Where the restorer moves each of our vdso/vvar parts: the address of
/// the dumped part of the same kind and size (the program may have moved
/// parts, together or apart), or 0 to unmap it (the program had unmapped
/// it). A dumped part this kernel has no counterpart for is refused.
fn vdso_targets(
    vmas: &[Vma],
    now: &[(u64, u64, String)],
    mm_name: &str,
) -> Result<[u64; 4], String> {
    let kind_of = |name: &str| match name {
        "[vdso]" => Some(VmaKind::VmaVdso),
        "[vvar]" => Some(VmaKind::VmaVvar),
        "[vvar_vclock]" => Some(VmaKind::VmaVvarVclock),
        _ => None,
    };
    let mut dst = [0u64; 4];
    let mut used = vec![false; vmas.len()];
    for (i, n) in now.iter().take(4).enumerate() {
        let want = kind_of(&n.2);
        let found = vmas
            .iter()
            .enumerate()
            .position(|(k, v)| !used[k] && Some(kind(v)) == want && v.end - v.start == n.1 - n.0);
        if let Some(k) = found {
            used[k] = true;
            dst[i] = vmas[k].start;
        }
    }
    if let Some(v) = vmas
        .iter()
        .enumerate()
        .find(|(k, v)| is_vdso(v) && !used[*k])
        .map(|x| x.1)
    {
        let here: Vec<String> = now
            .iter()
            .map(|n| format!("{} of {} bytes", n.2, n.1 - n.0))
            .collect();
        return Err(format!(
            "{mm_name}: the dumped {} mapping at {:#x} ({} bytes) has no counterpart here ({}); restoring across kernels is not supported yet",
            crate::mem::restore::kind(v).as_str_name(),
            v.start,
            v.end - v.start,
            here.join(", ")
        ));
    }
    Ok(dst)
}

/// The arguments of every thread other than the leader: its own stack,
/// frame, credentials, rseq and pending signals in the bootstrap area.
fn thread_args(
    img: &Image,
    boot: &mut Boot,
    status_fd: i32,
    ready: u64,
    userns: Option<&cryo_image::proto::UserNsState>,
    host_free: bool,
) -> Result<Vec<RThread>, String> {
    let mut out = Vec::with_capacity(img.threads.len());
    for (i, t) in img.threads.iter().enumerate() {
        let (stack, _) = boot.alloc(THREAD_STACK as usize, 4096)?;
        let regs = core::regs_from(t);
        let sigframe = boot.frame(t)?;
        let tc = inside(t.creds.clone().unwrap_or_default(), userns);
        let groups = boot.put(&tc.groups)?;
        let rseq = t.rseq.unwrap_or_default();
        let sigs = signals::restorer_siginfos(&t.pending, true);
        let siginfos = boot.put(&sigs)?;
        let mut tids: Vec<i32> = match t.ns_tids.is_empty() {
            true => vec![t.tid as i32],
            false => t.ns_tids.iter().rev().map(|&n| n as i32).collect(),
        };
        if host_free {
            tids.pop();
        }
        out.push(RThread {
            tid: t.tid as u64,
            set_tid: boot.put(&tids)?,
            set_tid_size: tids.len() as u64,
            stack,
            stack_size: THREAD_STACK,
            sigframe,
            fs_base: regs.fs_base,
            gs_base: regs.gs_base,
            clear_child_tid: t.clear_child_tid,
            robust_list: t.robust_list,
            robust_list_len: t.robust_list_len,
            rseq_ptr: rseq.ptr,
            rseq_len: rseq.len,
            rseq_sig: rseq.sig,
            rseq_cs: rseq.rseq_cs,
            comm: core::comm_bytes(&t.comm),
            groups,
            nr_groups: tc.groups.len() as u64,
            set_creds: creds::has_ids(&tc) as u64,
            creds: creds::restorer_creds(&tc),
            pdeath_signal: t.pdeath_signal as u64,
            siginfos,
            nr_siginfos: sigs.len() as u64,
            ready,
            status_fd,
            index: i as u32,
            report_pid: img.pid() as u32,
            _pad: 0,
        });
    }
    Ok(out)
}

/// Our own rseq registration (glibc's), to drop before the switch:
/// (address, length).
fn own_rseq() -> (u64, u32) {
    // SAFETY: reading two plain statics exported by glibc.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return (0, 0);
    }
    let mut fs: u64 = 0;
    // SAFETY: ARCH_GET_FS writes the fs base into `fs`, a live local.
    unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64) };
    ((fs as i64 + off as i64) as u64, size.max(32))
}

/// What the new task made for the restorer before the jump.
pub struct Prepared {
    pub layout: Layout,
    pub boot: Boot,
    /// The premap area (base, length), kept for the restorer.
    pub premap: (u64, u64),
    pub rvmas: Vec<RVma>,
    /// Descriptors the restorer maps (shared files, the executable) and
    /// closes.
    pub close_fds: Vec<i32>,
    pub exe_fd: i32,
    pub status_fd: i32,
    /// See [`open_loginuid`] (the restorer closes it).
    pub loginuid_fd: i32,
    /// See `NodeCtx::cpu_timer_slack_us`.
    pub cpu_timer_slack_us: u64,
    /// The tree's user namespace the task is in, whose ids it gets.
    pub userns: Option<cryo_image::proto::UserNsState>,
    /// Its threads' tids in cryo's pid namespace are the kernel's choice
    /// (`Node::host_free`): set_tid gives the inner ones only.
    pub host_free: bool,
}

/// Credentials as the dump saw them, as the task's user namespace sees
/// them (as they are without one).
fn inside(
    c: cryo_image::proto::Creds,
    userns: Option<&cryo_image::proto::UserNsState>,
) -> cryo_image::proto::Creds {
    match userns {
        Some(u) => crate::ns::user::creds_inside(&c, u),
        None => c,
    }
}

/// Fill the bootstrap area with the restorer, its arguments and the
/// frames, and jump into it. Never returns.
/// `pids`: the tree's pids as the task sees them.
pub fn enter(img: &Image, mut p: Prepared, pids: View) -> Result<Never, String> {
    let mm_name = cryo_image::mm_file(img.pstree.pid);
    let pc = img.core.process.clone().unwrap_or_default();
    let vdso_now = &p.layout.vdso_now;
    let vdso_dst = vdso_targets(&img.mm.vmas, vdso_now, &mm_name)?;
    let mut vdso_parts = [Range::default(); 4];
    for (i, v) in vdso_now.iter().take(4).enumerate() {
        vdso_parts[i] = Range {
            start: v.0,
            end: v.1,
        };
    }
    let boot = &mut p.boot;
    let blob = Blob::load("restorer", RESTORER_ELF, boot.base).map_err(|e| e.to_string())?;
    let (_, bp) = boot.alloc(blob.image.len(), 4096)?;
    // SAFETY: bp points to blob.image.len() bytes just reserved.
    unsafe { std::ptr::copy_nonoverlapping(blob.image.as_ptr(), bp, blob.image.len()) };
    let (scratch, _) = boot.alloc(p.layout.vdso_span.max(PAGE) as usize, 4096)?;
    let (stack_lo, _) = boot.alloc(BOOT_STACK as usize, 4096)?;
    let stack_top = stack_lo + BOOT_STACK - 64;
    let regs = core::regs_from(&img.core);
    let frame_at = boot.frame(&img.core)?;

    let mut keep = vec![Range {
        start: boot.base,
        end: boot.base + boot.len as u64,
    }];
    if p.premap.1 > 0 {
        keep.push(Range {
            start: p.premap.0,
            end: p.premap.0 + p.premap.1,
        });
    }
    if let (Some(f), Some(l)) = (vdso_now.first(), vdso_now.last()) {
        keep.push(Range {
            start: f.0,
            end: l.1,
        });
    }
    keep.sort_by_key(|r| r.start);
    let auxv_at = boot.put(&img.mm.auxv)?;
    let (sigactions, sigaction_mask) = signals::restorer_sigactions(&pc);
    let timers = signals::restorer_timers(&pc, |tid| pids.pid(tid))?;
    // The process's shared pending signals, then the leader's own.
    let mut siginfos = signals::restorer_siginfos(&pc.shared_pending, false);
    siginfos.extend(signals::restorer_siginfos(&img.core.pending, true));
    let threads_ready = boot.put(&[0u32; 16])?;
    let rthreads = thread_args(
        img,
        boot,
        p.status_fd,
        threads_ready,
        p.userns.as_ref(),
        p.host_free,
    )?;
    let rlimits = creds::restorer_rlimits(&pc);
    let creds = inside(
        img.core.creds.clone().unwrap_or_default(),
        p.userns.as_ref(),
    );
    let rseq = img.core.rseq.unwrap_or_default();
    let (own_rseq_ptr, own_rseq_len) = own_rseq();
    let args = RestoreArgs {
        status_fd: p.status_fd,
        trap_before_sigreturn: 1,
        keep: boot.put(&keep)?,
        nr_keep: keep.len() as u64,
        vmas: boot.put(&p.rvmas)?,
        nr_vmas: p.rvmas.len() as u64,
        vdso_parts,
        nr_vdso_parts: vdso_now.len().min(4) as u64,
        vdso_dst,
        vdso_scratch: scratch,
        mm_map: mem::mm::restorer_mm_map(&img.mm, auxv_at, p.exe_fd),
        close_fds: boot.put(&p.close_fds)?,
        nr_close_fds: p.close_fds.len() as u64,
        own_rseq_ptr,
        own_rseq_len,
        own_rseq_sig: 0x5305_3053,
        rseq_ptr: rseq.ptr,
        rseq_len: rseq.len,
        rseq_sig: rseq.sig,
        rseq_cs: rseq.rseq_cs,
        clear_child_tid: img.core.clear_child_tid,
        robust_list: img.core.robust_list,
        robust_list_len: img.core.robust_list_len,
        comm: core::comm_bytes(&img.core.comm),
        personality: pc.personality as u64,
        sigactions,
        sigaction_mask,
        itimers: signals::restorer_itimers(&pc, p.cpu_timer_slack_us),
        timers: boot.put(&timers)?,
        nr_timers: timers.len() as u64,
        siginfos: boot.put(&siginfos)?,
        nr_siginfos: siginfos.len() as u64,
        rlimits: boot.put(&rlimits)?,
        nr_rlimits: rlimits.len() as u64,
        child_subreaper: pc.child_subreaper as u64,
        dumpable: pc.dumpable as u64,
        pdeath_signal: pc.pdeath_signal as u64,
        thp_disable: pc.thp_disable as u64,
        membarrier: pc.membarrier as u64,
        loginuid: if p.loginuid_fd >= 0 {
            loginuid_to_set(pc.loginuid)
        } else {
            u64::MAX
        },
        loginuid_fd: p.loginuid_fd as i64,
        report_pid: img.pid() as u64,
        fs_base: regs.fs_base,
        gs_base: regs.gs_base,
        groups: boot.put(&creds.groups)?,
        nr_groups: creds.groups.len() as u64,
        // Not where the task's user namespace denies it (setgroups deny,
        // or no gid map yet).
        set_groups: p
            .userns
            .as_ref()
            .is_none_or(|u| u.setgroups && !u.gid_map.is_empty()) as u64,
        set_creds: creds::has_ids(&creds) as u64,
        creds: creds::restorer_creds(&creds),
        sigframe: frame_at,
        threads: boot.put(&rthreads)?,
        nr_threads: rthreads.len() as u64,
        threads_ready,
    };
    let args_at = boot.put(std::slice::from_ref(&args))?;
    jump(boot, &blob, stack_top, args_at)
}

/// Make the blob's text executable and call its entry on its own stack.
fn jump(boot: &Boot, blob: &Blob, stack_top: u64, args_at: u64) -> Result<Never, String> {
    if blob.text.1 > blob.text.0 {
        // SAFETY: mprotect of the blob's text pages inside our bootstrap
        // mapping, which no Rust reference points into.
        let r = unsafe {
            libc::mprotect(
                (boot.base + blob.text.0 as u64) as *mut libc::c_void,
                blob.text.1 - blob.text.0,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if r < 0 {
            return Err(format!(
                "mprotect of the restorer: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let entry = boot.base + blob.entry as u64;
    // SAFETY: the restorer blob is mapped executable at boot.base with its
    // relocations applied; `args_at` points to a complete RestoreArgs and
    // `stack_top` into its own stack, all inside the bootstrap area, which
    // the restorer keeps. It never returns.
    unsafe {
        std::arch::asm!(
            "mov rsp, {sp}",
            "call {entry}",
            "ud2",
            sp = in(reg) stack_top,
            entry = in(reg) entry,
            in("rdi") args_at,
            options(noreturn),
        );
    }
}

/// /proc/self/loginuid opened for the restorer to write the image's login
/// uid to, if the new task has another one (it inherits cryo's); -1: none
/// to write. Opened before the task changes its root.
pub fn open_loginuid(img: &Image) -> Result<i32, String> {
    let pc = img.core.process.as_ref();
    if loginuid_to_set(pc.and_then(|p| p.loginuid)) == u64::MAX {
        return Ok(-1);
    }
    nix::fcntl::open(
        "/proc/self/loginuid",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(std::os::fd::IntoRawFd::into_raw_fd)
    .map_err(|e| format!("opening /proc/self/loginuid: {}", std::io::Error::from(e)))
}

/// The login uid the restorer writes: the image's, unless the new task
/// already has it (it inherits cryo's), or u64::MAX to leave it.
fn loginuid_to_set(image: Option<u32>) -> u64 {
    let Some(want) = image else {
        return u64::MAX;
    };
    if crate::creds::loginuid("self") == Some(want) {
        u64::MAX
    } else {
        want as u64
    }
}
