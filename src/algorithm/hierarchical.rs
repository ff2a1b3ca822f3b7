//! Two-level all-reduce for clusters of nodes: reduce inside each node over the fast
//! local links, all-reduce across nodes over the slow links, broadcast inside the node.
//!
//! The buffer is cut into `S` *shards*. On a node with `g` ranks, local rank `l` owns
//! shards `j` with `j % g == l`, so every rank of a node works on the network at once,
//! each with its own peers. Nodes may hold different numbers of ranks (3 + 2 + 1):
//! `S` is the least common multiple of the node sizes (capped), so each node's ranks
//! share its shards evenly, and every byte crosses the network once per phase:
//!
//! ```text
//! 1. intra-node reduce: non-owners send shard j to its owner, which accumulates
//! 2. inter-node ring all-reduce of shard j among its owners (one per node)
//! 3. intra-node broadcast: the owner sends the finished shard j to its node-mates
//! ```
//!
//! Shards may be weighted (e.g. by each owner group's measured bandwidth) instead of
//! split evenly. The result of each shard is computed once, by the inter-node ring,
//! and copied everywhere: all ranks hold bitwise the same bytes.

use std::ops::Range;

use super::parts::RingParts;
use super::ring::{self, RingOrder};
use super::schedule::{
    self, split_chunks, split_even, split_weighted, Builder, Combine, Phase, Region,
};
use super::Group;

/// Largest shard count; beyond it the lcm of node sizes is replaced by a multiple of
/// the largest node size (slightly uneven, still correct).
pub const MAX_SHARDS: usize = 64;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Number of shards for these node sizes.
pub fn shard_count(nodes: &[Vec<usize>]) -> usize {
    let mut l = 1usize;
    for n in nodes {
        let g = n.len().max(1);
        l = l / gcd(l, g) * g;
        if l > MAX_SHARDS {
            let gmax = nodes.iter().map(|n| n.len()).max().unwrap_or(1).max(1);
            return (MAX_SHARDS / gmax).max(1) * gmax;
        }
    }
    l
}

/// Splits `count` elements into `shards` ranges (bytes), by `weights` if given.
pub fn shard_ranges(
    count: usize,
    shards: usize,
    elem: usize,
    weights: Option<&[f64]>,
) -> Vec<Range<usize>> {
    let Some(w) = weights.filter(|w| w.len() == shards && w.iter().all(|x| *x > 0.0)) else {
        return split_even(count, shards, elem);
    };
    split_weighted(count, elem, w)
}

/// Owner of shard `j` on node `k`.
pub fn owner(nodes: &[Vec<usize>], k: usize, j: usize) -> usize {
    nodes[k][j % nodes[k].len()]
}

/// Appends `rank`'s part of a hierarchical in-place all-reduce of `buf`.
#[allow(clippy::too_many_arguments)]
pub fn all_reduce_inplace(
    b: &mut Builder,
    nodes: &[Vec<usize>],
    rank: usize,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    weights: Option<&[f64]>,
    parts: Option<&RingParts>,
) {
    let Some(k) = nodes.iter().position(|n| n.contains(&rank)) else {
        return;
    };
    let shards = shard_count(nodes);
    let ranges = shard_ranges(count, shards, elem, weights);
    let at = |r: &Range<usize>| schedule::at(buf, r);
    let chunks = |r: &Range<usize>| -> Vec<Range<usize>> {
        split_chunks((r.end - r.start) / elem, elem, chunk_bytes)
            .into_iter()
            .map(|c| r.start + c.start..r.start + c.end)
            .collect()
    };
    let mates = &nodes[k];

    // 1. Inside the node, every shard is reduced into its owner.
    b.phase(Phase::IntraReduceScatter);
    for (j, r) in ranges.iter().enumerate() {
        let own = owner(nodes, k, j);
        for c in chunks(r) {
            if own == rank {
                for &m in mates.iter().filter(|&&m| m != rank) {
                    b.recv(m, at(&c), Combine::Accumulate);
                }
            } else {
                b.send(own, at(&c));
            }
        }
    }

    // 2. Across nodes, the owners of each shard run a ring all-reduce.
    b.phase(Phase::InterAllReduce);
    inter_node(b, nodes, rank, &ranges, elem, chunk_bytes, parts, |_, r| {
        at(r)
    });

    // 3. Inside the node, owners hand the finished shards to their node-mates.
    b.phase(Phase::IntraAllGather);
    for (j, r) in ranges.iter().enumerate() {
        let own = owner(nodes, k, j);
        for c in chunks(r) {
            if own == rank {
                for &m in mates.iter().filter(|&&m| m != rank) {
                    b.send(m, at(&c));
                }
            } else {
                b.recv(own, at(&c), Combine::Copy);
            }
        }
    }
    b.phase(Phase::Unnamed);
}

