//! Runs the schedules of every rank in memory, with no I/O and no threads.
//!
//! Links are unbounded FIFOs and the rules are the executor's (an op starts when its
//! dependencies are done and it heads its link's queue), so a schedule that passes
//! here moves the right bytes; a cross-rank deadlock shows up as an error naming the
//! stuck ops.

use std::collections::VecDeque;

use super::schedule::{BufId, Combine, OpKind, Region, Schedule};
use crate::dtype::{DataType, ReduceOp};
use crate::reduce;

/// One rank's buffers.
#[derive(Clone, Debug, Default)]
pub struct SimRank {
    /// The send buffer.
    pub input: Vec<u8>,
    /// The receive buffer.
    pub output: Vec<u8>,
    /// Scratch (sized by the schedule).
    pub scratch: Vec<u8>,
}

impl SimRank {
    fn buf(&self, id: BufId) -> &Vec<u8> {
        match id {
            BufId::Input => &self.input,
            BufId::Output => &self.output,
            BufId::Scratch => &self.scratch,
        }
    }
    fn buf_mut(&mut self, id: BufId) -> &mut Vec<u8> {
        match id {
            BufId::Input => &mut self.input,
            BufId::Output => &mut self.output,
            BufId::Scratch => &mut self.scratch,
        }
    }
    fn read(&self, r: Region) -> Vec<u8> {
        self.buf(r.buf)[r.offset..r.offset + r.len].to_vec()
    }
}

