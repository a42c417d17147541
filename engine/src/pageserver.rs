//! The page server (`cryo page-server`, and `dump`/`pre-dump
//! --page-server`), both sides: an image made on the source goes over TCP
//! into a directory of the destination, where a later image of the chain
//! finds its parent and a restore finds it whole. Pages files hold zstd
//! chunks: what goes on the wire is compressed as the image is.
//!
//! Protocol (cryo's own; every integer little-endian). A frame is a type
//! (u32), zero (u32) and a payload length (u64), then the payload:
//! - 1 HELLO: `CRYO-PS1`, then the image's name (its directory's, plain);
//! - 2 FILE: a name length (u16), the name (plain), its size (u64) and
//!   xxh3-64 (u64); the file's bytes follow the frame;
//! - 3 LINK: the parent link's target, `../NAME` or `NAME`;
//! - 4 END: one byte, 1 when the image is the last of its chain (a dump,
//!   not a pre-dump);
//! - the server answers END with 5 OK, or 6 ERROR and a message.
//!
//! The server writes an image into `DIR/.NAME.partial` and renames it to
//! `DIR/NAME` only once it is all there and every file's checksum holds:
//! a broken connection or wrong data leaves nothing. It never writes
//! outside DIR: names are plain, links name a sibling.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

const MAGIC: &[u8; 8] = b"CRYO-PS1";
const HELLO: u32 = 1;
const FILE: u32 = 2;
const LINK: u32 = 3;
const END: u32 = 4;
const OK: u32 = 5;
const ERROR: u32 = 6;
/// The largest frame payload (file bytes are not in frames).
const MAX_FRAME: u64 = 64 << 10;
/// The largest file taken, and the most files in one image.
const MAX_FILE: u64 = 1 << 40;
const MAX_FILES: usize = 1 << 20;

fn frame(w: &mut impl Write, ty: u32, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&ty.to_le_bytes());
    head[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

fn read_frame(r: &mut impl Read) -> Result<(u32, Vec<u8>), String> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head)
        .map_err(|e| format!("the connection ended before a frame ({e})"))?;
    let ty = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = u64::from_le_bytes(head[8..].try_into().unwrap_or([0; 8]));
    if head[4..8] != [0; 4] || len > MAX_FRAME {
        return Err(format!("a malformed frame (type {ty}, {len} bytes)"));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(|e| format!("the connection ended inside a frame ({e})"))?;
    Ok((ty, payload))
}

/// A name the server writes: one plain path component.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
}

