//! Extended attributes: list, get and set, on a descriptor or on a path
//! whose last component is not followed.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// flistxattr(2): the names of `fd`'s xattrs, NUL-terminated, into `buf`
/// (an empty `buf` asks for the size).
pub fn flistxattr(fd: BorrowedFd, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `fd` is open for the call; the kernel writes at most
    // `buf.len()` bytes to `buf` (none when it is empty).
    let n = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    Errno::result(n).map(|n| n.unsigned_abs())
}

/// llistxattr(2): as [`flistxattr`], of `path` (not followed at its end).
pub fn llistxattr(path: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `path` is NUL-terminated and lives for the call; the kernel
    // writes at most `buf.len()` bytes to `buf`.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    Errno::result(n).map(|n| n.unsigned_abs())
}

/// fgetxattr(2): the value of xattr `name` of `fd` into `buf` (an empty
/// `buf` asks for the size).
pub fn fgetxattr(fd: BorrowedFd, name: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `fd` is open and `name` NUL-terminated for the call; the
    // kernel writes at most `buf.len()` bytes to `buf`.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    Errno::result(n).map(|n| n.unsigned_abs())
}

/// lgetxattr(2): as [`fgetxattr`], of `path` (not followed at its end).
pub fn lgetxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `path` and `name` are NUL-terminated and live for the call;
    // the kernel writes at most `buf.len()` bytes to `buf`.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    Errno::result(n).map(|n| n.unsigned_abs())
}

/// fsetxattr(2): sets xattr `name` of `fd` to `value` (made or replaced).
pub fn fsetxattr(fd: BorrowedFd, name: &CStr, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: `fd` is open and `name` NUL-terminated for the call; the
    // kernel reads `value.len()` bytes from `value`.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// lsetxattr(2): as [`fsetxattr`], of `path` (not followed at its end).
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: `path` and `name` are NUL-terminated and live for the call;
    // the kernel reads `value.len()` bytes from `value`.
    let r = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    Errno::result(r).map(drop)
}
