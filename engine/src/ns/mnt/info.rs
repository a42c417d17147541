//! /proc/PID/mountinfo, parsed: one [`Mount`] per line, in the kernel's
//! order.

#![forbid(unsafe_code)]

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u32,
    pub parent: u32,
    /// The filesystem's device (major:minor), the same for every mount of
    /// one superblock.
    pub dev: (u32, u32),
    /// The directory of the filesystem the mount shows.
    pub root: String,
    pub mountpoint: String,
    /// The mount's own options (rw, nosuid, relatime, ...).
    pub options: String,
    pub shared: u32,
    pub master: u32,
    pub unbindable: bool,
    pub fstype: String,
    pub source: String,
    pub fs_options: String,
}

impl Mount {
    /// The mount's own flags as MS_* bits, from its options.
    pub fn flags(&self) -> u64 {
        let mut f = 0u64;
        for o in self.options.split(',') {
            f |= match o {
                "ro" => libc::MS_RDONLY,
                "nosuid" => libc::MS_NOSUID,
                "nodev" => libc::MS_NODEV,
                "noexec" => libc::MS_NOEXEC,
                "noatime" => libc::MS_NOATIME,
                "nodiratime" => libc::MS_NODIRATIME,
                "relatime" => libc::MS_RELATIME,
                "strictatime" => libc::MS_STRICTATIME,
                "nosymfollow" => MS_NOSYMFOLLOW,
                _ => 0,
            };
        }
        f
    }
}

/// MS_NOSYMFOLLOW (not in libc for every target).
pub const MS_NOSYMFOLLOW: u64 = 256;

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line; None if it is not a mountinfo line.
pub fn parse_line(line: &str) -> Option<Mount> {
    let (head, tail) = line.split_once(" - ")?;
    let mut h = head.split(' ');
    let id = h.next()?.parse().ok()?;
    let parent = h.next()?.parse().ok()?;
    let (maj, min) = h.next()?.split_once(':')?;
    let dev = (maj.parse().ok()?, min.parse().ok()?);
    let root = unescape(h.next()?);
    let mountpoint = unescape(h.next()?);
    let options = h.next()?.to_string();
    let (mut shared, mut master, mut unbindable) = (0, 0, false);
    for tag in h {
        if let Some(n) = tag.strip_prefix("shared:") {
            shared = n.parse().ok()?;
        } else if let Some(n) = tag.strip_prefix("master:") {
            master = n.parse().ok()?;
        } else if tag == "unbindable" {
            unbindable = true;
        }
    }
    let mut t = tail.splitn(3, ' ');
    let fstype = t.next()?.to_string();
    let source = unescape(t.next()?);
    let fs_options = t.next().unwrap_or("").to_string();
    Some(Mount {
        id,
        parent,
        dev,
        root,
        mountpoint,
        options,
        shared,
        master,
        unbindable,
        fstype,
        source,
        fs_options,
    })
}

/// Every mount of the text of a mountinfo file.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// /proc/PID/mountinfo (`pid`: a pid or "self"), parsed.
pub fn read(pid: &str) -> std::io::Result<Vec<Mount>> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).map(|t| parse(&t))
}

/// `path` below `dir` (both absolute, or both roots of a filesystem): the
/// rest of it, "" for `dir` itself; None if it is not below.
pub fn below<'a>(path: &'a str, dir: &str) -> Option<&'a str> {
    if dir == "/" {
        return Some(path.trim_start_matches('/'));
    }
    let rest = path.strip_prefix(dir)?;
    match rest.strip_prefix('/') {
        Some(r) => Some(r),
        None if rest.is_empty() => Some(""),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_tags_and_escapes() {
        let m = parse_line(
            "66 46 0:40 /a\\040b /tmp/x\\040y rw,nosuid,relatime shared:3 master:1 - tmpfs none rw,size=1024k,mode=755",
        )
        .unwrap();
        assert_eq!((m.id, m.parent, m.dev), (66, 46, (0, 40)));
        assert_eq!(m.root, "/a b");
        assert_eq!(m.mountpoint, "/tmp/x y");
        assert_eq!((m.shared, m.master, m.unbindable), (3, 1, false));
        assert_eq!(m.fstype, "tmpfs");
        assert_eq!(m.source, "none");
        assert_eq!(m.fs_options, "rw,size=1024k,mode=755");
        assert_eq!(m.flags(), libc::MS_NOSUID | libc::MS_RELATIME);
        let u = parse_line("70 66 0:41 / /u ro unbindable - proc proc rw").unwrap();
        assert!(u.unbindable);
        assert_eq!(u.flags(), libc::MS_RDONLY);
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\"), r"/end\");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("1 2 x / / rw - a b c").is_none());
    }

    #[test]
    fn below_dirs() {
        assert_eq!(below("/a/b", "/a"), Some("b"));
        assert_eq!(below("/a", "/a"), Some(""));
        assert_eq!(below("/ab", "/a"), None);
        assert_eq!(below("/x/y", "/"), Some("x/y"));
        assert_eq!(below("/", "/"), Some(""));
    }
}
