//! Probes of the memory interfaces: userfaultfd (write-protection, async
//! mode), PAGEMAP_SCAN, soft-dirty, memfd and vmsplice.

#![forbid(unsafe_code)]

use super::*;

pub(super) fn new_uffd() -> Result<OwnedFd, KerndatError> {
    sys::uffd::open(libc::O_CLOEXEC | sys::uffd::USER_MODE_ONLY)
        .map_err(sys_err("userfaultfd(UFFD_USER_MODE_ONLY)"))
}

/// The UFFDIO_API handshake asking for `features`; the supported ones.
pub(super) fn uffdio_api(fd: &OwnedFd, features: u64) -> Result<u64, Errno> {
    sys::uffd::api(fd, nix::unistd::getpid(), features).map_err(|e| e.errno)
}

pub(super) fn probe_userfaultfd() -> (Result<Outcome, KerndatError>, Result<Outcome, KerndatError>)
{
    let fd = match new_uffd() {
        Ok(fd) => fd,
        Err(e) => {
            return (
                Err(e),
                Err(KerndatError::NotProbed {
                    reason: "userfaultfd failed",
                }),
            )
        }
    };
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let wp = match uffdio_api(&fd, want) {
        Ok(features) => yes(format!("supported features {features:#x}")),
        Err(errno) => {
            // The API handshake happens once per fd: ask a fresh one for the
            // supported mask.
            let mask = new_uffd()
                .ok()
                .and_then(|f| uffdio_api(&f, 0).ok())
                .map(|f| format!(", supported features {f:#x}"))
                .unwrap_or_default();
            no(format!(
                "UFFDIO_API(WP_ASYNC|WP_UNPOPULATED): {errno}{mask}"
            ))
        }
    };
    (yes("user-mode-only uffd"), wp)
}

// ---------------------------------------------------------------------------
// Memory: PAGEMAP_SCAN, soft-dirty, memfd, vmsplice

pub(super) fn map_pages(pages: usize) -> Result<AnonMap, KerndatError> {
    AnonMap::new(pages * PAGE).map_err(sys_err("mmap"))
}

pub(super) fn probe_pagemap_scan() -> Result<Outcome, KerndatError> {
    let m = map_pages(4)?;
    m.touch(0, 1);
    m.touch(2 * PAGE, 1);
    let path = "/proc/self/pagemap";
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let q = sys::ScanQuery {
        mask: sys::PAGE_IS_PRESENT,
        anyof: sys::PAGE_IS_PRESENT,
        ret: sys::PAGE_IS_PRESENT,
        ..Default::default()
    };
    let regions = sys::pagemap_scan(&f, nix::unistd::getpid(), m.addr(), m.end(), &q)
        .map_err(task_err("ioctl(PAGEMAP_SCAN)"))?;
    yes(format!(
        "{} present region(s) for 2 touched of 4 pages",
        regions.len()
    ))
}

pub(super) fn probe_soft_dirty() -> Result<Outcome, KerndatError> {
    let m = map_pages(1)?;
    m.touch(0, 1);
    let clear = "/proc/self/clear_refs";
    std::fs::write(clear, b"4").map_err(|e| io_err(clear, e))?;
    m.touch(0, 2);
    let path = "/proc/self/pagemap";
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, (m.addr() / PAGE as u64) * 8)
        .map_err(|e| io_err(path, e))?;
    let e = u64::from_ne_bytes(entry);
    if e & (1 << 63) == 0 {
        return no(format!("written page not present in pagemap ({e:#x})"));
    }
    if e & (1 << 55) != 0 {
        yes("bit 55 set after clear_refs + write")
    } else {
        no("bit 55 not set after clear_refs + write (no CONFIG_MEM_SOFT_DIRTY)")
    }
}

pub(super) fn probe_memfd() -> Result<Outcome, KerndatError> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"cryo-check",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|errno| KerndatError::Syscall {
        call: "memfd_create",
        errno,
    })?;
    nix::unistd::ftruncate(&fd, PAGE as i64).map_err(|errno| KerndatError::Syscall {
        call: "ftruncate(memfd)",
        errno,
    })?;
    yes("memfd with sealing allowed")
}

pub(super) fn probe_vmsplice() -> Result<Outcome, KerndatError> {
    let mut m = map_pages(1)?;
    for (i, b) in m.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| {
        KerndatError::Syscall {
            call: "pipe2",
            errno,
        }
    })?;
    let n = nix::fcntl::vmsplice(
        &w,
        &[IoSlice::new(m.as_mut_slice())],
        nix::fcntl::SpliceFFlags::empty(),
    )
    .map_err(|errno| KerndatError::Syscall {
        call: "vmsplice",
        errno,
    })?;
    drop(w);
    let mut back = Vec::with_capacity(n);
    File::from(r)
        .read_to_end(&mut back)
        .map_err(|e| io_err("pipe", e))?;
    let src = m.as_mut_slice();
    if back.len() == n && src.get(..n) == Some(&back[..]) {
        yes(format!("spliced and read back {n} bytes"))
    } else {
        no(format!(
            "spliced {n} bytes, read back {} that differ",
            back.len()
        ))
    }
}

// ---------------------------------------------------------------------------
// cgroups
