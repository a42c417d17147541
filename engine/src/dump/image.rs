//! The image directory of a dump: made for the owner alone, its parent
//! link (an incremental dump), the files written from what was captured
//! and the inventory last; what a failed dump left removed.

#![forbid(unsafe_code)]

use super::*;

/// Make the image directory `dir`: an image holds the tasks' memory, so a
/// directory cryo makes is its owner's alone (0700), like every file in
/// it (0600).
pub(super) fn make_image_dir(dir: &Path) -> Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(|source| DumpError::Dir {
            path: dir.to_path_buf(),
            source,
        })
}

/// The inventory of an image of the tree of `root` made of `files`.
pub(super) fn inventory(
    root: i32,
    files: Vec<cryo_image::ImageFileInfo>,
    leave_running: bool,
    has_parent: bool,
    pre_dump: bool,
) -> Inventory {
    Inventory {
        format_major: cryo_image::FORMAT_MAJOR,
        format_minor: cryo_image::FORMAT_MINOR,
        producer: format!("cryo {}", env!("CARGO_PKG_VERSION")),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        root_pid: root as u32,
        files: files.into_iter().map(Into::into).collect(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        leave_running,
        has_parent,
        pre_dump,
    }
}

/// The parent image must be one (a pre-dump, or a dump).
pub(super) fn check_parent(parent: &Path) -> Result<()> {
    cryo_image::read_inventory(parent)
        .map(drop)
        .map_err(|e| DumpError::Parent {
            parent: parent.to_path_buf(),
            what: e.to_string(),
        })
}

/// The image's `parent` link to the parent image, as the command line
/// named it (a relative one from the image's directory).
pub(super) fn link_parent(opts: &DumpOptions) -> Result<()> {
    let Some(given) = &opts.prev_images_dir else {
        return Ok(());
    };
    let link = opts.dir.join(cryo_image::PARENT_LINK);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(given, &link).map_err(|e| DumpError::Parent {
        parent: given.clone(),
        what: format!("linking {} to it: {e}", link.display()),
    })
}

/// The tree-wide tables of an image, and the files already written for
/// them (a mount namespace's tmpfs files).
pub(super) struct Tables<'a> {
    pub(super) files: &'a [FileEntry],
    pub(super) namespaces: &'a [cryo_image::proto::NamespaceEntry],
    pub(super) cgroups: &'a [cryo_image::proto::CgroupDir],
    pub(super) written: Vec<ImageFileInfo>,
}

/// A tree-wide table file of `records` (a failure point of its own).
pub(super) fn write_table<M: prost::Message>(
    dir: &std::path::Path,
    name: &str,
    kind: Kind,
    records: &[M],
) -> Result<ImageFileInfo> {
    write_step(name)?;
    let mut w = ImageWriter::create(dir, name, kind)?;
    for r in records {
        w.write(r)?;
    }
    Ok(w.finish()?)
}

/// Every process's files, then the tree's tables (pstree.img, files.img)
/// and, last, the inventory that lists them all. Returns the page counts
/// and the image size.
pub(super) fn write_image(
    opts: &DumpOptions,
    root: i32,
    caps: Vec<Captured>,
    tree: &Tree,
    t: Tables,
) -> Result<(TransferStats, u64)> {
    let Tables {
        files,
        namespaces,
        cgroups,
        mut written,
    } = t;
    let mut entries: Vec<PstreeEntry> = Vec::new();
    let mut pstats = TransferStats::default();
    for mut c in caps {
        entries.push(std::mem::take(&mut c.pstree));
        let (files, stats) = capture::write_process(opts, c)?;
        pstats.add(&stats);
        written.extend(files);
    }
    entries.extend(zombie_entries(tree));
    let dir = opts.dir.as_path();
    written.push(write_table(
        dir,
        cryo_image::PSTREE_FILE,
        Kind::Pstree,
        &entries,
    )?);
    written.push(write_table(
        dir,
        cryo_image::FILES_FILE,
        Kind::Files,
        files,
    )?);
    // Written only when there is something in them.
    if !namespaces.is_empty() {
        written.push(write_table(
            dir,
            cryo_image::NAMESPACES_FILE,
            Kind::Namespaces,
            namespaces,
        )?);
    }
    if !cgroups.is_empty() {
        written.push(write_table(
            dir,
            cryo_image::CGROUPS_FILE,
            Kind::Cgroups,
            cgroups,
        )?);
    }
    let image_bytes = written.iter().map(|f| f.size).sum();
    let inv = inventory(
        root,
        written,
        opts.leave_running,
        opts.prev_images_dir.is_some(),
        false,
    );
    write_step("inventory.img")?;
    cryo_image::write_inventory(&opts.dir, &inv)?;
    Ok((pstats, image_bytes))
}

/// Remove image files a failed dump left behind (never the directory, and
/// only files cryo names).
pub fn remove_partial(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if Kind::from_file_name(name).is_some()
                    || name.starts_with("inventory.img")
                    || name.ends_with(".img.tmp")
                    || name == cryo_image::PARENT_LINK
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
