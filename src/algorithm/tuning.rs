//! From a [`Topology`] to the cost model's inputs and the hierarchical shard weights.
//!
//! Every rank holds the same topology (measured figures are all-gathered), and this is
//! a pure function of it, so every rank picks the same algorithm and the same shard
//! split for a call: nothing here may depend on which rank asks.

use super::cost::{self, LinkCost, Shape};
use super::parts::{self, RingParts};
use super::Algo;
use crate::dtype::CollectiveOp;
use crate::topology::{probe, LinkPerf, Topology};

/// Inter-node links whose bandwidths differ by less than this factor count as equal:
/// shards stay even, so measurement noise does not reshape schedules. On a loaded host
/// one probe of a link can read half its speed; the NICs worth weighting for differ
/// more (100 vs 25 Gbit/s, 10 vs 1 Gbit/s).
pub const WEIGHT_THRESHOLD: f64 = 3.0;

/// Uneven inter-node parts ([`inter_parts`]) are used only when the predicted time of
/// the inter-node phase beats equal parts by at least this factor: run-to-run noise of
/// a network-bound all-reduce is a few percent, so a smaller gain could not be told
/// from it, and is not worth a less familiar schedule.
pub const PARTS_MIN_GAIN: f64 = 1.1;

/// Node counts up to this have every ring order tried for [`inter_parts`] (`(N-1)!`
/// orders: 720 for 7 nodes); larger jobs try the index order and the nodes sorted by
/// bandwidth.
pub const PARTS_ORDER_SEARCH_MAX: usize = 7;

impl From<LinkPerf> for LinkCost {
    fn from(p: LinkPerf) -> Self {
        LinkCost {
            alpha: p.latency_s(),
            beta: p.bandwidth(),
        }
    }
}

/// The smallest pipeline chunk [`LinkModel::chunk_bytes`] halves to among more ranks
/// than CPUs over TCP (a smaller configured one is kept).
const MIN_CHUNK: usize = 64 << 10;

/// The smallest chunk [`LinkModel::chunk_bytes`] cuts a small block into: below it the
/// per-piece costs (a syscall or a flag per piece and peer) outweigh the overlap, and
/// 64 KiB pieces of 128 KiB blocks made a 2-rank 256 KiB all-reduce slower over TCP and
/// shared memory alike (`docs/perf-log/2026-11-27-change-log.md`, quarter-block chunks).
const MIN_BLOCK_CHUNK: usize = 128 << 10;

/// What the algorithm choice needs to know about a job's links.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkModel {
    /// The job's shape.
    pub shape: Shape,
    /// The slowest link inside a node that the algorithms use.
    pub intra: LinkCost,
    /// The slowest link between nodes that the algorithms use.
    pub inter: LinkCost,
    /// Hierarchical shard weights (`None`: equal shards).
    pub shard_weights: Option<Vec<f64>>,
    /// Node order and uneven parts of the hierarchical inter-node rings (`None`: node
    /// order, equal parts).
    pub inter_parts: Option<RingParts>,
    /// Some node runs more ranks than CPUs and links them over TCP (see
    /// [`LinkModel::chunk_bytes`]).
    pub oversubscribed_tcp: bool,
    /// Shards of a hierarchical all-reduce on this job's nodes
    /// ([`super::hierarchical::shard_count`]; see [`LinkModel::hier_chunk`]).
    pub hier_shards: usize,
}

/// The slowest of `links` (higher latency, lower bandwidth), looking only at measured
/// ones when any is measured: nominal figures are guesses, measured ones facts.
fn slowest(t: &Topology, pairs: impl Iterator<Item = (usize, usize)> + Clone) -> Option<LinkCost> {
    let measured = pairs.clone().any(|(a, b)| t.link(a, b).measured.is_some());
    pairs
        .filter(|&(a, b)| !measured || t.link(a, b).measured.is_some())
        .map(|(a, b)| LinkCost::from(t.link(a, b).perf()))
        .reduce(cost::slower)
}

