//! The hierarchical device all-reduce as a pure plan: which rank reduces which shard
//! inside its host over CUDA IPC, which shard crosses hosts through pinned host memory
//! and the host links, and the bytes each rank moves over each link class.
//!
//! Shards and owners are the host path's ([`hierarchical`]): the buffer is cut into
//! `S` shards (the lcm of the host sizes, capped), and local rank `l` of a host of `g`
//! ranks owns shards `j` with `j % g == l`, so uneven hosts (3 + 2 + 1) give each rank of
//! a host an equal part. Per rank, for each shard `j` it owns:
//!
//! ```text
//! 1. IPC reduce-scatter: read shard j from every host-mate's device buffer (NVLink or
//!    PCIe peer reads) and accumulate it into its own, in f32, in host-mate order
//! 2. stage: copy shard j device -> pinned host memory                   (PCIe, S/L)
//!    all-reduce shard j with its owners on the other hosts (one per host), the host
//!    path's inter-node ring over the host links
//!    copy the finished shard j host -> device                           (PCIe, S/L)
//! 3. IPC all-gather: every host-mate reads the finished shard j from the owner
//! ```
//!
//! So each rank moves `1/L` of the buffer over PCIe each way (`L` = ranks on its host)
//! instead of all of it, as the flat staged path does. Each shard's result is computed
//! once, by its inter-host ring, and copied everywhere: every rank holds the same bits,
//! and they are the host hierarchical all-reduce's bits (the same shards, the same
//! accumulation order inside the host, the same ring between hosts).
//!
//! Compressed (`HETCCL_COMPRESS=inter`): 16-bit values on the host links only, so the
//! network and PCIe bytes of phase 2 halve for f32; phases 1 and 3 stay f32.

use std::ops::Range;

use super::hierarchical::{self, owner, shard_count, shard_ranges};
use super::schedule::{BufId, Builder, Region, Schedule};

/// Bytes one rank moves in one hierarchical device all-reduce, by link class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// Read from host-mates' device memory over CUDA IPC (phases 1 and 3).
    pub ipc_read: usize,
    /// Device to pinned host memory (phase 2).
    pub device_to_host: usize,
    /// Pinned host memory to device (phase 2).
    pub host_to_device: usize,
    /// Sent to ranks of other hosts (phase 2's ring).
    pub network_sent: usize,
}

/// The plan of one hierarchical device all-reduce of `count` elements of `elem` bytes
/// over hosts `nodes` (global ranks per host).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceHierPlan {
    /// Global ranks per host.
    pub nodes: Vec<Vec<usize>>,
    /// Shard `j`'s elements.
    pub shards: Vec<Range<usize>>,
    /// Bytes per element on the device.
    pub elem: usize,
}

impl DeviceHierPlan {
    /// The plan for these hosts; shards as the host path cuts them (even split).
    pub fn new(nodes: &[Vec<usize>], count: usize, elem: usize) -> Self {
        let s = shard_count(nodes);
        let shards = shard_ranges(count, s, 1, None);
        DeviceHierPlan {
            nodes: nodes.to_vec(),
            shards,
            elem,
        }
    }

    /// The host (index into `nodes`) of `rank`, or `None` if it is in none.
    pub fn host_of(&self, rank: usize) -> Option<usize> {
        self.nodes.iter().position(|n| n.contains(&rank))
    }

    /// Shards `rank` reduces, stages and hands out.
    pub fn owned(&self, rank: usize) -> Vec<usize> {
        let Some(k) = self.host_of(rank) else {
            return Vec::new();
        };
        (0..self.shards.len())
            .filter(|&j| owner(&self.nodes, k, j) == rank)
            .collect()
    }

    /// The ranks whose shard `j` the owner on host `k` adds to its own, in the order it
    /// adds them (host order, the owner left out): phase 1's sources.
    pub fn reduce_sources(&self, k: usize, j: usize) -> Vec<usize> {
        let own = owner(&self.nodes, k, j);
        self.nodes[k]
            .iter()
            .copied()
            .filter(|&m| m != own)
            .collect()
    }

