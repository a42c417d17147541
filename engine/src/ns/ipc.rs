//! IPC namespaces: their System V objects and limits.
//!
//! Dump: a thread of cryo's enters the namespace and reads its limits
//! (the per-namespace sysctls), then every shared memory segment (its
//! non-zero pages, through a read-only attachment of its own), semaphore
//! set (GETALL) and message queue (each message copied, MSG_COPY, so the
//! queue is left as it was), each with its key, id, owner and mode, as
//! /proc/sysvipc lists them there (the tasks' attachments are their
//! mappings: `VMA_SYSV_SHM`, mapped again from the remade segment's
//! file). POSIX message queues come
//! from the namespace's mqueue filesystem (mounted by the thread in a
//! mount namespace of its own) with their messages (see
//! [`read_mqueues`]).
//!
//! Restore: the first task of the namespace makes it (unshare), sets its
//! limits, and makes each object again with the same id (the
//! namespace's shm_next_id, sem_next_id, msg_next_id), key, owner, mode
//! and contents, before its memory and children, which inherit it.
//!
//! Not kept yet: a POSIX message queue's notification (refused), semaphore
//! undo values (SEM_UNDO), and which process created an object or
//! touched it last (cuid and cgid become root's, cpid and lpid the
//! restore's).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;

use cryo_image::proto::{
    Extent, IpcMsg, IpcMsgQueue, IpcObject, IpcSem, IpcShm, IpcState, PosixMqueue, PosixMsg, Sysctl,
};

use crate::sys::ipc;

/// The limits an IPC namespace has of its own, under /proc/sys.
const SYSCTLS: [&str; 13] = [
    "kernel/shmmax",
    "kernel/shmall",
    "kernel/shmmni",
    "kernel/shm_rmid_forced",
    "kernel/msgmax",
    "kernel/msgmnb",
    "kernel/msgmni",
    "kernel/sem",
    "fs/mqueue/queues_max",
    "fs/mqueue/msg_max",
    "fs/mqueue/msgsize_max",
    "fs/mqueue/msg_default",
    "fs/mqueue/msgsize_default",
];

/// The most bytes of shared memory segments' contents a namespace may
/// carry in the image (namespaces.img holds them).
const SHM_LIMIT: u64 = 256 << 20;

/// The rows of /proc/sysvipc/KIND (after its header), split in fields.
fn rows(kind: &str) -> std::io::Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{kind}"))?;
    Ok(text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect())
}

/// An object's key, id, mode (octal in /proc) and the owner and creator
/// at columns `uid` .. `uid + 3`.
fn object(row: &[String], uid: usize) -> Option<IpcObject> {
    let num = |i: usize| row.get(i)?.parse::<u32>().ok();
    Some(IpcObject {
        key: row.first()?.parse().ok()?,
        id: row.get(1)?.parse().ok()?,
        mode: u32::from_str_radix(row.get(2)?, 8).ok()?,
        uid: num(uid)?,
        gid: num(uid + 1)?,
        cuid: num(uid + 2)?,
        cgid: num(uid + 3)?,
    })
}

fn bad_row(kind: &str, row: &[String]) -> std::io::Error {
    std::io::Error::other(format!("/proc/sysvipc/{kind}: unexpected line {row:?}"))
}

/// The POSIX message queues of this thread's IPC namespace, each with its
/// messages: taken one by one (the tree is stopped) and put back at once
/// in the order they came out, which is the order they are received in.
/// A queue a task asked to be told of messages on (mq_notify) is refused.
fn read_mqueues() -> std::io::Result<Vec<PosixMqueue>> {
    let mut out = Vec::new();
    for f in crate::sys::ns::mqueue_files()? {
        let notify = f
            .info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("NOTIFY_PID:"))
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or(0);
        if notify != 0 {
            return Err(std::io::Error::other(format!(
                "POSIX message queue /{}: task {notify} asked to be told of its messages (mq_notify), which is not kept yet",
                f.name
            )));
        }
        let fd = ipc::mq_open(
            &format!("/{}", f.name),
            libc::O_RDWR | libc::O_NONBLOCK,
            None,
        )?;
        let (maxmsg, msgsize, _) = ipc::mq_attr(&fd)?;
        let mut messages = Vec::new();
        let mut taken = Ok(());
        loop {
            match ipc::mq_take(&fd, msgsize) {
                Ok(Some((data, prio))) => messages.push(PosixMsg { prio, data }),
                Ok(None) => break,
                Err(e) => {
                    taken = Err(e);
                    break;
                }
            }
        }
        // Back whatever happened, so that the queue is as it was.
        let back = messages
            .iter()
            .try_for_each(|m| ipc::mq_put(&fd, &m.data, m.prio));
        taken.and(back).map_err(|e| {
            std::io::Error::other(format!(
                "POSIX message queue /{}: its messages: {e}",
                f.name
            ))
        })?;
        out.push(PosixMqueue {
            name: f.name,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            maxmsg,
            msgsize,
            messages,
        });
    }
    Ok(out)
}