impl LinkModel {
    /// The model of `t`.
    pub fn of(t: &Topology) -> Self {
        let used = probe::used_pairs(t);
        let same = |&(a, b): &(usize, usize)| t.node_of[a] == t.node_of[b];
        let intra = slowest(t, used.iter().copied().filter(same)).unwrap_or(LinkCost::SHM);
        let inter = slowest(t, used.iter().copied().filter(|p| !same(p))).unwrap_or(intra);
        let cpu_only = t
            .ranks
            .iter()
            .all(|r| r.device == crate::topology::Device::Cpu);
        let oversubscribed_tcp = oversubscribed_tcp(t);
        let shared_memory = t.nodes.len() == 1
            && used.iter().all(|&(a, b)| {
                use crate::topology::LinkClass::{SameProcess, Shm};
                matches!(t.link(a, b).class, Shm | SameProcess)
            });
        LinkModel {
            shape: Shape {
                pairwise_max_bytes: match (cpu_only, oversubscribed_tcp) {
                    (false, _) => 0,
                    (true, true) => super::select::OVERSUBSCRIBED_PAIRWISE_MAX_BYTES,
                    (true, false) => usize::MAX,
                },
                shared_memory,
                ..Shape::of(&t.nodes)
            },
            intra,
            inter,
            shard_weights: shard_weights(t),
            inter_parts: inter_parts(t),
            oversubscribed_tcp,
            hier_shards: super::hierarchical::shard_count(&t.nodes),
        }
    }

    /// The pipeline chunk schedules use, from the configured one: half of it (at least
    /// 64 KiB) where ranks outnumber a node's CPUs and talk over TCP. Two processes that
    /// share a CPU take turns at every socket buffer's worth; smaller pieces keep more of
    /// the ring moving meanwhile. Only there: with 2 ranks over TCP the half chunk was
    /// slower on large messages, and over shared memory no faster.
    ///
    /// Then at most a quarter of `block`, the bytes each rank owns of the message (at
    /// least 128 KiB): with fewer pieces per block, sending, receiving and reducing a
    /// block run one after another instead of overlapping. That pays over TCP for 1 MiB
    /// collectives of 2 ranks and of 4 ranks on 2 cores, and over shared memory changes
    /// nothing beyond noise. The runs behind both rules: `docs/perf-log/2026-11-27-change-log.md`
    /// (half pipeline chunks; quarter-block chunks).
    pub fn chunk_bytes(&self, configured: usize, block: usize) -> usize {
        let chunk = if self.oversubscribed_tcp {
            (configured / 2).max(MIN_CHUNK).min(configured)
        } else {
            configured
        };
        chunk.min((block / 4).max(MIN_BLOCK_CHUNK))
    }

    /// [`LinkModel::chunk_bytes`] for a call of `op` on `bytes` (what the call counts:
    /// one rank's block for reduce-scatter and all-gather, the whole buffer otherwise)
    /// among `n` ranks.
    ///
    /// An all-reduce's block is its `1/n` share of the buffer; a reduce sends the whole
    /// buffer over every link of its tree or chain, so that is its block. A broadcast has
    /// no reduction to overlap and keeps whole chunks: cut to a quarter it only ran
    /// slower (2 ranks over TCP, in the runs of [`LinkModel::chunk_bytes`]).
    pub fn chunk_for(&self, op: CollectiveOp, bytes: usize, n: usize, configured: usize) -> usize {
        let block = match op {
            CollectiveOp::AllReduce => bytes / n.max(1),
            CollectiveOp::Broadcast => usize::MAX,
            _ => bytes,
        };
        self.chunk_bytes(configured, block)
    }

