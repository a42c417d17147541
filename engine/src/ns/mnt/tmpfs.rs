//! The files of one tmpfs, saved and made again.
//!
//! Dump walks the tree from the root's directory fd with fd-relative calls
//! only, parents before children, and writes a node record per file (type,
//! permissions, owner, times, xattrs, symlink target or device number) to
//! `tmpfs-<mount>.img`. A regular file's node is followed by records of its
//! data regions, at most 1 MiB each; holes are not stored. A directory of
//! another mount is stored as an empty directory, sockets are left out, and
//! a further name of a file already stored becomes a hard link to the first.
//!
//! Restore checks every path of the image, makes each file beneath the new
//! tmpfs's root without following any symlink (openat2 confined to the
//! root), writes the contents, then sets owner, xattrs, mode and times.
//! Directories get theirs at the very end, deepest first, so that filling
//! them does not change them again.
//!
//! Extended attributes (user, trusted, security) go with their files,
//! through `crate::sys::xattr`.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use cryo_image::proto::{TmpfsNode, TmpfsRecord, Xattr};
use cryo_image::{tmpfs_file, ImageError, ImageFileInfo, ImageReader, ImageWriter, Kind};
use libc::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fchmodat, fstat, fstatat, futimens, mkdirat, mknodat, utimensat};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{fchown, fchownat, ftruncate, linkat, lseek, symlinkat, Gid, Uid, Whence};
use nix::NixPath;

/// Largest piece of file contents in one record.
const CHUNK: usize = 1 << 20;
const NS: i64 = 1_000_000_000;

/// What failed; the mount or record and the path go in front of it.
enum Why {
    /// A call on the path failed: "<what> <path>: <error>".
    Sys(&'static str, Errno),
    /// A whole message.
    Other(String),
}

impl Why {
    fn show(self, prefix: &str, path: &str) -> String {
        match self {
            Why::Sys(what, e) => format!("{prefix}: {what} {}: {}", shown(path), e.desc()),
            Why::Other(msg) => format!("{prefix}: {msg}"),
        }
    }
}

fn sys(what: &'static str) -> impl Fn(Errno) -> Why {
    move |e| Why::Sys(what, e)
}

fn image(e: ImageError) -> Why {
    Why::Other(e.to_string())
}

fn shown(path: &str) -> String {
    match path {
        "" => "the root".to_string(),
        p => p.escape_debug().to_string(),
    }
}

fn or_dot(path: &str) -> &str {
    if path.is_empty() {
        "."
    } else {
        path
    }
}

fn join(dir: &str, name: &str) -> String {
    match dir {
        "" => name.to_string(),
        d => format!("{d}/{name}"),
    }
}

/// Save every file of the tmpfs whose root directory is open at `root`
/// (a directory fd, opened O_RDONLY|O_DIRECTORY by the caller, possibly from another mount namespace) into tmpfs-<mount>.img in `dir`.
/// `limit`: the most file-content bytes to store; more is an error naming the mount.
/// Returns the file's info and the number of content bytes stored.
pub fn dump(
    root: &OwnedFd,
    dir: &Path,
    mount: u32,
    limit: u64,
) -> Result<(ImageFileInfo, u64), String> {
    let name = tmpfs_file(mount);
    let w = ImageWriter::create(dir, &name, Kind::Tmpfs).map_err(|e| e.to_string())?;
    let mut d = Dumper {
        w,
        limit,
        stored: 0,
        dev: 0,
        links: HashMap::new(),
        buf: Vec::new(),
    };
    let walked = d.walk(root.as_fd());
    let walked = walked.map_err(|(path, why)| why.show(&format!("tmpfs of mount {mount}"), &path));
    match walked.and_then(|()| d.w.finish().map_err(|e| e.to_string())) {
        Ok(info) => Ok((info, d.stored)),
        Err(e) => {
            // A partial image must not pass for a whole one.
            let _ = std::fs::remove_file(dir.join(&name));
            Err(e)
        }
    }
}

struct Dumper {
    w: ImageWriter,
    limit: u64,
    stored: u64,
    /// The tmpfs's device: entries on another one are other mounts.
    dev: u64,
    /// Inode → first path, of the files with more than one name.
    links: HashMap<u64, String>,
    buf: Vec<u8>,
}

/// A directory being walked: its fd, path and the names still to visit.
struct Frame {
    fd: OwnedFd,
    path: String,
    names: Vec<String>,
}

impl Dumper {
    fn walk(&mut self, root: BorrowedFd) -> Result<(), (String, Why)> {
        let top = self.root(root).map_err(|w| (String::new(), w))?;
        let mut stack = vec![top];
        while let Some(frame) = stack.last_mut() {
            let Some(name) = frame.names.pop() else {
                stack.pop();
                continue;
            };
            let path = join(&frame.path, &name);
            let sub = self.entry(frame.fd.as_fd(), &name, &path);
            if let Some(sub) = sub.map_err(|w| (path, w))? {
                stack.push(sub);
            }
        }
        Ok(())
    }

