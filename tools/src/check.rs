//! `cryo check`: probe the running kernel for the features cryo uses.

use cryo_engine::kerndat::{self, Feature};

/// Features without which cryo cannot dump or restore at all.
pub const REQUIRED: &[&str] = &[
    "ptrace-seize",
    "ptrace-getsigmask",
    "ptrace-xstate",
    "clone3-set-tid",
    "pr-set-mm-map",
    "vmsplice",
    "memfd-create",
];

/// Probe the kernel and print the result, as text or (with `json`) as a JSON
/// array. Returns the process exit code: 0 when every required feature is
/// present, 1 otherwise. Missing optional features do not fail.
pub fn run(json: bool) -> anyhow::Result<i32> {
    let features = kerndat::probe();
    let missing_required = missing(&features);

    if json {
        let arr: Vec<serde_json::Value> = features
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name,
                    "present": f.present,
                    "detail": f.detail,
                    "missing_cost": f.missing_cost,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
    } else {
        for f in &features {
            println!("{}", format_line(f));
        }
        if missing_required.is_empty() {
            println!("Looks good.");
        } else {
            println!("Missing required features: {}", missing_required.join(", "));
        }
    }
    Ok(if missing_required.is_empty() { 0 } else { 1 })
}

fn format_line(f: &Feature) -> String {
    if f.present {
        format!("  ok      {:<20} ({})", f.name, f.detail)
    } else {
        let req = if REQUIRED.contains(&f.name) {
            " [required]"
        } else {
            ""
        };
        format!(
            "  MISSING {:<20} -- {}{req} ({})",
            f.name, f.missing_cost, f.detail
        )
    }
}

/// The required features `features` lacks.
pub fn missing(features: &[kerndat::Feature]) -> Vec<&'static str> {
    REQUIRED
        .iter()
        .copied()
        .filter(|name| !features.iter().any(|f| f.name == *name && f.present))
        .collect()
}
