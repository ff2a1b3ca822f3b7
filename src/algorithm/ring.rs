//! Ring algorithms: reduce-scatter then all-gather, chunked and pipelined.
//!
//! The buffer is cut into *pieces* of about `n × chunk` bytes; each piece runs its own
//! ring over `n` segments; [`RingOrder`] says how the pieces' steps interleave. Every
//! rank sends `2(n-1)/n · S` bytes: bandwidth optimal.
//!
//! ```text
//! reduce-scatter, step k:  send seg (me-k) to the right; recv seg (me-k-1) from the
//!                          left and reduce it into ours.      (after n-1 steps we own seg me+1)
//! all-gather,     step k:  send seg (me+1-k) to the right; recv seg (me-k) from the left.
//! ```

use std::ops::Range;

use super::schedule::{
    at, split_chunks, split_even, split_weighted, BufId, Builder, Combine, Phase, Region,
};
use super::Group;

/// Byte ranges `[piece][segment]` relative to the start of the buffer.
pub fn layout(count: usize, n: usize, elem: usize, chunk_bytes: usize) -> Vec<Vec<Range<usize>>> {
    pieces(count, elem, n * chunk_bytes, |pcount| {
        split_even(pcount, n, elem)
    })
}

/// Cuts `count` elements into even pieces of about `piece_bytes` and each piece into the
/// segments `segments(elements in the piece)` gives (relative to the piece).
fn pieces(
    count: usize,
    elem: usize,
    piece_bytes: usize,
    segments: impl Fn(usize) -> Vec<Range<usize>>,
) -> Vec<Vec<Range<usize>>> {
    let pieces = (count * elem).div_ceil(piece_bytes.max(elem)).max(1);
    split_even(count, pieces, elem)
        .into_iter()
        .map(|p| {
            segments((p.end - p.start) / elem)
                .into_iter()
                .map(|s| p.start + s.start..p.start + s.end)
                .collect()
        })
        .collect()
}

/// Byte ranges `[piece][segment]` like [`layout`], segment `j` of every piece taking the
/// fraction `weights[j]` of it (rounded to elements; a weight of 0 leaves it empty).
/// Pieces are cut so the largest segment is about `chunk_bytes`, as in [`layout`].
pub fn layout_weighted(
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    weights: &[f64],
) -> Vec<Vec<Range<usize>>> {
    let total: f64 = weights.iter().sum();
    let widest = weights.iter().copied().fold(0.0, f64::max) / total;
    let piece_bytes = (chunk_bytes as f64 / widest) as usize;
    pieces(count, elem, piece_bytes, |pcount| {
        split_weighted(pcount, elem, weights)
    })
}

/// Copies `src` to `dst` piece by piece (`pieces` relative to both), unless they are
/// the same bytes: in-place calls find their block already where it belongs.
fn copy_pieces(b: &mut Builder, src: Region, dst: Region, pieces: &[Range<usize>]) {
    if src == dst {
        return;
    }
    for p in pieces {
        b.copy(at(src, p), at(dst, p));
    }
}

/// Step `k` of the reduce-scatter of one piece (`segs`, its `n` segments), reading
/// `src` and leaving partial and final sums in `dst` (the same region in place). Out of
/// place costs no extra copy: step 0 sends straight from `src`, and the receive
/// computes `dst = src + incoming` in one pass. After `n - 1` steps member `me` holds
/// segment `me + 1` reduced. `skip_empty`: empty segments are not sent at all (every
/// member skips the same ones, so the messages on each link still pair up).
fn reduce_scatter_step(
    b: &mut Builder,
    g: &Group,
    src: Region,
    dst: Region,
    segs: &[Range<usize>],
    k: usize,
    skip_empty: bool,
) {
    let n = g.size();
    // Send to the right; wait for the left and fold its partial sums into ours.
    let out = &segs[(g.me + n - k) % n];
    if !(skip_empty && out.is_empty()) {
        b.send(g.right(), at(if k == 0 { src } else { dst }, out));
    }
    // In place (`src == dst`) the builder makes this an `Accumulate`.
    let inc = &segs[(g.me + 2 * n - k - 1) % n];
    if !(skip_empty && inc.is_empty()) {
        b.recv(g.left(), at(dst, inc), Combine::From(at(src, inc)));
    }
}

/// Step `k` of the all-gather of one piece, after its reduce-scatter: member `me`
/// starts holding segment `me + 1`.
fn all_gather_step(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    segs: &[Range<usize>],
    k: usize,
    skip_empty: bool,
) {
    let n = g.size();
    let out = &segs[(g.me + 1 + n - k) % n];
    if !(skip_empty && out.is_empty()) {
        b.send(g.right(), at(buf, out));
    }
    let inc = &segs[(g.me + n - k) % n];
    if !(skip_empty && inc.is_empty()) {
        b.recv(g.left(), at(buf, inc), Combine::Copy);
    }
}

