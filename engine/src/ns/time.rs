//! Time namespaces: the offsets of CLOCK_MONOTONIC and CLOCK_BOOTTIME.
//!
//! Dump: the offsets (/proc/PID/timens_offsets of a task whose children's
//! time namespace is its own) and the host's clocks at that moment. The
//! restore makes the namespace in its first task with offsets that carry
//! both clocks on from where they were at the dump: the dumped offset
//! less the time the host's clock moved since (so they never jump back,
//! even after a reboot, and stand still while the tree was not running).

#![forbid(unsafe_code)]

use cryo_image::proto::TimeState;

/// A /proc/PID/timens_offsets file's (monotonic, boottime) offsets in
/// nanoseconds.
fn parse_offsets(text: &str) -> Option<(i64, i64)> {
    let mut out = (None, None);
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let (clock, sec, nsec) = (f.next()?, f.next()?, f.next()?);
        let v = sec.parse::<i64>().ok()? * 1_000_000_000 + nsec.parse::<i64>().ok()?;
        match clock {
            "monotonic" | "1" => out.0 = Some(v),
            "boottime" | "7" => out.1 = Some(v),
            _ => {}
        }
    }
    Some((out.0?, out.1?))
}

fn offsets(pid: &str) -> Result<(i64, i64), String> {
    let path = format!("/proc/{pid}/timens_offsets");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    parse_offsets(&text).ok_or_else(|| format!("{path}: unexpected contents {text:?}"))
}

/// The host's clocks (cryo's, less its own namespace's offsets).
fn host_clocks() -> Result<(i64, i64), String> {
    let (m, b) = crate::sys::ns::clocks_ns().map_err(|e| format!("clock_gettime: {e}"))?;
    let (om, ob) = offsets("self")?;
    Ok((m - om, b - ob))
}

/// The time namespace of `pid` (whose children's is the same).
pub fn dump(pid: i32) -> Result<TimeState, String> {
    let (monotonic_offset_ns, boottime_offset_ns) = offsets(&pid.to_string())?;
    let (dumped_monotonic_ns, dumped_boottime_ns) = host_clocks()?;
    Ok(TimeState {
        monotonic_offset_ns,
        boottime_offset_ns,
        dumped_monotonic_ns,
        dumped_boottime_ns,
    })
}

/// This task in a new time namespace whose clocks go on from the dump's.
pub fn restore(st: Option<&TimeState>) -> Result<(), String> {
    let (mono, boot) = offsets_now(st)?;
    crate::sys::ns::new_time(mono, boot).map_err(|e| {
        format!(
            "unshare(CLONE_NEWTIME), offsets monotonic {mono} ns, boottime {boot} ns, setns: {e}"
        )
    })
}

/// The offsets a namespace made now takes, so that its clocks go on from
/// the dump's: the dumped offsets, less the host's clocks' advance since.
pub fn offsets_now(st: Option<&TimeState>) -> Result<(i64, i64), String> {
    let st = st.ok_or("its offsets are not in the image")?;
    let (m, b) = host_clocks()?;
    Ok((
        st.monotonic_offset_ns + (st.dumped_monotonic_ns - m),
        st.boottime_offset_ns + (st.dumped_boottime_ns - b),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_file() {
        let text = "monotonic        1000         5\nboottime           -2 999999999\n";
        assert_eq!(
            parse_offsets(text),
            Some((1_000_000_000_005, -1_000_000_001))
        );
        assert_eq!(parse_offsets("monotonic 0 0\n"), None);
    }
}
