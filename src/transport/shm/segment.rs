//! Segments: memory that several processes of one host map at once. Every use of shared
//! memory goes through here: the rings of the shm links ([`super::ShmLink`]), the
//! buffers behind [`crate::Communicator::alloc_shared`] and the per-rank control pages
//! that go with them.
//!
//! A segment is made by one process (its owner) and mapped by the others of its host,
//! which only read it (buffers) or also write (rings, control pages). Two ways to hand
//! it over:
//!
//! - an anonymous `memfd`, which the others open as `/proc/<owner pid>/fd/<fd>`: it never
//!   has a name in any filesystem, so a crash at any moment leaves nothing behind;
//! - a `/dev/shm` file with a random name (the links, whose names travel through the
//!   bootstrap store; shared buffers when a peer cannot open the memfd's path: pid
//!   namespaces differ, `/proc` is hidden), unlinked as soon as every process has
//!   mapped it. Only a crash in the short window between creation and unlink can leave
//!   a file `/dev/shm/hetccl-*` behind; its name ends with its maker's pid and pid
//!   namespace ([`owner_tag`]); `hetccl run` removes its ranks' files once they have all
//!   exited ([`remove_files_of`]), and the next process that makes a named segment removes
//!   every such file whose maker is gone ([`sweep_leftovers`]), for jobs started otherwise.
//!
//! Either way the owner drops its way in ([`OwnedSegment::release`]) once everyone has
//! mapped it; the memory then lives exactly as long as the last mapping, and the kernel
//! frees it when the last process that maps it is gone, however it ended.
//!
//! Every page is reserved (`fallocate`, so a full memory cgroup or `/dev/shm` is an
//! error here rather than a `SIGBUS` later) and faulted in at creation, and again by
//! each mapper (`MAP_POPULATE`): no page fault on the hot path. A `/dev/shm` segment
//! larger than the space left there is refused before it is made, with an error that
//! says how to enlarge it (containers often get 64 MiB). Memfd segments of 2 MiB and
//! more try `MFD_HUGETLB` first, and every segment asks for transparent huge pages
//! otherwise; both are best effort (most machines have no huge page pool and
//! `shmem_enabled=never`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::liveness::own_pidns;
use crate::error::{Error, Result};

const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// How another process of the host finds a segment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SegmentHandle {
    /// `/proc/<pid>/fd/<fd>` of the owner.
    Memfd {
        /// Owner's process id.
        pid: u32,
        /// Descriptor number in the owner.
        fd: i32,
    },
    /// `/dev/shm/<name>`.
    Named {
        /// File name under `/dev/shm`.
        name: String,
    },
}

/// One mapping of a segment in this process; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    huge: bool,
    ino: u64,
}

// SAFETY: a `Mapping` owns its address range (nothing else unmaps it); the bytes in it
// are accessed through raw pointers by code that synchronises with other processes
// through atomics, so moving or sharing the owner between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// First byte of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: segments are at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the segment is backed by hugetlb pages.
    pub fn huge_pages(&self) -> bool {
        self.huge
    }

    /// Inode of the segment's file: the same in every process that maps it.
    pub fn inode(&self) -> u64 {
        self.ino
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is this value's own mapping; no reference into it outlives
        // the value (owners of raw pointers into it hold the value alive).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A segment this process made, mapped read-write, plus what others need to map it.
#[derive(Debug)]
pub struct OwnedSegment {
    map: Mapping,
    fd: Option<OwnedFd>,
    /// `/dev/shm` name while it is still linked.
    linked: Option<SegmentName>,
    handle: SegmentHandle,
}

/// The last part of every `/dev/shm` name this process makes: `p<pid>n<pid namespace
/// inode, hex>`, so that a later process can tell a crash's leftover from a live file.
pub(crate) fn owner_tag() -> String {
    format!("p{}n{:x}", std::process::id(), own_pidns())
}

/// How old a leftover must be before it is removed: longer than any rendezvous keeps a
/// name linked, so a file whose maker just died while a peer is still opening it is
/// left to that peer's error path.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(120);

/// Removes the files `dir/hetccl-*` that a crashed process of this pid namespace left:
/// its [`owner_tag`] names a pid that no longer exists and the file is older than
/// `min_age`. Files of other pid namespaces (their pids mean nothing here), of live
/// processes and untagged ones are kept. Returns the names removed.
pub(crate) fn sweep_leftovers(dir: &std::path::Path, min_age: std::time::Duration) -> Vec<String> {
    let ns = own_pidns();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name, ns) else {
            continue;
        };
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
        // kill(pid, 0) fails with ESRCH only when no process (zombie included) has it.
        // SAFETY: signal 0 sends nothing; it only checks that the pid exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if old && gone && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!("removed /dev/shm leftover {name} of exited process {pid}");
            removed.push(name);
        }
    }
    removed
}