/// Everything of the IPC namespace open at `ns`, read by a thread of
/// cryo's in it.
pub fn dump(ns: OwnedFd) -> Result<IpcState, String> {
    crate::sys::ns::in_namespace(ns, nix::sched::CloneFlags::CLONE_NEWIPC, read_state)
        .map_err(|e| format!("reading its System V objects: {e}"))
}

fn read_state() -> std::io::Result<IpcState> {
    let mut st = IpcState {
        mqueues: read_mqueues()?,
        ..Default::default()
    };
    for name in SYSCTLS {
        // Limits this kernel does not have are left as they are.
        if let Ok(v) = std::fs::read_to_string(format!("/proc/sys/{name}")) {
            st.sysctls.push(Sysctl {
                name: name.to_string(),
                value: v.trim().to_string(),
            });
        }
    }
    let mut shm_bytes = 0u64;
    for row in rows("shm")? {
        let object = object(&row, 7).ok_or_else(|| bad_row("shm", &row))?;
        let size: u64 = row
            .get(3)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_row("shm", &row))?;
        let (contents, extents) = ipc::shm_read(object.id, size)?;
        shm_bytes += contents.len() as u64;
        if shm_bytes > SHM_LIMIT {
            return Err(std::io::Error::other(format!(
                "its shared memory segments hold more than {} MiB that is not zero (segment {}): too much for namespaces.img",
                SHM_LIMIT >> 20,
                object.id
            )));
        }
        st.shm.push(IpcShm {
            object: Some(object),
            size,
            contents,
            extents: extents
                .into_iter()
                .map(|(offset, len)| Extent { offset, len })
                .collect(),
        });
    }
    for row in rows("sem")? {
        let object = object(&row, 4).ok_or_else(|| bad_row("sem", &row))?;
        let n: usize = row
            .get(3)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_row("sem", &row))?;
        let values = ipc::sem_values(object.id, n)?;
        st.sem.push(IpcSem {
            object: Some(object),
            values: values.into_iter().map(u32::from).collect(),
        });
    }
    let msgmax: usize = std::fs::read_to_string("/proc/sys/kernel/msgmax")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(8192);
    for row in rows("msg")? {
        let object = object(&row, 7).ok_or_else(|| bad_row("msg", &row))?;
        let (qbytes, qnum) = ipc::msg_stat(object.id)?;
        let mut messages = Vec::with_capacity(qnum as usize);
        for i in 0..qnum {
            let (mtype, text) = ipc::msg_copy(object.id, i, msgmax)?;
            messages.push(IpcMsg { mtype, text });
        }
        st.msg.push(IpcMsgQueue {
            object: Some(object),
            qbytes,
            messages,
        });
    }
    Ok(st)
}

/// Make the next object of `kind` (shm, sem, msg) get id `id`.
fn next_id(kind: &str, id: i32) -> Result<(), String> {
    let path = format!("/proc/sys/kernel/{kind}_next_id");
    std::fs::write(&path, id.to_string()).map_err(|e| format!("writing {path}: {e}"))
}

/// That `made` is the id asked for.
fn same_id(what: &str, o: &IpcObject, made: std::io::Result<i32>) -> Result<(), String> {
    let key = o.key;
    match made {
        Ok(id) if id == o.id => Ok(()),
        Ok(id) => Err(format!("{what} {} (key {key}) came back as {id}", o.id)),
        Err(e) => Err(format!("making {what} {} (key {key}): {e}", o.id)),
    }
}

/// This task in a new IPC namespace with the dumped limits and objects.
pub fn restore(st: Option<&IpcState>) -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)
        .map_err(|e| format!("unshare(CLONE_NEWIPC): {}", std::io::Error::from(e)))?;
    fill(st, None)
}