    fn root(&mut self, root: BorrowedFd) -> Result<Frame, Why> {
        // Our own open file, so that listing moves no offset of the caller's.
        let fd = open_noatime(root, c".", OFlag::O_DIRECTORY).map_err(sys("opening"))?;
        self.dev = fstat(&fd).map_err(sys("reading"))?.st_dev;
        self.dir(fd, "")
    }

    /// Stores one entry of `dir`; returns it if it is a directory to walk.
    fn entry(&mut self, dir: BorrowedFd, name: &str, path: &str) -> Result<Option<Frame>, Why> {
        let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(sys("reading"))?;
        let kind = st.st_mode & S_IFMT;
        if st.st_dev != self.dev {
            // Another mount covers it: keep only a place to mount it on.
            let mut n = node(path, &st, Vec::new());
            let mode = if kind == S_IFDIR {
                S_IFDIR | 0o755
            } else {
                S_IFREG | 0o644
            };
            (n.mode, n.uid, n.gid) = (mode, 0, 0);
            return self.put(n).map(|()| None);
        }
        if kind == S_IFSOCK {
            return Ok(None);
        }
        if kind != S_IFDIR && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&st.st_ino) {
                let mut n = TmpfsNode::default();
                (n.path, n.link_to) = (path.to_string(), first.clone());
                return self.put(n).map(|()| None);
            }
            self.links.insert(st.st_ino, path.to_string());
        }
        match kind {
            S_IFDIR => {
                let fd = open_noatime(dir, name, OFlag::O_DIRECTORY).map_err(sys("opening"))?;
                self.dir(fd, path).map(Some)
            }
            S_IFREG => self.file(dir, name, path).map(|()| None),
            _ => self.special(dir, name, path, &st).map(|()| None),
        }
    }

    fn dir(&mut self, fd: OwnedFd, path: &str) -> Result<Frame, Why> {
        let st = fstat(&fd).map_err(sys("reading"))?;
        let xattrs = read_xattrs(At::Fd(fd.as_fd())).map_err(sys("reading xattrs of"))?;
        self.put(node(path, &st, xattrs))?;
        let mut names = Vec::new();
        for n in list_dir(fd.as_fd()).map_err(sys("listing"))? {
            names.push(String::from_utf8(n).map_err(|e| {
                let name = join(path, &String::from_utf8_lossy(e.as_bytes()));
                Why::Other(format!(
                    "{name}: the name is not UTF-8, which the image cannot hold"
                ))
            })?);
        }
        // Popped from the end: visited in name order.
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Frame {
            fd,
            path: path.to_string(),
            names,
        })
    }

    fn file(&mut self, dir: BorrowedFd, name: &str, path: &str) -> Result<(), Why> {
        let fd = open_noatime(dir, name, OFlag::empty()).map_err(sys("opening"))?;
        let st = fstat(&fd).map_err(sys("reading"))?;
        let xattrs = read_xattrs(At::Fd(fd.as_fd())).map_err(sys("reading xattrs of"))?;
        let mut n = node(path, &st, xattrs);
        n.size = u64::try_from(st.st_size).unwrap_or(0);
        let size = n.size;
        self.put(n)?;
        let mut at = 0;
        while let Some((start, end)) =
            data_region(fd.as_fd(), at, size).map_err(sys("seeking in"))?
        {
            self.copy(fd.as_fd(), start, end, path)?;
            at = end;
        }
        Ok(())
    }

    /// Stores bytes `start..end` of the file open at `fd`, chunk by chunk.
    fn copy(&mut self, fd: BorrowedFd, start: u64, end: u64, path: &str) -> Result<(), Why> {
        let mut at = start;
        while at < end {
            let mut data = std::mem::take(&mut self.buf);
            data.resize(usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK), 0);
            let off = i64::try_from(at).map_err(|_| Why::Sys("reading", Errno::EOVERFLOW))?;
            let n = pread(fd, &mut data, off).map_err(sys("reading"))?;
            if n == 0 {
                break; // It shrank; restore's truncate to the size fills with zeros.
            }
            data.truncate(n);
            self.stored += n as u64;
            if self.stored > self.limit {
                let (limit, path) = (self.limit, shown(path));
                return Err(Why::Other(format!(
                    "{path}: the files hold more than the limit of {limit} bytes"
                )));
            }
            let mut rec = TmpfsRecord {
                node: None,
                data,
                offset: at,
            };
            self.w.write(&rec).map_err(image)?;
            self.buf = std::mem::take(&mut rec.data);
            at += n as u64;
        }
        Ok(())
    }

    /// A symlink, fifo or device.
    fn special(
        &mut self,
        dir: BorrowedFd,
        name: &str,
        path: &str,
        st: &FileStat,
    ) -> Result<(), Why> {
        let mut n = node(path, st, Vec::new());
        match st.st_mode & S_IFMT {
            S_IFLNK => {
                let t = readlinkat(dir, name).map_err(sys("reading the link"))?;
                n.target = t.into_string().map_err(|_| {
                    Why::Other(format!("{}: the link target is not UTF-8", shown(path)))
                })?;
            }
            S_IFCHR | S_IFBLK => n.rdev = st.st_rdev,
            S_IFIFO => {}
            _ => return Err(unknown(path, st.st_mode)),
        }
        let proc = proc_path(dir, name).map_err(sys("naming"))?;
        n.xattrs = read_xattrs(At::Link(&proc)).map_err(sys("reading xattrs of"))?;
        self.put(n)
    }

    fn put(&mut self, node: TmpfsNode) -> Result<(), Why> {
        let rec = TmpfsRecord {
            node: Some(node),
            ..Default::default()
        };
        self.w.write(&rec).map_err(image)
    }
}

