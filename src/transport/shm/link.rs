//! Shared-memory link between two processes on one host.
//!
//! One segment per pair of ranks ([`super::segment`], a named `/dev/shm` file) holds two
//! single-producer single-consumer rings, one per direction. The lower rank creates the
//! segment, the higher rank maps it, and the creator unlinks the name as soon as both
//! have it mapped (see [`crate::transport::connect_all`]): the memory lives on only
//! through the two mappings.
//!
//! Segment layout (`segment_bytes = 4096 + 2 * ring_bytes`):
//!
//! ```text
//! 0      control page: line 0 header (magic, version, geometry, ranks)
//!                      line 1 side 0 (creator): pid, state, pid namespace, cause
//!                      line 2 side 1 (opener):  pid, state, pid namespace, cause
//!                      lines 3,4 ring 0 (side 0 -> side 1): head, tail
//!                      lines 5,6 ring 1 (side 1 -> side 0): head, tail
//!                      lines 7,8 each side's latency estimate between the cores
//!                      lines 9-12 the start-up latency probe: per side a stamp, a round
//! 4096   ring 0: nslots descriptors of 64 bytes (rounded up to a page),
//!                then nslots slots of slot_bytes
//! ...    ring 1: the same
//! ```
//!
//! Every cache line is written by one side only (head and descriptors by the producer,
//! tail by the consumer, a side line by its owner), so the two processes never fight
//! over a line. `head` and `tail` count slots since the start and never wrap; a slot is
//! `count % nslots`. The producer fills a slot and its descriptor, then publishes with a
//! release store of `head`; the consumer reads `head` with acquire, hands the slot to the
//! sink straight from the mapping (the executor reduces out of the ring, no copy), then
//! frees it with a release store of `tail` ([`RELEASE_BYTES`] of slots at a time, and
//! whatever it holds once it has caught up or a message ends). No system call on this
//! path.
//!
//! A message occupies consecutive slots: the first slot's descriptor carries the
//! [`MsgHeader`] and each slot holds up to `slot_bytes` of payload, so pieces start at
//! multiples of `slot_bytes` (a multiple of 4096) and only the last may be short. An
//! empty message takes one slot with no payload.
//!
//! Liveness: each side records its pid, pid namespace and a state (attached, closed,
//! aborted). [`Link::check_peer`] reports the peer lost when it aborted, or when it
//! closed or its process has exited while this side still needs it; an exited process
//! is seen through a pidfd (zombies too, see [`super::liveness`]). A side that
//! aborts first writes its cause ([`AbortCause::to_word`]) into its line, then the
//! state with release: the peer reads the state with acquire, then the cause.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use super::liveness::{has_left, own_pidns, PeerProcess, ABORTED, ATTACHED, CLOSED};
use super::segment::{self, Mapping, OwnedSegment, SegmentHandle, SegmentName};
use super::stores::{now_ns, SlotStores};
use crate::config::{Config, ShmStores};
use crate::error::{AbortCause, Error, Result};
use crate::transport::{DirectDst, Frame, Link, LinkKind, MsgHeader, RecvSink, MSG_MAGIC};

const SHM_MAGIC: u64 = u64::from_le_bytes(*b"HCCLSHM1");
const SHM_VERSION: u32 = 4;
const PAGE: usize = 4096;
/// Bytes before the first ring.
const CONTROL_BYTES: usize = PAGE;

/// Descriptor flag: this slot starts a message and its descriptor carries the header.
const FIRST: u64 = 1;

/// Besides each message's first slot, every this many slots carry the time they were
/// published, from which the consumer learns how far apart the two cores are
/// (`stores.rs`).
const STAMP_EVERY: u64 = 8;
/// A stamped slot's delay counts only when the consumer had found the ring empty at most
/// this long (ns) before it found the slot: it was watching, not busy elsewhere, so the
/// delay exceeds the latency by at most this (and is never less than it). Across dies
/// the consumer's own loop takes longer (the lines it polls come from the other die):
/// 150 ns left it without delays to measure there.
const WAITING_GAP_NS: u64 = 500;
/// How long a stamped arrival took to travel between the cores, with the time now
/// (`(delay ns, now_ns)`), when the reader had looked in vain at `looked_at` (`now_ns`;
/// 0: it had not) at most [`WAITING_GAP_NS`] before it found it: the delay then exceeds
/// the latency by at most that gap. `None` otherwise, and for an unstamped slot
/// (`stamp` 0). The rule of both the ring's consumer and the start-up probe.
#[inline]
fn waited_delay(looked_at: u64, stamp: u64) -> Option<(u64, u64)> {
    if looked_at == 0 || stamp == 0 {
        return None;
    }
    let t = now_ns();
    (t.saturating_sub(looked_at) < WAITING_GAP_NS).then(|| (t.saturating_sub(stamp).max(1), t))
}

/// Sends between two looks at the peer's latency estimate.
const PEER_LATENCY_EVERY: u32 = 16;
/// Round trips of the start-up latency probe ([`ShmLink::probe_latency`]).
const PROBE_ROUNDS: u64 = 64;
/// Rounds the probe must have timed while waiting for an estimate.
const PROBE_TIMED_AT_LEAST: usize = 16;
/// How long (ns) a side of the probe waits for its peer to come to it...
const PROBE_MEET_NS: u64 = 20_000_000;
/// ...and then for each answer.
const PROBE_ANSWER_NS: u64 = 1_000_000;

/// Payload bytes of a ring slot ([`ShmGeometry::from_config`]).
const SLOT_BYTES: usize = 16 << 10;

/// A consumer reading a long run of slots gives them back to the producer this many
/// bytes at a time, and at once when it has caught up with the producer or finished a
/// message: each store of `tail` moves its cache line to the producer's core when the
/// producer is waiting for room, and a ring of small slots would otherwise hand that
/// line over every 16 KiB of a large message.
const RELEASE_BYTES: usize = 128 << 10;

/// Slot count and size of each of the two rings of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmGeometry {
    /// Slots per ring (2 to 1024).
    pub nslots: usize,
    /// Payload bytes per slot: a multiple of 4096, from 4096 to 64 MiB.
    pub slot_bytes: usize,
}

impl ShmGeometry {
    /// The geometry of the links of a host, from the pipeline chunk of `cfg`
    /// ([`ShmGeometry::for_host`]); `oversubscribed`: the host runs more ranks than it
    /// has CPUs (the topology's verdict, `Topology::oversubscribed`).
    pub fn from_config(cfg: &Config, oversubscribed: bool) -> Self {
        Self::for_host(cfg.chunk_bytes, oversubscribed)
    }

    /// Each ring holds four pipeline chunks (half a chunk clamped to 64 KiB..1 MiB, times
    /// 8: 2 MiB with the default 512 KiB chunks). A segment is then 4 214 784 bytes
    /// (4 MiB and 20 KiB) per pair of ranks on a host, so 8 ranks on one host need 28
    /// segments, about 113 MiB of /dev/shm.
    ///
    /// The slot is the unit the consumer can start on, so it sets how much of a message
    /// smaller than a chunk is copied in before the peer's reduction starts on it. Where
    /// every rank has a CPU, slots are [`SLOT_BYTES`]: slots of half a chunk (256 KiB)
    /// made a 64 KiB message one slot, its copy-in and the peer's read one after the
    /// other, and 16 KiB slots halved the time of 16-128 KiB all-reduces on 2 ranks
    /// (64 KiB: 9.7 to 4.5 us) and left 1-64 MiB level, with the consumer freeing slots
    /// [`RELEASE_BYTES`] at a time. Where ranks outnumber CPUs a producer and its consumer
    /// take turns on a core, so there is no overlap to gain, and the slots stay half a
    /// chunk (16 KiB slots measured 1 MiB 20 % slower with 4 ranks on 2 CPUs)
    /// (`docs/perf-log/2026-12-07-shm-slots.md`).
    pub fn for_host(chunk_bytes: usize, oversubscribed: bool) -> Self {
        let half_chunk = (chunk_bytes / 2).clamp(64 << 10, 1 << 20) / PAGE * PAGE;
        let slot = if oversubscribed {
            half_chunk
        } else {
            SLOT_BYTES
        };
        ShmGeometry {
            nslots: 8 * half_chunk / slot,
            slot_bytes: slot,
        }
    }

