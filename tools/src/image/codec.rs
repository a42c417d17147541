//! `cryo image decode` and `cryo image encode`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use cryo_image::json::{read_kind, Codec};
use cryo_image::{Kind, PAGES_HEADER_LEN};
use serde_json::json;

use super::load;

/// The error's message (which already includes its cause) as one anyhow
/// error, so that `{:#}` does not print the cause twice.
fn flat(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Prints `file` as JSON.
pub fn decode(file: &Path) -> anyhow::Result<i32> {
    let kind = read_kind(file).map_err(flat)?;
    let doc = if kind == Kind::Pages {
        pages_summary(file)?
    } else {
        Codec::new()
            .map_err(flat)?
            .file_to_json(file)
            .map_err(flat)?
    };
    let mut out = serde_json::to_string_pretty(&doc)?;
    out.push('\n');
    std::io::stdout()
        .lock()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(0)
}

/// Reads decode's JSON from stdin and writes the binary file.
pub fn encode(output: Option<&Path>) -> anyhow::Result<i32> {
    let codec = Codec::new().map_err(flat)?;
    let bytes = codec
        .read_json_to_file(Path::new("<stdin>"), &mut std::io::stdin().lock())
        .map_err(flat)?;
    match output {
        Some(path) => std::fs::write(path, &bytes)
            .with_context(|| format!("{}: cannot write", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|()| out.flush())
                .context("writing to stdout")?;
        }
    }
    Ok(0)
}

/// A pages file: header, size and, when the sibling pagemap can be read,
/// its chunk count and pages. The pages themselves are not printed.
fn pages_summary(file: &Path) -> anyhow::Result<serde_json::Value> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("{}: stat failed", file.display()))?
        .len();
    // read_kind checked the magic; the rest of the header is zero padding.
    let header_ok = size >= PAGES_HEADER_LEN && {
        let mut header = vec![0u8; PAGES_HEADER_LEN as usize];
        let mut f = std::fs::File::open(file)
            .with_context(|| format!("{}: cannot open", file.display()))?;
        f.read_exact(&mut header)
            .with_context(|| format!("{}: cannot read the header", file.display()))?;
        header[8..].iter().all(|&b| b == 0)
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = file.parent().unwrap_or(Path::new(""));
    let mut doc = json!({
        "kind": "pages",
        "file": name,
        "header_ok": header_ok,
        "size": size,
        "data_bytes": size.saturating_sub(PAGES_HEADER_LEN),
    });
    let pagemap = match cryo_image::parse_file_name(&name) {
        Some((Kind::Pages, Some(pid))) => {
            let pm_name = cryo_image::pagemap_file(pid);
            match load::read_pagemap(dir, &pm_name) {
                Ok(Some(pm)) => json!({
                    "file": pm_name,
                    "pages_file": pm.head.pages_file,
                    "compression": load::compression_name(pm.head.compression),
                    "total_pages": pm.head.total_pages,
                    "runs": pm.runs.len(),
                    "stored_run_pages": pm.stored_pages(),
                    "in_parent_runs": pm.runs.iter().filter(|r| load::in_parent(r)).count(),
                    "in_parent_pages": pm.parent_pages(),
                    "chunks": pm.chunks.len(),
                    "chunk_pages": pm.chunk_pages(),
                    "stored_bytes": pm.chunks.iter().map(|c| u64::from(c.stored_len)).sum::<u64>(),
                }),
                Ok(None) => json!({ "file": pm_name, "error": "no head record" }),
                Err(e) => json!({ "file": pm_name, "error": e.to_string() }),
            }
        }
        _ => serde_json::Value::Null,
    };
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("pagemap".into(), pagemap);
    }
    Ok(doc)
}