    /// The owners of shard `j`, one per host in host order: phase 2's ring.
    pub fn inter_host_ring(&self, j: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .map(|k| owner(&self.nodes, k, j))
            .collect()
    }

    /// The shards `rank` owns as phase 2 holds them in host memory, one after another
    /// in shard order: `(shard, its elements in the buffer, its first element in the
    /// packed host buffer)`.
    pub fn packed(&self, rank: usize) -> Vec<(usize, Range<usize>, usize)> {
        let mut at = 0;
        self.owned(rank)
            .into_iter()
            .map(|j| {
                let r = self.shards[j].clone();
                let here = at;
                at += r.end - r.start;
                (j, r, here)
            })
            .collect()
    }

    /// Elements of the packed host buffer of `rank` ([`DeviceHierPlan::packed`]).
    pub fn packed_len(&self, rank: usize) -> usize {
        self.owned(rank)
            .into_iter()
            .map(|j| self.shards[j].end - self.shards[j].start)
            .sum()
    }

    /// Where bytes `packed` of `rank`'s packed host buffer live in the buffer:
    /// `(byte in the buffer, byte in the packed buffer, bytes)`, one per shard the range
    /// touches, in order. The device path stages and returns its packed buffer block
    /// by block this way.
    pub fn buffer_pieces(&self, rank: usize, packed: Range<usize>) -> Vec<(usize, usize, usize)> {
        let e = self.elem;
        self.packed(rank)
            .into_iter()
            .filter_map(|(_, r, at)| {
                let (lo, hi) = (at * e, (at + r.end - r.start) * e);
                let (a, b) = (packed.start.max(lo), packed.end.min(hi));
                (a < b).then(|| (r.start * e + (a - lo), a, b - a))
            })
            .collect()
    }

    /// Phase 2 of `rank`: the host path's inter-node rings
    /// ([`hierarchical::inter_node`]) over its packed host buffer (the output, of the
    /// plan's elements), in chunks of about `chunk_bytes`. Empty for a rank of a single
    /// host.
    pub fn inter_host_schedule(&self, rank: usize, chunk_bytes: usize) -> Schedule {
        let wire = self.elem;
        let mut b = Builder::new("device-hier inter-host");
        let ranges: Vec<Range<usize>> = self
            .shards
            .iter()
            .map(|r| r.start * wire..r.end * wire)
            .collect();
        let packed = self.packed(rank);
        hierarchical::inter_node(
            &mut b,
            &self.nodes,
            rank,
            &ranges,
            wire,
            chunk_bytes,
            None,
            |j, r| {
                let at = packed.iter().find(|p| p.0 == j).map_or(0, |p| p.2 * wire);
                Region::new(BufId::Output, at..at + (r.end - r.start))
            },
        );
        b.build()
    }

