//! System V IPC calls: reading a shared memory segment, a semaphore set
//! and a message queue without changing them (MSG_COPY), and making them
//! again with given ids, owners and contents; POSIX message queues'
//! open, attributes, receive and send.

use std::io;

const PAGE: usize = 4096;
/// msgrcv: read the message at an index without removing it.
const MSG_COPY: i32 = 0o40000;
/// semctl commands and shmctl's SHM_LOCK, as the kernel numbers them.
const GETALL: i32 = 13;
const SETALL: i32 = 17;
const SHM_LOCK: i32 = 11;
/// The mode bit of a segment locked in memory (SHM_LOCKED).
pub const SHM_LOCKED: u32 = 0o2000;

fn check(r: i32) -> io::Result<i32> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Where a segment's bytes are not zero: (offset, length) ranges.
pub type Extents = Vec<(u64, u64)>;

/// A segment's bytes where they are not zero, page by page: the bytes
/// one after another and their extents. Read through a read-only
/// attachment of this thread's IPC namespace's segment `id`.
pub fn shm_read(id: i32, size: u64) -> io::Result<(Vec<u8>, Extents)> {
    // SAFETY: shmat maps the segment somewhere free in our address space;
    // nothing else uses that range until the shmdt below.
    let at = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if at as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the segment is mapped readable at `at` for `size` bytes
    // until the shmdt below; only this thread reads it.
    let bytes = unsafe { std::slice::from_raw_parts(at as *const u8, size as usize) };
    let mut data = Vec::new();
    let mut extents: Extents = Vec::new();
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let off = (i * PAGE) as u64;
        match extents.last_mut() {
            Some(e) if e.0 + e.1 == off => e.1 += page.len() as u64,
            _ => extents.push((off, page.len() as u64)),
        }
        data.extend_from_slice(page);
    }
    // SAFETY: `at` is the attachment made above; `bytes` is not used after.
    unsafe { libc::shmdt(at) };
    Ok((data, extents))
}

/// The size in bytes of segment `id` of this task's IPC namespace.
pub fn shm_size(id: i32) -> io::Result<u64> {
    // SAFETY: zeroed is a valid shmid_ds, which IPC_STAT fills.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes into our local struct.
    check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) })?;
    Ok(ds.shm_segsz as u64)
}

/// Make a segment with `key`, `size` bytes and mode `mode`; it gets the id
/// the namespace's shm_next_id says.
pub fn shm_create(key: i32, size: u64, mode: u32) -> io::Result<i32> {
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: shmget takes plain values.
    check(unsafe { libc::shmget(key, size as usize, flags) })
}

/// Write the extents of `data` into segment `id` of `size` bytes (through
/// an attachment of ours, removed after).
pub fn shm_fill(id: i32, data: &[u8], extents: &[(u64, u64)], size: u64) -> io::Result<()> {
    // SAFETY: as in shm_read, a writable attachment this time.
    let at = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if at as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut from = 0usize;
    let mut fits = true;
    for &(off, len) in extents {
        let (off, len) = (off as usize, len as usize);
        if off + len > size as usize || from + len > data.len() {
            fits = false;
            break;
        }
        // SAFETY: the destination range lies inside the segment (checked
        // just above), mapped writable at `at`; the source inside `data`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr().add(from), (at as *mut u8).add(off), len)
        };
        from += len;
    }
    // SAFETY: `at` is the attachment made above.
    unsafe { libc::shmdt(at) };
    if !fits {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "its extents do not fit its size or its contents",
        ));
    }
    Ok(())
}

/// Give segment `id` its owner and mode, and lock it (SHM_LOCK) when its
/// mode says so.
pub fn shm_set(id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it, IPC_SET reads
    // its owner and mode.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        check(libc::shmctl(id, libc::IPC_STAT, &mut ds))?;
        ds.shm_perm.uid = uid;
        ds.shm_perm.gid = gid;
        ds.shm_perm.mode = (mode & 0o777) as _;
        check(libc::shmctl(id, libc::IPC_SET, &mut ds))?;
        if mode & SHM_LOCKED != 0 {
            check(libc::shmctl(id, SHM_LOCK, std::ptr::null_mut()))?;
        }
    }
    Ok(())
}

/// The values of the `n` semaphores of set `id`.
pub fn sem_values(id: i32, n: usize) -> io::Result<Vec<u16>> {
    let mut v = vec![0u16; n];
    // SAFETY: GETALL writes `n` unsigned shorts into `v`.
    check(unsafe { libc::semctl(id, 0, GETALL, v.as_mut_ptr()) })?;
    Ok(v)
}

/// Make a set of `n` semaphores with `key` and mode `mode` (the id
/// sem_next_id says), with these values, owner and mode.
pub fn sem_create(key: i32, values: &[u16], uid: u32, gid: u32, mode: u32) -> io::Result<i32> {
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: semget takes plain values.
    let id = check(unsafe { libc::semget(key, values.len() as i32, flags) })?;
    // SAFETY: SETALL reads values.len() unsigned shorts; semid_ds is plain
    // data that IPC_STAT fills and IPC_SET reads.
    unsafe {
        check(libc::semctl(id, 0, SETALL, values.as_ptr()))?;
        let mut ds: libc::semid_ds = std::mem::zeroed();
        check(libc::semctl(
            id,
            0,
            libc::IPC_STAT,
            &mut ds as *mut libc::semid_ds,
        ))?;
        ds.sem_perm.uid = uid;
        ds.sem_perm.gid = gid;
        ds.sem_perm.mode = (mode & 0o777) as _;
        check(libc::semctl(
            id,
            0,
            libc::IPC_SET,
            &mut ds as *mut libc::semid_ds,
        ))?;
    }
    Ok(id)
}

