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
        inter_parts: m.inter_parts.clone(),
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

#[test]
fn topology_files_are_read_up_to_a_limit() {
    use hetccl::topology::{TOPOLOGY_MAX_BYTES, TOPOLOGY_MAX_RANKS};
    assert_eq!(
        Topology::load(std::path::Path::new("/dev/zero"))
            .unwrap_err()
            .to_string(),
        "topology: /dev/zero: larger than the 64 MiB limit for a topology file"
    );
    let dir = std::env::temp_dir().join(format!("hetccl-topology-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(TOPOLOGY_MAX_BYTES + 1)
        .unwrap();
    assert_eq!(
        Topology::load(&big).unwrap_err().to_string(),
        format!(
            "topology: {}: 67108865 bytes, more than the 64 MiB limit for a topology file",
            big.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // A short file may not make the n x n link table of a huge job.
    let ranks: Vec<String> = (0..=TOPOLOGY_MAX_RANKS)
        .map(|r| format!(r#"{{"rank":{r},"node_id":"n"}}"#))
        .collect();
    let json = format!(r#"{{"ranks":[{}]}}"#, ranks.join(","));
    let err = Topology::from_json(&json).unwrap_err().to_string();
    assert!(
        err.starts_with("topology: 4097 ranks, more than the 4096 a topology file may describe"),
        "{err}"
    );
}

mod parser_properties {
    //! Random and mutated topology files: the parser never panics, never builds more than
    //! its rank limit, and every refusal says what is wrong.

    use super::*;
    use proptest::prelude::*;

    fn fixtures() -> Vec<String> {
        ["nvlink-8gpu.json", "pcie-8gpu.json", "mixed-2x4.json"]
            .iter()
            .map(|n| {
                let p: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "topologies", n]
                    .iter()
                    .collect();
                std::fs::read_to_string(p).unwrap()
            })
            .collect()
    }

    /// Whatever came back: an accepted topology reads back equal from its own dump and
    /// stays within the limit; a refusal is a topology error with a reason.
    fn check(text: &str) {
        match Topology::from_json(text) {
            Ok(t) => {
                assert!(t.world_size() >= 1);
                assert!(t.world_size() <= hetccl::topology::TOPOLOGY_MAX_RANKS);
                assert_eq!(Topology::from_json(&t.to_json().unwrap()).unwrap(), t);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("topology: ") && msg.len() > 12, "{msg}");
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Mutation {
        Truncate(usize),
        FlipBit(usize, u8),
        Insert(usize, String),
        Delete(usize, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let fragment = prop_oneof![
            Just("-1".to_string()),
            Just("1e400".to_string()),
            Just("18446744073709551616".to_string()),
            Just("1152921504606846976".to_string()),
            Just("null".to_string()),
            Just("\"\\ud800\"".to_string()),
            Just("[[[[[[[[".to_string()),
            Just("{\"ranks\": [0, 1]},".to_string()),
            "[ -~]{0,12}",
        ];
        prop_oneof![
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
            (any::<usize>(), fragment).prop_map(|(p, f)| Mutation::Insert(p, f)),
            (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Delete(p, n)),
        ]
    }

    fn apply(text: &str, muts: &[Mutation]) -> String {
        let mut b = text.as_bytes().to_vec();
        for m in muts {
            let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
            match m {
                Mutation::Truncate(p) => b.truncate(at(*p, b.len())),
                Mutation::FlipBit(p, bit) if !b.is_empty() => {
                    let i = p % b.len();
                    b[i] ^= 1 << bit;
                }
                Mutation::FlipBit(..) => {}
                Mutation::Insert(p, f) => {
                    let i = at(*p, b.len());
                    b.splice(i..i, f.bytes());
                }
                Mutation::Delete(p, n) => {
                    let i = at(*p, b.len());
                    let j = (i + n).min(b.len());
                    b.drain(i..j);
                }
            }
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            check(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn mutated_fixtures_parse_or_are_refused_with_a_reason(
            which in 0usize..3,
            muts in proptest::collection::vec(mutation(), 1..5),
        ) {
            let text = apply(&fixtures()[which], &muts);
            check(&text);
        }

        #[test]
        fn link_entries_naming_absent_ranks_are_refused_by_name(
            nodes in proptest::collection::vec(0u8..3, 1..6),
            links in proptest::collection::vec((any::<u64>(), 0u64..8), 0..6),
        ) {
            let ranks: Vec<String> = nodes
                .iter()
                .enumerate()
                .map(|(r, n)| format!(r#"{{"rank":{r},"node_id":"n{n}"}}"#))
                .collect();
            // Half the indices small (often valid), half anywhere up to 2^64.
            let links: Vec<(u64, u64)> = links
                .iter()
                .map(|&(a, b)| if a % 2 == 0 { (a % 8, b) } else { (a, b) })
                .collect();
            let entries: Vec<String> =
                links.iter().map(|(a, b)| format!(r#"{{"ranks":[{a},{b}]}}"#)).collect();
            let json = format!(r#"{{"ranks":[{}],"links":[{}]}}"#, ranks.join(","), entries.join(","));
            let n = nodes.len() as u64;
            let first_bad = links.iter().find(|(a, b)| *a >= n || *b >= n || a == b);
            match (Topology::from_json(&json), first_bad) {
                (Ok(t), None) => prop_assert_eq!(t.world_size(), nodes.len()),
                (Err(e), Some((a, b))) => {
                    let want = format!("link [{a}, {b}] must name two different ranks below {n}");
                    prop_assert!(e.to_string().contains(&want), "{} lacks {}", e, want);
                }
                (r, bad) => prop_assert!(false, "{:?} for bad link {:?}", r.map(|t| t.world_size()), bad),
            }
        }
    }
}
