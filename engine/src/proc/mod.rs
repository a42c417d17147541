//! Pure parsers of /proc text, tested on fixture strings.

#![forbid(unsafe_code)]

use std::collections::HashMap;

/// The fields of /proc/PID/stat cryo uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub num_threads: u64,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// The signal the parent gets when this task ends (field 38).
    pub exit_signal: u32,
    /// The controlling terminal (field 7, the kernel's old dev_t encoding).
    pub tty_nr: u32,
    /// The foreground process group of that terminal (field 8).
    pub tpgid: i32,
    /// A zombie's wait status (field 52; 0 for live tasks).
    pub exit_code: u32,
}

impl Stat {
    /// The controlling terminal as a device number (0: none), decoded
    /// from `tty_nr` (minor in bits 31-20 and 7-0, major in 15-8).
    pub fn ctty(&self) -> u64 {
        if self.tty_nr == 0 {
            return 0;
        }
        let major = (self.tty_nr >> 8) & 0xfff;
        let minor = (self.tty_nr & 0xff) | ((self.tty_nr >> 12) & 0xfff00);
        libc::makedev(major, minor)
    }
}

/// Parse /proc/PID/stat. The command name may contain spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state).
    let f = |n: usize| -> u64 { rest.get(n - 3).and_then(|s| s.parse().ok()).unwrap_or(0) };
    Some(Stat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: f(4) as u32,
        pgid: f(5) as u32,
        sid: f(6) as u32,
        num_threads: f(20),
        start_code: f(26),
        end_code: f(27),
        start_stack: f(28),
        start_data: f(45),
        end_data: f(46),
        start_brk: f(47),
        arg_start: f(48),
        arg_end: f(49),
        env_start: f(50),
        env_end: f(51),
        exit_signal: f(38) as u32,
        tty_nr: f(7) as u32,
        tpgid: rest.get(5).and_then(|s| s.parse().ok()).unwrap_or(-1),
        exit_code: f(52) as u32,
    })
}

/// Parse "Key:\tvalue" lines of /proc/PID/status.
pub fn parse_status(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Numbers of a whitespace-separated status value ("0\t0\t0\t0").
pub fn status_numbers(v: &str) -> Vec<u32> {
    v.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A hexadecimal status value (SigBlk, CapEff, ...).
pub fn status_hex(v: &str) -> u64 {
    u64::from_str_radix(v.trim(), 16).unwrap_or(0)
}

/// One POSIX timer from /proc/PID/timers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerInfo {
    pub id: i32,
    pub signo: i32,
    pub sigev_value: u64,
    /// sigev_notify value (SIGEV_SIGNAL 0, SIGEV_NONE 1, SIGEV_THREAD 2,
    /// plus SIGEV_THREAD_ID 4 when aimed at a thread).
    pub notify: i32,
    pub notify_tid: u32,
    pub clock_id: i32,
}

pub fn parse_timers(text: &str) -> Vec<TimerInfo> {
    let mut out: Vec<TimerInfo> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "ID" => out.push(TimerInfo {
                id: v.parse().unwrap_or(-1),
                ..Default::default()
            }),
            "signal" => {
                if let (Some(t), Some((s, val))) = (out.last_mut(), v.split_once('/')) {
                    t.signo = s.parse().unwrap_or(0);
                    t.sigev_value =
                        u64::from_str_radix(val.trim_start_matches("0x"), 16).unwrap_or(0);
                }
            }
            "notify" => {
                if let (Some(t), Some((kind, target))) = (out.last_mut(), v.split_once('/')) {
                    let base = match kind {
                        "signal" => 0,
                        "none" => 1,
                        "thread" => 2,
                        _ => 0,
                    };
                    let (who, id) = target.split_once('.').unwrap_or(("pid", "0"));
                    t.notify = base | if who == "tid" { 4 } else { 0 };
                    t.notify_tid = id.parse().unwrap_or(0);
                }
            }
            "ClockID" => {
                if let Some(t) = out.last_mut() {
                    t.clock_id = v.parse().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    out
}

/// pos and flags of /proc/PID/fdinfo/FD.
pub fn parse_fdinfo(text: &str) -> (u64, u32) {
    let m = parse_status(text);
    let pos = m.get("pos").and_then(|v| v.parse().ok()).unwrap_or(0);
    let flags = m
        .get("flags")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0);
    (pos, flags)
}

/// The targets of an epoll from its fdinfo: (tfd, events, data, inode).
/// The kernel prints `tfd: %8d events: %8x data: %16llx pos:%lli ino:%lx
/// sdev:%x` (fs/eventpoll.c): a `tfd:` line that does not read so is an
/// error (its text), never a watch silently left out.
pub fn parse_epoll_targets(text: &str) -> Result<Vec<(u32, u32, u64, u64)>, String> {
    let parse = |l: &str| -> Option<(u32, u32, u64, u64)> {
        let w: Vec<&str> = l.split_whitespace().collect();
        let after = |key: &str| {
            w.iter()
                .position(|x| *x == key)
                .and_then(|i| w.get(i + 1))
                .copied()
        };
        let tfd = w.first()?.parse().ok()?;
        let events = u32::from_str_radix(after("events:")?, 16).ok()?;
        let data = u64::from_str_radix(after("data:")?, 16).ok()?;
        let ino = w
            .iter()
            .find_map(|x| x.strip_prefix("ino:"))
            .and_then(|v| u64::from_str_radix(v, 16).ok())?;
        Some((tfd, events, data, ino))
    };
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("tfd:"))
        .map(|l| parse(l).ok_or_else(|| format!("tfd:{l}")))
        .collect()
}

/// A hexadecimal fdinfo value (`eventfd-count: %16llx`, `sigmask:
/// %016llx`), padding allowed.
pub fn fdinfo_hex(v: &str) -> Option<u64> {
    u64::from_str_radix(v.trim(), 16).ok()
}

/// A timerfd fdinfo time, "(SECONDS, NANOSECONDS)", in nanoseconds.
pub fn parse_timespec_pair(v: &str) -> Option<u64> {
    let v = v.trim().strip_prefix('(')?.strip_suffix(')')?;
    let (s, ns) = v.split_once(',')?;
    let s: u64 = s.trim().parse().ok()?;
    let ns: u64 = ns.trim().parse().ok()?;
    Some(s * 1_000_000_000 + ns)
}

/// Soft and hard limits from /proc/PID/limits, in resource order
/// (RLIMIT_CPU = 0 ...). "unlimited" is RLIM_INFINITY. The kernel prints
/// fixed-width columns; their positions come from the header line.
pub fn parse_limits(text: &str) -> Option<Vec<(u64, u64)>> {
    let mut lines = text.lines();
    let header = lines.next()?;
    let soft_at = header.find("Soft Limit")?;
    let hard_at = header.find("Hard Limit")?;
    let value = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let soft = l.get(soft_at..hard_at)?;
            let hard = l.get(hard_at..)?.split_whitespace().next()?;
            Some((value(soft)?, value(hard)?))
        })
        .collect()
}

