//! The direct algorithms: collectives that read the peers' shared buffers where they
//! lie, one step per rank in place of a ring's `n - 1`.
//!
//! Protocol of one collective with sequence number `s` (the communicator's, equal on
//! every rank), over the control pages ([`super::control`]):
//!
//! 1. publish the call in the call line, then `flag = (s, ARRIVE)`; wait until every
//!    peer's flag has reached `(s, ARRIVE)` and check that its call matches;
//! 2. all-reduce: rank r reduces segment r chunk by chunk, reading the chunk from every
//!    rank's buffer in rank order 0..n (the fixed order makes results bitwise equal
//!    everywhere and independent of timing), writes it into its own buffer and
//!    publishes `flag = (s, CHUNK0 + c)`; it copies other segments' chunks from their
//!    owners as soon as they are published. Reduce-scatter, all-gather and broadcast
//!    read what they need from the peers' buffers directly;
//! 3. `flag = (s, EXIT)`; wait until every peer's flag has reached `(s, EXIT)`, so no
//!    buffer is handed back to its caller while a peer may still read it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use super::buffer::{Allocation, SharedState};
use super::control::{
    flag_value, load_call, reached, stated, store_call, NodeCtl, Waits, ARRIVE, CHUNK0, EXIT, NONE,
};
use super::Communicator;
use crate::algorithm::call::{self, Call};
use crate::algorithm::executor::{Buffers, ExecCtx};
use crate::dtype::{CollectiveOp, Element};
use crate::error::Result;
use crate::reduce;

/// Bytes a rank reduces before publishing progress: small enough that the chunk is
/// still in cache when peers copy it, large enough that publishing costs nothing.
const CHUNK_BYTES: usize = 256 << 10;

/// Where this rank's side of a direct collective lies in its shared buffers.
pub(super) struct Placement {
    /// `(allocation, byte offset)` of this rank's input when peers can read it there.
    input: Option<(u64, usize)>,
    /// The same for the output.
    output: Option<(u64, usize)>,
    /// Broadcast root (global rank).
    root: usize,
    /// Copy with streaming stores (large outputs; see `Config::stream_min_bytes`).
    stream: bool,
    /// One buffer: a reduce-scatter's result goes to this rank's block of it, an
    /// all-gather's own block is in place already.
    in_place: bool,
}

impl Placement {
    /// This rank's shared buffers for `call`, when they are the ones the direct path
    /// needs: all_reduce a shared output (a private input is first copied into it),
    /// reduce_scatter and all_gather a shared input (in place, the one buffer),
    /// broadcast a shared buffer.
    pub(super) fn find(
        comm: &Communicator,
        call: &Call,
        input: (*const u8, usize),
        output: (*mut u8, usize),
    ) -> Option<Placement> {
        let state = &comm.shared;
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
        Some(Placement {
            input,
            output,
            root: call.root,
            stream: out_bytes >= comm.cfg.stream_min_bytes,
            in_place: call.in_place,
        })
    }

    /// Runs the collective (see the module docs).
    pub(super) fn execute(
        &self,
        state: &SharedState,
        node: &NodeCtl,
        bufs: &Buffers,
        ctx: &ExecCtx,
        cancel: &AtomicBool,
    ) -> Result<()> {
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
        store_call(&line.call, &stated(ctx, self.root as u64));
        line.in_idx.store(in_idx, Ordering::Relaxed);
        line.in_off.store(in_off, Ordering::Relaxed);
        line.out_idx.store(out_idx, Ordering::Relaxed);
        line.out_off.store(out_off, Ordering::Relaxed);
        node.publish(ctx.seq, ARRIVE);
        let mut run = Run {
            waits: Waits {
                node,
                ctx,
                cancel,
                eager: false,
            },
            _held: Vec::new(),
            stream: self.stream,
        };
        for l in 0..node.n() {
            if l != me {
                run.waits.wait(l, ARRIVE, "to start the collective")?;
            }
        }
        let views = run.views(state, bufs, count * size)?;

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
                run.waits
                    .wait(l, EXIT, "to finish reading this rank's buffer")?;
            }
        }
        Ok(())
    }
}