/// The limits and objects of `st` made in this thread's IPC namespace,
/// a new one; `root`: the uid its owning user namespace's root is, the
/// only one the kernel lets write the limits of a namespace owned by
/// another user namespace than cryo's.
pub fn fill(st: Option<&IpcState>, root: Option<u32>) -> Result<(), String> {
    let st = st.ok_or("its objects are not in the image")?;
    for s in &st.sysctls {
        if !SYSCTLS.contains(&s.name.as_str()) {
            return Err(format!("{:?} is not a limit of an IPC namespace", s.name));
        }
        let path = format!("/proc/sys/{}", s.name);
        let wrote = match root {
            Some(uid) => {
                crate::sys::ns::as_euid(uid, || std::fs::write(&path, &s.value)).and_then(|r| r)
            }
            None => std::fs::write(&path, &s.value),
        };
        wrote.map_err(|e| format!("setting {} to {:?}: {e}", s.name, s.value))?;
    }
    for shm in &st.shm {
        let o = shm.object.as_ref().ok_or("a segment without its ids")?;
        next_id("shm", o.id)?;
        same_id("segment", o, ipc::shm_create(o.key, shm.size, o.mode))?;
        let extents: Vec<(u64, u64)> = shm.extents.iter().map(|e| (e.offset, e.len)).collect();
        ipc::shm_fill(o.id, &shm.contents, &extents, shm.size)
            .and_then(|_| ipc::shm_set(o.id, o.uid, o.gid, o.mode))
            .map_err(|e| format!("filling segment {}: {e}", o.id))?;
    }
    for sem in &st.sem {
        let o = sem
            .object
            .as_ref()
            .ok_or("a semaphore set without its ids")?;
        let values: Vec<u16> = sem.values.iter().map(|&v| v as u16).collect();
        next_id("sem", o.id)?;
        same_id(
            "semaphore set",
            o,
            ipc::sem_create(o.key, &values, o.uid, o.gid, o.mode),
        )?;
    }
    for q in &st.msg {
        let o = q.object.as_ref().ok_or("a message queue without its ids")?;
        let messages: Vec<(i64, &[u8])> = q
            .messages
            .iter()
            .map(|m| (m.mtype, m.text.as_slice()))
            .collect();
        next_id("msg", o.id)?;
        same_id(
            "message queue",
            o,
            ipc::msg_create(o.key, (o.uid, o.gid, o.mode), q.qbytes, &messages),
        )?;
    }
    st.mqueues.iter().try_for_each(make_mqueue)
}

/// A POSIX message queue made again with its limits, owner, mode and
/// messages (sent in the order they were received, each with its
/// priority, they are received in that order again).
fn make_mqueue(q: &PosixMqueue) -> Result<(), String> {
    if q.name.is_empty() || q.name.contains('/') {
        return Err(format!("{:?} is not a POSIX message queue's name", q.name));
    }
    let named = |w: String| format!("POSIX message queue /{}: {w}", q.name);
    let fd = ipc::mq_open(
        &format!("/{}", q.name),
        libc::O_WRONLY | libc::O_NONBLOCK,
        Some((q.mode, q.maxmsg, q.msgsize)),
    )
    .map_err(|e| {
        named(format!(
            "making it (maxmsg {}, msgsize {}): {e}",
            q.maxmsg, q.msgsize
        ))
    })?;
    nix::unistd::fchown(&fd, Some(q.uid.into()), Some(q.gid.into()))
        .map_err(|e| named(format!("its owner: {e}")))?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(q.mode))
        .map_err(|e| named(format!("its mode: {e}")))?;
    for m in &q.messages {
        ipc::mq_put(&fd, &m.data, m.prio).map_err(|e| named(format!("a message: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysvipc_rows() {
        let row: Vec<String> = "1234 32769 1600 4096 10 11 0 1000 1001 0 0 0 0 0 0 0"
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let o = object(&row, 7).expect("a shm row");
        assert_eq!((o.key, o.id, o.mode), (1234, 32769, 0o1600));
        assert_eq!((o.uid, o.gid, o.cuid, o.cgid), (1000, 1001, 0, 0));
        assert!(object(&row[..5], 7).is_none());
    }
}
