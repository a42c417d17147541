//! A process that rearranges its vDSO, which a restore must give back as
//! it was, with the clock still working.
//!
//! `wl_vdso --ready FILE --verdict FILE --vdso moved|apart|gone`
//!
//! - `moved`: the [vvar], [vvar_vclock] and [vdso] mappings move together
//!   to a new place (mremap), as a program that relocates its vDSO does;
//!   the vDSO's clock_gettime, looked up in the moved image's symbol
//!   table, is called before the dump and after the restore;
//! - `apart`: only [vdso] moves; the data pages stay (the clock is not
//!   called: the code reads its data at a fixed distance);
//! - `gone`: every vDSO mapping is unmapped (the program then uses the
//!   clock_gettime system call).
//!
//! After the restore it checks that its vDSO mappings are where they were
//! (or absent), and that CLOCK_MONOTONIC, through the system call and
//! through the moved vDSO, did not go back.
//!
//! The C library keeps the vDSO's old addresses: nothing here calls its
//! time functions once the vDSO has moved.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cryo_tests::wl;

const NAME: &str = "wl_vdso";

/// The vDSO mappings of this process: (name, start, end), ascending.
fn vdso_maps() -> Vec<(String, usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let name = l.split_whitespace().nth(5)?;
            if !matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]") {
                return None;
            }
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                name.to_string(),
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

fn monotonic_syscall() -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the clock_gettime system call writes one timespec of ours.
    unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec, ts.tv_nsec)
}

type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;

/// The address of `__vdso_clock_gettime` in the vDSO image at `base`,
/// from its section headers and dynamic symbol table.
fn vdso_symbol(base: usize, len: usize, want: &[u8]) -> Option<usize> {
    // SAFETY: [base, base + len) is the vDSO mapping, readable, mapped
    // for as long as this process does not unmap it (it does not while
    // the slice is used).
    let img = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
    let u16_at = |o: usize| Some(u16::from_le_bytes(img.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(img.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(img.get(o..o + 8)?.try_into().ok()?) as usize);
    if img.get(..4)? != b"\x7fELF" {
        return None;
    }
    let (shoff, shentsize, shnum) = (u64_at(0x28)?, u16_at(0x3a)? as usize, u16_at(0x3c)?);
    let sh = |i: usize| shoff + i * shentsize;
    let dynsym = (0..shnum as usize).find(|&i| u32_at(sh(i) + 4) == Some(11))?;
    let (sym_off, sym_size) = (u64_at(sh(dynsym) + 24)?, u64_at(sh(dynsym) + 32)?);
    let strtab = u32_at(sh(dynsym) + 40)? as usize;
    let str_off = u64_at(sh(strtab) + 24)?;
    for k in 0..sym_size / 24 {
        let s = sym_off + k * 24;
        let name_at = str_off + u32_at(s)? as usize;
        let name = img.get(name_at..)?.split(|&c| c == 0).next()?;
        if name == want {
            return Some(base + u64_at(s + 8)?);
        }
    }
    None
}

/// CLOCK_MONOTONIC through the vDSO's clock_gettime at `f`.
fn monotonic_vdso(f: usize) -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `f` is __vdso_clock_gettime of the (moved, whole) vDSO of
    // this process, found in its symbol table: a function of this type.
    let call: ClockGettime = unsafe { std::mem::transmute::<usize, ClockGettime>(f) };
    // SAFETY: it writes one timespec of ours.
    unsafe { call(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec, ts.tv_nsec)
}

fn mremap(from: usize, len: usize, to: usize) -> Result<(), String> {
    // SAFETY: moves one of our own vDSO mappings onto a range we reserved.
    let p = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A free range of `len` bytes (reserved PROT_NONE, to be replaced).
fn reserve(len: usize) -> Result<usize, String> {
    // SAFETY: a new mapping the kernel places.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + (2 << 20),
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err("mmap".into());
    }
    // Away from the edges, so the moved block does not touch neighbours.
    Ok(p as usize + (1 << 20))
}

fn run(a: &wl::Args) -> Result<Vec<String>, String> {
    wl::install_term_handler()?;
    let mode = a.get("vdso").unwrap_or("moved").to_string();
    let parts = vdso_maps();
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return Err("no vDSO mappings".into());
    };
    let (base, span) = (first.1, last.2 - first.1);
    let mut clock = None;
    match mode.as_str() {
        "moved" => {
            let to = reserve(span)?;
            for (_, s, e) in &parts {
                mremap(*s, e - s, to + (s - base))?;
            }
            let vdso = vdso_maps().into_iter().find(|p| p.0 == "[vdso]");
            let (_, s, e) = vdso.ok_or("no [vdso] after the move")?;
            clock = Some(
                vdso_symbol(s, e - s, b"__vdso_clock_gettime")
                    .ok_or("no __vdso_clock_gettime in the moved vDSO")?,
            );
        }
        "apart" => {
            let (_, s, e) = parts
                .iter()
                .find(|p| p.0 == "[vdso]")
                .cloned()
                .ok_or("no [vdso]")?;
            mremap(s, e - s, reserve(e - s)?)?;
        }
        "gone" => {
            for (_, s, e) in &parts {
                // SAFETY: unmaps our own vDSO mappings; nothing here calls
                // into them afterwards (see the module note).
                if unsafe { libc::munmap(*s as *mut libc::c_void, e - s) } != 0 {
                    return Err("munmap".into());
                }
            }
        }
        m => return Err(format!("bad --vdso {m}")),
    }
    let layout = vdso_maps();
    let before_sys = monotonic_syscall();
    let before_vdso = clock.map(monotonic_vdso);
    wl::write_atomic(&a.ready, b"ready\n").map_err(|e| format!("ready file: {e}"))?;
    while !wl::TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    let now = vdso_maps();
    if now != layout {
        fails.push(format!(
            "the vDSO mappings are {now:x?}, they were {layout:x?}"
        ));
    }
    let after_sys = monotonic_syscall();
    if after_sys < before_sys {
        fails.push(format!(
            "CLOCK_MONOTONIC went back: {before_sys:?} then {after_sys:?}"
        ));
    }
    if let (Some(f), Some(before)) = (clock, before_vdso) {
        let after = monotonic_vdso(f);
        let sys = monotonic_syscall();
        if after < before || after.0 + 1 < sys.0 || after.0 > sys.0 + 1 {
            fails.push(format!(
                "the moved vDSO's clock_gettime says {after:?} (before the dump {before:?}, the system call {sys:?})"
            ));
        }
    }
    Ok(fails)
}

fn main() {
    let a = wl::Args::parse("wl_vdso --ready FILE --verdict FILE --vdso moved|apart|gone");
    wl::close_extra_fds();
    let result = run(&a);
    wl::finish(NAME, &a.verdict, result);
}
