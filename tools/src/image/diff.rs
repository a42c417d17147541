//! `cryo image diff DIR1 DIR2 [--json]`: what changed between two
//! checkpoints of the same workload.
//!
//! Tasks (every process of the tree, zombies included) are matched by pid:
//! added, removed, and for those in both the changed pstree fields (ppid,
//! pgid, sid, threads, cmdline, zombie, exit status) and exe/brk;
//! mappings added, removed or changed (range, protection, kind, file,
//! offset); for mappings in both, how many pages differ (in one image only,
//! or with different bytes; pages a child shares with its parent
//! (`PAGE_IN_PARENT`) compare by the bytes they resolve to in the
//! ancestor's image, so a page stored in one image and shared with the
//! parent in the other is no change if the bytes are the same); for live
//! processes only, descriptors added, removed or
//! changed (kind, path, flags, position, close-on-exec); and the threads
//! whose rip or rsp moved. The exit status is 0 whether or not anything
//! differs; 1 only when an image cannot be read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use cryo_image::proto::{FdEntry, FileEntry, PstreeEntry, Vma, VmaKind};
use serde_json::{json, Value};

use super::load;
use super::show::{open_flags, perms};
use super::task::{load_image, LoadedImage, MemStream, Memory, Origin};

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// One field that differs: name, old and new value (as JSON and as text).
struct Change {
    field: &'static str,
    old: Value,
    new: Value,
}

impl Change {
    fn text(&self) -> String {
        format!(
            "{} {} -> {}",
            self.field,
            value_text(&self.old),
            value_text(&self.new)
        )
    }

    fn json(changes: &[Change]) -> Value {
        Value::Object(
            changes
                .iter()
                .map(|c| (c.field.to_string(), json!({ "old": c.old, "new": c.new })))
                .collect(),
        )
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(value_text).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

fn push_change<T: PartialEq + Into<Value> + Clone>(
    out: &mut Vec<Change>,
    field: &'static str,
    old: &T,
    new: &T,
) {
    if old != new {
        out.push(Change {
            field,
            old: old.clone().into(),
            new: new.clone().into(),
        });
    }
}

fn map_json(v: &Vma) -> Value {
    json!({
        "start": hex(v.start),
        "end": hex(v.end),
        "perms": perms(v),
        "kind": load::vma_kind_name(v.kind),
        "path": v.path,
        "offset": hex(v.pgoff),
    })
}

fn map_text(v: &Vma) -> String {
    let mut s = format!(
        "{:012x}-{:012x} {} {}",
        v.start,
        v.end,
        perms(v),
        load::vma_kind_name(v.kind)
    );
    if !v.path.is_empty() {
        let _ = write!(s, " {}@{:#x}", v.path, v.pgoff);
    }
    s
}

/// The stored pages of one pair of mappings that differ.
#[derive(Default, Clone, Copy)]
struct PageCounts {
    /// Stored in both, different bytes.
    changed: u64,
    only_old: u64,
    only_new: u64,
}

impl PageCounts {
    fn differ(&self) -> u64 {
        self.changed + self.only_old + self.only_new
    }
}

struct MapPair<'a> {
    old: &'a Vma,
    new: &'a Vma,
    changes: Vec<Change>,
    pages: PageCounts,
}

struct FdInfo {
    fd: u32,
    kind: String,
    path: String,
    flags: String,
    pos: u64,
    cloexec: bool,
}

impl FdInfo {
    fn new(fd: &FdEntry, files: &HashMap<u32, FileEntry>) -> FdInfo {
        let f = files.get(&fd.id);
        FdInfo {
            fd: fd.fd,
            kind: f.map_or_else(|| "missing".into(), |f| load::file_kind_name(f.kind)),
            path: f.map(load::file_label).unwrap_or_default(),
            flags: f.map(|f| open_flags(f.flags)).unwrap_or_default(),
            pos: f.map_or(0, |f| f.pos),
            cloexec: fd.cloexec,
        }
    }

    fn json(&self) -> Value {
        json!({
            "fd": self.fd,
            "kind": self.kind,
            "path": self.path,
            "flags": self.flags,
            "offset": self.pos,
            "cloexec": self.cloexec,
        })
    }

