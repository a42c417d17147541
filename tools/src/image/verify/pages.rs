//! Pagemaps, page chunks and pages kept in a parent.

use super::*;

/// The first address of `[start, end)` that no mapping of `vmas` whose
/// pages are stored covers (mappings sorted or not); None if all of it is.
pub(super) fn uncovered(vmas: &[cryo_image::proto::Vma], start: u64, end: u64) -> Option<u64> {
    let mut at = start;
    while at < end {
        match vmas
            .iter()
            .find(|v| v.start <= at && at < v.end && load::kind_stores_pages(v.kind))
        {
            Some(v) => at = v.end,
            None => return Some(at),
        }
    }
    None
}

/// The live parent of `pid` in pstree.img, if there is one.
pub(super) fn live_parent(d: &Decoded, pid: u32) -> Result<u32, Option<u32>> {
    let pstree = d.pstree.as_deref().unwrap_or_default();
    let Some(e) = pstree.iter().find(|e| e.pid == pid) else {
        return Err(None);
    };
    match pstree.iter().find(|p| p.pid == e.ppid) {
        Some(p) if !p.zombie => Ok(p.pid),
        _ => Err(Some(e.ppid)),
    }
}

/// Runs against mappings (in-parent runs against the parent's too), page
/// counts, and every chunk's checksum. Returns the number of pages read
/// back and verified, and the processes whose stored pages cannot all be
/// read (pages file missing, unreadable or damaged).
pub(super) fn check_pagemaps(rep: &mut Report<'_>, d: &Decoded) -> (u64, BTreeSet<u32>) {
    let mut checked = 0u64;
    let mut unreadable = BTreeSet::new();
    let mut buf = Vec::new();
    for (&pid, pm) in &d.pagemaps {
        let name = pagemap_file(pid);
        let mm_name = mm_file(pid);
        for &i in &pm.empty_records {
            rep.file(&name, format!("record {i} holds neither a run nor a chunk"));
        }
        let mut prev_end = 0u64;
        // In-parent runs with no live parent: (ppid, runs, pages).
        let mut orphaned: Option<(u32, u64, u64)> = None;
        for (i, e) in pm.runs.iter().enumerate() {
            let end = u64::from(e.nr_pages)
                .checked_mul(PAGE)
                .and_then(|len| e.vaddr.checked_add(len));
            let Some(end) = end.filter(|_| e.vaddr % PAGE == 0 && e.nr_pages > 0) else {
                rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}, {} pages) is malformed",
                        e.vaddr, e.nr_pages
                    ),
                );
                continue;
            };
            let known = PAGE_IN_PARENT | cryo_image::PAGE_IN_PARENT_IMAGE;
            if e.flags & !known != 0 {
                rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}-{end:#x}) has unknown flags {:#x}",
                        e.vaddr,
                        e.flags & !known
                    ),
                );
            }
            if e.vaddr < prev_end {
                rep.file(
                    &name,
                    format!(
                        "run {i} ({:#x}-{end:#x}) overlaps or precedes the previous run",
                        e.vaddr
                    ),
                );
            }
            prev_end = prev_end.max(end);
            if let Some(mm) = d.mms.get(&pid) {
                // Else its own problem, reported already.
                check_run_in_mm(rep, &name, &mm_name, mm, i, e.vaddr, end, e.nr_pages);
            }
            if load::in_parent(e) {
                match live_parent(d, pid) {
                    Err(None) => {} // no pstree entry: reported with the files
                    Err(Some(ppid)) => {
                        let o = orphaned.get_or_insert((ppid, 0, 0));
                        o.1 += 1;
                        o.2 += u64::from(e.nr_pages);
                    }
                    Ok(ppid) => {
                        if let Some(pmm) = d.mms.get(&ppid) {
                            if let Some(at) = uncovered(&pmm.vmas, e.vaddr, end) {
                                rep.file(
                                    &name,
                                    format!(
                                        "run {i} ({:#x}-{end:#x}) is its parent's pages, but no mapping of {} with stored pages covers {at:#x}",
                                        e.vaddr,
                                        mm_file(ppid)
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        // Pages in the parent image: each found up the chain.
        let chained: Vec<u64> = pm
            .runs
            .iter()
            .filter(|e| e.flags & cryo_image::PAGE_IN_PARENT_IMAGE != 0 && e.nr_pages < 1 << 20)
            .flat_map(|e| (0..u64::from(e.nr_pages)).map(move |k| e.vaddr + k * PAGE))
            .collect();
        if !chained.is_empty() {
            let mut chain = cryo_engine::mem::incremental::Chain::new(rep.dir);
            if let Err(e) = chain.check(pid, &chained) {
                rep.file(
                    &name,
                    format!("{} pages in the parent image: {e}", chained.len()),
                );
            }
        }
        if let Some((ppid, runs, pages)) = orphaned {
            rep.file(
                &name,
                format!(
                    "{runs} runs ({pages} pages) are its parent's pages, but its parent {ppid} is not a live process of the image"
                ),
            );
        }
        let (runs, chunks) = (pm.stored_pages(), pm.chunk_pages());
        if runs != chunks || runs != pm.head.total_pages {
            rep.file(
                &name,
                format!(
                    "page counts disagree: stored runs hold {runs} pages, chunks {chunks}, the head says {}",
                    pm.head.total_pages
                ),
            );
            unreadable.insert(pid);
        }

        // The pages file, chunk by chunk.
        let expected = pages_file(pid);
        if pm.head.pages_file != expected {
            rep.file(
                &name,
                format!(
                    "names pages file {:?}, expected {expected}",
                    pm.head.pages_file
                ),
            );
            unreadable.insert(pid);
            continue;
        }
        let Some(compression) = pm.compression() else {
            rep.file(
                &name,
                format!("unknown compression {}", pm.head.compression),
            );
            unreadable.insert(pid);
            continue;
        };
        let mut sane = true;
        for (i, c) in pm.chunks.iter().enumerate() {
            if u64::from(c.nr_pages) * PAGE > MAX_CHUNK_LEN as u64 {
                rep.file(
                    &name,
                    format!(
                        "chunk {i} claims {} pages, more than a chunk can hold",
                        c.nr_pages
                    ),
                );
                sane = false;
            }
        }
        if !sane {
            unreadable.insert(pid);
            continue;
        }
        let reader = match PageReader::open(rep.dir, &expected, compression, pm.chunks.clone()) {
            Ok(r) => r,
            Err(ImageError::Missing { .. }) => {
                // Reported with the files.
                unreadable.insert(pid);
                continue;
            }
            Err(e) => {
                rep.error(e);
                unreadable.insert(pid);
                continue;
            }
        };
        for (i, c) in pm.chunks.iter().enumerate() {
            let len = c.nr_pages as usize * PAGE_SIZE;
            if buf.len() < len {
                // Bounded by MAX_CHUNK_LEN above; still, no abort on OOM.
                if buf.try_reserve_exact(len - buf.len()).is_err() {
                    rep.file(
                        &expected,
                        format!("chunk {i}: cannot allocate {len} bytes to check it"),
                    );
                    unreadable.insert(pid);
                    continue;
                }
            }
            buf.resize(len, 0);
            match reader.read_chunk(i, &mut buf) {
                Ok(()) => checked += u64::from(c.nr_pages),
                Err(e) => {
                    rep.error(e);
                    unreadable.insert(pid);
                }
            }
        }
    }
    (checked, unreadable)
}

/// A run of `pagemap` (`start..end`) against the process's own mappings.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_run_in_mm(
    rep: &mut Report<'_>,
    name: &str,
    mm_name: &str,
    mm: &MmEntry,
    i: usize,
    start: u64,
    end: u64,
    nr_pages: u32,
) {
    match mm.vmas.iter().find(|v| v.start <= start && end <= v.end) {
        None => rep.file(
            name,
            format!(
                "run {i} ({start:#x}-{end:#x}, {nr_pages} pages) lies outside every mapping of {mm_name}"
            ),
        ),
        Some(v) if !load::kind_stores_pages(v.kind) => rep.file(
            name,
            format!(
                "run {i} ({start:#x}-{end:#x}) lies in the {} mapping {:#x}-{:#x} of {mm_name}, whose pages are not stored",
                load::vma_kind_name(v.kind),
                v.start,
                v.end
            ),
        ),
        Some(_) => {}
    }
}

/// Counts, per process, the pages of `[start, end)` of `pid`'s parent
/// chain that end up read from that process's pages file.
pub(super) fn suppliers(
    d: &Decoded,
    pid: u32,
    start: u64,
    end: u64,
    depth: usize,
    out: &mut BTreeMap<u32, u64>,
) {
    let Ok(parent) = live_parent(d, pid) else {
        return; // reported by check_pagemaps
    };
    let Some(pm) = d.pagemaps.get(&parent) else {
        return; // reported with the files
    };
    for r in &pm.runs {
        let r_end = r
            .vaddr
            .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
        let (lo, hi) = (r.vaddr.max(start), r_end.min(end));
        if lo >= hi {
            continue;
        }
        if !load::in_parent(r) {
            *out.entry(parent).or_default() += (hi - lo) / PAGE;
        } else if depth < d.pagemaps.len() {
            suppliers(d, parent, lo, hi, depth + 1, out);
        }
    }
}

/// A process's in-parent pages must be readable where they are stored: in
/// the parent's pages file, or an ancestor's further up.
pub(super) fn check_parent_pages(rep: &mut Report<'_>, d: &Decoded, unreadable: &BTreeSet<u32>) {
    if unreadable.is_empty() {
        return;
    }
    for (&pid, pm) in &d.pagemaps {
        let mut from = BTreeMap::new();
        for r in pm.runs.iter().filter(|r| load::in_parent(r)) {
            let end = r
                .vaddr
                .saturating_add(u64::from(r.nr_pages).saturating_mul(PAGE));
            suppliers(d, pid, r.vaddr, end, 0, &mut from);
        }
        for (owner, n) in from {
            if unreadable.contains(&owner) {
                rep.file(
                    &pagemap_file(pid),
                    format!(
                        "{n} pages it shares with its parent are stored in {} (process {owner}), which cannot be read",
                        pages_file(owner)
                    ),
                );
            }
        }
    }
}
