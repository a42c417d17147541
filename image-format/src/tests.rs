use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::proto::*;
use crate::*;

struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "cryo-image-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn pstree() -> Vec<PstreeEntry> {
    vec![
        PstreeEntry {
            pid: 100,
            ppid: 1,
            pgid: 100,
            sid: 100,
            threads: vec![100, 101],
            cmdline: vec!["sleep".into(), "1000".into()],
            // Present with index 0: not the same as absent.
            pty_ctty: Some(0),
            tty_pgrp: 100,
            ..Default::default()
        },
        PstreeEntry {
            pid: 102,
            ppid: 100,
            pgid: 100,
            sid: 100,
            threads: vec![102],
            cmdline: vec![],
            zombie: true,
            exit_status: 3 << 8,
            exit_signal: 17,
            tty_foreground: false,
            pty_ctty: None,
            tty_pgrp: 0,
            stopped: false,
            shares_fs: false,
            shares_files: false,
            ns_pids: Vec::new(),
            ns_sids: Vec::new(),
            ns_pgids: Vec::new(),
        },
    ]
}

fn inventory(files: Vec<ImageFile>) -> Inventory {
    Inventory {
        format_major: FORMAT_MAJOR,
        format_minor: FORMAT_MINOR,
        producer: "cryo test".into(),
        created_unix_ms: 1_700_000_000_000,
        root_pid: 100,
        files,
        kernel_release: "6.1.0".into(),
        leave_running: false,
        ..Default::default()
    }
}

fn write_records<M: prost::Message>(
    dir: &Path,
    name: &str,
    kind: Kind,
    msgs: &[M],
) -> ImageFileInfo {
    let mut w = ImageWriter::create(dir, name, kind).unwrap();
    for m in msgs {
        w.write(m).unwrap();
    }
    w.finish().unwrap()
}

fn read_all<M: prost::Message + Default>(dir: &Path, name: &str, kind: Kind) -> Vec<M> {
    let mut r = ImageReader::open(dir, name, kind).unwrap();
    let mut v = Vec::new();
    while let Some(m) = r.next::<M>().unwrap() {
        v.push(m);
    }
    v
}

#[test]
fn kinds_and_names() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_magic(k.magic()), Some(k));
        assert_eq!(Kind::from_file_name(&k.file_name(42)), Some(k));
    }
    assert_eq!(Kind::from_magic(*b"XXXX"), None);
    assert_eq!(core_file(7), "core-7.img");
    assert_eq!(mm_file(7), "mm-7.img");
    assert_eq!(pagemap_file(7), "pagemap-7.img");
    assert_eq!(pages_file(7), "pages-7.img");
    assert_eq!(fdinfo_file(7), "fdinfo-7.img");
    assert_eq!(Kind::from_file_name("files.img"), Some(Kind::Files));
    assert_eq!(Kind::from_file_name("pstree.img"), Some(Kind::Pstree));
    assert_eq!(Kind::from_file_name("inventory.img"), Some(Kind::Inventory));
    assert_eq!(parse_file_name("core-12.img"), Some((Kind::Core, Some(12))));
    assert_eq!(Kind::from_file_name("core-.img"), None);
    assert_eq!(Kind::from_file_name("core-1x.img"), None);
    assert_eq!(Kind::from_file_name("core.img"), None);
    assert_eq!(Kind::from_file_name("files-3.img"), None);
    assert_eq!(Kind::from_file_name("pages-3"), None);
}

