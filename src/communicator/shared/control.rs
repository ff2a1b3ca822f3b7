//! The control page: one per rank of a host, mapped read-write by the others, through
//! which the shared-memory collectives publish their calls and their progress and wait
//! for each other.
//!
//! ```text
//! line 0    header: magic, rank, pid, pid namespace          (written once, at creation)
//! line 1    state: attached / aborted / closed, abort cause  (owner)
//! line 2    flag: (seq << 32) | phase, low half is the futex word (owner)
//! line 3    this collective: its call header, then its buffers (owner)
//! line 4    seq + 1 of the last collective run over links, its call header (owner)
//! line 5+w  rank w sleeps on this page's flag                 (waiter w only)
//! slots     two eager slots: a line with the call header + EAGER_BYTES of data (owner)
//! ```
//!
//! A call header is the four words of [`CallHeader`], the encoding every engine states
//! its calls in; a peer's is checked against this rank's with [`crate::algorithm::call::check`].
//!
//! No two ranks ever write one cache line. The flag only moves forward: `(s, ARRIVE)`
//! when collective `s` is published, `(s, CHUNK0 + c)` as the owner's part of it
//! progresses, `(s, EXIT)` when the owner no longer reads its peers' buffers.
//!
//! Waiting spins briefly, yields, then sleeps on the peer's flag (`FUTEX_WAIT` on shared
//! memory, woken by the owner only when its sleep lines say someone sleeps). Sleeps
//! are sliced so a dead peer (its process has exited, zombie or not: see
//! [`crate::transport::shm::liveness`]), an aborted one, a peer that ran the collective
//! over links instead, or the timeout ends the wait with an error. The escalation and
//! the checks are the executor's ([`crate::algorithm::executor::wait`]); the futex
//! sleep and what is checked of a peer are this page's own.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::algorithm::call::{self, CallHeader, HEADER_WORDS};
use crate::algorithm::executor::wait::{Awaited, Ladder, Pause, Wait};
use crate::algorithm::executor::ExecCtx;
use crate::error::{AbortCause, Result};
use crate::transport::shm::liveness::{own_pidns, PeerProcess, ABORTED, ATTACHED, CLOSED};
use crate::transport::shm::segment::Mapping;

const CTL_MAGIC: u64 = u64::from_le_bytes(*b"HCCLCTL4");
/// Elements of the flag's phase (low 32 bits).
pub(super) const ARRIVE: u32 = 1;
/// Phase after chunk `c` of the owner's segment is reduced: `CHUNK0 + c`.
pub(super) const CHUNK0: u32 = 2;
pub(super) const EXIT: u32 = u32::MAX;

/// Flag polls before yielding, then yields (at least this many, for at least
/// `YIELD_FOR`) before sleeping. Few: a peer on another core answers within a few
/// polls, and on an oversubscribed host every extra poll is time the awaited rank
/// cannot run (see `docs/PERFORMANCE.md`, waiting on an oversubscribed host).
const SPINS: u32 = 32;
const YIELDS: u32 = 16;
const YIELD_FOR: Duration = Duration::from_micros(200);
/// The ladder of a flag wait ([`crate::algorithm::executor::wait`], shared with the
/// executor). Its own numbers, for what differs from a wait on links: a poll here is
/// one load, and the awaited flag is usually set within a few polls, so it spins even
/// where ranks outnumber cores (`ExecCtx::spin_polls` is zero there); and its sleep is
/// a futex wait, whose wake-up costs more on a busy machine than yielding for
/// `YIELD_FOR`.
const FLAG_LADDER: Ladder = Ladder {
    spins: SPINS,
    yield_polls: SPINS + YIELDS,
    yield_for: YIELD_FOR,
};
/// Longest single sleep; between sleeps the waiter checks the peer and the timeout.
const SLEEP_SLICE: Duration = Duration::from_millis(10);
/// Phase value meaning "not given" in the published call.
pub(super) const NONE: u64 = u64::MAX;
/// Size of an eager slot: the largest all-reduce, in bytes, that the selection sends
/// through the control pages ([`crate::algorithm::select::EAGER_MAX_BYTES`]).
pub(super) const EAGER_BYTES: usize = crate::algorithm::select::EAGER_MAX_BYTES;