    fn text(&self) -> String {
        format!(
            "fd {} {} {} {} pos {}{}",
            self.fd,
            self.kind,
            self.path,
            self.flags,
            self.pos,
            if self.cloexec { " cloexec" } else { "" }
        )
    }
}

struct RegChange {
    tid: u32,
    rip: (u64, u64),
    rsp: (u64, u64),
}

struct TaskDiff<'a> {
    pid: u32,
    fields: Vec<Change>,
    maps_added: Vec<&'a Vma>,
    maps_removed: Vec<&'a Vma>,
    pairs: Vec<MapPair<'a>>,
    /// Differing pages that lie in added or removed mappings (or in none).
    pages_elsewhere: u64,
    fds_added: Vec<FdInfo>,
    fds_removed: Vec<FdInfo>,
    fds_changed: Vec<(u32, Vec<Change>)>,
    regs: Vec<RegChange>,
}

impl TaskDiff<'_> {
    fn pages_total(&self) -> u64 {
        self.pairs.iter().map(|p| p.pages.differ()).sum::<u64>() + self.pages_elsewhere
    }

    fn maps_changed(&self) -> impl Iterator<Item = &MapPair<'_>> {
        self.pairs.iter().filter(|p| !p.changes.is_empty())
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty()
            && self.maps_added.is_empty()
            && self.maps_removed.is_empty()
            && self.maps_changed().next().is_none()
            && self.pages_total() == 0
            && self.fds_added.is_empty()
            && self.fds_removed.is_empty()
            && self.fds_changed.is_empty()
            && self.regs.is_empty()
    }
}

/// Pairs the mappings of two layouts: same range first, then same start
/// or same end (a mapping that grew or shrank). The rest are added/removed.
fn pair_mappings<'a>(
    old: &'a [Vma],
    new: &'a [Vma],
) -> (Vec<MapPair<'a>>, Vec<&'a Vma>, Vec<&'a Vma>) {
    let mut new_used = vec![false; new.len()];
    let mut old_pair: Vec<Option<usize>> = vec![None; old.len()];
    let by_range: HashMap<(u64, u64), usize> = new
        .iter()
        .enumerate()
        .map(|(i, v)| ((v.start, v.end), i))
        .collect();
    for (i, v) in old.iter().enumerate() {
        if let Some(&j) = by_range.get(&(v.start, v.end)) {
            if !new_used[j] {
                new_used[j] = true;
                old_pair[i] = Some(j);
            }
        }
    }
    for (i, v) in old.iter().enumerate() {
        if old_pair[i].is_some() {
            continue;
        }
        let found = new.iter().enumerate().position(|(j, n)| {
            !new_used[j]
                && (n.start == v.start || n.end == v.end)
                && n.start < v.end
                && v.start < n.end
        });
        if let Some(j) = found {
            new_used[j] = true;
            old_pair[i] = Some(j);
        }
    }
    let mut pairs = Vec::new();
    let mut removed = Vec::new();
    for (i, v) in old.iter().enumerate() {
        match old_pair[i] {
            Some(j) => {
                let n = &new[j];
                let mut changes = Vec::new();
                if (v.start, v.end) != (n.start, n.end) {
                    changes.push(Change {
                        field: "range",
                        old: format!("{:#x}-{:#x}", v.start, v.end).into(),
                        new: format!("{:#x}-{:#x}", n.start, n.end).into(),
                    });
                }
                push_change(&mut changes, "perms", &perms(v), &perms(n));
                push_change(
                    &mut changes,
                    "kind",
                    &load::vma_kind_name(v.kind),
                    &load::vma_kind_name(n.kind),
                );
                push_change(&mut changes, "path", &v.path, &n.path);
                push_change(&mut changes, "offset", &v.pgoff, &n.pgoff);
                pairs.push(MapPair {
                    old: v,
                    new: n,
                    changes,
                    pages: PageCounts::default(),
                });
            }
            None => removed.push(v),
        }
    }
    let added = new
        .iter()
        .enumerate()
        .filter(|(j, _)| !new_used[*j])
        .map(|(_, v)| v)
        .collect();
    (pairs, added, removed)
}

