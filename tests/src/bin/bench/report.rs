//! The benchmark's report: medians of the runs, the table of cryo against
//! the baselines (and CRIU's reference figures).

use super::*;

// ---------------------------------------------------------------------------
// Report.

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians (and min, max) over the runs of every figure present in all runs.
fn summarize(runs: &[Figures]) -> BTreeMap<String, (f64, f64, f64)> {
    let mut out = BTreeMap::new();
    let Some(first) = runs.first() else {
        return out;
    };
    for k in first.keys() {
        let mut v: Vec<f64> = runs.iter().filter_map(|f| f.get(k).copied()).collect();
        if v.len() != runs.len() {
            continue;
        }
        let m = median(&mut v);
        out.insert(k.clone(), (m, v[0], v[v.len() - 1]));
    }
    out
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1} ms"))
        .unwrap_or_else(|| "n/a".into())
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1} MiB", mib_of(x)))
        .unwrap_or_else(|| "n/a".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// cryo against a reference range (lo, hi): "a/hi - a/lo".
fn ratio_range(a: Option<f64>, r: (f64, f64)) -> String {
    match a {
        Some(a) => format!("{:.2}-{:.2}x", a / r.1, a / r.0),
        None => "n/a".into(),
    }
}

struct Row {
    name: String,
    cryo: String,
    base: String,
    base_ratio: String,
    criu: String,
    criu_ratio: String,
}

fn print_table(rows: &[Row]) {
    let head = Row {
        name: "figure".into(),
        cryo: "cryo".into(),
        base: "baseline".into(),
        base_ratio: "cryo/base".into(),
        criu: "CRIU 4.2".into(),
        criu_ratio: "cryo/CRIU".into(),
    };
    let all: Vec<&Row> = std::iter::once(&head).chain(rows).collect();
    let w = |f: fn(&Row) -> &String| all.iter().map(|r| f(r).len()).max().unwrap_or(0);
    let w0 = w(|r| &r.name);
    let w1 = w(|r| &r.cryo);
    let w2 = w(|r| &r.base);
    let w3 = w(|r| &r.base_ratio);
    let w4 = w(|r| &r.criu);
    let w5 = w(|r| &r.criu_ratio);
    let line = |r: &Row| {
        println!(
            "| {:<w0$} | {:>w1$} | {:>w2$} | {:>w3$} | {:>w4$} | {:>w5$} |",
            r.name, r.cryo, r.base, r.base_ratio, r.criu, r.criu_ratio
        )
    };
    line(&head);
    println!(
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(w0 + 2),
        "-".repeat(w1 + 2),
        "-".repeat(w2 + 2),
        "-".repeat(w3 + 2),
        "-".repeat(w4 + 2),
        "-".repeat(w5 + 2)
    );
    for r in rows {
        line(r);
    }
}

pub(super) fn report(opts: &Opts, runs: &[Figures]) {
    let s = summarize(runs);
    let g = |k: &str| s.get(k).map(|v| v.0);
    let criu_ok = opts.mib == CRIU_REF_MIB;
    let raw = (opts.mib * MIB) as f64;
    let criu = |text: String, r: String| -> (String, String) {
        if criu_ok {
            (text, r)
        } else {
            (text, "n/a*".into())
        }
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, cryo: String, base: String, br: String, c: (String, String)| {
        rows.push(Row {
            name: name.into(),
            cryo,
            base,
            base_ratio: br,
            criu: c.0,
            criu_ratio: c.1,
        })
    };
    let base_write = g("base.write_ms");
    let base_read = g("base.read_ms");
    for label in ["zstd", "fast", "none"] {
        let dump = g(&format!("{label}.dump_ms"));
        let rest = g(&format!("{label}.restore_ms"));
        let img = g(&format!("{label}.image_bytes"));
        row(
            &format!("dump time, {label} (kill)"),
            fmt_ms(dump),
            format!("{} (write)", fmt_ms(base_write)),
            ratio(dump, base_write),
            criu(
                format!("{CRIU_DUMP_MS:.0} ms"),
                ratio(dump, Some(CRIU_DUMP_MS)),
            ),
        );
        row(
            &format!("restore time, {label}"),
            fmt_ms(rest),
            format!("{} (read)", fmt_ms(base_read)),
            ratio(rest, base_read),
            criu(
                format!(
                    "{:.1}-{:.1} s",
                    CRIU_RESTORE_MS.0 / 1e3,
                    CRIU_RESTORE_MS.1 / 1e3
                ),
                ratio_range(rest, CRIU_RESTORE_MS),
            ),
        );
        row(
            &format!("image size, {label}"),
            fmt_mib(img),
            format!("{} (raw)", fmt_mib(Some(raw))),
            ratio(img, Some(raw)),
            criu(
                format!("{CRIU_IMAGE_MIB:.0} MiB"),
                ratio(img, Some(CRIU_IMAGE_MIB * MIB as f64)),
            ),
        );
    }
    let base_copy = g("base.copy_ms");
    let frozen = g("r.frozen_ms");
    row(
        "task stopped, dump -R zstd",
        fmt_ms(frozen),
        format!("{} (memcpy)", fmt_ms(base_copy)),
        ratio(frozen, base_copy),
        criu(
            format!("{:.0}-{:.0} ms", CRIU_STOPPED_MS.0, CRIU_STOPPED_MS.1),
            ratio_range(frozen, CRIU_STOPPED_MS),
        ),
    );
    let rdump = g("r.dump_ms");
    row(
        "dump time, zstd (-R)",
        fmt_ms(rdump),
        format!("{} (write)", fmt_ms(base_write)),
        ratio(rdump, base_write),
        ("-".into(), "-".into()),
    );
    let pfrozen = g("pre.frozen_ms");
    row(
        "task stopped, --pre-copy (kill)",
        fmt_ms(pfrozen),
        format!("{} (memcpy)", fmt_ms(base_copy)),
        ratio(pfrozen, base_copy),
        criu(
            format!("{CRIU_DUMP_MS:.0} ms (dump)"),
            ratio(pfrozen, Some(CRIU_DUMP_MS)),
        ),
    );
    let pdump = g("pre.dump_ms");
    row(
        "dump time, --pre-copy (kill)",
        fmt_ms(pdump),
        format!("{} (write)", fmt_ms(base_write)),
        ratio(pdump, base_write),
        ("-".into(), "-".into()),
    );

    let tcp = g("base.tcp_ms");
    for (name, key) in [
        ("migration stop time (migrate)", "mig.stop_ms"),
        ("migration total time (migrate)", "mig.total_ms"),
    ] {
        let v = g(key);
        row(
            name,
            fmt_ms(v),
            format!("{} (tcp copy)", fmt_ms(tcp)),
            ratio(v, tcp),
            ("-".into(), "-".into()),
        );
    }
    let sent = g("mig.bytes");
    row(
        "migration bytes sent",
        fmt_mib(sent),
        format!("{} (raw)", fmt_mib(Some(raw))),
        ratio(sent, Some(raw)),
        ("-".into(), "-".into()),
    );

    println!();
    println!(
        "results ({} MiB, {}{}):",
        opts.mib,
        if runs.len() > 1 {
            format!("median of {} runs", runs.len())
        } else {
            "1 run".into()
        },
        if CACHES_OK.load(Ordering::SeqCst) {
            ""
        } else {
            ", page cache NOT dropped"
        }
    );
    print_table(&rows);
    println!();
    if !criu_ok {
        println!(
            "* the CRIU reference numbers were measured with {CRIU_REF_MIB} MiB; no ratio for {} MiB",
            opts.mib
        );
    }
    println!("baselines: write = write(2) of the same bytes to a file next to the images + close, no fsync;");
    println!("           read = read back into fresh memory after sync + drop_caches; memcpy = copy into fresh memory.");
    println!("cryo times are wall times of the cryo command; restore after sync + drop_caches; 'task stopped' is cryo's frozen_ms.");
    let zero_expect = opts.mib * MIB / 4 / PAGE;
    for k in ["zstd", "fast", "none"] {
        let (zp, ps, fr, tot) = (
            g(&format!("{k}.zero_pages")),
            g(&format!("{k}.pages_stored")),
            g(&format!("{k}.frozen_ms")),
            g(&format!("{k}.total_ms")),
        );
        let n = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "n/a".into());
        println!(
            "{k:>4} dump: zero pages skipped {} (the workload has {zero_expect}), pages stored {}, \
             stopped {} in kill mode, cryo's own total {}",
            n(zp),
            n(ps),
            fmt_ms(fr),
            fmt_ms(tot)
        );
    }
    super::container::report(&g);
    let zimg = g("zstd.image_bytes");
    println!(
        "compression ratio ({} MiB / zstd image): {}; none image / raw: {}",
        opts.mib,
        ratio(Some(raw), zimg),
        ratio(g("none.image_bytes"), Some(raw))
    );
    if runs.len() > 1 {
        println!("spread over {} runs (min - max):", runs.len());
        for (k, (_, lo, hi)) in &s {
            if k.ends_with("_ms") {
                println!("  {k:<18} {lo:>9.1} - {hi:>9.1} ms");
            } else if k.ends_with("bytes") {
                println!("  {k:<18} {:>9.1} - {:>9.1} MiB", mib_of(*lo), mib_of(*hi));
            }
        }
    }
}