/// Executes `scheds[r]` on `ranks[r]` for every rank; `Err` describes a deadlock or a
/// size mismatch.
pub fn run(
    scheds: &[Schedule],
    ranks: &mut [SimRank],
    dtype: DataType,
    redop: ReduceOp,
) -> Result<(), String> {
    let n = scheds.len();
    for (s, r) in scheds.iter().zip(ranks.iter_mut()) {
        r.scratch = vec![0u8; s.scratch_bytes];
    }
    // chan[src][dst]
    let mut chan: Vec<Vec<VecDeque<Vec<u8>>>> = vec![vec![VecDeque::new(); n]; n];
    let mut done: Vec<Vec<bool>> = scheds.iter().map(|s| vec![false; s.ops.len()]).collect();
    loop {
        let mut progress = false;
        for r in 0..n {
            let s = &scheds[r];
            // Heads of each (peer, direction) queue: the first undone op per queue.
            let mut head_seen = vec![[false; 2]; n];
            for (i, op) in s.ops.iter().enumerate() {
                if done[r][i] {
                    continue;
                }
                let queue = match op.kind {
                    OpKind::Send { peer, .. } => Some((peer, 0)),
                    OpKind::Recv { peer, .. } => Some((peer, 1)),
                    OpKind::Copy { .. } | OpKind::Reduce { .. } => None,
                };
                if let Some((p, d)) = queue {
                    if head_seen[p][d] {
                        continue;
                    }
                    head_seen[p][d] = true;
                }
                if !op.deps.iter().all(|&d| done[r][d]) {
                    continue;
                }
                match op.kind {
                    OpKind::Send { peer, src } => {
                        chan[r][peer].push_back(ranks[r].read(src));
                    }
                    OpKind::Recv { peer, dst, combine } => {
                        let Some(msg) = chan[peer][r].pop_front() else {
                            continue;
                        };
                        if msg.len() != dst.len {
                            return Err(format!(
                                "rank {r} op {i}: got {} bytes from {peer}, expected {}",
                                msg.len(),
                                dst.len
                            ));
                        }
                        let src = combine.operand().map(|src| ranks[r].read(src));
                        let d = &mut ranks[r].buf_mut(dst.buf)[dst.offset..dst.offset + dst.len];
                        match (combine, src) {
                            (Combine::Copy, _) => d.copy_from_slice(&msg),
                            (Combine::Accumulate, _) => {
                                reduce::reduce_inplace_bytes(dtype, redop, d, &msg)
                            }
                            (Combine::From(_), Some(a)) => {
                                reduce::reduce_from_bytes(dtype, redop, d, &a, &msg)
                            }
                            (Combine::FromAfter(_), Some(a)) => {
                                reduce::reduce_from_bytes(dtype, redop, d, &msg, &a)
                            }
                            (Combine::From(_) | Combine::FromAfter(_), None) => unreachable!(),
                        }
                    }
                    OpKind::Copy { src, dst } => {
                        let data = ranks[r].read(src);
                        ranks[r].buf_mut(dst.buf)[dst.offset..dst.offset + dst.len]
                            .copy_from_slice(&data);
                    }
                    OpKind::Reduce { src, dst } => {
                        let data = ranks[r].read(src);
                        let d = &mut ranks[r].buf_mut(dst.buf)[dst.offset..dst.offset + dst.len];
                        reduce::reduce_inplace_bytes(dtype, redop, d, &data);
                    }
                }
                done[r][i] = true;
                progress = true;
            }
        }
        if done.iter().all(|d| d.iter().all(|x| *x)) {
            break;
        }
        if !progress {
            let stuck: Vec<String> = (0..n)
                .filter_map(|r| {
                    done[r]
                        .iter()
                        .position(|x| !x)
                        .map(|i| format!("rank {r} op {i} {:?}", scheds[r].ops[i].kind))
                })
                .collect();
            return Err(format!("deadlock: {}", stuck.join("; ")));
        }
    }
    if chan.iter().flatten().any(|q| !q.is_empty()) {
        return Err("messages left unreceived".into());
    }
    for (s, r) in scheds.iter().zip(ranks.iter_mut()) {
        if let Some(f) = s.finalize {
            let d = &mut r.buf_mut(f.buf)[f.offset..f.offset + f.len];
            reduce::reduce_finalize_bytes(dtype, redop, d, n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::ring::RingOrder;
    use super::super::{plan, Algo, Call, Tuning};
    use super::*;
    use crate::dtype::CollectiveOp;

    const T: Tuning = Tuning {
        chunk_bytes: 64,
        slots: 3,
        shard_weights: None,
        inter_parts: None,
        ring_order: RingOrder::Wave,
    };

    fn f32s(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }
    fn as_f32(v: &[u8]) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(v)
    }

    fn call(op: CollectiveOp, count: usize, root: usize, in_place: bool) -> Call {
        Call {
            op,
            dtype: DataType::F32,
            redop: ReduceOp::Sum,
            count,
            root,
            in_place,
            is_send: false,
        }
    }

    /// Input of rank r, element i: r*1000 + i (exact in f32 for these sizes).
    fn val(r: usize, i: usize) -> f32 {
        (r * 1000 + i) as f32
    }

    /// Element i summed over n ranks: 1000 n(n-1)/2 + n i.
    fn sums(n: usize, count: usize) -> Vec<f32> {
        (0..count)
            .map(|i| (1000 * n * (n - 1) / 2 + n * i) as f32)
            .collect()
    }

    /// A rank holding `data` as its one buffer (in place) or as its input, with an
    /// output of `out_bytes` zeros.
    fn holding(data: Vec<u8>, out_bytes: usize, in_place: bool) -> SimRank {
        if in_place {
            SimRank {
                output: data,
                ..Default::default()
            }
        } else {
            SimRank {
                input: data,
                output: vec![0; out_bytes],
                ..Default::default()
            }
        }
    }

    #[test]
    fn all_reduce_ring_tree_and_doubling_every_world_size() {
        let ring_pieces = Tuning {
            ring_order: RingOrder::PieceByPiece,
            ..T.clone()
        };
        for (algo, t) in [
            (Algo::Ring, &T),
            (Algo::Ring, &ring_pieces),
            (Algo::Tree, &T),
            (Algo::Doubling, &T),
            (Algo::Halving, &T),
        ] {
            for n in 1..=9 {
                for count in [0usize, 1, 7, 100, 1001] {
                    for in_place in [true, false] {
                        let c = call(CollectiveOp::AllReduce, count, 0, in_place);
                        let scheds: Vec<_> = (0..n)
                            .map(|r| plan(&c, r, n, algo, t.clone(), &[]))
                            .collect();
                        let mut ranks: Vec<SimRank> = (0..n)
                            .map(|r| {
                                let v: Vec<f32> = (0..count).map(|i| val(r, i)).collect();
                                holding(f32s(&v), count * 4, in_place)
                            })
                            .collect();
                        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
                        let want = sums(n, count);
                        for r in &ranks {
                            let order = t.ring_order;
                            assert_eq!(
                                as_f32(&r.output),
                                want,
                                "{algo:?} {order:?} n={n} count={count}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn doubling_leaves_the_same_bits_on_every_rank() {
        // Sums that depend on the order of addition, and max over +0 / -0, which picks
        // its left operand: every rank must still end with one value.
        for n in 1..=9 {
            for (redop, v) in [
                (
                    ReduceOp::Sum,
                    [1e8f32, 1.0, -1e8, 0.5, 3.25, -7.0, 1e-3, 2.0, -0.125],
                ),
                (
                    ReduceOp::Max,
                    [0.0, -0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0, -0.0],
                ),
            ] {
                for in_place in [true, false] {
                    let count = 5;
                    let c = Call {
                        redop,
                        ..call(CollectiveOp::AllReduce, count, 0, in_place)
                    };
                    let scheds: Vec<_> = (0..n)
                        .map(|r| plan(&c, r, n, Algo::Doubling, T.clone(), &[]))
                        .collect();
                    assert!(scheds.iter().all(|s| s.algo == "doubling"));
                    // Out of place, two members swap their inputs once and need no
                    // scratch: each forms the result in its output as it receives.
                    let scratch = match (n, in_place) {
                        (1, _) | (2, false) => 0,
                        _ => count * 4,
                    };
                    assert_eq!(
                        scheds[0].scratch_bytes, scratch,
                        "n={n} in place {in_place}"
                    );
                    let mut ranks: Vec<SimRank> = (0..n)
                        .map(|r| {
                            let v = f32s(&vec![v[r] * (1.0 + r as f32); count]);
                            holding(v, count * 4, in_place)
                        })
                        .collect();
                    run(&scheds, &mut ranks, DataType::F32, redop).unwrap();
                    for rk in &ranks {
                        assert_eq!(
                            rk.output, ranks[0].output,
                            "{redop} n={n} in place {in_place}"
                        );
                    }
                    // Out of place gives the bits of in place.
                    if !in_place {
                        let mut inplace: Vec<SimRank> = (0..n)
                            .map(|r| SimRank {
                                output: f32s(&vec![v[r] * (1.0 + r as f32); count]),
                                ..Default::default()
                            })
                            .collect();
                        let c = Call {
                            in_place: true,
                            ..c
                        };
                        let scheds: Vec<_> = (0..n)
                            .map(|r| plan(&c, r, n, Algo::Doubling, T.clone(), &[]))
                            .collect();
                        run(&scheds, &mut inplace, DataType::F32, redop).unwrap();
                        assert_eq!(ranks[0].output, inplace[0].output, "{redop} n={n}");
                    }
                }
            }
        }
        // Past its cap the call runs the ring.
        let big = call(
            CollectiveOp::AllReduce,
            super::super::select::DOUBLING_MAX_BYTES / 4 + 1,
            0,
            true,
        );
        assert_eq!(
            plan(&big, 0, 4, Algo::Doubling, T.clone(), &[]).algo,
            "ring"
        );
    }

    /// Reduce-scatter and all-gather of `count` elements per block over `n` ranks. In
    /// place the one buffer holds all `n` blocks: the reduce-scatter leaves the other
    /// blocks as they were, the all-gather starts from this rank's block alone.
    fn reduce_scatter_and_all_gather(n: usize, count: usize, in_place: bool) {
        let what = |op: &str| format!("{op} n={n} count={count} in place {in_place}");
        let c = call(CollectiveOp::ReduceScatter, count, 0, in_place);
        let scheds: Vec<_> = (0..n)
            .map(|r| plan(&c, r, n, Algo::Ring, T.clone(), &[]))
            .collect();
        let blocks = |r: usize| (0..n * count).map(|i| val(r, i)).collect::<Vec<_>>();
        let mut ranks: Vec<SimRank> = (0..n)
            .map(|r| holding(f32s(&blocks(r)), count * 4, in_place))
            .collect();
        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
        for (r, rk) in ranks.iter().enumerate() {
            let sum = |i: usize| (1000 * n * (n - 1) / 2 + n * (r * count + i)) as f32;
            let want: Vec<f32> = if in_place {
                let mut v = blocks(r);
                for (i, x) in v[r * count..(r + 1) * count].iter_mut().enumerate() {
                    *x = sum(i);
                }
                v
            } else {
                (0..count).map(sum).collect()
            };
            assert_eq!(as_f32(&rk.output), want, "{} r={r}", what("rs"));
        }
        // Scratch stays bounded by slots x chunk.
        assert!(scheds
            .iter()
            .all(|s| s.scratch_bytes <= T.slots * T.chunk_bytes));

        let c = call(CollectiveOp::AllGather, count, 0, in_place);
        let scheds: Vec<_> = (0..n)
            .map(|r| plan(&c, r, n, Algo::Ring, T.clone(), &[]))
            .collect();
        let mine = |r: usize| f32s(&(0..count).map(|i| val(r, i)).collect::<Vec<_>>());
        let mut ranks: Vec<SimRank> = (0..n)
            .map(|r| {
                // Poison: every byte the all-gather does not write stays 0xff.
                let mut output = vec![0xff; n * count * 4];
                if in_place {
                    output[r * count * 4..(r + 1) * count * 4].copy_from_slice(&mine(r));
                    SimRank {
                        output,
                        ..Default::default()
                    }
                } else {
                    SimRank {
                        input: mine(r),
                        output,
                        ..Default::default()
                    }
                }
            })
            .collect();
        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
        let want: Vec<f32> = (0..n * count)
            .map(|j| val(j / count.max(1), j % count.max(1)))
            .collect();
        for rk in &ranks {
            assert_eq!(as_f32(&rk.output), want, "{}", what("ag"));
        }
        if in_place {
            // Nothing reads an input buffer; only the output is touched.
            for s in &scheds {
                assert!(
                    s.ops.iter().all(|op| !reads_input(&op.kind)),
                    "{}",
                    what("ag")
                );
            }
        }
    }

    fn reads_input(k: &OpKind) -> bool {
        match *k {
            OpKind::Send { src, .. } | OpKind::Copy { src, .. } | OpKind::Reduce { src, .. } => {
                src.buf == BufId::Input
            }
            OpKind::Recv { combine, .. } => {
                matches!(combine, Combine::From(r) if r.buf == BufId::Input)
            }
        }
    }

    #[test]
    fn reduce_scatter_all_gather_broadcast_reduce() {
        for n in 1..=7 {
            // 1000 elements in 64-byte chunks: many more pieces than scratch slots.
            for count in [0usize, 1, 33, 1000] {
                for in_place in [false, true] {
                    reduce_scatter_and_all_gather(n, count, in_place);
                }

                for root in [0, n - 1] {
                    for algo in [Algo::Ring, Algo::Tree] {
                        let c = call(CollectiveOp::Broadcast, count, root, true);
                        let scheds: Vec<_> = (0..n)
                            .map(|r| plan(&c, r, n, algo, T.clone(), &[]))
                            .collect();
                        let mut ranks: Vec<SimRank> = (0..n)
                            .map(|r| SimRank {
                                output: f32s(&(0..count).map(|i| val(r, i)).collect::<Vec<_>>()),
                                ..Default::default()
                            })
                            .collect();
                        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
                        let want: Vec<f32> = (0..count).map(|i| val(root, i)).collect();
                        for rk in &ranks {
                            assert_eq!(as_f32(&rk.output), want, "bcast n={n} root={root}");
                        }
                    }
                    for in_place in [false, true] {
                        let c = call(CollectiveOp::Reduce, count, root, in_place);
                        let scheds: Vec<_> = (0..n)
                            .map(|r| plan(&c, r, n, Algo::Ring, T.clone(), &[]))
                            .collect();
                        let mut ranks: Vec<SimRank> = (0..n)
                            .map(|r| {
                                let v = f32s(&(0..count).map(|i| val(r, i)).collect::<Vec<_>>());
                                holding(v, count * 4, in_place)
                            })
                            .collect();
                        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
                        let want = sums(n, count);
                        let what = format!("reduce n={n} root={root} in place {in_place}");
                        assert_eq!(as_f32(&ranks[root].output), want, "{what}");
                        if in_place {
                            // The others' buffers are their inputs, left as they were.
                            for (r, rk) in ranks.iter().enumerate().filter(|(r, _)| *r != root) {
                                let mine: Vec<f32> = (0..count).map(|i| val(r, i)).collect();
                                assert_eq!(as_f32(&rk.output), mine, "{what} r={r}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ring_sends_the_bandwidth_optimal_volume() {
        let n = 4;
        let count = 4096;
        let c = call(CollectiveOp::AllReduce, count, 0, true);
        let s = plan(&c, 1, n, Algo::Ring, T.clone(), &[]);
        // 2(n-1)/n * S
        assert_eq!(s.bytes_sent(), 2 * (n - 1) * count * 4 / n);
    }

    #[test]
    fn ring_orders_interleave_pieces_as_documented() {
        // 3 ranks, 3 pieces of 3 segments of 64 bytes: 4 steps (sends) per piece.
        let (n, count) = (3, 3 * 3 * 16);
        let c = call(CollectiveOp::AllReduce, count, 0, true);
        let piece_of_sends = |order| {
            let t = Tuning {
                ring_order: order,
                ..T.clone()
            };
            let s = plan(&c, 0, n, Algo::Ring, t, &[]);
            s.ops
                .iter()
                .filter_map(|op| match op.kind {
                    OpKind::Send { src, .. } => Some(src.offset / (3 * 64)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            piece_of_sends(RingOrder::PieceByPiece),
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
        );
        // Step s of piece p at time p + s: piece 1 starts right after piece 0's first step.
        assert_eq!(
            piece_of_sends(RingOrder::Wave),
            [0, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 2]
        );
    }

    #[test]
    fn ring_receives_know_the_send_that_forwards_them() {
        // 3 ranks, 3 pieces: every step but a piece's last receive is forwarded.
        let (n, count) = (3, 3 * 3 * 16);
        let c = call(CollectiveOp::AllReduce, count, 0, true);
        let s = plan(&c, 1, n, Algo::Ring, T.clone(), &[]);
        let mut forwarded = 0;
        for (i, op) in s.ops.iter().enumerate() {
            let OpKind::Recv { dst, .. } = op.kind else {
                assert_eq!(s.forwards[i], None, "op {i} is not a receive");
                continue;
            };
            if let Some(j) = s.forwards[i] {
                assert!(matches!(s.ops[j].kind, OpKind::Send { src, .. } if src == dst));
                assert!(s.ops[j].deps.contains(&i));
                forwarded += 1;
            }
        }
        assert_eq!(forwarded, 3 * (2 * (n - 1) - 1));
    }

    #[test]
    fn all_gather_sends_its_own_block_after_copying_it() {
        // Two members: each piece of the own block is copied into the output, then sent
        // from there; the copy knows the send that forwards it.
        let (n, count) = (2, 3 * 16);
        let c = call(CollectiveOp::AllGather, count, 0, false);
        let s = plan(&c, 1, n, Algo::Ring, T.clone(), &[]);
        let mut copies = 0;
        for (i, op) in s.ops.iter().enumerate() {
            match op.kind {
                OpKind::Copy { dst, .. } => {
                    let j = s.forwards[i].expect("a copy of the own block is forwarded");
                    assert!(matches!(s.ops[j].kind, OpKind::Send { src, .. } if src == dst));
                    assert!(s.ops[j].deps.contains(&i));
                    copies += 1;
                }
                OpKind::Recv { dst, .. } => {
                    // Step k's receive is forwarded by step k + 1's send, except the last.
                    if let Some(j) = s.forwards[i] {
                        assert!(matches!(s.ops[j].kind, OpKind::Send { src, .. } if src == dst));
                    }
                }
                _ => assert_eq!(s.forwards[i], None, "op {i}"),
            }
        }
        assert!(copies > 0);
        assert_eq!(
            copies,
            s.ops
                .iter()
                .filter(|o| matches!(o.kind, OpKind::Copy { .. }))
                .count()
        );
        // More members: step 0 sends from the input, so no copy is forwarded.
        let s = plan(&c, 1, 3, Algo::Ring, T.clone(), &[]);
        for (i, op) in s.ops.iter().enumerate() {
            if matches!(op.kind, OpKind::Copy { .. }) {
                assert_eq!(s.forwards[i], None, "op {i}");
            }
        }
    }

    #[test]
    fn barrier_waits_for_the_children_before_telling_the_parent() {
        let n = 5;
        let c = call(CollectiveOp::Barrier, 1, 0, true);
        let scheds: Vec<_> = (0..n)
            .map(|r| plan(&c, r, n, Algo::Tree, T.clone(), &[]))
            .collect();
        let count = |s: &Schedule| {
            let sends = s
                .ops
                .iter()
                .filter(|o| matches!(o.kind, OpKind::Send { .. }))
                .count();
            (sends, s.ops.len() - sends)
        };
        // root 0 has children 1, 2, 4: three up, three down; leaf 4 one each way.
        assert_eq!(count(&scheds[0]), (3, 3));
        assert_eq!(count(&scheds[4]), (1, 1));
        // one byte per message
        assert_eq!(scheds[0].bytes_sent(), 3);
        // Rank 2 (parent 0, child 3): its message up depends on the one from 3.
        let s2 = &scheds[2];
        let recv3 = s2
            .ops
            .iter()
            .position(|o| matches!(o.kind, OpKind::Recv { peer: 3, .. }))
            .unwrap();
        let send0 = s2
            .ops
            .iter()
            .position(|o| matches!(o.kind, OpKind::Send { peer: 0, .. }))
            .unwrap();
        assert!(s2.ops[send0].deps.contains(&recv3), "{:?}", s2.ops);
        let mut ranks = vec![
            SimRank {
                output: vec![0u8],
                ..Default::default()
            };
            n
        ];
        run(&scheds, &mut ranks, DataType::U8, ReduceOp::Sum).unwrap();
    }
}
