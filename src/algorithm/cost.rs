//! The cost model that picks an algorithm per call: `alpha + bytes / beta` per step.
//!
//! ring: `2(p-1)·α + 2(p-1)/p · n/β`; binomial tree (reduce + broadcast, chunked):
//! `2⌈log2 p⌉·α + 2·n/β`. Broadcast and reduce: chain `(p-1)·α + n/β` against tree
//! `⌈log2 p⌉·(α + n/β)`. Other collectives have only the ring here.

use super::Algo;
use crate::dtype::CollectiveOp;

/// Latency and bandwidth of the slowest link a schedule crosses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkCost {
    /// Seconds per message.
    pub alpha: f64,
    /// Bytes per second.
    pub beta: f64,
}

impl LinkCost {
    /// Typical shared-memory figures on one host.
    pub const SHM: LinkCost = LinkCost {
        alpha: 4e-6,
        beta: 5e9,
    };
    /// Typical TCP figures (loopback or a fast LAN).
    pub const TCP: LinkCost = LinkCost {
        alpha: 25e-6,
        beta: 1.5e9,
    };
}

fn log2_ceil(p: usize) -> f64 {
    (usize::BITS - (p.max(1) - 1).leading_zeros()) as f64
}

/// Predicted seconds for `algo` running `op` on `bytes` over `p` ranks.
pub fn predict(op: CollectiveOp, algo: Algo, p: usize, bytes: usize, l: LinkCost) -> f64 {
    let (a, n, pf) = (l.alpha, bytes as f64, p as f64);
    match (op, algo) {
        (CollectiveOp::Broadcast | CollectiveOp::Reduce, Algo::Ring) => (pf - 1.0) * a + n / l.beta,
        (CollectiveOp::Broadcast | CollectiveOp::Reduce, Algo::Tree) => {
            log2_ceil(p) * (a + n / l.beta)
        }
        (_, Algo::Ring) => 2.0 * (pf - 1.0) * a + 2.0 * (pf - 1.0) / pf * n / l.beta,
        (_, Algo::Tree) => 2.0 * log2_ceil(p) * a + 2.0 * n / l.beta,
    }
}

/// The cheaper algorithm for this call (ring where only the ring exists).
pub fn choose(op: CollectiveOp, p: usize, bytes: usize, l: LinkCost) -> Algo {
    match op {
        CollectiveOp::AllReduce | CollectiveOp::Broadcast => {
            if predict(op, Algo::Tree, p, bytes, l) < predict(op, Algo::Ring, p, bytes, l) {
                Algo::Tree
            } else {
                Algo::Ring
            }
        }
        CollectiveOp::Barrier => Algo::Tree,
        _ => Algo::Ring,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_messages_on_many_ranks_take_the_tree() {
        let l = LinkCost::TCP;
        assert_eq!(choose(CollectiveOp::AllReduce, 8, 64, l), Algo::Tree);
        assert_eq!(choose(CollectiveOp::AllReduce, 8, 64 << 20, l), Algo::Ring);
        // With two ranks the ring is never slower.
        assert_eq!(choose(CollectiveOp::AllReduce, 2, 4, l), Algo::Ring);
        assert_eq!(log2_ceil(8), 3.0);
        assert_eq!(log2_ceil(5), 3.0);
        assert_eq!(log2_ceil(1), 0.0);
    }

    #[test]
    fn ring_prediction_matches_the_closed_form() {
        let l = LinkCost { alpha: 1e-5, beta: 1e9 };
        let t = predict(CollectiveOp::AllReduce, Algo::Ring, 4, 1 << 20, l);
        let want = 6.0 * 1e-5 + 1.5 * (1u64 << 20) as f64 / 1e9;
        assert!((t - want).abs() < 1e-12, "{t} vs {want}");
    }
}
