//! Drives a [`Schedule`] over links: the only place where algorithms meet transports.
//!
//! One thread polls every link the schedule uses. Per link, sends and receives each
//! run in schedule order (links are FIFO); an op starts once its dependencies are
//! done. Because a send to the right and a receive from the left progress in the same
//! loop, no schedule can deadlock on buffer space. Received pieces are reduced
//! straight into their destination as they arrive (no staging copy of the message).
//!
//! While nothing moves the executor spins briefly, then yields, then sleeps in short
//! steps; it asks silent links whether their peer is still alive and gives up after
//! the configured timeout with an error naming the peer it was waiting for, and what
//! the link sees of it (a stopped process), or that it may itself be waiting further
//! along. A peer that gave up and said why becomes [`Error::PeerGaveUp`], with the peer
//! this rank was waiting for when that was another one.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::call::{self, CallHeader};
use super::schedule::{BufId, Combine, OpKind, Region, Schedule};
use crate::compression::{self, OverflowStats, WireFormat};
use crate::dtype::{CollectiveOp, DataType, ReduceOp};
use crate::error::{AbortCause, Error, Result};
use crate::reduce;
use crate::transport::{DirectDst, Link, MsgHeader, RecvSink, MSG_MAGIC};

/// What every message of this collective says about it, and who runs it.
#[derive(Clone, Copy, Debug)]
pub struct ExecCtx {
    /// This rank.
    pub rank: usize,
    /// Number of ranks (for `Avg`).
    pub world_size: usize,
    /// Collective sequence number.
    pub seq: u64,
    /// Which collective.
    pub op: CollectiveOp,
    /// Element type.
    pub dtype: DataType,
    /// Reduction.
    pub redop: ReduceOp,
    /// Element count as the caller gave it.
    pub count: u64,
    /// Longest wait without progress.
    pub timeout: Duration,
    /// Received bytes that are only copied into place go there with streaming stores:
    /// for messages well beyond the caches, whose destination is not read again soon
    /// (saves reading each destination line before writing it).
    pub stream_copies: bool,
    /// Polls without giving up the core before the wait starts yielding. Zero when this
    /// host runs more ranks than it has cores: a spinning rank then burns the time
    /// slice of the peer it waits for, which costs small calls most (the runs:
    /// `docs/perf-log/2026-11-27-waiting-oversubscribed.md`).
    pub spin_polls: u32,
}

/// [`ExecCtx::spin_polls`] for a rank sharing its host with `local_ranks - 1` others.
pub fn spin_polls_for(local_ranks: usize) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if local_ranks > cores {
        0
    } else {
        SPIN_POLLS
    }
}

/// Longest a receive is held back for its forwarding send to reach the head of its
/// link (see [`Forwarder::prepare`]).
const FORWARD_WAIT: Duration = Duration::from_micros(50);
/// Most sends a forwarding send may be queued behind for its receive to be held back.
const FORWARD_AHEAD: usize = 2;

/// Spins before yielding when every rank has a core of its own.
const SPIN_POLLS: u32 = 64;

/// Links whose f32 payloads travel as 16-bit wire values (compression). Only for f32
/// sums and averages: received values are decompressed and added in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Wire {
    /// The 16-bit format.
    pub format: WireFormat,
    /// Indexed by peer: true where messages are compressed.
    pub peers: Vec<bool>,
}

impl Wire {
    fn format_for(wire: Option<&Wire>, peer: usize) -> Option<WireFormat> {
        wire.filter(|w| w.peers.get(peer).copied().unwrap_or(false))
            .map(|w| w.format)
    }
}

/// Work done on the output buffer block by block, just before the schedule first
/// touches a block and just after it last touches it. A compressed all-reduce quantises
/// its input and rounds its result this way: each pass runs on data that is hot in cache
/// and overlaps with waiting on the network, instead of being a sweep over the whole
/// buffer before and after the collective.
pub trait BlockPasses {
    /// Block size in bytes; the output splits into blocks of this size (the last may be
    /// shorter). A multiple of the element size.
    fn block_bytes(&self) -> usize;
    /// Prepares output bytes `range` before any op reads or writes them.
    fn before(&mut self, range: std::ops::Range<usize>) -> Result<()>;
    /// Finishes output bytes `range` once no op will read or write them again.
    fn after(&mut self, range: std::ops::Range<usize>) -> Result<()>;
}

/// Which output blocks are prepared, and how many op touches each still awaits.
struct BlockTracker<'p> {
    passes: &'p mut dyn BlockPasses,
    block: usize,
    len: usize,
    prepared: Vec<bool>,
    remaining: Vec<u32>,
    started: Vec<bool>,
    /// `after` waits for the end when a finalize step still changes the output.
    defer: bool,
}

impl<'p> BlockTracker<'p> {
    fn new(passes: &'p mut dyn BlockPasses, sched: &Schedule, output_len: usize) -> Self {
        let block = passes.block_bytes().max(1);
        let n = output_len.div_ceil(block);
        let mut t = BlockTracker {
            passes,
            block,
            len: output_len,
            prepared: vec![false; n],
            remaining: vec![0; n],
            started: vec![false; sched.ops.len()],
            defer: sched.finalize.is_some(),
        };
        for op in &sched.ops {
            for b in Self::blocks_of(block, &op.kind) {
                t.remaining[b] += 1;
            }
        }
        t
    }

    /// Output blocks of `block` bytes that `kind` touches, once per region touching them.
    fn blocks_of(block: usize, kind: &OpKind) -> impl Iterator<Item = usize> {
        let regions = match *kind {
            OpKind::Send { src, .. } => [Some(src), None],
            OpKind::Recv { dst, combine, .. } => match combine {
                Combine::From(src) => [Some(dst), Some(src)],
                _ => [Some(dst), None],
            },
            OpKind::Copy { src, dst } | OpKind::Reduce { src, dst } => [Some(src), Some(dst)],
        };
        regions
            .into_iter()
            .flatten()
            .filter(|r| r.buf == BufId::Output && r.len > 0)
            .flat_map(move |r| r.offset / block..(r.offset + r.len).div_ceil(block))
    }

    fn range(&self, b: usize) -> std::ops::Range<usize> {
        b * self.block..((b + 1) * self.block).min(self.len)
    }

    /// Before op `i` first moves data: prepares the blocks it is the first to touch.
    fn start(&mut self, i: usize, kind: &OpKind) -> Result<()> {
        if std::mem::replace(&mut self.started[i], true) {
            return Ok(());
        }
        for b in Self::blocks_of(self.block, kind) {
            if !std::mem::replace(&mut self.prepared[b], true) {
                let r = self.range(b);
                self.passes.before(r)?;
            }
        }
        Ok(())
    }