/// Queue `id`'s byte limit (msg_qbytes) and number of messages.
pub fn msg_stat(id: i32) -> io::Result<(u64, u64)> {
    // SAFETY: msqid_ds is plain data; IPC_STAT fills it.
    let ds = unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        check(libc::msgctl(id, libc::IPC_STAT, &mut ds))?;
        ds
    };
    Ok((ds.msg_qbytes as u64, ds.msg_qnum as u64))
}

/// Message number `index` of queue `id` (its type and text, at most `max`
/// bytes), left in the queue (MSG_COPY).
pub fn msg_copy(id: i32, index: u64, max: usize) -> io::Result<(i64, Vec<u8>)> {
    let mut buf = vec![0u8; 8 + max];
    // SAFETY: msgrcv writes at most 8 + `max` bytes (the type, then the
    // text) into `buf`.
    let n = unsafe {
        libc::msgrcv(
            id,
            buf.as_mut_ptr().cast(),
            max,
            index as libc::c_long,
            libc::IPC_NOWAIT | MSG_COPY,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mtype = i64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
    buf.truncate(8 + n as usize);
    Ok((mtype, buf.split_off(8)))
}

/// Make a queue with `key` (the id msg_next_id says), its owner, mode
/// and byte limit, holding these messages.
pub fn msg_create(
    key: i32,
    (uid, gid, mode): (u32, u32, u32),
    qbytes: u64,
    messages: &[(i64, &[u8])],
) -> io::Result<i32> {
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
    // SAFETY: msgget takes plain values.
    let id = check(unsafe { libc::msgget(key, flags) })?;
    // SAFETY: msqid_ds is plain data that IPC_STAT fills and IPC_SET reads
    // (the byte limit first, so that every message fits).
    let set = |uid: u32, gid: u32, mode: u32| unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        check(libc::msgctl(id, libc::IPC_STAT, &mut ds))?;
        ds.msg_perm.uid = uid;
        ds.msg_perm.gid = gid;
        ds.msg_perm.mode = (mode & 0o777) as _;
        ds.msg_qbytes = qbytes as _;
        check(libc::msgctl(id, libc::IPC_SET, &mut ds))
    };
    set(0, 0, 0o600)?;
    for &(mtype, text) in messages {
        let mut buf = mtype.to_ne_bytes().to_vec();
        buf.extend_from_slice(text);
        // SAFETY: msgsnd reads the type and `text.len()` bytes of `buf`.
        check(unsafe { libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) })?;
    }
    set(uid, gid, mode)?;
    Ok(id)
}

/// A POSIX message queue's limits and how many messages it holds
/// (mq_getattr): (maxmsg, msgsize, curmsgs).
pub fn mq_attr(fd: &impl std::os::fd::AsRawFd) -> io::Result<(i64, i64, i64)> {
    // SAFETY: zeroed is a valid mq_attr, which mq_getattr fills.
    let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is a queue's, open for the call; `a` is ours.
    check(unsafe { libc::mq_getattr(fd.as_raw_fd(), &mut a) })?;
    Ok((a.mq_maxmsg, a.mq_msgsize, a.mq_curmsgs))
}

/// Open queue `name` ("/NAME") of this thread's IPC namespace; with
/// `create`, made with these limits (and failing if it exists).
pub fn mq_open(
    name: &str,
    flags: i32,
    create: Option<(u32, i64, i64)>,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a queue name"))?;
    let fd = match create {
        None => {
            // SAFETY: mq_open reads the NUL-terminated name.
            unsafe { libc::mq_open(c.as_ptr(), flags | libc::O_CLOEXEC) }
        }
        Some((mode, maxmsg, msgsize)) => {
            // SAFETY: zeroed is a valid mq_attr; the two limits are set.
            let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
            a.mq_maxmsg = maxmsg;
            a.mq_msgsize = msgsize;
            // SAFETY: mq_open reads the name, and with O_CREAT a mode and
            // the attributes, which live across the call.
            unsafe {
                libc::mq_open(
                    c.as_ptr(),
                    flags | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    mode as libc::mode_t,
                    &a as *const libc::mq_attr,
                )
            }
        }
    };
    let fd = check(fd)?;
    // SAFETY: mq_open returned a new descriptor (a queue's is one on Linux)
    // that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Take the next message of a queue opened O_NONBLOCK: its bytes and
/// priority; None when it is empty.
pub fn mq_take(fd: &impl std::os::fd::AsRawFd, msgsize: i64) -> io::Result<Option<(Vec<u8>, u32)>> {
    let mut buf = vec![0u8; msgsize.max(1) as usize];
    let mut prio = 0u32;
    // SAFETY: the buffer holds `buf.len()` bytes, at least the queue's
    // message size; `prio` is ours.
    let n = unsafe {
        libc::mq_receive(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut prio,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some((buf, prio)))
}

/// Queue a message (never blocking: the queue has room for what it held).
pub fn mq_put(fd: &impl std::os::fd::AsRawFd, data: &[u8], prio: u32) -> io::Result<()> {
    // SAFETY: mq_send reads `data.len()` bytes of `data`.
    check(unsafe { libc::mq_send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), prio) })?;
    Ok(())
}