    /// Size of a segment with this geometry, in bytes: the control page plus two rings.
    pub fn segment_bytes(&self) -> usize {
        CONTROL_BYTES + 2 * self.ring_bytes()
    }

    fn desc_bytes(&self) -> usize {
        (self.nslots * 64).div_ceil(PAGE) * PAGE
    }

    fn ring_bytes(&self) -> usize {
        self.desc_bytes() + self.nslots * self.slot_bytes
    }

    fn validate(&self) -> Result<()> {
        if !(2..=1024).contains(&self.nslots)
            || !(PAGE..=64 << 20).contains(&self.slot_bytes)
            || self.slot_bytes % PAGE != 0
        {
            return Err(Error::Shm(format!(
                "ring geometry {} slots x {} bytes: need 2 to 1024 slots of a multiple of \
                 4096 bytes up to 64 MiB",
                self.nslots, self.slot_bytes
            )));
        }
        Ok(())
    }
}

/// A fresh segment name for the pair `(a, b)` of job `job_id`:
/// `hetccl-<job>-<low rank>-<high rank>-<random>-<owner tag>`. The random part keeps two
/// jobs that share an id (or a leftover file from a crash) from colliding; the owner tag
/// lets a later process remove the file if this one dies before unlinking it.
pub fn segment_name(job_id: &str, a: usize, b: usize) -> String {
    let job: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "hetccl-{job}-{}-{}-{:016x}-{}",
        a.min(b),
        a.max(b),
        rand::random::<u64>(),
        super::segment::owner_tag()
    )
}

#[repr(C, align(64))]
struct SegHeader {
    magic: u64,
    version: u32,
    nslots: u32,
    slot_bytes: u64,
    segment_bytes: u64,
    creator_rank: u64,
    opener_rank: u64,
}

impl SegHeader {
    /// Checks a header that another process wrote, for the segment of `len` bytes that
    /// `peer` made for `rank`; returns its ring geometry, or what is wrong with it.
    fn check(
        &self,
        rank: usize,
        peer: usize,
        len: usize,
    ) -> std::result::Result<ShmGeometry, String> {
        let h = self;
        let geom = ShmGeometry {
            nslots: h.nslots as usize,
            slot_bytes: usize::try_from(h.slot_bytes).unwrap_or(usize::MAX),
        };
        if h.magic != SHM_MAGIC {
            Err("it is not a hetccl segment".to_string())
        } else if h.version != SHM_VERSION {
            Err(format!(
                "segment version {}, this build uses {SHM_VERSION}",
                h.version
            ))
        } else if h.creator_rank != peer as u64 || h.opener_rank != rank as u64 {
            Err(format!(
                "it was made for ranks {} and {}",
                h.creator_rank, h.opener_rank
            ))
        } else if geom.validate().is_err()
            // Validated first: the geometry's size cannot overflow.
            || geom.segment_bytes() as u64 != h.segment_bytes
            || h.segment_bytes != len as u64
        {
            Err(format!(
                "its geometry ({} slots x {} bytes, {} bytes) does not match its size {len}",
                h.nslots, h.slot_bytes, h.segment_bytes
            ))
        } else {
            Ok(geom)
        }
    }
}

#[repr(C, align(64))]
struct SideCtl {
    pid: AtomicI32,
    state: AtomicU32,
    /// Inode of the process's pid namespace: a pid means something to the other side
    /// only when both live in the same namespace.
    pidns: AtomicU64,
    /// Why this side aborted ([`AbortCause::to_word`]), written before the state.
    cause: AtomicU64,
}

#[repr(C, align(64))]
struct Counter(AtomicU64);

/// One side's latency estimate between the two cores (`stores.rs`), on a line of its
/// own: it changes with every measurement, which must not evict the lines the peer
/// polls.
#[repr(C, align(64))]
struct LatencyLine {
    /// The estimate (ns); 0: none yet.
    ns: AtomicU64,
    /// When it was last measured (`now_ns`).
    at: AtomicU64,
}

/// One side's half of the start-up latency probe ([`ShmLink::probe_latency`]): when it
/// sent its last round, and the round, on two lines as a slot's descriptor and the
/// ring's `head` are, so that a probe round travels as a slot does.
#[repr(C)]
struct ProbeLines {
    stamp: Counter,
    round: Counter,
}

#[repr(C)]
struct Control {
    header: SegHeader,
    side: [SideCtl; 2],
    /// `[ring0 head, ring0 tail, ring1 head, ring1 tail]`.
    counters: [Counter; 4],
    latency: [LatencyLine; 2],
    probe: [ProbeLines; 2],
}

const _: () = assert!(std::mem::size_of::<Control>() == 13 * 64);
const _: () = assert!(std::mem::size_of::<Control>() <= CONTROL_BYTES);

/// Written by the producer before it publishes the slot.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct SlotDesc {
    header: MsgHeader,
    /// Where this slot's payload starts within the message.
    offset: u64,
    /// Payload bytes in the slot.
    len: u64,
    flags: u64,
    /// When the producer published the slot (`CLOCK_MONOTONIC` ns), on the first slot
    /// of a message and every [`STAMP_EVERY`]-th; 0 on the others.
    stamp: u64,
}

const _: () = assert!(std::mem::size_of::<SlotDesc>() == 64);

/// What a checked slot descriptor holds for the receive in progress.
#[derive(Debug, PartialEq, Eq)]
struct SlotStep {
    /// Whether the slot starts a message (its descriptor's header is the message's).
    first: bool,
    /// Payload bytes of the message.
    total: usize,
    /// Payload bytes delivered before this slot (where the slot's bytes go).
    done: usize,
    /// Payload bytes in the slot.
    len: usize,
}

impl SlotDesc {
    /// Checks a descriptor the peer wrote against the receive in progress (`recv`:
    /// `(message bytes, bytes delivered)`, `None` between messages), in slots of
    /// `slot_bytes`. Whatever the peer wrote, the step it returns stays inside the slot
    /// and the message. A few compares on the fast path; the words are in `slot_error`.
    #[inline]
    fn check(
        &self,
        recv: Option<(usize, usize)>,
        slot_bytes: usize,
    ) -> std::result::Result<SlotStep, String> {
        let (first, total, done) = match recv {
            None if self.flags & FIRST != 0 && self.header.magic == MSG_MAGIC => {
                match usize::try_from(self.header.bytes) {
                    Ok(total) => (true, total, 0),
                    Err(_) => return Err(self.slot_error(recv, slot_bytes)),
                }
            }
            Some((total, done)) if self.flags & FIRST == 0 => (false, total, done),
            _ => return Err(self.slot_error(recv, slot_bytes)),
        };
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        if done > total || self.offset != done as u64 || len > slot_bytes || len > total - done {
            return Err(self.slot_error(recv, slot_bytes));
        }
        Ok(SlotStep {
            first,
            total,
            done,
            len,
        })
    }

    /// What is wrong with a descriptor that [`SlotDesc::check`] refused.
    #[cold]
    #[inline(never)]
    fn slot_error(&self, recv: Option<(usize, usize)>, slot_bytes: usize) -> String {
        let d = self;
        let (total, done) = match recv {
            None if d.flags & FIRST != 0 => {
                match MsgHeader::decode(bytemuck::bytes_of(&d.header)) {
                    Err(e) => return e,
                    Ok(Frame::Abort(_)) => return "an abort notice in a slot".into(),
                    Ok(Frame::Message(h)) => match usize::try_from(h.bytes) {
                        Ok(t) => (t, 0),
                        Err(_) => return format!("a message of {} bytes", h.bytes),
                    },
                }
            }
            None => {
                return format!(
                    "a message continues (flags {:#x}) where one should start",
                    d.flags
                )
            }
            Some(_) if d.flags & FIRST != 0 => {
                return format!("a message starts (flags {:#x}) inside another", d.flags)
            }
            Some(r) => r,
        };
        let left = total.saturating_sub(done);
        format!(
            "the slot carries {} bytes at offset {} of a {total} byte message, expected at \
             most {} at offset {done}",
            d.len,
            d.offset,
            slot_bytes.min(left)
        )
    }
}