    /// After op `i` is done: finishes the blocks no later op touches.
    fn finish(&mut self, kind: &OpKind) -> Result<()> {
        for b in Self::blocks_of(self.block, kind) {
            self.remaining[b] -= 1;
            if self.remaining[b] == 0 && !self.defer {
                let r = self.range(b);
                self.passes.after(r)?;
            }
        }
        Ok(())
    }

    /// After the last op (and the finalize step): blocks no op touched get both passes,
    /// deferred blocks their `after`.
    fn flush(&mut self) -> Result<()> {
        for b in 0..self.prepared.len() {
            let r = self.range(b);
            if !self.prepared[b] {
                self.passes.before(r.clone())?;
                self.passes.after(r)?;
            } else if self.defer {
                self.passes.after(r)?;
            }
        }
        Ok(())
    }
}

/// The errors of a collective in its context (this rank, the collective and its
/// sequence number), worded once for every engine that runs collectives: this executor
/// and the shared-memory one (`communicator::shared`).
impl ExecCtx {
    /// The communicator was aborted (`Communicator::abort`) while this collective waited.
    pub(crate) fn cancelled(&self) -> Error {
        Error::Broken(format!(
            "rank {}: {} #{} aborted by the application",
            self.rank, self.op, self.seq
        ))
    }

    /// Waited `after` (the timeout or more) for `peer` to do `what`; `seen`: what this
    /// side sees of the peer's process (stopped, say), if anything.
    pub(crate) fn timed_out(
        &self,
        peer: usize,
        after: Duration,
        what: &'static str,
        seen: Option<String>,
    ) -> Error {
        Error::Timeout {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            after,
            what,
            note: timeout_note(peer, self.world_size, seen),
        }
    }

    /// `peer` is gone (`detail`: how this rank noticed).
    pub(crate) fn peer_lost(&self, peer: usize, detail: String) -> Error {
        Error::PeerLost {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            detail,
        }
    }

    /// `peer` gave up and said why.
    pub(crate) fn peer_gave_up(&self, peer: usize, cause: AbortCause) -> Error {
        Error::PeerGaveUp {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            cause,
            note: String::new(),
        }
    }

    /// `peer` runs another call than this rank (`detail`: expected against seen).
    pub(crate) fn mismatch(&self, peer: usize, detail: String) -> Error {
        Error::Mismatch {
            rank: self.rank,
            peer,
            op: self.op,
            seq: self.seq,
            detail,
        }
    }

    /// The header of a message of `bytes` payload in `wire` format: the call's encoding
    /// ([`call::CallHeader`]) with the link's magic for its version and the payload
    /// bytes for its root, which a message does not carry.
    fn header(&self, bytes: usize, wire: Option<WireFormat>) -> MsgHeader {
        let c = CallHeader::new(
            self.seq,
            self.op,
            self.dtype,
            self.redop,
            self.count,
            call::NO_ROOT,
        );
        MsgHeader {
            magic: MSG_MAGIC,
            op: c.op,
            dtype: c.dtype,
            redop: c.redop,
            flags: call::wire_tag(wire),
            seq: c.seq,
            count: c.count,
            bytes: bytes as u64,
        }
    }
}

/// Raw views of the buffers a schedule addresses.
///
/// The communicator guarantees they stay valid and unaliased (except input == output
/// for in-place calls, which schedules never read as `Input`) until `execute` returns.
pub struct Buffers {
    /// Caller's send buffer.
    pub input: *const u8,
    /// Its length in bytes.
    pub input_len: usize,
    /// Caller's receive buffer.
    pub output: *mut u8,
    /// Its length in bytes.
    pub output_len: usize,
    /// Scratch.
    pub scratch: *mut u8,
    /// Its length in bytes.
    pub scratch_len: usize,
}

impl Buffers {
    fn check(&self, r: &Region) -> Result<()> {
        let len = match r.buf {
            BufId::Input => self.input_len,
            BufId::Output => self.output_len,
            BufId::Scratch => self.scratch_len,
        };
        if r.offset.checked_add(r.len).is_none_or(|end| end > len) {
            return Err(Error::invalid(
                "execute",
                format!("schedule addresses {r:?} outside a buffer of {len} bytes"),
            ));
        }
        Ok(())
    }

    fn ptr(&self, r: &Region) -> *mut u8 {
        let base = match r.buf {
            BufId::Input => self.input as *mut u8,
            BufId::Output => self.output,
            BufId::Scratch => self.scratch,
        };
        if r.len == 0 {
            return std::ptr::NonNull::dangling().as_ptr();
        }
        // SAFETY: `check` proved offset + len lies inside the buffer.
        unsafe { base.add(r.offset) }
    }

    /// # Safety
    /// The region must have passed `check`, and no `&mut` to it may be live.
    unsafe fn slice(&self, r: &Region) -> &[u8] {
        // SAFETY: bounds checked; the caller rules out a live mutable alias.
        unsafe { std::slice::from_raw_parts(self.ptr(r), r.len) }
    }
}

struct Sink<'a> {
    ctx: &'a ExecCtx,
    peer: usize,
    dst: *mut u8,
    len: usize,
    from: Option<*const u8>,
    combine: Combine,
    wire: Option<WireFormat>,
    /// Room in the next link's buffer for the message that forwards this receive's
    /// result, as `(message offset, space)` in order (see [`Link::send_space`]).
    forward: &'a [(usize, DirectDst)],
    /// Message offset up to which `forward` has been written: pieces whose offset and
    /// length match the next space exactly go there too; the first that does not ends
    /// the forwarding for this call.
    forwarded: usize,
    /// Payload bytes delivered so far (all pieces below this offset are in place).
    got: usize,
    /// Write a reduced result with streaming stores: it is large and nothing in this
    /// call reads it again (a reduce-scatter's own block, out of place).
    stream_result: bool,
}