/// Appends phase 2 alone for `rank`: for each shard it owns (byte ranges `ranges` of
/// the whole buffer), a ring all-reduce with the owners of the same shard on the other
/// nodes, over the region `place(j, range)` says holds shard `j` here. With `place`
/// the shard's own range of the buffer this is the middle of [`all_reduce_inplace`];
/// the hierarchical device all-reduce places the shards this rank owns one after
/// another in a pinned host buffer, having done phases 1 and 3 over CUDA IPC.
///
/// With `parts`, every shard's ring visits the nodes in `parts.order` and the node at
/// position `i` finishes `parts.parts[i]` of the shard ([`super::parts`]); without, the
/// nodes in index order with equal parts.
#[allow(clippy::too_many_arguments)]
pub fn inter_node(
    b: &mut Builder,
    nodes: &[Vec<usize>],
    rank: usize,
    ranges: &[Range<usize>],
    elem: usize,
    chunk_bytes: usize,
    parts: Option<&RingParts>,
    place: impl Fn(usize, &Range<usize>) -> Region,
) {
    let Some(k) = nodes.iter().position(|n| n.contains(&rank)) else {
        return;
    };
    if nodes.len() <= 1 {
        return;
    }
    // Parts that do not fit this job (another node count) are not used.
    let parts = parts.filter(|p| {
        let mut seen = vec![false; nodes.len()];
        p.order.len() == nodes.len()
            && p.parts.len() == nodes.len()
            && p.order
                .iter()
                .all(|&kk| kk < seen.len() && !std::mem::replace(&mut seen[kk], true))
    });
    let order: Vec<usize> = match parts {
        Some(p) => p.order.clone(),
        None => (0..nodes.len()).collect(),
    };
    let Some(me) = order.iter().position(|&kk| kk == k) else {
        return;
    };
    for (j, r) in ranges.iter().enumerate() {
        if owner(nodes, k, j) != rank {
            continue;
        }
        let members: Vec<usize> = order.iter().map(|&kk| owner(nodes, kk, j)).collect();
        let g = Group {
            members: &members,
            me,
        };
        // Across nodes (TCP): a wave keeps each link's queue full.
        let count = (r.end - r.start) / elem;
        let region = place(j, r);
        b.hold_phase(Phase::InterAllReduce, |b| match parts {
            Some(p) => ring::all_reduce_parts(
                b,
                &g,
                region,
                count,
                elem,
                chunk_bytes,
                RingOrder::Wave,
                &p.parts,
            ),
            None => {
                ring::all_reduce_inplace(b, &g, region, count, elem, chunk_bytes, RingOrder::Wave)
            }
        });
    }
}