/// Where a peer's data lies in this process, for one collective.
struct PeerView {
    input: *const u8,
    output: *const u8,
}

/// One run of a direct collective on the progress thread.
struct Run<'a> {
    waits: Waits<'a>,
    /// Keeps the peers' mappings used by this collective alive.
    _held: Vec<Arc<Allocation>>,
    stream: bool,
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
        let (op, world) = (self.waits.ctx.redop, self.waits.ctx.world_size);
        // SAFETY: the caller's contract.
        unsafe {
            if self.stream {
                reduce::reduce_n_streaming::<T>(op, dst, srcs, len, world)
            } else {
                reduce::reduce_n::<T>(op, dst, srcs, len, world)
            }
        }
    }

    /// Checks every peer's published call against ours and finds its buffers here.
    fn views(
        &mut self,
        state: &SharedState,
        bufs: &Buffers,
        bytes: usize,
    ) -> Result<Vec<PeerView>> {
        let ctx = self.waits.ctx;
        let node = self.waits.node;
        let me = node.me;
        let want = load_call(&node.page(me).call.call);
        let reg = state.registry();
        let mut views = Vec::with_capacity(node.n());
        for l in 0..node.n() {
            if l == me {
                views.push(PeerView {
                    input: bufs.input,
                    output: bufs.output,
                });
                continue;
            }
            let peer = self.waits.peer(l);
            let c = &node.page(l).call;
            let got = load_call(&c.call);
            let mismatch = |detail: String| ctx.mismatch(peer, detail);
            call::check(ctx.rank, peer, &want, &got, call::Engine::SharedBuffers)
                .map_err(mismatch)?;
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
                CollectiveOp::ReduceScatter => bytes * node.n(),
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
        let ctx = self.waits.ctx;
        let node = self.waits.node;
        let n = views.len();
        let me = node.me;
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
            // Large outputs go out with streaming stores: the peers then read this
            // segment back from memory rather than from this core's cache, which still
            // costs less than fetching each line before writing it (measured in
            // `docs/PERFORMANCE.md`, streaming stores).
            unsafe { self.reduce(bufs.output.add(a * size).cast::<T>(), &srcs, b - a) };
            node.publish(ctx.seq, CHUNK0 + c as u32);
            // Copy whatever peers have finished meanwhile, while it is in cache.
            for k in 1..n {
                let r = (me + k) % n;
                let flag = node.page(r).flag.0.load(Ordering::Acquire);
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
                self.waits
                    .wait(r, CHUNK0 + next[r] as u32, "to reduce its part")?;
                copy(r, next[r]);
                next[r] += 1;
            }
        }
        Ok(())
    }

    /// This rank's block reduced over every rank's input into `out` (`count` elements;
    /// in place, the own input's block itself).
    fn reduce_scatter<T: Element>(&self, views: &[PeerView], out: *mut u8) -> Result<()> {
        let ctx = self.waits.ctx;
        let me = self.waits.node.me;
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
        let me = self.waits.node.me;
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
        let node = self.waits.node;
        let l = node.ranks.iter().position(|&g| g == root).unwrap_or(root);
        if l != node.me {
            // SAFETY: the root's buffer holds `bytes` bytes and is unchanged until the
            // exit step; this rank's buffer is its own.
            unsafe { self.copy(bufs.output, views[l].output, bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::select::eager_limit;
    use crate::communicator::shared::testing::{last_direct, secs, world, world_with};
    use crate::communicator::testing::on_all;
    use crate::dtype::ReduceOp;
    use half::bf16;

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
                 shared buffers, peer 1 runs all_reduce #2 of 5000 x f32 (sum op) over links"
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
}