fn node(path: &str, st: &FileStat, xattrs: Vec<Xattr>) -> TmpfsNode {
    let ns = |s: i64, n: i64| s.saturating_mul(NS).saturating_add(n);
    TmpfsNode {
        path: path.to_string(),
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        atime_ns: ns(st.st_atime, st.st_atime_nsec),
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
        xattrs,
        ..Default::default()
    }
}

/// Opens `name` in `dir` read-only without following a symlink, and
/// without touching its atime where we may.
fn open_noatime<P: ?Sized + NixPath>(
    dir: BorrowedFd,
    name: &P,
    extra: OFlag,
) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | extra;
    match openat(dir, name, flags | OFlag::O_NOATIME, Mode::empty()) {
        // O_NOATIME needs the file's owner or CAP_FOWNER.
        Err(Errno::EPERM) => openat(dir, name, flags, Mode::empty()),
        r => r,
    }
}

/// The next data region at or after `from`, cut at `size`.
fn data_region(fd: BorrowedFd, from: u64, size: u64) -> nix::Result<Option<(u64, u64)>> {
    let off = |v: u64| i64::try_from(v).map_err(|_| Errno::EOVERFLOW);
    let back = |v: i64| u64::try_from(v).map_err(|_| Errno::EOVERFLOW);
    if from >= size {
        return Ok(None);
    }
    let start = match lseek(fd, off(from)?, Whence::SeekData) {
        Ok(s) => back(s)?,
        Err(Errno::ENXIO) => return Ok(None), // no data after `from`
        Err(Errno::EINVAL) => return Ok(Some((from, size))), // no SEEK_DATA: all data
        Err(e) => return Err(e),
    };
    let end = match lseek(fd, off(start)?, Whence::SeekHole) {
        Ok(h) => back(h)?.min(size),
        Err(Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok((start < end).then_some((start, end)))
}

/// The names in the directory open at `dir`. Through /proc/self/fd, as
/// listing the fd itself needs nix's `dir` feature (off) or a raw getdents
/// (`unsafe`, forbidden here): so this listing may update the directory's
/// atime, after its node has kept the old one.
fn list_dir(dir: BorrowedFd) -> nix::Result<Vec<Vec<u8>>> {
    let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(errno)?;
    entries
        .map(|e| e.map(|e| e.file_name().into_vec()).map_err(errno))
        .collect()
}

/// `/proc/self/fd/<dir>/<name>`: `name` in `dir` for the l*xattr calls,
/// which do not follow the last component.
fn proc_path(dir: BorrowedFd, name: &str) -> nix::Result<CString> {
    CString::new(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd())).map_err(|_| Errno::EINVAL)
}

/// What xattr calls act on: an open fd, or a path not followed at its end.
#[derive(Clone, Copy)]
enum At<'a> {
    Fd(BorrowedFd<'a>),
    Link(&'a CStr),
}

fn list_xattrs(at: At, names: &mut [u8]) -> nix::Result<usize> {
    match at {
        At::Fd(fd) => crate::sys::xattr::flistxattr(fd, names),
        At::Link(p) => crate::sys::xattr::llistxattr(p, names),
    }
}

fn get_xattr(at: At, name: &CStr, value: &mut [u8]) -> nix::Result<usize> {
    match at {
        At::Fd(fd) => crate::sys::xattr::fgetxattr(fd, name, value),
        At::Link(p) => crate::sys::xattr::lgetxattr(p, name, value),
    }
}

fn set_xattr(at: At, name: &CStr, value: &[u8]) -> nix::Result<()> {
    match at {
        At::Fd(fd) => crate::sys::xattr::fsetxattr(fd, name, value),
        At::Link(p) => crate::sys::xattr::lsetxattr(p, name, value),
    }
}

/// Runs a size-query-then-fill xattr call until the buffer is big enough.
fn sized(mut call: impl FnMut(&mut [u8]) -> nix::Result<usize>) -> nix::Result<Vec<u8>> {
    loop {
        let mut buf = vec![0u8; call(&mut [])?];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::ERANGE) => {} // it grew meanwhile
            Err(e) => return Err(e),
        }
    }
}