#[test]
fn round_trip_every_kind() {
    let d = TestDir::new("rt");
    let dir = d.path();

    let ps = pstree();
    let info = write_records(dir, PSTREE_FILE, Kind::Pstree, &ps);
    assert_eq!(read_all::<PstreeEntry>(dir, PSTREE_FILE, Kind::Pstree), ps);
    assert_eq!(
        hash_file(&dir.join(PSTREE_FILE)).unwrap(),
        (info.size, info.xxh3)
    );
    assert_eq!(
        fs::metadata(dir.join(PSTREE_FILE)).unwrap().len(),
        info.size
    );

    let core = CoreEntry {
        tid: 100,
        regs: Some(GpRegs {
            rip: 0x401000,
            rsp: 0x7ffc_0000_0000,
            rax: u64::MAX,
            ..Default::default()
        }),
        xsave: vec![7; 2696],
        blocked: 1 << 9,
        rseq: Some(Rseq {
            ptr: 0x1000,
            len: 32,
            sig: 0x53053053,
            rseq_cs: 0,
        }),
        comm: "sleep".into(),
        process: Some(ProcessCore {
            umask: 0o22,
            cwd: "/tmp".into(),
            sigactions: vec![SigAction {
                signo: 15,
                handler: 0x1234,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = core_file(100);
    write_records(dir, &name, Kind::Core, std::slice::from_ref(&core));
    assert_eq!(read_one::<CoreEntry>(dir, &name, Kind::Core).unwrap(), core);

    let mm = MmEntry {
        brk: 0x5000,
        auxv: vec![6, 4096, 0, 0],
        exe_path: "/usr/bin/sleep".into(),
        vmas: vec![Vma {
            start: 0x400000,
            end: 0x401000,
            prot: 5,
            kind: VmaKind::VmaFilePrivate as i32,
            path: "/usr/bin/sleep".into(),
            vm_flags: vec!["rd".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let name = mm_file(100);
    write_one(dir, &name, Kind::Mm, &mm).unwrap();
    assert_eq!(read_one::<MmEntry>(dir, &name, Kind::Mm).unwrap(), mm);

    let name = pagemap_file(100);
    let head = PagemapHead {
        pages_file: pages_file(100),
        compression: Compression::Zstd as i32,
        total_pages: 3,
    };
    let recs = vec![
        PagemapRecord {
            record: Some(pagemap_record::Record::Run(PagemapEntry {
                vaddr: 0x1000,
                nr_pages: 3,
                flags: 0,
            })),
        },
        PagemapRecord {
            record: Some(pagemap_record::Record::Chunk(PageChunk {
                offset: 4096,
                stored_len: 100,
                nr_pages: 3,
                xxh3: 42,
                raw: false,
                stride: 64,
            })),
        },
    ];
    let mut w = ImageWriter::create(dir, &name, Kind::Pagemap).unwrap();
    w.write(&head).unwrap();
    for r in &recs {
        w.write(r).unwrap();
    }
    w.finish().unwrap();
    let mut r = ImageReader::open(dir, &name, Kind::Pagemap).unwrap();
    assert_eq!(r.next::<PagemapHead>().unwrap().unwrap(), head);
    assert_eq!(r.next::<PagemapRecord>().unwrap().unwrap(), recs[0]);
    assert_eq!(r.next::<PagemapRecord>().unwrap().unwrap(), recs[1]);
    assert!(r.next::<PagemapRecord>().unwrap().is_none());
    assert!(r.next::<PagemapRecord>().unwrap().is_none());

    let fds = vec![
        FdEntry {
            fd: 0,
            id: 1,
            cloexec: false,
            ..Default::default()
        },
        FdEntry {
            fd: 3,
            id: 2,
            cloexec: true,
            ..Default::default()
        },
    ];
    let name = fdinfo_file(100);
    write_records(dir, &name, Kind::Fdinfo, &fds);
    assert_eq!(read_all::<FdEntry>(dir, &name, Kind::Fdinfo), fds);

    let files = vec![
        FileEntry {
            id: 1,
            kind: FileKind::FileRegular as i32,
            path: "/etc/passwd".into(),
            flags: 0o2,
            pos: 17,
            size: 1000,
            ..Default::default()
        },
        FileEntry {
            id: 2,
            kind: FileKind::FilePtyMaster as i32,
            path: "/dev/ptmx".into(),
            flags: 0o2,
            pty: Some(crate::proto::PtyState {
                index: 0,
                termios: Some(crate::proto::Termios {
                    lflag: 0,
                    cc: vec![3; 19],
                    ..Default::default()
                }),
                winsize: Some(crate::proto::Winsize {
                    rows: 37,
                    cols: 101,
                    ..Default::default()
                }),
                locked: false,
                packet: true,
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    write_records(dir, FILES_FILE, Kind::Files, &files);
    assert_eq!(read_all::<FileEntry>(dir, FILES_FILE, Kind::Files), files);

    // Raw records.
    let mut w = ImageWriter::create(dir, "raw.img", Kind::Files).unwrap();
    w.write_raw(b"").unwrap();
    w.write_raw(b"abc").unwrap();
    w.finish().unwrap();
    let mut r = ImageReader::open(dir, "raw.img", Kind::Files).unwrap();
    assert_eq!(r.next_raw().unwrap().unwrap(), b"");
    assert_eq!(r.next_raw().unwrap().unwrap(), b"abc");
    assert!(r.next_raw().unwrap().is_none());

    // Inventory listing all of the above.
    let mut listed = Vec::new();
    for name in [
        PSTREE_FILE,
        FILES_FILE,
        "core-100.img",
        "mm-100.img",
        "pagemap-100.img",
        "fdinfo-100.img",
    ] {
        let (size, xxh3) = hash_file(&dir.join(name)).unwrap();
        listed.push(ImageFile {
            name: name.into(),
            size,
            xxh3,
        });
    }
    let inv = inventory(listed);
    write_inventory(dir, &inv).unwrap();
    assert_eq!(read_inventory(dir).unwrap(), inv);
    verify_files(dir, &inv, false).unwrap();
    verify_files(dir, &inv, true).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(INVENTORY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

fn assert_names(e: &ImageError, name: &str) {
    let s = e.to_string();
    assert!(s.contains(name), "error {s:?} does not name {name}");
}

fn ps_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    write_records(dir, PSTREE_FILE, Kind::Pstree, &pstree());
    let p = dir.join(PSTREE_FILE);
    let bytes = fs::read(&p).unwrap();
    (p, bytes)
}

fn open_ps(dir: &Path) -> Result<Vec<PstreeEntry>, ImageError> {
    let mut r = ImageReader::open(dir, PSTREE_FILE, Kind::Pstree)?;
    let mut v = Vec::new();
    while let Some(m) = r.next::<PstreeEntry>()? {
        v.push(m);
    }
    Ok(v)
}

#[test]
fn damaged_files() {
    let d = TestDir::new("damage");
    let dir = d.path();
    let (p, good) = ps_file(dir);
    let first_len = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;

    // Missing.
    let e = ImageReader::open(dir, "core-5.img", Kind::Core)
        .err()
        .unwrap();
    assert!(matches!(e, ImageError::Missing { .. }), "{e}");
    assert_names(&e, "core-5.img");

    // Empty.
    fs::write(&p, b"").unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(matches!(e, ImageError::EmptyFile { .. }), "{e}");
    assert_names(&e, PSTREE_FILE);

    // Truncated header.
    fs::write(&p, &good[..5]).unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(
        matches!(e, ImageError::TruncatedHeader { found: 5, .. }),
        "{e}"
    );
    assert_names(&e, PSTREE_FILE);

    // Not a cryo image.
    fs::write(&p, b"\x7fELF\x02\x01\x01\x00rest").unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(matches!(e, ImageError::NotCryoImage { .. }), "{e}");
    assert!(e.to_string().contains("not a cryo image"));

    // Wrong kind.
    let e = ImageReader::open(
        dir,
        &{
            write_records(dir, "core-1.img", Kind::Core, &[CoreEntry::default()]);
            "core-1.img".to_string()
        },
        Kind::Mm,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            ImageError::WrongKind {
                expected: Kind::Mm,
                found: FoundKind::Known(Kind::Core),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("is a core file, expected mm"), "{e}");
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(b"ZZZZ");
    fs::write(&p, &bad).unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::WrongKind {
                found: FoundKind::Unknown(_),
                ..
            }
        ),
        "{e}"
    );

    // Truncated length: second record's length prefix cut short.
    let second = 8 + 4 + first_len;
    fs::write(&p, &good[..second + 2]).unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::TruncatedLength {
                record: 1,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_names(&e, PSTREE_FILE);

    // Truncated body.
    fs::write(&p, &good[..good.len() - 1]).unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(
        matches!(e, ImageError::TruncatedBody { record: 1, .. }),
        "{e}"
    );
    assert_names(&e, PSTREE_FILE);

    // Oversized length.
    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&(MAX_RECORD_LEN + 1).to_le_bytes());
    fs::write(&p, &bad).unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(
        matches!(e, ImageError::RecordTooLarge { record: 0, .. }),
        "{e}"
    );
    assert_names(&e, PSTREE_FILE);

    // Flipped byte: first field tag turned into an invalid wire type.
    let mut bad = good.clone();
    bad[12] = (1 << 3) | 7;
    fs::write(&p, &bad).unwrap();
    let e = open_ps(dir).unwrap_err();
    assert!(matches!(e, ImageError::Decode { record: 0, .. }), "{e}");
    assert_names(&e, PSTREE_FILE);

    // read_one: zero and two records.
    write_records::<CoreEntry>(dir, "core-2.img", Kind::Core, &[]);
    let e = read_one::<CoreEntry>(dir, "core-2.img", Kind::Core).unwrap_err();
    assert!(matches!(e, ImageError::NoRecord { .. }), "{e}");
    assert_names(&e, "core-2.img");
    write_records(
        dir,
        "core-3.img",
        Kind::Core,
        &[CoreEntry::default(), CoreEntry::default()],
    );
    let e = read_one::<CoreEntry>(dir, "core-3.img", Kind::Core).unwrap_err();
    assert!(
        matches!(e, ImageError::ExtraRecord { record: 1, .. }),
        "{e}"
    );
}

#[test]
fn inventory_errors() {
    let d = TestDir::new("inv");
    let dir = d.path();

    let e = read_inventory(dir).unwrap_err();
    assert!(matches!(e, ImageError::NoImage { .. }), "{e}");
    assert!(e.to_string().contains("no cryo image"));

    let inv = inventory(vec![]);
    write_inventory(dir, &inv).unwrap();
    let p = dir.join(INVENTORY_FILE);
    let good = fs::read(&p).unwrap();

    // Flipped byte inside the first record: checksum mismatch.
    let mut bad = good.clone();
    bad[14] ^= 0x01;
    fs::write(&p, &bad).unwrap();
    let e = read_inventory(dir).unwrap_err();
    assert!(matches!(e, ImageError::ChecksumMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("inventory.img: checksum mismatch"),
        "{e}"
    );

    // Missing seal.
    let first_len = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    fs::write(&p, &good[..12 + first_len]).unwrap();
    let e = read_inventory(dir).unwrap_err();
    assert!(matches!(e, ImageError::MissingSeal { .. }), "{e}");

    // Newer major.
    let mut newer = inv.clone();
    newer.format_major = FORMAT_MAJOR + 1;
    write_inventory(dir, &newer).unwrap();
    let e = read_inventory(dir).unwrap_err();
    assert!(
        matches!(e, ImageError::NewerFormat { found, supported, .. } if found == FORMAT_MAJOR + 1 && supported == FORMAT_MAJOR),
        "{e}"
    );
    assert_names(&e, INVENTORY_FILE);

    // Newer minor is fine.
    let mut minor = inv.clone();
    minor.format_minor = FORMAT_MINOR + 5;
    write_inventory(dir, &minor).unwrap();
    assert_eq!(read_inventory(dir).unwrap(), minor);
}

#[test]
fn verify_files_errors() {
    let d = TestDir::new("verify");
    let dir = d.path();
    let info = write_records(dir, PSTREE_FILE, Kind::Pstree, &pstree());
    let inv = inventory(vec![info.clone().into()]);
    verify_files(dir, &inv, true).unwrap();

    let p = dir.join(PSTREE_FILE);
    let good = fs::read(&p).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x40;
    fs::write(&p, &bad).unwrap();
    verify_files(dir, &inv, false).unwrap();
    let e = verify_files(dir, &inv, true).unwrap_err();
    assert!(matches!(e, ImageError::FileChecksum { .. }), "{e}");
    assert_names(&e, PSTREE_FILE);

    fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    let e = verify_files(dir, &inv, false).unwrap_err();
    assert!(
        matches!(e, ImageError::FileSize { expected, found, .. } if expected == info.size && found == info.size + 1),
        "{e}"
    );
    assert_names(&e, PSTREE_FILE);

    fs::remove_file(&p).unwrap();
    let e = verify_files(dir, &inv, false).unwrap_err();
    assert!(matches!(e, ImageError::Missing { .. }), "{e}");
    assert_names(&e, PSTREE_FILE);

    let evil = inventory(vec![ImageFile {
        name: "../etc/passwd".into(),
        size: 1,
        xxh3: 0,
    }]);
    let e = verify_files(dir, &evil, false).unwrap_err();
    assert!(matches!(e, ImageError::BadFileName { .. }), "{e}");
}

/// Deterministic, partly compressible page data.
fn page_data(seed: u64, pages: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(pages * PAGE_SIZE);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..pages * PAGE_SIZE / 8 {
        if i % 64 < 32 {
            v.extend_from_slice(&(i as u64).to_le_bytes());
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v
}

fn write_pages(
    dir: &Path,
    name: &str,
    c: Compression,
    threads: usize,
    sizes: &[usize],
) -> (Vec<PageChunk>, ImageFileInfo, Vec<Vec<u8>>) {
    let mut w = PageWriter::create(dir, name, c, 3, threads).unwrap();
    let mut expected = Vec::new();
    for (i, &pages) in sizes.iter().enumerate() {
        let data = page_data(i as u64, pages);
        let mut buf = w.take_buffer();
        assert!(buf.is_empty() && buf.capacity() >= PAGE_BUFFER_CAPACITY);
        buf.extend_from_slice(&data);
        w.submit(buf).unwrap();
        expected.push(data);
    }
    let (chunks, info) = w.finish().unwrap();
    (chunks, info, expected)
}

#[test]
fn pages_round_trip() {
    let d = TestDir::new("pages");
    let dir = d.path();
    let sizes: Vec<usize> = (0..40).map(|i| 1 + (i * 37) % 256).collect();
    for (c, threads) in [
        (Compression::None, 1),
        (Compression::Zstd, 1),
        (Compression::Zstd, 4),
    ] {
        let name = format!("pages-{threads}-{}.img", c.as_str_name());
        let (chunks, info, expected) = write_pages(dir, &name, c, threads, &sizes);
        assert_eq!(chunks.len(), sizes.len());
        assert_eq!(hash_file(&dir.join(&name)).unwrap(), (info.size, info.xxh3));
        assert_eq!(chunks[0].offset, PAGES_HEADER_LEN);
        for w in chunks.windows(2) {
            assert_eq!(w[1].offset, w[0].offset + u64::from(w[0].stored_len));
        }
        if c == Compression::None {
            assert!(chunks.iter().all(|c| c.offset % PAGE_SIZE as u64 == 0));
        } else {
            let total: u64 = chunks.iter().map(|c| u64::from(c.stored_len)).sum();
            let raw: u64 = sizes.iter().map(|&s| (s * PAGE_SIZE) as u64).sum();
            assert!(total < raw, "zstd did not compress: {total} >= {raw}");
        }
        let r = PageReader::open(dir, &name, c, chunks.clone()).unwrap();
        assert_eq!(r.total_pages(), sizes.iter().sum::<usize>() as u64);
        let mut start = 0u64;
        for (i, &s) in sizes.iter().enumerate() {
            assert_eq!(r.chunk_page_starts()[i], start);
            start += s as u64;
        }
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (r, expected) = (&r, &expected);
                scope.spawn(move || {
                    for i in (t..expected.len()).step_by(4) {
                        assert_eq!(&r.read_chunk_vec(i).unwrap(), &expected[i], "chunk {i}");
                    }
                });
            }
        });
        let mut small = vec![0u8; 4096];
        let e = r.read_chunk(1, &mut small).unwrap_err();
        assert!(
            matches!(e, ImageError::ChunkBufferSize { chunk: 1, .. }),
            "{e}"
        );
        let e = r.read_chunk(sizes.len(), &mut small).unwrap_err();
        assert!(matches!(e, ImageError::NoSuchChunk { .. }), "{e}");
    }
}

#[test]
fn pages_bad_input() {
    let d = TestDir::new("pages-bad");
    let dir = d.path();
    let mut w = PageWriter::create(dir, "pages-1.img", Compression::Zstd, 1, 2).unwrap();
    let e = w.submit(vec![0; 100]).unwrap_err();
    assert!(matches!(e, ImageError::BadPageData { len: 100, .. }), "{e}");
    let e = w.submit(Vec::new()).unwrap_err();
    assert!(matches!(e, ImageError::BadPageData { .. }), "{e}");
    let (rp, _wp) = nix::unistd::pipe().unwrap();
    let e = w
        .splice_from_pipe(std::os::fd::AsFd::as_fd(&rp), 4096)
        .unwrap_err();
    assert!(matches!(e, ImageError::SpliceNeedsRaw { .. }), "{e}");
    let (chunks, info) = w.finish().unwrap();
    assert!(chunks.is_empty());
    assert_eq!(info.size, PAGES_HEADER_LEN);
    // Dropping an unfinished writer joins its threads.
    let mut w = PageWriter::create(dir, "pages-2.img", Compression::Zstd, 1, 3).unwrap();
    w.submit(page_data(1, 8)).unwrap();
    drop(w);
}

fn flip(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    b[at as usize] ^= 0x10;
    fs::write(path, b).unwrap();
}

#[test]
fn pages_damage() {
    let d = TestDir::new("pages-damage");
    let dir = d.path();
    let sizes = [4, 16, 8];
    for c in [Compression::None, Compression::Zstd] {
        let name = format!("pages-{}.img", c.as_str_name());
        let p = dir.join(&name);
        let (chunks, _, expected) = write_pages(dir, &name, c, 2, &sizes);
        let good = fs::read(&p).unwrap();

        flip(&p, chunks[1].offset + u64::from(chunks[1].stored_len) / 2);
        let r = PageReader::open(dir, &name, c, chunks.clone()).unwrap();
        assert_eq!(r.read_chunk_vec(0).unwrap(), expected[0]);
        let e = r.read_chunk_vec(1).unwrap_err();
        match c {
            Compression::None => assert!(
                matches!(e, ImageError::ChunkChecksum { chunk: 1, .. }),
                "{e}"
            ),
            Compression::Zstd => assert!(
                matches!(
                    e,
                    ImageError::ChunkChecksum { chunk: 1, .. }
                        | ImageError::ChunkDecompress { chunk: 1, .. }
                        | ImageError::ChunkTruncated { chunk: 1, .. }
                ),
                "{e}"
            ),
        }
        assert_names(&e, &name);
        assert_eq!(r.read_chunk_vec(2).unwrap(), expected[2]);

        // Truncated file: caught at open, naming the chunk.
        fs::write(&p, &good[..good.len() - 1]).unwrap();
        let e = PageReader::open(dir, &name, c, chunks.clone())
            .err()
            .unwrap();
        assert!(
            matches!(e, ImageError::ChunkOutOfFile { chunk: 2, .. }),
            "{e}"
        );
        assert_names(&e, &name);

        fs::write(&p, &good[..100]).unwrap();
        let e = PageReader::open(dir, &name, c, chunks.clone())
            .err()
            .unwrap();
        assert!(matches!(e, ImageError::TruncatedHeader { .. }), "{e}");

        let mut bad = good.clone();
        bad[5] = b'X';
        fs::write(&p, &bad).unwrap();
        let e = PageReader::open(dir, &name, c, chunks.clone())
            .err()
            .unwrap();
        assert!(matches!(e, ImageError::BadPagesHeader { .. }), "{e}");

        fs::write(&p, &good).unwrap();
        let mut overl = chunks.clone();
        overl[2].offset -= 1;
        let e = PageReader::open(dir, &name, c, overl).err().unwrap();
        assert!(
            matches!(e, ImageError::ChunkOverlap { chunk: 2, .. }),
            "{e}"
        );
        let mut empty = chunks.clone();
        empty[0].nr_pages = 0;
        let e = PageReader::open(dir, &name, c, empty).err().unwrap();
        assert!(matches!(e, ImageError::ChunkEmpty { chunk: 0, .. }), "{e}");

        let e = PageReader::open(dir, "pages-404.img", c, chunks.clone())
            .err()
            .unwrap();
        assert!(matches!(e, ImageError::Missing { .. }), "{e}");
        assert_names(&e, "pages-404.img");
    }

    // Zstd chunk that decompresses to fewer bytes than recorded.
    let name = "pages-short.img";
    let (mut chunks, _, _) = write_pages(dir, name, Compression::Zstd, 1, &[2]);
    chunks[0].nr_pages = 3;
    let r = PageReader::open(dir, name, Compression::Zstd, chunks).unwrap();
    let e = r.read_chunk_vec(0).unwrap_err();
    assert!(
        matches!(e, ImageError::ChunkTruncated { chunk: 0, expected, found, .. } if expected == 3 * 4096 && found == 2 * 4096),
        "{e}"
    );
}

#[test]
fn pages_splice() {
    let d = TestDir::new("splice");
    let dir = d.path();
    let name = "pages-9.img";
    let mut w = PageWriter::create(dir, name, Compression::None, 0, 1).unwrap();
    let first = page_data(1, 3);
    w.submit(first.clone()).unwrap();

    let spliced = page_data(2, 40); // larger than the default pipe buffer
    let (rp, wp) = nix::unistd::pipe().unwrap();
    let writer = {
        let data = spliced.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(wp);
            f.write_all(&data).unwrap();
        })
    };
    w.splice_from_pipe(std::os::fd::AsFd::as_fd(&rp), spliced.len())
        .unwrap();
    writer.join().unwrap();

    // A pipe closed early is reported.
    let (rp2, wp2) = nix::unistd::pipe().unwrap();
    let mut f = std::fs::File::from(wp2);
    f.write_all(&[0u8; 4096]).unwrap();
    drop(f);
    let e = w
        .splice_from_pipe(std::os::fd::AsFd::as_fd(&rp2), 8192)
        .unwrap_err();
    assert!(matches!(e, ImageError::PipeClosed { .. }), "{e}");
    let end = (PAGES_HEADER_LEN as usize + first.len() + spliced.len()) as u64;
    assert_eq!(fs::metadata(dir.join(name)).unwrap().len(), end);
    let (chunks, info) = w.finish().unwrap();
    assert_eq!((chunks.len(), info.size), (2, end));
    assert_eq!(hash_file(&dir.join(name)).unwrap().1, info.xxh3);

    // Redo cleanly and check the result.
    let mut w = PageWriter::create(dir, name, Compression::None, 0, 1).unwrap();
    w.submit(first.clone()).unwrap();
    let (rp, wp) = nix::unistd::pipe().unwrap();
    let writer = {
        let data = spliced.clone();
        std::thread::spawn(move || std::fs::File::from(wp).write_all(&data).unwrap())
    };
    w.splice_from_pipe(std::os::fd::AsFd::as_fd(&rp), spliced.len())
        .unwrap();
    writer.join().unwrap();
    let last = page_data(3, 1);
    w.submit(last.clone()).unwrap();
    let (chunks, info) = w.finish().unwrap();
    assert_eq!(chunks.len(), 3);
    assert_eq!(hash_file(&dir.join(name)).unwrap(), (info.size, info.xxh3));
    let r = PageReader::open(dir, name, Compression::None, chunks).unwrap();
    assert_eq!(r.read_chunk_vec(0).unwrap(), first);
    assert_eq!(r.read_chunk_vec(1).unwrap(), spliced);
    assert_eq!(r.read_chunk_vec(2).unwrap(), last);
}

#[test]
fn incompressible_chunks_are_stored_raw_and_read_back() {
    let td = TestDir::new("rawchunk");
    let dir = td.path();
    // One chunk of pseudo-random bytes (incompressible), one of a pattern.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..64 * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let pattern: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
    let mut w = PageWriter::create(dir, "pages-9.img", Compression::Zstd, 1, 2).unwrap();
    w.submit(random.clone()).unwrap();
    w.submit(pattern.clone()).unwrap();
    let (chunks, _) = w.finish().unwrap();
    assert!(chunks[0].raw, "random chunk stored raw");
    assert!(!chunks[1].raw, "patterned chunk compressed");
    assert!((chunks[1].stored_len as usize) < pattern.len() / 4);
    let r = PageReader::open(dir, "pages-9.img", Compression::Zstd, chunks).unwrap();
    assert_eq!(r.read_chunk_vec(0).unwrap(), random);
    assert_eq!(r.read_chunk_vec(1).unwrap(), pattern);
}

/// 1 MiB of 64-byte records: a counter, a slowly rising time stamp, a
/// few small random fields, zero padding.
fn records(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut ts = 1_700_000_000_000_000u64;
    let mut out = Vec::with_capacity(n * 64);
    for i in 0..n as u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ts += x % 1500;
        let mut r = [0u8; 64];
        r[0..8].copy_from_slice(&(1_000_000 + i).to_le_bytes());
        r[8..16].copy_from_slice(&ts.to_le_bytes());
        r[16..18].copy_from_slice(&((x >> 60) as u16).to_le_bytes());
        r[18..20].copy_from_slice(&[200, 0]);
        r[24..32].copy_from_slice(b"checkout");
        r[40..44].copy_from_slice(&((x >> 20) as u32 % 5000).to_le_bytes());
        out.extend_from_slice(&r);
    }
    out
}

#[test]
fn record_chunks_are_grouped_by_stride_and_read_back() {
    let td = TestDir::new("stride");
    let dir = td.path();
    let recs = records(16384, 0x1234_5678_9abc_def1);
    let text: Vec<u8> = (0..256 * 4096)
        .map(|i| b"the quick brown fox jumps over the lazy dog; "[(i * 7 / 3) % 45])
        .collect();
    let mut w = PageWriter::create(dir, "pages-8.img", Compression::Zstd, 1, 2).unwrap();
    w.submit(recs.clone()).unwrap();
    w.submit(text.clone()).unwrap();
    let (chunks, _) = w.finish().unwrap();
    // By the record size or a multiple of it.
    assert!(
        chunks[0].stride != 0 && chunks[0].stride % 64 == 0,
        "records grouped by stride {}",
        chunks[0].stride
    );
    assert_eq!(chunks[1].stride, 0, "text left in order");
    let r = PageReader::open(dir, "pages-8.img", Compression::Zstd, chunks.clone()).unwrap();
    assert_eq!(r.read_chunk_vec(0).unwrap(), recs);
    assert_eq!(r.read_chunk_vec(1).unwrap(), text);
    // A stride a reader cannot undo is refused, naming the file.
    let mut bad = chunks;
    bad[0].stride = 24;
    let err = PageReader::open(dir, "pages-8.img", Compression::Zstd, bad)
        .err()
        .expect("a bad stride is refused")
        .to_string();
    assert!(err.contains("pages-8.img"), "{err}");
}
