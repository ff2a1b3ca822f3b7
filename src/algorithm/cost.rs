//! The cost model that prices the candidate algorithms of a call for the selection
//! ([`super::select`]): `alpha + bytes / beta` per step.
//!
//! With `p` ranks, `N` nodes of at most `g` ranks, `n` bytes:
//!
//! - ring: `2(p-1)·α + 2(p-1)/p · n/β`, where β is the slowest link the ring crosses
//!   (with several nodes, a node's uplink carries one ring crossing);
//! - binomial tree (reduce + broadcast, chunked): `2⌈log2 p⌉·α + 2·n/β`;
//! - hierarchical: intra-node reduce and broadcast `2(g-1)·α_l + 2(g-1)/g · n/β_l`
//!   plus the inter-node ring over each node's uplink `2(N-1)·α + 2(N-1)/N · n/β`.
//!
//! - recursive doubling (messages up to [`select::DOUBLING_MAX_BYTES`]): `r·(α + n/β)` with
//!   `r = ⌊log2 p⌋`, plus 2 when `p` is not a power of two;
//! - recursive halving + doubling: `2⌊log2 p⌋·α + 2(q-1)/q · n/β` over the largest
//!   power of two `q ≤ p`, plus `2(α + n/β)` when `p` is not a power of two.
//!
//! Broadcast and reduce: chain `(p-1)·α + n/β` against tree `⌈log2 p⌉·(α + n/β)`.

use super::{doubling, halving, select, Algo};
use crate::dtype::CollectiveOp;

/// Latency and bandwidth of a link class.
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

/// The worse of two link classes (higher latency, lower bandwidth).
pub fn slower(a: LinkCost, b: LinkCost) -> LinkCost {
    LinkCost {
        alpha: a.alpha.max(b.alpha),
        beta: a.beta.min(b.beta),
    }
}

/// The shape of a job as the cost model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Ranks.
    pub ranks: usize,
    /// Nodes.
    pub nodes: usize,
    /// Ranks on the largest node.
    pub max_local: usize,
    /// Largest message, in bytes, for which any two ranks of a node exchange data at the
    /// modelled cost: every size for CPU ranks with a CPU each (shared memory or TCP);
    /// none for GPU topologies, where the ring's neighbours are the fast pairs and other
    /// pairs may share a slower hop; up to [`select::OVERSUBSCRIBED_PAIRWISE_MAX_BYTES`]
    /// where a node's ranks outnumber its CPUs and talk over TCP.
    pub pairwise_max_bytes: usize,
    /// One node whose ranks all exchange data through memory (shared memory between
    /// processes, or threads of one process).
    pub shared_memory: bool,
}

impl Shape {
    /// Shape of a node list.
    pub fn of(nodes: &[Vec<usize>]) -> Self {
        Shape {
            ranks: nodes.iter().map(Vec::len).sum(),
            nodes: nodes.len(),
            max_local: nodes.iter().map(Vec::len).max().unwrap_or(1),
            pairwise_max_bytes: usize::MAX,
            shared_memory: false,
        }
    }

    /// One node of `p` ranks.
    pub fn flat(p: usize) -> Self {
        Shape {
            ranks: p,
            nodes: 1,
            max_local: p,
            pairwise_max_bytes: usize::MAX,
            shared_memory: false,
        }
    }
}

fn log2_ceil(p: usize) -> f64 {
    (usize::BITS - (p.max(1) - 1).leading_zeros()) as f64
}

/// Predicted seconds for `algo` running `op` on `bytes`.
pub fn predict(
    op: CollectiveOp,
    algo: Algo,
    s: &Shape,
    bytes: usize,
    intra: LinkCost,
    inter: LinkCost,
) -> f64 {
    let n = bytes as f64;
    let p = s.ranks.max(1);
    let pf = p as f64;
    // A flat schedule is as slow as the slowest link it uses.
    let l = if s.nodes > 1 {
        slower(intra, inter)
    } else {
        intra
    };
    match (op, algo) {
        (CollectiveOp::Broadcast | CollectiveOp::Reduce, Algo::Tree) => {
            log2_ceil(p) * (l.alpha + n / l.beta)
        }
        (CollectiveOp::Broadcast | CollectiveOp::Reduce, _) => (pf - 1.0) * l.alpha + n / l.beta,
        (_, Algo::Ring) => 2.0 * (pf - 1.0) * l.alpha + 2.0 * (pf - 1.0) / pf * n / l.beta,
        (_, Algo::Tree) => 2.0 * log2_ceil(p) * l.alpha + 2.0 * n / l.beta,
        (_, Algo::Doubling) => doubling::rounds(p) as f64 * (l.alpha + n / l.beta),
        (_, Algo::Halving) => {
            let f = doubling::Fold::of(p);
            let fold = if f.extra == 0 { 0.0 } else { 2.0 * n / l.beta };
            let qf = f.p as f64;
            halving::steps(p) as f64 * l.alpha + 2.0 * (qf - 1.0) / qf * n / l.beta + fold
        }
        (_, Algo::Hier) => {
            let g = s.max_local.max(1) as f64;
            let nn = s.nodes.max(1) as f64;
            let local = 2.0 * (g - 1.0) * intra.alpha + 2.0 * (g - 1.0) / g * n / intra.beta;
            let across = 2.0 * (nn - 1.0) * inter.alpha + 2.0 * (nn - 1.0) / nn * n / inter.beta;
            local + across
        }
    }
}