fn read_xattrs(at: At) -> nix::Result<Vec<Xattr>> {
    let names = match sized(|b| list_xattrs(at, b)) {
        Err(Errno::EOPNOTSUPP) => return Ok(Vec::new()),
        r => r?,
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c = CString::new(name).map_err(|_| Errno::EINVAL)?;
        let value = match sized(|b| get_xattr(at, &c, b)) {
            Err(Errno::ENODATA) => continue, // removed meanwhile
            r => r?,
        };
        let name = String::from_utf8(name.to_vec()).map_err(|_| Errno::EILSEQ)?;
        out.push(Xattr { name, value });
    }
    Ok(out)
}

/// Make the files of tmpfs-<mount>.img in `dir` again under the directory open at `root` (the root of a new, empty tmpfs).
pub fn restore(root: &OwnedFd, dir: &Path, mount: u32) -> Result<(), String> {
    let file = tmpfs_file(mount);
    let mut r = ImageReader::open(dir, &file, Kind::Tmpfs).map_err(|e| e.to_string())?;
    let fail = |(rec, path, why): Fail| why.show(&format!("{file}: record {rec}"), &path);
    let mut st = Restorer {
        root: root.as_fd(),
        open: None,
        dirs: Vec::new(),
    };
    loop {
        let rec = r.record_index();
        let Some(record) = r.next::<TmpfsRecord>().map_err(|e| e.to_string())? else {
            break;
        };
        st.apply(rec, record).map_err(fail)?;
    }
    st.close_file()
        .and_then(|()| st.finish_dirs())
        .map_err(fail)
}

/// What failed, at which record, on which path.
type Fail = (usize, String, Why);

struct Restorer<'a> {
    root: BorrowedFd<'a>,
    /// The regular file being filled, and the index of its node record.
    open: Option<(OwnedFd, TmpfsNode, usize)>,
    /// The directories made, for their metadata at the end.
    dirs: Vec<(usize, TmpfsNode)>,
}