/// In what order a ring all-reduce issues the `2(n-1)` steps (reduce-scatter, then
/// all-gather) of its pieces. Every rank of a ring must use the same order: it fixes the
/// sequence of messages on each link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingOrder {
    /// Step `s` of piece `p` at time `p + s`, earlier steps first within a time: the
    /// next pieces' first sends queue ahead of a piece's later steps, so a link has work
    /// queued while it waits for a piece's data to come round (TCP, slow links).
    #[default]
    Wave,
    /// Each piece's steps before the next piece's, as NCCL's ring does: a piece's next
    /// send is next on its link when the receive before it runs, so the receive can
    /// write its result straight into the link's buffer (`Link::send_space`) instead of
    /// the send reading it back from the output later. Pieces still overlap, as links
    /// move a message slot by slot (shared memory).
    PieceByPiece,
}

/// All-reduce of `src` into `dst` over `g` (in place when they are equal), its steps
/// issued in `order`. Every step but a piece's first sends on what the step before it
/// received.
#[allow(clippy::too_many_arguments)]
pub fn all_reduce_into(
    b: &mut Builder,
    g: &Group,
    src: Region,
    dst: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    order: RingOrder,
) {
    let n = g.size();
    if n == 1 {
        return;
    }
    let lay = layout(count, n, elem, chunk_bytes);
    run_steps(b, g, src, dst, &lay, order, false);
}

/// In-place all-reduce of `buf` over `g` where member `i` finishes the fraction
/// `parts[i]` of every piece (`docs/ALGORITHMS.md`, uneven inter-node parts): with
/// parts matched to its links' speeds, a member on a slow link sends and receives less.
/// Empty segments send nothing. Each element is still reduced once, along the ring in
/// the same order as with equal parts, so every member gets bitwise the same result.
#[allow(clippy::too_many_arguments)]
pub fn all_reduce_parts(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    order: RingOrder,
    parts: &[f64],
) {
    let n = g.size();
    if n == 1 {
        return;
    }
    // Member i ends holding segment i + 1 (see the step functions).
    let mut weights = vec![0.0; n];
    for (i, p) in parts.iter().enumerate().take(n) {
        weights[(i + 1) % n] = *p;
    }
    if !(weights.iter().all(|w| *w >= 0.0) && weights.iter().sum::<f64>() > 0.0) {
        weights = vec![1.0; n];
    }
    let lay = layout_weighted(count, elem, chunk_bytes, &weights);
    run_steps(b, g, buf, buf, &lay, order, true);
}

/// The `2(n-1)` steps of every piece of `lay`, issued in `order`.
fn run_steps(
    b: &mut Builder,
    g: &Group,
    src: Region,
    dst: Region,
    lay: &[Vec<Range<usize>>],
    order: RingOrder,
    skip_empty: bool,
) {
    let n = g.size();
    let steps = 2 * (n - 1);
    let stride = match order {
        RingOrder::Wave => 1,
        RingOrder::PieceByPiece => steps,
    };
    let mut issue: Vec<(usize, usize, usize)> = (0..lay.len())
        .flat_map(|p| (0..steps).map(move |s| (p * stride + s, s, p)))
        .collect();
    issue.sort_unstable();
    for (_, s, p) in issue {
        if s < n - 1 {
            b.phase(Phase::ReduceScatter);
            reduce_scatter_step(b, g, src, dst, &lay[p], s, skip_empty);
        } else {
            b.phase(Phase::AllGather);
            all_gather_step(b, g, dst, &lay[p], s - (n - 1), skip_empty);
        }
    }
    b.phase(Phase::Unnamed);
}

/// In-place all-reduce of `buf` over `g`.
pub fn all_reduce_inplace(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    order: RingOrder,
) {
    all_reduce_into(b, g, buf, buf, count, elem, chunk_bytes, order);
}

/// Reduce-scatter: `input` holds `n` blocks of `block` elements; member `me` ends with
/// block `me` reduced over all members in `output`. In place, `output` is block `me` of
/// `input`; the other blocks are only read.
///
/// Partial sums travel through scratch: `slots` chunk-sized slots reused round-robin,
/// so scratch stays `slots × chunk` bytes whatever the message size.
#[allow(clippy::too_many_arguments)]
pub fn reduce_scatter(
    b: &mut Builder,
    g: &Group,
    input: Region,
    output: Region,
    block: usize,
    elem: usize,
    chunk_bytes: usize,
    slots: usize,
) {
    let n = g.size();
    let block_bytes = block * elem;
    let blk = |i: usize, r: &Range<usize>| {
        Region::new(
            input.buf,
            input.offset + i * block_bytes + r.start..input.offset + i * block_bytes + r.end,
        )
    };
    // Pieces of one block; all blocks are cut the same way.
    let pieces = split_chunks(block, elem, chunk_bytes);
    if n == 1 {
        copy_pieces(b, blk(0, &(0..block_bytes)), output, &pieces);
        return;
    }
    let slot_bytes = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
    // A partial is live from its receive at step k to its send at step k+1. Pieces go
    // in groups of `w`, each piece of a group owning two slots (one per step parity),
    // so no slot is overwritten while its value is still to be sent.
    let w = (slots / 2).max(1);
    b.scratch(slot_bytes * 2 * w);
    let (left, right) = (g.left(), g.right());
    for group in pieces.chunks(w) {
        // Where each piece's running partial lives after each step.
        let mut held: Vec<Region> = group.iter().map(|p| blk((g.me + n - 1) % n, p)).collect();
        for k in 0..n - 1 {
            for (i, p) in group.iter().enumerate() {
                b.send(right, held[i]);
                // Step k receives the partial of block (me - k - 2) and folds in ours.
                let blk_idx = (g.me + 2 * n - k - 2) % n;
                let dst = if k == n - 2 {
                    at(output, p)
                } else {
                    let s = 2 * i + k % 2;
                    Region::new(BufId::Scratch, s * slot_bytes..s * slot_bytes + p.len())
                };
                b.recv(left, dst, Combine::From(blk(blk_idx, p)));
                held[i] = dst;
            }
        }
    }
}

