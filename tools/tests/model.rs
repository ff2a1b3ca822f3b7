//! The performance model against what was measured here (docs/PERFORMANCE.md, the
//! simulated cluster and trainer sections; docs/MODEL.md lists every run). Three runs fit
//! its three parameters; every other run is predicted and its error asserted.
//!
//! | parameter | fitted to |
//! | --- | --- |
//! | NIC bandwidth of a 1 Gbit/s simulated uplink | 4 nodes × 1 rank, ring, 64 MiB: 0.865 s |
//! | a rank's local copy/reduce speed | 2 × 2, hierarchy, 64 MiB at 1 Gbit/s: 0.578 s |
//! | a rank's bert-tiny speed | 1 rank, batch 8: 67.8 / 66.1 samples/s |

use hetccl::algorithm::cost::LinkCost;
use hetccl::config::{AlgoChoice, CompressMode};
use hetccl::topology::LinkClass;
use hetccl_testkit::timed::{self, Knobs, Net, NodeNet};
use hetccl_tools::simulate::{self, Cluster, StepJob, STRATEGIES};

const MIB: usize = 1 << 20;
/// Base one-way latency between the namespaces (no netem: tens of µs).
const ALPHA: f64 = 50e-6;

fn net(sizes: &[usize], nic_beta: f64, local: f64) -> Net {
    Net {
        nodes: sizes
            .iter()
            .enumerate()
            .map(|(k, &r)| NodeNet {
                name: format!("n{k}"),
                ranks: r,
                intra_class: LinkClass::Shm,
                intra: LinkCost::SHM,
                nic: LinkCost {
                    alpha: ALPHA,
                    beta: nic_beta,
                },
                gpu: false,
            })
            .collect(),
        oversubscription: 1.0,
        local_bytes_per_s: local,
    }
}

fn all_reduce(
    sizes: &[usize],
    nic: f64,
    local: f64,
    bytes: usize,
    algo: AlgoChoice,
    c: CompressMode,
) -> f64 {
    let n = net(sizes, nic, local);
    let knobs = Knobs {
        algo,
        compress: c,
        ..Knobs::default()
    };
    timed::all_reduce(&n, bytes, knobs, &vec![0.0; n.world_size()])
        .unwrap()
        .end()
}

/// The `x` in `lo..hi` where `f(x)` (monotone) equals `want`.
fn solve(lo: f64, hi: f64, want: f64, f: impl Fn(f64) -> f64) -> f64 {
    let (mut lo, mut hi) = (lo, hi);
    let rising = f(hi) > f(lo);
    for _ in 0..60 {
        let mid = (lo * hi).sqrt();
        if (f(mid) < want) == rising {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo * hi).sqrt()
}

struct Fit {
    nic: f64,
    local: f64,
    tiny: f64,
}

fn fit() -> Fit {
    use AlgoChoice::*;
    let off = CompressMode::Off;
    let nic = solve(50e6, 200e6, 0.865, |b| {
        all_reduce(&[1, 1, 1, 1], b, f64::INFINITY, 64 * MIB, Ring, off)
    });
    let local = solve(0.2e9, 50e9, 0.578, |l| {
        all_reduce(&[2, 2], nic, l, 64 * MIB, Hier, off)
    });
    Fit {
        nic,
        local,
        tiny: (67.8 + 66.1) / 2.0,
    }
}

fn trainer(fit: &Fit, speeds: &[f64], batch: usize, balanced: bool) -> f64 {
    let (params, _) = simulate::preset("bert-tiny").unwrap();
    let cluster = Cluster {
        net: net(&[speeds.len()], fit.nic, fit.local),
        speed: speeds.to_vec(),
    };
    let job = StepJob {
        grad_bytes: params as usize * 4,
        global_batch: Some(batch),
        per_rank: 0,
        update_freq: 1,
        bucket_bytes: 25 * MIB,
    };
    let s = STRATEGIES[if balanced { 3 } else { 1 }];
    simulate::step(&cluster, &job, s).unwrap().throughput()
}

/// Every run not used to fit, its measurement and the model's prediction.
fn predictions(f: &Fit) -> Vec<(&'static str, f64, f64)> {
    use AlgoChoice::*;
    let off = CompressMode::Off;
    let slow = f.nic / 10.0;
    let ar = |s: &[usize], nic: f64, b: usize, a: AlgoChoice, c: CompressMode| {
        all_reduce(s, nic, f.local, b, a, c)
    };
    vec![
        (
            "2x2 1G ring 64M s",
            0.844,
            ar(&[2, 2], f.nic, 64 * MIB, Ring, off),
        ),
        (
            "2x2 1G auto 64M s",
            0.587,
            ar(&[2, 2], f.nic, 64 * MIB, Auto, off),
        ),
        (
            "3+2+1 1G hier 64M s",
            0.911,
            ar(&[3, 2, 1], f.nic, 64 * MIB, Hier, off),
        ),
        (
            "3+2+1 1G ring 64M s",
            0.953,
            ar(&[3, 2, 1], f.nic, 64 * MIB, Ring, off),
        ),
        (
            "4x1 1G hier 64M s",
            0.862,
            ar(&[1, 1, 1, 1], f.nic, 64 * MIB, Hier, off),
        ),
        (
            "2x2 100M hier 8M s",
            0.772,
            ar(&[2, 2], slow, 8 * MIB, Hier, off),
        ),
        (
            "2x2 100M ring 8M s",
            1.145,
            ar(&[2, 2], slow, 8 * MIB, Ring, off),
        ),
        (
            "2x2 1G hier fp16 64M s",
            0.293,
            ar(&[2, 2], f.nic, 64 * MIB, Hier, CompressMode::Inter),
        ),
        (
            "trainer 2 ranks samples/s",
            124.05,
            trainer(f, &[f.tiny, f.tiny], 16, false),
        ),
        (
            "trainer slowed equal samples/s",
            67.55,
            trainer(f, &[f.tiny, f.tiny / 2.0], 16, false),
        ),
        (
            "trainer slowed balanced samples/s",
            98.0,
            trainer(f, &[f.tiny, f.tiny / 2.0], 16, true),
        ),
    ]
}

#[test]
fn the_model_predicts_every_run_not_used_to_fit_it() {
    let f = fit();
    println!(
        "fitted: NIC {:.1} MB/s, local {:.2} GB/s, bert-tiny {:.2} samples/s",
        f.nic / 1e6,
        f.local / 1e9,
        f.tiny
    );
    let mut misses = Vec::new();
    for (run, measured, predicted) in predictions(&f) {
        let err = (predicted - measured) / measured;
        println!(
            "{run:<36} measured {measured:>8.3} predicted {predicted:>8.3} error {:>+6.1} %",
            100.0 * err
        );
        if err.abs() > 0.15 {
            misses.push(format!("{run}: {:+.1} %", 100.0 * err));
        }
    }
    assert!(misses.is_empty(), "over 15 %: {misses:?}");
}
