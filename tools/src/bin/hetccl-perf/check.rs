//! Inputs whose collective results are exact in every element type, and the expected
//! results computed independently of the library (in f64, by closed loops over ranks).
//!
//! Values are small integers: sums stay within 5 x world size, products are powers
//! of two up to 2^ceil(n/4), so results are exact in f16/bf16 and in 8-bit integers
//! for worlds of up to 24 ranks, and float results are bitwise predictable.

use hetccl::dtype::CollectiveOp;
use hetccl::ReduceOp;

/// Marks output elements that a correct collective overwrites; outside every input range.
pub const POISON: f64 = 101.0;

/// Rank `r`'s element `j` of its reduction input.
pub fn reduce_input(op: ReduceOp, r: usize, n: usize, j: usize) -> f64 {
    let v = match op {
        ReduceOp::Sum => 1 + (r + j) % 3,
        ReduceOp::Prod => {
            if r % 4 == j % 4 {
                2
            } else {
                1
            }
        }
        ReduceOp::Max | ReduceOp::Min => (r * 3 + j) % (n + 2),
        // Rank 0 adds n, so the sum is n*(j%5 + 1) and the average an exact integer.
        ReduceOp::Avg => j % 5 + if r == 0 { n } else { 0 },
    };
    v as f64
}

/// Element `j` of the reduction over all `n` ranks' [`reduce_input`].
pub fn reduce_expected(op: ReduceOp, n: usize, j: usize) -> f64 {
    let vals = (0..n).map(|r| reduce_input(op, r, n, j));
    match op {
        ReduceOp::Sum => vals.sum(),
        ReduceOp::Prod => vals.product(),
        ReduceOp::Max => vals.fold(f64::MIN, f64::max),
        ReduceOp::Min => vals.fold(f64::MAX, f64::min),
        ReduceOp::Avg => vals.sum::<f64>() / n as f64,
    }
}

/// `reduce_expected(op, n, j)` repeats every `period(op, n)` elements, so a checker
/// can compare against a short table.
pub fn period(op: ReduceOp, n: usize) -> usize {
    match op {
        ReduceOp::Sum => 3,
        ReduceOp::Prod => 4,
        ReduceOp::Max | ReduceOp::Min => n + 2,
        ReduceOp::Avg => 5,
    }
}

/// Rank `r`'s element `i` for the collectives that only move data.
pub fn move_input(r: usize, i: usize) -> f64 {
    ((r * 7 + i * 3) % 100) as f64
}

/// Rank `r`'s send element `j` for `coll` (`root` matters for broadcast only: other
/// ranks' buffers start poisoned so a missing broadcast shows).
pub fn send_value(
    coll: CollectiveOp,
    op: ReduceOp,
    r: usize,
    n: usize,
    root: usize,
    j: usize,
) -> f64 {
    match coll {
        CollectiveOp::AllGather => move_input(r, j),
        CollectiveOp::Broadcast => {
            if r == root {
                move_input(r, j)
            } else {
                POISON
            }
        }
        _ => reduce_input(op, r, n, j),
    }
}

/// What rank `r`'s output element `i` must hold after `coll` (`block` = the per-rank
/// block length of reduce_scatter and all_gather); `None` where the output is undefined
/// (reduce on a non-root rank).
pub fn expected(
    coll: CollectiveOp,
    op: ReduceOp,
    r: usize,
    n: usize,
    root: usize,
    block: usize,
    i: usize,
) -> Option<f64> {
    match coll {
        CollectiveOp::AllReduce => Some(reduce_expected(op, n, i)),
        CollectiveOp::ReduceScatter => Some(reduce_expected(op, n, r * block + i)),
        CollectiveOp::AllGather => Some(move_input(i / block, i % block)),
        CollectiveOp::Broadcast => Some(move_input(root, i)),
        CollectiveOp::Reduce => (r == root).then(|| reduce_expected(op, n, i)),
        CollectiveOp::Barrier | CollectiveOp::SendRecv => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_have_closed_forms() {
        // sum over r of 1 + (r + j) % 3 for 4 ranks, j = 0: 1+2+3+1
        assert_eq!(reduce_expected(ReduceOp::Sum, 4, 0), 7.0);
        // avg: n*(j%5 + 1)/n
        assert_eq!(reduce_expected(ReduceOp::Avg, 4, 7), 3.0);
        assert_eq!(reduce_expected(ReduceOp::Avg, 3, 4), 5.0);
        // prod: ranks 1 and 5 match j = 1 mod 4 among 8 ranks
        assert_eq!(reduce_expected(ReduceOp::Prod, 8, 1), 4.0);
        // max/min of (3r + j) % (n + 2) for n = 2, j = 2: values 2, 1
        assert_eq!(reduce_expected(ReduceOp::Max, 2, 2), 2.0);
        assert_eq!(reduce_expected(ReduceOp::Min, 2, 2), 1.0);
    }

    #[test]
    fn results_fit_i8_and_miss_the_poison_up_to_24_ranks() {
        let ops = ReduceOp::ALL;
        let worst = |n| {
            ops.iter()
                .flat_map(|&op| (0..20).map(move |j| reduce_expected(op, n, j)))
                .fold(0.0, f64::max)
        };
        // the largest is prod: 6 ranks per residue class mod 4 -> 2^6 (sums reach 48);
        // a 25th rank makes one class 7 strong and 2^7 overflows i8
        assert_eq!(worst(24), 64.0);
        assert_eq!(worst(25), 128.0);
    }

    #[test]
    fn expected_values_repeat_with_the_period() {
        for op in ReduceOp::ALL {
            for n in [1, 2, 3, 5, 8] {
                let p = period(op, n);
                for j in 0..3 * p {
                    assert_eq!(
                        reduce_expected(op, n, j),
                        reduce_expected(op, n, j + p),
                        "{op} n={n} j={j}"
                    );
                }
            }
        }
        // prod with 5 ranks: j % 4 == 0 matches ranks 0 and 4, else one rank
        let got: Vec<f64> = (0..4)
            .map(|j| reduce_expected(ReduceOp::Prod, 5, j))
            .collect();
        assert_eq!(got, vec![4.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn outputs_per_collective() {
        let (s, n) = (ReduceOp::Sum, 3);
        assert_eq!(
            expected(CollectiveOp::ReduceScatter, s, 2, n, 0, 4, 1),
            Some(reduce_expected(s, n, 9))
        );
        // all_gather block 1 element 2 comes from rank 1: (7 + 6) % 100
        assert_eq!(
            expected(CollectiveOp::AllGather, s, 0, n, 0, 4, 6),
            Some(13.0)
        );
        assert_eq!(
            expected(CollectiveOp::Broadcast, s, 0, n, 2, 4, 1),
            Some(17.0)
        );
        assert_eq!(expected(CollectiveOp::Reduce, s, 0, n, 2, 4, 1), None);
        assert_eq!(send_value(CollectiveOp::Broadcast, s, 0, n, 2, 1), POISON);
    }
}
