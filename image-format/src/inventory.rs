//! `inventory.img`: the image's table of contents, written last.
//!
//! Layout: header, then a `proto::Inventory` record, then a
//! `proto::InventorySeal` record holding the xxh3-64 of the first record's
//! encoded bytes.

use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::ImageError;
use crate::framing::{
    decode, open_file, read_full, ImageReader, ImageWriter, Kind, INVENTORY_FILE,
};
use crate::proto;

pub const FORMAT_MAJOR: u32 = 1;
pub const FORMAT_MINOR: u32 = 0;

/// Writes `inventory.img` atomically (temporary file, then rename).
pub fn write_inventory(dir: &Path, inventory: &proto::Inventory) -> Result<(), ImageError> {
    let tmp_name = format!(".{INVENTORY_FILE}.tmp");
    let body = prost::Message::encode_to_vec(inventory);
    let mut w = ImageWriter::create(dir, &tmp_name, Kind::Inventory)?;
    w.write_raw(&body)?;
    w.write(&proto::InventorySeal {
        xxh3: xxh3_64(&body),
    })?;
    w.finish()?;
    let tmp = dir.join(&tmp_name);
    let dst = dir.join(INVENTORY_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| ImageError::io(dst, "rename", e))
}

/// Reads and checks `inventory.img`: seal checksum and format version.
pub fn read_inventory(dir: &Path) -> Result<proto::Inventory, ImageError> {
    let mut r = match ImageReader::open(dir, INVENTORY_FILE, Kind::Inventory) {
        Err(ImageError::Missing { .. }) => {
            return Err(ImageError::NoImage {
                dir: dir.to_path_buf(),
            })
        }
        Err(e @ ImageError::NotCryoImage { .. }) => {
            return Err(match crate::criu::criu_image(dir) {
                Some(c) => ImageError::CriuImage {
                    dir: dir.to_path_buf(),
                    what: c.describe(),
                },
                None => e,
            })
        }
        other => other?,
    };
    let path = r.path().to_path_buf();
    let body = r
        .next_raw()?
        .ok_or_else(|| ImageError::NoRecord { path: path.clone() })?;
    let seal_index = r.record_index();
    let seal_body = r
        .next_raw()?
        .ok_or_else(|| ImageError::MissingSeal { path: path.clone() })?;
    let seal: proto::InventorySeal = decode(&path, seal_index, &seal_body)?;
    let found = xxh3_64(&body);
    if found != seal.xxh3 {
        return Err(ImageError::ChecksumMismatch {
            path,
            expected: seal.xxh3,
            found,
        });
    }
    let inventory: proto::Inventory = decode(&path, 0, &body)?;
    if inventory.format_major > FORMAT_MAJOR {
        return Err(ImageError::NewerFormat {
            file: path,
            found: inventory.format_major,
            supported: FORMAT_MAJOR,
        });
    }
    r.expect_end()?;
    Ok(inventory)
}

fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Checks that every file listed in `inventory` exists with the recorded
/// size; with `full`, also recomputes and compares each file's xxh3-64.
pub fn verify_files(
    dir: &Path,
    inventory: &proto::Inventory,
    full: bool,
) -> Result<(), ImageError> {
    for f in &inventory.files {
        if !plain_name(&f.name) {
            return Err(ImageError::BadFileName {
                file: f.name.clone(),
            });
        }
        let path = dir.join(&f.name);
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ImageError::Missing { path: path.clone() }
            } else {
                ImageError::io(path.clone(), "stat", e)
            }
        })?;
        if meta.len() != f.size {
            return Err(ImageError::FileSize {
                path,
                expected: f.size,
                found: meta.len(),
            });
        }
        if full {
            let (size, hash) = hash_file(&path)?;
            if size != f.size {
                return Err(ImageError::FileSize {
                    path,
                    expected: f.size,
                    found: size,
                });
            }
            if hash != f.xxh3 {
                return Err(ImageError::FileChecksum {
                    path,
                    expected: f.xxh3,
                    found: hash,
                });
            }
        }
    }
    Ok(())
}

/// Size and xxh3-64 of a file's whole content, read streaming.
pub fn hash_file(path: &Path) -> Result<(u64, u64), ImageError> {
    let path: PathBuf = path.to_path_buf();
    let mut file = open_file(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = Xxh3::new();
    let mut size = 0u64;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(|e| ImageError::io(&path, "read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((size, hasher.digest()))
}