/// Index from address to the pair holding it, for one side's mappings.
struct RangeIndex(Vec<(u64, u64, usize)>);

impl RangeIndex {
    fn new<'a>(ranges: impl Iterator<Item = (&'a Vma, usize)>) -> RangeIndex {
        let mut v: Vec<_> = ranges.map(|(m, i)| (m.start, m.end, i)).collect();
        v.sort_unstable();
        RangeIndex(v)
    }

    fn find(&self, addr: u64) -> Option<usize> {
        let i = self.0.partition_point(|r| r.1 <= addr);
        self.0.get(i).filter(|r| r.0 <= addr).map(|r| r.2)
    }
}

/// Whether `page`, stored at `addr` in the private file mapping `v`, holds
/// the same bytes as the mapped file there. `files` caches the open files.
fn same_as_file(
    v: &Vma,
    addr: u64,
    page: &[u8],
    files: &mut HashMap<String, Option<std::fs::File>>,
) -> bool {
    use std::os::unix::fs::FileExt;
    if !matches!(VmaKind::try_from(v.kind), Ok(VmaKind::VmaFilePrivate)) || v.path.is_empty() {
        return false;
    }
    let Some(f) = files
        .entry(v.path.clone())
        .or_insert_with(|| std::fs::File::open(&v.path).ok())
    else {
        return false;
    };
    let mut buf = vec![0u8; page.len()];
    let mut done = 0;
    let off = v.pgoff + (addr - v.start);
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break, // past the end of the file: zeros
            Ok(n) => done += n,
            Err(_) => return false,
        }
    }
    buf == page
}

/// The next page of a stream that the image holds for the process, in-parent
/// pages no ancestor stored left out (they are zeros, as absent pages are).
fn next_held(st: &mut MemStream, mem: &mut Memory<'_>) -> anyhow::Result<Option<u64>> {
    while let Some((addr, origin)) = st.next_page(mem)? {
        if origin != Origin::ParentZero {
            return Ok(Some(addr));
        }
    }
    Ok(None)
}

/// Walks the pages of both tasks (stored or resolved from an ancestor) in
/// address order and counts the differences per pair of mappings.
fn compare_pages(
    mems: (&mut Memory<'_>, &mut Memory<'_>),
    tasks: (usize, usize),
    pairs: &mut [MapPair<'_>],
) -> anyhow::Result<u64> {
    let (ma, mb) = mems;
    let old_idx = RangeIndex::new(pairs.iter().enumerate().map(|(i, p)| (p.old, i)));
    let new_idx = RangeIndex::new(pairs.iter().enumerate().map(|(i, p)| (p.new, i)));
    let mut a = MemStream::new(tasks.0);
    let mut b = MemStream::new(tasks.1);
    let mut elsewhere = 0u64;
    let mut files = HashMap::new();
    let mut pa = next_held(&mut a, ma)?;
    let mut pb = next_held(&mut b, mb)?;
    loop {
        let (addr, kind) = match (pa, pb) {
            (None, None) => break,
            (Some(x), Some(y)) if x == y => (x, 0),
            (Some(x), Some(y)) if x < y => (x, 1),
            (Some(x), None) => (x, 1),
            (_, Some(y)) => (y, 2),
        };
        let pair = match kind {
            1 => old_idx.find(addr),
            _ => new_idx.find(addr).or_else(|| old_idx.find(addr)),
        };
        let differs = match kind {
            0 => a.page() != b.page(),
            // A private file page stored on one side only is no change if
            // it still holds the file's bytes (a page copied on write, or
            // read back from the file, between the checkpoints).
            1 => pair.is_none_or(|i| !same_as_file(pairs[i].old, addr, a.page(), &mut files)),
            _ => pair.is_none_or(|i| !same_as_file(pairs[i].new, addr, b.page(), &mut files)),
        };
        if differs {
            match pair {
                Some(i) => {
                    let c = &mut pairs[i].pages;
                    match kind {
                        0 => c.changed += 1,
                        1 => c.only_old += 1,
                        _ => c.only_new += 1,
                    }
                }
                None => elsewhere += 1,
            }
        }
        if kind != 2 {
            pa = next_held(&mut a, ma)?;
        }
        if kind != 1 {
            pb = next_held(&mut b, mb)?;
        }
    }
    Ok(elsewhere)
}

/// A zombie's exit as text, `live` for a live process.
fn state_text(e: &PstreeEntry) -> String {
    if e.zombie {
        format!(
            "zombie, {}",
            load::WaitStatus::of(e.exit_status).text(e.exit_status)
        )
    } else {
        "live".into()
    }
}

/// The pstree fields of a process in both images; for a zombie on either
/// side, nothing more is compared.
fn diff_entry(eo: &PstreeEntry, en: &PstreeEntry) -> TaskDiff<'static> {
    let mut fields = Vec::new();
    push_change(&mut fields, "ppid", &eo.ppid, &en.ppid);
    push_change(&mut fields, "pgid", &eo.pgid, &en.pgid);
    push_change(&mut fields, "sid", &eo.sid, &en.sid);
    push_change(&mut fields, "threads", &eo.threads, &en.threads);
    push_change(&mut fields, "cmdline", &eo.cmdline, &en.cmdline);
    push_change(&mut fields, "state", &state_text(eo), &state_text(en));
    TaskDiff {
        pid: eo.pid,
        fields,
        maps_added: Vec::new(),
        maps_removed: Vec::new(),
        pairs: Vec::new(),
        pages_elsewhere: 0,
        fds_added: Vec::new(),
        fds_removed: Vec::new(),
        fds_changed: Vec::new(),
        regs: Vec::new(),
    }
}

