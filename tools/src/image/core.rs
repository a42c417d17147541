//! `cryo image core DIR -O OUTDIR`: one ELF core file per live process of
//! an image (`core.<pid>`), laid out like the kernel's, so that gdb, readelf
//! and other core-file tools can inspect a checkpoint. Zombies have no
//! memory and get none.
//!
//! The file: ELF header, program headers (one PT_NOTE, then one PT_LOAD per
//! mapping), the notes, then the memory of each mapping at a page-aligned
//! offset. Notes, in the kernel's order: for the first thread NT_PRSTATUS,
//! NT_PRFPREG, NT_X86_XSTATE, then NT_PRPSINFO, NT_SIGINFO, NT_AUXV and
//! NT_FILE; for every other thread NT_PRSTATUS, NT_PRFPREG, NT_X86_XSTATE.
//!
//! Memory: the pages of the image, those a child still shared with its
//! parent at the dump (`PAGE_IN_PARENT`) read from the ancestor that stored
//! them (zeros if none did), as the restore rebuilds them; where a page is
//! not in the image at all, the mapped file's content for file mappings
//! (if the file can still be read), the running kernel's vDSO for `[vdso]`
//! (when the image was taken on this kernel), zero otherwise. `[vvar]`-like areas and mappings marked
//! MADV_DONTDUMP get a PT_LOAD without file contents, as the kernel does.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use anyhow::Context;
use cryo_image::proto::{CoreEntry, GpRegs, Vma, VmaKind};
use cryo_image::PAGE_SIZE;

use super::task::{load_image, LoadedImage, MemStream, Memory, Origin, TaskImage};

const PAGE: u64 = PAGE_SIZE as u64;

const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const SHDR_SIZE: u64 = 64;
/// e_phnum value meaning "the count is in section header 0's sh_info".
const PN_XNUM: u16 = 0xffff;

const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

const NT_PRSTATUS: u32 = 1;
const NT_PRFPREG: u32 = 2;
const NT_PRPSINFO: u32 = 3;
const NT_AUXV: u32 = 6;
const NT_X86_XSTATE: u32 = 0x202;
const NT_SIGINFO: u32 = 0x5349_4749;
const NT_FILE: u32 = 0x4649_4c45;

/// sizeof(struct elf_prstatus) on x86_64.
const PRSTATUS_SIZE: usize = 336;
/// sizeof(struct elf_prpsinfo) on x86_64.
const PRPSINFO_SIZE: usize = 136;
const SIGINFO_SIZE: usize = 128;
/// The FXSAVE legacy region at the start of an XSAVE area.
const FXSAVE_SIZE: usize = 512;
const SIGSTOP: i32 = 19;
/// ELF_PRARGSZ: room for the command line in prpsinfo, NUL included.
const PRARGSZ: usize = 80;
const FNAME_LEN: usize = 16;

pub fn run(dir: &Path, out_dir: &Path) -> anyhow::Result<i32> {
    let img = load_image(dir).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create directory", out_dir.display()))?;
    let mut vdso = OwnVdso::probe(&img);
    let mut mem = Memory::new(&img);
    for (i, t) in img.tasks.iter().enumerate() {
        let path = out_dir.join(format!("core.{}", t.entry.pid));
        write_core(&mut mem, i, t, &mut vdso, &path)?;
        println!("{}", path.display());
    }
    for z in img.zombies() {
        tracing::info!("process {} is a zombie: no core file", z.pid);
    }
    Ok(0)
}

/// A little-endian byte buffer.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    /// `s` truncated to `len - 1` bytes, NUL padded to `len`.
    fn cstr(&mut self, s: &[u8], len: usize) -> &mut Self {
        let n = s.len().min(len - 1);
        self.bytes(&s[..n]).zeros(len - n)
    }
    fn align4(&mut self) -> &mut Self {
        let pad = (4 - self.0.len() % 4) % 4;
        self.zeros(pad)
    }
}

/// Appends one note: namesz, descsz, type, name (NUL-terminated), desc,
/// each padded to 4 bytes.
fn note(buf: &mut Buf, name: &str, ty: u32, desc: &[u8]) {
    buf.u32(name.len() as u32 + 1)
        .u32(desc.len() as u32)
        .u32(ty)
        .bytes(name.as_bytes())
        .u8(0)
        .align4()
        .bytes(desc)
        .align4();
}

