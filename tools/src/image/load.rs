//! Reading the records of image files, shared by every `cryo image` tool.

use std::path::Path;

use cryo_image::proto::{self, PageChunk, PagemapEntry, PagemapHead, PagemapRecord, VmaKind};
use cryo_image::{ImageError, ImageReader, Kind};

/// Every record of `dir/name`, decoded as `M`.
pub fn read_all<M: prost::Message + Default>(
    dir: &Path,
    name: &str,
    kind: Kind,
) -> Result<Vec<M>, ImageError> {
    let mut r = ImageReader::open(dir, name, kind)?;
    let mut out = Vec::new();
    while let Some(m) = r.next::<M>()? {
        out.push(m);
    }
    Ok(out)
}

/// A decoded `pagemap-<pid>.img`.
#[derive(Debug, Default)]
pub struct Pagemap {
    pub head: PagemapHead,
    pub runs: Vec<PagemapEntry>,
    pub chunks: Vec<PageChunk>,
    /// Indexes of records that hold neither a run nor a chunk.
    pub empty_records: Vec<usize>,
}

impl Pagemap {
    /// Pages of the runs stored in this process's pages file (the chunks
    /// hold exactly these, in order).
    pub fn stored_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|e| stored_here(e))
            .map(|e| u64::from(e.nr_pages))
            .sum()
    }

    /// Pages of the runs that are the parent process's (`PAGE_IN_PARENT`).
    pub fn parent_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|e| in_parent(e))
            .map(|e| u64::from(e.nr_pages))
            .sum()
    }

    pub fn chunk_pages(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.nr_pages)).sum()
    }

    pub fn compression(&self) -> Option<proto::Compression> {
        proto::Compression::try_from(self.head.compression).ok()
    }
}

/// Reads `dir/name` as a pagemap file. `Ok(None)` when the file has no
/// head record.
pub fn read_pagemap(dir: &Path, name: &str) -> Result<Option<Pagemap>, ImageError> {
    let mut r = ImageReader::open(dir, name, Kind::Pagemap)?;
    let Some(head) = r.next::<PagemapHead>()? else {
        return Ok(None);
    };
    let mut pm = Pagemap {
        head,
        ..Pagemap::default()
    };
    loop {
        let idx = r.record_index();
        let Some(rec) = r.next::<PagemapRecord>()? else {
            break;
        };
        match rec.record {
            Some(proto::pagemap_record::Record::Run(e)) => pm.runs.push(e),
            Some(proto::pagemap_record::Record::Chunk(c)) => pm.chunks.push(c),
            None => pm.empty_records.push(idx),
        }
    }
    Ok(Some(pm))
}

/// Whether a run's pages are the parent process's, not stored here.
pub fn in_parent(e: &PagemapEntry) -> bool {
    e.flags & cryo_image::PAGE_IN_PARENT != 0
}

/// Whether a run's pages are in this process's pages file (not its
/// parent process's, nor the parent image's).
pub fn stored_here(e: &PagemapEntry) -> bool {
    !cryo_image::stored_elsewhere(e.flags)
}

/// Whether the pages of mappings of this kind are stored in the image.
pub fn kind_stores_pages(kind: i32) -> bool {
    matches!(
        VmaKind::try_from(kind),
        Ok(VmaKind::VmaAnonPrivate
            | VmaKind::VmaAnonShared
            | VmaKind::VmaFilePrivate
            | VmaKind::VmaHeap
            | VmaKind::VmaStack)
    )
}

/// `VMA_ANON_PRIVATE` -> `anon-private`; unknown values as `kind-<n>`.
pub fn vma_kind_name(kind: i32) -> String {
    match VmaKind::try_from(kind) {
        Ok(k) => k
            .as_str_name()
            .trim_start_matches("VMA_")
            .to_ascii_lowercase()
            .replace('_', "-"),
        Err(_) => format!("kind-{kind}"),
    }
}

/// `FILE_REGULAR` -> `regular`; unknown values as `kind-<n>`.
pub fn file_kind_name(kind: i32) -> String {
    match proto::FileKind::try_from(kind) {
        Ok(k) => k
            .as_str_name()
            .trim_start_matches("FILE_")
            .to_ascii_lowercase(),
        Err(_) => format!("kind-{kind}"),
    }
}

