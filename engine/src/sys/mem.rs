//! Mappings of this process: an anonymous private mapping for probes that
//! need fresh pages of their own (PAGEMAP_SCAN, soft-dirty, vmsplice), a
//! reserved range at a chosen address that the restore fills with a
//! task's memory, and new shared anonymous memory objects.

use std::ffi::c_void;

use nix::errno::Errno;

/// An anonymous private read-write mapping, unmapped on drop.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    /// Map `len` bytes (rounded up to pages by the kernel) at an address
    /// the kernel chooses; no page is present until it is touched.
    pub fn new(len: usize) -> Result<AnonMap, Errno> {
        // SAFETY: an anonymous private mapping at a kernel-chosen address:
        // it cannot overlap any existing Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(AnonMap {
            ptr: p.cast::<u8>(),
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The address just past the mapping.
    pub fn end(&self) -> u64 {
        self.addr() + self.len as u64
    }

    /// Write `val` to the byte at `offset` (faulting its page in); an
    /// offset past the end is ignored.
    pub fn touch(&self, offset: usize, val: u8) {
        if offset < self.len {
            // SAFETY: offset < len, so the byte is inside our RW mapping,
            // which lives as long as `self`; a volatile write through the
            // raw pointer aliases no Rust reference (slices borrow self
            // mutably, and `touch` borrows it shared).
            unsafe { self.ptr.add(offset).write_volatile(val) };
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is our own RW mapping, alive while `self` is,
        // and the &mut borrow of self makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no references into
        // the mapping outlive `self` (slices borrow self).
        unsafe {
            libc::munmap(self.ptr.cast::<c_void>(), self.len);
        }
    }
}

/// An address range reserved by this process at a chosen address
/// (PROT_NONE, MAP_NORESERVE, never replacing an existing mapping), into
/// which mappings are made with MAP_FIXED. Only the range itself is ever
/// remapped, so nothing else of the process can be clobbered; its bytes
/// are handed out as a slice only once every page of it is mapped
/// read-write. Unmapped on drop, unless kept with [`Reservation::keep`].
pub struct Reservation {
    base: u64,
    len: u64,
    /// Read-write mapped (offset, length) pieces, in the order made.
    mapped: Vec<(u64, u64)>,
    /// Guard regions were installed: some pages fault on any access, so
    /// the range is no longer handed out as bytes.
    guarded: bool,
}

/// mmap: a private anonymous mapping the kernel may drop (Linux 6.11).
const MAP_DROPPABLE: i32 = 0x08;
/// madvise: install guard pages (Linux 6.13).
const MADV_GUARD_INSTALL: i32 = 102;

/// What to map into a piece of a [`Reservation`].
pub enum Backing<'a> {
    /// Private or shared anonymous memory.
    Anon { shared: bool },
    /// Private anonymous memory the kernel may drop under memory pressure
    /// (MAP_DROPPABLE; it reads as zeros then).
    Droppable,
    /// The file behind `fd` from byte `offset` on, private or shared.
    File {
        fd: std::os::fd::BorrowedFd<'a>,
        offset: u64,
        shared: bool,
    },
}