/// The 27 words of user_regs_struct, in the kernel's order.
fn reg_words(r: &GpRegs) -> [u64; 27] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// Mask of the signals queued in these raw siginfos (si_signo is the first int).
fn pending_mask(sigs: &[cryo_image::proto::PendingSignal]) -> u64 {
    sigs.iter()
        .filter_map(|p| p.siginfo.get(..4))
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .filter(|&s| (1..=64).contains(&s))
        .fold(0u64, |m, s| m | (1u64 << (s - 1)))
}

/// struct elf_prstatus for one thread.
fn prstatus(tid: u32, core: &CoreEntry, t: &TaskImage) -> Vec<u8> {
    let e = &t.entry;
    let mut b = Buf::default();
    // pr_info: si_signo, si_code, si_errno; pr_cursig and padding.
    b.i32(SIGSTOP).i32(0).i32(0).u16(SIGSTOP as u16).u16(0);
    b.u64(pending_mask(&core.pending)).u64(core.blocked);
    b.u32(tid).u32(e.ppid).u32(e.pgid).u32(e.sid);
    // pr_utime, pr_stime, pr_cutime, pr_cstime: not in the image.
    b.zeros(4 * 16);
    for w in reg_words(&core.regs.unwrap_or_default()) {
        b.u64(w);
    }
    b.i32(i32::from(core.xsave.len() >= FXSAVE_SIZE)).u32(0);
    debug_assert_eq!(b.0.len(), PRSTATUS_SIZE);
    b.0
}

/// struct elf_prpsinfo for the process.
fn prpsinfo(t: &TaskImage) -> Vec<u8> {
    let e = &t.entry;
    let leader = t.leader();
    let (uid, gid) = leader
        .and_then(|c| c.creds.as_ref())
        .map(|c| {
            (
                c.uid.first().copied().unwrap_or(0),
                c.gid.first().copied().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0));
    let comm = leader.map(|c| c.comm.as_str()).unwrap_or_default();
    let args = e.cmdline.join(" ");
    let mut b = Buf::default();
    // pr_state 1 = interruptible sleep ('S'), pr_zomb, pr_nice, padding.
    b.u8(1).u8(b'S').u8(0).u8(0).u32(0);
    b.u64(0); // pr_flag
    b.u32(uid).u32(gid);
    b.u32(e.pid).u32(e.ppid).u32(e.pgid).u32(e.sid);
    b.cstr(comm.as_bytes(), FNAME_LEN);
    b.cstr(args.as_bytes(), PRARGSZ);
    debug_assert_eq!(b.0.len(), PRPSINFO_SIZE);
    b.0
}

/// A siginfo that looks like a SIGSTOP sent by the user.
fn siginfo() -> Vec<u8> {
    let mut b = Buf::default();
    b.i32(SIGSTOP).i32(0).i32(0); // si_signo, si_errno, si_code = SI_USER
    b.zeros(SIGINFO_SIZE - 12);
    b.0
}

fn auxv(words: &[u64]) -> Vec<u8> {
    let mut b = Buf::default();
    for &w in words {
        b.u64(w);
    }
    // The kernel's copy always ends with AT_NULL.
    let n = words.len();
    let terminated = n >= 2 && n & 1 == 0 && words[n - 2] == 0;
    if !terminated {
        if n & 1 == 1 {
            b.u64(0);
        }
        b.u64(0).u64(0);
    }
    b.0
}

fn is_file_mapping(v: &Vma) -> bool {
    matches!(
        VmaKind::try_from(v.kind),
        Ok(VmaKind::VmaFilePrivate | VmaKind::VmaFileShared)
    ) && !v.path.is_empty()
}

/// NT_FILE: count, page size, (start, end, offset in pages) per file
/// mapping, then the names.
fn nt_file(vmas: &[Vma]) -> Vec<u8> {
    let files: Vec<&Vma> = vmas.iter().filter(|v| is_file_mapping(v)).collect();
    let mut b = Buf::default();
    b.u64(files.len() as u64).u64(PAGE);
    for v in &files {
        b.u64(v.start).u64(v.end).u64(v.pgoff / PAGE);
    }
    for v in &files {
        b.bytes(v.path.as_bytes()).u8(0);
    }
    b.0
}

fn notes(t: &TaskImage) -> Vec<u8> {
    let mut b = Buf::default();
    for (i, (tid, core)) in t.cores.iter().enumerate() {
        note(&mut b, "CORE", NT_PRSTATUS, &prstatus(*tid, core, t));
        if core.xsave.len() >= FXSAVE_SIZE {
            note(&mut b, "CORE", NT_PRFPREG, &core.xsave[..FXSAVE_SIZE]);
            note(&mut b, "LINUX", NT_X86_XSTATE, &core.xsave);
        }
        if i == 0 {
            note(&mut b, "CORE", NT_PRPSINFO, &prpsinfo(t));
            note(&mut b, "CORE", NT_SIGINFO, &siginfo());
            note(&mut b, "CORE", NT_AUXV, &auxv(&t.mm.auxv));
            note(&mut b, "CORE", NT_FILE, &nt_file(&t.mm.vmas));
        }
    }
    b.0
}

/// The running kernel's vDSO, usable for images taken on this kernel;
/// and the mapped files already warned about, so that a tree of processes
/// mapping the same replaced file gets one warning per file.
struct OwnVdso {
    bytes: Option<Vec<u8>>,
    warned: std::collections::HashSet<String>,
}

impl OwnVdso {
    fn probe(img: &LoadedImage) -> OwnVdso {
        let same_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim() == img.inventory.kernel_release)
            .unwrap_or(false);
        let bytes = if same_kernel { Self::read() } else { None };
        if bytes.is_none() {
            tracing::info!("vDSO contents unavailable (other kernel); [vdso] is dumped as zeros");
        }
        OwnVdso {
            bytes,
            warned: std::collections::HashSet::new(),
        }
    }

    fn read() -> Option<Vec<u8>> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let line = maps.lines().find(|l| l.ends_with("[vdso]"))?;
        let range = line.split_whitespace().next()?;
        let (a, b) = range.split_once('-')?;
        let start = u64::from_str_radix(a, 16).ok()?;
        let end = u64::from_str_radix(b, 16).ok()?;
        let mut buf = vec![0u8; usize::try_from(end.checked_sub(start)?).ok()?];
        File::open("/proc/self/mem")
            .ok()?
            .read_exact_at(&mut buf, start)
            .ok()?;
        Some(buf)
    }

    /// The contents for a `[vdso]` mapping of `len` bytes, if they match.
    fn for_len(&self, len: u64) -> Option<&[u8]> {
        self.bytes.as_deref().filter(|b| b.len() as u64 == len)
    }
}

