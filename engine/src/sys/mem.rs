//! An anonymous private mapping of this process, for probes that need
//! fresh pages of their own (PAGEMAP_SCAN, soft-dirty, vmsplice).

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