impl RecvSink for Sink<'_> {
    fn header(&mut self, h: &MsgHeader) -> Result<()> {
        let wire_len = if self.wire.is_some() {
            self.len / 2
        } else {
            self.len
        };
        let want = self.ctx.header(wire_len, self.wire);
        if *h == want {
            return Ok(());
        }
        // The call each header carries, the magic in the version's place.
        let stated = |h: &MsgHeader| CallHeader {
            version: h.magic,
            op: h.op,
            dtype: h.dtype,
            redop: h.redop,
            wire: h.flags,
            seq: h.seq,
            count: h.count,
            root: call::NO_ROOT,
        };
        let engine = call::Engine::Link {
            bytes: want.bytes,
            got: h.bytes,
        };
        call::check(self.ctx.rank, self.peer, &stated(&want), &stated(h), engine)
            .map_err(|detail| self.ctx.mismatch(self.peer, detail))
    }

    fn data(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        if let Some(format) = self.wire {
            return self.wire_data(format, offset, bytes);
        }
        if offset + bytes.len() > self.len {
            return Err(Error::Link {
                peer: self.peer,
                detail: format!(
                    "payload overruns the expected {} bytes (offset {offset} + {})",
                    self.len,
                    bytes.len()
                ),
                lost: false,
            });
        }
        // SAFETY: [offset, offset+len) lies inside the destination region, which the
        // schedule's dependencies keep free of any other reader or writer meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.dst.add(offset), bytes.len()) };
        self.got = offset + bytes.len();
        if let Some(space) = self.forward_space(offset, bytes.len()) {
            // Compute the result once, into the forwarding link's buffer (it stays in
            // cache), then copy it into place: the send that forwards it need not read
            // the destination again.
            // SAFETY: `Link::send_space` gave this room to us alone until it is
            // committed, which happens after this call.
            let out = unsafe { space.slice_mut(0..bytes.len()) };
            match (self.combine, self.from) {
                (Combine::Copy, _) | (Combine::From(_), None) => out.copy_from_slice(bytes),
                (Combine::Accumulate, _) => {
                    reduce::reduce_from_bytes(self.ctx.dtype, self.ctx.redop, out, dst, bytes)
                }
                (Combine::From(_), Some(src)) => {
                    // SAFETY: the `From` region has the destination's length and was checked.
                    let a = unsafe { std::slice::from_raw_parts(src.add(offset), bytes.len()) };
                    reduce::reduce_from_bytes(self.ctx.dtype, self.ctx.redop, out, a, bytes)
                }
            }
            // SAFETY: `dst` and `out` are valid for `bytes.len()` bytes and distinct (the
            // schedule's destination and a link's buffer).
            unsafe {
                reduce::copy_bytes(
                    dst.as_mut_ptr(),
                    out.as_ptr(),
                    out.len(),
                    self.ctx.stream_copies,
                )
            };
            self.forwarded += bytes.len();
            return Ok(());
        }
        match (self.combine, self.from) {
            // SAFETY: `dst` and `bytes` are valid for `bytes.len()` bytes and distinct
            // (a link's buffer and the schedule's destination).
            (Combine::Copy, _) => unsafe {
                let (d, s, n) = (dst.as_mut_ptr(), bytes.as_ptr(), bytes.len());
                reduce::copy_bytes(d, s, n, self.ctx.stream_copies)
            },
            (Combine::Accumulate, _) => {
                reduce::reduce_inplace_bytes(self.ctx.dtype, self.ctx.redop, dst, bytes)
            }
            (Combine::From(_), Some(src)) => {
                // SAFETY: the `From` region has the destination's length and was checked.
                let a = unsafe { std::slice::from_raw_parts(src.add(offset), bytes.len()) };
                let (dtype, op) = (self.ctx.dtype, self.ctx.redop);
                if self.stream_result {
                    reduce::reduce_from_bytes_streaming(dtype, op, dst, a, bytes)
                } else {
                    reduce::reduce_from_bytes(dtype, op, dst, a, bytes)
                }
            }
            (Combine::From(_), None) => dst.copy_from_slice(bytes),
        }
        Ok(())
    }

    fn direct_dst(&mut self) -> Option<DirectDst> {
        if self.wire.is_some() || !matches!(self.combine, Combine::Copy) {
            return None;
        }
        // SAFETY: `dst` is the receive's checked destination region of `len` bytes, which
        // the schedule's dependencies keep to this receive until it completes.
        NonNull::new(self.dst).map(|p| unsafe { DirectDst::new(p, self.len) })
    }
}

