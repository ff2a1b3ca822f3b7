//! The hierarchical all-reduce with uneven inter-node parts (a slow node finishing more
//! of every shard), run in the simulator against the closed form of the test kit's
//! oracle: every element reduced once, all ranks bitwise alike, whatever the node
//! shapes, ring order and parts (parts of 0 elements, buffers smaller than the ring).

use hetccl::algorithm::parts::RingParts;
use hetccl::algorithm::sim::{self, SimRank};
use hetccl::algorithm::{self, Algo, Call, Tuning};
use hetccl::dtype::CollectiveOp;
use hetccl::{DataType, ReduceOp};
use hetccl_testkit::oracle::{expected, input};
use proptest::prelude::*;

/// Nodes of the given sizes, ranks numbered node by node.
fn shape(sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut next = 0;
    sizes
        .iter()
        .map(|&g| {
            let v: Vec<usize> = (next..next + g).collect();
            next += g;
            v
        })
        .collect()
}

/// Every rank's output of a hierarchical all-reduce of `inputs` (f32) with `parts`.
fn run(
    sizes: &[usize],
    parts: Option<RingParts>,
    inputs: &[Vec<f32>],
    redop: ReduceOp,
    chunk: usize,
) -> Vec<Vec<f32>> {
    let nodes = shape(sizes);
    let n: usize = sizes.iter().sum();
    let count = inputs[0].len();
    let call = Call::new(CollectiveOp::AllReduce, DataType::F32, count).with_redop(redop);
    let tuning = Tuning {
        chunk_bytes: chunk,
        slots: 4,
        inter_parts: parts,
        ..Tuning::default()
    };
    let scheds: Vec<_> = (0..n)
        .map(|r| algorithm::plan(&call, r, n, Algo::Hier, tuning.clone(), &nodes))
        .collect();
    let mut ranks: Vec<SimRank> = inputs
        .iter()
        .map(|v| SimRank {
            input: bytemuck::cast_slice(v).to_vec(),
            output: vec![0u8; count * 4],
            ..Default::default()
        })
        .collect();
    sim::run(&scheds, &mut ranks, DataType::F32, redop).unwrap();
    ranks
        .iter()
        .map(|r| bytemuck::pod_collect_to_vec(&r.output))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A slow third node finishing every shard: the oracle's sums, and the same bytes as
/// with equal parts (small integers sum exactly in any order).
#[test]
fn a_slow_node_finishing_every_shard_sums_like_equal_parts() {
    let sizes = [2, 2, 2];
    let count = 5003;
    let inputs: Vec<Vec<f32>> = (0..6)
        .map(|r| (0..count).map(|i| input(ReduceOp::Sum, r, i, 6)).collect())
        .collect();
    let parts = RingParts {
        order: vec![0, 1, 2],
        parts: vec![0.0, 0.0, 1.0],
        time: 0.0,
        equal_time: 0.0,
    };
    let want: Vec<f32> = (0..count).map(|i| expected(ReduceOp::Sum, i, 6)).collect();
    for out in run(&sizes, Some(parts), &inputs, ReduceOp::Sum, 256) {
        assert_eq!(out, want);
    }
    for out in run(&sizes, None, &inputs, ReduceOp::Sum, 256) {
        assert_eq!(out, want);
    }
}

fn case() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Vec<u8>, usize, usize)> {
    prop::collection::vec(1usize..4, 3..5).prop_flat_map(|sizes| {
        let k = sizes.len();
        (
            Just(sizes),
            Just((0..k).collect::<Vec<usize>>()).prop_shuffle(),
            // Weights 0..4: zeros are common; all zero falls back to equal parts.
            prop::collection::vec(0u8..4, k),
            0usize..300,
            prop::sample::select(vec![4usize, 12, 64, 256]),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any node shapes, ring order, parts (some 0) and size: the oracle's result, and
    /// for values whose sum depends on the order of additions, the same bits on every
    /// rank.
    #[test]
    fn uneven_parts_match_the_oracle((sizes, order, w, count, chunk) in case(), seed in any::<u64>()) {
        let n: usize = sizes.iter().sum();
        let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
        let parts = if total > 0.0 {
            w.iter().map(|&x| f64::from(x) / total).collect()
        } else {
            vec![1.0 / w.len() as f64; w.len()]
        };
        let p = RingParts { order, parts, time: 0.0, equal_time: 0.0 };
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| (0..count).map(|i| input(op, r, i, n)).collect())
                .collect();
            let want: Vec<f32> = (0..count).map(|i| expected(op, i, n)).collect();
            for (r, out) in run(&sizes, Some(p.clone()), &inputs, op, chunk).iter().enumerate() {
                prop_assert_eq!(out, &want, "{:?} rank {} {:?}", sizes, r, op);
            }
        }
        // Inexact sums: every rank holds the bits the one reduction produced.
        let mut x = seed | 1;
        let inputs: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..count).map(|_| {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                (x % 1_000_003) as f32 / 997.0 - 500.0
            }).collect())
            .collect();
        let outs = run(&sizes, Some(p), &inputs, ReduceOp::Sum, chunk);
        for out in &outs[1..] {
            prop_assert_eq!(bits(out), bits(&outs[0]));
        }
    }
}
