//! The start-up link probe, as pure data: which pairs of ranks to measure, in which
//! order, and how timings become latency and bandwidth. The communicator runs it
//! (`Communicator::probe_links`) with plain send/recv.
//!
//! Pairs are those the algorithms use: ring neighbours `(r, r+1 mod n)`, the ranks of
//! each node among themselves (hierarchical intra-node phases), and consecutive owners
//! of each hierarchical shard across nodes (its inter-node ring).
//!
//! Per pair, the lower rank `a` drives and the higher rank `b` answers:
//!
//! ```text
//! a -> b  8 bytes, b -> a 8 bytes                 x SMALL_ROUNDS: fastest round trip = 2 latency
//! a -> b  size (u64, 0 ends), a -> b size bytes, b -> a 8 bytes
//!         once untimed with 256 KiB (opens a fresh TCP connection's window), then
//!         for size = 1 MiB, 4 MiB until one takes STOP_AFTER, then once more if short
//!         bandwidth = size / (faster elapsed of the last two - round trip)
//! ```
//!
//! Every rank walks its pairs in one global order, so the probe cannot deadlock: a
//! rank waits only for a partner that is at the same pair or at an earlier one. The
//! order is a sequence of rounds of disjoint pairs so pairs on different ranks run at
//! once, but with at most one inter-node pair per round: pairs that share a node's
//! uplink would otherwise each measure a fraction of it.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{LinkPerf, Topology};

/// Round trips of a small message per pair.
pub const SMALL_ROUNDS: usize = 5;
/// Bytes of the small message.
pub const SMALL_BYTES: usize = 8;
/// An untimed message before the bandwidth ones, to open a TCP congestion window.
pub const WARMUP_BYTES: usize = 256 << 10;
/// Sizes of the bandwidth message, tried in turn. At least 1 MiB, so a rate limiter's
/// burst allowance (or a socket buffer) cannot pass for bandwidth.
pub const BIG_BYTES: [usize; 2] = [1 << 20, 4 << 20];
/// A bandwidth message that took this long is big enough to trust.
pub const STOP_AFTER: Duration = Duration::from_millis(5);
/// A measurement shorter than this is repeated and the faster one kept.
pub const REPEAT_BELOW: Duration = Duration::from_millis(20);
/// At most this many pairs are probed (ring neighbours first); the rest keep nominal
/// figures, so start-up stays short on large jobs.
pub const MAX_PAIRS: usize = 256;

