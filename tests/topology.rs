//! Topology files describing hardware this machine lacks (8-GPU NVLink and PCIe nodes,
//! a mixed 2 x 4 cluster) and the schedules the planner builds for them. No I/O besides
//! reading the files: the schedules are checked as data and run in the simulator.

use std::collections::BTreeSet;
use std::path::PathBuf;

use hetccl::algorithm::cost::LinkCost;
use hetccl::algorithm::sim::{self, SimRank};
use hetccl::algorithm::tuning::LinkModel;
use hetccl::algorithm::{self, Algo, Call, OpKind, Schedule, Tuning};
use hetccl::dtype::CollectiveOp;
use hetccl::topology::{probe, Device, LinkClass, Topology};
use hetccl::{DataType, ReduceOp};

fn fixture(name: &str) -> Topology {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "topologies", name]
        .iter()
        .collect();
    Topology::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn all_reduce(count: usize) -> Call {
    Call {
        op: CollectiveOp::AllReduce,
        dtype: DataType::F32,
        redop: ReduceOp::Sum,
        count,
        root: 0,
        in_place: true,
        is_send: false,
    }
}

/// Every rank's schedule for an in-place f32 sum of `count` elements.
fn plans(t: &Topology, algo: Algo, count: usize, m: &LinkModel) -> Vec<Schedule> {
    let tuning = Tuning {
        chunk_bytes: 64 << 10,
        slots: 9,
        shard_weights: m.shard_weights.clone(),
        ring_order: Default::default(),
    };
    (0..t.world_size())
        .map(|r| {
            algorithm::plan(
                &all_reduce(count),
                r,
                t.world_size(),
                algo,
                tuning.clone(),
                &t.nodes,
            )
        })
        .collect()
}

/// Peers `rank` sends to and receives from, and the bytes it sends to each.
fn traffic(s: &Schedule) -> (BTreeSet<usize>, BTreeSet<usize>, Vec<(usize, usize)>) {
    let (mut to, mut from) = (BTreeSet::new(), BTreeSet::new());
    let mut bytes: Vec<(usize, usize)> = Vec::new();
    for op in &s.ops {
        match op.kind {
            OpKind::Send { peer, src } => {
                to.insert(peer);
                match bytes.iter_mut().find(|(p, _)| *p == peer) {
                    Some((_, b)) => *b += src.len,
                    None => bytes.push((peer, src.len)),
                }
            }
            OpKind::Recv { peer, .. } => {
                from.insert(peer);
            }
            _ => {}
        }
    }
    bytes.sort();
    (to, from, bytes)
}

/// Runs the schedules in the simulator and checks the closed form sum.
fn check_sum(scheds: &[Schedule], count: usize) {
    let n = scheds.len();
    let mut ranks: Vec<SimRank> = (0..n)
        .map(|r| SimRank {
            output: bytemuck::cast_slice(
                &(0..count).map(|i| (r + i % 5) as f32).collect::<Vec<_>>(),
            )
            .to_vec(),
            ..Default::default()
        })
        .collect();
    sim::run(scheds, &mut ranks, DataType::F32, ReduceOp::Sum).unwrap();
    let want: Vec<f32> = (0..count)
        .map(|i| (n * (n - 1) / 2 + n * (i % 5)) as f32)
        .collect();
    for (r, rk) in ranks.iter().enumerate() {
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&rk.output);
        assert_eq!(got, want, "rank {r}");
    }
}

fn cost(us: f64, gb_s: f64) -> LinkCost {
    LinkCost {
        alpha: us / 1e6,
        beta: gb_s * 1e9,
    }
}

#[test]
fn nvlink_node_runs_a_ring_of_eight_and_doubling_or_a_tree_for_small_messages() {
    let t = fixture("nvlink-8gpu.json");
    assert_eq!(t.nodes, vec![(0..8).collect::<Vec<_>>()]);
    assert_eq!(
        t.ranks[5].device,
        Device::Cuda {
            ordinal: 5,
            pci_bus_id: "0000:90:00.0".into(),
            name: "NVIDIA A100-SXM4-80GB".into(),
            memory: 80 << 30,
            sm_count: 108,
        }
    );
    assert_eq!(t.link(2, 7).class, LinkClass::NvLink);
    let m = LinkModel::of(&t);
    assert_eq!(m.intra, cost(3.0, 150.0));
    assert_eq!(m.shard_weights, None);
    assert_eq!(m.choose(CollectiveOp::AllReduce, 64 << 20), Algo::Ring);
    // 3 swaps against the tree's 6 steps; past doubling's cap, the tree.
    assert_eq!(m.choose(CollectiveOp::AllReduce, 1 << 10), Algo::Doubling);
    assert_eq!(m.choose(CollectiveOp::AllReduce, 128 << 10), Algo::Tree);

    let count = 1 << 20; // 4 MiB
    let scheds = plans(&t, Algo::Ring, count, &m);
    for (r, s) in scheds.iter().enumerate() {
        let (to, from, bytes) = traffic(s);
        assert_eq!(
            to,
            BTreeSet::from([(r + 1) % 8]),
            "rank {r} sends to its right"
        );
        assert_eq!(
            from,
            BTreeSet::from([(r + 7) % 8]),
            "rank {r} hears its left"
        );
        // 2 (n-1)/n of the buffer: 7 MiB
        assert_eq!(bytes, vec![((r + 1) % 8, 7 << 20)]);
    }
    check_sum(&plans(&t, Algo::Ring, 10_007, &m), 10_007);
}