/// The cheapest of the candidates [`select`] allows for this call (ties go to the
/// earlier candidate; the only one where there is one).
pub fn choose(op: CollectiveOp, s: &Shape, bytes: usize, intra: LinkCost, inter: LinkCost) -> Algo {
    let candidates = select::candidates(op);
    if let [only] = candidates {
        return *only;
    }
    let mut best = (Algo::Ring, f64::INFINITY);
    for &a in candidates
        .iter()
        .filter(|&&a| select::candidate(a, s, bytes))
    {
        let t = predict(op, a, s, bytes, intra, inter);
        if t < best.1 {
            best = (a, t);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_for_small_messages_halving_or_the_ring_for_the_rest() {
        let l = LinkCost::TCP;
        let s8 = Shape::flat(8);
        // 3 rounds against the tree's 6 steps and the ring's 14.
        assert_eq!(
            choose(CollectiveOp::AllReduce, &s8, 64, l, l),
            Algo::Doubling
        );
        // Past doubling's cap: the ring's bytes in 6 steps instead of 14.
        assert_eq!(
            choose(CollectiveOp::AllReduce, &s8, 128 << 10, l, l),
            Algo::Halving
        );
        assert_eq!(
            choose(CollectiveOp::AllReduce, &s8, 64 << 20, l, l),
            Algo::Halving
        );
        // Six ranks: halving first folds two pairs (2 n/β more), so large messages ring.
        assert_eq!(
            choose(CollectiveOp::AllReduce, &Shape::flat(6), 64 << 20, l, l),
            Algo::Ring
        );
        // Two ranks: one swap against the ring's two steps.
        assert_eq!(
            choose(CollectiveOp::AllReduce, &Shape::flat(2), 4, l, l),
            Algo::Doubling
        );
        // Two nodes of four: no halving across the uplinks.
        let s24 = Shape::of(&[vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_ne!(
            choose(CollectiveOp::AllReduce, &s24, 1 << 20, l, l),
            Algo::Halving
        );
        // Only all-reduce swaps whole messages.
        assert_eq!(choose(CollectiveOp::Broadcast, &s8, 64, l, l), Algo::Tree);
        assert_eq!(
            predict(CollectiveOp::AllReduce, Algo::Halving, &s8, 0, l, l),
            6.0 * l.alpha
        );
        assert_eq!(log2_ceil(8), 3.0);
        assert_eq!(log2_ceil(5), 3.0);
        assert_eq!(log2_ceil(1), 0.0);
    }

    #[test]
    fn large_messages_across_slow_nodes_take_the_hierarchy() {
        let slow = LinkCost {
            alpha: 50e-6,
            beta: 125e6,
        }; // 1 Gbit/s
        let s = Shape::of(&[vec![0, 1], vec![2, 3]]);
        assert_eq!(
            choose(CollectiveOp::AllReduce, &s, 64 << 20, LinkCost::SHM, slow),
            Algo::Hier
        );
        // 2x2 over a 1 Gbit/s uplink: flat ring 1.5 n/B, hierarchy 1.0 n/B (+ local work).
        let ring = predict(
            CollectiveOp::AllReduce,
            Algo::Ring,
            &s,
            64 << 20,
            LinkCost::SHM,
            slow,
        );
        let hier = predict(
            CollectiveOp::AllReduce,
            Algo::Hier,
            &s,
            64 << 20,
            LinkCost::SHM,
            slow,
        );
        assert!(ring / hier > 1.4 && ring / hier < 1.5, "{}", ring / hier);
    }

    #[test]
    fn ring_prediction_matches_the_closed_form() {
        let l = LinkCost {
            alpha: 1e-5,
            beta: 1e9,
        };
        let t = predict(
            CollectiveOp::AllReduce,
            Algo::Ring,
            &Shape::flat(4),
            1 << 20,
            l,
            l,
        );
        let want = 6.0 * 1e-5 + 1.5 * (1u64 << 20) as f64 / 1e9;
        assert!((t - want).abs() < 1e-12, "{t} vs {want}");
    }
}