impl Reservation {
    /// Reserve `len` bytes at exactly `base` (page aligned).
    pub fn new(base: u64, len: u64) -> Result<Reservation, Errno> {
        if len == 0 {
            return Ok(Reservation {
                base,
                len,
                mapped: Vec::new(),
                guarded: false,
            });
        }
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping,
        // so no Rust object can be affected; the range becomes ours.
        let p = unsafe {
            libc::mmap(
                base as *mut c_void,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_FIXED_NOREPLACE
                    | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let r = Reservation {
            base: p as u64,
            len,
            mapped: Vec::new(),
            guarded: false,
        };
        if p as u64 != base {
            // An old kernel that ignores the flag placed it elsewhere (r
            // unmaps it).
            return Err(Errno::EEXIST);
        }
        Ok(r)
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Map `len` bytes at `offset` into the range, read-write, from
    /// `backing` (`growsdown`: MAP_GROWSDOWN, for a stack).
    pub fn map(
        &mut self,
        offset: u64,
        len: u64,
        backing: Backing,
        growsdown: bool,
    ) -> Result<(), Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.len || !offset.is_multiple_of(4096) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let mut flags = libc::MAP_FIXED | if growsdown { libc::MAP_GROWSDOWN } else { 0 };
        let (fd, off) = match backing {
            Backing::Anon { shared } => {
                flags |= libc::MAP_ANONYMOUS;
                flags |= if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                (-1, 0)
            }
            Backing::Droppable => {
                flags |= libc::MAP_ANONYMOUS | MAP_DROPPABLE;
                (-1, 0)
            }
            Backing::File { fd, offset, shared } => {
                use std::os::fd::AsRawFd;
                flags |= if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                (fd.as_raw_fd(), offset as i64)
            }
        };
        // SAFETY: [offset, end) lies inside our own reservation (checked
        // above), so MAP_FIXED replaces only memory of this Reservation,
        // and no slice of it is alive (`bytes_mut` borrows self mutably).
        let p = unsafe {
            libc::mmap(
                (self.base + offset) as *mut c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        self.mapped.push((offset, len));
        Ok(())
    }

    /// The whole range as bytes, once every page of it is mapped
    /// read-write (None before).
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        if self.guarded {
            return None;
        }
        let mut pieces = self.mapped.clone();
        pieces.sort_unstable();
        let mut covered = 0;
        for (o, l) in pieces {
            if o > covered {
                return None;
            }
            covered = covered.max(o + l);
        }
        if covered < self.len || self.len == 0 {
            return None;
        }
        // SAFETY: every page of [base, base + len) is mapped read-write
        // (checked above) and stays so while the slice lives (remapping
        // needs &mut self); the range is ours alone, no other Rust object
        // lives in it. Pages of a file mapping past the end of its file
        // would fault if touched; callers write only pages the dumped task
        // had, which lie inside the file.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base as *mut u8, self.len as usize) })
    }

    /// Move `len` bytes of memory mapped at `src` (outside the range, an
    /// inherited mapping nothing of ours uses) to `offset` in the range.
    pub fn adopt(&mut self, offset: u64, len: u64, src: u64) -> Result<(), Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        let src_end = src.checked_add(len).ok_or(Errno::EINVAL)?;
        let overlaps = src < self.base + self.len && self.base < src_end;
        if end > self.len || !offset.is_multiple_of(4096) || len == 0 || overlaps {
            return Err(Errno::EINVAL);
        }
        // SAFETY: the destination lies inside our reservation (checked
        // above) and no slice of it is alive (`bytes_mut` borrows self
        // mutably); the source is a mapping the caller says no Rust object
        // uses (the parent's premap area, inherited by the fork), and does
        // not overlap the destination.
        let p = unsafe {
            libc::mremap(
                src as *mut c_void,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                (self.base + offset) as *mut c_void,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        self.mapped.push((offset, len));
        Ok(())
    }

    /// Drop the pages of `len` bytes at `offset` (MADV_DONTNEED: private
    /// anonymous memory reads as zeros again, a private file mapping as
    /// the file).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.len || !offset.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return Err(Errno::EINVAL);
        }
        // SAFETY: the range lies inside our reservation (checked above) and
        // no slice of it is alive (`bytes_mut` borrows self mutably); its
        // contents change, which no Rust object relies on.
        let r = unsafe {
            libc::madvise(
                (self.base + offset) as *mut c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` a guard region (MADV_GUARD_INSTALL:
    /// every access faults); the mappings move with their guards.
    pub fn guard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.len || !offset.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return Err(Errno::EINVAL);
        }
        self.guarded = true;
        // SAFETY: the range lies inside our reservation (checked above);
        // no slice of it is alive (`bytes_mut` borrows self mutably) and
        // none is handed out again (`guarded`), so nothing of ours touches
        // the pages that now fault.
        let r = unsafe {
            libc::madvise(
                (self.base + offset) as *mut c_void,
                len as usize,
                MADV_GUARD_INSTALL,
            )
        };
        if r != 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Keep the mappings past this object's life (the restorer takes them
    /// over); returns (base, len).
    pub fn keep(self) -> (u64, u64) {
        let r = (self.base, self.len);
        std::mem::forget(self);
        r
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the range is ours (reserved by `new`) and no slice of
            // it outlives `self`.
            unsafe { libc::munmap(self.base as *mut c_void, self.len as usize) };
        }
    }
}

/// A new shared anonymous memory object (the shmem file behind a
/// MAP_SHARED|MAP_ANONYMOUS mapping) of `size` bytes, opened read-write
/// through /proc/self/map_files (needs CAP_CHECKPOINT_RESTORE or
/// CAP_SYS_ADMIN). The mapping made to get it is gone on return.
pub fn shared_anon_object(size: u64) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: a fresh shared anonymous mapping at an address the kernel
    // picks: it overlaps nothing of ours; it is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = p as u64;
    let path = format!("/proc/self/map_files/{:x}-{:x}", start, start + size);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path);
    // SAFETY: unmapping the mapping made just above, used by nothing.
    unsafe { libc::munmap(p, size as usize) };
    Ok(std::os::fd::OwnedFd::from(file?))
}

/// Counters in a page of anonymous memory shared with the children forked
/// after it is made (MAP_SHARED), which one process waits on until
/// another raises them (futex). The page is never unmapped by Rust code
/// (the value is `Copy`, handed down to children): it lives until the
/// process's address space is replaced (a restored task's restorer
/// unmaps it with the rest of cryo's memory).
#[derive(Debug, Clone, Copy)]
pub struct SharedCounters {
    addr: usize,
}

impl SharedCounters {
    const PAGE: usize = 4096;

    pub fn new() -> Result<SharedCounters, Errno> {
        // SAFETY: a fresh shared anonymous mapping at an address the
        // kernel picks: it overlaps no Rust object; its pages read as zero.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(SharedCounters { addr: p as usize })
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(i < Self::PAGE / 4);
        // SAFETY: the page is mapped read-write for the rest of this
        // address space's life (never unmapped, see the type); word `i`
        // is inside it and 4-byte aligned; every process sharing it only
        // ever accesses it atomically.
        unsafe { std::sync::atomic::AtomicU32::from_ptr((self.addr as *mut u32).add(i)) }
    }

    /// Add `n` to counter `i` and wake whoever waits on it.
    pub fn add(&self, i: usize, n: u32) {
        let w = self.word(i);
        w.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE (shared: the word is in a MAP_SHARED page)
        // on a live, aligned u32; it only wakes waiters.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                w.as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
                0,
                0,
                0,
            );
        }
    }

    /// Wait until counter `i` is at least `n`.
    pub fn wait_for(&self, i: usize, n: u32) {
        let w = self.word(i);
        let tick = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        loop {
            let v = w.load(std::sync::atomic::Ordering::SeqCst);
            if v >= n {
                return;
            }
            // SAFETY: FUTEX_WAIT on a live, aligned u32 with a timeout
            // read from a local: it sleeps while the word still holds `v`
            // (the timeout only makes a missed wake cost a tick).
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    w.as_ptr(),
                    libc::FUTEX_WAIT,
                    v,
                    &tick,
                    0,
                    0,
                );
            }
        }
    }
}