impl Restorer<'_> {
    fn apply(&mut self, rec: usize, record: TmpfsRecord) -> Result<(), Fail> {
        let other = |path: &str, msg: &str| (rec, path.to_string(), Why::Other(msg.to_string()));
        let Some(node) = record.node else {
            let Some((fd, node, _)) = &self.open else {
                return Err(other("", "data with no regular file before it"));
            };
            return write_at(fd.as_fd(), node, record.offset, &record.data)
                .map_err(|w| (rec, node.path.clone(), w));
        };
        if !record.data.is_empty() {
            return Err(other(&node.path, "a record holds both a file and data"));
        }
        self.close_file()?;
        let path = node.path.clone();
        self.node(rec, node).map_err(|w| (rec, path, w))
    }

    fn node(&mut self, rec: usize, node: TmpfsNode) -> Result<(), Why> {
        if node.path.is_empty() {
            if node.mode & S_IFMT != S_IFDIR || !node.link_to.is_empty() {
                return Err(Why::Other("the root is not a directory".to_string()));
            }
            self.dirs.push((rec, node));
            return Ok(());
        }
        check_path(&node.path)?;
        if !node.link_to.is_empty() {
            check_path(&node.link_to)?;
            let (from_dir, from) = self.parent(&node.link_to)?;
            let (to_dir, to) = self.parent(&node.path)?;
            let flags = AtFlags::empty(); // a symlink itself gets the name
            return linkat(&from_dir, from.as_str(), &to_dir, to.as_str(), flags)
                .map_err(sys("linking"));
        }
        let (parent, name) = self.parent(&node.path)?;
        let (kind, name) = (node.mode & S_IFMT, name.as_str());
        let rw = Mode::S_IRUSR | Mode::S_IWUSR;
        match kind {
            S_IFDIR => {
                mkdirat(&parent, name, Mode::S_IRWXU).map_err(sys("making"))?;
                self.dirs.push((rec, node));
                return Ok(());
            }
            S_IFREG => {
                if i64::try_from(node.size).is_err() {
                    return Err(Why::Other(format!(
                        "{}: size {} is too large",
                        shown(&node.path),
                        node.size
                    )));
                }
                let flags = OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC;
                let fd = openat(&parent, name, flags, rw).map_err(sys("making"))?;
                self.open = Some((fd, node, rec));
                return Ok(());
            }
            S_IFLNK => symlinkat(node.target.as_str(), &parent, name),
            S_IFIFO | S_IFCHR | S_IFBLK => mknodat(
                &parent,
                name,
                SFlag::from_bits_truncate(kind),
                rw,
                node.rdev,
            ),
            S_IFSOCK => return Ok(()), // bound again by the socket restore
            _ => return Err(unknown(&node.path, node.mode)),
        }
        .map_err(sys("making"))?;
        finish_at(parent.as_fd(), name, &node)
    }

    /// The directory holding `path`, opened beneath the root through no
    /// symlink, and the last component of `path`.
    fn parent(&self, path: &str) -> Result<(OwnedFd, String), Why> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let fd = self
            .beneath(or_dot(dir), OFlag::O_PATH)
            .map_err(sys("opening the directory of"))?;
        Ok((fd, name.to_string()))
    }

    fn beneath(&self, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
        let resolve = ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_NO_XDEV;
        let how = OpenHow::new()
            .flags(flags | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(resolve);
        openat2(self.root, path, how)
    }

    fn close_file(&mut self) -> Result<(), Fail> {
        let Some((fd, node, rec)) = self.open.take() else {
            return Ok(());
        };
        let size = i64::try_from(node.size).unwrap_or(i64::MAX); // checked when made
        let done = ftruncate(&fd, size).map_err(sys("truncating"));
        done.and_then(|()| finish_fd(fd.as_fd(), &node))
            .map_err(|w| (rec, node.path.clone(), w))
    }

    fn finish_dirs(&mut self) -> Result<(), Fail> {
        let mut dirs = std::mem::take(&mut self.dirs);
        let depth = |p: &str| p.matches('/').count() + usize::from(!p.is_empty());
        dirs.sort_by_key(|(_, n)| std::cmp::Reverse(depth(&n.path)));
        for (rec, node) in &dirs {
            let fd = self
                .beneath(or_dot(&node.path), OFlag::O_RDONLY)
                .map_err(sys("opening"));
            fd.and_then(|fd| finish_fd(fd.as_fd(), node))
                .map_err(|w| (*rec, node.path.clone(), w))?;
        }
        Ok(())
    }
}