fn diff_task<'a>(
    mems: (&mut Memory<'_>, &mut Memory<'_>),
    imgs: (&'a LoadedImage, &'a LoadedImage),
    idx: (usize, usize),
) -> anyhow::Result<TaskDiff<'a>> {
    let (old, new) = (&imgs.0.tasks[idx.0], &imgs.1.tasks[idx.1]);
    let (eo, en) = (&old.entry, &new.entry);
    let mut fields = diff_entry(eo, en).fields;
    push_change(&mut fields, "exe", &old.mm.exe_path, &new.mm.exe_path);
    push_change(&mut fields, "brk", &hex(old.mm.brk), &hex(new.mm.brk));

    let (mut pairs, maps_added, maps_removed) = pair_mappings(&old.mm.vmas, &new.mm.vmas);
    let pages_elsewhere = compare_pages(mems, idx, &mut pairs)?;

    let fo: BTreeMap<u32, FdInfo> = old
        .fds
        .iter()
        .map(|f| (f.fd, FdInfo::new(f, &imgs.0.files)))
        .collect();
    let mut fnew: BTreeMap<u32, FdInfo> = new
        .fds
        .iter()
        .map(|f| (f.fd, FdInfo::new(f, &imgs.1.files)))
        .collect();
    let mut fds_removed = Vec::new();
    let mut fds_changed = Vec::new();
    for (fd, o) in fo {
        match fnew.remove(&fd) {
            None => fds_removed.push(o),
            Some(n) => {
                let mut ch = Vec::new();
                push_change(&mut ch, "kind", &o.kind, &n.kind);
                push_change(&mut ch, "path", &o.path, &n.path);
                push_change(&mut ch, "flags", &o.flags, &n.flags);
                push_change(&mut ch, "offset", &o.pos, &n.pos);
                push_change(&mut ch, "cloexec", &o.cloexec, &n.cloexec);
                if !ch.is_empty() {
                    fds_changed.push((fd, ch));
                }
            }
        }
    }
    let fds_added = fnew.into_values().collect();

    let new_cores: HashMap<u32, _> = new.cores.iter().map(|(t, c)| (*t, c)).collect();
    let regs = old
        .cores
        .iter()
        .filter_map(|(tid, c)| {
            let n = new_cores.get(tid)?;
            let (ro, rn) = (c.regs.unwrap_or_default(), n.regs.unwrap_or_default());
            (ro.rip != rn.rip || ro.rsp != rn.rsp).then_some(RegChange {
                tid: *tid,
                rip: (ro.rip, rn.rip),
                rsp: (ro.rsp, rn.rsp),
            })
        })
        .collect();

    Ok(TaskDiff {
        pid: eo.pid,
        fields,
        maps_added,
        maps_removed,
        pairs,
        pages_elsewhere,
        fds_added,
        fds_removed,
        fds_changed,
        regs,
    })
}

