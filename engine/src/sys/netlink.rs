//! Netlink requests and dumps (rtnetlink, nfnetlink): a socket of the
//! calling thread's network namespace, requests answered by an
//! acknowledgement, dumps answered by many messages, and the attributes
//! (type, length, value, nested) they carry. Bytes in host order, as the
//! kernel reads them.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self as nixsock, MsgFlags};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// A message that does not fit is cut at this size (a dump's parts are
/// each well under it).
const BUF: usize = 64 * 1024;

/// A netlink socket of one protocol, bound to the network namespace of
/// the thread that opened it whatever thread uses it later.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// One message of an answer: its type and what follows its header.
pub struct Msg {
    pub ty: u16,
    pub body: Vec<u8>,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

impl Netlink {
    /// A socket of `protocol` (NETLINK_ROUTE, NETLINK_NETFILTER) in this
    /// thread's network namespace.
    pub fn open(protocol: nixsock::SockProtocol) -> io::Result<Netlink> {
        let fd = nixsock::socket(
            nixsock::AddressFamily::Netlink,
            nixsock::SockType::Raw,
            nixsock::SockFlag::SOCK_CLOEXEC,
            protocol,
        )?;
        Ok(Netlink { fd, seq: 0 })
    }

    /// A NETLINK_ROUTE socket of this thread's network namespace.
    pub fn route() -> io::Result<Netlink> {
        Self::open(nixsock::SockProtocol::NetlinkRoute)
    }

    /// A socket of `protocol` in the network namespace open at `ns`,
    /// opened by a thread of ours that enters it.
    pub fn open_in(ns: &OwnedFd, protocol: nixsock::SockProtocol) -> io::Result<Netlink> {
        let ns = ns.try_clone()?;
        super::ns::in_namespace(ns, nix::sched::CloneFlags::CLONE_NEWNET, || {
            Self::open(protocol)
        })
    }

    fn send(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + body.len();
        let mut m = Vec::with_capacity(align(len));
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        nixsock::send(self.fd.as_raw_fd(), &m, MsgFlags::empty())?;
        Ok(self.seq)
    }

    /// Read answers to request `seq` until `f` says it has them all.
    fn answers(&mut self, seq: u32, mut f: impl FnMut(Msg) -> io::Result<bool>) -> io::Result<()> {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = nixsock::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut off = 0usize;
            while off + 16 <= n {
                let word =
                    |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or([0; 4]));
                let len = word(off) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                if len < 16 || off + len > n {
                    return Err(bad("a message longer than what was read"));
                }
                let mine = word(off + 8) == seq;
                let body = &buf[off + 16..off + len];
                off += align(len);
                if !mine {
                    continue;
                }
                let done = match ty {
                    NLMSG_DONE => true,
                    NLMSG_ERROR => {
                        let e = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or([0; 4])))
                            .ok_or_else(|| bad("an error message without its code"))?;
                        if e != 0 {
                            return Err(io::Error::from_raw_os_error(-e));
                        }
                        true
                    }
                    _ => f(Msg {
                        ty,
                        body: body.to_vec(),
                    })?,
                };
                if done {
                    return Ok(());
                }
            }
        }
    }

    /// Send request `ty` with `body` and wait for its acknowledgement.
    pub fn request(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let seq = self.send(ty, flags | NLM_F_ACK, body)?;
        self.answers(seq, |_| Ok(false))
    }

    /// Send request `ty` with `body` and return its one answer (a get
    /// that is not a dump).
    pub fn get(&mut self, ty: u16, body: &[u8]) -> io::Result<Msg> {
        let seq = self.send(ty, 0, body)?;
        let mut out = None;
        self.answers(seq, |m| {
            out = Some(m);
            Ok(true)
        })?;
        out.ok_or_else(|| bad("no answer"))
    }

    /// Send dump request `ty` with `body` and return every message of it.
    pub fn dump(&mut self, ty: u16, body: &[u8]) -> io::Result<Vec<Msg>> {
        let seq = self.send(ty, NLM_F_DUMP, body)?;
        let mut out = Vec::new();
        self.answers(seq, |m| {
            out.push(m);
            Ok(false)
        })?;
        Ok(out)
    }
}

/// The attributes in `b` (after a message's fixed header), as (type
/// without its flag bits, value); a truncated one ends the list.
pub fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & 0x3fff;
        if len < 4 || off + len > b.len() {
            break;
        }
        out.push((ty, &b[off + 4..off + len]));
        off += align(len);
    }
    out
}

/// The value of attribute `ty` among `a`.
pub fn attr<'a>(a: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    a.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

pub fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated string attribute's text.
pub fn str_of(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// A message body being built: a fixed header, then attributes.
#[derive(Default)]
pub struct Builder {
    pub buf: Vec<u8>,
    open: Vec<usize>,
}

impl Builder {
    /// A body starting with the fixed header `head`.
    pub fn new(head: &[u8]) -> Builder {
        let mut b = Builder::default();
        b.raw(head);
        b
    }

    /// Bytes as they are, padded to 4.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    pub fn attr(&mut self, ty: u16, v: &[u8]) -> &mut Self {
        self.buf
            .extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.raw(v)
    }

    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A string attribute, NUL-terminated.
    pub fn str(&mut self, ty: u16, v: &str) -> &mut Self {
        let mut b = v.as_bytes().to_vec();
        b.push(0);
        self.attr(ty, &b)
    }

    /// Start nested attribute `ty`; [`Self::end`] closes it.
    pub fn begin(&mut self, ty: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        if let Some(at) = self.open.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_read_back() {
        let mut b = Builder::new(&[1, 2, 3]);
        b.str(3, "veth0")
            .begin(18)
            .str(1, "veth")
            .end()
            .u32(4, 1500);
        assert_eq!(b.buf.len() % 4, 0);
        let a = attrs(&b.buf[4..]);
        assert_eq!(str_of(attr(&a, 3).unwrap()), "veth0");
        assert_eq!(u32_of(attr(&a, 4).unwrap()), Some(1500));
        let inner = attrs(attr(&a, 18).unwrap());
        assert_eq!(str_of(attr(&inner, 1).unwrap()), "veth");
        // A truncated attribute ends the list instead of reading past it.
        assert_eq!(attrs(&[8, 0, 1, 0, 0]).len(), 0);
    }
}