/// One direction of the segment, as seen from this process.
struct Ring {
    head: *const AtomicU64,
    tail: *const AtomicU64,
    desc: *mut SlotDesc,
    data: *mut u8,
}

/// Which ring a side sends on: side 0 (creator) sends on ring 0.
fn ring_at(base: *mut u8, geom: &ShmGeometry, ctl: *const Control, index: usize) -> Ring {
    // SAFETY: `base` maps `geom.segment_bytes()` bytes, `ctl` points at its start and
    // `index` is 0 or 1, so every offset below stays inside the mapping.
    unsafe {
        let start = base.add(CONTROL_BYTES + index * geom.ring_bytes());
        Ring {
            head: &(*ctl).counters[2 * index].0,
            tail: &(*ctl).counters[2 * index + 1].0,
            desc: start.cast::<SlotDesc>(),
            data: start.add(geom.desc_bytes()),
        }
    }
}

/// A shared-memory [`Link`]. Create with [`ShmLink::create`] on one side and
/// [`ShmLink::open`] on the other (or let [`crate::transport::connect_all`] do it).
pub struct ShmLink {
    rank: usize,
    peer: usize,
    name: String,
    /// 0 for the creator, 1 for the opener.
    side: usize,
    map: Mapping,
    geom: ShmGeometry,
    ctl: *const Control,
    tx: Ring,
    rx: Ring,
    /// The segment's `/dev/shm` name, which only the creator holds and unlinks.
    linked: Option<SegmentName>,
    aborted: bool,
    /// Producer's own copy of `tx.head` (it is the only writer) and last `tx.tail` seen.
    tx_head: u64,
    tx_tail_seen: u64,
    /// Consumer's own copy of `rx.tail`, last `rx.head` seen, and the `rx.tail` last
    /// stored (slots are given back [`RELEASE_BYTES`] at a time).
    rx_tail: u64,
    rx_head_seen: u64,
    rx_released: u64,
    /// Slots in [`RELEASE_BYTES`] (at least one).
    release_slots: u64,
    /// Payload bytes of the current outgoing message already in the ring; `None` until
    /// its first slot (the one with the header) is.
    send_off: Option<usize>,
    /// `(message bytes, bytes delivered)` of the current incoming message.
    recv: Option<(usize, usize)>,
    /// The peer's process, watched once its side has attached.
    peer_proc: Option<PeerProcess>,
    /// How this side writes into its outgoing ring ([`ShmLink::set_stores`]).
    stores: SlotStores,
    /// When the consumer last found the incoming ring empty (`now_ns`), if it has not
    /// read a slot since; 0 otherwise.
    rx_empty_at: u64,
    /// This side's latency estimate and when it was measured, as published.
    latency: (u64, u64),
    /// Sends since the peer's published estimate was last read.
    since_peer_read: u32,
}

// SAFETY: the raw pointers point into a mapping owned by this value (unmapped only when
// it drops); nothing else in this process refers to it, so moving it to another thread
// is fine. The other process is synchronised with through atomics only.
unsafe impl Send for ShmLink {}

impl ShmLink {
    /// Creates, sizes and maps the segment `/dev/shm/<name>` for the link from `rank` to
    /// `peer` ([`OwnedSegment::create`]: every page reserved up front, so a full
    /// `/dev/shm` gives an error here rather than a `SIGBUS` later, and pre-faulted). The
    /// caller hands `name` to the peer, which calls [`ShmLink::open`]; once it has, call
    /// [`ShmLink::unlink`].
    pub fn create(name: &str, rank: usize, peer: usize, geom: ShmGeometry) -> Result<ShmLink> {
        geom.validate()?;
        let bytes = geom.segment_bytes();
        let path = format!("/dev/shm/{name}");
        let what = format!("rank {rank}: segment {path} for peer {peer}");
        let (map, linked) = OwnedSegment::create(bytes, Some(name), &what)?.into_named();
        let ctl = map.as_ptr().cast::<Control>();
        // SAFETY: the mapping is fresh, zero-filled and at least CONTROL_BYTES long; no
        // other process has it yet (the name is published only after this returns).
        unsafe {
            std::ptr::write(
                std::ptr::addr_of_mut!((*ctl).header),
                SegHeader {
                    magic: SHM_MAGIC,
                    version: SHM_VERSION,
                    nslots: geom.nslots as u32,
                    slot_bytes: geom.slot_bytes as u64,
                    segment_bytes: bytes as u64,
                    creator_rank: rank as u64,
                    opener_rank: peer as u64,
                },
            );
        }
        let link = ShmLink::attach(name, rank, peer, 0, map, linked, geom);
        tracing::debug!(rank, peer, bytes, "created shared-memory segment {path}");
        Ok(link)
    }

    /// Maps the segment `name` that `peer` created for this `rank`, checking that it
    /// was made for this pair by a compatible build.
    pub fn open(name: &str, rank: usize, peer: usize) -> Result<ShmLink> {
        let handle = SegmentHandle::Named {
            name: name.to_string(),
        };
        let map = segment::open(
            &handle,
            Some(peer),
            CONTROL_BYTES,
            true,
            &format!("rank {rank}"),
        )?;
        // SAFETY: the mapping is at least CONTROL_BYTES long (checked by `open`); the
        // header was written by the creator before it published the name, and the
        // bootstrap exchange that carried the name orders that write before this read.
        let h =
            unsafe { std::ptr::read(std::ptr::addr_of!((*map.as_ptr().cast::<Control>()).header)) };
        let geom = h.check(rank, peer, map.len()).map_err(|p| {
            Error::Shm(format!(
                "rank {rank}: cannot use /dev/shm/{name} from rank {peer}: {p}"
            ))
        })?;
        Ok(ShmLink::attach(name, rank, peer, 1, map, None, geom))
    }

    fn attach(
        name: &str,
        rank: usize,
        peer: usize,
        side: usize,
        map: Mapping,
        linked: Option<SegmentName>,
        geom: ShmGeometry,
    ) -> ShmLink {
        let base = map.as_ptr();
        let ctl = base.cast::<Control>().cast_const();
        // SAFETY: `base` is a live mapping of at least CONTROL_BYTES, kept by the link
        // built below; `side` is 0 or 1.
        let me = unsafe { side_ctl(ctl, side) };
        me.pid.store(std::process::id() as i32, Ordering::Relaxed);
        me.pidns.store(own_pidns(), Ordering::Relaxed);
        me.state.store(ATTACHED, Ordering::Release);
        ShmLink {
            rank,
            peer,
            name: name.to_string(),
            side,
            map,
            geom,
            ctl,
            tx: ring_at(base, &geom, ctl, side),
            rx: ring_at(base, &geom, ctl, 1 - side),
            linked,
            aborted: false,
            tx_head: 0,
            tx_tail_seen: 0,
            rx_tail: 0,
            rx_released: 0,
            release_slots: (RELEASE_BYTES / geom.slot_bytes).max(1) as u64,
            rx_head_seen: 0,
            send_off: None,
            recv: None,
            peer_proc: None,
            stores: SlotStores::new(ShmStores::Auto),
            rx_empty_at: 0,
            latency: (0, 0),
            since_peer_read: 0,
        }
    }