    /// The pipeline chunk of a hierarchical all-reduce, from [`LinkModel::chunk_for`]'s.
    /// Every shard's inter-node ring crosses every node's NIC, all at once, so a ring's
    /// start (its first pieces wait for the intra-node reduction of their chunks) and its
    /// end (the last pieces' `2(N-1)` steps, then their hand-over inside the node) each
    /// last about `shards × chunk / B`: with uneven nodes (3 + 2 + 1 ranks: 6 shards) three
    /// times what 2 × 2 (2 shards, where the chunk was tuned) pays. So beyond 2 shards the
    /// chunk shrinks to keep `shards × chunk` at 2 chunks' worth, in 4 KiB steps, down to
    /// 128 KiB. On the simulated cluster (3 + 2 + 1 at 1 Gbit/s, 64 MiB) 128 and 256 KiB
    /// chunks took 1.07-1.08x the bound against 512 KiB's 1.10x; 2 × 2 was the same with
    /// all three (`docs/perf-log/2026-12-06-hier.md`).
    pub fn hier_chunk(&self, chunk: usize) -> usize {
        if self.hier_shards <= 2 {
            return chunk;
        }
        let scaled = chunk.saturating_mul(2) / self.hier_shards / 4096 * 4096;
        scaled.max(MIN_BLOCK_CHUNK).min(chunk)
    }

    /// The cheapest algorithm for `op` on `bytes`.
    pub fn choose(&self, op: CollectiveOp, bytes: usize) -> Algo {
        cost::choose(op, &self.shape, bytes, self.intra, self.inter)
    }
}

/// Whether a node runs more ranks than its host has CPUs and links them over TCP. Then
/// not every pair is as good as every other: a TCP transfer needs both processes running,
/// and two that share a CPU take turns at every socket buffer's worth. Ring neighbours
/// sit on different CPUs when ranks are pinned round robin (`hetccl run --bind-cores`),
/// recursive halving's partners 2 and more apart do not: with 4 ranks on 2 cores,
/// halving spent far more of a rank's time switching tasks than the ring and moved fewer
/// bytes per second from 1 MiB up (below, its fewer steps win: see
/// [`super::select::OVERSUBSCRIBED_PAIRWISE_MAX_BYTES`]); over shared memory the two
/// were level (the current 4-rank TCP figures: `docs/PERFORMANCE.md`, targets; the runs:
/// `docs/perf-log/2026-11-27-change-log.md`).
fn oversubscribed_tcp(t: &Topology) -> bool {
    t.nodes.iter().enumerate().any(|(k, ranks)| {
        t.oversubscribed(k)
            && ranks
                .windows(2)
                .any(|w| t.link(w[0], w[1]).class == crate::topology::LinkClass::Tcp)
    })
}