fn task_summary(img: &LoadedImage, e: &PstreeEntry) -> Value {
    let exe = img
        .task_index(e.pid)
        .map(|i| img.tasks[i].mm.exe_path.clone());
    let mut v = json!({
        "pid": e.pid,
        "ppid": e.ppid,
        "cmdline": e.cmdline,
        "exe": exe,
        "zombie": e.zombie,
    });
    if e.zombie {
        let st = load::WaitStatus::of(e.exit_status);
        v["exit_status"] = e.exit_status.into();
        v["exit"] = st.json();
    }
    v
}

fn task_line(e: &PstreeEntry) -> String {
    let state = if e.zombie {
        format!(" <{}>", state_text(e))
    } else {
        String::new()
    };
    format!("task {}{state} ({})", e.pid, e.cmdline.join(" "))
}

fn task_json(d: &TaskDiff<'_>) -> Value {
    let pages: Vec<Value> = d
        .pairs
        .iter()
        .filter(|p| p.pages.differ() > 0)
        .map(|p| {
            let mut m = map_json(p.new);
            m["differ"] = p.pages.differ().into();
            m["changed"] = p.pages.changed.into();
            m["only_old"] = p.pages.only_old.into();
            m["only_new"] = p.pages.only_new.into();
            m
        })
        .collect();
    json!({
        "pid": d.pid,
        "changed": Change::json(&d.fields),
        "mappings": {
            "added": d.maps_added.iter().map(|v| map_json(v)).collect::<Vec<_>>(),
            "removed": d.maps_removed.iter().map(|v| map_json(v)).collect::<Vec<_>>(),
            "changed": d.maps_changed().map(|p| json!({
                "old": map_json(p.old),
                "new": map_json(p.new),
                "changes": Change::json(&p.changes),
            })).collect::<Vec<_>>(),
        },
        "pages": {
            "mappings": pages,
            "in_added_or_removed_mappings": d.pages_elsewhere,
            "total": d.pages_total(),
        },
        "fds": {
            "added": d.fds_added.iter().map(FdInfo::json).collect::<Vec<_>>(),
            "removed": d.fds_removed.iter().map(FdInfo::json).collect::<Vec<_>>(),
            "changed": d.fds_changed.iter().map(|(fd, ch)| json!({
                "fd": fd,
                "changes": Change::json(ch),
            })).collect::<Vec<_>>(),
        },
        "registers": d.regs.iter().map(|r| json!({
            "tid": r.tid,
            "rip": { "old": hex(r.rip.0), "new": hex(r.rip.1) },
            "rsp": { "old": hex(r.rsp.0), "new": hex(r.rsp.1) },
        })).collect::<Vec<_>>(),
    })
}

