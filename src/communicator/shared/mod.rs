//! Shared buffers ([`Communicator::alloc_shared`]) and the direct algorithms that run
//! on them when every rank shares one host.
//!
//! Each rank's [`SharedBuf`] lives in a segment every other rank of its host maps
//! (read-only), so a collective can read peers' data where it lies instead of moving it
//! through link rings: an all-reduce costs each rank one read of every input byte it
//! reduces, one write of its result and one copy of each other result, about 4 bytes
//! of memory traffic per payload byte against 5 or more through the rings.
//!
//! Besides its buffers each rank owns one control page, mapped read-write by the
//! others of the host:
//!
//! ```text
//! line 0    header: magic, rank, pid, pid namespace          (written once, at creation)
//! line 1    state: attached / aborted / closed, abort cause  (owner)
//! line 2    flag: (seq << 32) | phase, low half is the futex word (owner)
//! line 3    this collective: seq, op/dtype/redop, count, root, buffers (owner)
//! line 4    seq + 1 of the last collective run over links     (owner)
//! line 5+w  rank w sleeps on this page's flag                 (waiter w only)
//! slots     two eager slots: a header line (seq, call) + EAGER_BYTES of data (owner)
//! ```
//!
//! No two ranks ever write one cache line. Protocol of one collective with sequence
//! number `s` (the communicator's, equal on every rank):
//!
//! 1. publish the call in line 3, then `flag = (s, ARRIVE)`; wait until every peer's
//!    flag has reached `(s, ARRIVE)` and check that its call matches;
//! 2. all-reduce: rank r reduces segment r chunk by chunk, reading the chunk from every
//!    rank's buffer in rank order 0..n (the fixed order makes results bitwise equal
//!    everywhere and independent of timing), writes it into its own buffer and
//!    publishes `flag = (s, CHUNK0 + c)`; it copies other segments' chunks from their
//!    owners as soon as they are published. Reduce-scatter, all-gather and broadcast
//!    read what they need from the peers' buffers directly;
//! 3. `flag = (s, EXIT)`; wait until every peer's flag has reached `(s, EXIT)`, so no
//!    buffer is handed back to its caller while a peer may still read it.
//!
//! Small all-reduces (at most [`eager_limit`]) need no shared buffers: every rank
//! copies its input into an eager slot of its control page with the call in the
//! slot's header, publishes `flag = (s, ARRIVE)`, waits for every peer's flag, checks
//! their headers and reduces all slots in rank order into its output. One flag
//! exchange and one read of each peer's slot, and no exit step: the slots alternate,
//! and a rank reuses a slot only after every peer has published the eager call that
//! followed the slot's last use, which it does only after reading that slot.
//!
//! Waiting spins briefly, yields, then sleeps on the peer's flag (`FUTEX_WAIT` on shared
//! memory, woken by the owner only when its sleep lines say someone sleeps). Sleeps
//! are sliced so a dead peer (its process has exited, zombie or not: see
//! [`crate::transport::shm::liveness`]), an aborted one, a peer that ran the collective
//! over links instead, or the timeout ends the wait with an error.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::Communicator;
use crate::algorithm::executor::{timeout_note, Buffers, ExecCtx};
use crate::algorithm::Call;
use crate::config::AlgoChoice;
use crate::dtype::{CollectiveOp, DataType, Element, ReduceOp};
use crate::error::{AbortCause, Error, Result};
use crate::reduce;
use crate::transport::shm::liveness::{own_pidns, PeerProcess};
use crate::transport::shm::segment::{self, Mapping, OwnedSegment, SegmentHandle};

const CTL_MAGIC: u64 = u64::from_le_bytes(*b"HCCLCTL2");
/// Elements of the flag's phase (low 32 bits).
const ARRIVE: u32 = 1;
/// Phase after chunk `c` of the owner's segment is reduced: `CHUNK0 + c`.
const CHUNK0: u32 = 2;
const EXIT: u32 = u32::MAX;

const ATTACHED: u32 = 1;
const ABORTED: u32 = 2;
const CLOSED: u32 = 3;

/// Bytes a rank reduces before publishing progress: small enough that the chunk is
/// still in cache when peers copy it, large enough that publishing costs nothing.
const CHUNK_BYTES: usize = 256 << 10;
/// Flag polls before yielding, then yields (at least this many, for at least
/// `YIELD_FOR`) before sleeping. Few: a peer on another core answers within a few
/// polls, and on an oversubscribed host every extra poll is time the awaited rank
/// cannot run (4 ranks on 2 cores: 200 polls took 2× as long per call as 20).
const SPINS: u32 = 32;
const YIELDS: u32 = 16;
const YIELD_FOR: Duration = Duration::from_micros(200);
/// Longest single sleep; between sleeps the waiter checks the peer and the timeout.
const SLEEP_SLICE: Duration = Duration::from_millis(10);
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// Fixed size of one rank's record in the allocation exchange.
const RECORD_BYTES: usize = 1024;
/// Phase value meaning "not given" in the published call.
const NONE: u64 = u64::MAX;
/// Size of an eager slot: the largest all-reduce, in bytes, that can run through the
/// control pages (when every rank shares one host and the algorithm is not forced).
pub(super) const EAGER_BYTES: usize = 64 << 10;

/// Largest all-reduce that takes the eager slots with `n` local ranks. Each rank reads
/// every peer's slot, `(n-1)·bytes`: with two ranks the ring overtakes it past 16 KiB
/// (32 KiB: 7.5 µs eager, 5.9–6.1 ring), with four it is still ahead at 64 KiB
/// (27–32 µs, against 39–65 through the links).
pub(super) fn eager_limit(n: usize) -> usize {
    if n <= 2 {
        16 << 10
    } else {
        EAGER_BYTES
    }
}

#[repr(C, align(64))]
struct CtlHeader {
    magic: u64,
    rank: u64,
    pid: u32,
    pidns: u64,
}

#[repr(C, align(64))]
struct Line(AtomicU64);

/// The owner's state and, once it aborted, why ([`AbortCause::to_word`], written
/// before the state).
#[repr(C, align(64))]
struct StateLine {
    state: AtomicU32,
    cause: AtomicU64,
}

/// The call a rank is running, for the peers to check and to find its buffers.
#[repr(C, align(64))]
struct CallLine {
    seq: AtomicU64,
    /// `op | dtype << 8 | redop << 16`.
    kind: AtomicU64,
    count: AtomicU64,
    root: AtomicU64,
    in_idx: AtomicU64,
    in_off: AtomicU64,
    out_idx: AtomicU64,
    out_off: AtomicU64,
}

#[repr(C)]
struct CtlPage {
    header: CtlHeader,
    state: StateLine,
    flag: Line,
    call: CallLine,
    link_seq: Line,
}

const SLEEP_LINES_AT: usize = std::mem::size_of::<CtlPage>();
const _: () = assert!(SLEEP_LINES_AT == 5 * 64);

/// Where the eager slots start on a control page of a host with `local_size` ranks.
fn eager_at(local_size: usize) -> usize {
    SLEEP_LINES_AT + 64 * local_size
}

/// One eager slot: a header line, then the data.
const EAGER_SLOT: usize = 64 + EAGER_BYTES;

fn ctl_bytes(local_size: usize) -> usize {
    eager_at(local_size) + 2 * EAGER_SLOT
}

/// Header of an eager slot: the call whose data follows.
#[repr(C, align(64))]
struct EagerHeader {
    seq: AtomicU64,
    kind: AtomicU64,
    count: AtomicU64,
}

/// This rank's view of the control pages of its host.
pub(super) struct NodeCtl {
    /// This rank's index among the host's ranks.
    me: usize,
    /// Global rank of each local index.
    ranks: Vec<usize>,
    /// Control page of each local rank (this one's included).
    pages: Vec<Mapping>,
    /// Each local rank's process, as its page's header names it (`None` for this one).
    procs: Vec<Option<PeerProcess>>,
    /// Eager all-reduces this rank has started; the parity picks the slot.
    eager_calls: AtomicU64,
}

impl NodeCtl {
    fn page(&self, l: usize) -> &CtlPage {
        // SAFETY: every page mapping is at least `ctl_bytes(n)` long (checked when
        // opened), lives as long as `self`, and all fields written after creation are
        // atomics.
        unsafe { &*self.pages[l].as_ptr().cast::<CtlPage>() }
    }

    /// The line on `owner`'s page that `waiter` sets while it sleeps on `owner`'s flag.
    fn sleep_line(&self, owner: usize, waiter: usize) -> &AtomicU32 {
        // SAFETY: as in `page`; line `waiter` < n lies inside the mapping.
        unsafe {
            &*self.pages[owner]
                .as_ptr()
                .add(SLEEP_LINES_AT + 64 * waiter)
                .cast::<AtomicU32>()
        }
    }

    fn n(&self) -> usize {
        self.pages.len()
    }

    /// Eager slot `parity` of local rank `l`: its header and its data.
    fn eager_slot(&self, l: usize, parity: usize) -> (&EagerHeader, *mut u8) {
        // SAFETY: every page mapping is `ctl_bytes(n)` long, which covers both slots;
        // the header's fields are atomics.
        unsafe {
            let at = self.pages[l]
                .as_ptr()
                .add(eager_at(self.n()) + parity * EAGER_SLOT);
            (&*at.cast::<EagerHeader>(), at.add(64))
        }
    }

    /// Publishes this rank's flag and wakes whoever sleeps on it.
    fn publish(&self, seq: u64, phase: u32) {
        let flag = &self.page(self.me).flag.0;
        // SeqCst store then SeqCst loads of the sleep lines, against the waiter's SeqCst
        // store of its sleep line then load of the flag: one of the two sees the other.
        flag.store(flag_value(seq, phase), Ordering::SeqCst);
        if (0..self.n())
            .any(|w| w != self.me && self.sleep_line(self.me, w).load(Ordering::SeqCst) != 0)
        {
            futex_wake(flag);
        }
    }