#[repr(C, align(64))]
struct CtlHeader {
    magic: u64,
    rank: u64,
    pid: u32,
    pidns: u64,
}

#[repr(C, align(64))]
pub(super) struct Line(pub(super) AtomicU64);

/// The owner's state ([`crate::transport::shm::liveness`]) and, once it aborted, why
/// ([`AbortCause::to_word`], written before the state).
#[repr(C, align(64))]
struct StateLine {
    state: AtomicU32,
    cause: AtomicU64,
}

/// The call a rank is running, for the peers to check and to find its buffers.
#[repr(C, align(64))]
pub(super) struct CallLine {
    /// The words of its [`CallHeader`].
    pub(super) call: [AtomicU64; HEADER_WORDS],
    pub(super) in_idx: AtomicU64,
    pub(super) in_off: AtomicU64,
    pub(super) out_idx: AtomicU64,
    pub(super) out_off: AtomicU64,
}

/// The last collective the owner ran over links: `seq + 1` (0: none yet), and its
/// call, so a peer waiting for it here can say what it runs instead (written before
/// `seq`, which publishes it).
#[repr(C, align(64))]
struct LinkLine {
    seq: AtomicU64,
    call: [AtomicU64; HEADER_WORDS],
}

#[repr(C)]
pub(super) struct CtlPage {
    header: CtlHeader,
    state: StateLine,
    pub(super) flag: Line,
    pub(super) call: CallLine,
    link: LinkLine,
}

const SLEEP_LINES_AT: usize = std::mem::size_of::<CtlPage>();
const _: () = assert!(SLEEP_LINES_AT == 5 * 64);

/// Where the eager slots start on a control page of a host with `local_size` ranks.
fn eager_at(local_size: usize) -> usize {
    SLEEP_LINES_AT + 64 * local_size
}

/// One eager slot: a header line, then the data.
const EAGER_SLOT: usize = 64 + EAGER_BYTES;

/// Bytes of a control page on a host with `local_size` ranks.
pub(super) fn ctl_bytes(local_size: usize) -> usize {
    eager_at(local_size) + 2 * EAGER_SLOT
}

/// Header of an eager slot: the words of the [`CallHeader`] whose data follows.
#[repr(C, align(64))]
pub(super) struct EagerHeader {
    pub(super) call: [AtomicU64; HEADER_WORDS],
}

/// Writes the header of a new control page of `rank` and its first flag and state.
///
/// # Safety
/// `page` must be a fresh, zero-filled mapping of at least one page that no other
/// process has yet.
pub(super) unsafe fn init_page(page: &Mapping, rank: usize, seq: u64) {
    // SAFETY: the caller's contract; the header is plain data, the rest atomics.
    unsafe {
        std::ptr::write(
            page.as_ptr().cast::<CtlHeader>(),
            CtlHeader {
                magic: CTL_MAGIC,
                rank: rank as u64,
                pid: std::process::id(),
                pidns: own_pidns(),
            },
        );
        let page = &*page.as_ptr().cast::<CtlPage>();
        // Flags start at the current sequence number, so the first comparisons after a
        // wrap of 2^31 collectives stay right.
        page.flag.0.store(flag_value(seq, 0), Ordering::Relaxed);
        page.state.state.store(ATTACHED, Ordering::Release);
    }
}

