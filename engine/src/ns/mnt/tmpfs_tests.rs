//! Tests of tmpfs.rs: a tree of every kind of file saved and made again,
//! and hostile images refused.

use super::*;
use nix::fcntl::AT_FDCWD;
use std::collections::BTreeMap;
use std::fs::{self, File, Permissions};
use std::os::unix::fs::{lchown, symlink, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

type Res = Result<(), Box<dyn std::error::Error>>;

fn temp(tag: &str) -> std::io::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("cryo-tmpfs-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir(&p).map(|()| p)
}

fn open_dir(p: &Path) -> std::io::Result<OwnedFd> {
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(p)?;
    Ok(dir.into())
}

fn chmod(p: PathBuf, mode: u32) -> std::io::Result<()> {
    fs::set_permissions(p, Permissions::from_mode(mode))
}

#[derive(Debug, PartialEq)]
struct Meta {
    mode: u32,
    owner: (u32, u32),
    size: u64,
    times: (i64, i64),
    nlink: u64,
    target: Option<PathBuf>,
}

/// The metadata of every entry, each taken before its directory is
/// read (reading changes the atime).
fn snapshot(root: &Path, rel: &str, out: &mut BTreeMap<String, Meta>) -> Res {
    let (p, m) = (root.join(rel), fs::symlink_metadata(root.join(rel))?);
    let target = m.is_symlink().then(|| fs::read_link(&p)).transpose()?;
    // Readlink (the dump's too) sets the atime of a symlink: not compared.
    let atime = if m.is_symlink() {
        0
    } else {
        m.atime() * NS + m.atime_nsec()
    };
    let (size, nlink) = if m.is_dir() {
        (0, 0)
    } else {
        (m.size(), m.nlink())
    };
    let (owner, times) = ((m.uid(), m.gid()), (atime, m.mtime() * NS + m.mtime_nsec()));
    let meta = Meta {
        mode: m.mode(),
        owner,
        size,
        times,
        nlink,
        target,
    };
    out.insert(rel.to_string(), meta);
    if m.is_dir() {
        for e in fs::read_dir(&p)? {
            let name = e?.file_name().into_string().map_err(|_| "name")?;
            snapshot(root, &join(rel, &name), out)?;
        }
    }
    Ok(())
}

/// A tree of every kind; returns whether the filesystem takes user xattrs.
fn build(src: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    fs::create_dir_all(src.join("d1/d2"))?;
    fs::write(src.join("d1/d2/deep.txt"), "deep")?;
    let sparse = File::create(src.join("sparse"))?;
    sparse.write_all_at(b"head", 0)?;
    sparse.write_all_at(b"tail", 3 << 20)?;
    fs::write(src.join("ro"), "secret")?;
    chmod(src.join("ro"), 0o400)?;
    fs::write(src.join("suid"), "#!/bin/true")?;
    lchown(src.join("suid"), Some(1234), Some(5678))?;
    chmod(src.join("suid"), 0o4755)?;
    fs::create_dir(src.join("sgid"))?;
    lchown(src.join("sgid"), Some(0), Some(5678))?;
    chmod(src.join("sgid"), 0o2775)?;
    symlink("d1/d2/deep.txt", src.join("link"))?;
    lchown(src.join("link"), Some(42), Some(43))?;
    nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o640))?;
    fs::write(src.join("hl1"), "twice")?;
    fs::hard_link(src.join("hl1"), src.join("d1/hl2"))?;
    drop(std::os::unix::net::UnixListener::bind(src.join("sock"))?);
    chmod(src.to_path_buf(), 0o750)?;
    let file = CString::new(src.join("sparse").into_os_string().into_encoded_bytes())?;
    // ENOTSUP: the filesystem has no user xattrs.
    let xattrs = match set_xattr(At::Link(&file), c"user.cryo", b"value") {
        Err(Errno::EOPNOTSUPP) => false,
        r => r.map(|()| true)?,
    };
    set_times(src)?;
    Ok(xattrs)
}