    /// Chooses how this side writes into its outgoing ring: ordinary or streaming
    /// stores, or (the default) by the latency it measures on the incoming ring as it
    /// runs (`stores.rs`). Each side chooses for its own writes only.
    pub fn set_stores(&mut self, policy: ShmStores) {
        self.stores = SlotStores::new(policy);
    }

    fn latency_line(&self, side: usize) -> &LatencyLine {
        // SAFETY: the mapping lives as long as `self`; `side` is 0 or 1.
        unsafe { &(*self.ctl).latency[side] }
    }

    /// Publishes this side's new latency estimate `ns`, measured at `at`, and chooses
    /// the stores again.
    fn publish_latency(&mut self, ns: u64, at: u64) {
        if self.latency.1 == 0 {
            tracing::debug!(
                rank = self.rank,
                peer = self.peer,
                latency_ns = ns,
                "shared-memory link: first latency estimate between the cores"
            );
        }
        let line = self.latency_line(self.side);
        line.ns.store(ns, Ordering::Relaxed);
        line.at.store(at, Ordering::Release);
        self.latency = (ns, at);
        self.choose_stores();
    }

    /// Chooses the stores from this side's estimate and the peer's published one.
    fn choose_stores(&mut self) {
        self.since_peer_read = 0;
        let line = self.latency_line(1 - self.side);
        let at = line.at.load(Ordering::Acquire);
        let peer = (line.ns.load(Ordering::Relaxed), at);
        self.stores.choose(self.latency, peer);
    }

    /// Measures the one-way latency between the two cores before the first message, so
    /// that the link starts with the stores that suit where they are: the estimate the
    /// consumer keeps as it runs needs [`super::stores::FIRST_ESTIMATE_AFTER`] slots it
    /// was waiting for, which a short job may never send. The two sides pass a stamped
    /// round number back and forth [`PROBE_ROUNDS`] times, and each times the rounds it
    /// was waiting for the way the consumer times slots (the stamp and the round sit on
    /// two lines, as a descriptor and `head` do, and only a wait that had just looked in
    /// vain counts). The least delay sets the stores the link starts with
    /// ([`SlotStores::start`]) until the running estimate exists on either side; it is
    /// not published as one (its rounds read lower than slots do).
    ///
    /// Collective over the pair: both sides call it at the same point, while nothing
    /// else uses the link, once. A side whose peer does not come within
    /// [`PROBE_MEET_NS`] or stops answering for [`PROBE_ANSWER_NS`] (descheduled: the
    /// two share a core) gives up without an estimate, and so does one that timed too
    /// few rounds; the link then starts with ordinary stores, as before any estimate.
    pub fn probe_latency(&mut self) -> Option<u64> {
        self.probe_latency_within(PROBE_MEET_NS, PROBE_ANSWER_NS)
    }

    /// [`ShmLink::probe_latency`] with its waits given (ns).
    fn probe_latency_within(&mut self, meet_ns: u64, answer_ns: u64) -> Option<u64> {
        // SAFETY: the mapping lives as long as `self`; `side` is 0 or 1.
        let (mine, theirs) = unsafe {
            (
                &(*self.ctl).probe[self.side],
                &(*self.ctl).probe[1 - self.side],
            )
        };
        let send = |round: u64| {
            mine.stamp.0.store(now_ns(), Ordering::Relaxed);
            mine.round.0.store(round, Ordering::Release);
        };
        let mut least = u64::MAX;
        let mut timed = 0;
        let mut deadline = now_ns().saturating_add(meet_ns);
        for round in 1..=PROBE_ROUNDS {
            // Side 0 opens every round and side 1 answers it.
            if self.side == 0 {
                send(round);
            }
            let mut looked_at = 0;
            while theirs.round.0.load(Ordering::Acquire) < round {
                looked_at = now_ns();
                if looked_at > deadline {
                    return self.probe_gave_up(&format!("got no answer in round {round}"));
                }
            }
            if let Some((delay, _)) =
                waited_delay(looked_at, theirs.stamp.0.load(Ordering::Relaxed))
            {
                least = least.min(delay);
                timed += 1;
            }
            if self.side == 1 {
                send(round);
            }
            deadline = now_ns().saturating_add(answer_ns);
        }
        if timed < PROBE_TIMED_AT_LEAST {
            return self.probe_gave_up(&format!("timed {timed} rounds, too few"));
        }
        tracing::debug!(
            rank = self.rank,
            peer = self.peer,
            latency_ns = least,
            timed,
            "shared-memory link: latency probe"
        );
        self.stores.start(least);
        Some(least)
    }

    /// Logs why the start-up probe has no estimate; the link keeps its stores until the
    /// running estimate exists.
    #[cold]
    fn probe_gave_up(&self, why: &str) -> Option<u64> {
        tracing::debug!(
            rank = self.rank,
            peer = self.peer,
            "shared-memory link: the latency probe {why}; left to the running estimate"
        );
        None
    }

    /// Called once per send: every [`PEER_LATENCY_EVERY`]-th chooses the stores again
    /// with the peer's latest estimate (a side that seldom waits for a slot measures
    /// little itself).
    #[inline]
    fn before_send(&mut self) {
        self.since_peer_read += 1;
        if self.since_peer_read >= PEER_LATENCY_EVERY {
            self.choose_stores();
        }
    }

    /// Removes the segment's name from `/dev/shm` (creator side; a no-op on the opener
    /// and on later calls). Call once the peer has opened it: the mappings stay valid.
    pub fn unlink(&mut self) {
        if let Some(mut name) = self.linked.take() {
            if let Err(e) = name.unlink() {
                tracing::warn!(
                    rank = self.rank,
                    peer = self.peer,
                    "could not unlink /dev/shm/{}: {e}",
                    self.name
                );
            }
        }
    }

    /// The segment's name (the file was `/dev/shm/<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the segment in bytes.
    pub fn segment_bytes(&self) -> usize {
        self.map.len()
    }

    /// Ring geometry of the segment.
    pub fn geometry(&self) -> ShmGeometry {
        self.geom
    }

    fn me(&self) -> &SideCtl {
        // SAFETY: the mapping lives as long as `self`; `side` is 0 or 1.
        unsafe { side_ctl(self.ctl, self.side) }
    }

    fn other(&self) -> &SideCtl {
        // SAFETY: the mapping lives as long as `self`; `side` is 0 or 1.
        unsafe { side_ctl(self.ctl, 1 - self.side) }
    }

    fn lost(&self, detail: impl Into<String>) -> Error {
        Error::Link {
            peer: self.peer,
            detail: detail.into(),
            lost: true,
        }
    }

    fn broken(&self, detail: impl Into<String>) -> Error {
        Error::Link {
            peer: self.peer,
            detail: detail.into(),
            lost: false,
        }
    }

    fn check_not_aborted(&self) -> Result<()> {
        if self.aborted {
            return Err(self.broken(format!(
                "rank {} aborted this shared-memory link earlier",
                self.rank
            )));
        }
        Ok(())
    }

    /// Fails when this side aborted, or the peer closed or aborted its side.
    fn check_sendable(&self) -> Result<()> {
        self.check_not_aborted()?;
        // The peer's state line is written once or twice in its life, so this load
        // stays in this core's cache and costs nothing on the fast path.
        let peer_state = self.other().state.load(Ordering::Acquire);
        if has_left(peer_state) {
            return Err(self.peer_left(peer_state, "sending"));
        }
        Ok(())
    }

    /// The error for a peer whose side is in `state` (closed or aborted) while this
    /// side was `doing` something with the link.
    fn peer_left(&self, state: u32, doing: &str) -> Error {
        let how = if state == ABORTED {
            "aborted"
        } else {
            "closed"
        };
        self.lost(format!(
            "peer {} {how} the shared-memory link while rank {} was {doing}",
            self.peer, self.rank
        ))
    }

    /// Gives the slots read so far back to the producer (`tail`: this ring's).
    #[inline]
    fn release(&mut self, tail: &AtomicU64) {
        if self.rx_released != self.rx_tail {
            self.rx_released = self.rx_tail;
            tail.store(self.rx_tail, Ordering::Release);
        }
    }