/// Server side: take images on `listener` into `dir`, one connection at a
/// time, until one ends a chain (a dump) — or for ever with `keep`. A
/// connection that fails is reported and dropped; the server goes on.
/// With `restore`, an image that ends a chain is restored at once (`cryo
/// restore -d`), and the answer says how that went.
pub fn serve(listener: TcpListener, dir: &Path, keep: bool, restore: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    loop {
        let (c, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        match receive(c, dir, restore) {
            Ok((name, last)) => {
                tracing::info!(%peer, image = name, "image received");
                if last && !keep {
                    return Ok(());
                }
            }
            Err(e) => tracing::error!(%peer, "refused: {e}"),
        }
    }
}

/// One connection: the image it sends, into `dir`. Returns its name and
/// whether it ends its chain.
fn receive(mut c: TcpStream, dir: &Path, restore: bool) -> Result<(String, bool), String> {
    let (ty, hello) = read_frame(&mut c)?;
    if ty != HELLO || hello.len() < 8 || &hello[..8] != MAGIC {
        let e = "not a cryo page server client (no HELLO)".to_string();
        let _ = frame(&mut c, ERROR, e.as_bytes());
        return Err(e);
    }
    let name = String::from_utf8(hello[8..].to_vec()).unwrap_or_default();
    if !plain(&name) {
        let e = format!("an image name {name:?} that is not a plain name");
        let _ = frame(&mut c, ERROR, e.as_bytes());
        return Err(e);
    }
    let partial = dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let got = (|| -> Result<bool, String> {
        std::fs::create_dir(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        receive_files(&mut c, &partial)
    })();
    match got {
        Ok(last) => {
            let fin = dir.join(&name);
            let _ = std::fs::remove_dir_all(&fin);
            std::fs::rename(&partial, &fin).map_err(|e| format!("{}: {e}", fin.display()))?;
            let answer = match last && restore {
                true => restore_here(&fin),
                false => Ok(String::new()),
            };
            match answer {
                Ok(said) => frame(&mut c, OK, said.as_bytes()),
                Err(e) => frame(&mut c, ERROR, e.as_bytes()),
            }
            .map_err(|e| format!("answering: {e}"))?;
            Ok((name, last))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            let _ = frame(&mut c, ERROR, e.as_bytes());
            Err(format!("image {name}: {e}"))
        }
    }
}

/// Restore the image in `dir` (`cryo restore -d`): what it said, or why
/// it failed.
fn restore_here(dir: &Path) -> Result<String, String> {
    let t0 = std::time::Instant::now();
    let exe = std::env::current_exe().map_err(|e| format!("cryo's own path: {e}"))?;
    let out = std::process::Command::new(exe)
        .arg("restore")
        .arg("-D")
        .arg(dir)
        .arg("-d")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running cryo restore: {e}"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    match out.status.success() {
        true => Ok(format!("restored in {ms:.1} ms")),
        false => Err(format!(
            "the restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The FILE and LINK frames up to END, into `into`.
fn receive_files(c: &mut impl Read, into: &Path) -> Result<bool, String> {
    let mut files = 0usize;
    loop {
        let (ty, p) = read_frame(c)?;
        match ty {
            FILE => {
                files += 1;
                if files > MAX_FILES {
                    return Err(format!("more than {MAX_FILES} files"));
                }
                receive_file(c, into, &p)?;
            }
            LINK => {
                let target = String::from_utf8(p).unwrap_or_default();
                let sibling = target.strip_prefix("../").unwrap_or(&target);
                if !plain(sibling) {
                    return Err(format!(
                        "a parent link to {target:?}, not to a sibling image"
                    ));
                }
                std::os::unix::fs::symlink(&target, into.join(cryo_image::PARENT_LINK))
                    .map_err(|e| format!("the parent link: {e}"))?;
            }
            END => return Ok(p.first() == Some(&1)),
            other => return Err(format!("an unexpected frame of type {other}")),
        }
    }
}

fn receive_file(c: &mut impl Read, into: &Path, p: &[u8]) -> Result<(), String> {
    let bad = || "a malformed FILE frame".to_string();
    let nlen =
        u16::from_le_bytes(p.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let name = p.get(2..2 + nlen).ok_or_else(bad)?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| bad())?;
    let tail = p.get(2 + nlen..2 + nlen + 16).ok_or_else(bad)?;
    let size = u64::from_le_bytes(tail[..8].try_into().map_err(|_| bad())?);
    let hash = u64::from_le_bytes(tail[8..].try_into().map_err(|_| bad())?);
    if !plain(&name) {
        return Err(format!("a file name {name:?} that is not a plain name"));
    }
    if size > MAX_FILE {
        return Err(format!(
            "{name}: {size} bytes, more than the {MAX_FILE} taken"
        ));
    }
    let path = into.join(&name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Xxh3::new();
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        c.read_exact(&mut buf[..n])
            .map_err(|e| format!("{name}: the connection ended with {left} bytes to come ({e})"))?;
        h.update(&buf[..n]);
        f.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        left -= n as u64;
    }
    if h.digest() != hash {
        return Err(format!("{name}: its bytes do not match its checksum"));
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Client side: send the image in `dir` to the page server at `addr`
/// (`last`: it ends its chain). Returns the bytes sent and what the
/// server said (how its restore went, if it restores).
pub fn send(dir: &Path, addr: &str, last: bool) -> Result<(u64, String), String> {
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| plain(n))
        .ok_or_else(|| format!("{}: an image directory without a plain name", dir.display()))?;
    let mut c = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = c.set_nodelay(true);
    let sent =
        write_image(dir, &name, last, &mut c).map_err(|e| format!("sending to {addr}: {e}"))?;
    match read_frame(&mut c)? {
        (OK, said) => Ok((sent, String::from_utf8_lossy(&said).into_owned())),
        (ERROR, why) => Err(format!(
            "the page server at {addr} refused the image: {}",
            String::from_utf8_lossy(&why)
        )),
        (other, _) => Err(format!(
            "the page server at {addr} answered with a frame of type {other}"
        )),
    }
}

/// The image in `dir`, named `name`, as frames on `c` (HELLO to END):
/// returns the file bytes written.
pub fn write_image(dir: &Path, name: &str, last: bool, c: &mut impl Write) -> Result<u64, String> {
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(name.as_bytes());
    let io = |e: std::io::Error| e.to_string();
    frame(c, HELLO, &hello).map_err(io)?;
    let mut sent = 0u64;
    // The inventory has the checksum of every file it lists (the pages
    // files too): those are not read twice.
    let listed: std::collections::HashMap<String, (u64, u64)> = cryo_image::read_inventory(dir)
        .map(|inv| {
            inv.files
                .into_iter()
                .map(|f| (f.name, (f.size, f.xxh3)))
                .collect()
        })
        .unwrap_or_default();
    for f in image_files(dir)? {
        let path = dir.join(&f);
        let size = std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        let hash = match listed.get(&f) {
            Some(&(n, h)) if n == size => h,
            _ => cryo_image::hash_file(&path).map_err(|e| e.to_string())?.1,
        };
        let mut p = (f.len() as u16).to_le_bytes().to_vec();
        p.extend_from_slice(f.as_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&hash.to_le_bytes());
        frame(c, FILE, &p).map_err(io)?;
        let mut src = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // std's copy to a socket from a file goes by sendfile.
        let n = std::io::copy(&mut (&mut src).take(size), c).map_err(io)?;
        if n != size {
            return Err(format!("{}: changed while it was sent", path.display()));
        }
        sent += size;
    }
    if let Ok(target) = std::fs::read_link(dir.join(cryo_image::PARENT_LINK)) {
        frame(c, LINK, target.to_string_lossy().as_bytes()).map_err(io)?;
    }
    frame(c, END, &[u8::from(last)]).map_err(io)?;
    c.flush().map_err(io)?;
    Ok(sent)
}

/// An image as [`write_image`] wrote it, read from `r` into a new
/// directory `into` (which must not exist), checked as the page server
/// checks what it takes; nothing is left of it on an error.
pub fn read_image(r: &mut impl Read, into: &Path) -> Result<(), String> {
    let (ty, hello) = read_frame(r)?;
    if ty != HELLO || hello.len() < 8 || &hello[..8] != MAGIC {
        return Err("not a cryo image stream (no HELLO)".into());
    }
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(false), 0o700)
        .create(into)
        .map_err(|e| format!("{}: {e}", into.display()))?;
    receive_files(r, into).map(drop).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(into);
    })
}

/// The image's files to send: its regular files but a holder's.
fn image_files(dir: &Path) -> Result<Vec<String>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let regular = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        let holder = [crate::mem::track::SOCKET, crate::mem::track::PID_FILE];
        if regular && plain(&name) && !holder.contains(&name.as_str()) {
            out.push(name);
        }
    }
    // The inventory last: an image is whole once it is there.
    out.sort_by_key(|n| (n == cryo_image::INVENTORY_FILE, n.clone()));
    Ok(out)
}

/// After a successful send: the pages files of the image in `dir` go
/// (they are on the destination; the rest stays, for a later image of
/// the chain to find what its parent holds).
pub fn drop_pages(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if cryo_image::Kind::from_file_name(&name) == Some(cryo_image::Kind::Pages) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The address a `--page-server` option gives.
pub fn address(addr: &str, port: u16) -> String {
    match addr.contains(':') && !addr.starts_with('[') {
        true => format!("[{addr}]:{port}"),
        false => format!("{addr}:{port}"),
    }
}