/// Weights for the hierarchical shards: shard `j` in proportion to the bandwidth of the
/// slowest link of its inter-node ring, so every ring finishes at about the same time.
/// `None` (equal shards) for a single node, or when those bandwidths are within
/// [`WEIGHT_THRESHOLD`] of each other.
pub fn shard_weights(t: &Topology) -> Option<Vec<f64>> {
    if t.nodes.len() < 2 {
        return None;
    }
    let shards = super::hierarchical::shard_count(&t.nodes);
    // Measured and nominal figures do not compare: weigh only all of one kind.
    let pairs: Vec<(usize, usize)> = (0..shards)
        .flat_map(|j| probe::shard_ring_pairs(&t.nodes, j))
        .collect();
    let measured = pairs
        .iter()
        .filter(|&&(a, b)| t.link(a, b).measured.is_some())
        .count();
    if measured != 0 && measured != pairs.len() {
        return None;
    }
    let w: Vec<f64> = (0..shards)
        .map(|j| {
            probe::shard_ring_pairs(&t.nodes, j)
                .into_iter()
                .map(|(a, b)| t.link(a, b).perf().bandwidth())
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let max = w.iter().copied().fold(0.0, f64::max);
    let min = w.iter().copied().fold(f64::INFINITY, f64::min);
    if !(min > 0.0 && max.is_finite()) || max / min < WEIGHT_THRESHOLD {
        return None;
    }
    // GB/s: readable in logs, and the split only depends on ratios.
    Some(w.into_iter().map(|x| x / 1e9).collect())
}

/// Each node's network bandwidth (bytes/s) as the probe saw it: the fastest measured
/// link from one of its ranks to another node. A link runs at the slower of its two
/// ends, so this is the node's own NIC unless every node it was measured against is
/// slower (then a lower bound). `None` unless every node has a measured link out.
pub fn node_bandwidths(t: &Topology) -> Option<Vec<f64>> {
    let k = t.nodes.len();
    let mut bw = vec![0.0f64; k];
    let n = t.world_size();
    for a in 0..n {
        for b in a + 1..n {
            let (ka, kb) = (t.node_of[a], t.node_of[b]);
            if ka == kb {
                continue;
            }
            if let Some(m) = t.link(a, b).measured {
                let x = m.bandwidth();
                bw[ka] = bw[ka].max(x);
                bw[kb] = bw[kb].max(x);
            }
        }
    }
    bw.iter().all(|x| *x > 0.0 && x.is_finite()).then_some(bw)
}

/// Edge bandwidths of a ring visiting nodes of bandwidths `bw` in `order`: the slower
/// end of each edge.
fn ring_edges(bw: &[f64], order: &[usize]) -> Vec<f64> {
    let n = order.len();
    (0..n)
        .map(|i| bw[order[i]].min(bw[order[(i + 1) % n]]))
        .collect()
}

/// Every order of `0..n` with node 0 first (rotations of a ring are the same ring).
fn ring_orders(n: usize) -> Vec<Vec<usize>> {
    fn extend(cur: &mut Vec<usize>, left: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if left.is_empty() {
            out.push(cur.clone());
            return;
        }
        for i in 0..left.len() {
            let x = left.remove(i);
            cur.push(x);
            extend(cur, left, out);
            cur.pop();
            left.insert(i, x);
        }
    }
    let mut out = Vec::new();
    extend(&mut vec![0], &mut (1..n).collect(), &mut out);
    out
}

/// Uneven parts for the hierarchical inter-node rings when one node's network is much
/// slower than another's: the ring order and parts ([`parts::solve`]) that make the
/// slowest node's time least, from [`node_bandwidths`]. `None` (node order, equal parts)
/// for fewer than 3 nodes (with 2, every part costs each node the same), when the nodes'
/// bandwidths are within [`WEIGHT_THRESHOLD`] of each other (what one noisy probe can
/// read as a difference), or when the parts do not beat equal parts by
/// [`PARTS_MIN_GAIN`].
pub fn inter_parts(t: &Topology) -> Option<RingParts> {
    let k = t.nodes.len();
    if k < 3 {
        return None;
    }
    let bw = node_bandwidths(t)?;
    let max = bw.iter().copied().fold(0.0, f64::max);
    let min = bw.iter().copied().fold(f64::INFINITY, f64::min);
    if max / min < WEIGHT_THRESHOLD {
        return None;
    }
    let identity: Vec<usize> = (0..k).collect();
    let equal_time = parts::ring_time(&ring_edges(&bw, &identity), &parts::equal(k));
    let candidates = if k <= PARTS_ORDER_SEARCH_MAX {
        ring_orders(k)
    } else {
        let mut sorted = identity.clone();
        // Fastest first: slow nodes side by side leave fewer slow edges.
        sorted.sort_by(|&a, &b| bw[b].total_cmp(&bw[a]));
        vec![identity, sorted]
    };
    // The first order (the index order leads) that is best by more than rounding.
    let mut best: Option<(f64, Vec<usize>)> = None;
    for order in candidates {
        let t = parts::best_time(&ring_edges(&bw, &order));
        if best.as_ref().is_none_or(|(bt, _)| t < bt * (1.0 - 1e-9)) {
            best = Some((t, order));
        }
    }
    let (_, order) = best?;
    let (time, parts) = parts::solve(&ring_edges(&bw, &order));
    (equal_time / time >= PARTS_MIN_GAIN).then_some(RingParts {
        order,
        parts,
        time,
        equal_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{LinkClass, LinkInfo};

    fn topo(sizes: &[usize]) -> Topology {
        crate::topology::cpu_nodes(sizes)
    }

    fn perf(us: u64, mb_s: u64) -> LinkPerf {
        LinkPerf {
            latency_ns: us * 1000,
            bytes_per_s: mb_s * 1_000_000,
        }
    }

    #[test]
    fn nominal_classes_without_measurements() {
        let m = LinkModel::of(&topo(&[2, 2]));
        assert_eq!(m.intra, LinkCost::SHM);
        assert_eq!(m.inter, LinkCost::TCP);
        assert_eq!(m.shard_weights, None);
        let m = LinkModel::of(&topo(&[4]));
        assert_eq!((m.intra, m.inter), (LinkCost::SHM, LinkCost::SHM));
    }

    #[test]
    fn chunks_halve_among_more_ranks_than_cpus_over_tcp_and_shrink_for_small_blocks() {
        let with = |cpus: usize, tcp: bool| {
            let mut t = topo(&[4]);
            for r in &mut t.ranks {
                r.cpus = cpus;
            }
            if tcp {
                t.disable_shm();
            }
            let m = LinkModel::of(&t);
            (
                m.choose(CollectiveOp::AllReduce, 1 << 20),
                m.chunk_bytes(512 << 10, 64 << 20),
            )
        };
        // 4 ranks on 2 CPUs over TCP: the ring, in half chunks; with enough CPUs, with
        // shared memory, or with the CPU count unknown, halving and whole chunks.
        assert_eq!(with(2, true), (Algo::Ring, 256 << 10));
        assert_eq!(with(8, true), (Algo::Halving, 512 << 10));
        assert_eq!(with(2, false), (Algo::Halving, 512 << 10));
        assert_eq!(with(0, true), (Algo::Halving, 512 << 10));
        // Up to 512 KiB, halving's fewer steps win there too.
        let mut t = topo(&[4]);
        t.disable_shm();
        t.ranks.iter_mut().for_each(|r| r.cpus = 2);
        let m = LinkModel::of(&t);
        assert_eq!(m.choose(CollectiveOp::AllReduce, 256 << 10), Algo::Halving);
        assert_eq!(m.choose(CollectiveOp::AllReduce, 512 << 10), Algo::Halving);
        assert_eq!(
            m.choose(CollectiveOp::AllReduce, (512 << 10) + 4),
            Algo::Ring
        );
        // Never below 64 KiB, nor above what was configured.
        let mut t = topo(&[4]);
        t.disable_shm();
        t.ranks.iter_mut().for_each(|r| r.cpus = 2);
        let m = LinkModel::of(&t);
        let big = 64 << 20;
        assert_eq!(
            [
                m.chunk_bytes(1 << 20, big),
                m.chunk_bytes(100 << 10, big),
                m.chunk_bytes(4096, big)
            ],
            [512 << 10, 64 << 10, 4096]
        );
        // At least four pieces per rank's block, down to 128 KiB.
        let m = LinkModel::of(&topo(&[2]));
        assert_eq!(
            [
                m.chunk_bytes(512 << 10, 4 << 20),
                m.chunk_bytes(512 << 10, 2 << 20),
                m.chunk_bytes(512 << 10, 1 << 20),
                m.chunk_bytes(512 << 10, 512 << 10),
                m.chunk_bytes(512 << 10, 100 << 10),
                m.chunk_bytes(32 << 10, 100 << 10)
            ],
            [
                512 << 10,
                512 << 10,
                256 << 10,
                128 << 10,
                128 << 10,
                32 << 10
            ]
        );
        // Reduce-scatter and all-gather count one rank's block, all-reduce a share of the
        // buffer, reduce the whole buffer; broadcast keeps whole chunks.
        use CollectiveOp::*;
        for (op, bytes, n, want) in [
            (AllReduce, 1 << 20, 2, 128 << 10),
            (AllReduce, 4 << 20, 2, 512 << 10),
            (Broadcast, 1 << 20, 4, 512 << 10),
            (Reduce, 1 << 20, 4, 256 << 10),
            (Reduce, 4 << 20, 4, 512 << 10),
            (ReduceScatter, 1 << 20, 2, 256 << 10),
            (AllGather, 512 << 10, 4, 128 << 10),
        ] {
            let got = m.chunk_for(op, bytes, n, 512 << 10);
            assert_eq!(got, want, "{op} of {bytes} bytes among {n}");
        }
        let mut t = topo(&[4]);
        t.ranks[3].cpus = 2;
        assert!(t.oversubscribed(0));
        t.ranks[3].cpus = 4;
        assert!(!t.oversubscribed(0));
    }

    #[test]
    fn hierarchical_chunks_shrink_with_the_shards_through_each_nic() {
        // 2 x 2 and 4 x 1: 2 shards or fewer, the chunk as given.
        assert_eq!(
            LinkModel::of(&topo(&[2, 2])).hier_chunk(512 << 10),
            512 << 10
        );
        assert_eq!(
            LinkModel::of(&topo(&[1, 1, 1, 1])).hier_chunk(512 << 10),
            512 << 10
        );
        // 3 + 2 + 1: 6 shards, 512 KiB x 2/6 = 170.7 KiB, down to 168 KiB.
        let m = LinkModel::of(&topo(&[3, 2, 1]));
        assert_eq!(m.hier_shards, 6);
        assert_eq!(m.hier_chunk(512 << 10), 168 << 10);
        // Never below 128 KiB, nor above the chunk given.
        assert_eq!(
            LinkModel::of(&topo(&[4, 4, 3])).hier_chunk(512 << 10),
            128 << 10
        );
        assert_eq!(m.hier_chunk(64 << 10), 64 << 10);
    }

    #[test]
    fn measured_links_replace_nominal_ones() {
        let mut t = topo(&[2, 2]);
        t.set_measured(0, 1, perf(5, 6000));
        t.set_measured(2, 3, perf(7, 4000));
        t.set_measured(1, 2, perf(90, 118));
        t.set_measured(0, 2, perf(80, 120));
        let m = LinkModel::of(&t);
        assert_eq!(
            m.intra,
            LinkCost {
                alpha: 7e-6,
                beta: 4e9
            }
        );
        assert_eq!(
            m.inter,
            LinkCost {
                alpha: 90e-6,
                beta: 118e6
            }
        );
        // (1,3) unmeasured: its nominal 1.5 GB/s is not compared with 120 MB/s.
        assert_eq!(m.shard_weights, None);
        // 118 vs 120 MB/s: one speed, even shards.
        t.set_measured(1, 3, perf(80, 118));
        assert_eq!(shard_weights(&t), None);
        // Nor does 2x, which one noisy probe on a busy host can read.
        t.set_measured(1, 3, perf(80, 60));
        assert_eq!(shard_weights(&t), None);
        assert_eq!(m.choose(CollectiveOp::AllReduce, 64 << 20), Algo::Hier);
        // Small: recursive doubling's 2 rounds (priced as 2 slow hops, 180 us) against
        // the hierarchy's 194 us and the tree's 4 slow hops (360 us).
        assert_eq!(m.choose(CollectiveOp::AllReduce, 16), Algo::Doubling);
        // Past doubling's cap the hierarchy's 2 slow hops win again.
        assert_eq!(m.choose(CollectiveOp::AllReduce, 128 << 10), Algo::Hier);
        assert_eq!(m.choose(CollectiveOp::Broadcast, 16), Algo::Tree);
    }

    /// Nodes of `sizes` ranks whose NICs run at `mb_s` MB/s: every pair of ranks on
    /// different nodes measured at the slower NIC, ranks of a node at 6 GB/s.
    fn nics(sizes: &[usize], mb_s: &[u64]) -> Topology {
        let mut t = topo(sizes);
        let n = t.world_size();
        for a in 0..n {
            for b in a + 1..n {
                let (ka, kb) = (t.node_of[a], t.node_of[b]);
                let p = if ka == kb {
                    perf(5, 6000)
                } else {
                    perf(80, mb_s[ka].min(mb_s[kb]))
                };
                t.set_measured(a, b, p);
            }
        }
        t
    }

    #[test]
    fn a_slow_node_finishes_every_shard() {
        // 1, 1 and 0.25 GB/s: edges 1, 0.25, 0.25. Equal parts take (4/3)/0.25e9 s per
        // byte; the slow node finishing everything sends and receives each byte once:
        // 1/0.25e9.
        let t = nics(&[2, 2, 2], &[1000, 1000, 250]);
        assert_eq!(node_bandwidths(&t), Some(vec![1e9, 1e9, 0.25e9]));
        let p = inter_parts(&t).unwrap();
        assert_eq!(p.order, vec![0, 1, 2]);
        assert_eq!(p.parts, vec![0.0, 0.0, 1.0]);
        assert!((p.time - 4e-9).abs() < 1e-18, "{}", p.time);
        assert!((p.equal_time - 16.0 / 3.0 * 1e-9).abs() < 1e-18);
        assert_eq!(
            p.to_string(),
            "node 0 0.0% -> node 1 0.0% -> node 2 100.0% \
             (inter-node phase 4.000 s/GB, 5.333 s/GB with equal parts)"
        );
        assert_eq!(LinkModel::of(&t).inter_parts, Some(p));
        // The slow node first: still its own parts.
        let t = nics(&[1, 2, 3], &[250, 1000, 1000]);
        let p = inter_parts(&t).unwrap();
        assert_eq!(p.parts, vec![1.0, 0.0, 0.0]);
        // Four nodes, one slow: 6 -> 4 (x 1e-9 s per byte), the slow one takes it all.
        let t = nics(&[1, 1, 1, 1], &[1000, 1000, 1000, 250]);
        let p = inter_parts(&t).unwrap();
        assert_eq!(
            (p.order, p.parts),
            (vec![0, 1, 2, 3], vec![0.0, 0.0, 0.0, 1.0])
        );
        assert!((p.equal_time / p.time - 1.5).abs() < 1e-9);
    }

    #[test]
    fn parts_stay_equal_within_the_noise() {
        // 2x apart: what one noisy probe can read.
        assert_eq!(inter_parts(&nics(&[2, 2, 2], &[1000, 1000, 500])), None);
        assert_eq!(inter_parts(&nics(&[2, 2, 2], &[1000, 1000, 1000])), None);
        // Two nodes: every part costs each the same.
        assert_eq!(inter_parts(&nics(&[2, 2], &[1000, 250])), None);
        // Two slow nodes of four: no order or parts beat equal parts' 1.5/0.25.
        assert_eq!(
            inter_parts(&nics(&[1, 1, 1, 1], &[1000, 1000, 250, 250])),
            None
        );
        // Nominal figures only: nothing measured, nothing to weigh.
        assert_eq!(inter_parts(&topo(&[2, 2, 2])), None);
    }

    #[test]
    fn unequal_owner_rings_weight_the_shards() {
        let mut t = topo(&[2, 2]);
        // shard 0 runs on 0-2, shard 1 on 1-3
        t.set_link(
            0,
            2,
            LinkInfo {
                class: LinkClass::Rdma,
                measured: Some(perf(3, 12_000)),
            },
        );
        t.set_link(
            1,
            3,
            LinkInfo {
                class: LinkClass::Tcp,
                measured: Some(perf(30, 3_000)),
            },
        );
        assert_eq!(shard_weights(&t), Some(vec![12.0, 3.0]));
    }
}