    /// Free slots in the outgoing ring (rereads the consumer's tail only when the
    /// cached one says the ring is full).
    fn tx_free(&mut self) -> usize {
        let n = self.geom.nslots as u64;
        if self.tx_head - self.tx_tail_seen == n {
            // SAFETY: tail points at an atomic in the live mapping.
            self.tx_tail_seen = unsafe { &*self.tx.tail }.load(Ordering::Acquire);
        }
        (n - (self.tx_head - self.tx_tail_seen)) as usize
    }

    /// Payload of the `i`-th slot after `tx_head`.
    ///
    /// # Safety
    /// Write to it only when `i < tx_free()` (the consumer has freed the slot: its tail
    /// was read with acquire), and no more than `slot_bytes`.
    unsafe fn tx_slot(&self, i: usize) -> *mut u8 {
        let slot = ((self.tx_head + i as u64) % self.geom.nslots as u64) as usize;
        // SAFETY: slot < nslots, so the slot lies inside this ring of the mapping.
        unsafe { self.tx.data.add(slot * self.geom.slot_bytes) }
    }

    /// Publishes the slot at `tx_head`, holding the next `len` payload bytes of the
    /// message `header` announces; true when that completes the message.
    fn publish(&mut self, header: &MsgHeader, len: usize) -> bool {
        let first = self.send_off.is_none();
        let off = self.send_off.unwrap_or(0);
        let slot = (self.tx_head % self.geom.nslots as u64) as usize;
        let stamp = if first || self.tx_head % STAMP_EVERY == 0 {
            now_ns()
        } else {
            0
        };
        // SAFETY: slot < nslots, so the descriptor lies inside this ring. The consumer
        // has freed the slot and does not look at it again until the release store of
        // head below.
        unsafe {
            std::ptr::write(
                self.tx.desc.add(slot),
                SlotDesc {
                    header: if first { *header } else { MsgHeader::default() },
                    offset: off as u64,
                    len: len as u64,
                    flags: if first { FIRST } else { 0 },
                    stamp,
                },
            );
        }
        self.tx_head += 1;
        // SAFETY: head points at an atomic in the live mapping.
        unsafe { &*self.tx.head }.store(self.tx_head, Ordering::Release);
        if off + len == header.bytes as usize {
            self.send_off = None;
            return true;
        }
        self.send_off = Some(off + len);
        false
    }

    /// Starts watching the peer's process, once it has attached (its pid is in the
    /// control page); a no-op before that and after the first time. Checks of the peer
    /// start it themselves if nobody did.
    pub fn watch_peer(&mut self) {
        self.peer_process_alive();
    }

    /// Whether the peer's process still runs, as far as this side can tell. The watch
    /// starts once the peer has attached (its pid is in the control page).
    fn peer_process_alive(&mut self) -> bool {
        if self.peer_proc.is_none() {
            let other = self.other();
            // The state is stored (release) after the pid and namespace.
            let attached = other.state.load(Ordering::Acquire) != 0;
            let pid = other.pid.load(Ordering::Relaxed);
            if !attached || pid <= 0 {
                return true;
            }
            let pidns = other.pidns.load(Ordering::Relaxed);
            self.peer_proc = Some(PeerProcess::watch(pid, pidns));
        }
        !self.peer_proc.as_ref().is_some_and(|p| p.exited())
    }
}

/// The control line of one side.
///
/// # Safety
/// `ctl` must point at the control page of a live mapping that outlives `'a`, and
/// `side` must be 0 or 1.
unsafe fn side_ctl<'a>(ctl: *const Control, side: usize) -> &'a SideCtl {
    // SAFETY: guaranteed by the caller; the fields are atomics, so shared access from
    // both processes is sound.
    unsafe { &(*ctl).side[side] }
}

impl Link for ShmLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn kind(&self) -> LinkKind {
        LinkKind::Shm
    }

    fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool> {
        self.check_sendable()?;
        if header.bytes != data.len() as u64 {
            return Err(Error::invalid(
                "poll_send",
                format!(
                    "header says {} bytes, payload has {}",
                    header.bytes,
                    data.len()
                ),
            ));
        }
        let slot_bytes = self.geom.slot_bytes;
        self.before_send();
        loop {
            if self.tx_free() == 0 {
                return Ok(false);
            }
            let off = self.send_off.unwrap_or(0);
            let len = (data.len() - off).min(slot_bytes);
            // SAFETY: the free slot at tx_head has room for `len <= slot_bytes` bytes
            // (`tx_slot`'s contract); `data` is a separate buffer.
            unsafe {
                let slot = self.tx_slot(0);
                self.stores.copy(slot, data.as_ptr().add(off), len);
            }
            if self.publish(header, len) {
                return Ok(true);
            }
        }
    }

    fn has_send_space(&self) -> bool {
        true
    }

    fn send_space(&mut self, header: &MsgHeader, out: &mut Vec<(usize, DirectDst)>) {
        if self.aborted {
            return;
        }
        let total = header.bytes as usize;
        let mut off = self.send_off.unwrap_or(0);
        self.before_send();
        for i in 0..self.tx_free() {
            let len = (total - off).min(self.geom.slot_bytes);
            if len == 0 {
                break;
            }
            // SAFETY: `i < tx_free()`, so the slot is free and the producer's alone
            // until it is published; it holds `slot_bytes >= len` bytes.
            let space = unsafe { DirectDst::new(NonNull::new_unchecked(self.tx_slot(i)), len) };
            out.push((off, space.with_streaming(self.stores.streaming())));
            off += len;
        }
    }

    fn commit_send(&mut self, header: &MsgHeader, upto: usize) -> Result<bool> {
        self.check_sendable()?;
        let total = header.bytes as usize;
        loop {
            let off = self.send_off.unwrap_or(0);
            let len = (total - off).min(self.geom.slot_bytes);
            if off + len > upto || self.tx_free() == 0 {
                return Ok(false);
            }
            if self.publish(header, len) {
                return Ok(true);
            }
        }
    }

    fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool> {
        self.check_not_aborted()?;
        // SAFETY: head/tail point at atomics in the live mapping.
        let (head, tail) = unsafe { (&*self.rx.head, &*self.rx.tail) };
        let n = self.geom.nslots as u64;
        loop {
            if self.rx_tail == self.rx_head_seen {
                self.rx_head_seen = head.load(Ordering::Acquire);
                if self.rx_tail == self.rx_head_seen {
                    self.rx_empty_at = now_ns();
                    self.release(tail);
                    let state = self.other().state.load(Ordering::Acquire);
                    if state == ABORTED
                        || (state == CLOSED && head.load(Ordering::Acquire) == self.rx_tail)
                    {
                        return Err(self.peer_left(state, "receiving"));
                    }
                    return Ok(false);
                }
            }
            let slot = (self.rx_tail % n) as usize;
            // SAFETY: slot < nslots; the producer wrote this descriptor before its
            // release store of head, which the acquire load above observed.
            let d = unsafe { std::ptr::read(self.rx.desc.add(slot)) };
            let empty_at = std::mem::take(&mut self.rx_empty_at);
            if let Some((delay, t)) = waited_delay(empty_at, d.stamp) {
                if let Some(ns) = self.stores.observe(delay) {
                    self.publish_latency(ns, t);
                }
            }
            let step = d.check(self.recv, self.geom.slot_bytes).map_err(|e| {
                self.broken(format!(
                    "shared-memory ring from peer {} is out of step at slot {}: {e}",
                    self.peer, self.rx_tail
                ))
            })?;
            if step.first {
                sink.header(&d.header)?;
            }
            let (total, done, len) = (step.total, step.done, step.len);
            if len > 0 {
                // SAFETY: the slot holds `len <= slot_bytes` bytes the producer wrote
                // before publishing; it does not touch the slot again until a release
                // store of tail past it, after the sink is done with it.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.rx.data.add(slot * self.geom.slot_bytes), len)
                };
                sink.data(done, bytes)?;
            }
            self.rx_tail += 1;
            if done + len == total {
                self.release(tail);
                self.recv = None;
                return Ok(true);
            }
            if self.rx_tail - self.rx_released >= self.release_slots {
                self.release(tail);
            }
            self.recv = Some((total, done + len));
        }
    }

    fn check_peer(&mut self) -> Result<()> {
        let state = self.other().state.load(Ordering::Acquire);
        if state == ABORTED {
            return Err(self.lost(format!("peer {} aborted the shared-memory link", self.peer)));
        }
        let gone = if state == CLOSED {
            Some("closed the shared-memory link")
        } else if !self.peer_process_alive() {
            Some("process has exited")
        } else {
            None
        };
        if let Some(how) = gone {
            // Bytes it sent before going are still good; only fail when this side
            // needs more from it, or is sending to it.
            // SAFETY: head points at an atomic in the live mapping.
            let pending = unsafe { &*self.rx.head }.load(Ordering::Acquire) != self.rx_tail;
            if self.send_off.is_some() || !pending {
                let pid = self.other().pid.load(Ordering::Relaxed);
                return Err(self.lost(format!("peer {} (pid {pid}) {how}", self.peer)));
            }
        }
        Ok(())
    }

    fn abort(&mut self, cause: AbortCause) {
        self.aborted = true;
        self.me().cause.store(cause.to_word(), Ordering::Relaxed);
        self.me().state.store(ABORTED, Ordering::Release);
    }

    fn abort_notice(&mut self) -> Option<AbortCause> {
        let other = self.other();
        if other.state.load(Ordering::Acquire) != ABORTED {
            return None;
        }
        AbortCause::from_word(other.cause.load(Ordering::Relaxed))
    }

    fn probe_at_start(&mut self) {
        self.probe_latency();
    }

    fn start_on_shared_cpus(&mut self, far_apart: bool) {
        self.stores.start_on_shared_cpus(far_apart);
    }

    fn peer_note(&mut self) -> Option<String> {
        self.peer_process_alive();
        self.peer_proc.as_ref().and_then(|p| p.stopped())
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        if !self.aborted {
            self.me().state.store(CLOSED, Ordering::Release);
        }
        // The mapping goes with `self.map`, after this.
        self.unlink();
    }
}