/// Distinct times for each entry; a directory's after what it holds.
fn set_times(src: &Path) -> Res {
    let all = [
        "d1/d2/deep.txt",
        "sparse",
        "ro",
        "suid",
        "link",
        "fifo",
        "hl1",
    ];
    for (i, p) in (0..).zip(all.iter().chain(&["sgid", "d1/d2", "d1", ""])) {
        let (a, m) = (
            spec(1_600_000_000 * NS + 7 + i),
            spec(1_500_000_000 * NS + i),
        );
        utimensat(
            AT_FDCWD,
            &src.join(p),
            &a,
            &m,
            UtimensatFlags::NoFollowSymlink,
        )?;
    }
    Ok(())
}

#[test]
fn round_trip() -> Res {
    let base = temp("trip")?;
    let (src, img, dst) = (base.join("src"), base.join("img"), base.join("dst"));
    for d in [&src, &img, &dst] {
        fs::create_dir(d)?;
    }
    let xattrs = build(&src)?;
    let (mut want, mut got) = (BTreeMap::new(), BTreeMap::new());
    snapshot(&src, "", &mut want)?;
    // Listing directories and reading links set their atimes: again.
    set_times(&src)?;
    let root = open_dir(&src)?;
    let (info, stored) = dump(&root, &img, 7, 1 << 30)?;
    assert_eq!(info.name, tmpfs_file(7));
    assert!(stored < 1 << 20, "holes are stored: {stored} bytes");
    restore(&open_dir(&dst)?, &img, 7)?;
    snapshot(&dst, "", &mut got)?;
    assert!(want.remove("sock").is_some());
    assert_eq!(want, got);
    for (p, m) in &want {
        if m.mode & S_IFMT == S_IFREG {
            assert_eq!(fs::read(src.join(p))?, fs::read(dst.join(p))?, "{p}");
        }
    }
    let ino = |p: &str| fs::symlink_metadata(dst.join(p)).map(|m| m.ino());
    assert_eq!(ino("hl1")?, ino("d1/hl2")?);
    let sparse = File::open(dst.join("sparse"))?;
    assert!(
        lseek(sparse.as_fd(), 0, Whence::SeekHole)? < 3 << 20,
        "the hole is filled"
    );
    if xattrs {
        let got = read_xattrs(At::Fd(sparse.as_fd()))?;
        assert!(
            got.iter()
                .any(|x| x.name == "user.cryo" && x.value == b"value"),
            "{got:?}"
        );
    }
    let over = dump(&root, &img, 8, 10);
    assert!(over.is_err_and(|e| e.starts_with("tmpfs of mount 8: ") && e.contains("limit")));
    assert!(!img.join(tmpfs_file(8)).exists());
    fs::remove_dir_all(&base)?;
    Ok(())
}

#[test]
fn hostile_images_are_refused() -> Res {
    let base = temp("hostile")?;
    let img = base.join("img");
    fs::create_dir(&img)?;
    let node = |path: &str, mode: u32, target: &str| {
        let (path, target) = (path.to_string(), target.to_string());
        let node = TmpfsNode {
            path,
            mode,
            target,
            size: 1,
            ..Default::default()
        };
        TmpfsRecord {
            node: Some(node),
            ..Default::default()
        }
    };
    let data = |offset| TmpfsRecord {
        data: b"x".to_vec(),
        offset,
        ..Default::default()
    };
    let file = S_IFREG | 0o644;
    let cases = [
        vec![node("../evil", file, "")],
        vec![data(0)],
        vec![node("up", S_IFLNK | 0o777, ".."), node("up/evil", file, "")],
        vec![node("/abs", file, ""), data(0)],
        vec![node("a//b", S_IFDIR | 0o755, "")],
        vec![node("f", file, ""), data(u64::MAX)],
        vec![node("odd", 0o644, "")],
    ];
    for (i, records) in (0u32..).zip(&cases) {
        let mut w = ImageWriter::create(&img, &tmpfs_file(i), Kind::Tmpfs)?;
        for r in records {
            w.write(r)?;
        }
        w.finish()?;
        let root = base.join(format!("root{i}"));
        fs::create_dir(&root)?;
        let err = restore(&open_dir(&root)?, &img, i)
            .err()
            .unwrap_or_default();
        let bad = if i == 3 { 0 } else { records.len() - 1 };
        let want = format!("tmpfs-{i}.img: record {bad}: ");
        assert!(err.starts_with(&want), "case {i}: {err:?}");
    }
    assert!(!base.join("evil").exists());
    assert_eq!(fs::read_dir(&base)?.count(), cases.len() + 1);
    fs::remove_dir_all(&base)?;
    Ok(())
}