#[test]
fn pcie_node_is_bounded_by_the_hop_across_switches() {
    let t = fixture("pcie-8gpu.json");
    assert_eq!(t.nodes.len(), 1);
    assert_eq!(t.link(1, 2).perf().bandwidth(), 20e9);
    assert_eq!(t.link(3, 4).perf().bandwidth(), 9e9);
    assert_eq!(t.link(0, 7).class, LinkClass::Pcie);
    let m = LinkModel::of(&t);
    // The ring 0..7 crosses the root complex twice (3-4, 7-0): that hop sets its pace.
    assert_eq!(m.intra, cost(8.0, 9.0));
    assert_eq!(m.choose(CollectiveOp::AllReduce, 64 << 20), Algo::Ring);
    assert_eq!(m.choose(CollectiveOp::AllReduce, 4 << 10), Algo::Doubling);
    assert_eq!(m.choose(CollectiveOp::AllReduce, 128 << 10), Algo::Tree);
    assert_eq!(m.choose(CollectiveOp::Broadcast, 64 << 20), Algo::Ring);
    let scheds = plans(&t, Algo::Ring, 1 << 20, &m);
    let (to, _, bytes) = traffic(&scheds[3]);
    assert_eq!(to, BTreeSet::from([4]));
    assert_eq!(bytes, vec![(4, 7 << 20)]);
}

#[test]
fn mixed_cluster_takes_the_hierarchy_with_shards_sized_by_each_nic() {
    let t = fixture("mixed-2x4.json");
    assert_eq!(t.nodes, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    assert_eq!(t.link(0, 1).class, LinkClass::NvLink);
    assert_eq!(t.link(5, 6).class, LinkClass::Pcie);
    assert_eq!(t.link(0, 4).class, LinkClass::Rdma);
    assert_eq!(t.link(2, 6).class, LinkClass::Tcp);
    assert_eq!(t.link(3, 4).class, LinkClass::Tcp);
    let m = LinkModel::of(&t);
    assert_eq!(m.intra, cost(6.0, 11.0)); // the PCIe node
    assert_eq!(m.inter, cost(30.0, 3.0)); // the 25 Gbit/s NICs
                                          // shard j runs between local ranks j of the two nodes: 12, 12, 3, 3 GB/s
    assert_eq!(m.shard_weights, Some(vec![12.0, 12.0, 3.0, 3.0]));
    assert_eq!(m.choose(CollectiveOp::AllReduce, 64 << 20), Algo::Hier);

    let count = 3000; // shards of 1200, 1200, 300, 300 elements
    let scheds = plans(&t, Algo::Hier, count, &m);
    for (r, s) in scheds.iter().enumerate() {
        let local = r % 4;
        let peer = if r < 4 { r + 4 } else { r - 4 };
        let (_, _, bytes) = traffic(s);
        let across: Vec<(usize, usize)> = bytes
            .iter()
            .copied()
            .filter(|(p, _)| t.node_of[*p] != t.node_of[r])
            .collect();
        // Only the shard's owner pair talks across, and its whole shard crosses once
        // per phase: half in the reduce-scatter, half in the all-gather.
        let shard = [1200, 1200, 300, 300][local] * 4;
        assert_eq!(across, vec![(peer, shard)], "rank {r}");
        // Inside the node, the rank sends every other owner that owner's shard (phase 1)
        // and its own shard to every other rank (phase 3).
        let mates: Vec<(usize, usize)> = bytes
            .iter()
            .copied()
            .filter(|(p, _)| t.node_of[*p] == t.node_of[r])
            .collect();
        let base = r - local;
        let want: Vec<(usize, usize)> = (0..4)
            .filter(|&l| l != local)
            .map(|l| {
                (
                    base + l,
                    ([1200, 1200, 300, 300][l] + [1200, 1200, 300, 300][local]) * 4,
                )
            })
            .collect();
        assert_eq!(mates, want, "rank {r}");
    }
    check_sum(&scheds, count);
    check_sum(&plans(&t, Algo::Hier, 9_973, &m), 9_973);
}

#[test]
fn probe_covers_the_pairs_the_mixed_schedules_use() {
    let t = fixture("mixed-2x4.json");
    let pairs: BTreeSet<(usize, usize)> = probe::probe_order(&t).into_iter().collect();
    // 8 ring neighbours, 6 node mates that are not neighbours, 4 shard owner pairs
    assert_eq!(pairs.len(), 8 + 6 + 4);
    for p in [
        (0, 4),
        (1, 5),
        (2, 6),
        (3, 7),
        (3, 4),
        (0, 7),
        (0, 3),
        (5, 7),
    ] {
        assert!(pairs.contains(&p), "{p:?}");
    }
}

#[test]
fn every_fixture_dumps_and_loads_back_equal() {
    let dir = std::env::temp_dir().join(format!("hetccl-topology-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["nvlink-8gpu.json", "pcie-8gpu.json", "mixed-2x4.json"] {
        let t = fixture(name);
        assert_eq!(
            Topology::from_json(&t.to_json().unwrap()).unwrap(),
            t,
            "{name}"
        );
        let path = dir.join(name);
        t.dump(&path).unwrap();
        assert_eq!(Topology::load(&path).unwrap(), t, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