    /// What `rank` moves over each link class; `wire` bytes per element on the host
    /// links and through pinned memory (`elem` uncompressed, 2 for fp16/bf16).
    pub fn link_bytes(&self, rank: usize, wire: usize) -> LinkBytes {
        let Some(k) = self.host_of(rank) else {
            return LinkBytes::default();
        };
        let mates = self.nodes[k].len() - 1;
        let hosts = self.nodes.len();
        let mut b = LinkBytes::default();
        for (j, r) in self.shards.iter().enumerate() {
            let len = r.end - r.start;
            if owner(&self.nodes, k, j) == rank {
                b.ipc_read += mates * len * self.elem;
                if hosts > 1 {
                    b.device_to_host += len * wire;
                    b.host_to_device += len * wire;
                    // A ring all-reduce sends 2(N-1)/N of its buffer.
                    b.network_sent += 2 * (hosts - 1) * len / hosts * wire;
                }
            } else {
                b.ipc_read += len * self.elem;
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::hierarchical::tests::shape;
    use crate::algorithm::sim::{run, SimRank};
    use crate::dtype::{DataType, ReduceOp};

    const CHUNK: usize = 256;

    /// Values whose sums round (not small integers), different on every rank.
    fn input(rank: usize, count: usize) -> Vec<f32> {
        (0..count)
            .map(|i| ((rank * 7919 + i * 104_729) % 10_007) as f32 * 1.37e-3 - 6.1)
            .collect()
    }

    fn to_bytes(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    /// The host-memory twin of the device plan: phase 1 as the IPC reduce does it
    /// (owner's shard + each source's, in order, f32), phase 2 as the host path's ring
    /// among the owners run in the simulator, phase 3 as the IPC reads copy.
    fn device_twin(plan: &DeviceHierPlan, inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let n = inputs.len();
        let mut bufs = phase1(plan, inputs);
        if plan.nodes.len() > 1 {
            // Phase 2 on each rank's packed host buffer, as the device path stages it.
            let scheds: Vec<_> = (0..n)
                .map(|rank| plan.inter_host_schedule(rank, CHUNK))
                .collect();
            let mut ranks: Vec<SimRank> = (0..n)
                .map(|rank| SimRank {
                    output: to_bytes(&pack(plan, rank, &bufs[rank])),
                    ..Default::default()
                })
                .collect();
            run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
            for (rank, r) in ranks.iter().enumerate() {
                unpack(
                    plan,
                    rank,
                    &bytemuck::pod_collect_to_vec(&r.output),
                    &mut bufs[rank],
                );
            }
        }
        phase3(plan, &mut bufs);
        bufs
    }

    /// Phase 1 as the IPC reduce does it: the owner's shard plus each source's, in order.
    fn phase1(plan: &DeviceHierPlan, inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let mut bufs = inputs.to_vec();
        for (k, _) in plan.nodes.iter().enumerate() {
            for (j, r) in plan.shards.iter().enumerate() {
                let own = owner(&plan.nodes, k, j);
                for src in plan.reduce_sources(k, j) {
                    for i in r.clone() {
                        bufs[own][i] += inputs[src][i];
                    }
                }
            }
        }
        bufs
    }

    /// Phase 3 as the IPC reads copy: every host-mate takes each shard from its owner.
    fn phase3(plan: &DeviceHierPlan, bufs: &mut [Vec<f32>]) {
        let finished = bufs.to_vec();
        for (k, host) in plan.nodes.iter().enumerate() {
            for (j, r) in plan.shards.iter().enumerate() {
                let own = owner(&plan.nodes, k, j);
                for &m in host {
                    bufs[m][r.clone()].copy_from_slice(&finished[own][r.clone()]);
                }
            }
        }
    }

    /// Records the byte ranges the executor hands to the passes, in order.
    #[derive(Default)]
    struct Seen {
        events: Vec<(bool, Range<usize>)>,
    }

    impl crate::algorithm::executor::BlockPasses for Seen {
        fn block_bytes(&self) -> usize {
            1024
        }
        fn before(&mut self, r: Range<usize>) -> crate::Result<()> {
            self.events.push((true, r));
            Ok(())
        }
        fn after(&mut self, r: Range<usize>) -> crate::Result<()> {
            self.events.push((false, r));
            Ok(())
        }
    }

    #[test]
    fn the_inter_node_phase_alone_on_packed_shards_is_the_host_all_reduces_middle() {
        use crate::algorithm::Call;
        use crate::communicator::testing::{on_all, world};
        use crate::config::{AlgoChoice, Config};
        use crate::dtype::CollectiveOp;
        use std::sync::Arc;

        for (n, per) in [(4, 2), (6, 2), (6, 3), (3, 1)] {
            let cfg = Config {
                algo: AlgoChoice::Hier,
                timeout: std::time::Duration::from_secs(20),
                ..Config::default()
            };
            let comms = world(n, per, cfg);
            let nodes = comms[0].topology().nodes.clone();
            for count in [1usize, 1000, 70_001] {
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, count)).collect();
                let want = on_all(&comms, |c| {
                    let mut v = inputs[c.rank()].clone();
                    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    v
                });
                let plan = DeviceHierPlan::new(&nodes, count, 4);
                let staged = phase1(&plan, &inputs);
                let out = on_all(&comms, |c| {
                    let r = c.rank();
                    let mut p = pack(&plan, r, &staged[r]);
                    let sched = Arc::new(plan.inter_host_schedule(r, c.config().chunk_bytes));
                    let call = Call::new(CollectiveOp::AllReduce, DataType::F32, count)
                        .with_redop(ReduceOp::Sum);
                    let mut seen = Seen::default();
                    // SAFETY: `p` is this thread's alone until the call returns.
                    unsafe {
                        c.run_planned(
                            call,
                            sched,
                            p.as_mut_ptr().cast(),
                            p.len() * 4,
                            Some(&mut seen),
                        )
                    }
                    .unwrap();
                    (p, seen)
                });
                let mut bufs = staged.clone();
                for (r, (p, seen)) in out.iter().enumerate() {
                    unpack(&plan, r, p, &mut bufs[r]);
                    // Every block of the packed buffer: prepared once, before it is
                    // finished once.
                    let bytes = p.len() * 4;
                    let blocks = bytes.div_ceil(1024);
                    for b in 0..blocks {
                        let range = b * 1024..((b + 1) * 1024).min(bytes);
                        let at = |kind| {
                            let hits: Vec<usize> = (0..seen.events.len())
                                .filter(|&i| seen.events[i] == (kind, range.clone()))
                                .collect();
                            assert_eq!(hits.len(), 1, "n={n} rank {r} block {b}");
                            hits[0]
                        };
                        assert!(at(true) < at(false), "n={n} rank {r} block {b}");
                    }
                    assert_eq!(seen.events.len(), 2 * blocks, "n={n} rank {r}");
                }
                phase3(&plan, &mut bufs);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for r in 0..n {
                    assert_eq!(
                        bits(&bufs[r]),
                        bits(&want[r]),
                        "n={n}/{per} count={count} rank {r}"
                    );
                }
            }
        }
    }

    /// The shards `rank` owns, one after another.
    fn pack(plan: &DeviceHierPlan, rank: usize, buf: &[f32]) -> Vec<f32> {
        let mut v = vec![0.0; plan.packed_len(rank)];
        for (_, r, at) in plan.packed(rank) {
            v[at..at + r.len()].copy_from_slice(&buf[r]);
        }
        v
    }

    fn unpack(plan: &DeviceHierPlan, rank: usize, packed: &[f32], buf: &mut [f32]) {
        for (_, r, at) in plan.packed(rank) {
            let len = r.len();
            buf[r].copy_from_slice(&packed[at..at + len]);
        }
    }

    /// The host path's hierarchical all-reduce of the same inputs, in the simulator.
    fn host_path(nodes: &[Vec<usize>], inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let count = inputs.first().map_or(0, |v| v.len());
        let scheds: Vec<_> = (0..inputs.len())
            .map(|rank| {
                let mut b = Builder::new("hier");
                let buf = Region::new(BufId::Output, 0..count * 4);
                hierarchical::all_reduce_inplace(
                    &mut b, nodes, rank, buf, count, 4, CHUNK, None, None,
                );
                b.build()
            })
            .collect();
        let mut ranks: Vec<SimRank> = inputs
            .iter()
            .map(|v| SimRank {
                output: to_bytes(v),
                ..Default::default()
            })
            .collect();
        run(&scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
        ranks
            .iter()
            .map(|r| bytemuck::pod_collect_to_vec(&r.output))
            .collect()
    }

    #[test]
    fn packed_blocks_map_onto_the_owned_shards_exactly() {
        let plan = DeviceHierPlan::new(&shape(&[3, 2, 1]), 6001, 4);
        // Rank 3 owns shards 0, 2, 4 (1001, 1000, 1000 elements).
        assert_eq!(plan.packed_len(3), 3001);
        assert_eq!(
            plan.buffer_pieces(3, 3000..8000),
            vec![(3000, 3000, 1004), (8004, 4004, 3996)]
        );
        for rank in 0..6 {
            let bytes = plan.packed_len(rank) * 4;
            let mut covered = vec![0u8; 6001 * 4];
            let mut next = 0;
            for b in (0..bytes).step_by(1024) {
                for (at, from, len) in plan.buffer_pieces(rank, b..(b + 1024).min(bytes)) {
                    assert_eq!(from, next, "rank {rank}");
                    next += len;
                    covered[at..at + len].iter_mut().for_each(|c| *c += 1);
                }
            }
            assert_eq!(next, bytes, "rank {rank}");
            let want: Vec<u8> = (0..6001 * 4)
                .map(|i| {
                    u8::from(
                        plan.owned(rank)
                            .iter()
                            .any(|&j| plan.shards[j].contains(&(i / 4))),
                    )
                })
                .collect();
            assert_eq!(covered, want, "rank {rank}");
        }
    }

    #[test]
    fn uneven_hosts_give_each_rank_of_a_host_an_equal_part() {
        let plan = DeviceHierPlan::new(&shape(&[3, 2, 1]), 6000, 4);
        assert_eq!(plan.shards.len(), 6);
        assert_eq!(plan.owned(0), vec![0, 3]);
        assert_eq!(plan.owned(2), vec![2, 5]);
        assert_eq!(plan.owned(3), vec![0, 2, 4]);
        assert_eq!(plan.owned(5), (0..6).collect::<Vec<_>>());
        assert_eq!(plan.reduce_sources(0, 4), vec![0, 2]);
        assert_eq!(plan.inter_host_ring(4), vec![1, 3, 5]);
        assert_eq!(plan.inter_host_ring(5), vec![2, 4, 5]);
    }

    #[test]
    fn results_are_the_host_paths_bit_for_bit_and_the_same_on_every_rank() {
        for sizes in [&[3, 2, 1][..], &[2, 2], &[4], &[1, 1, 1], &[1, 3]] {
            let nodes = shape(sizes);
            let n: usize = sizes.iter().sum();
            for count in [0usize, 1, 5, 1000, 4099] {
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, count)).collect();
                let plan = DeviceHierPlan::new(&nodes, count, 4);
                let got = device_twin(&plan, &inputs);
                let want = host_path(&nodes, &inputs);
                for r in 0..n {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got[r]),
                        bits(&got[0]),
                        "{sizes:?} count={count} rank {r}"
                    );
                    assert_eq!(
                        bits(&got[r]),
                        bits(&want[r]),
                        "{sizes:?} count={count} rank {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_rank_moves_a_local_share_over_pcie() {
        // About 64 MiB of f32, a multiple of every shard count here (exact shares).
        let count = (16 << 20) / 12 * 12;
        let bytes = count * 4;
        for sizes in [&[3, 2, 1][..], &[2, 2], &[4, 4], &[1, 1]] {
            let nodes = shape(sizes);
            let plan = DeviceHierPlan::new(&nodes, count, 4);
            for (k, host) in nodes.iter().enumerate() {
                let l = host.len();
                for &r in host {
                    let b = plan.link_bytes(r, 4);
                    let limit = bytes as f64 / l as f64 * 1.05;
                    assert!(
                        b.device_to_host as f64 <= limit,
                        "{sizes:?} rank {r}: {b:?}"
                    );
                    assert_eq!(b.device_to_host, b.host_to_device);
                    // IPC: (L-1)/L of the buffer read in each of phases 1 and 3.
                    assert_eq!(b.ipc_read, 2 * (l - 1) * bytes / l, "{sizes:?} host {k}");
                    // fp16 on the host links halves both PCIe and network bytes.
                    let c = plan.link_bytes(r, 2);
                    assert_eq!(c.device_to_host * 2, b.device_to_host);
                    assert_eq!(c.network_sent * 2, b.network_sent);
                }
            }
        }
        // 2 hosts x 2 ranks, 64 MiB: 32 MiB each way over PCIe per rank instead of 64
        // (flat staged), 2 (N-1)/N of its 32 MiB shard on the network, and 32 MiB read
        // from the host-mate in each IPC phase.
        let plan = DeviceHierPlan::new(&shape(&[2, 2]), 16 << 20, 4);
        assert_eq!(
            plan.link_bytes(1, 4),
            LinkBytes {
                ipc_read: 64 << 20,
                device_to_host: 32 << 20,
                host_to_device: 32 << 20,
                network_sent: 32 << 20,
            }
        );
    }
}
