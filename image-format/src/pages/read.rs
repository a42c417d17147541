//! The reading side of a pages file: [`PageReader`].

use super::*;

thread_local! {
    static ZSTD_SCRATCH: RefCell<(Vec<u8>, Option<zstd::bulk::Decompressor<'static>>, Vec<u8>)> =
        const { RefCell::new((Vec::new(), None, Vec::new())) };
}

/// Reads chunks of a pages file; `read_chunk` may run on several threads.
pub struct PageReader {
    path: PathBuf,
    file: File,
    compression: Compression,
    chunks: Vec<PageChunk>,
    starts: Vec<u64>,
    total_pages: u64,
}

impl PageReader {
    /// Opens `dir/name`, checks its header and that the chunks lie inside
    /// the file without overlap (in any order).
    pub fn open(
        dir: &Path,
        name: &str,
        compression: Compression,
        chunks: Vec<PageChunk>,
    ) -> Result<PageReader, ImageError> {
        let path = dir.join(name);
        let file = open_file(&path)?;
        let file_size = file
            .metadata()
            .map_err(|e| ImageError::io(&path, "stat", e))?
            .len();
        if file_size == 0 {
            return Err(ImageError::EmptyFile { path });
        }
        let mut header = [0u8; 8];
        let n = header.len().min(file_size as usize);
        file.read_exact_at(&mut header[..n], 0)
            .map_err(|e| ImageError::io(&path, "read", e))?;
        if header[..n] != pages_header()[..n] {
            return Err(ImageError::BadPagesHeader {
                path,
                found: header[..n].to_vec(),
            });
        }
        if file_size < PAGES_HEADER_LEN {
            return Err(ImageError::TruncatedHeader {
                path,
                expected: PAGES_HEADER_LEN,
                found: file_size,
            });
        }
        let mut spans = Vec::with_capacity(chunks.len());
        let mut starts = Vec::with_capacity(chunks.len());
        let mut total_pages = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            if c.nr_pages == 0 {
                return Err(ImageError::ChunkEmpty { path, chunk: i });
            }
            let raw_len = u64::from(c.nr_pages) * PAGE_SIZE as u64;
            let bad_stride = c.stride != 0
                && (compression != Compression::Zstd
                    || c.raw
                    || !stride::valid(c.stride as usize, raw_len as usize));
            let bad_len = bad_stride
                || match compression {
                    Compression::None => u64::from(c.stored_len) != raw_len || c.raw,
                    Compression::Zstd if c.raw => u64::from(c.stored_len) != raw_len,
                    Compression::Zstd => c.stored_len == 0,
                };
            if bad_len {
                return Err(ImageError::ChunkBadLength {
                    path,
                    chunk: i,
                    stored_len: u64::from(c.stored_len),
                    nr_pages: u64::from(c.nr_pages),
                });
            }
            let end = c.offset.saturating_add(u64::from(c.stored_len));
            if end > file_size {
                return Err(ImageError::ChunkOutOfFile {
                    path,
                    chunk: i,
                    offset: c.offset,
                    end,
                    file_size,
                });
            }
            spans.push((c.offset, end, i));
            starts.push(total_pages);
            total_pages += u64::from(c.nr_pages);
        }
        // Chunks may lie in the file in another order than their pages (a
        // pre-copy writes some before the pages around them), never over
        // each other or the header.
        spans.sort_unstable();
        let mut prev_end = PAGES_HEADER_LEN;
        for (offset, end, i) in spans {
            if offset < prev_end {
                return Err(ImageError::ChunkOverlap {
                    path,
                    chunk: i,
                    offset,
                    prev_end,
                });
            }
            prev_end = end;
        }
        Ok(PageReader {
            path,
            file,
            compression,
            chunks,
            starts,
            total_pages,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    pub fn chunks(&self) -> &[PageChunk] {
        &self.chunks
    }

    /// Page index (counting from the file's first page) where each chunk starts.
    pub fn chunk_page_starts(&self) -> &[u64] {
        &self.starts
    }

    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Reads chunk `idx` into `out` (exactly `nr_pages * 4096` bytes) and
    /// verifies its checksum.
    pub fn read_chunk(&self, idx: usize, out: &mut [u8]) -> Result<(), ImageError> {
        let c = self
            .chunks
            .get(idx)
            .ok_or_else(|| ImageError::NoSuchChunk {
                path: self.path.clone(),
                chunk: idx,
                count: self.chunks.len(),
            })?;
        let expected = u64::from(c.nr_pages) * PAGE_SIZE as u64;
        if out.len() as u64 != expected {
            return Err(ImageError::ChunkBufferSize {
                path: self.path.clone(),
                chunk: idx,
                expected,
                found: out.len() as u64,
            });
        }
        match self.compression {
            Compression::Zstd if !c.raw => self.read_zstd(idx, c, out)?,
            _ => self
                .file
                .read_exact_at(out, c.offset)
                .map_err(|e| ImageError::io(&self.path, "read", e))?,
        }
        let found = xxh3_64(out);
        if found != c.xxh3 {
            return Err(ImageError::ChunkChecksum {
                path: self.path.clone(),
                chunk: idx,
                expected: c.xxh3,
                found,
            });
        }
        Ok(())
    }

    fn read_zstd(&self, idx: usize, c: &PageChunk, out: &mut [u8]) -> Result<(), ImageError> {
        ZSTD_SCRATCH.with_borrow_mut(|(src, dctx, grouped)| {
            src.resize(c.stored_len as usize, 0);
            self.file
                .read_exact_at(src, c.offset)
                .map_err(|e| ImageError::io(&self.path, "read", e))?;
            let decompress_err = |source| ImageError::ChunkDecompress {
                path: self.path.clone(),
                chunk: idx,
                source,
            };
            let d = match dctx {
                Some(d) => d,
                None => dctx.insert(zstd::bulk::Decompressor::new().map_err(decompress_err)?),
            };
            let n = if c.stride == 0 {
                d.decompress_to_buffer(&src[..], out)
                    .map_err(decompress_err)?
            } else {
                grouped.resize(out.len(), 0);
                let n = d
                    .decompress_to_buffer(&src[..], &mut grouped[..])
                    .map_err(decompress_err)?;
                if n == out.len() {
                    stride::ungroup(grouped, c.stride as usize, out);
                }
                n
            };
            if n != out.len() {
                return Err(ImageError::ChunkTruncated {
                    path: self.path.clone(),
                    chunk: idx,
                    expected: out.len() as u64,
                    found: n as u64,
                });
            }
            Ok(())
        })
    }

    /// Convenience: reads chunk `idx` into a new buffer.
    pub fn read_chunk_vec(&self, idx: usize) -> Result<Vec<u8>, ImageError> {
        let len = self
            .chunks
            .get(idx)
            .map_or(0, |c| c.nr_pages as usize * PAGE_SIZE);
        let mut out = vec![0u8; len];
        self.read_chunk(idx, &mut out)?;
        Ok(out)
    }
}