#[cfg(test)]
mod tests {
    use super::super::stores::PROBE_STREAMING_ABOVE_NS;
    use super::*;
    use crate::transport::alloc_meter::allocated_by;
    use crate::transport::shm::segment::shm_free_bytes;
    use crate::transport::testing::*;
    use proptest::prelude::*;

    /// A value that is mostly `valid`, sometimes anything.
    fn mostly<T: Arbitrary + Clone + std::fmt::Debug + 'static>(
        valid: T,
    ) -> impl Strategy<Value = T> {
        prop_oneof![3 => Just(valid), 1 => any::<T>()]
    }

    proptest! {
        /// The segment header is written by the peer's process: any values are checked
        /// without a panic, and only a header that fits the pair and the mapping passes.
        #[test]
        fn any_segment_header_is_checked(
            (nslots, pages) in (2u32..=16, 1u64..=16),
            rank in 0usize..8,
            peer in 0usize..8,
            magic in mostly(SHM_MAGIC),
            version in mostly(SHM_VERSION),
            bad_slots in prop::option::weighted(0.2, any::<u32>()),
            bad_slot_bytes in prop::option::weighted(0.2, any::<u64>()),
            bad_segment in prop::option::weighted(0.2, any::<u64>()),
            bad_len in prop::option::weighted(0.2, any::<usize>()),
            bad_ranks in prop::option::weighted(0.2, (any::<u64>(), any::<u64>())),
        ) {
            let geom = ShmGeometry { nslots: nslots as usize, slot_bytes: (pages * 4096) as usize };
            let (creator, opener) = bad_ranks.unwrap_or((peer as u64, rank as u64));
            let h = SegHeader {
                magic,
                version,
                nslots: bad_slots.unwrap_or(nslots),
                slot_bytes: bad_slot_bytes.unwrap_or(pages * 4096),
                segment_bytes: bad_segment.unwrap_or(geom.segment_bytes() as u64),
                creator_rank: creator,
                opener_rank: opener,
            };
            let len = bad_len.unwrap_or(geom.segment_bytes());
            match h.check(rank, peer, len) {
                Ok(g) => {
                    prop_assert!(g.validate().is_ok());
                    prop_assert_eq!(g.segment_bytes(), len);
                    prop_assert_eq!(g.segment_bytes() as u64, h.segment_bytes);
                    prop_assert_eq!((h.magic, h.version), (SHM_MAGIC, SHM_VERSION));
                    prop_assert_eq!((creator, opener), (peer as u64, rank as u64));
                }
                Err(e) => prop_assert!(
                    e == "it is not a hetccl segment"
                        || e.starts_with("segment version ")
                        || e.starts_with("it was made for ranks ")
                        || e.starts_with("its geometry ("),
                    "{}", e
                ),
            }
        }

        /// Slot descriptors are written by the peer's process: any descriptor, in any
        /// state of the receive, is checked without a panic or an allocation, and a step
        /// that passes stays inside its slot and its message.
        #[test]
        fn any_slot_descriptor_is_checked(
            header in prop_oneof![
                (any::<u64>(), 0usize..1 << 20).prop_map(|(s, n)| header(s, n)),
                any::<[u8; 32]>().prop_map(|b| bytemuck::pod_read_unaligned(&b)),
            ],
            offset in prop::option::weighted(0.5, prop_oneof![0u64..1 << 20, any::<u64>()]),
            len in prop_oneof![0u64..1 << 17, any::<u64>()],
            flags in prop_oneof![Just(FIRST), Just(0u64), any::<u64>()],
            recv in prop::option::of((0usize..1 << 20, 0usize..1 << 20)),
            slot_pages in 1usize..=16,
        ) {
            // Mostly the offset the receive expects, so steps pass too.
            let offset = offset.unwrap_or(recv.map_or(0, |r| r.1 as u64));
            let d = SlotDesc { header, offset, len, flags, stamp: 0 };
            let slot_bytes = slot_pages * 4096;
            let (r, allocated) = allocated_by(|| d.check(recv, slot_bytes));
            match r {
                Ok(step) => {
                    prop_assert_eq!(allocated, 0);
                    prop_assert!(step.len <= slot_bytes);
                    prop_assert!(step.done + step.len <= step.total);
                    prop_assert_eq!(step.done as u64, offset);
                    prop_assert_eq!(step.first, recv.is_none());
                    if step.first {
                        prop_assert_eq!(d.header.magic, MSG_MAGIC);
                        prop_assert_eq!(step.total as u64, d.header.bytes);
                    }
                }
                Err(e) => prop_assert!(
                    e.contains("header magic")
                        || e.contains("where one should start")
                        || e.contains("inside another")
                        || e.contains("the slot carries")
                        || e.contains("abort notice"),
                    "{}", e
                ),
            }
        }
    }

    fn small() -> ShmGeometry {
        ShmGeometry {
            nslots: 4,
            slot_bytes: 4096,
        }
    }

    fn pair(geom: ShmGeometry) -> (ShmLink, ShmLink) {
        let name = segment_name("test", 0, 1);
        let a = ShmLink::create(&name, 0, 1, geom).unwrap();
        let b = ShmLink::open(&name, 1, 0).unwrap();
        (a, b)
    }

    fn dev_shm_has(name: &str) -> bool {
        std::path::Path::new(&format!("/dev/shm/{name}")).exists()
    }

    #[test]
    fn geometry_is_16k_slots_with_a_cpu_per_rank_and_half_chunks_beyond() {
        let chunk = Config::default().chunk_bytes;
        assert_eq!(chunk, 512 << 10);
        let g = ShmGeometry::for_host(chunk, false);
        assert_eq!(
            g,
            ShmGeometry {
                nslots: 128,
                slot_bytes: 16 << 10
            }
        );
        assert_eq!(g.segment_bytes(), 4096 + 2 * (2 * 4096 + 128 * (16 << 10)));
        assert_eq!(g.segment_bytes(), 4_214_784);
        g.validate().unwrap();
        // Ranks that outnumber the CPUs: the same ring in 8 slots of half a chunk.
        let g = ShmGeometry::for_host(chunk, true);
        assert_eq!(
            g,
            ShmGeometry {
                nslots: 8,
                slot_bytes: 256 << 10
            }
        );
        assert_eq!(g.segment_bytes(), 4096 + 2 * (4096 + 8 * (256 << 10)));
        // The smallest and largest chunks keep the ring within the slot-count limit.
        for (chunk, nslots) in [(4096, 32), (64 << 20, 512)] {
            let g = ShmGeometry::for_host(chunk, false);
            g.validate().unwrap();
            assert_eq!((g.nslots, g.slot_bytes), (nslots, 16 << 10));
            let g = ShmGeometry::for_host(chunk, true);
            g.validate().unwrap();
            assert_eq!(g.nslots, 8);
        }
    }

    #[test]
    fn messages_pass_both_ways_at_once() {
        let (mut a, mut b) = pair(small());
        let name = a.name().to_string();
        a.unlink();
        assert!(!dev_shm_has(&name));
        duplex(&mut a, &mut b, &STANDARD_SIZES);
    }

    #[test]
    fn messages_written_in_place_arrive_like_copied_ones() {
        let (mut a, mut b) = pair(small());
        assert!(a.has_send_space());
        let data = pattern(10_000, 5);
        let h = header(1, data.len());
        let mut spaces = Vec::new();
        a.send_space(&h, &mut spaces);
        let layout: Vec<(usize, usize)> = spaces.iter().map(|(o, s)| (*o, s.len())).collect();
        assert_eq!(layout, [(0, 4096), (4096, 4096), (8192, 1808)]);
        for &(o, s) in &spaces[..2] {
            // SAFETY: the room is this test's until committed.
            unsafe { s.slice_mut(0..s.len()) }.copy_from_slice(&data[o..o + s.len()]);
        }
        // Only whole pieces below `upto` are published; none completes the message.
        assert!(!a.commit_send(&h, 6000).unwrap());
        assert!(!a.commit_send(&h, 8192).unwrap());
        // Room is offered again from the first unsent byte, and `poll_send` carries on.
        spaces.clear();
        a.send_space(&h, &mut spaces);
        assert_eq!(spaces.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [8192]);
        assert!(a.poll_send(&h, &data).unwrap());
        let mut sink = VecSink::default();
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(sink.header, Some(h));
        assert_eq!(sink.data, data);

        // A full ring offers no room, and a whole message committed in place completes.
        let big = pattern(4 * 4096, 6);
        let hb = header(2, big.len());
        assert!(a.poll_send(&hb, &big).unwrap());
        spaces.clear();
        a.send_space(&header(3, 100), &mut spaces);
        assert!(spaces.is_empty());
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(sink.data, big);
        let small_msg = pattern(100, 7);
        let hs = header(3, 100);
        a.send_space(&hs, &mut spaces);
        assert_eq!(spaces.len(), 1);
        // SAFETY: as above.
        unsafe { spaces[0].1.slice_mut(0..100) }.copy_from_slice(&small_msg);
        assert!(a.commit_send(&hs, 100).unwrap());
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(
            (sink.header, sink.data.as_slice()),
            (Some(hs), &small_msg[..])
        );
    }

    /// Records the ring's shared `tail` (what the producer sees) at every piece.
    struct TailSink {
        tail: *const AtomicU64,
        seen: Vec<u64>,
    }

    impl RecvSink for TailSink {
        fn header(&mut self, _: &MsgHeader) -> Result<()> {
            Ok(())
        }
        fn data(&mut self, _: usize, _: &[u8]) -> Result<()> {
            // SAFETY: the tail of the receiving link's live mapping.
            self.seen
                .push(unsafe { &*self.tail }.load(Ordering::Acquire));
            Ok(())
        }
    }

    #[test]
    fn the_consumer_gives_slots_back_in_batches_and_all_at_the_end() {
        let geom = ShmGeometry {
            nslots: 64,
            slot_bytes: 4096,
        };
        let batch = (RELEASE_BYTES / 4096) as u64;
        assert_eq!(batch, 32);
        let (mut a, mut b) = pair(geom);
        let data = pattern(48 * 4096, 3);
        let h = header(1, data.len());
        assert!(a.poll_send(&h, &data).unwrap());
        assert_eq!(a.tx_free(), 16);
        let mut sink = TailSink {
            tail: b.rx.tail,
            seen: Vec::new(),
        };
        assert!(b.poll_recv(&mut sink).unwrap());
        // Slots 0-31 are read before any is given back, 32-47 after the first batch;
        // the end of the message gives back the rest.
        let want: Vec<u64> = (0..48).map(|k| if k < batch { 0 } else { batch }).collect();
        assert_eq!(sink.seen, want);
        // SAFETY: as above.
        assert_eq!(unsafe { &*b.rx.tail }.load(Ordering::Acquire), 48);

        // A consumer that catches up with the producer mid-message gives back what it
        // read before it returns, so a producer waiting for room never waits on it.
        let data = pattern(80 * 4096, 4);
        let h = header(2, data.len());
        assert!(!a.poll_send(&h, &data).unwrap());
        let mut sink = VecSink::default();
        assert!(!b.poll_recv(&mut sink).unwrap());
        // SAFETY: as above.
        assert_eq!(unsafe { &*b.rx.tail }.load(Ordering::Acquire), 48 + 64);
        assert!(a.poll_send(&h, &data).unwrap());
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(sink.data, data);
    }

    #[test]
    fn slots_carry_stamps_and_a_waiting_consumer_measures_the_latency() {
        let geom = ShmGeometry {
            nslots: 64,
            slot_bytes: 4096,
        };
        let (mut a, mut b) = pair(geom);
        // A 20-slot message: its first slot and every STAMP_EVERY-th are stamped.
        let data = pattern(20 * 4096, 9);
        assert!(a.poll_send(&header(1, data.len()), &data).unwrap());
        let stamped: Vec<bool> = (0..20)
            // SAFETY: slot k < nslots of the live ring; the consumer has not run yet.
            .map(|k| unsafe { std::ptr::read(b.rx.desc.add(k)) }.stamp != 0)
            .collect();
        let want: Vec<bool> = (0..20u64).map(|k| k == 0 || k % STAMP_EVERY == 0).collect();
        assert_eq!(stamped, want);
        let mut sink = VecSink::default();
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(sink.data, data);
        assert_eq!(
            b.stores.latency_ns(),
            None,
            "the consumer was not waiting for any of those slots"
        );
        // One slot at a time, each published just after the consumer found the ring
        // empty: on one thread the delays are the calls' own time. A look that the
        // scheduler stretched past the gap does not count, so try until the window
        // is full.
        let one = pattern(64, 1);
        let mut seq = 2;
        while b.stores.latency_ns().is_none() && seq < 100_000 {
            let mut sink = VecSink::default();
            assert!(!b.poll_recv(&mut sink).unwrap());
            assert!(a.poll_send(&header(seq, one.len()), &one).unwrap());
            assert!(b.poll_recv(&mut sink).unwrap());
            seq += 1;
        }
        let latency = b.stores.latency_ns().expect("a full window of delays");
        assert!(latency < 1_000_000, "{latency} ns on one thread");
        assert_eq!(a.stores.latency_ns(), None, "a received nothing");
    }

    #[test]
    fn the_start_up_probe_sets_the_first_stores_and_messages_pass_after_it() {
        // Two threads may take turns on a core while other tests run: waits of seconds
        // rather than PROBE_ANSWER_NS, and fresh pairs until both sides timed enough
        // rounds (only a round both ran through counts).
        let (meet, answer) = (10_000_000_000, 1_000_000_000);
        let mut measured = None;
        for _ in 0..50 {
            let (a, b) = pair(small());
            let peer = std::thread::spawn(move || {
                let mut b = b;
                let got = b.probe_latency_within(meet, answer);
                (b, got)
            });
            let mut a = a;
            let got_a = a.probe_latency_within(meet, answer);
            let (b, got_b) = peer.join().unwrap();
            if let (Some(x), Some(y)) = (got_a, got_b) {
                measured = Some((a, b, x, y));
                break;
            }
        }
        let (mut a, mut b, x, y) = measured.expect("a probe that both sides finished");
        for (link, ns) in [(&a, x), (&b, y)] {
            assert!((1..1_000_000).contains(&ns), "{ns} ns between two threads");
            assert_eq!(link.stores.streaming(), ns > PROBE_STREAMING_ABOVE_NS);
            assert_eq!(link.latency, (0, 0), "the probe is not a running estimate");
        }
        duplex(&mut a, &mut b, &[0, 1, 4096, 5 * 4096 + 7]);
    }

    #[test]
    fn a_probe_without_its_peer_gives_up_with_ordinary_stores() {
        let (mut a, _b) = pair(small());
        let t0 = std::time::Instant::now();
        assert_eq!(a.probe_latency(), None);
        let waited = t0.elapsed();
        assert!(
            waited >= std::time::Duration::from_nanos(PROBE_MEET_NS)
                && waited < std::time::Duration::from_secs(5),
            "gave up after {waited:?}"
        );
        assert!(!a.stores.streaming());
        // The side that stayed away still carries messages.
        let (mut a, mut b) = pair(small());
        assert_eq!(a.probe_latency(), None);
        duplex(&mut a, &mut b, &[1, 4096]);
    }

    #[test]
    fn default_geometry_carries_messages() {
        let (mut a, mut b) = pair(ShmGeometry::for_host(512 << 10, false));
        duplex(&mut a, &mut b, &STANDARD_SIZES);
    }

    #[test]
    fn segment_is_unlinked_on_drop_of_the_creator() {
        let (a, b) = pair(small());
        let name = a.name().to_string();
        assert!(dev_shm_has(&name));
        drop(a);
        assert!(!dev_shm_has(&name));
        drop(b);
    }

    #[test]
    fn open_checks_the_pair() {
        let name = segment_name("test", 0, 1);
        let _a = ShmLink::create(&name, 0, 1, small()).unwrap();
        let e = ShmLink::open(&name, 2, 0).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "shared memory: rank 2: cannot use /dev/shm/{name} from rank 0: it was made \
                 for ranks 0 and 1"
            )
        );
        let e = ShmLink::open("hetccl-test-none", 1, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("opening /dev/shm/hetccl-test-none created by rank 0: No such file"),
            "{e}"
        );
    }

    #[test]
    fn too_small_dev_shm_is_a_clear_error() {
        let Some(free) = shm_free_bytes() else {
            crate::test_skip::skip(
                "/dev/shm reports no size limit; cannot build an oversized segment",
            );
            return;
        };
        // More slots of the largest size than /dev/shm can hold.
        let slot = 64usize << 20;
        let nslots = ((free as usize / slot) / 2 + 2).min(1024);
        let geom = ShmGeometry {
            nslots,
            slot_bytes: slot,
        };
        if geom.segment_bytes() as u64 <= free {
            crate::test_skip::skip(&format!(
                "/dev/shm has {free} bytes free; cannot build an oversized segment"
            ));
            return;
        }
        let name = segment_name("test", 0, 1);
        let e = ShmLink::create(&name, 0, 1, geom)
            .err()
            .unwrap()
            .to_string();
        let want = format!(
            "shared memory: rank 0: segment /dev/shm/{name} for peer 1 needs {} bytes but \
             /dev/shm is too small",
            geom.segment_bytes()
        );
        assert!(e.starts_with(&want), "{e}");
        assert!(e.contains("HETCCL_SHM_DISABLE=1"), "{e}");
        assert!(!dev_shm_has(&name));
    }

    #[test]
    fn abort_and_close_reach_the_peer() {
        let (mut a, mut b) = pair(small());
        let cause = AbortCause {
            kind: crate::error::AbortKind::Lost,
            rank: 7,
            relayed: true,
        };
        assert_eq!(b.abort_notice(), None);
        a.abort(cause);
        assert_eq!(b.abort_notice(), Some(cause));
        assert_eq!(a.abort_notice(), None, "its own abort is no notice");
        let e = b.check_peer().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Link {
                    peer: 0,
                    lost: true,
                    ..
                }
            ),
            "{e}"
        );
        let mut sink = VecSink::default();
        let e = b.poll_recv(&mut sink).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Link {
                    peer: 0,
                    lost: true,
                    ..
                }
            ),
            "{e}"
        );
        let e = a.poll_send(&header(1, 0), &[]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Link {
                    peer: 1,
                    lost: false,
                    ..
                }
            ),
            "{e}"
        );

        // A closed peer's last message is still delivered, then the link reports it gone.
        let (mut a, mut b) = pair(small());
        let msg = pattern(5000, 3);
        assert!(a.poll_send(&header(7, 5000), &msg).unwrap());
        drop(a);
        b.check_peer().unwrap();
        let mut sink = VecSink::default();
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(sink.data, msg);
        assert_eq!(sink.header, Some(header(7, 5000)));
        let e = b.check_peer().unwrap_err();
        assert!(e.to_string().contains("peer 0 (pid"), "{e}");
        assert!(matches!(
            b.poll_recv(&mut sink),
            Err(Error::Link { lost: true, .. })
        ));
        assert!(matches!(
            b.poll_send(&header(8, 0), &[]),
            Err(Error::Link { lost: true, .. })
        ));
    }

    #[test]
    fn killed_peer_process_is_noticed_while_still_a_zombie() {
        let name = segment_name("test", 0, 1);
        let mut a = ShmLink::create(&name, 0, 1, small()).unwrap();
        // SAFETY: the child only maps the segment, reports through it and waits to be
        // killed; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match ShmLink::open(&name, 1, 0) {
                Ok(mut b) => {
                    let _ = b.poll_send(&header(1, 3), b"hi!");
                    std::mem::forget(b);
                    loop {
                        // SAFETY: plain sleep until SIGKILL.
                        unsafe { libc::pause() };
                    }
                }
                Err(_) => 1,
            };
            // SAFETY: leave the forked child without running the parent's atexit work.
            unsafe { libc::_exit(code) };
        }
        let mut sink = VecSink::default();
        let done = poll_until(|| a.poll_recv(&mut sink));
        assert!(done.unwrap());
        assert_eq!(sink.data, b"hi!");
        a.check_peer().unwrap();
        // SAFETY: kill our own child, and do not reap it yet: a zombie, which
        // `kill(pid, 0)` still finds, must count as gone.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t0 = std::time::Instant::now();
        let e = loop {
            match a.check_peer() {
                Err(e) => break e,
                Ok(()) => {
                    assert!(t0.elapsed().as_secs() < 5, "the dead peer was not noticed");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        };
        assert_eq!(
            crate::transport::shm::liveness::read_stat(pid)
                .unwrap()
                .map(|s| s.state),
            Some(b'Z'),
            "the peer is noticed while it is a zombie"
        );
        assert_eq!(
            e.to_string(),
            format!("link to peer 1: peer 1 (pid {pid}) process has exited")
        );
        assert!(matches!(
            e,
            Error::Link {
                peer: 1,
                lost: true,
                ..
            }
        ));
        // SAFETY: reap our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert!(a.check_peer().is_err());
    }
}