/// How much of a mapping goes into the file: none for `[vvar]`-like areas
/// (device memory) and MADV_DONTDUMP mappings, all of it otherwise.
fn dump_size(v: &Vma) -> u64 {
    let special = matches!(
        VmaKind::try_from(v.kind),
        Ok(VmaKind::VmaVvar | VmaKind::VmaVvarVclock | VmaKind::VmaVsyscall)
    );
    if special || v.vm_flags.iter().any(|f| f == "dd" || f == "io") {
        0
    } else {
        v.end.saturating_sub(v.start)
    }
}

fn pflags(prot: u32) -> u32 {
    let mut f = 0;
    if prot & 1 != 0 {
        f |= PF_R;
    }
    if prot & 2 != 0 {
        f |= PF_W;
    }
    if prot & 4 != 0 {
        f |= PF_X;
    }
    f
}

struct Segment<'a> {
    vma: &'a Vma,
    offset: u64,
    filesz: u64,
}

/// Writes `data` at `off` unless it is all zeros (the file stays sparse).
fn write_nonzero(f: &File, path: &Path, data: &[u8], off: u64) -> anyhow::Result<()> {
    if data.iter().all(|&b| b == 0) {
        return Ok(());
    }
    f.write_all_at(data, off)
        .with_context(|| format!("{}: write failed", path.display()))
}