/// A file's path for people, with its pty for the ends of a pty pair:
/// `/dev/ptmx (pty 3, locked, packet mode)`, `/dev/pts/3 (pty 3)`.
pub fn file_label(f: &proto::FileEntry) -> String {
    if f.deleted {
        return format!("{} (removed)", f.path);
    }
    if let Some(s) = &f.inet {
        // SOCK_STREAM is 1.
        let proto = if s.r#type == 1 { "TCP" } else { "UDP" };
        let mut what = format!("{proto} {}", f.path);
        if !s.local_addr.is_empty() {
            what += &format!(
                " on {}",
                cryo_engine::files::inet::text(&s.local_addr, s.local_port)
            );
        }
        if s.listening {
            what += &format!(" listening (backlog {})", s.backlog);
        }
        if !s.peer_addr.is_empty() {
            what += &format!(
                " to {}",
                cryo_engine::files::inet::text(&s.peer_addr, s.peer_port)
            );
        }
        if let Some(t) = &s.tcp {
            what += &format!(
                " established ({} bytes to send, {} received not read)",
                t.send_queue.len(),
                t.recv_queue.len()
            );
        }
        if let Some(p) = &s.pending_on {
            what += &format!(
                " waiting to be accepted ({} bytes sent; {} in its queue)",
                p.data.len(),
                p.order + 1
            );
        }
        if s.pending > 0 {
            what += &format!(", {} connection(s) waiting", s.pending);
        }
        if s.closed {
            what += " (restored closed)";
        }
        if !s.memberships.is_empty() {
            what += &format!(" in {} multicast group(s)", s.memberships.len());
        }
        if !s.queue.is_empty() {
            what += &format!(" {} datagram(s) queued", s.queue.len());
        }
        return what;
    }
    let Some(pty) = &f.pty else {
        return f.path.clone();
    };
    let mut what = format!("pty {}", pty.index);
    if pty.devpts != 0 {
        what.push_str(" of the tree's own devpts");
    }
    if pty.locked {
        what.push_str(", locked");
    }
    if pty.packet {
        what.push_str(", packet mode");
    }
    format!("{} ({what})", f.path)
}

/// `none` / `zstd`; unknown values as `compression-<n>`.
pub fn compression_name(c: i32) -> String {
    match proto::Compression::try_from(c) {
        Ok(proto::Compression::None) => "none".into(),
        Ok(proto::Compression::Zstd) => "zstd".into(),
        Err(_) => format!("compression-{c}"),
    }
}

/// Names of the entries of `dir`, sorted.
pub fn dir_entries(dir: &Path) -> anyhow::Result<Vec<(String, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot list directory: {e}", dir.display()))?;
    for entry in rd {
        let entry =
            entry.map_err(|e| anyhow::anyhow!("{}: cannot list directory: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(entry.path())
            .map_err(|e| anyhow::anyhow!("{}: stat failed: {e}", entry.path().display()))?;
        out.push((name, meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Pages of the runs that fall inside `[start, end)`: with `parent`
/// false those stored in the process's own pages file, with `parent` true
/// those that are elsewhere (its parent process's, `PAGE_IN_PARENT`, or
/// the parent image's, `PAGE_IN_PARENT_IMAGE`).
pub fn pages_in(runs: &[PagemapEntry], start: u64, end: u64, parent: bool) -> u64 {
    const PAGE: u64 = cryo_image::PAGE_SIZE as u64;
    runs.iter()
        .filter(|r| stored_here(r) != parent)
        .map(|r| {
            let rs = r.vaddr;
            let re = r
                .vaddr
                .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
            let lo = rs.max(start);
            let hi = re.min(end);
            if hi > lo {
                (hi - lo) / PAGE
            } else {
                0
            }
        })
        .sum()
}

/// `SIGUSR2` for 12; `signal 40` for those nix has no name for.
pub fn signal_name(sig: u32) -> String {
    i32::try_from(sig)
        .ok()
        .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
        .map_or_else(|| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// How a raw wait status (a zombie's `exit_status`) reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// `exit(code)`.
    Exited(u32),
    /// Killed by a signal, with or without a core dump.
    Killed { signal: u32, core: bool },
    /// Not a status a terminated process can have.
    Invalid,
}

impl WaitStatus {
    pub fn of(status: u32) -> WaitStatus {
        let low = status & 0x7f;
        if status > 0xffff {
            WaitStatus::Invalid
        } else if low == 0 && status & 0x80 == 0 {
            WaitStatus::Exited(status >> 8)
        } else if low != 0 && low != 0x7f && status >> 8 == 0 {
            WaitStatus::Killed {
                signal: low,
                core: status & 0x80 != 0,
            }
        } else {
            WaitStatus::Invalid
        }
    }

    /// `exited with code 7`, `killed by SIGUSR2`.
    pub fn text(self, status: u32) -> String {
        match self {
            WaitStatus::Exited(c) => format!("exited with code {c}"),
            WaitStatus::Killed { signal, core } => format!(
                "killed by {}{}",
                signal_name(signal),
                if core { " (core dumped)" } else { "" }
            ),
            WaitStatus::Invalid => format!("invalid wait status {status:#x}"),
        }
    }

    /// `{"code": 7}` / `{"signal": 12, "signal_name": "SIGUSR2", "core_dumped": false}`.
    pub fn json(self) -> serde_json::Value {
        match self {
            WaitStatus::Exited(c) => serde_json::json!({ "code": c }),
            WaitStatus::Killed { signal, core } => serde_json::json!({
                "signal": signal,
                "signal_name": signal_name(signal),
                "core_dumped": core,
            }),
            WaitStatus::Invalid => serde_json::Value::Null,
        }
    }
}