/// One mapping of /proc/PID/maps or /proc/PID/smaps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapRange {
    pub start: u64,
    pub end: u64,
    /// `rwxp` or `rwxs`.
    pub perms: String,
    pub offset: u64,
    /// Major and minor device number of a mapped file.
    pub dev: (u32, u32),
    pub inode: u64,
    /// The name column, whole (empty for anonymous memory; a file's path
    /// may end in " (deleted)").
    pub name: String,
    /// smaps only: the two-letter names of its VmFlags line.
    pub vm_flags: Vec<String>,
}

/// Parse /proc/PID/maps or smaps into mappings (lines that do not parse
/// are skipped).
pub fn parse_maps(text: &str) -> Vec<MapRange> {
    let mut out: Vec<MapRange> = Vec::new();
    for l in text.lines() {
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if let Some(m) = out.last_mut() {
                m.vm_flags = flags.split_whitespace().map(String::from).collect();
            }
            continue;
        }
        if let Some(m) = parse_map_line(l) {
            out.push(m);
        }
    }
    out
}

/// `START-END PERMS OFFSET MAJOR:MINOR INODE NAME`, NAME what is left
/// after the fifth field (it may hold spaces).
fn parse_map_line(l: &str) -> Option<MapRange> {
    let mut rest = l;
    let mut fields = [""; 5];
    for f in fields.iter_mut() {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let (s, e) = fields[0].split_once('-')?;
    let (major, minor) = fields[3].split_once(':')?;
    Some(MapRange {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms: fields[1].to_string(),
        offset: u64::from_str_radix(fields[2], 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: fields[4].parse().ok()?,
        name: rest.trim_start().to_string(),
        vm_flags: Vec::new(),
    })
}

/// The number a one-value /proc file holds (oom_score_adj, loginuid,
/// timerslack_ns), if it can be read and parsed.
pub fn read_number<T: std::str::FromStr>(path: &str) -> Option<T> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The descriptor numbers of process `pid` (/proc/PID/fd); empty if it
/// cannot be read.
pub fn fd_numbers(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The ranges of /proc/PID/maps (`pid` "self" for this process); empty if
/// it cannot be read.
pub fn read_maps(pid: &str) -> Vec<MapRange> {
    parse_maps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_smaps() {
        let t = "7f00-7f10 rw-s 00002000 00:01 42                         /tmp/a b.dat (deleted)\n\
Size:                 64 kB\n\
VmFlags: rd wr sh mr mw me ms dp \n\
7f20-7f30 rw-p 00000000 00:00 0 \n\
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n";
        let m = parse_maps(t);
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].start, m[0].end, m[0].offset),
            (0x7f00, 0x7f10, 0x2000)
        );
        assert_eq!((m[0].dev, m[0].inode), ((0, 1), 42));
        assert_eq!(m[0].perms, "rw-s");
        assert_eq!(m[0].name, "/tmp/a b.dat (deleted)");
        assert_eq!(m[0].vm_flags.last().map(String::as_str), Some("dp"));
        assert_eq!(m[1].name, "");
        assert!(m[1].vm_flags.is_empty());
        assert_eq!(m[2].name, "[vsyscall]");
    }

    #[test]
    fn epoll_targets() {
        let t = "pos:\t0\nflags:\t02\ntfd:        4 events:       19 data:                4  pos:0 ino:4c96a sdev:f\ntfd:        5 events: 8000001c data:     ffffffffffff  pos:0 ino:4c96b sdev:f\n";
        assert_eq!(
            parse_epoll_targets(t),
            Ok(vec![
                (4, 0x19, 4, 0x4c96a),
                (5, 0x8000_001c, 0xffff_ffff_ffff, 0x4c96b)
            ])
        );
        // As Linux 6.18 prints a data word with every bit set high.
        let t = "tfd:        7 events: 8000001d data: fedcba9876543210  pos:0 ino:21954 sdev:f\n";
        assert_eq!(
            parse_epoll_targets(t),
            Ok(vec![(7, 0x8000_001d, 0xfedc_ba98_7654_3210, 0x21954)])
        );
        // A line the parser cannot read is an error, not a lost watch.
        assert!(parse_epoll_targets("tfd: 7 events: zz data: 1 ino:2\n").is_err());
    }

    #[test]
    fn fdinfo_hex_values() {
        // Linux 6.18: eventfd-count is "%16llx", a count of 42 reads "2a".
        let t = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\neventfd-count:               2a\neventfd-id: 2\neventfd-semaphore: 0\n";
        let m = parse_status(t);
        assert_eq!(m.get("eventfd-count").and_then(|v| fdinfo_hex(v)), Some(42));
        assert_eq!(fdinfo_hex("4000000200000200"), Some(0x4000_0002_0000_0200));
        assert_eq!(fdinfo_hex("fffffffffffffffe"), Some(u64::MAX - 1));
        assert_eq!(fdinfo_hex("g"), None);
        // flags are octal, pos decimal.
        let f = "pos:\t123456789012\nflags:\t02106002\nmnt_id:\t27\n";
        assert_eq!(parse_fdinfo(f), (123_456_789_012, 0o2106002));
    }

    #[test]
    fn timerfd_times() {
        assert_eq!(parse_timespec_pair("(6, 999517986)"), Some(6_999_517_986));
        assert_eq!(parse_timespec_pair(" (0, 0)"), Some(0));
        assert_eq!(parse_timespec_pair("6, 1"), None);
    }

    #[test]
    fn stat_with_odd_comm() {
        let s = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 100 1000 200 18446744073709551615 94000 95000 140000 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 96000 97000 98000 140100 140200 140300 140400 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "a) b (c)");
        assert_eq!(st.state, 'S');
        assert_eq!((st.ppid, st.pgid, st.sid), (1, 1234, 1234));
        assert_eq!(st.num_threads, 1);
        assert_eq!(
            (st.start_code, st.end_code, st.start_stack),
            (94000, 95000, 140000)
        );
        assert_eq!(
            (st.start_data, st.end_data, st.start_brk),
            (96000, 97000, 98000)
        );
        assert_eq!(
            (st.arg_start, st.arg_end, st.env_start, st.env_end),
            (140100, 140200, 140300, 140400)
        );
    }

    #[test]
    fn timers() {
        let t = "ID: 0\nsignal: 39/0000000000001234\nnotify: signal/pid.77\nClockID: 1\nID: 3\nsignal: 14/0000000000000000\nnotify: thread/tid.78\nClockID: 0\n";
        let v = parse_timers(t);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (
                v[0].id,
                v[0].signo,
                v[0].sigev_value,
                v[0].notify,
                v[0].clock_id
            ),
            (0, 39, 0x1234, 0, 1)
        );
        assert_eq!((v[1].id, v[1].notify, v[1].notify_tid), (3, 6, 78));
    }

    #[test]
    fn limits() {
        let t = "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max file size             12345                unlimited            bytes     \n\
Max nice priority         0                    0                    \n";
        let v = parse_limits(t).unwrap();
        assert_eq!(v, vec![(u64::MAX, u64::MAX), (12345, u64::MAX), (0, 0)]);
    }

    #[test]
    fn maps() {
        let m = parse_maps(
            "7f00000000-7f00002000 r--p 00000000 00:00 0 [vvar]\n\
             55aa000-55ab000 rw-p 00000000 00:00 0 \n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].start, m[0].end, m[0].name.as_str()),
            (0x7f00000000, 0x7f00002000, "[vvar]")
        );
        assert_eq!(m[1].name, "");
    }

    #[test]
    fn fdinfo() {
        assert_eq!(
            parse_fdinfo("pos:\t42\nflags:\t0102002\nmnt_id:\t20\n"),
            (42, 0o102002)
        );
    }

    #[test]
    fn status() {
        let m =
            parse_status("Name:\tcat\nUmask:\t0022\nUid:\t0\t1\t2\t3\nSigBlk:\t0000000000010000\n");
        assert_eq!(status_numbers(&m["Uid"]), vec![0, 1, 2, 3]);
        assert_eq!(status_hex(&m["SigBlk"]), 0x10000);
        assert_eq!(m["Umask"], "0022");
    }
}