impl Sink<'_> {
    /// The forwarding space for the piece at `offset` of `len` bytes, if it is the next
    /// one and the same size.
    fn forward_space(&self, offset: usize, len: usize) -> Option<DirectDst> {
        if offset != self.forwarded || len == 0 {
            return None;
        }
        self.forward
            .iter()
            .find(|(o, _)| *o == offset)
            .and_then(|&(_, space)| (space.len() == len).then_some(space))
    }

    /// A piece of 16-bit wire values landing in an f32 destination.
    fn wire_data(&mut self, format: WireFormat, offset: usize, bytes: &[u8]) -> Result<()> {
        let (off, len) = (offset * 2, bytes.len() * 2);
        if off + len > self.len || bytes.len() % 2 != 0 {
            return Err(Error::Link {
                peer: self.peer,
                detail: format!(
                    "compressed payload overruns the expected {} bytes (offset {offset} + {})",
                    self.len / 2,
                    bytes.len()
                ),
                lost: false,
            });
        }
        // SAFETY: [off, off+len) lies inside the destination region (checked above and by
        // `Buffers::check`), which dependencies keep to this receive alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.dst.add(off), len) };
        let from = match (self.combine, self.from) {
            // SAFETY: the `From` region has the destination's length and was checked.
            (Combine::From(_), Some(src)) => {
                Some(unsafe { std::slice::from_raw_parts(src.add(off), len) })
            }
            _ => None,
        };
        let combine = self.combine;
        let apply = |out: &mut [f32]| match (combine, from) {
            (Combine::Accumulate, _) => compression::decompress_add_bytes(format, bytes, out),
            (Combine::From(_), Some(a)) => {
                bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(a);
                compression::decompress_add_bytes(format, bytes, out);
            }
            _ => compression::decompress_bytes(format, bytes, out),
        };
        if (dst.as_ptr() as usize) % std::mem::align_of::<f32>() == 0 {
            apply(bytemuck::cast_slice_mut(dst));
        } else {
            let mut tmp: Vec<f32> = bytemuck::pod_collect_to_vec(dst);
            apply(&mut tmp);
            dst.copy_from_slice(bytemuck::cast_slice(&tmp));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Queue {
    ops: Vec<usize>,
    next: usize,
}

impl Queue {
    fn head(&self) -> Option<usize> {
        self.ops.get(self.next).copied()
    }
}

/// Receives that write their result into the room ([`Link::send_space`]) of the link
/// whose send forwards it ([`Schedule::forwards`]) as well as into their destination.
struct Forwarder {
    /// Whether this collective may forward at all.
    enabled: bool,
    /// Room taken for the current receive's forwarding send, `(message offset, room)`.
    spaces: Vec<(usize, DirectDst)>,
    /// That send: op, link, header.
    send: Option<(usize, usize, MsgHeader)>,
    /// Per link: payload bytes of the receive at the head of its queue delivered so far
    /// (final in the destination).
    got: Vec<usize>,
    /// Per link: since when its head receive is held back for its forwarding send.
    held_since: Vec<Option<Instant>>,
    /// Since when the next local copy is held back for room for its forwarding send.
    copy_held_since: Option<Instant>,
}

/// What [`Forwarder::commit`] published.
enum Committed {
    Nothing,
    Part,
    /// The whole forwarding send `j` on link `q`.
    All(usize, usize),
}

impl Forwarder {
    fn new(links: usize, enabled: bool) -> Self {
        Forwarder {
            enabled,
            spaces: Vec::new(),
            send: None,
            got: vec![0; links],
            held_since: vec![None; links],
            copy_held_since: None,
        }
    }

    /// Before receive `i` on link `p` polls: takes room for its forwarding send when
    /// that send is next on its link and waits for nothing else, and copies into it
    /// what arrived earlier (`dst`: the receive's destination). Returns the message
    /// offset from which arriving pieces go into the room (`usize::MAX`: none), or
    /// `None` to hold the receive back: no room yet, or the send is still behind others
    /// that need only room. A hold lasts at most [`FORWARD_WAIT`], so no wait between
    /// ranks can close a cycle.
    fn prepare(
        &mut self,
        i: usize,
        p: usize,
        state: (&Schedule, &[Queue], &[bool]),
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
        dst: *const u8,
    ) -> Option<usize> {
        let hold = self.take_room(i, state, links, ctx);
        if keep_holding(&mut self.held_since[p], hold) {
            return None;
        }
        // Bytes that arrived before the send reached the head of its link are in the
        // destination already (and still in cache): copy them into the room first, so
        // the rest can be forwarded as it arrives.
        let mut from = self.spaces.first().map_or(usize::MAX, |&(o, _)| o);
        for &(o, space) in &self.spaces {
            if o != from || o + space.len() > self.got[p] {
                break;
            }
            // SAFETY: the room is ours until committed; the destination's first
            // `got[p]` bytes are final and no op writes them meanwhile.
            unsafe {
                let done_part = std::slice::from_raw_parts(dst.add(o), space.len());
                space.slice_mut(0..space.len()).copy_from_slice(done_part);
            }
            from = o + space.len();
        }
        Some(from)
    }

    /// Local copy `i` from `src` into `dst`, when the send that forwards `dst` is next
    /// on a link with room: copies the bytes the room is for into it, reading `src`
    /// once, then from the room (still in cache) into `dst`, and publishes them.
    /// Returns the byte range it copied (empty: none; the caller copies the rest) and
    /// what it published, or `None` to hold the copy back while that send waits for
    /// room (at most [`FORWARD_WAIT`], as for receives): copied without the link, the
    /// source would be read twice.
    fn copy_through(
        &mut self,
        i: usize,
        state: (&Schedule, &[Queue], &[bool]),
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<Option<(std::ops::Range<usize>, Committed)>> {
        let hold = self.take_room(i, state, links, ctx);
        if keep_holding(&mut self.copy_held_since, hold) {
            return Ok(None);
        }
        let start = self.spaces.first().map_or(0, |&(o, _)| o);
        let mut upto = start;
        for &(o, space) in &self.spaces {
            if o != upto {
                break;
            }
            let n = space.len();
            // SAFETY: the room is ours until committed; `src` and `dst` hold the
            // copy's `len` bytes (`o + n <= len`: room is lent within the message) and
            // no op touches them meanwhile.
            unsafe {
                let room = space.slice_mut(0..n);
                room.copy_from_slice(std::slice::from_raw_parts(src.add(o), n));
                reduce::copy_bytes(dst.add(o), room.as_ptr(), n, ctx.stream_copies);
            }
            upto = o + n;
        }
        if upto == start {
            return Ok(Some((0..0, Committed::Nothing)));
        }
        Ok(Some((start..upto, self.commit(upto, links, ctx)?)))
    }

    /// After the poll: publishes the room written up to message offset `upto`.
    fn commit(
        &mut self,
        upto: usize,
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
    ) -> Result<Committed> {
        let (Some((j, q, header)), Some(&(start, _))) = (self.send, self.spaces.first()) else {
            return Ok(Committed::Nothing);
        };
        if upto == usize::MAX || upto <= start {
            return Ok(Committed::Nothing);
        }
        let Some(l) = links[q].as_mut() else {
            return Ok(Committed::Nothing);
        };
        let r = l.commit_send(&header, upto);
        Ok(if r.map_err(|e| link_error(e, l.as_mut(), ctx))? {
            Committed::All(j, q)
        } else {
            Committed::Part
        })
    }

    /// Takes room for op `i`'s forwarding send into `spaces` when that send is next on
    /// its link and waits for nothing else. Returns whether `i` should be held back for
    /// it: the send has no room yet, or is still behind others that need only room.
    fn take_room(
        &mut self,
        i: usize,
        (sched, sends, done): (&Schedule, &[Queue], &[bool]),
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
    ) -> bool {
        self.spaces.clear();
        self.send = None;
        match self.target_state(i, sched, sends, done, links) {
            Target::Next(j, q, len) => {
                let header = ctx.header(len, None);
                if let Some(l) = links[q].as_mut() {
                    l.send_space(&header, &mut self.spaces);
                }
                self.send = Some((j, q, header));
                self.spaces.is_empty()
            }
            Target::Behind => true,
            Target::None => false,
        }
    }

    fn target_state(
        &self,
        i: usize,
        sched: &Schedule,
        sends: &[Queue],
        done: &[bool],
        links: &[Option<Box<dyn Link>>],
    ) -> Target {
        let Some(j) = sched
            .forwards
            .get(i)
            .copied()
            .flatten()
            .filter(|_| self.enabled)
        else {
            return Target::None;
        };
        let OpKind::Send { peer: q, src } = sched.ops[j].kind else {
            return Target::None;
        };
        if !links[q].as_ref().is_some_and(|l| l.has_send_space()) {
            return Target::None;
        }
        // `j` waits for nothing but this receive; the sends ahead of it (few, or it is
        // not worth it) for nothing but room on the link.
        if !sched.ops[j].deps.iter().all(|&d| d == i || done[d]) {
            return Target::None;
        }
        let queue = &sends[q].ops[sends[q].next..];
        match queue.iter().take(FORWARD_AHEAD + 1).position(|&k| k == j) {
            Some(0) => Target::Next(j, q, src.len),
            Some(pos)
                if queue[..pos]
                    .iter()
                    .all(|&k| sched.ops[k].deps.iter().all(|&d| done[d])) =>
            {
                Target::Behind
            }
            _ => Target::None,
        }
    }
}

/// Whether an op that asks to be held back (`hold`) still is: a hold lasts at most
/// [`FORWARD_WAIT`] from its start in `since`, which is cleared when the op goes ahead.
fn keep_holding(since: &mut Option<Instant>, hold: bool) -> bool {
    if hold && since.get_or_insert_with(Instant::now).elapsed() < FORWARD_WAIT {
        return true;
    }
    *since = None;
    false
}

/// Where a receive's forwarding send stands.
enum Target {
    /// No forwarding send, or one that cannot take the result as it arrives.
    None,
    /// Send `j` of `len` bytes on link `q` is next on its link and waits only for this
    /// receive.
    Next(usize, usize, usize),
    /// The send is queued behind others on its link that need only room to go.
    Behind,
}

/// What a timeout's message adds about the peer waited for: what its link sees of it
/// (`seen`: e.g. a stopped process), else, with more than two ranks, that it may be
/// waiting itself. A rank sees only its own waits: whether the peer is the end of the
/// chain is known only where the peer's state can be seen.
fn timeout_note(peer: usize, world_size: usize, seen: Option<String>) -> String {
    match seen {
        Some(s) => format!("; {s}"),
        None if world_size > 2 => format!(
            "; peer {peer} may itself be waiting on another rank further along, so the stall \
             may lie there"
        ),
        None => String::new(),
    }
}

/// A peer that gave up while this rank was waiting for another peer (typically: gave up
/// waiting for this rank, which was itself held up): says whom this rank waited for,
/// where the stall more likely lies.
fn waiting_note(
    e: Error,
    ctx: &ExecCtx,
    links: &mut [Option<Box<dyn Link>>],
    (active, sends, recvs, done, sched): (&[usize], &[Queue], &[Queue], &[bool], &Schedule),
) -> Error {
    match e {
        Error::PeerGaveUp {
            rank,
            peer,
            op,
            seq,
            cause,
            note,
        } if note.is_empty() => {
            let (p, what) = blocked_on(active, sends, recvs, done, sched);
            let note = if p == peer {
                note
            } else {
                let seen = links.get_mut(p).and_then(|l| l.as_mut()?.peer_note());
                format!(
                    "; this rank was waiting for peer {p} {what}{}",
                    timeout_note(p, ctx.world_size, seen)
                )
            };
            Error::PeerGaveUp {
                rank,
                peer,
                op,
                seq,
                cause,
                note,
            }
        }
        e => e,
    }
}

/// Adds the collective's context to an error of `link`: a peer lost that said why it
/// gave up becomes [`Error::PeerGaveUp`].
fn link_error(e: Error, link: &mut dyn Link, ctx: &ExecCtx) -> Error {
    match e {
        Error::Link {
            peer, lost: true, ..
        } => match link.abort_notice() {
            Some(cause) => ctx.peer_gave_up(peer, cause),
            None => in_context(e, ctx),
        },
        e => in_context(e, ctx),
    }
}

/// Adds the collective's context to a link error.
fn in_context(e: Error, ctx: &ExecCtx) -> Error {
    match e {
        Error::Link {
            peer,
            detail,
            lost: true,
        } => ctx.peer_lost(peer, detail),
        Error::Link {
            peer,
            detail,
            lost: false,
        } => ctx.peer_lost(peer, format!("protocol error: {detail}")),
        other => other,
    }
}

/// Runs `sched` to completion; returns what compressing sends had to saturate. On
/// error the links may be mid-message: the caller must abort them (the communicator does).
/// `passes`, when given, run on each output block around the ops that touch it.
pub fn execute(
    sched: &Schedule,
    links: &mut [Option<Box<dyn Link>>],
    bufs: &Buffers,
    ctx: &ExecCtx,
    wire: Option<&Wire>,
    passes: Option<&mut dyn BlockPasses>,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<OverflowStats> {
    let mut stats = OverflowStats::default();
    let mut blocks = passes.map(|p| BlockTracker::new(p, sched, bufs.output_len));
    // One staging buffer per compressing link (one message in flight per link), sized
    // by the largest message: chunk-bounded, never the whole buffer.
    let mut staging: Vec<(Option<usize>, Vec<u8>)> =
        (0..links.len()).map(|_| (None, Vec::new())).collect();
    let n_ops = sched.ops.len();
    let mut sends: Vec<Queue> = (0..links.len()).map(|_| Queue::default()).collect();
    let mut recvs: Vec<Queue> = (0..links.len()).map(|_| Queue::default()).collect();
    let mut locals = Queue::default();
    for (i, op) in sched.ops.iter().enumerate() {
        match op.kind {
            OpKind::Send { peer, src } => {
                bufs.check(&src)?;
                queue_for(&mut sends, links, peer, "send to")?.ops.push(i);
            }
            OpKind::Recv { peer, dst, combine } => {
                bufs.check(&dst)?;
                if let Combine::From(src) = combine {
                    bufs.check(&src)?;
                }
                queue_for(&mut recvs, links, peer, "receive from")?
                    .ops
                    .push(i);
            }
            OpKind::Copy { src, dst } | OpKind::Reduce { src, dst } => {
                bufs.check(&src)?;
                bufs.check(&dst)?;
                if src.len != dst.len {
                    return Err(Error::invalid(
                        "execute",
                        format!("local op from {src:?} into {dst:?} of another length"),
                    ));
                }
                locals.ops.push(i);
            }
        }
    }
    let active: Vec<usize> = (0..links.len())
        .filter(|&p| !sends[p].ops.is_empty() || !recvs[p].ops.is_empty())
        .collect();

    // Forwarding needs the receive to write exactly what the send carries: not with
    // block passes (they run on blocks as ops reach them) or compression on the wire.
    let mut fwd = Forwarder::new(links.len(), blocks.is_none() && wire.is_none());
    let mut done = vec![false; n_ops];
    let mut n_done = 0usize;
    let ready = |done: &[bool], i: usize| sched.ops[i].deps.iter().all(|&d| done[d]);
    let mut idle = 0u32;
    let mut fds: Vec<(i32, bool)> = Vec::new();
    let mut last_progress = Instant::now();
    let mut last_check = Instant::now();

    // The loop, so that an error can be told from where this rank itself was waiting.
    let ran = (|| -> Result<()> {
        while n_done < n_ops {
            let mut progressed = false;

            while let Some(i) = locals.head() {
                if !ready(&done, i) {
                    break;
                }
                // Whether this op also sent a whole message (a copy through a link's room).
                let mut sent = false;
                if let Some(t) = blocks.as_mut() {
                    t.start(i, &sched.ops[i].kind)?;
                }
                match sched.ops[i].kind {
                    OpKind::Copy { src, dst } if src.len > 0 => {
                        let (d, s) = (bufs.ptr(&dst), bufs.ptr(&src) as *const u8);
                        // A copy whose result a send forwards goes through that link's
                        // room when it has some, reading the source once.
                        let Some((through, committed)) =
                            fwd.copy_through(i, (sched, &sends, &done), links, ctx, s, d)?
                        else {
                            break;
                        };
                        // SAFETY: both regions were checked; dependencies guarantee no
                        // concurrent writer of `src` or user of `dst`; they do not overlap
                        // (input vs output, or disjoint scratch ranges). `copy_through`
                        // wrote the bytes `through`; the rest is copied here.
                        unsafe {
                            reduce::copy_bytes(d, s, through.start, ctx.stream_copies);
                            reduce::copy_bytes(
                                d.add(through.end),
                                s.add(through.end),
                                src.len - through.end,
                                ctx.stream_copies,
                            );
                        }
                        if let Committed::All(j, q) = committed {
                            done[j] = true;
                            n_done += 1;
                            sends[q].next += 1;
                            sent = true;
                        }
                    }
                    OpKind::Reduce { src, dst } if src.len > 0 => {
                        // SAFETY: as for the copy; `dst` is the only region written.
                        let (a, d) = unsafe {
                            (
                                bufs.slice(&src),
                                std::slice::from_raw_parts_mut(bufs.ptr(&dst), dst.len),
                            )
                        };
                        reduce::reduce_inplace_bytes(ctx.dtype, ctx.redop, d, a);
                    }
                    _ => {}
                }
                if let Some(t) = blocks.as_mut() {
                    t.finish(&sched.ops[i].kind)?;
                }
                done[i] = true;
                n_done += 1;
                locals.next += 1;
                progressed = true;
                // One local op per pass while links have work: an all-gather's copy of its
                // own block then runs piece by piece between sends and receives, in the time
                // spent waiting for peers, instead of before the first send. A copy that went
                // out through a link whole was link work itself: the next one may follow.
                if !active.is_empty() && !sent {
                    break;
                }
            }

            for &p in &active {
                let Some(link) = links[p].as_mut() else {
                    continue;
                };
                while let Some(i) = sends[p].head() {
                    if !ready(&done, i) {
                        break;
                    }
                    let OpKind::Send { src, .. } = sched.ops[i].kind else {
                        break;
                    };
                    if let Some(t) = blocks.as_mut() {
                        t.start(i, &sched.ops[i].kind)?;
                    }
                    // SAFETY: checked region; dependencies keep writers away while it is sent.
                    let mut data = unsafe { bufs.slice(&src) };
                    let format = Wire::format_for(wire, p);
                    if let Some(f) = format {
                        let (staged_op, buf) = &mut staging[p];
                        if *staged_op != Some(i) {
                            buf.resize(src.len / 2, 0);
                            let vals: std::borrow::Cow<[f32]> = match bytemuck::try_cast_slice(data)
                            {
                                Ok(v) => std::borrow::Cow::Borrowed(v),
                                Err(_) => {
                                    std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(data))
                                }
                            };
                            stats += compression::compress_bytes(f, &vals, 1.0, None, buf);
                            *staged_op = Some(i);
                        }
                        data = &staging[p].1;
                    }
                    let r = link.poll_send(&ctx.header(data.len(), format), data);
                    if !r.map_err(|e| link_error(e, link.as_mut(), ctx))? {
                        break;
                    }
                    if let Some(t) = blocks.as_mut() {
                        t.finish(&sched.ops[i].kind)?;
                    }
                    done[i] = true;
                    n_done += 1;
                    sends[p].next += 1;
                    progressed = true;
                }
                while let Some(i) = recvs[p].head() {
                    if !ready(&done, i) {
                        break;
                    }
                    let OpKind::Recv { dst, combine, .. } = sched.ops[i].kind else {
                        break;
                    };
                    if let Some(t) = blocks.as_mut() {
                        t.start(i, &sched.ops[i].kind)?;
                    }
                    // Room in the next link for the send that forwards this receive's
                    // result, if it is next there; `None`: wait a little for that room.
                    let dst_ptr = bufs.ptr(&dst);
                    let Some(forwarded) =
                        fwd.prepare(i, p, (sched, &sends, &done), links, ctx, dst_ptr)
                    else {
                        break;
                    };
                    let mut sink = Sink {
                        ctx,
                        peer: p,
                        dst: dst_ptr,
                        len: dst.len,
                        from: match combine {
                            Combine::From(src) => Some(bufs.ptr(&src) as *const u8),
                            _ => None,
                        },
                        combine,
                        wire: Wire::format_for(wire, p),
                        forward: &fwd.spaces,
                        forwarded,
                        got: fwd.got[p],
                        stream_result: ctx.stream_copies
                            && !sched.reread.get(i).copied().unwrap_or(true),
                    };
                    let Some(link) = links[p].as_mut() else {
                        break;
                    };
                    let r = link.poll_recv(&mut sink);
                    let complete = r.map_err(|e| link_error(e, link.as_mut(), ctx))?;
                    let (forwarded, got) = (sink.forwarded, sink.got);
                    fwd.got[p] = if complete { 0 } else { got };
                    match fwd.commit(forwarded, links, ctx)? {
                        Committed::Nothing => {}
                        Committed::Part => progressed = true,
                        Committed::All(j, q) => {
                            // All of it was forwarded, so all of it has arrived: the receive
                            // completed in this very call and is marked below.
                            progressed = true;
                            done[j] = true;
                            n_done += 1;
                            sends[q].next += 1;
                        }
                    }
                    if !complete {
                        break;
                    }
                    if let Some(t) = blocks.as_mut() {
                        t.finish(&sched.ops[i].kind)?;
                    }
                    done[i] = true;
                    n_done += 1;
                    recvs[p].next += 1;
                    progressed = true;
                }
            }

            if progressed {
                idle = 0;
                last_progress = Instant::now();
                continue;
            }
            idle = idle.saturating_add(1);
            if idle < 512 {
                backoff(idle, ctx.spin_polls);
            } else {
                sleep_on_links(idle, &active, links, &mut fds);
            }
            let now = Instant::now();
            if now.duration_since(last_check) >= Duration::from_millis(50) {
                last_check = now;
                if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                    return Err(ctx.cancelled());
                }
                // Only peers this rank still has business with: one that got everything it
                // needed from us may already have finished and exited.
                for &p in active
                    .iter()
                    .filter(|&&p| sends[p].head().is_some() || recvs[p].head().is_some())
                {
                    if let Some(l) = links[p].as_mut() {
                        let r = l.check_peer();
                        r.map_err(|e| link_error(e, l.as_mut(), ctx))?;
                    }
                }
                let waited = now.duration_since(last_progress);
                if waited >= ctx.timeout {
                    let (peer, what) = blocked_on(&active, &sends, &recvs, &done, sched);
                    let seen = links.get_mut(peer).and_then(|l| l.as_mut()?.peer_note());
                    return Err(ctx.timed_out(peer, waited, what, seen));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = ran {
        return Err(waiting_note(
            e,
            ctx,
            links,
            (&active, &sends, &recvs, &done, sched),
        ));
    }

    if let Some(f) = sched.finalize {
        bufs.check(&f)?;
        // SAFETY: all ops are done; nothing else touches the buffer now.
        let d = unsafe { std::slice::from_raw_parts_mut(bufs.ptr(&f), f.len) };
        reduce::reduce_finalize_bytes(ctx.dtype, ctx.redop, d, ctx.world_size);
    }
    if let Some(t) = blocks.as_mut() {
        t.flush()?;
    }
    Ok(stats)
}

fn queue_for<'q>(
    qs: &'q mut [Queue],
    links: &[Option<Box<dyn Link>>],
    peer: usize,
    what: &str,
) -> Result<&'q mut Queue> {
    if links.get(peer).is_none_or(|l| l.is_none()) {
        return Err(Error::invalid(
            "execute",
            format!("schedule wants to {what} rank {peer}, but there is no link to it"),
        ));
    }
    Ok(&mut qs[peer])
}

/// The peer a stuck schedule waits for: a receive whose data never came, else a send
/// the peer never drained.
fn blocked_on(
    active: &[usize],
    sends: &[Queue],
    recvs: &[Queue],
    done: &[bool],
    sched: &Schedule,
) -> (usize, &'static str) {
    let ready = |i: usize| sched.ops[i].deps.iter().all(|&d| done[d]);
    for &p in active {
        if recvs[p].head().is_some_and(ready) {
            return (p, "to send data");
        }
    }
    for &p in active {
        if sends[p].head().is_some_and(ready) {
            return (p, "to accept data");
        }
    }
    (active.first().copied().unwrap_or(0), "to make progress")
}

/// Sleeps until a socket of a waiting link is ready, when links have sockets: up to 2 ms
/// when every link can wake us, 100 µs when some (shared memory) can only be polled.
/// Links with no sockets fall back to [`backoff`]'s growing sleeps.
fn sleep_on_links(
    idle: u32,
    active: &[usize],
    links: &[Option<Box<dyn Link>>],
    fds: &mut Vec<(i32, bool)>,
) {
    fds.clear();
    let mut all_wake = true;
    for &p in active {
        if let Some(l) = links[p].as_ref() {
            let before = fds.len();
            l.wait_fds(fds);
            all_wake &= fds.len() > before;
        }
    }
    if fds.is_empty() {
        backoff(idle, SPIN_POLLS);
        return;
    }
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, w)| libc::pollfd {
            fd,
            events: libc::POLLIN | if w { libc::POLLOUT } else { 0 },
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: if all_wake { 2_000_000 } else { 100_000 },
    };
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call's
    // duration; a null sigmask leaves the signal mask unchanged.
    unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
}

/// Spin a little (a peer on another core answers within microseconds), then yield
/// (ranks may outnumber cores), then sleep in growing steps up to 200 µs.
fn backoff(idle: u32, spins: u32) {
    if idle < spins {
        std::hint::spin_loop();
    } else if idle < 512 {
        std::thread::yield_now();
    } else {
        let us = (idle as u64 - 511).min(200);
        std::thread::sleep(Duration::from_micros(us));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::schedule::Builder;
    use crate::transport::mem;

    fn ctx(rank: usize) -> ExecCtx {
        ExecCtx {
            rank,
            world_size: 3,
            seq: 0,
            op: CollectiveOp::AllGather,
            dtype: DataType::U8,
            redop: ReduceOp::Sum,
            count: 4,
            timeout: Duration::from_secs(10),
            stream_copies: false,
            spin_polls: SPIN_POLLS,
        }
    }

    fn run(sched: &Schedule, links: &mut [Option<Box<dyn Link>>], rank: usize) -> Result<Vec<u8>> {
        let input = [rank as u8; 4];
        let mut output = [0u8; 8];
        let bufs = Buffers {
            input: input.as_ptr(),
            input_len: 4,
            output: output.as_mut_ptr(),
            output_len: 8,
            scratch: std::ptr::null_mut(),
            scratch_len: 0,
        };
        execute(sched, links, &bufs, &ctx(rank), None, None, None)?;
        Ok(output.to_vec())
    }

    proptest::proptest! {
        /// A received header, valid or changed in up to three bytes (or all random), is
        /// accepted only when it is exactly the one this rank expects; otherwise the
        /// error names the peer, the collective and what differs. No panic, and only a
        /// small message's worth of allocation.
        #[test]
        fn a_header_is_accepted_only_when_it_is_the_one_expected(
            wire in proptest::option::of(proptest::prelude::Just(WireFormat::F16)),
            flips in proptest::collection::vec((0usize..32, 1u8..=255), 0..4),
            random in proptest::option::weighted(0.1, proptest::prelude::any::<[u8; 32]>()),
        ) {
            let c = ExecCtx {
                op: CollectiveOp::AllReduce,
                dtype: DataType::F32,
                count: 1000,
                seq: 9,
                ..ctx(1)
            };
            let mut dst = vec![0u8; 4000];
            let mut sink = Sink {
                ctx: &c,
                peer: 2,
                dst: dst.as_mut_ptr(),
                len: dst.len(),
                from: None,
                combine: Combine::Copy,
                wire,
                forward: &[],
                forwarded: 0,
                got: 0,
                stream_result: false,
            };
            let want = c.header(if wire.is_some() { 2000 } else { 4000 }, wire);
            let mut bytes = random.unwrap_or_else(|| {
                bytemuck::bytes_of(&want).try_into().unwrap()
            });
            for (at, x) in flips {
                bytes[at] ^= x;
            }
            let h: MsgHeader = bytemuck::pod_read_unaligned(&bytes);
            let (r, allocated) =
                crate::transport::alloc_meter::allocated_by(|| sink.header(&h));
            proptest::prop_assert!(allocated < 4096, "{} bytes", allocated);
            match r {
                Ok(()) => proptest::prop_assert_eq!(h, want),
                Err(Error::Mismatch { rank: 1, peer: 2, op: CollectiveOp::AllReduce, seq: 9, detail }) => {
                    proptest::prop_assert_ne!(h, want);
                    proptest::prop_assert!(
                        detail.starts_with("received a corrupt header (magic ")
                            || detail.ends_with("(compression settings differ between ranks)")
                            || detail.starts_with(
                                "expected all_reduce #9 of 1000 x f32 (sum op, "
                            ),
                        "{}", detail
                    );
                }
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }
    }

    /// Delegates to a link and counts the pieces a receive wrote into it in place.
    struct Counted {
        inner: Box<dyn Link>,
        commits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Link for Counted {
        fn peer(&self) -> usize {
            self.inner.peer()
        }
        fn kind(&self) -> crate::transport::LinkKind {
            self.inner.kind()
        }
        fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool> {
            self.inner.poll_send(header, data)
        }
        fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool> {
            self.inner.poll_recv(sink)
        }
        fn check_peer(&mut self) -> Result<()> {
            self.inner.check_peer()
        }
        fn abort(&mut self, cause: crate::error::AbortCause) {
            self.inner.abort(cause)
        }
        fn has_send_space(&self) -> bool {
            self.inner.has_send_space()
        }
        fn send_space(&mut self, header: &MsgHeader, out: &mut Vec<(usize, DirectDst)>) {
            self.inner.send_space(header, out)
        }
        fn commit_send(&mut self, header: &MsgHeader, upto: usize) -> Result<bool> {
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.commit_send(header, upto)
        }
    }

    /// Runs `call` as a ring among `n` ranks (threads) over shared-memory links that
    /// count their commits (room written in place and published); rank `r`'s input is
    /// `input(r)`. Returns every rank's output and the number of commits.
    fn ring_over_counted_shm(
        name: &str,
        n: usize,
        call: &crate::algorithm::Call,
        input: impl Fn(usize) -> Vec<f32> + Sync,
    ) -> (Vec<Vec<f32>>, usize) {
        use crate::algorithm::ring::RingOrder;
        use crate::algorithm::{plan, Algo, Tuning};
        use crate::transport::shm::{segment_name, ShmGeometry, ShmLink};
        let geom = ShmGeometry {
            nslots: 4,
            slot_bytes: 4096,
        };
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut links: Vec<Vec<Option<Box<dyn Link>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let counted = |l: ShmLink| -> Option<Box<dyn Link>> {
            Some(Box::new(Counted {
                inner: Box::new(l),
                commits: commits.clone(),
            }))
        };
        let pairs = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b)));
        for (a, b) in pairs {
            let seg = segment_name(name, a, b);
            links[a][b] = counted(ShmLink::create(&seg, a, b, geom).unwrap());
            links[b][a] = counted(ShmLink::open(&seg, b, a).unwrap());
        }
        let t = Tuning {
            chunk_bytes: 8192,
            slots: 4,
            shard_weights: None,
            ring_order: RingOrder::PieceByPiece,
        };
        let out_len = match call.op {
            CollectiveOp::AllGather => call.count * n,
            _ => call.count,
        };
        let outs = std::thread::scope(|sc| {
            let handles: Vec<_> = links
                .iter_mut()
                .enumerate()
                .map(|(rank, l)| {
                    let sched = plan(call, rank, n, Algo::Ring, t.clone(), &[]);
                    let input = &input;
                    sc.spawn(move || {
                        let input = input(rank);
                        let mut output = if call.in_place {
                            input.clone()
                        } else {
                            vec![-1.0; out_len]
                        };
                        let bufs = Buffers {
                            input: input.as_ptr().cast(),
                            input_len: input.len() * 4,
                            output: output.as_mut_ptr().cast(),
                            output_len: output.len() * 4,
                            scratch: std::ptr::null_mut(),
                            scratch_len: 0,
                        };
                        let c = ExecCtx {
                            rank,
                            world_size: n,
                            op: call.op,
                            dtype: DataType::F32,
                            count: call.count as u64,
                            ..ctx(rank)
                        };
                        execute(&sched, l, &bufs, &c, None, None, None).unwrap();
                        output
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (outs, commits.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn f32_call(op: CollectiveOp, count: usize, in_place: bool) -> crate::algorithm::Call {
        crate::algorithm::Call {
            op,
            dtype: DataType::F32,
            redop: ReduceOp::Sum,
            count,
            root: 0,
            in_place,
            is_send: false,
        }
    }

    /// Three ranks in a ring over shared memory: every step of the ring all-reduce but a
    /// piece's first forwards what it received, written straight into the next link.
    #[test]
    fn ring_all_reduce_forwards_results_through_shared_memory() {
        let count = 10_000;
        for in_place in [false, true] {
            let call = f32_call(CollectiveOp::AllReduce, count, in_place);
            let (outs, commits) = ring_over_counted_shm("fwd-test", 3, &call, |rank| {
                (0..count).map(|i| ((rank + 1) * (i % 7)) as f32).collect()
            });
            for (rank, out) in outs.iter().enumerate() {
                for (i, v) in out.iter().enumerate() {
                    assert_eq!(*v, (6 * (i % 7)) as f32, "rank {rank} element {i}");
                }
            }
            assert!(
                commits > 0,
                "in place {in_place}: nothing was forwarded in place"
            );
        }
    }

    /// Two ranks' all-gather has one step and nothing to forward from a receive: every
    /// commit is the local copy of the own block writing the link's room as it copies.
    #[test]
    fn all_gather_copies_its_own_block_through_the_link() {
        let count = 10_000;
        let call = f32_call(CollectiveOp::AllGather, count, false);
        let (outs, commits) = ring_over_counted_shm("ag-copy-test", 2, &call, |rank| {
            (0..count).map(|i| (rank * count + i) as f32).collect()
        });
        for (rank, out) in outs.iter().enumerate() {
            let want: Vec<f32> = (0..2 * count).map(|i| i as f32).collect();
            assert!(*out == want, "rank {rank}: wrong all-gather output");
        }
        // 40000 bytes per block in 8192-byte pieces: 5 pieces per rank, each published
        // in one commit or more when the ring had room.
        assert!(commits >= 1, "no copy went through the link");
        assert!(
            commits <= 2 * 5 * 2,
            "{commits} commits for 10 pieces of 2 slots"
        );
    }

    #[test]
    fn waits_spin_only_when_every_local_rank_has_a_core() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(spin_polls_for(1), SPIN_POLLS);
        assert_eq!(spin_polls_for(cores), SPIN_POLLS);
        assert_eq!(spin_polls_for(cores + 1), 0);
    }

    #[test]
    fn a_peer_that_finished_and_left_is_not_an_error() {
        // Rank 0 receives from 1, then (much later) from 2. Rank 1 exits right after
        // its send, while rank 0 still waits on rank 2.
        let (l01, l10) = mem::pair(0, 1);
        let (l02, l20) = mem::pair(0, 2);
        let mut b = Builder::new("test");
        b.recv(1, Region::new(BufId::Output, 0..4), Combine::Copy);
        b.recv(2, Region::new(BufId::Output, 4..8), Combine::Copy);
        let s0 = b.build();
        let mut b = Builder::new("test");
        b.send(0, Region::new(BufId::Input, 0..4));
        let s_send = b.build();
        let out = std::thread::scope(|sc| {
            let s = &s_send;
            sc.spawn(move || {
                let mut links: Vec<Option<Box<dyn Link>>> = vec![Some(Box::new(l10)), None, None];
                run(s, &mut links, 1).unwrap();
                // dropping `links` closes the link to rank 0
            });
            sc.spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let mut links: Vec<Option<Box<dyn Link>>> = vec![Some(Box::new(l20)), None, None];
                run(s, &mut links, 2).unwrap();
            });
            let mut links: Vec<Option<Box<dyn Link>>> =
                vec![None, Some(Box::new(l01)), Some(Box::new(l02))];
            run(&s0, &mut links, 0)
        });
        assert_eq!(out.unwrap(), vec![1, 1, 1, 1, 2, 2, 2, 2]);
    }
}