/// Writes `data` at `offset` of the file of `node` open at `fd`.
fn write_at(fd: BorrowedFd, node: &TmpfsNode, offset: u64, data: &[u8]) -> Result<(), Why> {
    if offset
        .checked_add(data.len() as u64)
        .is_none_or(|end| end > node.size)
    {
        let (path, len, size) = (shown(&node.path), data.len(), node.size);
        return Err(Why::Other(format!(
            "{path}: data at {offset}+{len} is past its size {size}"
        )));
    }
    let mut done = 0;
    while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
        // Below the size, which fits in an i64.
        let at = i64::try_from(offset + done as u64).unwrap_or(i64::MAX);
        match pwrite(fd, rest, at) {
            Ok(0) => return Err(Why::Sys("writing", Errno::EIO)),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Why::Sys("writing", e)),
        }
    }
    Ok(())
}

/// Owner, xattrs, mode, times of the file or directory open at `fd`, in
/// this order: chown clears setuid bits and file capabilities.
fn finish_fd(fd: BorrowedFd, node: &TmpfsNode) -> Result<(), Why> {
    let (uid, gid) = (Uid::from_raw(node.uid), Gid::from_raw(node.gid));
    fchown(fd, Some(uid), Some(gid)).map_err(sys("changing the owner of"))?;
    set_xattrs(At::Fd(fd), node)?;
    fchmod(fd, Mode::from_bits_truncate(node.mode & 0o7777))
        .map_err(sys("changing the mode of"))?;
    futimens(fd, &spec(node.atime_ns), &spec(node.mtime_ns)).map_err(sys("setting the times of"))
}

/// The same for the symlink, fifo or device `name` in `parent`.
fn finish_at(parent: BorrowedFd, name: &str, node: &TmpfsNode) -> Result<(), Why> {
    let (uid, gid) = (Uid::from_raw(node.uid), Gid::from_raw(node.gid));
    let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
    fchownat(parent, name, Some(uid), Some(gid), nofollow).map_err(sys("changing the owner of"))?;
    if !node.xattrs.is_empty() {
        // Through /proc only when needed: it may not be mounted yet.
        let link = proc_path(parent, name).map_err(sys("naming"))?;
        set_xattrs(At::Link(&link), node)?;
    }
    if node.mode & S_IFMT != S_IFLNK {
        let (mode, flags) = (
            Mode::from_bits_truncate(node.mode & 0o7777),
            FchmodatFlags::NoFollowSymlink,
        );
        fchmodat(parent, name, mode, flags).map_err(sys("changing the mode of"))?;
    }
    let (a, m) = (spec(node.atime_ns), spec(node.mtime_ns));
    utimensat(parent, name, &a, &m, UtimensatFlags::NoFollowSymlink)
        .map_err(sys("setting the times of"))
}

fn set_xattrs(at: At, node: &TmpfsNode) -> Result<(), Why> {
    for x in &node.xattrs {
        let done = CString::new(x.name.as_str()).map_err(|_| Errno::EINVAL);
        if let Err(e) = done.and_then(|name| set_xattr(at, &name, &x.value)) {
            let (name, path) = (x.name.escape_debug(), shown(&node.path));
            return Err(Why::Other(format!(
                "setting xattr {name} of {path}: {}",
                e.desc()
            )));
        }
    }
    Ok(())
}

/// Refuses a path (not the root's "") that is not plainly beneath the root.
fn check_path(path: &str) -> Result<(), Why> {
    let why = if path.starts_with('/') {
        "is absolute"
    } else if path.contains('\0') {
        "holds a NUL byte"
    } else if path.split('/').any(|c| c == "..") {
        "leaves the filesystem"
    } else if path.split('/').any(|c| c.is_empty() || c == ".") {
        "has an empty or \".\" component"
    } else {
        return Ok(());
    };
    Err(Why::Other(format!("path {} {why}", path.escape_debug())))
}

fn unknown(path: &str, mode: u32) -> Why {
    Why::Other(format!(
        "{}: unknown file type (mode {mode:#o})",
        shown(path)
    ))
}

fn spec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(NS), ns.rem_euclid(NS))
}

#[cfg(test)]
#[path = "tmpfs_tests.rs"]
mod tests;
