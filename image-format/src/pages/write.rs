//! The writing side of a pages file: the compression pipeline and [`PageWriter`].

use super::*;

/// Output side of a pages file: file, end offset, running hash and chunk list.
pub(super) struct Sink {
    path: PathBuf,
    file: File,
    offset: u64,
    hasher: Xxh3,
    chunks: Vec<PageChunk>,
}

impl Sink {
    fn append(
        &mut self,
        bytes: &[u8],
        nr_pages: u32,
        xxh3: u64,
        raw: bool,
        stride: u32,
    ) -> Result<(), ImageError> {
        self.file
            .write_all_at(bytes, self.offset)
            .map_err(|e| ImageError::io(&self.path, "write", e))?;
        self.hasher.update(bytes);
        self.chunks.push(PageChunk {
            offset: self.offset,
            // Bounded by compress_bound(MAX_CHUNK_LEN) < u32::MAX.
            stored_len: bytes.len() as u32,
            nr_pages,
            xxh3,
            raw,
            stride,
        });
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

pub(super) struct Job {
    seq: u64,
    data: Vec<u8>,
}

pub(super) enum Done {
    Chunk {
        seq: u64,
        stored: Vec<u8>,
        nr_pages: u32,
        xxh3: u64,
        raw: bool,
        stride: u32,
    },
    Failed(ImageError),
}

/// Marks the pipeline failed if a worker unwinds.
pub(super) struct PanicGuard(Arc<AtomicBool>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

pub(super) struct Pipeline {
    seq: u64,
    /// Chunks in the file so far.
    written: Arc<std::sync::atomic::AtomicU64>,
    job_tx: Sender<Job>,
    free_rx: Receiver<Vec<u8>>,
    failed: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    writer: JoinHandle<Result<Sink, ImageError>>,
}

impl Pipeline {
    fn start(sink: Sink, level: i32, threads: usize) -> Result<Pipeline, ImageError> {
        let threads = threads.max(1);
        let path = sink.path.clone();
        let (job_tx, job_rx) = bounded::<Job>(threads * 2);
        let (done_tx, done_rx) = bounded::<Done>(threads * 2);
        let (free_tx, free_rx) = bounded::<Vec<u8>>(POOL_LEN + threads * 2);
        let (out_tx, out_rx) = bounded::<Vec<u8>>(POOL_LEN + threads * 2);
        let failed = Arc::new(AtomicBool::new(false));

        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (wpath, job_rx, done_tx, free_tx, out_rx, failed) = (
                path.clone(),
                job_rx.clone(),
                done_tx.clone(),
                free_tx.clone(),
                out_rx.clone(),
                failed.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("cryo-zstd-{i}"))
                .spawn(move || {
                    let _guard = PanicGuard(failed);
                    compress_worker(&wpath, level, job_rx, done_tx, free_tx, out_rx)
                })
                .map_err(|e| ImageError::io(&path, "spawn compression worker", e))?;
            workers.push(handle);
        }
        drop(done_tx);
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer_written = written.clone();
        let writer_failed = failed.clone();
        let writer = std::thread::Builder::new()
            .name("cryo-pagewriter".into())
            .spawn(move || {
                let _guard = PanicGuard(writer_failed.clone());
                let res = write_in_order(sink, done_rx, out_tx, &writer_written);
                if res.is_err() {
                    writer_failed.store(true, Ordering::SeqCst);
                }
                res
            })
            .map_err(|e| ImageError::io(&path, "spawn page writer", e))?;
        Ok(Pipeline {
            seq: 0,
            written,
            job_tx,
            free_rx,
            failed,
            workers,
            writer,
        })
    }

    /// Closes the job queue, joins every thread and returns the sink.
    fn shutdown(self, path: &Path) -> Result<Sink, ImageError> {
        drop(self.job_tx);
        let mut panicked = false;
        for w in self.workers {
            panicked |= w.join().is_err();
        }
        let res = self.writer.join();
        if panicked {
            return Err(ImageError::WorkerPanicked {
                path: path.to_path_buf(),
            });
        }
        match res {
            Ok(r) => r,
            Err(_) => Err(ImageError::WorkerPanicked {
                path: path.to_path_buf(),
            }),
        }
    }
}

pub(super) fn compress_worker(
    path: &Path,
    level: i32,
    job_rx: Receiver<Job>,
    done_tx: Sender<Done>,
    free_tx: Sender<Vec<u8>>,
    out_rx: Receiver<Vec<u8>>,
) {
    let mut compressor: Option<zstd::bulk::Compressor<'static>> = None;
    let mut grouped: Vec<u8> = Vec::new();
    for mut job in job_rx.iter() {
        let nr_pages = (job.data.len() / PAGE_SIZE) as u32;
        let xxh3 = xxh3_64(&job.data);
        let mut stored = out_rx.try_recv().unwrap_or_default();
        stored.clear();
        stored.reserve(zstd::zstd_safe::compress_bound(job.data.len()));
        let res = match &mut compressor {
            Some(c) => Ok(c),
            None => zstd::bulk::Compressor::new(level).map(|c| compressor.insert(c)),
        }
        .and_then(|c| {
            // Random or already compressed pages would only cost time:
            // try a few sample pages first and store the chunk as it is
            // if they do not shrink.
            match choose_form(c, &job.data, &mut stored)? {
                // The data itself is what is stored: no copy (the empty
                // output buffer goes back to the pool in its place).
                Form::Raw => {
                    std::mem::swap(&mut stored, &mut job.data);
                    Ok((true, 0))
                }
                Form::Plain => {
                    stored.clear();
                    c.compress_to_buffer(&job.data, &mut stored)
                        .map(|_| (false, 0))
                }
                Form::Grouped(stride) => {
                    grouped.resize(job.data.len(), 0);
                    stride::group(&job.data, stride, &mut grouped);
                    stored.clear();
                    c.compress_to_buffer(&grouped, &mut stored)
                        .map(|_| (false, stride as u32))
                }
            }
        });
        let mut data = job.data;
        data.clear();
        // The pool is bounded; when it is full the buffer is simply freed.
        let _ = free_tx.try_send(data);
        let msg = match res {
            Ok((raw, stride)) => Done::Chunk {
                seq: job.seq,
                stored,
                nr_pages,
                xxh3,
                raw,
                stride,
            },
            Err(source) => Done::Failed(ImageError::ChunkCompress {
                path: path.to_path_buf(),
                chunk: job.seq as usize,
                source,
            }),
        };
        if done_tx.send(msg).is_err() {
            return; // the writer stopped on an error
        }
    }
}

/// How a chunk is stored.
pub(super) enum Form {
    /// As it is (it does not compress).
    Raw,
    /// Compressed.
    Plain,
    /// Compressed after grouping its bytes by record position.
    Grouped(usize),
}

/// Compress four pages spread over the chunk: store it raw unless they
/// shrink below 90%; group it by the record stride whose grouped sample
/// compresses best, if that sample is no larger than the plain one.
pub(super) fn choose_form(
    c: &mut zstd::bulk::Compressor<'static>,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> std::io::Result<Form> {
    let pages = data.len() / PAGE_SIZE;
    if pages < 16 {
        return Ok(Form::Plain);
    }
    let mut sample = Vec::with_capacity(4 * PAGE_SIZE);
    for k in 0..4 {
        let p = (pages * k / 4) * PAGE_SIZE;
        sample.extend_from_slice(&data[p..p + PAGE_SIZE]);
    }
    scratch.clear();
    let plain = c.compress_to_buffer(&sample, scratch)?;
    if plain * 10 >= sample.len() * 9 {
        return Ok(Form::Raw);
    }
    // Grouping pays off with the length of the byte planes, which a
    // sample of a few pages keeps short (in a 1 MiB chunk of 64-byte
    // records it shrinks the chunk by 17% where the sample gains 1%):
    // the sample picks the stride, and grouping is used unless it makes
    // the sample worse. Memory without a record layout gets much worse.
    let mut grouped = vec![0u8; sample.len()];
    let mut best: Option<(usize, usize)> = None;
    for s in stride::CANDIDATES {
        if !stride::valid(s, data.len()) {
            continue;
        }
        stride::group(&sample, s, &mut grouped);
        scratch.clear();
        let n = c.compress_to_buffer(&grouped, scratch)?;
        if best.is_none_or(|(b, _)| n < b) {
            best = Some((n, s));
        }
    }
    Ok(match best {
        Some((n, s)) if n <= plain => Form::Grouped(s),
        _ => Form::Plain,
    })
}

pub(super) fn write_in_order(
    mut sink: Sink,
    done_rx: Receiver<Done>,
    out_tx: Sender<Vec<u8>>,
    written: &std::sync::atomic::AtomicU64,
) -> Result<Sink, ImageError> {
    let mut pending: BTreeMap<u64, (Vec<u8>, u32, u64, bool, u32)> = BTreeMap::new();
    let mut next = 0u64;
    for msg in done_rx.iter() {
        match msg {
            Done::Failed(e) => return Err(e),
            Done::Chunk {
                seq,
                stored,
                nr_pages,
                xxh3,
                raw,
                stride,
            } => {
                pending.insert(seq, (stored, nr_pages, xxh3, raw, stride));
            }
        }
        while let Some((stored, nr_pages, xxh3, raw, stride)) = pending.remove(&next) {
            sink.append(&stored, nr_pages, xxh3, raw, stride)?;
            let _ = out_tx.try_send(stored);
            next += 1;
            written.store(next, Ordering::SeqCst);
        }
    }
    if !pending.is_empty() {
        // A chunk never arrived: its worker died.
        return Err(ImageError::WorkerPanicked {
            path: sink.path.clone(),
        });
    }
    Ok(sink)
}

pub(super) enum Mode {
    Raw { sink: Box<Sink>, free: Vec<Vec<u8>> },
    Zstd(Pipeline),
    Closed,
}

/// Writes a pages file, chunk by chunk, in submission order.
pub struct PageWriter {
    path: PathBuf,
    name: String,
    mode: Mode,
    readback: Vec<u8>,
}

impl PageWriter {
    /// Creates `dir/name` (mode 0600) and writes the header. With
    /// `Compression::Zstd`, `threads` workers compress at `level`.
    pub fn create(
        dir: &Path,
        name: &str,
        compression: Compression,
        level: i32,
        threads: usize,
    ) -> Result<PageWriter, ImageError> {
        let path = dir.join(name);
        let mut file = create_file(&path)?;
        let mut header = vec![0u8; PAGES_HEADER_LEN as usize];
        header[..8].copy_from_slice(&pages_header());
        file.write_all(&header)
            .map_err(|e| ImageError::io(&path, "write", e))?;
        let mut hasher = Xxh3::new();
        hasher.update(&header);
        let sink = Sink {
            path: path.clone(),
            file,
            offset: PAGES_HEADER_LEN,
            hasher,
            chunks: Vec::new(),
        };
        let mode = match compression {
            Compression::None => Mode::Raw {
                sink: Box::new(sink),
                free: Vec::new(),
            },
            Compression::Zstd => Mode::Zstd(Pipeline::start(sink, level, threads)?),
        };
        Ok(PageWriter {
            path,
            name: name.to_string(),
            mode,
            readback: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An empty buffer with capacity of at least [`PAGE_BUFFER_CAPACITY`],
    /// recycled from chunks already processed when possible.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        let recycled = match &mut self.mode {
            Mode::Raw { free, .. } => free.pop(),
            Mode::Zstd(p) => p.free_rx.try_recv().ok(),
            Mode::Closed => None,
        };
        let mut buf = recycled.unwrap_or_default();
        buf.clear();
        if buf.capacity() < PAGE_BUFFER_CAPACITY {
            buf.reserve_exact(PAGE_BUFFER_CAPACITY);
        }
        buf
    }

    /// Tears the pipeline down after a failure and returns the real error.
    fn fail(&mut self) -> ImageError {
        match std::mem::replace(&mut self.mode, Mode::Closed) {
            Mode::Zstd(p) => match p.shutdown(&self.path) {
                Err(e) => e,
                Ok(_) => ImageError::WriterClosed {
                    path: self.path.clone(),
                },
            },
            _ => ImageError::WriterClosed {
                path: self.path.clone(),
            },
        }
    }

    /// Waits until every chunk submitted so far is in the file (compressed
    /// and written), or the pipeline failed.
    pub fn wait_written(&self) {
        if let Mode::Zstd(p) = &self.mode {
            while p.written.load(Ordering::SeqCst) < p.seq && !p.failed.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Appends one chunk holding `data` (a non-zero multiple of 4096 bytes).
    pub fn submit(&mut self, data: Vec<u8>) -> Result<(), ImageError> {
        let nr_pages = check_len(&self.path, data.len())?;
        match &mut self.mode {
            Mode::Raw { sink, free } => {
                let xxh3 = xxh3_64(&data);
                sink.append(&data, nr_pages, xxh3, false, 0)?;
                if free.len() < POOL_LEN {
                    let mut data = data;
                    data.clear();
                    free.push(data);
                }
                Ok(())
            }
            Mode::Zstd(p) => {
                if p.failed.load(Ordering::SeqCst) {
                    return Err(self.fail());
                }
                let seq = p.seq;
                if p.job_tx.send(Job { seq, data }).is_err() {
                    return Err(self.fail());
                }
                p.seq += 1;
                Ok(())
            }
            Mode::Closed => Err(ImageError::WriterClosed {
                path: self.path.clone(),
            }),
        }
    }

    /// Moves `len` bytes (a non-zero multiple of 4096) from `pipe` to the end
    /// of the file as one chunk, without copying through user space.
    /// Only for `Compression::None`.
    pub fn splice_from_pipe(&mut self, pipe: BorrowedFd<'_>, len: usize) -> Result<(), ImageError> {
        let nr_pages = check_len(&self.path, len)?;
        let Mode::Raw { sink, .. } = &mut self.mode else {
            return Err(match self.mode {
                Mode::Closed => ImageError::WriterClosed {
                    path: self.path.clone(),
                },
                _ => ImageError::SpliceNeedsRaw {
                    path: self.path.clone(),
                },
            });
        };
        let start = sink.offset;
        if let Err(e) = splice_all(&self.path, pipe, &sink.file, start, len) {
            // Drop whatever part of the chunk made it into the file.
            let _ = sink.file.set_len(start);
            return Err(e);
        }
        // Checksum the spliced bytes by reading them back (page cache).
        if self.readback.len() < READBACK_LEN {
            self.readback.resize(READBACK_LEN, 0);
        }
        let mut chunk_hasher = Xxh3::new();
        let mut pos = 0usize;
        while pos < len {
            let n = (len - pos).min(READBACK_LEN);
            let buf = &mut self.readback[..n];
            sink.file
                .read_exact_at(buf, start + pos as u64)
                .map_err(|e| ImageError::io(&self.path, "read back", e))?;
            chunk_hasher.update(buf);
            sink.hasher.update(buf);
            pos += n;
        }
        sink.chunks.push(PageChunk {
            offset: start,
            stored_len: len as u32,
            nr_pages,
            xxh3: chunk_hasher.digest(),
            raw: false,
            stride: 0,
        });
        sink.offset = start + len as u64;
        Ok(())
    }

    /// Waits for every chunk to be written; returns the chunks in order and
    /// the file's size and whole-content xxh3-64.
    pub fn finish(mut self) -> Result<(Vec<PageChunk>, ImageFileInfo), ImageError> {
        let sink = match std::mem::replace(&mut self.mode, Mode::Closed) {
            Mode::Raw { sink, .. } => *sink,
            Mode::Zstd(p) => p.shutdown(&self.path)?,
            Mode::Closed => {
                return Err(ImageError::WriterClosed {
                    path: self.path.clone(),
                })
            }
        };
        let info = ImageFileInfo {
            name: self.name.clone(),
            size: sink.offset,
            xxh3: sink.hasher.digest(),
        };
        Ok((sink.chunks, info))
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        // Never leave threads behind; errors are moot once the writer is dropped.
        if let Mode::Zstd(p) = std::mem::replace(&mut self.mode, Mode::Closed) {
            let _ = p.shutdown(&self.path);
        }
    }
}

/// Splices exactly `len` bytes from `pipe` into `file` at `start`.
pub(super) fn splice_all(
    path: &Path,
    pipe: BorrowedFd<'_>,
    file: &File,
    start: u64,
    len: usize,
) -> Result<(), ImageError> {
    let mut off = start as i64;
    let mut done = 0usize;
    while done < len {
        match splice(
            pipe,
            None,
            file,
            Some(&mut off),
            len - done,
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(0) => {
                return Err(ImageError::PipeClosed {
                    path: path.to_path_buf(),
                    done: done as u64,
                    len: len as u64,
                })
            }
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                // Non-blocking pipe with nothing in it yet: wait for data.
                let mut fds = [PollFd::new(pipe, PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(ImageError::io(path, "poll", io::Error::from(e))),
                }
            }
            Err(e) => return Err(ImageError::io(path, "splice", io::Error::from(e))),
        }
    }
    Ok(())
}