/// Removes the files `dir/hetccl-*` whose [`owner_tag`] names one of `pids` in this
/// process's pid namespace, whatever their age: for a caller that has reaped those
/// processes itself (the launcher, once every rank has exited), so no peer of theirs can
/// still be opening the files. Returns the names removed.
pub fn remove_files_of(dir: &std::path::Path, pids: &[u32]) -> Vec<String> {
    let ns = own_pidns();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = leftover_pid(&name, ns)
            .and_then(|pid| u32::try_from(pid).ok())
            .is_some_and(|pid| pids.contains(&pid));
        if ours && std::fs::remove_file(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// The pid in `name`'s owner tag when the name is hetccl's and the tag names pid
/// namespace `ns`.
fn leftover_pid(name: &str, ns: u64) -> Option<i32> {
    let tag = name.strip_prefix("hetccl-")?.rsplit('-').next()?;
    let (pid, pidns) = tag.strip_prefix('p')?.split_once('n')?;
    let pid: i32 = pid.parse().ok()?;
    (pid > 0 && ns != 0 && u64::from_str_radix(pidns, 16).ok()? == ns).then_some(pid)
}

/// A `/dev/shm` name this process created; unlinked on drop unless unlinked before.
#[derive(Debug)]
pub(crate) struct SegmentName {
    /// `/name`, as `shm_open` takes it.
    cname: CString,
    linked: bool,
}

impl SegmentName {
    /// Removes the name from `/dev/shm` (a no-op after the first call); mappings stay
    /// valid.
    pub(crate) fn unlink(&mut self) -> std::io::Result<()> {
        if !std::mem::take(&mut self.linked) {
            return Ok(());
        }
        // SAFETY: valid NUL-terminated name of a file this process created.
        if unsafe { libc::shm_unlink(self.cname.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for SegmentName {
    fn drop(&mut self) {
        if let Err(e) = self.unlink() {
            tracing::warn!(
                "could not unlink /dev/shm{}: {e}",
                self.cname.to_string_lossy()
            );
        }
    }
}

impl OwnedSegment {
    /// Makes a zero-filled segment of at least `bytes` bytes (rounded up to a page, at
    /// least one page): a memfd, or the `/dev/shm` file `name` when given. `what`
    /// names the segment in errors ("rank 3: shared buffer #2").
    pub fn create(bytes: usize, name: Option<&str>, what: &str) -> Result<Self> {
        let len = bytes.max(1).div_ceil(PAGE) * PAGE;
        match name {
            None => {
                if len >= HUGE_PAGE {
                    let hlen = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
                    if let Ok(s) = Self::create_memfd(hlen, true, what) {
                        return Ok(s);
                    }
                }
                Self::create_memfd(len, false, what)
            }
            Some(n) => Self::create_named(len, n, what),
        }
    }

    fn create_memfd(len: usize, huge: bool, what: &str) -> Result<Self> {
        let cname = c"hetccl-shared";
        let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
        // SAFETY: valid NUL-terminated name, plain flags.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            return Err(Error::Shm(format!(
                "{what}: memfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let map = size_and_map(&fd, len, huge, false, what)?;
        Ok(OwnedSegment {
            map,
            handle: SegmentHandle::Memfd {
                pid: std::process::id(),
                fd: fd.as_raw_fd(),
            },
            fd: Some(fd),
            linked: None,
        })
    }

    fn create_named(len: usize, name: &str, what: &str) -> Result<Self> {
        let cname = shm_cname(name)?;
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            sweep_leftovers(std::path::Path::new("/dev/shm"), LEFTOVER_AGE);
        });
        if let Some(free) = shm_free_bytes() {
            if free < len as u64 {
                return Err(too_small(what, len, Some(free)));
            }
        }
        // SAFETY: `cname` is a valid NUL-terminated string.
        let fd = unsafe {
            libc::shm_open(
                cname.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(Error::Shm(format!(
                "{what}: creating /dev/shm/{name}: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Unlinked when this guard drops: on error right away, else at `release`.
        let linked = SegmentName {
            cname,
            linked: true,
        };
        let map = size_and_map(&fd, len, false, true, what)?;
        Ok(OwnedSegment {
            map,
            fd: Some(fd),
            linked: Some(linked),
            handle: SegmentHandle::Named {
                name: name.to_string(),
            },
        })
    }

    /// What another process passes to [`open`].
    pub fn handle(&self) -> &SegmentHandle {
        &self.handle
    }

    /// The owner's read-write mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// Drops the way in (closes the memfd, unlinks the `/dev/shm` name): call once every
    /// process that needs the segment has mapped it. Idempotent.
    pub fn release(&mut self) {
        self.fd = None;
        self.linked = None;
    }

    /// Releases the handle and keeps only the mapping.
    pub fn into_mapping(mut self) -> Mapping {
        self.release();
        self.map
    }

    /// Closes the descriptor and keeps the mapping and, for a `/dev/shm` segment, its
    /// name, for the owner to unlink once the others have opened it by name.
    pub(crate) fn into_named(mut self) -> (Mapping, Option<SegmentName>) {
        self.fd = None;
        (self.map, self.linked.take())
    }
}

/// Maps another process's segment, which must be at least `min_bytes` long; read-only
/// unless `writable`. `what` names it in errors, and `owner` the rank that made it when
/// `what` does not.
pub fn open(
    handle: &SegmentHandle,
    owner: Option<usize>,
    min_bytes: usize,
    writable: bool,
    what: &str,
) -> Result<Mapping> {
    let (path, cpath) = match handle {
        SegmentHandle::Memfd { pid, fd } => {
            let p = format!("/proc/{pid}/fd/{fd}");
            let c = CString::new(p.clone()).map_err(|_| Error::Shm(format!("bad path {p:?}")))?;
            (p, c)
        }
        SegmentHandle::Named { name } => {
            shm_cname(name)?;
            let p = format!("/dev/shm/{name}");
            let c = CString::new(p.clone()).map_err(|_| Error::Shm(format!("bad path {p:?}")))?;
            (p, c)
        }
    };
    let mode = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    // SAFETY: valid NUL-terminated path.
    let fd = unsafe { libc::open(cpath.as_ptr(), mode | libc::O_CLOEXEC) };
    if fd < 0 {
        let by = owner
            .map(|r| format!(" created by rank {r}"))
            .unwrap_or_default();
        let hint = match handle {
            SegmentHandle::Named { .. } => {
                " (do both ranks see the same /dev/shm? set HETCCL_SHM_DISABLE=1 if they do not)"
            }
            SegmentHandle::Memfd { .. } => "",
        };
        return Err(Error::Shm(format!(
            "{what}: opening {path}{by}: {}{hint}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: stat is plain data; zeroed is a valid initial value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: our fd and a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::Shm(format!(
            "{what}: stat of {path}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let len = st.st_size as usize;
    if len < min_bytes.max(1) || len % PAGE != 0 {
        return Err(Error::Shm(format!(
            "{what}: {path} holds {len} bytes, expected at least {min_bytes}"
        )));
    }
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of our fd; MAP_POPULATE fills the page tables now
    // so reading the peer's memory never faults on the hot path.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Shm(format!(
            "{what}: mapping {len} bytes of {path}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(Mapping {
        ptr: p.cast(),
        len,
        huge: len % HUGE_PAGE == 0 && is_hugetlb(&fd),
        ino: st.st_ino,
    })
}

fn is_hugetlb(fd: &OwnedFd) -> bool {
    // SAFETY: statfs is plain data; zeroed is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: our fd and a valid out pointer.
    (unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) }) == 0 && st.f_type == libc::HUGETLBFS_MAGIC
}

/// Sizes the new file, reserves every page, maps it and faults it in. `dev_shm`: the
/// file lives in `/dev/shm`, whose size is the likely limit when space runs out.
fn size_and_map(
    fd: &OwnedFd,
    len: usize,
    huge: bool,
    dev_shm: bool,
    what: &str,
) -> Result<Mapping> {
    let raw = fd.as_raw_fd();
    let full =
        |errno: Option<i32>| dev_shm && matches!(errno, Some(libc::ENOSPC) | Some(libc::EFBIG));
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::ftruncate(raw, len as libc::off_t) } != 0 {
        let e = std::io::Error::last_os_error();
        if full(e.raw_os_error()) {
            return Err(too_small(what, len, shm_free_bytes()));
        }
        return Err(Error::Shm(format!("{what}: sizing to {len} bytes: {e}")));
    }
    // ftruncate only sets the size: touching a page that tmpfs cannot back would raise
    // SIGBUS. posix_fallocate reserves every page now, or fails cleanly.
    // SAFETY: plain syscall on our fd; returns an errno value rather than setting errno.
    let r = unsafe { libc::posix_fallocate(raw, 0, len as libc::off_t) };
    if r != 0 {
        if full(Some(r)) {
            return Err(too_small(what, len, shm_free_bytes()));
        }
        return Err(Error::Shm(format!(
            "{what}: reserving {len} bytes: {} (is the memory limit or /dev/shm too small?)",
            std::io::Error::from_raw_os_error(r)
        )));
    }
    // SAFETY: a fresh shared mapping of our fd, `len` bytes long as just sized.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Shm(format!(
            "{what}: mapping {len} bytes: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: stat is plain data; zeroed is a valid initial value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: our fd and a valid out pointer.
    let ino = if unsafe { libc::fstat(raw, &mut st) } == 0 {
        st.st_ino
    } else {
        0
    };
    let map = Mapping {
        ptr: p.cast(),
        len,
        huge,
        ino,
    };
    if !huge {
        // Best effort: honoured only where shmem transparent huge pages are allowed.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
    }
    // Fault every page in now. MADV_POPULATE_WRITE (Linux 5.14) does it in one call;
    // older kernels get one write per page.
    const MADV_POPULATE_WRITE: i32 = 23;
    // SAFETY: advice on our own mapping.
    if unsafe { libc::madvise(p, len, MADV_POPULATE_WRITE) } != 0 {
        let step = if huge { HUGE_PAGE } else { PAGE };
        for off in (0..len).step_by(step) {
            // SAFETY: inside our fresh mapping, whose pages are reserved (fallocate),
            // and nobody else has it yet; writing the zero it holds changes nothing.
            unsafe { std::ptr::write_volatile(map.ptr.add(off), 0) };
        }
    }
    Ok(map)
}

/// The error for a `/dev/shm` segment of `bytes` bytes that does not fit (`free` bytes
/// left, when known).
fn too_small(what: &str, bytes: usize, free: Option<u64>) -> Error {
    let free = free
        .map(|f| format!(" ({f} bytes free)"))
        .unwrap_or_default();
    Error::Shm(format!(
        "{what} needs {bytes} bytes but /dev/shm is too small{free}; enlarge it (e.g. docker \
         run --shm-size=1g) or set HETCCL_SHM_DISABLE=1 to use TCP between ranks of one host"
    ))
}

/// Free bytes in /dev/shm, if it can be asked.
pub(crate) fn shm_free_bytes() -> Option<u64> {
    let path = CString::new("/dev/shm").ok()?;
    // SAFETY: statvfs is plain data; zeroed is a valid initial value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 || st.f_blocks == 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// `name` as the argument of `shm_open`: `/name`, after checking it is a plain name.
pub(crate) fn shm_cname(name: &str) -> Result<CString> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(Error::Shm(format!(
            "bad segment name {name:?}: use 1 to 200 characters from [A-Za-z0-9._-]"
        )));
    }
    CString::new(format!("/{name}")).map_err(|_| Error::Shm(format!("bad segment name {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_and_check(owner: &OwnedSegment, other: &Mapping) {
        // SAFETY: both map the same segment of at least one page; this test is the only
        // user.
        unsafe {
            *owner.mapping().as_ptr().add(100) = 42;
            assert_eq!(*other.as_ptr().add(100), 42);
            assert_eq!(*other.as_ptr().add(101), 0);
        }
    }

    #[test]
    fn leftovers_of_exited_makers_are_swept_and_nothing_else() {
        let ns = own_pidns();
        if ns == 0 {
            return crate::test_skip::skip("/proc/self/ns/pid is not readable");
        }
        // A pid that certainly existed and is gone: a reaped child's.
        let dead = std::process::Command::new("true")
            .spawn()
            .and_then(|mut c| c.wait().map(|_| c.id()))
            .unwrap();
        let me = std::process::id();
        let dir =
            std::env::temp_dir().join(format!("hetccl-sweep-{me}-{:x}", rand::random::<u32>()));
        std::fs::create_dir(&dir).unwrap();
        let names = [
            format!("hetccl-job-0-1-00ff-p{dead}n{ns:x}"),
            format!("hetccl-{dead}-buf-0-1-00ff-p{dead}n{ns:x}"),
            format!("hetccl-job-0-1-00ff-p{me}n{ns:x}"),
            format!("hetccl-job-0-1-00ff-p{dead}n{:x}", ns ^ 1),
            format!("hetccl-{dead}-buf-0-1-e048cf4b2d166169"),
            format!("other-p{dead}n{ns:x}"),
        ];
        for n in &names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        // Younger than the age limit: nothing goes.
        assert_eq!(
            sweep_leftovers(&dir, std::time::Duration::from_secs(3600)),
            Vec::<String>::new()
        );
        let mut removed = sweep_leftovers(&dir, std::time::Duration::ZERO);
        removed.sort();
        let mut expected = vec![names[0].clone(), names[1].clone()];
        expected.sort();
        assert_eq!(removed, expected);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut kept = names[2..].to_vec();
        kept.sort();
        assert_eq!(left, kept);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_of_named_pids_are_removed_whatever_their_age() {
        let ns = own_pidns();
        if ns == 0 {
            return crate::test_skip::skip("/proc/self/ns/pid is not readable");
        }
        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("hetccl-of-{me}-{:x}", rand::random::<u32>()));
        std::fs::create_dir(&dir).unwrap();
        let names = [
            format!("hetccl-job-0-1-00ff-p4001n{ns:x}"),
            format!("hetccl-4002-ctl-0-1-00ff-p4002n{ns:x}"),
            // Another pid, another namespace, no tag, not hetccl's.
            format!("hetccl-job-0-1-00ff-p4003n{ns:x}"),
            format!("hetccl-job-0-1-00ff-p4001n{:x}", ns ^ 1),
            "hetccl-4001-buf-0-1-e048cf4b2d166169".to_string(),
            format!("other-p4001n{ns:x}"),
        ];
        for n in &names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        assert_eq!(
            remove_files_of(&dir, &[4001, 4002]),
            vec![names[1].clone(), names[0].clone()]
        );
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut kept = names[2..].to_vec();
        kept.sort();
        assert_eq!(left, kept);
        assert_eq!(remove_files_of(&dir, &[]), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owner_tags_parse_back_to_the_pid_only_in_their_namespace() {
        let ns = own_pidns();
        let name = format!("hetccl-job-0-1-00ff-{}", owner_tag());
        let me = std::process::id() as i32;
        assert_eq!(leftover_pid(&name, ns), (ns != 0).then_some(me));
        assert_eq!(leftover_pid(&name, ns ^ 1), None);
        assert_eq!(leftover_pid("hetccl-job-0-1-p12nzz", 0xab), None);
        assert_eq!(leftover_pid("hetccl-job-0-1-p0nab", 0xab), None);
        assert_eq!(leftover_pid("hetccl-job-0-1-p12nab", 0xab), Some(12));
        assert_eq!(leftover_pid("xhetccl-job-0-1-p12nab", 0xab), None);
    }

    #[test]
    fn memfd_segment_is_mapped_through_proc_and_never_named() {
        let mut s = OwnedSegment::create(10_000, None, "test").unwrap();
        assert_eq!(s.mapping().len(), 12_288);
        let SegmentHandle::Memfd { pid, .. } = s.handle().clone() else {
            panic!("expected a memfd handle, got {:?}", s.handle());
        };
        assert_eq!(pid, std::process::id());
        let m = open(s.handle(), None, 10_000, false, "test").unwrap();
        assert_eq!(m.len(), 12_288);
        fill_and_check(&s, &m);
        let h = s.handle().clone();
        s.release();
        let e = open(&h, None, 1, false, "peer").unwrap_err().to_string();
        assert!(e.starts_with("shared memory: peer: opening /proc/"), "{e}");
        // The mappings outlive the handle.
        fill_and_check(&s, &m);
    }

    #[test]
    fn named_segment_is_unlinked_on_release() {
        let name = format!("hetccl-test-shared-{:016x}", rand::random::<u64>());
        let mut s = OwnedSegment::create(1, Some(&name), "test").unwrap();
        assert_eq!(s.mapping().len(), 4096);
        assert!(std::path::Path::new(&format!("/dev/shm/{name}")).exists());
        let m = open(s.handle(), None, 4096, true, "test").unwrap();
        fill_and_check(&s, &m);
        s.release();
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
        let s2 = OwnedSegment::create(1, Some(&name), "test").unwrap();
        drop(s2);
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
    }

    #[test]
    fn open_checks_the_size() {
        let s = OwnedSegment::create(4096, None, "test").unwrap();
        let e = open(s.handle(), None, 8192, false, "rank 1")
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("holds 4096 bytes, expected at least 8192"),
            "{e}"
        );
    }

    fn test_name() -> String {
        format!("hetccl-test-segment-{:016x}", rand::random::<u64>())
    }

    #[test]
    fn a_named_segment_larger_than_dev_shm_is_refused_before_it_is_made() {
        let Some(free) = shm_free_bytes() else {
            crate::test_skip::skip("/dev/shm reports no size; cannot ask for more than it holds");
            return;
        };
        // 1 GiB over: room that others free meanwhile does not make it fit.
        let bytes = (free as usize + (1 << 30)).div_ceil(PAGE) * PAGE;
        let name = test_name();
        let e = OwnedSegment::create(bytes, Some(&name), "rank 3: shared buffer #1")
            .unwrap_err()
            .to_string();
        let want = format!(
            "shared memory: rank 3: shared buffer #1 needs {bytes} bytes but /dev/shm is too \
             small ("
        );
        assert!(e.starts_with(&want), "{e}");
        assert!(
            e.ends_with(
                " bytes free); enlarge it (e.g. docker run --shm-size=1g) or set \
                 HETCCL_SHM_DISABLE=1 to use TCP between ranks of one host"
            ),
            "{e}"
        );
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
    }

    #[test]
    fn a_missing_named_segment_names_its_owner_and_what_to_check() {
        let name = test_name();
        let e = open(
            &SegmentHandle::Named { name: name.clone() },
            Some(4),
            1,
            true,
            "rank 1",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            format!(
                "shared memory: rank 1: opening /dev/shm/{name} created by rank 4: No such file \
                 or directory (os error 2) (do both ranks see the same /dev/shm? set \
                 HETCCL_SHM_DISABLE=1 if they do not)"
            )
        );
    }

    #[test]
    fn into_named_keeps_the_name_until_unlinked_and_the_mapping_after() {
        let name = test_name();
        let path = format!("/dev/shm/{name}");
        let (map, linked) = OwnedSegment::create(5000, Some(&name), "test")
            .unwrap()
            .into_named();
        let mut linked = linked.unwrap();
        assert_eq!(map.len(), 8192);
        assert!(std::path::Path::new(&path).exists());
        let other = open(
            &SegmentHandle::Named { name: name.clone() },
            None,
            8192,
            false,
            "test",
        )
        .unwrap();
        linked.unlink().unwrap();
        assert!(!std::path::Path::new(&path).exists());
        // A second unlink is a no-op, not an error about a name someone else may own.
        linked.unlink().unwrap();
        // SAFETY: both map the same segment of two pages; this test is the only user.
        unsafe {
            *map.as_ptr().add(4097) = 7;
            assert_eq!(*other.as_ptr().add(4097), 7);
        }
    }
}