/// All-gather: member `me`'s `input` (`block` elements) lands at block `me` of every
/// member's `output`. In place, `input` is that block of `output` already.
pub fn all_gather(
    b: &mut Builder,
    g: &Group,
    input: Region,
    output: Region,
    block: usize,
    elem: usize,
    chunk_bytes: usize,
) {
    let n = g.size();
    let block_bytes = block * elem;
    let pieces = split_chunks(block, elem, chunk_bytes);
    let blk = |i: usize, r: &Range<usize>| {
        Region::new(
            output.buf,
            output.offset + i * block_bytes + r.start..output.offset + i * block_bytes + r.end,
        )
    };
    copy_pieces(b, input, blk(g.me, &(0..block_bytes)), &pieces);
    let (left, right) = (g.left(), g.right());
    // With two members, step 0 is the whole exchange: it sends our own block from the
    // output, after the local copy, so that on a link with room of its own (shared
    // memory) the copy writes the room and the output in one read of the input
    // (`Schedule::forwards`): 5 bytes of memory traffic per byte of the own block
    // instead of 6. With more, step 0 sends straight from the input: the forwarded later
    // steps queue behind it on the link, and pacing it by the local copies made 3 and 4
    // ranks slower (the runs: `docs/perf-log/2026-11-27-change-log.md`, all-gather).
    let copy_first = n == 2;
    for k in 0..n.saturating_sub(1) {
        for p in &pieces {
            let out = if k == 0 && !copy_first {
                at(input, p)
            } else {
                blk((g.me + n - k) % n, p)
            };
            b.send(right, out);
            b.recv(left, blk((g.me + 2 * n - k - 1) % n, p), Combine::Copy);
        }
    }
}

/// Pipelined chain broadcast from member `root`: each member receives a chunk from
/// its predecessor and forwards it to its successor while the next chunk arrives.
pub fn broadcast_chain(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    root: usize,
) {
    let n = g.size();
    if n == 1 {
        return;
    }
    let pos = (g.me + n - root) % n; // 0 = root
    let prev = g.members[(g.me + n - 1) % n];
    let next = g.members[(g.me + 1) % n];
    let pieces = split_chunks(count, elem, chunk_bytes);
    for p in &pieces {
        if pos > 0 {
            b.recv(prev, at(buf, p), Combine::Copy);
        }
        if pos < n - 1 {
            b.send(next, at(buf, p));
        }
    }
}

/// Pipelined chain reduce towards member `root`: partial results flow backwards along
/// the ring (from root's predecessor's far end towards the root); the root writes
/// the result into `output`. Partials travel through `slots` chunk-sized scratch slots.
#[allow(clippy::too_many_arguments)]
pub fn reduce_chain(
    b: &mut Builder,
    g: &Group,
    input: Region,
    output: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    root: usize,
    slots: usize,
) {
    let n = g.size();
    let pieces = split_chunks(count, elem, chunk_bytes);
    if n == 1 {
        copy_pieces(b, input, output, &pieces);
        return;
    }
    let pos = (g.me + n - root) % n;
    // Data flows from position n-1 down to 0 (the root).
    let from = g.members[(g.me + 1) % n];
    let to = g.members[(g.me + n - 1) % n];
    let slot_bytes = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
    let slots = slots.max(2);
    if pos != 0 && pos != n - 1 {
        b.scratch(slot_bytes * slots);
    }
    for (pi, p) in pieces.iter().enumerate() {
        if pos == n - 1 {
            b.send(to, at(input, p));
        } else {
            let dst = if pos == 0 {
                at(output, p)
            } else {
                let s = pi % slots;
                Region::new(BufId::Scratch, s * slot_bytes..s * slot_bytes + p.len())
            };
            b.recv(from, dst, Combine::From(at(input, p)));
            if pos != 0 {
                b.send(to, dst);
            }
        }
    }
}