    fn set_aborted(&self, cause: AbortCause) {
        let p = self.page(self.me);
        p.state.cause.store(cause.to_word(), Ordering::Relaxed);
        p.state.state.store(ABORTED, Ordering::SeqCst);
        futex_wake(&p.flag.0);
    }
}

fn flag_value(seq: u64, phase: u32) -> u64 {
    ((seq & 0xffff_ffff) << 32) | phase as u64
}

/// Whether `v` is at or past `target`, with wrap-around: peers are never more than one
/// collective apart, so the difference is small.
fn reached(v: u64, target: u64) -> bool {
    (v.wrapping_sub(target) as i64) >= 0
}

fn low_half(a: &AtomicU64) -> *const u32 {
    let p = (a as *const AtomicU64).cast::<u32>();
    if cfg!(target_endian = "big") {
        p.wrapping_add(1)
    } else {
        p
    }
}

fn futex_wait(a: &AtomicU64, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the word is an aligned u32 inside a live shared mapping; FUTEX_WAIT (not
    // PRIVATE) keys on the shared page, so the owner's wake in another process reaches us.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            low_half(a),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

fn futex_wake(a: &AtomicU64) {
    // SAFETY: as in `futex_wait`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            low_half(a),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

/// One collective allocation: every local rank's buffer, mapped in this process.
struct Allocation {
    idx: u64,
    /// Indexed by local rank: this rank's read-write mapping, peers' read-only ones
    /// (`None` where buffers are not shared).
    maps: Vec<Option<Mapping>>,
}

#[derive(Default)]
struct Registry {
    /// Start address of this rank's buffer -> (end address, allocation index).
    by_addr: BTreeMap<usize, (usize, u64)>,
    by_idx: HashMap<u64, Weak<Allocation>>,
}

/// A communicator's shared allocations and control pages, also seen by its progress
/// thread.
pub(super) struct SharedState {
    rank: usize,
    pub(super) ctl: OnceLock<NodeCtl>,
    registry: Mutex<Registry>,
    /// Next allocation index; held for the whole of an allocation so two threads
    /// cannot interleave their exchanges.
    next_idx: Mutex<u64>,
    logged: Mutex<std::collections::HashSet<CollectiveOp>>,
    eager_logged: AtomicBool,
}

impl SharedState {
    pub(super) fn new(rank: usize) -> Arc<Self> {
        Arc::new(SharedState {
            rank,
            ctl: OnceLock::new(),
            registry: Mutex::new(Registry::default()),
            next_idx: Mutex::new(0),
            logged: Mutex::new(Default::default()),
            eager_logged: AtomicBool::new(false),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared allocation holding `bytes` bytes at `ptr`, and the offset of `ptr` in it.
    fn lookup(&self, ptr: usize, bytes: usize) -> Option<(u64, usize)> {
        let reg = self.registry();
        let (&start, &(end, idx)) = reg.by_addr.range(..=ptr).next_back()?;
        (ptr.checked_add(bytes)? <= end).then_some((idx, ptr - start))
    }

    /// Called by the progress thread before it runs collective `seq` over links, so a
    /// peer waiting for it on the direct path learns the two disagree.
    pub(super) fn note_link_op(&self, seq: u64) {
        if let Some(c) = self.ctl.get() {
            c.page(c.me)
                .link_seq
                .0
                .store(seq.wrapping_add(1), Ordering::Release);
        }
    }

    /// Tells the peers this rank's communicator failed, and why.
    pub(super) fn abort(&self, cause: AbortCause) {
        if let Some(c) = self.ctl.get() {
            c.set_aborted(cause);
        }
    }

    /// Tells the peers this rank's communicator is gone (unless it aborted before).
    pub(super) fn close(&self) {
        if let Some(c) = self.ctl.get() {
            let p = c.page(c.me);
            let _ = p.state.state.compare_exchange(
                ATTACHED,
                CLOSED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            futex_wake(&p.flag.0);
        }
    }
}

/// A buffer of `len` elements allocated by [`Communicator::alloc_shared`]: memory that
/// every rank of this host can read, so collectives on it (or on a sub-slice of it)
/// take the direct path when all ranks share one host. Derefs to this rank's `[T]`.
///
/// Zero-filled at allocation. It stays valid after the communicator is gone; dropping
/// it is local (no collective) and unmaps this rank's view of every rank's buffer.
pub struct SharedBuf<T: Element> {
    alloc: Arc<Allocation>,
    ptr: *mut T,
    len: usize,
    state: Weak<SharedState>,
    _owns: PhantomData<T>,
}

// SAFETY: the buffer is this process's exclusive view of its own memory (peers only
// read it, and only inside collectives that borrow it mutably); `T: Send + Sync`.
unsafe impl<T: Element> Send for SharedBuf<T> {}
// SAFETY: `&SharedBuf` only gives `&[T]`.
unsafe impl<T: Element> Sync for SharedBuf<T> {}

impl<T: Element> SharedBuf<T> {
    /// Allocation number (equal on every rank for the same `alloc_shared` call).
    pub fn index(&self) -> u64 {
        self.alloc.idx
    }

    /// Whether peers of this host map this buffer (false for one rank alone, with
    /// `HETCCL_SHM_DISABLE=1`, or when this rank has no peer on its host).
    pub fn is_shared(&self) -> bool {
        self.alloc.maps.iter().filter(|m| m.is_some()).count() > 1
    }

    /// Whether the memory is backed by huge pages (hugetlb).
    pub fn huge_pages(&self) -> bool {
        self.alloc
            .maps
            .iter()
            .flatten()
            .next()
            .is_some_and(|m| m.huge_pages())
    }
}

impl<T: Element> std::ops::Deref for SharedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points at `len` initialised (zero-filled, Pod) elements of this
        // rank's mapping, which `alloc` keeps alive; peers never write it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Element> std::ops::DerefMut for SharedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference in-process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Element> std::fmt::Debug for SharedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf")
            .field("index", &self.alloc.idx)
            .field("len", &self.len)
            .field("dtype", &T::DTYPE)
            .finish()
    }
}

impl<T: Element> Drop for SharedBuf<T> {
    fn drop(&mut self) {
        if let Some(s) = self.state.upgrade() {
            let mut reg = s.registry();
            reg.by_addr.remove(&(self.ptr as usize));
            reg.by_idx.remove(&self.alloc.idx);
        }
    }
}

/// What each rank says in the two rounds of an allocation.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Record {
    pid: u32,
    pidns: u64,
    ctl: Option<(SegmentHandle, u64)>,
    buf: Option<(SegmentHandle, u64)>,
    error: Option<String>,
    /// The error may go away with named segments (a memfd could not be opened).
    retry_named: bool,
}

/// Segments this rank made in one round, before they are exchanged.
struct Made {
    ctl: Option<OwnedSegment>,
    buf: OwnedSegment,
}

/// What the peers' segments became in this process.
struct Opened {
    ctl: Vec<Option<Mapping>>,
    buf: Vec<Option<Mapping>>,
}

impl Communicator {
    /// Allocates `len` elements of `T` in memory every rank of this host maps, and
    /// returns this rank's buffer. Collective: every rank calls it, in the same order
    /// relative to the other collectives, with the same `len`.
    ///
    /// When all ranks run on one host, `all_reduce`, `reduce_scatter`, `all_gather`
    /// and `broadcast` on (sub-slices of) these buffers reduce and copy straight from
    /// the peers' memory instead of through link rings; see [`SharedBuf`]. Which
    /// buffer takes part is found from the slice's address: pass `&mut buf[..]` or
    /// any sub-slice, on every rank.
    pub fn alloc_shared<T: Element>(&self, len: usize) -> Result<SharedBuf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            Error::invalid(
                "alloc_shared",
                format!("{len} elements of {} overflow the address space", T::DTYPE),
            )
        })?;
        let state = &self.shared;
        let mut next = state.next_idx.lock().unwrap_or_else(|p| p.into_inner());
        let idx = *next;
        let share = !self.cfg.shm_disable && self.local_size() > 1;
        let mut result = self.alloc_round(idx, bytes, share, false)?;
        if result.is_none() {
            tracing::info!(
                rank = self.rank,
                "shared buffer #{idx}: a peer cannot open memfd segments through /proc; \
                 using named /dev/shm segments"
            );
            result = self.alloc_round(idx, bytes, share, true)?;
        }
        let Some((ctl, alloc)) = result else {
            return Err(Error::Shm(format!(
                "rank {}: shared buffer #{idx}: peers could not map each other's segments",
                self.rank
            )));
        };
        *next += 1;
        if let Some(ctl) = ctl {
            // Only the first allocation makes control pages, under `next_idx`'s lock.
            let _ = state.ctl.set(ctl);
        }
        let me = self.local_rank();
        let mine = alloc.maps[me]
            .as_ref()
            .map(|m| m.as_ptr())
            .ok_or_else(|| Error::Shm(format!("rank {}: own buffer not mapped", self.rank)))?;
        let alloc = Arc::new(alloc);
        {
            let mut reg = state.registry();
            reg.by_addr
                .insert(mine as usize, (mine as usize + bytes, idx));
            reg.by_idx.insert(idx, Arc::downgrade(&alloc));
        }
        tracing::debug!(
            rank = self.rank,
            bytes,
            "shared buffer #{idx}: {len} x {}, shared with {} local ranks",
            T::DTYPE,
            if share { self.local_size() } else { 1 }
        );
        Ok(SharedBuf {
            alloc,
            ptr: mine.cast::<T>(),
            len,
            state: Arc::downgrade(state),
            _owns: PhantomData,
        })
    }

    /// Maps the control pages of this host's ranks when the whole job runs on one
    /// host, so that small all-reduces take the eager path with no shared buffer
    /// allocated. Collective. Pages that cannot be made are not an error (every rank
    /// learns it in the same exchange, and the calls then run over links).
    /// Numbering restarts afterwards, so the caller's first collective is still #0.
    pub(super) fn attach_node(&mut self) -> Result<()> {
        if self.world_size < 2
            || self.local_size() != self.world_size
            || self.cfg.shm_disable
            || self.shared.ctl.get().is_some()
        {
            return Ok(());
        }
        // The pages' flags start at the current sequence number: restart it first.
        self.restart_numbering();
        let made = match self.alloc_shared::<u8>(0) {
            Ok(_) => Ok(()),
            Err(Error::Shm(e)) => {
                tracing::info!(
                    rank = self.rank,
                    "no control pages, small all_reduce runs over links: {e}"
                );
                Ok(())
            }
            Err(e) => Err(e),
        };
        // The allocation's own exchanges went over links; the flags still say 0.
        self.seq.store(0, Ordering::Relaxed);
        made
    }

    /// One attempt at an allocation: make, exchange, open, exchange, release. `Ok(None)`
    /// when every failure was a memfd that could not be opened (retry with names).
    #[allow(clippy::type_complexity)]
    fn alloc_round(
        &self,
        idx: u64,
        bytes: usize,
        share: bool,
        named: bool,
    ) -> Result<Option<(Option<NodeCtl>, Allocation)>> {
        let rank = self.rank;
        let node = &self.topo.nodes[self.topo.node_of[rank]];
        let n = node.len();
        let me = self.local_rank();
        let need_ctl = share && self.shared.ctl.get().is_none();
        let name = |what: &str| {
            named.then(|| {
                format!(
                    "hetccl-{}-{what}-{idx}-{rank}-{:016x}",
                    std::process::id(),
                    rand::random::<u64>()
                )
            })
        };
        let made = (|| -> Result<Made> {
            let ctl = if need_ctl {
                let what = format!("rank {rank}: control page");
                let s = OwnedSegment::create(ctl_bytes(n), name("ctl").as_deref(), &what)?;
                // SAFETY: fresh zero-filled mapping of at least one page that no other
                // process has yet.
                unsafe {
                    std::ptr::write(
                        s.mapping().as_ptr().cast::<CtlHeader>(),
                        CtlHeader {
                            magic: CTL_MAGIC,
                            rank: rank as u64,
                            pid: std::process::id(),
                            pidns: own_pidns(),
                        },
                    );
                    let page = &*s.mapping().as_ptr().cast::<CtlPage>();
                    // Flags start at the current sequence number, so the first
                    // comparisons after a wrap of 2^31 collectives stay right.
                    page.flag.0.store(
                        flag_value(self.seq.load(Ordering::Relaxed), 0),
                        Ordering::Relaxed,
                    );
                    page.state.state.store(ATTACHED, Ordering::Release);
                }
                Some(s)
            } else {
                None
            };
            let what = format!("rank {rank}: shared buffer #{idx}");
            let buf = OwnedSegment::create(bytes, name("buf").as_deref(), &what)?;
            Ok(Made { ctl, buf })
        })();
        // The inode lets an opener check it mapped the segment it was told about (a pid
        // from another pid namespace would name some other process's descriptor).
        let handle = |s: &OwnedSegment| (s.handle().clone(), s.mapping().inode());
        let first = match &made {
            Ok(m) => Record {
                pid: std::process::id(),
                pidns: own_pidns(),
                ctl: m.ctl.as_ref().map(handle),
                buf: Some(handle(&m.buf)),
                ..Record::default()
            },
            Err(e) => Record {
                error: Some(e.to_string()),
                ..Record::default()
            },
        };
        let records = self.exchange(&first)?;
        let mut made = made?;
        if let Some((r, e)) = first_error(&records) {
            return Err(Error::Shm(format!(
                "rank {rank}: shared buffer #{idx}: rank {r} failed: {e}"
            )));
        }

        // Map every other local rank's segments.
        let opened = (|| -> Result<Opened> {
            let mut o = Opened {
                ctl: (0..n).map(|_| None).collect(),
                buf: (0..n).map(|_| None).collect(),
            };
            if !share {
                return Ok(o);
            }
            for (l, &peer) in node.iter().enumerate() {
                if l == me {
                    continue;
                }
                let rec = &records[peer];
                let what = format!("rank {rank}: shared buffer #{idx} of rank {peer}");
                if need_ctl {
                    let (h, ino) = rec.ctl.as_ref().ok_or_else(|| {
                        Error::Shm(format!("{what}: rank {peer} sent no control page"))
                    })?;
                    let m = open_checked(h, *ino, rec, ctl_bytes(n), true, &what)?;
                    // SAFETY: at least one page, written by its owner before the exchange.
                    let hdr = unsafe { std::ptr::read(m.as_ptr().cast::<CtlHeader>()) };
                    hdr.check(peer)
                        .map_err(|e| Error::Shm(format!("{what}: its control page: {e}")))?;
                    o.ctl[l] = Some(m);
                }
                let (h, ino) = rec
                    .buf
                    .as_ref()
                    .ok_or_else(|| Error::Shm(format!("{what}: rank {peer} sent no buffer")))?;
                o.buf[l] = Some(open_checked(h, *ino, rec, bytes, false, &what)?);
            }
            Ok(o)
        })();
        let second = match &opened {
            Ok(_) => Record::default(),
            Err(e) => Record {
                error: Some(e.to_string()),
                retry_named: !named && matches!(e, Error::Shm(s) if s.contains(RETRY_MARK)),
                ..Record::default()
            },
        };
        let statuses = self.exchange(&second);
        // Everyone has mapped what it could (or given up): drop the ways in, so nothing
        // outlives the mappings.
        if let Some(c) = made.ctl.as_mut() {
            c.release();
        }
        made.buf.release();
        let statuses = statuses?;
        if let Some((r, e)) = first_error(&statuses) {
            if statuses.iter().all(|s| s.error.is_none() || s.retry_named) {
                tracing::debug!(rank, "shared buffer #{idx}: rank {r}: {e}");
                return Ok(None);
            }
            return Err(Error::Shm(format!(
                "rank {rank}: shared buffer #{idx}: rank {r} could not map its peers' segments: {e}"
            )));
        }
        let mut opened = opened?;

        let ctl = made.ctl.map(|c| {
            let mut pages = Vec::with_capacity(n);
            let mut own = Some(c.into_mapping());
            for (l, m) in opened.ctl.iter_mut().enumerate() {
                if l == me {
                    pages.extend(own.take());
                } else {
                    pages.extend(m.take());
                }
            }
            // Watched from now on, while every peer is known to be alive (it has just
            // taken part in the exchange).
            let procs = (0..pages.len())
                .map(|l| {
                    (l != me).then(|| {
                        // SAFETY: every page is at least one page long; its header is
                        // plain data written once before the page was shared.
                        let h = unsafe { std::ptr::read(pages[l].as_ptr().cast::<CtlHeader>()) };
                        PeerProcess::watch(h.pid as i32, h.pidns)
                    })
                })
                .collect();
            NodeCtl {
                me,
                ranks: node.clone(),
                pages,
                procs,
                eager_calls: AtomicU64::new(0),
            }
        });
        if let Some(c) = &ctl {
            if c.pages.len() != n {
                return Err(Error::Shm(format!(
                    "rank {rank}: mapped {} of {n} control pages",
                    c.pages.len()
                )));
            }
        }
        let mut maps = opened.buf;
        maps[me] = Some(made.buf.into_mapping());
        Ok(Some((ctl, Allocation { idx, maps })))
    }

    /// All-gathers one fixed-size record per rank over the communicator itself.
    fn exchange(&self, rec: &Record) -> Result<Vec<Record>> {
        let mut rec = rec.clone();
        if let Some(e) = &mut rec.error {
            if e.len() > RECORD_BYTES / 2 {
                let mut cut = RECORD_BYTES / 2;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
        }
        let mut blob = serde_json::to_vec(&rec)
            .map_err(|e| Error::Shm(format!("encoding a shared-buffer record: {e}")))?;
        if blob.len() > RECORD_BYTES {
            return Err(Error::Shm(format!(
                "shared-buffer record of {} bytes exceeds {RECORD_BYTES}",
                blob.len()
            )));
        }
        blob.resize(RECORD_BYTES, b' ');
        let mut all = vec![0u8; RECORD_BYTES * self.world_size];
        self.all_gather(&blob, &mut all)?;
        all.chunks(RECORD_BYTES)
            .enumerate()
            .map(|(r, b)| parse_record(r, b))
            .collect()
    }
}

/// Reads rank `r`'s record of an allocation exchange (at most [`RECORD_BYTES`] from a
/// peer: JSON padded with spaces).
fn parse_record(r: usize, b: &[u8]) -> Result<Record> {
    if b.len() > RECORD_BYTES {
        return Err(Error::Shm(format!(
            "rank {r} sent a shared-buffer record of {} bytes, more than {RECORD_BYTES}",
            b.len()
        )));
    }
    serde_json::from_slice::<Record>(b).map_err(|e| {
        Error::Shm(format!(
            "rank {r} sent an unreadable shared-buffer record: {e}"
        ))
    })
}

impl CtlHeader {
    /// Checks the header of a control page that local rank `peer`'s process wrote.
    fn check(&self, peer: usize) -> std::result::Result<(), String> {
        if self.magic != CTL_MAGIC {
            return Err(format!(
                "it is not a hetccl control page of this build (magic {:#018x})",
                self.magic
            ));
        }
        if self.rank != peer as u64 {
            return Err(format!(
                "it is rank {}'s control page, not rank {peer}'s",
                self.rank
            ));
        }
        Ok(())
    }
}

/// Marks open failures that named segments may avoid.
const RETRY_MARK: &str = "(memfd not reachable)";

fn first_error(recs: &[Record]) -> Option<(usize, &str)> {
    recs.iter()
        .enumerate()
        .find_map(|(r, x)| x.error.as_deref().map(|e| (r, e)))
}

/// Opens a peer's segment and checks it is the one the peer made.
fn open_checked(
    h: &SegmentHandle,
    ino: u64,
    rec: &Record,
    min_bytes: usize,
    writable: bool,
    what: &str,
) -> Result<Mapping> {
    let memfd = matches!(h, SegmentHandle::Memfd { .. });
    if memfd && rec.pidns != own_pidns() {
        return Err(Error::Shm(format!(
            "{what}: the peer lives in another pid namespace {RETRY_MARK}"
        )));
    }
    let m = segment::open(h, min_bytes, writable, what).map_err(|e| match e {
        Error::Shm(s) if memfd => Error::Shm(format!("{s} {RETRY_MARK}")),
        other => other,
    })?;
    if m.inode() != ino {
        return Err(Error::Shm(format!(
            "{what}: the segment opened is not the one the peer made {RETRY_MARK}"
        )));
    }
    Ok(m)
}

/// A collective that runs on shared buffers instead of links; see the module docs.
pub(super) struct Direct {
    state: Arc<SharedState>,
    /// `(allocation, byte offset)` of this rank's input when peers can read it there.
    input: Option<(u64, usize)>,
    /// The same for the output.
    output: Option<(u64, usize)>,
    /// Broadcast root (global rank).
    root: usize,
    /// Copy with streaming stores (large outputs; see `Config::stream_min_bytes`).
    stream: bool,
    /// A small all-reduce through the eager slots (buffers need not be shared).
    eager: bool,
    /// One buffer: a reduce-scatter's result goes to this rank's block of it, an
    /// all-gather's own block is in place already.
    in_place: bool,
}

/// Picks the direct path for `call` when every rank shares this host and this rank's
/// buffers are shared ones: all_reduce needs a shared output (a private input is first
/// copied into it), reduce_scatter and all_gather a shared input (in place, the one
/// buffer), broadcast a shared buffer. Every rank decides from its own buffers; ranks
/// that decide differently are caught in the entry step and get [`Error::Mismatch`].
pub(super) fn plan(
    comm: &Communicator,
    call: &Call,
    input: (*const u8, usize),
    output: (*mut u8, usize),
) -> Option<Direct> {
    let state = &comm.shared;
    let n = comm.world_size;
    if n < 2 || comm.local_size() != n || state.ctl.get().is_none() {
        return None;
    }
    if call.op == CollectiveOp::AllReduce
        && call.count * call.dtype.size() <= eager_limit(n)
        && comm.cfg.algo == AlgoChoice::Auto
    {
        // A load first: the swap (a write) happens once, not on every small call.
        if !state.eager_logged.load(Ordering::Relaxed)
            && !state.eager_logged.swap(true, Ordering::Relaxed)
            && comm.rank == 0
        {
            tracing::info!(
                rank = comm.rank,
                "all_reduce of at most {} bytes: eager algorithm through the control pages \
                 of {n} local ranks",
                eager_limit(n)
            );
        }
        return Some(Direct {
            state: state.clone(),
            input: None,
            output: None,
            root: 0,
            stream: false,
            eager: true,
            in_place: call.in_place,
        });
    }
    let look = |p: usize, len: usize| state.lookup(p, len);
    let out = look(output.0 as usize, output.1);
    let block = call.count * call.dtype.size();
    let inp = match (call.in_place, call.op) {
        // Peers read an in-place all-gather's input at this rank's block of the buffer.
        (true, CollectiveOp::AllGather) => look(output.0 as usize + comm.rank * block, block),
        (true, _) => out,
        (false, _) => look(input.0 as usize, input.1),
    };
    let out_bytes = output.1;
    let (input, output) = match call.op {
        CollectiveOp::AllReduce => (inp, Some(out?)),
        CollectiveOp::ReduceScatter | CollectiveOp::AllGather => (Some(inp?), None),
        CollectiveOp::Broadcast => (None, Some(out?)),
        _ => return None,
    };
    let first = state
        .logged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(call.op);
    if first && comm.rank == 0 {
        tracing::info!(
            rank = comm.rank,
            "{} on shared buffers: direct algorithm over {n} local ranks",
            call.op
        );
    }
    Some(Direct {
        state: state.clone(),
        input,
        output,
        root: call.root,
        stream: out_bytes >= comm.cfg.stream_min_bytes,
        eager: false,
        in_place: call.in_place,
    })
}

/// Where a peer's data lies in this process, for one collective.
struct PeerView {
    input: *const u8,
    output: *const u8,
}

/// One run of a direct collective on the progress thread.
struct Run<'a> {
    node: &'a NodeCtl,
    ctx: &'a ExecCtx,
    /// Set by `Communicator::abort`.
    cancel: &'a AtomicBool,
    /// Keeps the peers' mappings used by this collective alive.
    _held: Vec<Arc<Allocation>>,
    stream: bool,
    /// A small all-reduce through the eager slots.
    eager: bool,
}

impl Direct {
    /// Runs the collective; on error the caller breaks the communicator (which marks
    /// this rank aborted for the peers).
    pub(super) fn execute(&self, bufs: &Buffers, ctx: &ExecCtx, cancel: &AtomicBool) -> Result<()> {
        let Some(node) = self.state.ctl.get() else {
            return Err(Error::Shm(format!(
                "rank {}: direct {} without control pages",
                self.state.rank, ctx.op
            )));
        };
        if self.eager {
            return self.execute_eager(node, bufs, ctx, cancel);
        }
        let me = node.me;
        let size = ctx.dtype.size();
        let count = ctx.count as usize;
        let mut input = self.input;
        if ctx.op == CollectiveOp::AllReduce && input.is_none() {
            // A private input: copy it into the shared output, where peers can read it.
            if bufs.input_len > 0 {
                // SAFETY: the communicator checked both buffers hold `count` elements;
                // they are distinct (a private input is not inside a shared buffer).
                unsafe { std::ptr::copy_nonoverlapping(bufs.input, bufs.output, bufs.input_len) };
            }
            input = self.output;
        }

        // 1. Entry: publish the call, wait for every peer's.
        let line = &node.page(me).call;
        let (in_idx, in_off) = input.map_or((NONE, 0), |(i, o)| (i, o as u64));
        let (out_idx, out_off) = self.output.map_or((NONE, 0), |(i, o)| (i, o as u64));
        line.seq.store(ctx.seq, Ordering::Relaxed);
        line.kind.store(call_kind(ctx), Ordering::Relaxed);
        line.count.store(ctx.count, Ordering::Relaxed);
        line.root.store(self.root as u64, Ordering::Relaxed);
        line.in_idx.store(in_idx, Ordering::Relaxed);
        line.in_off.store(in_off, Ordering::Relaxed);
        line.out_idx.store(out_idx, Ordering::Relaxed);
        line.out_off.store(out_off, Ordering::Relaxed);
        node.publish(ctx.seq, ARRIVE);
        let mut run = Run {
            node,
            ctx,
            cancel,
            _held: Vec::new(),
            stream: self.stream,
            eager: false,
        };
        for l in 0..node.n() {
            if l != me {
                run.wait(l, ARRIVE, "to start the collective")?;
            }
        }
        let views = run.views(&self.state, bufs, count * size)?;

        // 2. The collective itself.
        crate::dispatch_dtype!(ctx.dtype, T => match ctx.op {
            CollectiveOp::AllReduce => run.all_reduce::<T>(&views, bufs)?,
            CollectiveOp::ReduceScatter => {
                // In place, the result is this rank's block of the one buffer.
                let at = if self.in_place { me * count * size } else { 0 };
                // SAFETY: in place the buffer holds n x count elements.
                run.reduce_scatter::<T>(&views, unsafe { bufs.output.add(at) })?
            }
            CollectiveOp::AllGather => run.all_gather(&views, bufs, count * size, self.in_place),
            CollectiveOp::Broadcast => run.broadcast(&views, bufs, count * size, self.root),
            _ => {}
        });

        // 3. Exit: nobody returns while a peer may still read its buffer.
        node.publish(ctx.seq, EXIT);
        for l in 0..node.n() {
            if l != me {
                run.wait(l, EXIT, "to finish reading this rank's buffer")?;
            }
        }
        Ok(())
    }
}

impl Direct {
    /// A small all-reduce through the eager slots (see the module docs).
    fn execute_eager(
        &self,
        node: &NodeCtl,
        bufs: &Buffers,
        ctx: &ExecCtx,
        cancel: &AtomicBool,
    ) -> Result<()> {
        let me = node.me;
        let n = node.n();
        let bytes = bufs.output_len;
        if bytes > EAGER_BYTES || bufs.input_len != bytes {
            return Err(Error::invalid(
                "all_reduce",
                format!("eager path given {} -> {bytes} bytes", bufs.input_len),
            ));
        }
        let parity = (node.eager_calls.fetch_add(1, Ordering::Relaxed) & 1) as usize;
        let kind = call_kind(ctx);
        // The call line too, so a peer that took the shared-buffer path instead can say
        // what this rank runs.
        let line = &node.page(me).call;
        line.seq.store(ctx.seq, Ordering::Relaxed);
        line.kind.store(kind, Ordering::Relaxed);
        line.count.store(ctx.count, Ordering::Relaxed);
        line.root.store(NONE, Ordering::Relaxed);
        line.in_idx.store(NONE, Ordering::Relaxed);
        line.out_idx.store(NONE, Ordering::Relaxed);
        let (head, data) = node.eager_slot(me, parity);
        // SAFETY: the slot holds EAGER_BYTES >= bytes; no peer reads it until the flag
        // below says so, and every peer has finished with this slot's previous call
        // (module docs).
        unsafe { std::ptr::copy_nonoverlapping(bufs.input, data, bytes) };
        head.seq.store(ctx.seq, Ordering::Relaxed);
        head.kind.store(kind, Ordering::Relaxed);
        head.count.store(ctx.count, Ordering::Relaxed);
        node.publish(ctx.seq, ARRIVE);

        let run = Run {
            node,
            ctx,
            cancel,
            _held: Vec::new(),
            stream: false,
            eager: true,
        };
        for l in (0..n).filter(|&l| l != me) {
            run.wait(l, ARRIVE, "to start the collective")?;
            let (h, _) = node.eager_slot(l, parity);
            let got = (
                h.seq.load(Ordering::Relaxed),
                h.kind.load(Ordering::Relaxed),
                h.count.load(Ordering::Relaxed),
            );
            if got != (ctx.seq, kind, ctx.count) {
                let peer = run.err_peer(l);
                let detail = if got.0 == ctx.seq {
                    format!(
                        "expected {}, peer runs {}",
                        describe(ctx.seq, kind, ctx.count, 0),
                        describe(got.0, got.1, got.2, 0)
                    )
                } else {
                    format!(
                        "rank {} runs it as a small all_reduce ({bytes} bytes), peer {peer} \
                         as something else (the ranks disagree on the count or the collective)",
                        ctx.rank
                    )
                };
                return Err(Error::Mismatch {
                    rank: ctx.rank,
                    peer,
                    op: ctx.op,
                    seq: ctx.seq,
                    detail,
                });
            }
        }
        crate::dispatch_dtype!(ctx.dtype, T => {
            let count = ctx.count as usize;
            // SAFETY: the output holds `count` elements and belongs to this call; every
            // slot holds `count` elements that stay unchanged until this rank publishes
            // its next eager call (module docs), and no slot overlaps the output.
            let out = unsafe { std::slice::from_raw_parts_mut(bufs.output.cast::<T>(), count) };
            let src = |l: usize| unsafe {
                std::slice::from_raw_parts(node.eager_slot(l, parity).1.cast::<T>().cast_const(), count)
            };
            if n == 1 {
                out.copy_from_slice(src(0));
            } else {
                reduce::reduce_from(ctx.redop, out, src(0), src(1));
                for l in 2..n {
                    reduce::reduce_inplace(ctx.redop, out, src(l));
                }
            }
            reduce::reduce_finalize(ctx.redop, out, ctx.world_size);
        });
        Ok(())
    }
}

fn call_kind(ctx: &ExecCtx) -> u64 {
    ctx.op as u64 | (ctx.dtype as u64) << 8 | (ctx.redop as u64) << 16
}

fn describe(seq: u64, kind: u64, count: u64, root: u64) -> String {
    let op = CollectiveOp::from_u8(kind as u8);
    let dtype = DataType::from_u8((kind >> 8) as u8).map_or("?", |d| d.name());
    let redop = ReduceOp::from_u8((kind >> 16) as u8).map_or("?", |o| o.name());
    let name = op.map_or("unknown op", |o| o.name());
    match op {
        Some(CollectiveOp::Broadcast) => {
            format!("{name} #{seq} of {count} x {dtype} from root {root}")
        }
        Some(CollectiveOp::AllGather) => format!("{name} #{seq} of {count} x {dtype}"),
        _ => format!("{name} #{seq} of {count} x {dtype} ({redop} op)"),
    }
}

impl Run<'_> {
    /// Copies bytes that this rank will not read back soon: with streaming stores for
    /// large outputs, which saves reading the destination's old contents.
    ///
    /// # Safety
    /// As `std::ptr::copy_nonoverlapping`.
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the caller's contract.
        unsafe { reduce::copy_bytes(dst, src, len, self.stream) }
    }

    /// `dst = srcs[0] (op) srcs[1] ...` over `len` elements ([`reduce::reduce_n`]), with
    /// streaming stores for large outputs like [`Run::copy`].
    ///
    /// # Safety
    /// As [`reduce::reduce_n`].
    unsafe fn reduce<T: Element>(&self, dst: *mut T, srcs: &[*const T], len: usize) {
        let (op, world) = (self.ctx.redop, self.ctx.world_size);
        // SAFETY: the caller's contract.
        unsafe {
            if self.stream {
                reduce::reduce_n_streaming::<T>(op, dst, srcs, len, world)
            } else {
                reduce::reduce_n::<T>(op, dst, srcs, len, world)
            }
        }
    }

    fn err_peer(&self, l: usize) -> usize {
        self.node.ranks[l]
    }

    /// Waits until local rank `l`'s flag reaches `(seq, phase)`.
    fn wait(&self, l: usize, phase: u32, what: &'static str) -> Result<()> {
        let target = flag_value(self.ctx.seq, phase);
        let page = self.node.page(l);
        let flag = &page.flag.0;
        for _ in 0..SPINS {
            if reached(flag.load(Ordering::Acquire), target) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let start = Instant::now();
        // Yield (a peer may be waiting for this core) for up to YIELD_FOR before sleeping:
        // a futex wake-up costs more than that on a busy machine.
        let mut k = 0u32;
        while k < YIELDS || start.elapsed() < YIELD_FOR {
            std::thread::yield_now();
            if reached(flag.load(Ordering::Acquire), target) {
                return Ok(());
            }
            k += 1;
        }
        let mut last_check = start;
        let sleep = self.node.sleep_line(l, self.node.me);
        loop {
            sleep.store(1, Ordering::SeqCst);
            let v = flag.load(Ordering::SeqCst);
            if reached(v, target) {
                sleep.store(0, Ordering::Relaxed);
                return Ok(());
            }
            futex_wait(flag, v as u32, SLEEP_SLICE);
            sleep.store(0, Ordering::Relaxed);
            if reached(flag.load(Ordering::Acquire), target) {
                return Ok(());
            }
            let now = Instant::now();
            if now.duration_since(last_check) >= CHECK_EVERY {
                last_check = now;
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Broken(format!(
                        "rank {}: {} #{} aborted by the application",
                        self.ctx.rank, self.ctx.op, self.ctx.seq
                    )));
                }
                self.check_peer(l)?;
                let waited = now.duration_since(start);
                if waited >= self.ctx.timeout {
                    let peer = self.err_peer(l);
                    let seen = self.node.procs[l].as_ref().and_then(|p| p.stopped());
                    return Err(Error::Timeout {
                        rank: self.ctx.rank,
                        peer,
                        op: self.ctx.op,
                        seq: self.ctx.seq,
                        after: waited,
                        what,
                        note: timeout_note(peer, self.ctx.world_size, seen),
                    });
                }
            }
        }
    }

    /// Errors when local rank `l` cannot make progress any more.
    fn check_peer(&self, l: usize) -> Result<()> {
        let page = self.node.page(l);
        let peer = self.err_peer(l);
        let lost = |detail: String| Error::PeerLost {
            rank: self.ctx.rank,
            peer,
            op: self.ctx.op,
            seq: self.ctx.seq,
            detail,
        };
        match page.state.state.load(Ordering::Acquire) {
            ABORTED => {
                return Err(
                    match AbortCause::from_word(page.state.cause.load(Ordering::Relaxed)) {
                        Some(cause) => Error::PeerGaveUp {
                            rank: self.ctx.rank,
                            peer,
                            op: self.ctx.op,
                            seq: self.ctx.seq,
                            cause,
                            note: String::new(),
                        },
                        None => lost(format!(
                            "peer {peer}'s communicator failed (shared-buffer control page \
                             says aborted)"
                        )),
                    },
                )
            }
            CLOSED => return Err(lost(format!("peer {peer} closed its communicator"))),
            _ => {}
        }
        if let Some(p) = self.node.procs[l].as_ref().filter(|p| p.exited()) {
            return Err(lost(format!(
                "peer {peer} (pid {}) process has exited",
                p.pid()
            )));
        }
        let ls = page.link_seq.0.load(Ordering::Acquire);
        if ls != 0 && reached(ls.wrapping_sub(1), self.ctx.seq) {
            return Err(Error::Mismatch {
                rank: self.ctx.rank,
                peer,
                op: self.ctx.op,
                seq: self.ctx.seq,
                detail: if self.eager {
                    format!(
                        "rank {} runs it as a small all_reduce through shared memory, peer \
                         {peer} over links (the ranks disagree on the count or the collective)",
                        self.ctx.rank
                    )
                } else {
                    format!(
                        "rank {} runs it on shared buffers, peer {peer} over links (pass \
                         buffers from alloc_shared on every rank, or on none)",
                        self.ctx.rank
                    )
                },
            });
        }
        Ok(())
    }

    /// Checks every peer's published call against ours and finds its buffers here.
    fn views(
        &mut self,
        state: &SharedState,
        bufs: &Buffers,
        bytes: usize,
    ) -> Result<Vec<PeerView>> {
        let ctx = self.ctx;
        let node = self.node;
        let me = node.me;
        let mine = node.page(me);
        let want = (
            ctx.seq,
            call_kind(ctx),
            ctx.count,
            mine.call.root.load(Ordering::Relaxed),
        );
        let reg = state.registry();
        let mut views = Vec::with_capacity(self.node.n());
        for l in 0..self.node.n() {
            if l == me {
                views.push(PeerView {
                    input: bufs.input,
                    output: bufs.output,
                });
                continue;
            }
            let peer = self.err_peer(l);
            let c = &node.page(l).call;
            let got = (
                c.seq.load(Ordering::Relaxed),
                c.kind.load(Ordering::Relaxed),
                c.count.load(Ordering::Relaxed),
                c.root.load(Ordering::Relaxed),
            );
            let mismatch = |detail: String| Error::Mismatch {
                rank: ctx.rank,
                peer,
                op: ctx.op,
                seq: ctx.seq,
                detail,
            };
            if got != want {
                return Err(mismatch(format!(
                    "expected {}, peer runs {}",
                    describe(want.0, want.1, want.2, want.3),
                    describe(got.0, got.1, got.2, got.3)
                )));
            }
            let mut find = |idx: u64, off: u64, need: usize, which: &str| -> Result<*const u8> {
                if idx == NONE {
                    return Ok(std::ptr::null());
                }
                let alloc = reg.by_idx.get(&idx).and_then(Weak::upgrade).ok_or_else(|| {
                    mismatch(format!(
                        "peer {peer}'s {which} is in shared buffer #{idx}, which this rank has freed"
                    ))
                })?;
                let m = alloc.maps[l].as_ref().ok_or_else(|| {
                    mismatch(format!(
                        "shared buffer #{idx} of peer {peer} is not mapped here"
                    ))
                })?;
                let off = off as usize;
                if off.checked_add(need).is_none_or(|end| end > m.len()) {
                    return Err(mismatch(format!(
                        "peer {peer}'s {which} ({need} bytes at offset {off}) overruns its \
                         shared buffer #{idx} of {} bytes",
                        m.len()
                    )));
                }
                // SAFETY: `off + need` lies inside the mapping (checked above).
                let p = unsafe { m.as_ptr().add(off) } as *const u8;
                self._held.push(alloc);
                Ok(p)
            };
            let in_need = match ctx.op {
                CollectiveOp::ReduceScatter => bytes * self.node.n(),
                _ => bytes,
            };
            let input = find(
                c.in_idx.load(Ordering::Relaxed),
                c.in_off.load(Ordering::Relaxed),
                in_need,
                "input",
            )?;
            let output = find(
                c.out_idx.load(Ordering::Relaxed),
                c.out_off.load(Ordering::Relaxed),
                bytes,
                "output",
            )?;
            let missing = match ctx.op {
                CollectiveOp::AllReduce => input.is_null() || output.is_null(),
                CollectiveOp::ReduceScatter | CollectiveOp::AllGather => input.is_null(),
                _ => output.is_null(),
            };
            if missing {
                return Err(mismatch(format!(
                    "peer {peer} published no shared buffer for it"
                )));
            }
            views.push(PeerView { input, output });
        }
        Ok(views)
    }

    /// Segment `r` of `count` elements: 64-byte aligned boundaries, balanced.
    fn segment(count: usize, size: usize, n: usize, r: usize) -> (usize, usize) {
        let unit = 64 / size;
        let units = count.div_ceil(unit);
        let at = |k: usize| (units * k / n * unit).min(count);
        (at(r), at(r + 1))
    }

    fn all_reduce<T: Element>(&self, views: &[PeerView], bufs: &Buffers) -> Result<()> {
        let ctx = self.ctx;
        let n = views.len();
        let me = self.node.me;
        let size = std::mem::size_of::<T>();
        let count = ctx.count as usize;
        let ce = (CHUNK_BYTES / size).max(64 / size);
        let seg: Vec<(usize, usize)> = (0..n).map(|r| Self::segment(count, size, n, r)).collect();
        let chunks: Vec<usize> = seg.iter().map(|(a, b)| (b - a).div_ceil(ce)).collect();
        let chunk = |r: usize, c: usize| {
            let a = seg[r].0 + c * ce;
            (a, (a + ce).min(seg[r].1))
        };
        // Next chunk of each segment still to copy here.
        let mut next = vec![0usize; n];
        next[me] = chunks[me];
        let copy = |r: usize, c: usize| {
            let (a, b) = chunk(r, c);
            // SAFETY: [a, b) lies inside both outputs (count elements); the owner
            // published the chunk, so it no longer writes it, and this rank's copy of the
            // segment is read by nobody.
            unsafe {
                self.copy(
                    bufs.output.add(a * size),
                    views[r].output.add(a * size),
                    (b - a) * size,
                )
            };
        };
        let mut srcs: Vec<*const T> = Vec::with_capacity(n);
        for c in 0..chunks[me] {
            let (a, b) = chunk(me, c);
            srcs.clear();
            // SAFETY: every input holds `count` elements (checked in `views`).
            srcs.extend(
                views
                    .iter()
                    .map(|v| unsafe { v.input.add(a * size) }.cast::<T>()),
            );
            // SAFETY: inputs are readable for b - a elements and stay unchanged until
            // every rank passes the exit step; this rank's output segment is written by
            // it alone and equals its own input exactly when in place.
            // Large outputs: the peers read this segment back from memory rather than
            // from this core's cache, which still costs less than fetching each line
            // before writing it (2 ranks, 256 MiB: 4.8–5.4 → 5.7–5.8 GB/s).
            unsafe { self.reduce(bufs.output.add(a * size).cast::<T>(), &srcs, b - a) };
            self.node.publish(ctx.seq, CHUNK0 + c as u32);
            // Copy whatever peers have finished meanwhile, while it is in cache.
            for k in 1..n {
                let r = (me + k) % n;
                let flag = self.node.page(r).flag.0.load(Ordering::Acquire);
                while next[r] < chunks[r]
                    && reached(flag, flag_value(ctx.seq, CHUNK0 + next[r] as u32))
                {
                    copy(r, next[r]);
                    next[r] += 1;
                }
            }
        }
        for k in 1..n {
            let r = (me + k) % n;
            while next[r] < chunks[r] {
                self.wait(r, CHUNK0 + next[r] as u32, "to reduce its part")?;
                copy(r, next[r]);
                next[r] += 1;
            }
        }
        Ok(())
    }

    /// This rank's block reduced over every rank's input into `out` (`count` elements;
    /// in place, the own input's block itself).
    fn reduce_scatter<T: Element>(&self, views: &[PeerView], out: *mut u8) -> Result<()> {
        let ctx = self.ctx;
        let me = self.node.me;
        let size = std::mem::size_of::<T>();
        let count = ctx.count as usize;
        let ce = (CHUNK_BYTES / size).max(1);
        let mut srcs: Vec<*const T> = Vec::with_capacity(views.len());
        let mut a = 0;
        while a < count {
            let b = (a + ce).min(count);
            srcs.clear();
            // SAFETY: every input holds n x count elements (checked in `views`).
            srcs.extend(
                views
                    .iter()
                    .map(|v| unsafe { v.input.add((me * count + a) * size) }.cast::<T>()),
            );
            // SAFETY: inputs are readable and unchanged until the exit step; the output
            // holds `count` elements, written by this rank alone, and is disjoint from
            // the inputs but for its own block in place, which `reduce_n` allows.
            unsafe { self.reduce(out.add(a * size).cast::<T>(), &srcs, b - a) };
            a = b;
        }
        Ok(())
    }

    fn all_gather(&self, views: &[PeerView], bufs: &Buffers, bytes: usize, in_place: bool) {
        let n = views.len();
        let me = self.node.me;
        // Start with the next rank so the ranks do not all read the same one at once; in
        // place, this rank's block is where it belongs.
        for k in usize::from(in_place)..n {
            let r = (me + k) % n;
            // SAFETY: each input holds `bytes` bytes, the output n x `bytes`; inputs are
            // unchanged until the exit step and the output is this rank's alone.
            unsafe { self.copy(bufs.output.add(r * bytes), views[r].input, bytes) };
        }
    }

    fn broadcast(&self, views: &[PeerView], bufs: &Buffers, bytes: usize, root: usize) {
        let l = self
            .node
            .ranks
            .iter()
            .position(|&g| g == root)
            .unwrap_or(root);
        if l != self.node.me {
            // SAFETY: the root's buffer holds `bytes` bytes and is unchanged until the
            // exit step; this rank's buffer is its own.
            unsafe { self.copy(bufs.output, views[l].output, bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::transport::alloc_meter::allocated_by;
    use half::bf16;
    use proptest::prelude::*;

    fn valid_record() -> Vec<u8> {
        let rec = Record {
            pid: 4242,
            pidns: 4026531836,
            ctl: Some((SegmentHandle::Memfd { pid: 4242, fd: 17 }, 99)),
            buf: Some((
                SegmentHandle::Named {
                    name: "hetccl-4242-buf-0-1-0123456789abcdef".into(),
                },
                100,
            )),
            error: Some("rank 1: something failed".into()),
            retry_named: true,
        };
        let mut b = serde_json::to_vec(&rec).unwrap();
        b.resize(RECORD_BYTES, b' ');
        b
    }

    proptest! {
        /// Records come from the peers: random bytes, or a valid record with bytes
        /// changed, parse or fail naming the rank, without a panic and allocating no
        /// more than a few times the record's size.
        #[test]
        fn any_record_parses_or_names_the_rank(
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..RECORD_BYTES + 100),
                prop::collection::vec((0usize..RECORD_BYTES, any::<u8>()), 1..6).prop_map(|flips| {
                    let mut b = valid_record();
                    for (at, v) in flips {
                        b[at] = v;
                    }
                    b
                }),
            ]
        ) {
            let (r, allocated) = allocated_by(|| parse_record(3, &bytes));
            prop_assert!(allocated <= 8 * RECORD_BYTES, "{} bytes", allocated);
            match r {
                // Longer records are refused before any parsing.
                Ok(_) => prop_assert!(bytes.len() <= RECORD_BYTES),
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("shared memory: rank 3 sent "), "{}", e);
                }
            }
        }

        /// Control page headers are written by the peer's process.
        #[test]
        fn any_control_page_header_is_checked(
            magic in prop_oneof![Just(CTL_MAGIC), any::<u64>()],
            rank in prop_oneof![Just(2u64), any::<u64>()],
        ) {
            let h = CtlHeader { magic, rank, pid: 1, pidns: 1 };
            match h.check(2) {
                Ok(()) => prop_assert_eq!((magic, rank), (CTL_MAGIC, 2)),
                Err(e) => prop_assert!(
                    e.starts_with("it is not a hetccl control page of this build (magic 0x")
                        || e == format!("it is rank {rank}'s control page, not rank 2's"),
                    "{}", e
                ),
            }
        }
    }

    #[test]
    fn a_valid_record_parses() {
        let rec = parse_record(0, &valid_record()).unwrap();
        assert_eq!((rec.pid, rec.retry_named), (4242, true));
        let e = parse_record(5, &[b'x'; RECORD_BYTES + 1])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "shared memory: rank 5 sent a shared-buffer record of 1025 bytes, more than 1024"
        );
    }

    use crate::communicator::testing::on_all;

    /// `n` communicators in one process on one pretend host, joined by in-memory links.
    fn world(n: usize, timeout: Duration) -> Vec<Communicator> {
        world_with(n, timeout, Config::default().stream_min_bytes)
    }

    fn world_with(n: usize, timeout: Duration, stream_min_bytes: usize) -> Vec<Communicator> {
        let cfg = Config {
            timeout,
            stream_min_bytes,
            ..Config::default()
        };
        crate::communicator::testing::world(n, n, cfg)
    }

    /// This rank's flag: the last collective that ran on the direct path ended here.
    fn last_direct(c: &Communicator) -> u64 {
        let node = c.shared.ctl.get().unwrap();
        node.page(node.me).flag.0.load(Ordering::Relaxed)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn all_reduce_on_shared_buffers_every_op_and_several_sizes() {
        for n in [2usize, 3, 4] {
            // Three ranks copy with streaming stores, whatever the size.
            let comms = world_with(n, secs(20), if n == 3 { 0 } else { usize::MAX });
            // Odd lengths, lengths below one 64-byte unit per rank, several chunks.
            for count in [1usize, 7, 1000, 200_003] {
                let outs = on_all(&comms, |c| {
                    let r = c.rank();
                    let mut res = Vec::new();
                    for op in ReduceOp::ALL {
                        let mut b = c.alloc_shared::<i32>(count + 3).unwrap();
                        for (i, x) in b.iter_mut().enumerate() {
                            *x = (r * 3 + i % 5) as i32 + 1;
                        }
                        c.all_reduce(&mut b[2..2 + count], op).unwrap();
                        // Small calls go through the eager slots (one phase), the
                        // others through the buffers themselves (ending with EXIT).
                        let last = if count * 4 <= eager_limit(n) {
                            ARRIVE
                        } else {
                            EXIT
                        };
                        assert_eq!(
                            last_direct(c),
                            flag_value(c.seq.load(Ordering::Relaxed) - 1, last)
                        );
                        res.push((b[..2].to_vec(), b[2..2 + count].to_vec(), b[2 + count]));
                    }
                    res
                });
                for (r, res) in outs.into_iter().enumerate() {
                    for (k, (head, body, tail)) in res.into_iter().enumerate() {
                        let v = |q: usize, i: usize| (q * 3 + i % 5) as i32 + 1;
                        assert_eq!(head, vec![v(r, 0), v(r, 1)], "n={n} untouched head");
                        assert_eq!(tail, v(r, 2 + count), "n={n} untouched tail");
                        for (j, got) in body.iter().enumerate() {
                            let i = j + 2;
                            let xs: Vec<i32> = (0..n).map(|q| v(q, i)).collect();
                            let want = match k {
                                0 => xs.iter().sum(),
                                1 => xs.iter().product(),
                                2 => *xs.iter().max().unwrap(),
                                3 => *xs.iter().min().unwrap(),
                                _ => xs.iter().sum::<i32>() / n as i32,
                            };
                            assert_eq!(*got, want, "n={n} count={count} op #{k} element {j}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn out_of_place_reduce_scatter_all_gather_broadcast() {
        let n = 3;
        let comms = world_with(n, secs(20), 0);
        let count = 70_001;
        let outs = on_all(&comms, |c| {
            let r = c.rank();
            // all_reduce_into: shared input and output, then a private input.
            let mut inp = c.alloc_shared::<f64>(count).unwrap();
            inp.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (r + i % 4) as f64);
            let mut out = c.alloc_shared::<f64>(count).unwrap();
            c.all_reduce_into(&inp, &mut out, ReduceOp::Sum).unwrap();
            let a = out.to_vec();
            let private: Vec<f64> = inp.to_vec();
            out.fill(0.0);
            c.all_reduce_into(&private, &mut out, ReduceOp::Max)
                .unwrap();
            let b = out.to_vec();
            // reduce_scatter from a shared input into a private output.
            let mut big = c.alloc_shared::<bf16>(n * count).unwrap();
            big.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = bf16::from_f32((r + i % 3) as f32));
            let mut part = vec![bf16::ZERO; count];
            c.reduce_scatter(&big, &mut part, ReduceOp::Sum).unwrap();
            // The same in f32, whose sums go out with streaming stores (threshold 0;
            // bf16 takes the ordinary path).
            let mut wide = c.alloc_shared::<f32>(n * count).unwrap();
            wide.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (r * 7 + i % 5) as f32);
            let mut part32 = vec![0f32; count];
            c.reduce_scatter(&wide, &mut part32, ReduceOp::Sum).unwrap();
            // all_gather from a shared input.
            let mut mine = c.alloc_shared::<u8>(count).unwrap();
            mine.fill(r as u8 + 10);
            let mut all = vec![0u8; n * count];
            c.all_gather(&mine, &mut all).unwrap();
            // broadcast from rank 1.
            let mut bc = c.alloc_shared::<i64>(count).unwrap();
            bc.fill(r as i64 * 100);
            c.broadcast(&mut bc, 1).unwrap();
            assert_eq!(
                last_direct(c),
                flag_value(c.seq.load(Ordering::Relaxed) - 1, EXIT)
            );
            (a, b, (part, part32), all, bc.to_vec())
        });
        for (r, (a, b, (part, part32), all, bc)) in outs.into_iter().enumerate() {
            for i in [0usize, 1, 2, 3, 4, 5000, count - 1] {
                assert_eq!(a[i], (3 + 3 * (i % 4)) as f64, "rank {r} element {i}");
                assert_eq!(b[i], (2 + i % 4) as f64, "rank {r} element {i}");
            }
            for (i, x) in part.iter().enumerate() {
                let g = r * count + i;
                assert_eq!(x.to_f32(), (3 + 3 * (g % 3)) as f32, "rank {r} element {i}");
                assert_eq!(part32[i], (21 + 3 * (g % 5)) as f32, "rank {r} element {i}");
            }
            for (i, x) in all.iter().enumerate() {
                assert_eq!(*x as usize, i / count + 10);
            }
            assert_eq!(bc, vec![100i64; count]);
        }
    }

    #[test]
    fn in_place_reduce_scatter_and_all_gather_read_the_peers_directly() {
        let n = 3;
        let comms = world_with(n, secs(20), 0);
        let count = 70_001;
        let outs = on_all(&comms, |c| {
            let r = c.rank();
            let direct = |c: &Communicator| {
                // The control page's flag ends at the last call's exit step only when that
                // call went the direct way.
                last_direct(c) == flag_value(c.seq.load(Ordering::Relaxed) - 1, EXIT)
            };
            let mut buf = c.alloc_shared::<f32>(n * count).unwrap();
            buf.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (r + i % 5) as f32);
            c.reduce_scatter_in_place(&mut buf, ReduceOp::Sum).unwrap();
            let rs = (buf.to_vec(), direct(c));
            buf.fill(0.0);
            buf[r * count..(r + 1) * count].fill(r as f32 + 0.5);
            c.all_gather_in_place(&mut buf).unwrap();
            (rs, (buf.to_vec(), direct(c)))
        });
        for (r, ((rs, rs_direct), (ag, ag_direct))) in outs.into_iter().enumerate() {
            assert!(rs_direct && ag_direct, "rank {r}: {rs_direct} {ag_direct}");
            for (i, x) in rs.iter().enumerate() {
                // Own block: the sum over ranks 0..3 of (rank + i % 5); others as they were.
                let want = if i / count == r {
                    (3 + 3 * (i % 5)) as f32
                } else {
                    (r + i % 5) as f32
                };
                assert_eq!(*x, want, "rank {r} element {i}");
            }
            for (i, x) in ag.iter().enumerate() {
                assert_eq!(*x, (i / count) as f32 + 0.5, "rank {r} element {i}");
            }
        }
    }

    #[test]
    fn float_sums_are_bitwise_equal_on_every_rank_and_fold_in_rank_order() {
        let n = 4;
        let comms = world(n, secs(20));
        let count = 100_000;
        let val = |r: usize, i: usize| {
            ((i * 7919 + r * 104_729) % 1000) as f32 * 1.37e-3 + [1e7, -1e7, 3.5, 0.25][r]
        };
        let outs = on_all(&comms, |c| {
            let mut b = c.alloc_shared::<f32>(count).unwrap();
            b.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = val(c.rank(), i));
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
            b.to_vec()
        });
        for o in &outs {
            assert_eq!(
                o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                outs[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        for i in [0usize, 1, 777, count - 1] {
            let want = ((val(0, i) + val(1, i)) + val(2, i)) + val(3, i);
            assert_eq!(outs[0][i].to_bits(), want.to_bits(), "element {i}");
        }
    }

    #[test]
    fn a_private_buffer_against_shared_ones_is_a_mismatch() {
        let comms = world(2, secs(20));
        // Above the eager size, where shared and private buffers take different paths.
        let errs = on_all(&comms, |c| {
            let mut s = c.alloc_shared::<f32>(5000).unwrap();
            let mut v = vec![1.0f32; 5000];
            let e = if c.rank() == 0 {
                c.all_reduce(&mut s, ReduceOp::Sum)
            } else {
                c.all_reduce(&mut v, ReduceOp::Sum)
            };
            e.unwrap_err().to_string()
        });
        assert!(
            errs[0].contains(
                "rank 0: all_reduce #2 does not match what peer 1 sent: rank 0 runs it on \
                 shared buffers, peer 1 over links"
            ),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("rank 1: peer 0 is gone during all_reduce #2"),
            "{errs:?}"
        );
    }

    #[test]
    fn different_counts_are_a_mismatch_and_break_the_communicator() {
        let comms = world(2, secs(20));
        let errs = on_all(&comms, |c| {
            let mut s = c.alloc_shared::<f32>(1000).unwrap();
            let len = 1000 - c.rank();
            let e = c.all_reduce(&mut s[..len], ReduceOp::Sum).unwrap_err();
            let again = c.all_reduce(&mut s[..len], ReduceOp::Sum).unwrap_err();
            (e.to_string(), again.to_string())
        });
        assert_eq!(
            errs[0].0,
            "rank 0: all_reduce #2 does not match what peer 1 sent: expected all_reduce #2 \
             of 1000 x f32 (sum op), peer runs all_reduce #2 of 999 x f32 (sum op)"
        );
        for (_, again) in &errs {
            assert!(
                again.starts_with("communicator is unusable after an earlier error"),
                "{again}"
            );
        }
    }

    /// `n` ranks on one pretend host with their control pages attached up front, as
    /// `Communicator::init` does, and the algorithm choice `algo`.
    fn attached(n: usize, timeout: Duration, algo: crate::config::AlgoChoice) -> Vec<Communicator> {
        let cfg = Config {
            timeout,
            algo,
            ..Config::default()
        };
        let mut comms = crate::communicator::testing::world(n, n, cfg);
        std::thread::scope(|s| {
            for c in comms.iter_mut() {
                s.spawn(move || c.attach_node().unwrap());
            }
        });
        // Numbering restarted: the caller's first collective is #0.
        assert!(comms.iter().all(|c| c.seq.load(Ordering::Relaxed) == 0));
        comms
    }

    #[test]
    fn small_all_reduce_goes_through_the_eager_slots_with_private_buffers() {
        use crate::config::AlgoChoice;
        for n in [2usize, 3, 4] {
            let comms = attached(n, secs(20), AlgoChoice::Auto);
            let ops = ReduceOp::ALL;
            // 20 rounds reuse both slots many times; the largest count fills a slot.
            let counts = [1usize, 5, 1000, eager_limit(n) / 8];
            let outs = on_all(&comms, |c| {
                let r = c.rank() as f64;
                let node = c.shared.ctl.get().unwrap();
                let mut res = Vec::new();
                for round in 0..20 {
                    for &count in &counts {
                        for op in ops {
                            let x: Vec<f64> = (0..count)
                                .map(|i| r * 7.0 + (i % 11) as f64 + round as f64)
                                .collect();
                            let calls = node.eager_calls.load(Ordering::Relaxed);
                            let out = if round % 2 == 0 {
                                let mut y = x.clone();
                                c.all_reduce(&mut y, op).unwrap();
                                y
                            } else {
                                let mut y = vec![0.0; count];
                                c.all_reduce_into(&x, &mut y, op).unwrap();
                                y
                            };
                            assert_eq!(node.eager_calls.load(Ordering::Relaxed), calls + 1);
                            assert_eq!(
                                last_direct(c),
                                flag_value(c.seq.load(Ordering::Relaxed) - 1, ARRIVE)
                            );
                            res.push(out);
                        }
                    }
                }
                res
            });
            let mut k = 0;
            for round in 0..20 {
                for &count in &counts {
                    for op in ops {
                        for (r, o) in outs.iter().enumerate() {
                            for i in [0, count / 2, count - 1] {
                                let v = |q: usize| q as f64 * 7.0 + (i % 11) as f64 + round as f64;
                                let fold =
                                    |f: fn(f64, f64) -> f64| (1..n).fold(v(0), |a, q| f(a, v(q)));
                                let want = match op {
                                    ReduceOp::Sum => fold(|a, b| a + b),
                                    ReduceOp::Prod => fold(|a, b| a * b),
                                    ReduceOp::Max => fold(f64::max),
                                    ReduceOp::Min => fold(f64::min),
                                    ReduceOp::Avg => fold(|a, b| a + b) / n as f64,
                                };
                                assert_eq!(
                                    o[k][i], want,
                                    "n {n} rank {r} round {round} count {count} {op} [{i}]"
                                );
                            }
                        }
                        k += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn eager_sums_are_bitwise_equal_everywhere_and_forced_algorithms_skip_them() {
        use crate::config::AlgoChoice;
        // Values whose f32 sum depends on the order: the eager path folds in rank order.
        let val = |r: usize, i: usize| [1e8f32, 1.0, -1e8, 0.5][r] * (1.0 + i as f32 * 1e-3);
        let count = 100;
        let comms = attached(4, secs(20), AlgoChoice::Auto);
        let outs = on_all(&comms, |c| {
            let mut b: Vec<f32> = (0..count).map(|i| val(c.rank(), i)).collect();
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
            b
        });
        for i in [0usize, 1, 99] {
            let want = ((val(0, i) + val(1, i)) + val(2, i)) + val(3, i);
            for o in &outs {
                assert_eq!(o[i].to_bits(), want.to_bits(), "element {i}");
            }
        }
        // A forced ring is a ring, however small the call; one byte over the limit is
        // no eager call either.
        for (algo, count) in [
            (AlgoChoice::Ring, 4),
            (AlgoChoice::Auto, eager_limit(2) + 1),
        ] {
            let comms = attached(2, secs(20), algo);
            let calls = on_all(&comms, |c| {
                let mut b = vec![1u8; count];
                c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
                assert!(b.iter().all(|&x| x == 2));
                c.shared
                    .ctl
                    .get()
                    .unwrap()
                    .eager_calls
                    .load(Ordering::Relaxed)
            });
            assert_eq!(calls, [0, 0], "{algo:?} {count}");
        }
    }

    #[test]
    fn eager_calls_that_disagree_are_a_mismatch() {
        use crate::config::AlgoChoice;
        // Both small, different counts: each rank names the other's call.
        let comms = attached(2, secs(20), AlgoChoice::Auto);
        let errs = on_all(&comms, |c| {
            let mut b = vec![1.0f32; 10 + 10 * c.rank()];
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert_eq!(
            errs[0],
            "rank 0: all_reduce #0 does not match what peer 1 sent: expected all_reduce #0 of \
             10 x f32 (sum op), peer runs all_reduce #0 of 20 x f32 (sum op)"
        );
        assert_eq!(
            errs[1],
            "rank 1: all_reduce #0 does not match what peer 0 sent: expected all_reduce #0 of \
             20 x f32 (sum op), peer runs all_reduce #0 of 10 x f32 (sum op)"
        );
        // One small, one large: the small one learns that its peer went over links.
        let comms = attached(2, secs(20), AlgoChoice::Auto);
        let errs = on_all(&comms, |c| {
            let mut b = vec![1.0f32; if c.rank() == 0 { 10 } else { 100_000 }];
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert!(
            errs[0].contains(
                "rank 0: all_reduce #0 does not match what peer 1 sent: rank 0 runs it as a \
                 small all_reduce through shared memory, peer 1 over links"
            ),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("rank 1: peer 0 is gone during all_reduce #0"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_silent_peer_times_out_naming_it() {
        let comms = world(3, Duration::from_millis(300));
        let errs = on_all(&comms, |c| {
            let mut s = c.alloc_shared::<u8>(64).unwrap();
            if c.rank() == 2 {
                return String::new();
            }
            c.all_reduce(&mut s, ReduceOp::Max).unwrap_err().to_string()
        });
        for r in 0..2 {
            let want = format!("rank {r}: all_reduce #2 timed out after");
            assert!(errs[r].starts_with(&want), "{errs:?}");
            // Three ranks: the silent one may itself be waiting on someone, and this
            // rank cannot see whether it is (it is not stopped: the same process).
            assert!(
                errs[r].ends_with(
                    "waiting for peer 2 to start the collective; peer 2 may itself be waiting \
                     on another rank further along, so the stall may lie there"
                ),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn buffers_outlive_the_communicator_and_len_zero_works() {
        let comms = world(2, secs(20));
        let bufs = on_all(&comms, |c| {
            let z = c.alloc_shared::<u64>(0).unwrap();
            assert!(z.is_empty());
            let mut b = c.alloc_shared::<u64>(10).unwrap();
            assert!(b.is_shared());
            assert_eq!(b.index(), 1);
            assert_eq!(&b[..], &[0u64; 10]);
            b[9] = 5;
            b
        });
        drop(comms);
        assert_eq!(bufs[1][9], 5);
        assert_eq!(bufs[0].index(), 1);
    }
}