/// Bytes each node sends across the network in one hierarchical all-reduce of `bytes`
/// (the lower bound's numerator): `2(N-1)/N · bytes` whatever the node sizes.
pub fn inter_node_bytes_per_node(nodes: usize, bytes: usize) -> f64 {
    2.0 * (nodes as f64 - 1.0) / nodes as f64 * bytes as f64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::algorithm::schedule::{BufId, OpKind, Schedule};
    use crate::algorithm::sim::{run, SimRank};
    use crate::dtype::{DataType, ReduceOp};

    /// Nodes of the given sizes, ranks numbered node by node.
    pub(crate) fn shape(sizes: &[usize]) -> Vec<Vec<usize>> {
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

    fn plan(nodes: &[Vec<usize>], rank: usize, count: usize, w: Option<&[f64]>) -> Schedule {
        let mut b = Builder::new("hier");
        let buf = Region::new(BufId::Output, 0..count * 4);
        all_reduce_inplace(&mut b, nodes, rank, buf, count, 4, 256, w, None);
        b.build()
    }

    #[test]
    fn shard_counts() {
        assert_eq!(shard_count(&shape(&[3, 2, 1])), 6);
        assert_eq!(shard_count(&shape(&[2, 2])), 2);
        assert_eq!(shard_count(&shape(&[4])), 4);
        assert_eq!(shard_count(&shape(&[7, 8, 5])), 64);
    }

    #[test]
    fn every_shape_sums_correctly() {
        for sizes in [
            &[4][..],
            &[2, 2],
            &[2, 3],
            &[3, 2, 1],
            &[1, 1, 1, 1],
            &[1, 3],
        ] {
            let nodes = shape(sizes);
            let n: usize = sizes.iter().sum();
            for count in [0usize, 1, 7, 1000, 5003] {
                let scheds: Vec<_> = (0..n).map(|r| plan(&nodes, r, count, None)).collect();
                let mut ranks: Vec<SimRank> = (0..n)
                    .map(|r| SimRank {
                        output: bytemuck::cast_slice(
                            &(0..count)
                                .map(|i| (r * 1000 + i) as f32)
                                .collect::<Vec<_>>(),
                        )
                        .to_vec(),
                        ..Default::default()
                    })
                    .collect();
                run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
                let want: Vec<f32> = (0..count)
                    .map(|i| (1000 * n * (n - 1) / 2 + n * i) as f32)
                    .collect();
                for rk in &ranks {
                    let got: Vec<f32> = bytemuck::pod_collect_to_vec(&rk.output);
                    assert_eq!(got, want, "{sizes:?} count={count}");
                }
            }
        }
    }

    /// Bytes sent to ranks on other nodes, summed per node.
    fn inter_bytes(nodes: &[Vec<usize>], scheds: &[Schedule]) -> Vec<usize> {
        let node_of = |r: usize| nodes.iter().position(|n| n.contains(&r)).unwrap();
        nodes
            .iter()
            .map(|n| {
                n.iter()
                    .flat_map(|&r| scheds[r].ops.iter().map(move |o| (r, o)))
                    .filter_map(|(r, o)| match o.kind {
                        OpKind::Send { peer, src } if node_of(peer) != node_of(r) => Some(src.len),
                        _ => None,
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn each_byte_crosses_the_network_once_per_phase() {
        for sizes in [&[2, 2][..], &[3, 2, 1], &[1, 1, 1, 1]] {
            let nodes = shape(sizes);
            let n: usize = sizes.iter().sum();
            let count = 6 * 1024;
            let scheds: Vec<_> = (0..n).map(|r| plan(&nodes, r, count, None)).collect();
            let want = inter_node_bytes_per_node(nodes.len(), count * 4);
            // Exact up to segments that differ by one element where a shard does not
            // divide evenly among the nodes.
            for (k, b) in inter_bytes(&nodes, &scheds).into_iter().enumerate() {
                let err = (b as f64 - want).abs() / want;
                assert!(err < 0.002, "{sizes:?} node {k}: {b} bytes vs {want}");
            }
        }
    }

    #[test]
    fn weighted_shards_follow_weights() {
        let r = shard_ranges(1000, 2, 4, Some(&[3.0, 1.0]));
        assert_eq!(r, vec![0..3000, 3000..4000]);
        let nodes = shape(&[2, 2]);
        let w = [3.0, 1.0];
        let scheds: Vec<_> = (0..4).map(|r| plan(&nodes, r, 1000, Some(&w))).collect();
        let mut ranks: Vec<SimRank> = (0..4)
            .map(|r| SimRank {
                output: bytemuck::cast_slice(&vec![r as f32 + 1.0; 1000]).to_vec(),
                ..Default::default()
            })
            .collect();
        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
        for rk in &ranks {
            let got: Vec<f32> = bytemuck::pod_collect_to_vec(&rk.output);
            assert_eq!(got, vec![10.0f32; 1000]);
        }
        // local rank 0 of each node owns the 3/4 shard: it sends 3x what local rank 1 sends
        let sent = |r: usize| {
            scheds[r]
                .ops
                .iter()
                .filter_map(|o| match o.kind {
                    OpKind::Send { peer, src } if peer / 2 != r / 2 => Some(src.len),
                    _ => None,
                })
                .sum::<usize>()
        };
        assert_eq!(sent(0), 3 * sent(1));
    }
}
