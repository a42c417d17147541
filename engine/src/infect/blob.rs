//! Loading the no_std blobs: copy their PT_LOAD segments into a flat
//! image, apply R_X86_64_RELATIVE relocations for the load address, and
//! find the entry symbols.

#![forbid(unsafe_code)]

use goblin::elf::{program_header::PT_LOAD, reloc::R_X86_64_RELATIVE, Elf};

/// The parasite blob ELF, built from parasite/blob by engine/build.rs.
pub static PARASITE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/parasite.elf"));
/// The restorer blob ELF.
pub static RESTORER_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/restorer.elf"));

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {name}: not a valid ELF file: {source}")]
    Elf {
        name: &'static str,
        #[source]
        source: goblin::error::Error,
    },
    #[error("blob {name}: relocation type {kind} at {offset:#x} is not supported (only R_X86_64_RELATIVE)")]
    Relocation {
        name: &'static str,
        kind: u32,
        offset: u64,
    },
    #[error("blob {name}: symbol {symbol} not found")]
    Symbol {
        name: &'static str,
        symbol: &'static str,
    },
}

/// A blob laid out for one load address.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The bytes to place at the load address (page-multiple length).
    pub image: Vec<u8>,
    /// Offsets of the executable pages [start, end) inside `image`.
    pub text: (usize, usize),
    /// Offset of the entry point (`_cryo_start`).
    pub entry: usize,
    /// Offset of the trap after the blob's main returns (`_cryo_done`).
    pub done: usize,
}

const PAGE: usize = 4096;

fn page_up(v: usize) -> usize {
    (v + PAGE - 1) & !(PAGE - 1)
}

impl Blob {
    /// Lay the blob out for `base`.
    pub fn load(name: &'static str, elf_bytes: &[u8], base: u64) -> Result<Blob, BlobError> {
        let elf = Elf::parse(elf_bytes).map_err(|source| BlobError::Elf { name, source })?;
        let mut size = 0usize;
        let mut text = (usize::MAX, 0usize);
        for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
            size = size.max((ph.p_vaddr + ph.p_memsz) as usize);
            if ph.is_executable() {
                text.0 = text.0.min(ph.p_vaddr as usize & !(PAGE - 1));
                text.1 = text.1.max(page_up((ph.p_vaddr + ph.p_memsz) as usize));
            }
        }
        let mut image = vec![0u8; page_up(size)];
        for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
            let (off, len, va) = (
                ph.p_offset as usize,
                ph.p_filesz as usize,
                ph.p_vaddr as usize,
            );
            let src = elf_bytes.get(off..off + len).ok_or(BlobError::Symbol {
                name,
                symbol: "PT_LOAD",
            })?;
            image[va..va + len].copy_from_slice(src);
        }
        for rel in elf.dynrelas.iter().chain(elf.dynrels.iter()) {
            if rel.r_type != R_X86_64_RELATIVE {
                return Err(BlobError::Relocation {
                    name,
                    kind: rel.r_type,
                    offset: rel.r_offset,
                });
            }
            let at = rel.r_offset as usize;
            let value = base.wrapping_add(rel.r_addend.unwrap_or(0) as u64);
            let slot = image.get_mut(at..at + 8).ok_or(BlobError::Relocation {
                name,
                kind: rel.r_type,
                offset: rel.r_offset,
            })?;
            slot.copy_from_slice(&value.to_le_bytes());
        }
        let find = |symbol: &'static str| -> Result<usize, BlobError> {
            elf.syms
                .iter()
                .find(|s| elf.strtab.get_at(s.st_name) == Some(symbol))
                .map(|s| s.st_value as usize)
                .ok_or(BlobError::Symbol { name, symbol })
        };
        if text.0 == usize::MAX {
            text = (0, 0);
        }
        Ok(Blob {
            image,
            text,
            entry: find("_cryo_start")?,
            done: find("_cryo_done")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_load_and_relocate() {
        for (name, elf) in [("parasite", PARASITE_ELF), ("restorer", RESTORER_ELF)] {
            let b = Blob::load(name, elf, 0x7000_0000_0000).unwrap();
            assert!(
                b.entry >= b.text.0 && b.entry < b.text.1,
                "{name}: entry in text"
            );
            assert!(b.done > b.entry && b.done < b.text.1);
            assert_eq!(b.image.len() % PAGE, 0);
        }
    }
}