fn task_text(s: &mut String, d: &TaskDiff<'_>) {
    if d.is_empty() {
        let _ = writeln!(s, "task {}: no changes", d.pid);
        return;
    }
    let _ = writeln!(s, "task {}:", d.pid);
    for c in &d.fields {
        let _ = writeln!(s, "  {}", c.text());
    }
    let changed: Vec<&MapPair<'_>> = d.maps_changed().collect();
    let _ = writeln!(
        s,
        "  mappings: {} added, {} removed, {} changed",
        d.maps_added.len(),
        d.maps_removed.len(),
        changed.len()
    );
    for v in &d.maps_added {
        let _ = writeln!(s, "    + {}", map_text(v));
    }
    for v in &d.maps_removed {
        let _ = writeln!(s, "    - {}", map_text(v));
    }
    for p in &changed {
        let what: Vec<String> = p.changes.iter().map(Change::text).collect();
        let _ = writeln!(s, "    ~ {}: {}", map_text(p.new), what.join(", "));
    }
    let _ = writeln!(s, "  pages differing:");
    for p in d.pairs.iter().filter(|p| p.pages.differ() > 0) {
        let c = p.pages;
        let _ = writeln!(
            s,
            "    {:<60} {:>8} ({} changed, {} only in old, {} only in new)",
            map_text(p.new),
            c.differ(),
            c.changed,
            c.only_old,
            c.only_new
        );
    }
    if d.pages_elsewhere > 0 {
        let _ = writeln!(
            s,
            "    {:<60} {:>8}",
            "in added or removed mappings", d.pages_elsewhere
        );
    }
    let _ = writeln!(s, "    {:<60} {:>8}", "total", d.pages_total());
    if !d.fds_added.is_empty() || !d.fds_removed.is_empty() || !d.fds_changed.is_empty() {
        let _ = writeln!(
            s,
            "  descriptors: {} added, {} removed, {} changed",
            d.fds_added.len(),
            d.fds_removed.len(),
            d.fds_changed.len()
        );
        for f in &d.fds_added {
            let _ = writeln!(s, "    + {}", f.text());
        }
        for f in &d.fds_removed {
            let _ = writeln!(s, "    - {}", f.text());
        }
        for (fd, ch) in &d.fds_changed {
            let what: Vec<String> = ch.iter().map(Change::text).collect();
            let _ = writeln!(s, "    ~ fd {fd}: {}", what.join(", "));
        }
    }
    for r in &d.regs {
        let _ = writeln!(
            s,
            "  registers: thread {}: rip {:#x} -> {:#x}, rsp {:#x} -> {:#x}",
            r.tid, r.rip.0, r.rip.1, r.rsp.0, r.rsp.1
        );
    }
}

pub fn run(dir1: &Path, dir2: &Path, json_out: bool) -> anyhow::Result<i32> {
    let a = load_image(dir1).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let b = load_image(dir2).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let pids_b: BTreeSet<u32> = b.pstree.iter().map(|e| e.pid).collect();
    let pids_a: BTreeSet<u32> = a.pstree.iter().map(|e| e.pid).collect();
    let removed: Vec<&PstreeEntry> = a
        .pstree
        .iter()
        .filter(|e| !pids_b.contains(&e.pid))
        .collect();
    let added: Vec<&PstreeEntry> = b
        .pstree
        .iter()
        .filter(|e| !pids_a.contains(&e.pid))
        .collect();
    let mut ma = Memory::new(&a);
    let mut mb = Memory::new(&b);
    let mut diffs = Vec::new();
    for eo in &a.pstree {
        let Some(en) = b.pstree.iter().find(|n| n.pid == eo.pid) else {
            continue;
        };
        match (a.task_index(eo.pid), b.task_index(en.pid)) {
            (Some(i), Some(j)) if !eo.zombie && !en.zombie => {
                diffs.push(diff_task((&mut ma, &mut mb), (&a, &b), (i, j))?);
            }
            _ => diffs.push(diff_entry(eo, en)),
        }
    }
    let identical = added.is_empty() && removed.is_empty() && diffs.iter().all(|d| d.is_empty());
    if json_out {
        let v = json!({
            "old": dir1.display().to_string(),
            "new": dir2.display().to_string(),
            "identical": identical,
            "tasks_added": added.iter().map(|e| task_summary(&b, e)).collect::<Vec<_>>(),
            "tasks_removed": removed.iter().map(|e| task_summary(&a, e)).collect::<Vec<_>>(),
            "tasks": diffs.iter().map(task_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let mut s = String::new();
    let _ = writeln!(s, "--- {}\n+++ {}", dir1.display(), dir2.display());
    let _ = writeln!(
        s,
        "tasks: {} in both, {} added, {} removed",
        diffs.len(),
        added.len(),
        removed.len()
    );
    for e in &added {
        let _ = writeln!(s, "+ {}", task_line(e));
    }
    for e in &removed {
        let _ = writeln!(s, "- {}", task_line(e));
    }
    for d in &diffs {
        task_text(&mut s, d);
    }
    if identical {
        let _ = writeln!(s, "no differences");
    }
    print!("{s}");
    Ok(0)
}