/// Owner of hierarchical shard `j` on node `k` (`algorithm::hierarchical::owner`).
fn owner(nodes: &[Vec<usize>], k: usize, j: usize) -> usize {
    nodes[k][j % nodes[k].len()]
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Distinct `(a, b)` pairs, `a < b`, whose links one hierarchical shard ring uses, for
/// every shard: consecutive owners across nodes. Shard `j` and `j + lcm` have the same
/// owners, so it suffices to look at `lcm(node sizes)` shards.
pub fn shard_ring_pairs(nodes: &[Vec<usize>], shard: usize) -> Vec<(usize, usize)> {
    let nn = nodes.len();
    if nn < 2 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(nn);
    for k in 0..nn {
        let (x, y) = (owner(nodes, k, shard), owner(nodes, (k + 1) % nn, shard));
        let p = (x.min(y), x.max(y));
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The pairs whose links the algorithms use, `a < b`, ring neighbours first.
pub fn used_pairs(t: &Topology) -> Vec<(usize, usize)> {
    let n = t.world_size();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut push = |a: usize, b: usize, out: &mut Vec<(usize, usize)>| {
        let p = (a.min(b), a.max(b));
        if a != b && seen.insert(p) {
            out.push(p);
        }
    };
    for r in 0..n {
        push(r, (r + 1) % n, &mut out);
    }
    for node in &t.nodes {
        for (i, &a) in node.iter().enumerate() {
            for &b in &node[i + 1..] {
                push(a, b, &mut out);
            }
        }
    }
    let mut period = 1usize;
    for node in &t.nodes {
        let g = node.len().max(1);
        period = (period / gcd(period, g)).saturating_mul(g).min(1 << 12);
    }
    for j in 0..period {
        for (a, b) in shard_ring_pairs(&t.nodes, j) {
            push(a, b, &mut out);
        }
    }
    out
}

/// The pairs to probe, in the order every rank walks them (see the module docs).
pub fn probe_order(t: &Topology) -> Vec<(usize, usize)> {
    let mut left: Vec<(usize, usize)> = used_pairs(t).into_iter().take(MAX_PAIRS).collect();
    let mut order = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let mut busy = BTreeSet::new();
        let mut inter_taken = false;
        let mut rest = Vec::new();
        for (a, b) in left {
            let inter = t.node_of[a] != t.node_of[b];
            if busy.contains(&a) || busy.contains(&b) || (inter && inter_taken) {
                rest.push((a, b));
            } else {
                busy.insert(a);
                busy.insert(b);
                inter_taken |= inter;
                order.push((a, b));
            }
        }
        left = rest;
    }
    order
}

/// The fastest of some round trips (zero for none): noise on a shared host only ever
/// adds time.
pub fn fastest(v: &[Duration]) -> Duration {
    v.iter().copied().min().unwrap_or_default()
}

/// Latency and bandwidth from the fastest small round trip and the time `big_elapsed`
/// that `big_bytes` plus a small reply took.
pub fn estimate(round_trip: Duration, big_bytes: usize, big_elapsed: Duration) -> LinkPerf {
    let rtt = round_trip.as_secs_f64();
    // Never below a tenth of the whole: on a noisy host the round trip can exceed
    // the transfer's own share of the time.
    let transfer = (big_elapsed.as_secs_f64() - rtt).max(big_elapsed.as_secs_f64() / 10.0);
    LinkPerf::from_secs(rtt / 2.0, big_bytes as f64 / transfer.max(1e-9))
}

/// Flattens this rank's results (pairs it drove) into `2 × order.len()` numbers,
/// zero where another rank drove; an element-wise max over ranks merges them.
pub fn encode(order: &[(usize, usize)], mine: &[((usize, usize), LinkPerf)]) -> Vec<u64> {
    let mut v = vec![0u64; 2 * order.len()];
    for (p, perf) in mine {
        if let Some(i) = order.iter().position(|q| q == p) {
            v[2 * i] = perf.latency_ns;
            v[2 * i + 1] = perf.bytes_per_s;
        }
    }
    v
}

/// Records merged results in `t` (pairs with a zero bandwidth were not measured).
pub fn apply(t: &mut Topology, order: &[(usize, usize)], merged: &[u64]) {
    for (i, &(a, b)) in order.iter().enumerate() {
        if let (Some(&latency_ns), Some(&bytes_per_s)) = (merged.get(2 * i), merged.get(2 * i + 1))
        {
            if bytes_per_s > 0 {
                t.set_measured(
                    a,
                    b,
                    LinkPerf {
                        latency_ns,
                        bytes_per_s,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(sizes: &[usize]) -> Topology {
        crate::topology::cpu_nodes(sizes)
    }

    #[test]
    fn pairs_cover_ring_node_mates_and_shard_rings() {
        let t = topo(&[2, 2]);
        // ring 0-1-2-3-0, node mates (0,1) (2,3), shard 0 owners 0-2, shard 1 owners 1-3
        assert_eq!(
            used_pairs(&t),
            vec![(0, 1), (1, 2), (2, 3), (0, 3), (0, 2), (1, 3)]
        );
        let t = topo(&[3, 2, 1]);
        let p = used_pairs(&t);
        // six shards: owners (j%3, 3+j%2, 5); ring links of each owner group
        for want in [
            (0, 3),
            (3, 5),
            (0, 5),
            (1, 4),
            (4, 5),
            (1, 5),
            (2, 3),
            (2, 5),
            (0, 4),
        ] {
            assert!(p.contains(&want), "{want:?} missing from {p:?}");
        }
        assert_eq!(p.len(), 15, "{p:?}");
        assert_eq!(used_pairs(&topo(&[1])), Vec::<(usize, usize)>::new());
    }

    #[test]
    fn order_keeps_one_inter_node_pair_per_round_and_every_pair() {
        let t = topo(&[2, 2]);
        let o = probe_order(&t);
        // rounds: {(0,1),(2,3)}, {(1,2)}, {(0,3)}, {(0,2)}, {(1,3)}
        assert_eq!(o, vec![(0, 1), (2, 3), (1, 2), (0, 3), (0, 2), (1, 3)]);
        let mut sorted = o.clone();
        sorted.sort();
        let mut want = used_pairs(&t);
        want.sort();
        assert_eq!(sorted, want);
    }

    #[test]
    fn estimates_and_merge() {
        let p = estimate(
            Duration::from_micros(100),
            1 << 20,
            Duration::from_micros(100 + 8389),
        );
        assert_eq!(p.latency_ns, 50_000);
        assert_eq!(p.bytes_per_s, 124_994_159); // 1 MiB / 8.389 ms
        assert_eq!(
            fastest(&[3, 1, 2, 9, 5].map(Duration::from_micros)),
            Duration::from_micros(1)
        );
        let mut t = topo(&[2, 2]);
        let order = probe_order(&t);
        let a = encode(&order, &[((0, 2), p)]);
        let b = encode(
            &order,
            &[(
                (2, 3),
                LinkPerf {
                    latency_ns: 4000,
                    bytes_per_s: 5_000_000_000,
                },
            )],
        );
        let merged: Vec<u64> = a.iter().zip(&b).map(|(x, y)| *x.max(y)).collect();
        apply(&mut t, &order, &merged);
        assert_eq!(t.link(2, 0).measured, Some(p));
        assert_eq!(
            t.link(3, 2).measured.map(|m| m.bytes_per_s),
            Some(5_000_000_000)
        );
        assert_eq!(t.link(0, 1).measured, None);
    }
}