/// Copies the mapped file's bytes for a file mapping into its segment.
fn fill_from_file(
    seg: &Segment<'_>,
    out: &File,
    out_path: &Path,
    warned: &mut std::collections::HashSet<String>,
) -> anyhow::Result<()> {
    let v = seg.vma;
    let first = warned.insert(v.path.clone());
    let src = match File::open(&v.path) {
        Ok(f) => f,
        Err(e) => {
            if first {
                tracing::warn!(
                    "{}: cannot open ({e}); its mappings are dumped without the file's contents",
                    v.path
                );
            }
            return Ok(());
        }
    };
    if let Ok(meta) = src.metadata() {
        use std::os::unix::fs::MetadataExt;
        if v.inode != 0 && meta.ino() != v.inode && first {
            tracing::warn!(
                "{}: inode {} differs from the dumped {} (file replaced?); using it anyway",
                v.path,
                meta.ino(),
                v.inode
            );
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < seg.filesz {
        let want = (seg.filesz - done).min(buf.len() as u64) as usize;
        let n = match src.read_at(&mut buf[..want], v.pgoff + done) {
            Ok(0) => break, // beyond the end of the file: zeros
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("{}: read failed: {e}", v.path);
                break;
            }
        };
        write_nonzero(out, out_path, &buf[..n], seg.offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn write_core(
    mem: &mut Memory<'_>,
    idx: usize,
    t: &TaskImage,
    vdso: &mut OwnVdso,
    path: &Path,
) -> anyhow::Result<()> {
    let mut vmas: Vec<&Vma> = t.mm.vmas.iter().collect();
    vmas.sort_by_key(|v| v.start);
    let nr_phdrs = 1 + vmas.len() as u64;
    let extnum = nr_phdrs >= u64::from(PN_XNUM);
    let phoff = EHDR_SIZE;
    let shoff = phoff + nr_phdrs * PHDR_SIZE;
    let notes_off = shoff + if extnum { SHDR_SIZE } else { 0 };
    let notes = notes(t);
    let notes_end = notes_off + notes.len() as u64;
    let data_off = notes_end.div_ceil(PAGE) * PAGE;

    let mut segs = Vec::with_capacity(vmas.len());
    let mut off = data_off;
    for v in &vmas {
        let filesz = dump_size(v);
        segs.push(Segment {
            vma: v,
            offset: off,
            filesz,
        });
        off += filesz;
    }
    let total = off;

    // Headers.
    let mut h = Buf::default();
    h.bytes(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]).zeros(8);
    h.u16(ET_CORE).u16(EM_X86_64).u32(1);
    h.u64(0).u64(phoff).u64(if extnum { shoff } else { 0 });
    h.u32(0).u16(EHDR_SIZE as u16).u16(PHDR_SIZE as u16);
    h.u16(if extnum { PN_XNUM } else { nr_phdrs as u16 });
    h.u16(if extnum { SHDR_SIZE as u16 } else { 0 })
        .u16(u16::from(extnum))
        .u16(0);
    debug_assert_eq!(h.0.len() as u64, EHDR_SIZE);
    // PT_NOTE
    h.u32(PT_NOTE).u32(0).u64(notes_off).u64(0).u64(0);
    h.u64(notes.len() as u64).u64(0).u64(4);
    for s in &segs {
        let v = s.vma;
        h.u32(PT_LOAD)
            .u32(pflags(v.prot))
            .u64(s.offset)
            .u64(v.start)
            .u64(0);
        h.u64(s.filesz).u64(v.end - v.start).u64(PAGE);
    }
    if extnum {
        // Section header 0: SHT_NULL, sh_info = the real segment count.
        h.zeros(40).u32(0).u32(nr_phdrs as u32).zeros(16);
    }
    h.bytes(&notes);

    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    out.write_all_at(&h.0, 0)
        .with_context(|| format!("{}: write failed", path.display()))?;

    // File and vDSO contents first; the image's pages override them.
    for s in segs.iter().filter(|s| s.filesz > 0) {
        match VmaKind::try_from(s.vma.kind) {
            Ok(VmaKind::VmaFilePrivate | VmaKind::VmaFileShared) if is_file_mapping(s.vma) => {
                fill_from_file(s, &out, path, &mut vdso.warned)?
            }
            Ok(VmaKind::VmaVdso) => {
                if let Some(bytes) = vdso.for_len(s.filesz) {
                    write_nonzero(&out, path, bytes, s.offset)?;
                }
            }
            _ => {}
        }
    }
    let mut pages = MemStream::new(idx);
    let mut outside = 0u64;
    let mut from_parent = 0u64;
    while let Some((addr, origin)) = pages.next_page(mem)? {
        if origin != Origin::Own {
            from_parent += 1;
        }
        let i = segs.partition_point(|s| s.vma.end <= addr);
        match segs.get(i) {
            Some(s) if s.vma.start <= addr && addr + PAGE <= s.vma.start + s.filesz => {
                out.write_all_at(pages.page(), s.offset + (addr - s.vma.start))
                    .with_context(|| format!("{}: write failed", path.display()))?;
            }
            Some(s) if s.vma.start <= addr => {} // not dumped (MADV_DONTDUMP)
            _ => outside += 1,
        }
    }
    tracing::debug!(
        "process {}: {from_parent} pages taken from its ancestors' images",
        t.entry.pid
    );
    if outside > 0 {
        tracing::warn!(
            "process {}: {outside} stored pages lie outside every mapping (run `cryo image verify`)",
            t.entry.pid
        );
    }
    out.set_len(total)
        .with_context(|| format!("{}: cannot set the size", path.display()))?;
    Ok(())
}