/// Checks the header of a control page that local rank `peer`'s process wrote.
pub(super) fn check_page(page: &Mapping, peer: usize) -> std::result::Result<(), String> {
    // SAFETY: every mapping is at least one page; the header is plain data written once
    // by its owner before the page was shared.
    let h = unsafe { std::ptr::read(page.as_ptr().cast::<CtlHeader>()) };
    h.check(peer)
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

/// This rank's view of the control pages of its host (visible to the communicator, which
/// asks whether there are any).
pub(in crate::communicator) struct NodeCtl {
    /// This rank's index among the host's ranks.
    pub(super) me: usize,
    /// Global rank of each local index.
    pub(super) ranks: Vec<usize>,
    /// Control page of each local rank (this one's included).
    pages: Vec<Mapping>,
    /// Each local rank's process, as its page's header names it (`None` for this one).
    procs: Vec<Option<PeerProcess>>,
    /// Eager all-reduces this rank has started; the parity picks the slot.
    pub(super) eager_calls: AtomicU64,
}

impl NodeCtl {
    /// The control pages of the host's ranks `ranks`, this one (`me`) included, each
    /// at least `ctl_bytes(ranks.len())` long. Call it while every peer is known to be
    /// alive (it has just taken part in an exchange): their processes are watched from
    /// now on.
    pub(super) fn new(me: usize, ranks: Vec<usize>, pages: Vec<Mapping>) -> NodeCtl {
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
            ranks,
            pages,
            procs,
            eager_calls: AtomicU64::new(0),
        }
    }

    pub(super) fn page(&self, l: usize) -> &CtlPage {
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

    pub(super) fn n(&self) -> usize {
        self.pages.len()
    }

    /// Eager slot `parity` of local rank `l`: its header and its data.
    pub(super) fn eager_slot(&self, l: usize, parity: usize) -> (&EagerHeader, *mut u8) {
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
    pub(super) fn publish(&self, seq: u64, phase: u32) {
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

    /// Tells the peers this rank runs the collective `h` states over links.
    pub(super) fn note_link_op(&self, h: &CallHeader) {
        let line = &self.page(self.me).link;
        store_call(&line.call, h);
        line.seq.store(h.seq.wrapping_add(1), Ordering::Release);
    }

    /// Tells the peers this rank's communicator failed, and why.
    pub(super) fn set_aborted(&self, cause: AbortCause) {
        let p = self.page(self.me);
        p.state.cause.store(cause.to_word(), Ordering::Relaxed);
        p.state.state.store(ABORTED, Ordering::SeqCst);
        futex_wake(&p.flag.0);
    }

    /// Tells the peers this rank's communicator is gone (unless it aborted before).
    pub(super) fn set_closed(&self) {
        let p = self.page(self.me);
        let _ =
            p.state
                .state
                .compare_exchange(ATTACHED, CLOSED, Ordering::SeqCst, Ordering::SeqCst);
        futex_wake(&p.flag.0);
    }
}

pub(super) fn flag_value(seq: u64, phase: u32) -> u64 {
    ((seq & 0xffff_ffff) << 32) | phase as u64
}

/// Whether `v` is at or past `target`, with wrap-around: peers are never more than one
/// collective apart, so the difference is small.
pub(super) fn reached(v: u64, target: u64) -> bool {
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

/// The header of the call `ctx` runs with root `root` ([`call::NO_ROOT`] where the call
/// line or slot does not carry one), as this engine publishes it.
pub(super) fn stated(ctx: &ExecCtx, root: u64) -> CallHeader {
    CallHeader::new(ctx.seq, ctx.op, ctx.dtype, ctx.redop, ctx.count, root)
}

/// Publishes `h` in the words of a call line or an eager slot (relaxed: the flag
/// published after it orders it for the peers).
pub(super) fn store_call(words: &[AtomicU64; HEADER_WORDS], h: &CallHeader) {
    for (w, v) in words.iter().zip(h.to_words()) {
        w.store(v, Ordering::Relaxed);
    }
}

/// The header a peer published in `words` (after its flag was seen).
pub(super) fn load_call(words: &[AtomicU64; HEADER_WORDS]) -> CallHeader {
    CallHeader::from_words(std::array::from_fn(|i| words[i].load(Ordering::Relaxed)))
}

/// The waits of one collective on its peers' flags.
pub(super) struct Waits<'a> {
    pub(super) node: &'a NodeCtl,
    pub(super) ctx: &'a ExecCtx,
    /// Set by `Communicator::abort`.
    pub(super) cancel: &'a AtomicBool,
    /// A small all-reduce through the eager slots (only the words of a mismatch differ).
    pub(super) eager: bool,
}

impl Waits<'_> {
    /// Global rank of local rank `l`.
    pub(super) fn peer(&self, l: usize) -> usize {
        self.node.ranks[l]
    }

    /// Waits until local rank `l`'s flag reaches `(seq, phase)`.
    pub(super) fn wait(&self, l: usize, phase: u32, what: &'static str) -> Result<()> {
        let target = flag_value(self.ctx.seq, phase);
        let flag = &self.node.page(l).flag.0;
        let mut wait = Wait::new(self.ctx, FLAG_LADDER, Some(self.cancel));
        if wait.spin(|| reached(flag.load(Ordering::Acquire), target)) {
            return Ok(());
        }
        loop {
            if reached(flag.load(Ordering::Acquire), target) {
                return Ok(());
            }
            let Pause::Sleep(_) = wait.pause() else {
                continue;
            };
            // Sleep on the flag. The sleep line goes up before the last look at the
            // flag: the owner's publish then either is seen here or sees the line and
            // wakes this rank.
            let sleep = self.node.sleep_line(l, self.node.me);
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
            wait.check(&mut FlagWait {
                waits: self,
                l,
                what,
            })?;
        }
    }

    /// Errors when local rank `l` cannot make progress any more.
    fn check_peer(&self, l: usize) -> Result<()> {
        let page = self.node.page(l);
        let peer = self.peer(l);
        let ctx = self.ctx;
        match page.state.state.load(Ordering::Acquire) {
            ABORTED => {
                return Err(
                    match AbortCause::from_word(page.state.cause.load(Ordering::Relaxed)) {
                        Some(cause) => ctx.peer_gave_up(peer, cause),
                        None => ctx.peer_lost(
                            peer,
                            format!(
                                "peer {peer}'s communicator failed (shared-buffer control page \
                                 says aborted)"
                            ),
                        ),
                    },
                )
            }
            CLOSED => {
                return Err(ctx.peer_lost(peer, format!("peer {peer} closed its communicator")))
            }
            _ => {}
        }
        if let Some(p) = self.node.procs[l].as_ref().filter(|p| p.exited()) {
            return Err(ctx.peer_lost(
                peer,
                format!("peer {peer} (pid {}) process has exited", p.pid()),
            ));
        }
        let ls = page.link.seq.load(Ordering::Acquire);
        if ls != 0 && reached(ls.wrapping_sub(1), ctx.seq) {
            // What the peer runs, if it is still the call that `ls` published (a peer
            // that has gone on to another one has rewritten the words meanwhile).
            let theirs = load_call(&page.link.call);
            let theirs = (page.link.seq.load(Ordering::Acquire) == ls).then_some(theirs);
            return Err(ctx.mismatch(
                peer,
                call::ran_over_links(ctx.rank, peer, self.eager, theirs.as_ref()),
            ));
        }
        Ok(())
    }
}

/// A wait on local rank `l`'s flag, as the checks of [`Wait`] see it.
struct FlagWait<'w, 'a> {
    waits: &'w Waits<'a>,
    l: usize,
    what: &'static str,
}

impl Awaited for FlagWait<'_, '_> {
    fn check_peers(&mut self) -> Result<()> {
        self.waits.check_peer(self.l)
    }

    fn blocked_on(&mut self) -> (usize, &'static str) {
        (self.waits.peer(self.l), self.what)
    }

    fn seen(&mut self, _peer: usize) -> Option<String> {
        self.waits.node.procs[self.l]
            .as_ref()
            .and_then(|p| p.stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::communicator::shared::testing::{attached, secs, world};
    use crate::communicator::testing::on_all;
    use crate::config::AlgoChoice;
    use crate::dtype::ReduceOp;
    use crate::error::{AbortKind, Error};
    use proptest::prelude::*;
    use std::time::Instant;

    proptest! {
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

    /// The state on a peer's control page says whether it closed its communicator or
    /// gave up, and why; a waiter notices either well within its timeout.
    #[test]
    fn a_closed_peer_and_an_aborted_one_are_told_apart() {
        let cause = AbortCause::new(AbortKind::Mismatch, 1);
        for abort in [false, true] {
            let comms = attached(2, secs(20), AlgoChoice::Auto);
            // Rank 1 leaves without running the collective that rank 0 waits in.
            if abort {
                comms[1].shared.abort(cause);
            } else {
                comms[1].shared.close();
            }
            let t = Instant::now();
            let mut b = vec![1.0f32; 4];
            let e = comms[0].all_reduce(&mut b, ReduceOp::Sum).unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            match e {
                Error::PeerGaveUp {
                    rank: 0,
                    peer: 1,
                    cause: c,
                    ..
                } if abort => assert_eq!(c, cause),
                Error::PeerLost {
                    rank: 0,
                    peer: 1,
                    ref detail,
                    ..
                } if !abort => assert_eq!(detail, "peer 1 closed its communicator"),
                e => panic!("abort {abort}: {e}"),
            }
        }
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
}
